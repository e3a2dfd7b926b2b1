"""``sample_logprob_entropy``: K tokens per position sampled from the LM head's own distribution, with their
log-probs and the entropy, from one chunked pass over the vocabulary (never ``[N, V]``).

The custom op ``fusedpg::linear_sample_logprob`` samples inside the chunk loop (``fusedpg.sampling``: the inverse
CDF of a counter-based uniform, so a row's tokens depend on its logits, ``seed`` and ``sample_ids`` alone) and scores the K
tokens with the same statistics; its backward is the multi-target backward of ``linear_logprob_entropy`` with the
sampled tokens as targets. The tokens carry no gradient (the score-function estimator differentiates log-probs).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from .. import checks, fixed_rows
from ..backend import resolve_impl
from ..options import LogProbOptions
from ..rows import Rows
from ..sampling import inverse_cdf, uniforms
from ..softmax_math import compute_dtype, rows_per_chunk, softmax_stats
from ..temperature import Temperature
from .op import linear_logprob_entropy_backward_op
from .plan_torch import compute_head, tempered_logits

__all__ = ["sample_logprob_entropy"]


@torch.library.custom_op("fusedpg::linear_sample_logprob", mutates_args=())
def linear_sample_logprob_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], valid: torch.Tensor,
    sample_ids: torch.Tensor, temp_rows: Optional[torch.Tensor], temp_value: float, num_samples: int, seed: int,
    ignore_index: int, compute_entropy: bool, impl: str, chunk_bytes: int, deterministic: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden ``[N, H]``, valid bool ``[N]``, sample_ids int ``[N]`` -> (tokens ``[N, K]`` int64, logp ``[N, K]``,
    entropy, m, log_s ``[N]``); rows not ``valid`` get ``ignore_index`` tokens and zeros."""
    temp = Temperature.of(temp_rows, temp_value)
    checks.temperature_values(temp)
    n, out = hidden.shape[0], compute_dtype(hidden.dtype)
    rows = Rows(valid.to(torch.int64), 0)  # the compaction of the valid rows
    tokens = torch.full((n, num_samples), ignore_index, dtype=torch.int64, device=hidden.device)
    if rows.count == 0:
        z = hidden.new_zeros(n, dtype=out)
        return tokens, hidden.new_zeros((n, num_samples), dtype=out), z, z.clone(), z.clone()
    h, t, u = rows.take(hidden), temp.take(rows.idx), uniforms(seed, rows.take(sample_ids), num_samples)
    opts = LogProbOptions.budgeted(chunk_bytes, deterministic=deterministic, compute_entropy=compute_entropy)
    w, b = compute_head(weight, bias, out)
    picked = torch.empty((h.shape[0], num_samples), dtype=torch.int64, device=h.device)
    stats = [torch.empty((h.shape[0], num_samples) if i == 0 else h.shape[0], dtype=out, device=h.device)
             for i in range(4)]
    step, take = fixed_rows.chunking(opts.deterministic, rows_per_chunk(w.shape[0], opts.chunk_bytes, out.itemsize),
                                     h.device)
    for lo in range(0, h.shape[0], step):
        hi = min(h.shape[0], lo + step)
        z = tempered_logits(take(h, lo, hi), w, b, take(t, lo, hi), out)
        y = inverse_cdf(z, take(u, lo, hi, 0.5))  # before softmax_stats, which overwrites z
        picked[lo:hi] = y[:hi - lo]
        for dst, val in zip(stats, softmax_stats(z, y, opts.compute_entropy)):
            dst[lo:hi] = val[:hi - lo]
    if rows.idx is None:
        return (picked,) + tuple(stats)
    return (tokens.index_copy_(0, rows.idx, picked),) + tuple(rows.scatter(x) for x in stats)


@linear_sample_logprob_op.register_fake
def _(hidden, weight, bias, valid, sample_ids, temp_rows, temp_value, num_samples, seed, ignore_index,
      compute_entropy, impl, chunk_bytes, deterministic):
    dtype, n = compute_dtype(hidden.dtype), hidden.shape[0]
    return (hidden.new_empty((n, num_samples), dtype=torch.int64), hidden.new_empty((n, num_samples), dtype=dtype),
            *(hidden.new_empty(n, dtype=dtype) for _ in range(3)))


def _setup(ctx, inputs, output):
    hidden, weight, bias, _, _, temp_rows, temp_value, _, _, ignore_index, compute_entropy, impl, chunk_bytes, \
        deterministic = inputs
    tokens, _, entropy, m, log_s = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, bias, tokens, temp_rows, m, log_s, entropy)
    ctx.args = (temp_value, ignore_index, compute_entropy, impl, chunk_bytes, deterministic)


def _backward(ctx, _grad_tokens, grad_logp, grad_entropy, _grad_m, _grad_log_s):
    hidden, weight, bias, tokens, temp_rows, m, log_s, entropy = ctx.saved_tensors
    temp_value, ignore_index, compute_entropy, impl, chunk_bytes, deterministic = ctx.args
    need = ctx.needs_input_grad
    need_b = bias is not None and need[2]
    dh, dw, db = linear_logprob_entropy_backward_op(
        grad_logp, grad_entropy, hidden, weight, bias, tokens, temp_rows, temp_value, m, log_s, entropy,
        ignore_index, compute_entropy, impl, chunk_bytes, deterministic, need[0], need[1], need_b, None, None, None)
    return (dh if need[0] else None, dw if need[1] else None, db if need_b else None) + (None,) * 11


linear_sample_logprob_op.register_autograd(_backward, setup_context=_setup)


def sample_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    num_samples: int,
    *,
    seed: int,
    valid: Optional[torch.Tensor] = None,
    sample_ids: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    temperature: Union[float, torch.Tensor] = 1.0,
    ignore_index: int = -100,
    compute_entropy: bool = True,
    impl: Optional[str] = None,
    chunk_bytes: Optional[int] = None,
    deterministic: Optional[bool] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample ``num_samples`` tokens per position from ``softmax((hidden @ weight.T + bias) / temperature)`` and
    return them with their log-probs and the entropy, from one chunked pass.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]``; weight ``[V, H]``; bias optional ``[V]``.
        num_samples: K >= 1 samples per position, drawn independently (with replacement).
        seed: int; with ``sample_ids`` it fixes every draw: the same (seed, id, logits) give the same tokens on any
            batch, chunking or device.
        valid: bool of the leading shape; positions that are False are skipped (tokens ``ignore_index``, logp and
            entropy 0, no gradient). Default: every position.
        sample_ids: int64 of the leading shape, each in ``[0, 2^32)``: the identity a draw is keyed on. Default: the
            flattened position ``0..N-1``. Give stable ids (e.g. sequence id · max length + position) for draws that
            do not depend on the batch a row sits in.
        temperature, compute_entropy, impl, chunk_bytes, deterministic: as in
            :func:`fusedpg.linear_logprob_entropy` (the forward runs the chunked torch plan on any device; the
            backward is the multi-target backward of ``impl``).

    Returns:
        ``(tokens [..., K] int64, logp [..., K], entropy [...])``; logp and entropy fp32 (fp64 for fp64 hidden),
        differentiable w.r.t. hidden, weight and bias.

    Equivalent PyTorch (materialising the logits; the draws differ from ``torch.multinomial``'s)::

        z = (hidden @ weight.T + bias).float() / temperature
        tokens = torch.multinomial(z.softmax(-1), num_samples, replacement=True)
        logp = z.log_softmax(-1).gather(-1, tokens)
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    """
    lead = hidden.shape[:-1]
    checks.linear_inputs(hidden, weight, torch.zeros(lead, dtype=torch.int64, device=hidden.device), bias)
    valid = per_position("valid", valid, lead, hidden.device, torch.bool)
    ids = draw_ids(num_samples, seed, sample_ids, lead, hidden.device)
    temp = checks.temperature(temperature, lead, hidden.device)
    tokens, logp, ent, _, _ = linear_sample_logprob_op(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, valid, ids, *temp.op_args(), num_samples, seed,
        int(ignore_index), bool(compute_entropy), resolve_impl(impl, hidden.device), checks.chunk_bytes(chunk_bytes),
        LogProbOptions.default_deterministic(deterministic))
    if not compute_entropy:
        ent = ent.detach()
    shape = tuple(lead) + (num_samples,)
    return tokens.reshape(shape), logp.reshape(shape), ent.reshape(lead)


def draw_ids(num_samples, seed, sample_ids, lead, device) -> torch.Tensor:
    """Check the draw settings (``num_samples``, ``seed``, ``sample_ids``) and return the flat int64 ids ``[N]``
    the draws are keyed on (default: the flattened positions)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if sample_ids is None:
        return torch.arange(math.prod(lead), device=device)
    ids = per_position("sample_ids", sample_ids, lead, device, torch.int64)
    bad = (ids < 0) | (ids > 0xFFFFFFFF)
    if ids.numel() and bool(bad.any()):
        raise ValueError(f"sample_ids must lie in [0, 2**32), got a tensor containing {ids[bad][0].item()}")
    return ids


def per_position(name: str, value, lead, device, dtype) -> torch.Tensor:
    """A flat ``[N]`` tensor of ``dtype`` from a tensor of the leading shape (None: all True)."""
    if value is None:
        return torch.ones(lead, dtype=torch.bool, device=device).reshape(-1)
    checks.tensor(name, value)
    if dtype == torch.bool and value.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {checks._describe(value)}")
    if dtype != torch.bool:
        checks.integer(name, value)
    if tuple(value.shape) != tuple(lead):
        raise ValueError(f"{name} must have hidden's leading shape {tuple(lead)}, got {checks._describe(value)}")
    if value.device != device:
        raise ValueError(f"{name} must be on hidden's device ({device}), got {value.device}")
    return value.reshape(-1).to(dtype)
