"""The custom ops of vocabulary-parallel ``linear_logprob_entropy``: each rank runs the single-device op on its shard
of the LM head, then the per-row softmax statistics are merged across the group (README.md here).

``targets`` here are already local: a column of this shard, ``-1`` where the target lies in another shard, and
``IGNORE`` for ignored rows. ``m`` and ``log_s`` returned are the merged (global) statistics the backward needs.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from ..linear.op import grads_like, linear_logprob_entropy_backward_op, linear_logprob_entropy_op, stats_like
from ..softmax_math import compute_dtype, merge_in_order, merged, partial, rescaled
from .groups import group_of

IGNORE = -100


def _merge(lp, ent, m, log_s, targets, compute_entropy: bool, group, deterministic: bool):
    part = partial(lp, ent, m, log_s, targets)
    if deterministic:  # every rank merges the same gathered partials in rank order: bitwise equal everywhere
        gathered = [torch.empty_like(part) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, part, group=group)
        logp, entropy, top, log_s_all = merge_in_order(gathered, compute_entropy)
    else:  # two collectives: MAX of the row maxima, one packed SUM
        top = m.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        packed = torch.stack(rescaled(part, top))
        dist.all_reduce(packed, group=group)
        logp, entropy, top, log_s_all = merged(*packed.unbind(0), top, compute_entropy)
    kept = targets != IGNORE
    zero = torch.zeros((), dtype=m.dtype, device=m.device)
    return (torch.where(kept, logp, zero), torch.where(kept, entropy, zero), torch.where(kept, top, zero),
            torch.where(kept, log_s_all, zero))


@torch.library.custom_op("fusedpg::vocab_parallel_linear_logprob_entropy", mutates_args=())
def vocab_parallel_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    temp_rows: Optional[torch.Tensor], temp_value: float, compute_entropy: bool, impl: str, chunk_bytes: int,
    group: str, deterministic: bool, reduce_hidden_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden ``[N, H]``, this rank's weight ``[V_r, H]``, local targets ``[N]`` -> (logp, entropy, m, log_s)
    ``[N]`` over the whole vocabulary, identical on every rank of ``group``."""
    local = linear_logprob_entropy_op(hidden, weight, bias, targets, temp_rows, temp_value, IGNORE, compute_entropy,
                                      False, impl, chunk_bytes, deterministic, None, None, None)
    return _merge(*local[:4], targets, compute_entropy, group_of(group), deterministic)


vocab_parallel_op.register_fake(stats_like)


@torch.library.custom_op("fusedpg::vocab_parallel_linear_logprob_entropy_backward", mutates_args=())
def vocab_parallel_backward_op(
    grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor], hidden: torch.Tensor,
    weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor, temp_rows: Optional[torch.Tensor],
    temp_value: float, m: torch.Tensor, log_s: torch.Tensor, entropy: torch.Tensor, compute_entropy: bool, impl: str,
    chunk_bytes: int, group: str, deterministic: bool, reduce_hidden_grad: bool, need_hidden: bool,
    need_weight: bool, need_bias: bool,
) -> List[torch.Tensor]:
    """The shard's (d_hidden, d_weight, d_bias) from the merged statistics; d_hidden summed over the group when
    ``reduce_hidden_grad`` (each rank holds the part of ``g @ W`` from its own columns)."""
    dh, dw, db = linear_logprob_entropy_backward_op(
        grad_logp, grad_entropy, hidden, weight, bias, targets, temp_rows, temp_value, m, log_s, entropy, IGNORE,
        compute_entropy, impl, chunk_bytes, deterministic, need_hidden, need_weight, need_bias, None, None, None)
    if need_hidden and reduce_hidden_grad:
        total = dh.to(compute_dtype(dh.dtype))  # summed at fp32, rounded once
        dist.all_reduce(total, group=group_of(group))
        dh = total.to(dh.dtype)
    return [dh, dw, db]


@vocab_parallel_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, targets, temp_rows, temp_value, m, log_s, entropy,
      compute_entropy, impl, chunk_bytes, group, deterministic, reduce_hidden_grad, need_hidden, need_weight,
      need_bias):
    return grads_like(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _setup(ctx, inputs, output):
    hidden, weight, bias, targets, temp_rows, temp_value, compute_entropy, impl, chunk_bytes, group, det, reduce = inputs
    _, entropy, m, log_s = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, bias, targets, temp_rows, m, log_s, entropy)
    ctx.args = (temp_value, compute_entropy, impl, chunk_bytes, group, det, reduce)


def _backward(ctx, grad_logp, grad_entropy, _grad_m, _grad_log_s):
    hidden, weight, bias, targets, temp_rows, m, log_s, entropy = ctx.saved_tensors
    temp_value, compute_entropy, impl, chunk_bytes, group, det, reduce = ctx.args
    need = ctx.needs_input_grad
    need_b = bias is not None and need[2]
    dh, dw, db = vocab_parallel_backward_op(
        grad_logp, grad_entropy, hidden, weight, bias, targets, temp_rows, temp_value, m, log_s, entropy,
        compute_entropy, impl, chunk_bytes, group, det, reduce, need[0], need[1], need_b)
    return (dh if need[0] else None, dw if need[1] else None, db if need_b else None) + (None,) * 9


vocab_parallel_op.register_autograd(_backward, setup_context=_setup)
