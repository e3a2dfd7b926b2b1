"""Launchers of the shared-prefix attention kernels: block index, allocation, grid, launch. No autograd."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton

from ..backend import triton_interpreting
from ..kernel_config import check_triton_dtype
from ..kernels.prefix_attention import (
    _prefix_attention_bwd_dkdv_kernel,
    _prefix_attention_bwd_dq_kernel,
    _prefix_attention_bwd_preprocess_kernel,
    _prefix_attention_fwd_kernel,
)
from .blocks import block_index
from .layout import PrefixLayout


@dataclass(frozen=True)
class AttentionTiles:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    num_warps: int
    num_stages: int
    dot_precision: str
    upcast_dot: bool


def attention_tiles(dtype: torch.dtype, head_dim: int) -> AttentionTiles:
    """Small tiles in the interpreter (so tests cover partial tiles and several programs); fp32 uses IEEE products
    (no silent TF32) and smaller tiles to keep its fp32 operands in registers."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    precision = "ieee" if dtype == torch.float32 else "tf32"
    if triton_interpreting():
        return AttentionTiles(16, 16, block_d, 1, 1, precision, True)
    if dtype == torch.float32:
        return AttentionTiles(32, 32, block_d, 4, 2, precision, False)
    return AttentionTiles(64, 64, block_d, 4 if block_d <= 64 else 8, 2, precision, False)


def _strides(x: torch.Tensor):
    return tuple(x.stride())


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PrefixLayout, scale: float
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """q ``[B, Hq, S, D]``, k, v ``[B, Hkv, S, D]`` (any strides) -> (o ``[B, Hq, S, D]``, a view of a contiguous
    ``[B, S, Hq, D]`` buffer, which is transformers' attention output layout; lse ``[B, Hq, S]`` fp32, base 2)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_triton_dtype(name, x)
    bsz, hq, s, d = q.shape
    cfg = attention_tiles(q.dtype, d)
    blocks = block_index(layout, cfg.BLOCK_M, cfg.BLOCK_N, q.device)
    seg, pre = layout.labels(q.device)
    o = torch.empty((bsz, s, hq, d), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((bsz, hq, s), dtype=torch.float32, device=q.device)
    _prefix_attention_fwd_kernel[(blocks.n_q_tiles, bsz * hq)](
        q, k, v, o, lse, seg, pre, blocks.q_ptr, blocks.q_kv,
        float(scale), s, d, hq, hq // k.shape[1], blocks.n_q_tiles,
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        DOT_PRECISION=cfg.dot_precision, UPCAST_DOT=cfg.upcast_dot,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o, lse


def backward(q, k, v, o, lse, do, layout: PrefixLayout, scale: float,
             needs: Tuple[bool, bool, bool]) -> Tuple[Optional[torch.Tensor], ...]:
    """(dq, dk, dv) at the input dtypes, each with its input's shape; accumulation is fp32 in registers."""
    bsz, hq, s, d = q.shape
    hkv = k.shape[1]
    cfg = attention_tiles(q.dtype, d)
    blocks = block_index(layout, cfg.BLOCK_M, cfg.BLOCK_N, q.device)
    seg, pre = layout.labels(q.device)
    delta = torch.empty((bsz, hq, s), dtype=torch.float32, device=q.device)
    _prefix_attention_bwd_preprocess_kernel[(triton.cdiv(s, cfg.BLOCK_M), bsz * hq)](
        o, do, delta, s, d, hq, *_strides(o), *_strides(do),
        BLOCK_M=cfg.BLOCK_M, BLOCK_D=cfg.BLOCK_D, num_warps=cfg.num_warps,
    )
    common = dict(DOT_PRECISION=cfg.dot_precision, UPCAST_DOT=cfg.upcast_dot, BLOCK_M=cfg.BLOCK_M,
                  BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    dq = dk = dv = None
    if needs[1] or needs[2]:
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        _prefix_attention_bwd_dkdv_kernel[(blocks.n_kv_tiles, bsz * hkv)](
            q, k, v, do, lse, delta, dk, dv, seg, pre, blocks.kv_ptr, blocks.kv_q,
            float(scale), s, d, hq, hkv, hq // hkv, blocks.n_kv_tiles,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), **common,
        )
    if needs[0]:
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        _prefix_attention_bwd_dq_kernel[(blocks.n_q_tiles, bsz * hq)](
            q, k, v, do, lse, delta, dq, seg, pre, blocks.q_ptr, blocks.q_kv,
            float(scale), s, d, hq, hq // hkv, blocks.n_q_tiles,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq), **common,
        )
    return dq, (dk if needs[1] else None), (dv if needs[2] else None)
