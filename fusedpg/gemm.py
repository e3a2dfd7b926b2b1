"""``accumulate_mm_``: the chunk loops' weight-gradient GEMM, ``acc += a^T b`` into an fp32 (or fp64) accumulator.

``acc.add_(torch.mm(a.T, b))`` on half-precision inputs allocates an ``[M, H]`` temporary, rounds the chunk's
partial product to bf16 / fp16 before adding it (the source of bf16 ``d_weight`` drift), and adds in a second pass
over ``[M, H]``. Here the sum over the rows stays in fp32 and lands in the accumulator inside the GEMM:

* a and b already in acc's dtype (fp32 / fp64 inputs, any device): ``acc.addmm_(a.T, b)``, one BLAS call with
  ``beta = 1``;
* CUDA, bf16 / fp16 a and b, fp32 acc: the Triton kernel ``kernels/accumulate_mm.py`` (fp32 products, fixed
  summation order, the tile read, added and written back in place); cuBLAS through torch cannot do this portably
  (``torch.addmm(..., out_dtype=)`` is CUDA-only and not in every supported torch, so it is not used);
* anything else (half precision on CPU): a and b upcast to acc's dtype (chunk-sized ``[R, M]`` and ``[R, H]``
  copies, never ``[M, H]``), then ``addmm_``.

Every branch is run-to-run deterministic for fixed shapes, as the deterministic mode needs.
"""
from __future__ import annotations

import torch

from .backend import triton_interpreting

_HALF = (torch.float16, torch.bfloat16)


def accumulate_mm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc ``[M, H]`` += a ``[R, M]``\\ ^T @ b ``[R, H]`` in place, summed over the R rows in acc's precision, with
    no ``[M, H]`` temporary. a may be a transposed view. Returns acc."""
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        return acc.addmm_(a.T, b)
    if acc.is_cuda and acc.dtype == torch.float32 and a.dtype == b.dtype and a.dtype in _HALF:
        return triton_accumulate_mm_(acc, a, b)
    return acc.addmm_(a.T.to(acc.dtype), b.to(acc.dtype))


def triton_accumulate_mm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The Triton kernel behind ``accumulate_mm_`` (also under the CPU interpreter, where tests call it directly):
    acc fp32 ``[M, H]``, a ``[R, M]`` and b ``[R, H]`` of one dtype (bf16, fp16 or fp32)."""
    import triton  # lazy: triton is only needed on this path

    from .kernels.accumulate_mm import _accumulate_mm_kernel

    m, h = acc.shape
    r = a.shape[0]
    if acc.dtype != torch.float32 or a.dtype != b.dtype or a.shape[1] != m or tuple(b.shape) != (r, h):
        raise ValueError(f"accumulate_mm_ needs fp32 acc [M, H], a [R, M], b [R, H] of one dtype, got acc "
                         f"{tuple(acc.shape)} {acc.dtype}, a {tuple(a.shape)} {a.dtype}, b {tuple(b.shape)} {b.dtype}")
    if acc.numel() == 0 or r == 0:
        return acc
    bm, bh, br, warps, stages = _tiles(a.dtype)
    _accumulate_mm_kernel[(triton.cdiv(m, bm), triton.cdiv(h, bh))](
        acc, a, b, m, h, r,
        acc.stride(0), acc.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32", UPCAST_DOT=triton_interpreting(),
        BM=bm, BH=bh, BR=br, num_warps=warps, num_stages=stages,
    )
    return acc


def row_step(dtype: torch.dtype) -> int:
    """Rows the Triton kernel adds per step (BR): calls over consecutive row ranges that each start at a multiple
    of it give the bits of one call over all the rows."""
    return _tiles(dtype)[2]


def _tiles(dtype: torch.dtype):
    """(BM, BH, BR, num_warps, num_stages): small tiles in the interpreter so tests cover tails and several programs;
    tensor-core tiles on CUDA (not yet tuned on a device)."""
    if triton_interpreting():
        return 16, 16, 8, 1, 1
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    return 128, 128, 32, 8, 4
