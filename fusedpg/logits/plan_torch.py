"""Chunked pure-torch plan of log-prob + entropy from materialised logits (the CPU backend).

The forward reads the logits once per chunk into an fp32 scratch buffer; the backward writes the gradient chunk by
chunk straight into its output (or into the logits buffer in in-place mode), so no extra N x V tensor exists.
Ignored rows arrive with ``valid = False``: their targets are clamped and their outputs and gradients zeroed.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import fixed_rows
from ..options import LogProbOptions
from ..softmax_math import compute_dtype, rows_per_chunk, softmax_grad_, softmax_stats
from ..temperature import Temperature
from ..truncation import Truncation, apply_, truncate_, truncated_coefficient


def _chunk(logits: torch.Tensor, lo: int, hi: int, temp: Temperature, work, take, fresh: bool) -> torch.Tensor:
    """The chunk's tempered logits in an owned work-dtype buffer (``fresh``: ``take`` already copied them)."""
    return take(temp, lo, hi).divide_(take(logits, lo, hi).to(work, copy=not fresh))


def forward(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, temp: Temperature, opts: LogProbOptions,
    trunc: Truncation = Truncation(), tau_out: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits ``[N, V]``, targets ``[N]`` (clamped), valid ``[N]`` bool -> (logp, entropy, m, log_s), each ``[N]``;
    an active ``trunc`` writes its row thresholds into ``tau_out`` ``[N]``."""
    n, vocab = logits.shape
    work = compute_dtype(logits.dtype)
    outs = [torch.empty(targets.shape if i == 0 else n, dtype=work, device=logits.device) for i in range(4)]
    step, take = fixed_rows.chunking(opts.deterministic, rows_per_chunk(vocab, opts.chunk_bytes, work.itemsize),
                                     logits.device)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        z = _chunk(logits, lo, hi, temp, work, take, opts.deterministic)
        if trunc.active:
            tau_out[lo:hi] = truncate_(z, take(trunc, lo, hi))[:hi - lo]
        for out, val in zip(outs, softmax_stats(z, take(targets, lo, hi), opts.compute_entropy)):
            out[lo:hi] = val[:hi - lo]
    zero = torch.zeros((), dtype=work, device=logits.device)
    rows = valid.any(1) if valid.dim() == 2 else valid
    return torch.where(valid, outs[0], zero), torch.where(rows, outs[1], zero), outs[2], outs[3]


def backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    temp: Temperature,
    m: torch.Tensor,
    log_s: torch.Tensor,
    entropy: torch.Tensor,
    c: torch.Tensor,
    d: Optional[torch.Tensor],
    opts: LogProbOptions,
    tau: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gradient w.r.t. logits ``[N, V]`` in the logits dtype, written into ``logits`` when ``opts.inplace``;
    ``tau`` ``[N]``: the forward's truncation thresholds (the kept set is ``z >= tau``; None: no truncation)."""
    n, vocab = logits.shape
    work = compute_dtype(logits.dtype)
    out = logits if opts.inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    zero = torch.zeros((), dtype=work, device=logits.device)
    c = torch.where(valid, c.to(work), zero)
    d = None if d is None else torch.where(valid.any(1) if valid.dim() == 2 else valid, d.to(work), zero)
    step, take = fixed_rows.chunking(opts.deterministic, rows_per_chunk(vocab, opts.chunk_bytes, work.itemsize),
                                     logits.device)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        z = _chunk(logits, lo, hi, temp, work, take, opts.deterministic)
        y, c_chunk = take(targets, lo, hi), take(c, lo, hi)
        if tau is not None:
            c_chunk = truncated_coefficient(apply_(z, take(tau, lo, hi, float("-inf"))), y, c_chunk)
        # padding rows: log_s = -inf marks them dead (no probability, no gradient)
        g = softmax_grad_(z, y, take(m, lo, hi), take(log_s, lo, hi, float("-inf")), take(entropy, lo, hi), c_chunk,
                          take(d, lo, hi), take(temp, lo, hi))
        out[lo:hi] = g[:hi - lo]
    return out
