"""Chunked pure-torch plan of the fused linear log-prob + entropy (the CPU backend).

Rows are processed in chunks whose fp32 ``[rows, V]`` logits fit ``opts.chunk_bytes``; the forward keeps three
floats a row (logp, entropy, lse) and the backward recomputes each chunk's logits (the two-phase plan of
docs/math.md#execution-plans, 8·N·H·V FLOPs). Inputs are already compacted to non-ignored rows.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .. import fixed_rows
from ..options import LogProbOptions
from ..softmax_math import (compute_dtype, merge_segments, rows_per_chunk, segment_stats, softmax_grad_, softmax_stats,
                            target_columns)
from ..temperature import Temperature
from ..truncation import Truncation, apply_, truncate_, truncated_coefficient


def compute_head(weight: torch.Tensor, bias: Optional[torch.Tensor], work: torch.dtype):
    # Half-precision heads are upcast once per call: CPU half matmuls are slow and round the logits.
    w = weight if weight.dtype == work else weight.to(work)
    b = None if bias is None else (bias if bias.dtype == work else bias.to(work))
    return w, b


def tempered_logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], temp: Temperature,
                    work) -> torch.Tensor:
    h = h if h.dtype == work else h.to(work)
    z = torch.mm(h, w.T) if b is None else torch.addmm(b, h, w.T)
    return temp.divide_(z)


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    temp: Temperature,
    opts: LogProbOptions,
    trunc: Truncation = Truncation(),
    tau_out: Optional[torch.Tensor] = None,
    logits: Optional[Callable] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden ``[N, H]``, weight ``[V, H]``, targets ``[N]`` (or ``[N, K]``: logp ``[N, K]``) -> (logp, entropy,
    m, log_s), each ``[N]``; with an active ``trunc``, those of the truncated distribution (``-inf`` log-prob for a
    target outside it), and its row thresholds written into ``tau_out`` ``[N]``. ``logits(h, temp)`` forms a
    chunk's tempered fp32 logits (default: a torch GEMM; the Triton backend passes its tile kernel's)."""
    if opts.deterministic:
        parts, zy = forward_partials(hidden, weight, bias, targets, temp, opts, trunc, tau_out)
        return merge_partials(parts, zy, opts.compute_entropy)
    n, vocab = hidden.shape[0], weight.shape[0]
    work = compute_dtype(hidden.dtype)
    if logits is None:
        w, b = compute_head(weight, bias, work)
        logits = (lambda h, t: tempered_logits(h, w, b, t, work))  # noqa: E731
    outs = [torch.empty(targets.shape if i == 0 else n, dtype=work, device=hidden.device) for i in range(4)]
    step, take = fixed_rows.chunking(False, rows_per_chunk(vocab, opts.chunk_bytes, work.itemsize), hidden.device)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        z = logits(take(hidden, lo, hi), take(temp, lo, hi))
        if trunc.active:
            tau_out[lo:hi] = truncate_(z, take(trunc, lo, hi))[:hi - lo]
        for out, val in zip(outs, softmax_stats(z, take(targets, lo, hi), opts.compute_entropy)):
            out[lo:hi] = val[:hi - lo]
    return outs[0], outs[1], outs[2], outs[3]


def forward_partials(hidden, weight, bias, targets, temp: Temperature, opts: LogProbOptions,
                     trunc: Truncation = Truncation(), tau_out=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The deterministic forward before its merge: (parts ``[N, 3, S]``, the softmax state (m, s, q) of every row in
    each of the S fixed vocabulary segments; zy, the targets' tempered logits in ``targets``' shape, 0 for a
    negative target). ``merge_partials`` folds them; a vocabulary-parallel rank folds the gathered parts of every
    rank the same way, so whole-segment shards give the one-process result bitwise."""
    n = hidden.shape[0]
    work = compute_dtype(hidden.dtype)
    w, b = compute_head(weight, bias, work)
    head = fixed_rows.SegmentedHead(w, b, fixed_rows.vocab_segment(hidden.device))
    parts = torch.empty(n, 3, head.count, dtype=work, device=hidden.device)
    zy = torch.zeros(targets.shape, dtype=work, device=hidden.device)
    step, take = fixed_rows.chunking(True, 0, hidden.device)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        h = take(hidden, lo, hi)
        z = head.logits(h if h.dtype == work else h.to(work), take(temp, lo, hi))
        if trunc.active:
            tau_out[lo:hi] = truncate_(z[:, :head.vocab], take(trunc, lo, hi))[:hi - lo]
        y = take(targets, lo, hi, -1)
        picked = z.gather(1, target_columns(y)).masked_fill((y if y.dim() == 2 else y.unsqueeze(1)) < 0, 0.0)
        zy[lo:hi] = (picked if y.dim() == 2 else picked.squeeze(1))[:hi - lo]
        parts[lo:hi] = torch.stack(segment_stats(z.view(-1, head.count, head.seg), opts.compute_entropy),
                                   1)[:hi - lo]
    return parts, zy


def segment_columns(dtype: torch.dtype, device: torch.device) -> int:
    """Columns of one of ``forward_partials``' segments."""
    return fixed_rows.vocab_segment(device)


def merge_partials(parts: torch.Tensor, zy: torch.Tensor, compute_entropy: bool):
    """(logp, entropy, m, log_s) from ``forward_partials``' output, segments folded in order, in fixed row
    blocks (the reductions see the same shapes whatever N)."""
    n = parts.shape[0]
    outs = [torch.empty(zy.shape if i == 0 else n, dtype=parts.dtype, device=parts.device) for i in range(4)]
    step, take = fixed_rows.chunking(True, 0, parts.device)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        blk = take(parts, lo, hi)
        for out, val in zip(outs, merge_segments(blk[:, 0], blk[:, 1], blk[:, 2], take(zy, lo, hi),
                                                 compute_entropy)):
            out[lo:hi] = val[:hi - lo]
    return tuple(outs)


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    temp: Temperature,
    m: torch.Tensor,
    log_s: torch.Tensor,
    entropy: torch.Tensor,
    c: torch.Tensor,
    d: Optional[torch.Tensor],
    opts: LogProbOptions,
    needs: Tuple[bool, bool, bool],
    tau: Optional[torch.Tensor] = None,
    fold=None,
):
    """Gradients (d_hidden ``[N, H]``, d_weight ``[V, H]``, d_bias ``[V]``), None where not needed. ``tau`` ``[N]``:
    the forward's truncation thresholds (the kept set is ``z >= tau``; None: no truncation). Deterministic mode:
    d_hidden is a fold over the vocabulary segments in order; ``fold`` (a vocabulary shard's) has ``start(lo, hi,
    rows, n)`` give each block's running fold from the shards before this one and ``done(lo, hi, acc, n)`` hand it
    on, and d_hidden is then returned at the working precision.

    c = dL/dlogp and d = dL/dentropy (or None), each ``[N]``. d_weight and d_bias accumulate in fp32 across chunks.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    work = compute_dtype(hidden.dtype)
    w, b = compute_head(weight, bias, work)
    need_h, need_w, need_b = needs
    # deterministic: each segment's logits and weight gradient from its own product, as in the forward
    head = fixed_rows.SegmentedHead(w, b, fixed_rows.vocab_segment(hidden.device)) if opts.deterministic else None
    if need_h and head is not None:  # the segment fold runs at the working precision, rounded once at the end
        dh = torch.empty(hidden.shape, dtype=work, device=hidden.device)
    else:
        dh = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
    dw = torch.zeros(weight.shape, dtype=work, device=weight.device) if need_w else None
    db = torch.zeros(vocab, dtype=work, device=weight.device) if need_b else None
    partial_segment = head is not None and vocab % head.seg > 0
    tail = w.new_zeros(head.seg, w.shape[1]) if need_w and partial_segment else None
    tail_b = w.new_zeros(head.seg, 1) if need_b and partial_segment else None
    c, d = c.to(work), (None if d is None else d.to(work))
    step, take = fixed_rows.chunking(opts.deterministic, rows_per_chunk(vocab, opts.chunk_bytes, work.itemsize),
                                     hidden.device)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        t = take(temp, lo, hi)
        h = take(hidden, lo, hi)
        h = h if h.dtype == work else h.to(work)
        z = tempered_logits(h, w, b, t, work) if head is None else head.logits(h, t)
        y, c_chunk = take(targets, lo, hi), take(c, lo, hi)
        if tau is not None:
            c_chunk = truncated_coefficient(apply_(z, take(tau, lo, hi, float("-inf"))), y, c_chunk)
        # padding rows: log_s = -inf marks them dead (no probability, no gradient)
        g = softmax_grad_(z, y, take(m, lo, hi), take(log_s, lo, hi, float("-inf")), take(entropy, lo, hi), c_chunk,
                          take(d, lo, hi), t)
        if need_h and head is not None:
            acc = g.new_zeros(g.shape[0], w.shape[1]) if fold is None else fold.start(lo, hi, g.shape[0], n)
            dh[lo:hi] = head.hidden_grad_(acc, g)[:hi - lo]
            if fold is not None:
                fold.done(lo, hi, dh[lo:hi], n)
        elif need_h:
            dh[lo:hi] = torch.mm(g[:, :vocab], w)[:hi - lo]
        if need_w and head is not None:
            head.weight_grad_(dw, g, h, tail)
        elif need_w:
            dw.addmm_(g.T, h)
        if need_b and head is not None:  # a column sum's order depends on the row's width: per segment too
            head.weight_grad_(db.view(vocab, 1), g, h.new_ones(h.shape[0], 1), tail_b)
        elif need_b:
            db += g.sum(0)
    for full, part in ((dw, tail), (db, tail_b)):
        if part is not None:
            full[vocab - vocab % head.seg:] = part[:vocab % head.seg].view(-1, *full.shape[1:])
    if dh is not None and fold is None:
        dh = dh.to(hidden.dtype)
    return (
        dh,
        None if dw is None else dw.to(weight.dtype),
        None if db is None else db.to(bias.dtype),
    )
