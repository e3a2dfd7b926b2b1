"""Autograd layer of shared-prefix attention: plan dispatch and saved tensors (o and the per-row log-sum-exp)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import plan_torch


@dataclass(frozen=True)
class PrefixAttentionOptions:
    """Options of ``shared_prefix_attention``. scale: the factor on ``q @ k.T`` (default ``head_dim ** -0.5``)."""

    scale: float


def _plan(impl: str):
    if impl == "triton":
        from . import launch_triton  # imported lazily: importing triton is slow and optional on CPU

        return launch_triton
    return plan_torch


class SharedPrefixAttentionFunction(torch.autograd.Function):
    """q ``[B, Hq, S, D]``, k, v ``[B, Hkv, S, D]``, layout, options, impl -> o ``[B, Hq, S, D]``.

    Saves q, k, v, o and the log-sum-exp ``[B, Hq, S]``; the backward recomputes probabilities tile by tile (or part
    by part on the torch plan) from the merged log-sum-exp, so nothing of size ``S x S`` is kept.
    """

    @staticmethod
    def forward(ctx, q, k, v, layout, opts: PrefixAttentionOptions, impl: str):
        plan = _plan(impl)
        o, lse = plan.forward(q, k, v, layout, opts.scale)
        ctx.layout, ctx.opts, ctx.plan = layout, opts, plan
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        dq, dk, dv = ctx.plan.backward(q, k, v, o, lse, do, ctx.layout, ctx.opts.scale, needs)
        return dq, dk, dv, None, None, None
