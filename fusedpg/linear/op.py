"""The custom op of ``linear_logprob_entropy``: the one implementation that eager calls and ``torch.compile`` run.

``fusedpg::linear_logprob_entropy`` returns ``(logp, entropy, m, log_s)`` (the last two are the softmax statistics
the backward needs); ``fusedpg::linear_logprob_entropy_backward`` turns ``c = dL/dlogp`` and ``d = dL/dH`` into the
gradients. Ignored rows are compacted away inside both (one ``nonzero``), so they cost no FLOPs.
"""
from __future__ import annotations

from dataclasses import replace
from typing import List, Optional, Tuple

import torch

from .. import checks
from ..options import LogProbOptions
from ..rows import Rows
from ..softmax_math import compute_dtype
from ..temperature import Temperature
from ..truncation import OUTSIDE_LOGP, Truncation, saved_thresholds
from . import plan_low, plan_torch


def _plan(impl: str):
    if impl == "triton":
        from . import launch_triton  # imported lazily: importing triton is slow and optional on CPU

        return launch_triton
    return plan_torch


@torch.library.custom_op("fusedpg::linear_logprob_entropy", mutates_args=())
def linear_logprob_entropy_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    temp_rows: Optional[torch.Tensor], temp_value: float, ignore_index: int, compute_entropy: bool,
    check_targets: bool, impl: str, chunk_bytes: int, deterministic: bool, top_k: Optional[torch.Tensor],
    top_p: Optional[torch.Tensor], min_p: Optional[torch.Tensor], low_memory: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden ``[N, H]``, weight ``[V, H]``, targets ``[N]`` -> (logp, entropy, m, log_s, tau), each ``[N]`` fp32
    (fp64 for fp64 hidden); ignored rows are 0. top_k / top_p / min_p: per-row ``[N]`` truncation of the sampling
    distribution (``fusedpg.truncation``), each None when off; a target outside the kept set gets
    ``OUTSIDE_LOGP``; tau holds the rows' thresholds for the backward (empty without truncation)."""
    n, out = hidden.shape[0], compute_dtype(hidden.dtype)
    temp = Temperature.of(temp_rows, temp_value)
    checks.temperature_values(temp)
    if check_targets:
        checks.targets_in_range(targets, weight.shape[0], ignore_index)
    rows = Rows(targets, ignore_index)
    trunc = Truncation(top_k, top_p, min_p).resolved(weight.shape[0])  # its host-side facts: one read per call
    tau = torch.full((n if trunc.active else 0,), float("-inf"), dtype=out, device=hidden.device)
    if rows.count == 0:
        z = torch.zeros(n, dtype=out, device=hidden.device)
        return torch.zeros(targets.shape, dtype=out, device=hidden.device), z, z.clone(), z.clone(), tau
    opts = LogProbOptions.budgeted(chunk_bytes, ignore_index=ignore_index, compute_entropy=compute_entropy,
                                   deterministic=deterministic)
    kept, y = _per_target(targets, ignore_index)
    # thresholds, and several targets at low memory (its vocabulary-blocked forward takes one): whole rows of logits
    if trunc.active or (kept is not None and low_memory):
        tau_c = torch.empty(rows.count if trunc.active else 0, dtype=out, device=hidden.device)
        if trunc.active and low_memory:  # row tiles assembled block by block, as the low backward recomputes them
            stats = plan_low.forward_truncated(hidden, weight, bias, rows.take(y), temp.take(rows.idx),
                                               trunc.take(rows.idx), tau_c, opts, rows.idx)
        else:  # the torch plan's chunks
            logits = chunk_logits(impl, deterministic, weight, bias)  # with it, the select's Triton kernel too
            stats = plan_torch.forward(rows.take(hidden), weight, bias, rows.take(y), temp.take(rows.idx),
                                       opts if logits is None else replace(opts, chunk_bytes=opts.device_chunk_bytes),
                                       replace(trunc.take(rows.idx), kernel=logits is not None),
                                       tau_c if trunc.active else None, logits)
        if trunc.active:
            stats = (torch.where(torch.isneginf(stats[0]), OUTSIDE_LOGP, stats[0]),) + tuple(stats[1:])
            tau = rows.scatter(tau_c)
    elif low_memory:  # blocked over the vocabulary: no fp32 copy of a half-precision head
        stats = plan_low.forward_vocab_blocked(hidden, weight, bias, rows.take(targets), temp.take(rows.idx), opts,
                                               rows.idx)
    else:  # both backends take [N, K] targets
        stats = _plan(impl).forward(rows.take(hidden), weight, bias, rows.take(y), temp.take(rows.idx), opts)
    if kept is not None:  # an ignored target's logp is 0
        stats = (stats[0].masked_fill(~rows.take(kept), 0.0),) + tuple(stats[1:])
    return tuple(rows.scatter(x.to(out)) for x in stats) + (tau,)


def chunk_logits(impl: str, deterministic: bool, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """The chunk logits of the torch plan's truncated loop: the Triton tile kernel's on that backend (half-precision
    products at tensor-core speed, chunks sized by the device budget), None for the torch plan's own GEMM (and in
    deterministic mode, whose fixed segments the torch plan forms)."""
    if impl != "triton" or deterministic:
        return None
    return _plan("triton").chunk_logits(weight, bias)


def _per_target(targets: torch.Tensor, ignore_index: int):
    """(kept, targets) for ``[N, K]`` targets: which are kept, and -1 (no one-hot term) where one is ignored;
    (None, targets) for ``[N]``."""
    if targets.dim() == 1:
        return None, targets
    kept = targets != ignore_index
    return kept, torch.where(kept, targets, torch.full_like(targets, -1))


def stats_like(hidden: torch.Tensor, weight, bias, targets: torch.Tensor, *_):
    """Fake (logp, entropy, m, log_s): logp of the targets' shape, the rest ``[N]``, at the working precision (for
    this op and the ops built on it)."""
    dtype = compute_dtype(hidden.dtype)
    return (hidden.new_empty(targets.shape, dtype=dtype),) + tuple(
        hidden.new_empty(hidden.shape[0], dtype=dtype) for _ in range(3))


def grads_like(hidden, weight, bias, need_hidden: bool, need_weight: bool, need_bias: bool) -> List[torch.Tensor]:
    """Fake (d_hidden, d_weight, d_bias): each like its input, or empty where it is not needed."""
    need_bias = need_bias and bias is not None
    return [torch.empty_like(x) if need else hidden.new_empty(0)
            for x, need in ((hidden, need_hidden), (weight, need_weight), (bias, need_bias))]


@linear_logprob_entropy_op.register_fake
def _(hidden, weight, bias, targets, temp_rows, temp_value, ignore_index, compute_entropy, check_targets, impl,
      chunk_bytes, deterministic, top_k, top_p, min_p, low_memory=False):
    truncated = top_k is not None or top_p is not None or min_p is not None
    stats = stats_like(hidden, weight, bias, targets)
    return stats + (hidden.new_empty(hidden.shape[0] if truncated else 0, dtype=stats[1].dtype),)


@torch.library.custom_op("fusedpg::linear_logprob_entropy_backward", mutates_args=())
def linear_logprob_entropy_backward_op(
    grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor], hidden: torch.Tensor,
    weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor, temp_rows: Optional[torch.Tensor],
    temp_value: float, m: torch.Tensor, log_s: torch.Tensor, entropy: torch.Tensor, ignore_index: int,
    compute_entropy: bool, impl: str, chunk_bytes: int, deterministic: bool, need_hidden: bool, need_weight: bool,
    need_bias: bool, top_k: Optional[torch.Tensor], top_p: Optional[torch.Tensor], min_p: Optional[torch.Tensor],
    low_memory: bool = False, tau: Optional[torch.Tensor] = None,
) -> List[torch.Tensor]:
    """(d_hidden, d_weight, d_bias) in the inputs' dtypes; a gradient that is not needed is an empty tensor."""
    return backward_grads(grad_logp, grad_entropy, hidden, weight, bias, targets, temp_rows, temp_value, m, log_s,
                          entropy, ignore_index, compute_entropy, impl, chunk_bytes, deterministic, need_hidden,
                          need_weight, need_bias, top_k, top_p, min_p, low_memory, tau)


def backward_grads(grad_logp, grad_entropy, hidden, weight, bias, targets, temp_rows, temp_value, m, log_s, entropy,
                   ignore_index, compute_entropy, impl, chunk_bytes, deterministic, need_hidden, need_weight, need_bias,
                   top_k, top_p, min_p, low_memory=False, tau=None, fold=None) -> List[torch.Tensor]:
    """The backward op's body. ``fold`` (deterministic torch plan; ``fusedpg/vocab_parallel``): the hooks that hand
    d_hidden's segment fold between vocabulary shards block by block; d_hidden then comes back at the working
    precision."""
    needs = (need_hidden, need_weight, need_bias and bias is not None)
    rows = Rows(targets, ignore_index)
    d = grad_entropy if compute_entropy else None
    scatter_h = True  # d_hidden comes back compacted, except from the low-memory plan
    if rows.count == 0 or (grad_logp is None and d is None):
        grads = (None, None, None)
    else:
        kept, y = _per_target(targets, ignore_index)
        c = grad_logp if grad_logp is not None else torch.zeros(targets.shape, dtype=m.dtype, device=m.device)
        c = c if kept is None else c.masked_fill(~kept, 0.0)
        opts = LogProbOptions.budgeted(chunk_bytes, ignore_index=ignore_index, compute_entropy=compute_entropy,
                                       deterministic=deterministic)
        truncated = saved_thresholds(Truncation(top_k, top_p, min_p), tau)
        rest = (weight, bias, rows.take(y), Temperature.of(temp_rows, temp_value).take(rows.idx),
                rows.take(m), rows.take(log_s), rows.take(entropy), rows.take(c), None if d is None else rows.take(d),
                opts, needs)
        extra = {} if fold is None else {"fold": fold}
        if low_memory:  # blocked over the vocabulary, hidden gathered per tile, d_hidden written at full size
            grads = plan_low.backward_vocab_blocked(hidden, *rest, idx=rows.idx,
                                                    tau=rows.take(tau) if truncated else None)
            scatter_h = False
        elif truncated:  # the thresholds' mask inside the Triton gradient kernel, or the torch plan's recompute
            plan = _plan(impl) if impl == "triton" and not deterministic else plan_torch
            grads = plan.backward(rows.take(hidden), *rest, tau=rows.take(tau), **extra)
        else:
            grads = _plan(impl).backward(rows.take(hidden), *rest, **extra)
    out = []
    for g, x, need, per_row in zip(grads, (hidden, weight, bias), needs, (scatter_h, False, False)):
        if not need:
            out.append(hidden.new_empty(0))
        elif g is None:
            out.append(torch.zeros_like(x, dtype=compute_dtype(x.dtype) if fold is not None and x is hidden else None))
        else:
            g = rows.scatter(g) if per_row else g
            out.append(g if fold is not None and x is hidden else g.to(x.dtype))
    return out


@linear_logprob_entropy_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, targets, temp_rows, temp_value, m, log_s, entropy,
      ignore_index, compute_entropy, impl, chunk_bytes, deterministic, need_hidden, need_weight, need_bias, top_k,
      top_p, min_p, low_memory=False, tau=None):
    return grads_like(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _setup(ctx, inputs, output):
    hidden, weight, bias, targets, temp_rows, temp_value, ignore_index, compute_entropy, _, impl, chunk_bytes, \
        deterministic, top_k, top_p, min_p, low_memory = inputs
    logp, entropy, m, log_s, tau = output
    ctx.set_materialize_grads(False)  # an unused output (entropy, statistics) skips its work in backward
    # a target outside the kept set has a constant log-prob: its c must not reach any column's gradient
    outside = logp == OUTSIDE_LOGP if tau.numel() else None
    ctx.save_for_backward(hidden, weight, bias, targets, temp_rows, m, log_s, entropy, top_k, top_p, min_p, tau,
                          outside)
    ctx.args = (temp_value, ignore_index, compute_entropy, impl, chunk_bytes, deterministic, low_memory)


def _backward(ctx, grad_logp, grad_entropy, _grad_m, _grad_log_s, _grad_tau):
    hidden, weight, bias, targets, temp_rows, m, log_s, entropy, top_k, top_p, min_p, tau, outside = ctx.saved_tensors
    temp_value, ignore_index, compute_entropy, impl, chunk_bytes, deterministic, low_memory = ctx.args
    if outside is not None and grad_logp is not None:
        grad_logp = grad_logp.masked_fill(outside, 0.0)
    need = ctx.needs_input_grad
    need_b = bias is not None and need[2]
    dh, dw, db = linear_logprob_entropy_backward_op(
        grad_logp, grad_entropy, hidden, weight, bias, targets, temp_rows, temp_value, m, log_s, entropy,
        ignore_index, compute_entropy, impl, chunk_bytes, deterministic, need[0], need[1], need_b, top_k, top_p,
        min_p, low_memory, tau)
    return (dh if need[0] else None, dw if need[1] else None, db if need_b else None) + (None,) * 13


linear_logprob_entropy_op.register_autograd(_backward, setup_context=_setup)
