"""Per-chunk steps of the fused PG loss: produce a chunk's (logp, entropy), then, given the loss's per-token
``c = dL/dlogp`` and ``d = dL/dH``, its gradient contributions. One class per backend, same two methods."""
from __future__ import annotations

from typing import Optional

import torch

from ..gemm import accumulate_mm_
from ..linear.plan_torch import compute_head, tempered_logits
from ..options import LogProbOptions
from ..softmax_math import compute_dtype, softmax_grad_, softmax_stats


class TorchStep:
    """One pass on the torch plan: the chunk's fp32 logits stay alive between the statistics and the gradient,
    so each chunk costs one logits GEMM and two gradient GEMMs (6·n·H·V FLOPs)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], opts: LogProbOptions):
        self.work = compute_dtype(weight.dtype)
        self.w, self.b = compute_head(weight, bias, self.work)
        self.opts = opts

    def stats(self, h: torch.Tensor, y: torch.Tensor, temp):
        self.z = tempered_logits(h, self.w, self.b, temp, self.work)
        logp, ent, _, self.log_s = softmax_stats(self.z, y, self.opts.compute_entropy)  # z is now z - max
        self.ent = ent
        return logp, ent

    def grads(self, h, y, temp, c, d, dh_out, dw_acc, db_acc) -> None:
        g = softmax_grad_(self.z, y, None, self.log_s, self.ent, c.to(self.work),
                          None if d is None else d.to(self.work), temp)
        self.z = None
        if dh_out is not None:
            dh_out.copy_(torch.mm(g, self.w))
        if dw_acc is not None:
            accumulate_mm_(dw_acc, g, h)
        if db_acc is not None:
            db_acc += g.sum(0)


class TritonStep:
    """One pass on CUDA: cuBLAS writes the chunk's logits (fp32 for fp32 inputs, else the input dtype, like eager
    trainers), a Triton kernel reads them once for the statistics, and a second Triton kernel overwrites the same
    buffer with dL/du, which two cuBLAS GEMMs turn into dh and dW. 6·n·H·V FLOPs; one ``[rows, V]`` buffer."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], opts: LogProbOptions):
        from ..kernel_config import check_triton_dtype
        from ..logits import launch_triton  # lazy: triton is only imported on this path

        check_triton_dtype("hidden", weight)
        self.k, self.weight, self.bias = launch_triton, weight, bias
        self.opts = LogProbOptions(compute_entropy=opts.compute_entropy, inplace=True)

    def stats(self, h, y, temp):
        x = torch.mm(h, self.weight.T)
        if self.bias is not None:
            x += self.bias
        self.x, self.valid = x, torch.ones_like(y, dtype=torch.bool)
        logp, ent, self.m, self.log_s = self.k.forward(x, y, self.valid, temp, self.opts)
        self.ent = ent
        return logp, ent

    def grads(self, h, y, temp, c, d, dh_out, dw_acc, db_acc) -> None:
        g = self.k.backward(self.x, y, self.valid, temp, self.m, self.log_s, self.ent, c.float(),
                            None if d is None else d.float(), self.opts)  # written over self.x
        self.x = None
        if dh_out is not None:
            torch.mm(g, self.weight, out=dh_out)
        if dw_acc is not None:
            accumulate_mm_(dw_acc, g, h)
        if db_acc is not None:
            db_acc += g.sum(0, dtype=torch.float32)
