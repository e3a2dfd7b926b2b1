"""Autograd layer of the fused linear log-prob + entropy: compaction, plan dispatch, saved tensors."""
from __future__ import annotations

import torch

from ..options import LogProbOptions
from ..rows import Rows
from . import plan_torch


def _plan(impl: str):
    if impl == "triton":
        from . import launch_triton  # imported lazily: importing triton is slow and optional on CPU

        return launch_triton
    return plan_torch


class LinearLogprobEntropyFunction(torch.autograd.Function):
    """hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` or None, targets ``[N]``, temperature float or ``[N]``
    -> (logp ``[N]``, entropy ``[N]``), fp32 (fp64 for fp64 inputs)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temp, opts: LogProbOptions, impl: str):
        rows = Rows(targets, opts.ignore_index)
        plan = _plan(impl)
        h, y, t = rows.take(hidden), rows.take(targets), rows.take(temp)
        if rows.count == 0:  # nothing to launch; outputs are all zeros
            logp = entropy = m = log_s = torch.empty(0, dtype=_out_dtype(hidden), device=hidden.device)
        else:
            logp, entropy, m, log_s = plan.forward(h, weight, bias, y, t, opts)
        ctx.rows, ctx.opts, ctx.plan = rows, opts, plan
        ctx.temp_is_tensor = isinstance(temp, torch.Tensor)
        ctx.temp = None if ctx.temp_is_tensor else temp
        ctx.save_for_backward(hidden, weight, bias, targets, temp if ctx.temp_is_tensor else None, m, log_s, entropy)
        ctx.set_materialize_grads(False)
        out_entropy = rows.scatter(entropy)
        ctx.mark_non_differentiable(*([] if opts.compute_entropy else [out_entropy]))
        return rows.scatter(logp), out_entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, temp, m, log_s, entropy = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if not ctx.opts.compute_entropy:
            grad_entropy = None
        if (grad_logp is None and grad_entropy is None) or not any(needs) or ctx.rows.count == 0:
            return _zero_grads(hidden, weight, bias, needs)
        rows = ctx.rows
        t = rows.take(temp) if ctx.temp_is_tensor else ctx.temp
        c = rows.take(grad_logp) if grad_logp is not None else torch.zeros_like(m)
        d = rows.take(grad_entropy) if grad_entropy is not None else None
        dh, dw, db = ctx.plan.backward(
            rows.take(hidden), weight, bias, rows.take(targets), t, m, log_s, entropy, c, d, ctx.opts, needs
        )
        if dh is not None:
            dh = rows.scatter(dh)
        return dh, dw, db, None, None, None, None


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _zero_grads(hidden, weight, bias, needs):
    grads = [torch.zeros_like(x) if (need and x is not None) else None for x, need in zip((hidden, weight, bias), needs)]
    return (*grads, None, None, None, None)
