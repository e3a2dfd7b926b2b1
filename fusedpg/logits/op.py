"""The custom op of ``logprob_entropy``: the one implementation that eager calls and ``torch.compile`` run.

``fusedpg::logprob_entropy`` returns ``(logp, entropy, m, log_s)``. The backward is
``fusedpg::logprob_entropy_backward`` (a new gradient tensor) or, for ``inplace_backward=True``,
``fusedpg::logprob_entropy_backward_``, which declares that it overwrites the saved logits with their gradient.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import checks
from ..options import LogProbOptions
from ..softmax_math import compute_dtype
from ..temperature import Temperature
from ..truncation import OUTSIDE_LOGP, Truncation, saved_thresholds
from . import plan_torch


def _plan(impl: str):
    if impl == "triton":
        from . import launch_triton  # lazy: triton is only needed on this path

        return launch_triton
    return plan_torch


def _opts(ignore_index: int, compute_entropy: bool, chunk_bytes: int, inplace: bool,
          deterministic: bool) -> LogProbOptions:
    return LogProbOptions.budgeted(chunk_bytes, ignore_index=ignore_index, compute_entropy=compute_entropy,
                                   inplace=inplace, deterministic=deterministic)


def _valid_targets(targets: torch.Tensor, ignore_index: int):
    """(targets with ignored ones replaced, valid): 0 for ``[N]`` targets (their c is zeroed), -1 (no one-hot term)
    for ``[N, K]`` targets, whose rows may keep other targets."""
    valid = targets != ignore_index
    return torch.where(valid, targets, torch.full_like(targets, -1 if targets.dim() == 2 else 0)), valid


@torch.library.custom_op("fusedpg::logprob_entropy", mutates_args=())
def logprob_entropy_op(
    logits: torch.Tensor, targets: torch.Tensor, temp_rows: Optional[torch.Tensor], temp_value: float,
    ignore_index: int, compute_entropy: bool, check_targets: bool, impl: str, chunk_bytes: int, inplace: bool,
    deterministic: bool, top_k: Optional[torch.Tensor], top_p: Optional[torch.Tensor], min_p: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits ``[N, V]``, targets ``[N]`` -> (logp, entropy, m, log_s, tau), each ``[N]`` fp32 (fp64 for fp64
    logits); tau: the truncation thresholds the backward reuses (empty without truncation)."""
    temp = Temperature.of(temp_rows, temp_value)
    checks.temperature_values(temp)
    if check_targets:
        checks.targets_in_range(targets, logits.shape[1], ignore_index)
    y, valid = _valid_targets(targets, ignore_index)
    out = compute_dtype(logits.dtype)
    opts = _opts(ignore_index, compute_entropy, chunk_bytes, inplace, deterministic)
    trunc = Truncation(top_k, top_p, min_p).resolved(logits.shape[1])  # its host-side facts: one read per call
    tau = logits.new_empty(logits.shape[0] if trunc.active else 0, dtype=out)
    if trunc.active:  # thresholds: the torch plan, on any device
        stats = plan_torch.forward(logits, y, valid, temp, opts, trunc, tau)
        # ignored targets are already 0: only a target outside the kept set is -inf here
        stats = (torch.where(torch.isneginf(stats[0]), OUTSIDE_LOGP, stats[0]),) + tuple(stats[1:])
    else:
        stats = _plan(impl).forward(logits, y, valid, temp, opts)
    return tuple(x.to(out) for x in stats) + (tau,)


@logprob_entropy_op.register_fake
def _(logits, targets, temp_rows, temp_value, ignore_index, compute_entropy, check_targets, impl, chunk_bytes,
      inplace, deterministic, top_k, top_p, min_p):
    dtype = compute_dtype(logits.dtype)
    truncated = top_k is not None or top_p is not None or min_p is not None
    return (logits.new_empty(targets.shape, dtype=dtype),) + tuple(
        logits.new_empty(logits.shape[0], dtype=dtype) for _ in range(3)) + (
        logits.new_empty(logits.shape[0] if truncated else 0, dtype=dtype),)


def _grad(logits, targets, grad_logp, grad_entropy, temp_rows, temp_value, m, log_s, entropy, ignore_index,
          compute_entropy, impl, chunk_bytes, deterministic, top_k, top_p, min_p, inplace, tau=None) -> torch.Tensor:
    y, valid = _valid_targets(targets, ignore_index)
    c = grad_logp if grad_logp is not None else torch.zeros(targets.shape, dtype=m.dtype, device=m.device)
    d = grad_entropy if compute_entropy else None
    truncated = saved_thresholds(Truncation(top_k, top_p, min_p), tau)
    return (plan_torch if truncated else _plan(impl)).backward(
        logits, y, valid, Temperature.of(temp_rows, temp_value), m, log_s, entropy, c, d,
        _opts(ignore_index, compute_entropy, chunk_bytes, inplace, deterministic),
        **({"tau": tau} if truncated else {}))


@torch.library.custom_op("fusedpg::logprob_entropy_backward", mutates_args=())
def logprob_entropy_backward_op(
    logits: torch.Tensor, targets: torch.Tensor, grad_logp: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor], temp_rows: Optional[torch.Tensor], temp_value: float, m: torch.Tensor,
    log_s: torch.Tensor, entropy: torch.Tensor, ignore_index: int, compute_entropy: bool, impl: str,
    chunk_bytes: int, deterministic: bool, top_k: Optional[torch.Tensor], top_p: Optional[torch.Tensor],
    min_p: Optional[torch.Tensor], tau: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gradient w.r.t. the logits ``[N, V]``, in the logits dtype, in a new tensor."""
    return _grad(logits, targets, grad_logp, grad_entropy, temp_rows, temp_value, m, log_s, entropy, ignore_index,
                 compute_entropy, impl, chunk_bytes, deterministic, top_k, top_p, min_p, False, tau)


@logprob_entropy_backward_op.register_fake
def _(logits, targets, grad_logp, grad_entropy, temp_rows, temp_value, m, log_s, entropy, ignore_index,
      compute_entropy, impl, chunk_bytes, deterministic, top_k, top_p, min_p, tau=None):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("fusedpg::logprob_entropy_backward_", mutates_args=("logits",))
def logprob_entropy_backward_inplace_op(
    logits: torch.Tensor, targets: torch.Tensor, grad_logp: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor], temp_rows: Optional[torch.Tensor], temp_value: float, m: torch.Tensor,
    log_s: torch.Tensor, entropy: torch.Tensor, ignore_index: int, compute_entropy: bool, impl: str,
    chunk_bytes: int, deterministic: bool, top_k: Optional[torch.Tensor], top_p: Optional[torch.Tensor],
    min_p: Optional[torch.Tensor], tau: Optional[torch.Tensor] = None,
) -> None:
    """Writes the gradient w.r.t. the logits over the logits buffer (no second ``[N, V]`` tensor)."""
    _grad(logits, targets, grad_logp, grad_entropy, temp_rows, temp_value, m, log_s, entropy, ignore_index,
          compute_entropy, impl, chunk_bytes, deterministic, top_k, top_p, min_p, True, tau)


def _setup(ctx, inputs, output):
    logits, targets, temp_rows, temp_value, ignore_index, compute_entropy, _, impl, chunk_bytes, inplace, \
        deterministic, top_k, top_p, min_p = inputs
    _, entropy, m, log_s, tau = output
    ctx.set_materialize_grads(False)  # an unused output (entropy, statistics) skips its work in backward
    ctx.save_for_backward(logits, targets, temp_rows, m, log_s, entropy, top_k, top_p, min_p, tau)
    ctx.args = (temp_value, ignore_index, compute_entropy, impl, chunk_bytes, inplace, deterministic)


def _backward(ctx, grad_logp, grad_entropy, _grad_m, _grad_log_s, _grad_tau):
    logits, targets, temp_rows, m, log_s, entropy, top_k, top_p, min_p, tau = ctx.saved_tensors
    temp_value, ignore_index, compute_entropy, impl, chunk_bytes, inplace, deterministic = ctx.args
    if grad_logp is None and (grad_entropy is None or not compute_entropy):
        return (None,) * 14
    args = (logits, targets, grad_logp, grad_entropy, temp_rows, temp_value, m, log_s, entropy, ignore_index,
            compute_entropy, impl, chunk_bytes, deterministic, top_k, top_p, min_p, tau)
    if inplace:
        logprob_entropy_backward_inplace_op(*args)
        grad = logits
    else:
        grad = logprob_entropy_backward_op(*args)
    return (grad,) + (None,) * 13


logprob_entropy_op.register_autograd(_backward, setup_context=_setup)
