"""Launch parameters of the Triton kernels, in one place.

The interpreter (TRITON_INTERPRET=1, CPU) gets small tiles so tests exercise tails and several programs; CUDA gets
tensor-core friendly tiles. fp32 inputs use IEEE products so they keep fp32 accuracy (no silent TF32).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .backend import triton_interpreting


@dataclass(frozen=True)
class TileConfig:
    BT: int
    BV: int
    BK: int
    num_warps: int
    num_stages: int
    dot_precision: str
    upcast_dot: bool = False


def tile_config(dtype: torch.dtype) -> TileConfig:
    precision = "ieee" if dtype == torch.float32 else "tf32"
    if triton_interpreting():
        return TileConfig(16, 32, 16, 1, 1, precision, upcast_dot=True)
    if dtype == torch.float32:
        return TileConfig(64, 64, 32, 4, 3, precision)
    return TileConfig(64, 128, 64, 8, 3, precision)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def programs_wanted(device: torch.device) -> int:
    """About two waves of programs on the device; small in the interpreter so tests still cover several splits."""
    if device.type != "cuda":
        return 4
    return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def check_triton_dtype(name: str, x: torch.Tensor) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{name} must be bf16, fp16 or fp32 for impl='triton', got {x.dtype}")
