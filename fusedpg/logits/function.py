"""Autograd layer of log-prob + entropy from logits."""
from __future__ import annotations

import torch

from ..options import LogProbOptions
from . import plan_torch


def _plan(impl: str):
    if impl == "triton":
        from . import launch_triton  # lazy: triton is only needed on this path

        return launch_triton
    return plan_torch


class LogprobEntropyFunction(torch.autograd.Function):
    """logits ``[N, V]``, targets ``[N]``, temperature float or ``[N]`` -> (logp ``[N]``, entropy ``[N]``)."""

    @staticmethod
    def forward(ctx, logits, targets, temp, opts: LogProbOptions, impl: str):
        valid = targets != opts.ignore_index
        y = torch.where(valid, targets, torch.zeros_like(targets))
        plan = _plan(impl)
        logp, entropy, m, log_s = plan.forward(logits, y, valid, temp, opts)
        ctx.opts, ctx.plan = opts, plan
        ctx.temp_is_tensor = isinstance(temp, torch.Tensor)
        ctx.temp = None if ctx.temp_is_tensor else temp
        ctx.save_for_backward(logits, y, valid, temp if ctx.temp_is_tensor else None, m, log_s, entropy)
        ctx.set_materialize_grads(False)
        if not opts.compute_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, y, valid, temp, m, log_s, entropy = ctx.saved_tensors
        if not ctx.opts.compute_entropy:
            grad_entropy = None
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None, None
        t = temp if ctx.temp_is_tensor else ctx.temp
        c = grad_logp if grad_logp is not None else torch.zeros_like(m)
        grad = ctx.plan.backward(logits, y, valid, t, m, log_s, entropy, c, grad_entropy, ctx.opts)
        return grad, None, None, None, None
