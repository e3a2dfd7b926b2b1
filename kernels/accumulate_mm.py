"""``acc += a^T b`` into an fp32 accumulator, in place: the weight gradient summed inside the GEMM.

acc ``[M, H]`` fp32, a ``[R, M]``, b ``[R, H]`` (any strides). Program (m block, h block) reads its accumulator tile,
adds the products of its tiles BR rows at a time in fp32, in one fixed order (no split-K, no atomics: a run repeats
bit for bit), and writes it back. Nothing ``[M, H]`` is allocated, and a chunk's partial product is never rounded to
the inputs' dtype before it is added. Because the running sum starts from the accumulator, calls over consecutive
row ranges that each start at a multiple of BR give the bits of one call over all the rows: the deterministic mode
relies on it (d_weight whatever the row chunks; d_hidden continued from one vocabulary shard to the next).
"""
import triton
import triton.language as tl


@triton.jit
def _accumulate_mm_kernel(
    acc_ptr, a_ptr, b_ptr, M, H, R,
    stride_cm, stride_ch, stride_ar, stride_am, stride_br, stride_bh,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, BR: tl.constexpr,
):
    ms = tl.program_id(0) * BM + tl.arange(0, BM)
    hs = tl.program_id(1) * BH + tl.arange(0, BH)
    m_mask = ms < M
    h_mask = hs < H
    ms64 = ms.to(tl.int64)
    hs64 = hs.to(tl.int64)
    ptrs = acc_ptr + ms64[:, None] * stride_cm + hs64[None, :] * stride_ch
    mask = m_mask[:, None] & h_mask[None, :]
    prod = tl.load(ptrs, mask=mask, other=0.0)
    for r0 in range(0, R, BR):
        rs = r0 + tl.arange(0, BR)
        r_mask = rs < R
        rs64 = rs.to(tl.int64)
        # a^T tile [BM, BR]
        at = tl.load(a_ptr + ms64[:, None] * stride_am + rs64[None, :] * stride_ar,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        # [BR, BH]
        bt = tl.load(b_ptr + rs64[:, None] * stride_br + hs64[None, :] * stride_bh,
                     mask=r_mask[:, None] & h_mask[None, :], other=0.0)
        if UPCAST_DOT:
            # The CPU interpreter's tl.dot computes bf16 wrongly (see _logits_tile in linear_logprob_entropy.py):
            # fp32 products summed over the rows in order, as a GPU's MMA accumulates them.
            prod += tl.sum(at.to(tl.float32)[:, :, None] * bt.to(tl.float32)[None, :, :], axis=1)
        else:
            prod = tl.dot(at, bt, prod, input_precision=DOT_PRECISION)
    tl.store(ptrs, prod, mask=mask)
