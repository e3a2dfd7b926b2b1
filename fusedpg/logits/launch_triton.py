"""Launchers of the logits-input log-prob + entropy kernels. No autograd."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from ..backend import triton_interpreting
from ..kernel_config import check_triton_dtype
from ..kernels.logprob_entropy import _logprob_entropy_bwd_kernel, _logprob_entropy_fwd_kernel
from ..options import LogProbOptions
from ..temperature import Temperature


def _blocks(vocab: int):
    """(BT, BV, num_warps): wide vocabulary tiles on CUDA, small ones in the interpreter."""
    if triton_interpreting():
        return 4, 32, 1
    return 1, min(4096, triton.next_power_of_2(vocab)), 8


def _rowwise(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def target_layout(targets: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
    """(targets for the kernels, K, KP): ``[N, K]`` row-major with KP = K padded to a power of 2; ``[N]`` and
    ``[N, 1]`` targets go to the single-target kernels as ``[N]`` (K = KP = 1), so an ``[N, 1]`` call is bitwise an
    ``[N]`` one."""
    y = targets.contiguous()
    if y.dim() == 1 or y.shape[1] == 1:
        return y.view(-1), 1, 1
    return y, y.shape[1], triton.next_power_of_2(y.shape[1])


def _row_valid(valid: torch.Tensor) -> torch.Tensor:
    """Rows with a kept target: ``[N]`` from valid ``[N]`` or ``[N, K]``."""
    return valid.any(1) if valid.dim() == 2 else valid


def forward(
    logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, temp: Temperature, opts: LogProbOptions
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits ``[N, V]``, targets ``[N]`` (clamped) or ``[N, K]`` (-1 where ignored), valid like targets ->
    (logp like targets, entropy, m, log_s ``[N]``), fp32."""
    check_triton_dtype("logits", logits)
    x = _rowwise(logits)
    n, vocab = x.shape
    y, k, kp = target_layout(targets)
    f32 = dict(dtype=torch.float32, device=x.device)
    logp = torch.empty(y.shape, **f32)
    entropy, m, log_s = (torch.empty(n, **f32) for _ in range(3))
    if n == 0:
        return logp.view(targets.shape), entropy, m, log_s
    t, stride_t = temp.kernel_arg(x.device)
    bt, bv, warps = _blocks(vocab)
    _logprob_entropy_fwd_kernel[(triton.cdiv(n, bt),)](
        x, y, t, logp, entropy, m, log_s, n, vocab, k, x.stride(0), stride_t,
        COMPUTE_ENTROPY=opts.compute_entropy, BT=bt, BV=bv, KP=kp, num_warps=warps,
    )
    zero = torch.zeros((), **f32)
    return torch.where(valid, logp.view(targets.shape), zero), torch.where(_row_valid(valid), entropy, zero), m, log_s


def backward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    valid: torch.Tensor,
    temp: Temperature,
    m: torch.Tensor,
    log_s: torch.Tensor,
    entropy: torch.Tensor,
    c: torch.Tensor,
    d: Optional[torch.Tensor],
    opts: LogProbOptions,
) -> torch.Tensor:
    """dL/dlogits ``[N, V]`` in the logits dtype; written over ``logits`` when ``opts.inplace``."""
    x = _rowwise(logits)
    n, vocab = x.shape
    out = x if opts.inplace else torch.empty_like(x, memory_format=torch.contiguous_format)
    if n == 0:
        return out
    zero = torch.zeros((), dtype=torch.float32, device=x.device)
    y, k, kp = target_layout(targets)
    c = torch.where(valid, c.float(), zero).reshape(y.shape).contiguous()
    d = None if d is None else torch.where(_row_valid(valid), d.float(), zero).contiguous()
    t, stride_t = temp.kernel_arg(x.device)
    bt, bv, warps = _blocks(vocab)
    bt_b, bv_b = (bt, bv) if triton_interpreting() else (4, min(1024, bv))
    _logprob_entropy_bwd_kernel[(triton.cdiv(n, bt_b), triton.cdiv(vocab, bv_b))](
        x, y, t, m, log_s, entropy, c, d if d is not None else c, out,
        n, vocab, k, x.stride(0), stride_t, out.stride(0),
        HAS_D=d is not None, BT=bt_b, BV=bv_b, KP=kp, num_warps=warps if bt_b == 1 else 4,
    )
    return out
