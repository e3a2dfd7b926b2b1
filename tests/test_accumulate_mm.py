"""``accumulate_mm_`` (fusedpg/gemm.py): acc += a^T b into an fp32 accumulator with no ``[M, H]`` temporary.

The Triton kernel runs through the CPU interpreter here (its tiles are BM = BH = 16, BR = 8, so the shapes below
cover partial tiles in every dimension, a single row, and several programs); the torch branches run as on CPU.
Accuracy is checked against float64 with the error bound of an fp32 sum of R products added to the accumulator.
"""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from fusedpg.gemm import accumulate_mm_, row_step, triton_accumulate_mm_

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = [(37, 21, 13), (16, 16, 1), (5, 40, 9), (1, 3, 17)]  # (M, H, R)
U32 = 2.0 ** -24  # unit roundoff of fp32
KERNEL = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton kernel runs (the interpreter on CPU)


def _case(m, h, r, dtype, seed=0, transposed=False, device=KERNEL):
    g = torch.Generator().manual_seed(seed)
    acc = torch.randn(m, h, generator=g).to(device)
    a = torch.randn(r, m, generator=g).to(dtype).to(device)
    if transposed:  # a [R, M] as the transposed view of an [M, R] buffer (strides (1, R))
        a = a.T.contiguous().T
    b = torch.randn(r, h, generator=g).to(dtype).to(device)
    return acc, a, b


def _assert_fp32_accurate(out, acc0, parts):
    """|out - exact| <= (R + 2) u (|acc0| + sum |a|^T |b|): fp32 products (exact for half inputs) summed in fp32."""
    exact, scale, r = acc0.double().clone(), acc0.double().abs(), 0
    for a, b in parts:
        exact += a.double().T @ b.double()
        scale += a.double().abs().T @ b.double().abs()
        r += a.shape[0]
    err = (out.double() - exact).abs()
    bound = (r + 2) * U32 * scale
    assert bool((err <= bound).all()), f"max err {err.max().item():.3g}, worst ratio {(err / bound).max().item():.3g}"


@pytest.mark.parametrize("m,h,r", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_kernel_matches_float64(m, h, r, dtype):
    acc, a, b = _case(m, h, r, dtype, transposed=(m, h, r) == SHAPES[0])
    acc0 = acc.clone()
    assert triton_accumulate_mm_(acc, a, b) is acc
    _assert_fp32_accurate(acc, acc0, [(a, b)])


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_kernel_accumulates_over_calls(dtype):
    """Chunks of rows added call after call: the sum of all of them, at fp32 accuracy over all rows."""
    acc = torch.zeros(19, 23, device=KERNEL)
    parts = [_case(19, 23, r, dtype, seed=r)[1:] for r in (7, 1, 12)]
    for a, b in parts:
        triton_accumulate_mm_(acc, a, b)
    _assert_fp32_accurate(acc, torch.zeros(19, 23, device=KERNEL), parts)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_calls_split_at_the_row_step_chain_bitwise(dtype):
    """The running sum starts from the accumulator: calls over row ranges that start at multiples of the kernel's
    row step give one call's bits (the deterministic mode's d_weight whatever the chunks, d_hidden across shards)."""
    step = row_step(dtype)
    acc, a, b = _case(37, 21, 5 * step + 3, dtype, seed=4, transposed=True)
    whole = triton_accumulate_mm_(acc.clone(), a, b)
    for cuts in ((2 * step,), (step, 4 * step), (3 * step, 5 * step)):
        parts = acc.clone()
        for lo, hi in zip((0,) + cuts, cuts + (a.shape[0],)):
            triton_accumulate_mm_(parts, a[lo:hi], b[lo:hi])
        assert torch.equal(parts, whole), cuts


def test_kernel_is_run_to_run_deterministic():
    acc, a, b = _case(37, 21, 13, torch.bfloat16)
    first, second = triton_accumulate_mm_(acc.clone(), a, b), triton_accumulate_mm_(acc.clone(), a, b)
    assert torch.equal(first, second)


def test_kernel_beats_rounded_chunk_partials():
    """The failure mode it replaces: ``acc.add_(torch.mm(a.T, b))`` rounds every chunk's partial to bf16."""
    acc, old = torch.zeros(16, 16, device=KERNEL), torch.zeros(16, 16, device=KERNEL)
    parts = [_case(16, 16, 8, torch.bfloat16, seed=s)[1:] for s in range(4)]
    exact = sum(a.double().T @ b.double() for a, b in parts)
    for a, b in parts:
        triton_accumulate_mm_(acc, a, b)
        old.add_(torch.mm(a.T, b))
    assert (acc.double() - exact).abs().max() * 100 < (old.double() - exact).abs().max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_cpu_branches_match_float64(dtype):
    """The torch branches (acc's own dtype: addmm_; half precision on CPU: upcast chunk, then addmm_)."""
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    acc, a, b = _case(37, 21, 13, dtype, transposed=True, device="cpu")
    acc = acc.to(acc_dtype)
    acc0 = acc.clone()
    assert accumulate_mm_(acc, a, b) is acc
    _assert_fp32_accurate(acc, acc0, [(a, b)])


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_no_mh_temporary(dtype, monkeypatch):
    """No allocation as large as ``[M, H]`` in the inputs' dtype: the profiler sees every CPU allocation of the
    torch branches, and the kernel path makes no GEMM call through torch at all."""
    m, h, r = 300, 200, 7  # the chunk-sized upcasts, R x (M or H) fp32, stay below M x H x 2 bytes
    acc, a, b = _case(m, h, r, dtype, device="cpu")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        accumulate_mm_(acc, a, b)
    largest = max([e.cpu_memory_usage for e in prof.events()] + [0])
    assert largest < m * h * 2, f"an allocation of {largest} bytes"

    def no_gemm(*args, **kwargs):
        raise AssertionError("a GEMM through torch: an [M, H] temporary")

    acc, a, b = _case(21, 18, 5, dtype)
    acc0 = acc.clone()
    with monkeypatch.context() as patched:
        for name in ("mm", "matmul", "addmm"):
            patched.setattr(torch, name, no_gemm)
        for name in ("mm", "matmul", "addmm", "addmm_", "__matmul__"):
            patched.setattr(torch.Tensor, name, no_gemm)
        triton_accumulate_mm_(acc, a, b)
    _assert_fp32_accurate(acc, acc0, [(a, b)])


def test_kernel_rejects_mismatched_operands():
    acc, a, b = _case(8, 8, 4, torch.bfloat16)
    with pytest.raises(ValueError, match="accumulate_mm_ needs"):
        triton_accumulate_mm_(acc, a, b.float())
    with pytest.raises(ValueError, match="accumulate_mm_ needs"):
        triton_accumulate_mm_(acc.double(), a, b)
