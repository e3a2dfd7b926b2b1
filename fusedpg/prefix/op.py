"""The custom op of ``shared_prefix_attention``: the one implementation that eager calls and ``torch.compile`` run.

``fusedpg::shared_prefix_attention`` returns ``(o, lse)``: the output, a ``[B, Hq, S, D]`` view of a
``[B, S, Hq, D]`` buffer (transformers' layout), and the per-row log-sum-exp the backward recomputes probabilities
from. The layout travels as its ``spec`` (plain ints) and is rebuilt, cached, inside the op.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from . import plan_torch
from .layout import PrefixLayout


def _plan(impl: str):
    if impl == "triton":
        from . import launch_triton  # imported lazily: importing triton is slow and optional on CPU

        return launch_triton
    return plan_torch


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fusedpg::shared_prefix_attention", mutates_args=())
def shared_prefix_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: List[int], scale: float,
                               impl: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """q ``[B, Hq, S, D]``, k, v ``[B, Hkv, S, D]`` -> (o ``[B, Hq, S, D]``, lse ``[B, Hq, S]``)."""
    o, lse = _plan(impl).forward(q, k, v, PrefixLayout.from_spec(layout), scale)
    return o, lse.to(_lse_dtype(q))


@shared_prefix_attention_op.register_fake
def _(q, k, v, layout, scale, impl):
    b, hq, s, d = q.shape
    return q.new_empty((b, s, hq, d)).transpose(1, 2), q.new_empty((b, hq, s), dtype=_lse_dtype(q))


@torch.library.custom_op("fusedpg::shared_prefix_attention_backward", mutates_args=())
def shared_prefix_attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                                        lse: torch.Tensor, do: torch.Tensor, layout: List[int], scale: float,
                                        impl: str, need_q: bool, need_k: bool, need_v: bool) -> List[torch.Tensor]:
    """(dq, dk, dv), contiguous, in the inputs' dtype; one that is not needed is an empty tensor."""
    needs = (need_q, need_k, need_v)
    grads = _plan(impl).backward(q, k, v, o, lse, do, PrefixLayout.from_spec(layout), scale, needs)
    return [q.new_empty(0) if not need else (torch.zeros_like(x) if g is None else g.contiguous())
            for g, x, need in zip(grads, (q, k, v), needs)]


@shared_prefix_attention_backward_op.register_fake
def _(q, k, v, o, lse, do, layout, scale, impl, need_q, need_k, need_v):
    return [x.new_empty(x.shape) if need else q.new_empty(0) for x, need in ((q, need_q), (k, need_k), (v, need_v))]


def _setup(ctx, inputs, output):
    q, k, v, layout, scale, impl = inputs
    ctx.set_materialize_grads(False)  # the log-sum-exp output is never differentiated
    ctx.save_for_backward(q, k, v, *output)
    ctx.args = (layout, scale, impl)


def _backward(ctx, do, _grad_lse):
    q, k, v, o, lse = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    if do is None:
        return (None,) * 6
    grads = shared_prefix_attention_backward_op(q, k, v, o, lse, do, *ctx.args, *need)
    return tuple(g if n else None for g, n in zip(grads, need)) + (None, None, None)


shared_prefix_attention_op.register_autograd(_backward, setup_context=_setup)
