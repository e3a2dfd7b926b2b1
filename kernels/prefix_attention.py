"""Shared-prefix attention kernels over a block index (fusedpg/prefix/README.md has the derivation).

One packed row holds groups ``[prompt | completion_1 | … | completion_G]``. Per token the launcher passes ``seg`` (a
batch-unique segment id, -1 on padding) and ``pre`` (the id of its group's prompt segment); key ``j`` is visible to
query ``i`` iff ``j <= i``, both are real, and ``seg[j]`` is ``seg[i]`` or ``pre[i]``. A CSR block index lists, per
query tile, the key tiles holding a visible pair (and the transpose for dk/dv), so tiles of other completions are
never touched and the prompt's K/V are read in place by every completion: no copies.

Forward: program (query tile, batch x query head), online softmax in base 2, stores o and the log2-sum-exp.
Backward: ``delta = rowsum(dO * O)``; program (key tile, batch x KV head) sums dK/dV over its GQA query heads and
every query tile that sees it (the prompt's own and all G completions' queries) in registers — deterministic, no
atomics; program (query tile, batch x query head) forms dQ.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    if UPCAST_DOT:
        # Triton's CPU interpreter (3.6-3.8) computes bf16 tl.dot wrongly; fp32 operands hold the same values.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _visible(offs_m, offs_n, seg_q, pre_q, seg_k):
    """[BM, BN] visibility of keys offs_n to queries offs_m (padding and out-of-range tokens carry seg = -1)."""
    same = (seg_k[None, :] == seg_q[:, None]) | (seg_k[None, :] == pre_q[:, None])
    return (offs_n[None, :] <= offs_m[:, None]) & (seg_q[:, None] >= 0) & (seg_k[None, :] >= 0) & same


@triton.jit
def _tile(ptr, base, offs, stride_s, offs_d, stride_d, S, D):
    """Load a [len(offs), BD] tile of a [.., S, D] tensor at ``base`` (int64), zeros outside."""
    mask = (offs[:, None] < S) & (offs_d[None, :] < D)
    return tl.load(ptr + base + offs[:, None].to(tl.int64) * stride_s + offs_d[None, :] * stride_d, mask=mask,
                   other=0.0)


@triton.jit(do_not_specialize=["S", "NQT"])
def _prefix_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, seg_ptr, pre_ptr, blk_ptr, blk_idx,
    scale, S, D, HQ, GQA, NQT,
    sq_b, sq_h, sq_s, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d, so_b, so_h, so_s, so_d,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = (pid_bh % HQ).to(tl.int64)
    hk = h // GQA
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < S
    q = _tile(q_ptr, b * sq_b + h * sq_h, offs_m, sq_s, offs_d, sq_d, S, D)  # [BM, BD]
    seg_q = tl.load(seg_ptr + b * S + offs_m, mask=m_mask, other=-1)
    pre_q = tl.load(pre_ptr + b * S + offs_m, mask=m_mask, other=-1)
    qk_scale = scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    tile = b * NQT + pid_m
    lo = tl.load(blk_ptr + tile)
    hi = tl.load(blk_ptr + tile + 1)
    for j in range(lo, hi):
        offs_n = tl.load(blk_idx + j) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = _tile(k_ptr, b * sk_b + hk * sk_h, offs_n, sk_s, offs_d, sk_d, S, D)  # [BN, BD]
        v = _tile(v_ptr, b * sv_b + hk * sv_h, offs_n, sv_s, offs_d, sv_d, S, D)  # [BN, BD]
        seg_k = tl.load(seg_ptr + b * S + offs_n, mask=offs_n < S, other=-1)
        s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * qk_scale  # [BM, BN], log2 units
        s = tl.where(_visible(offs_m, offs_n, seg_q, pre_q, seg_k), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays empty
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
        m_i = m_new
    has = l_i > 0.0
    l_safe = tl.where(has, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has, m_i + tl.log2(l_safe), float("-inf"))  # padding rows: o = 0, lse = -inf
    o_off = b * so_b + h * so_h + offs_m[:, None].to(tl.int64) * so_s + offs_d[None, :] * so_d
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_d[None, :] < D))
    tl.store(lse_ptr + (b * HQ + h) * S + offs_m, lse, mask=m_mask)


@triton.jit(do_not_specialize=["S"])
def _prefix_attention_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr, S, D, HQ,
    so_b, so_h, so_s, so_d, sdo_b, sdo_h, sdo_s, sdo_d,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32, [B, HQ, S]."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = (pid_bh % HQ).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _tile(o_ptr, b * so_b + h * so_h, offs_m, so_s, offs_d, so_d, S, D).to(tl.float32)
    do = _tile(do_ptr, b * sdo_b + h * sdo_h, offs_m, sdo_s, offs_d, sdo_d, S, D).to(tl.float32)
    tl.store(delta_ptr + (b * HQ + h) * S + offs_m, tl.sum(o * do, 1), mask=offs_m < S)


@triton.jit
def _probs(q, k, lse, offs_m, offs_n, seg_q, pre_q, seg_k, qk_scale,
           DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """[BM, BN] probabilities exp2(s - lse) of the merged softmax, 0 where invisible."""
    s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST_DOT) * qk_scale
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # padding rows: every p is 0, not NaN
    return tl.where(_visible(offs_m, offs_n, seg_q, pre_q, seg_k), tl.exp2(s - lse[:, None]), 0.0)


@triton.jit(do_not_specialize=["S", "NKT"])
def _prefix_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, seg_ptr, pre_ptr, blk_ptr, blk_idx,
    scale, S, D, HQ, HKV, GQA, NKT,
    sq_b, sq_h, sq_s, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d, sdo_b, sdo_h, sdo_s, sdo_d,
    sdk_b, sdk_h, sdk_s, sdk_d,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _tile(k_ptr, b * sk_b + hk * sk_h, offs_n, sk_s, offs_d, sk_d, S, D)  # [BN, BD]
    v = _tile(v_ptr, b * sv_b + hk * sv_h, offs_n, sv_s, offs_d, sv_d, S, D)  # [BN, BD]
    seg_k = tl.load(seg_ptr + b * S + offs_n, mask=offs_n < S, other=-1)
    qk_scale = scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    tile = b * NKT + pid_n
    lo = tl.load(blk_ptr + tile)
    hi = tl.load(blk_ptr + tile + 1)
    for r in range(0, GQA):
        h = hk * GQA + r
        for j in range(lo, hi):
            offs_m = tl.load(blk_idx + j) * BLOCK_M + tl.arange(0, BLOCK_M)
            m_mask = offs_m < S
            q = _tile(q_ptr, b * sq_b + h * sq_h, offs_m, sq_s, offs_d, sq_d, S, D)  # [BM, BD]
            do = _tile(do_ptr, b * sdo_b + h * sdo_h, offs_m, sdo_s, offs_d, sdo_d, S, D)  # [BM, BD]
            row = (b * HQ + h) * S + offs_m
            lse = tl.load(lse_ptr + row, mask=m_mask, other=float("-inf"))
            delta = tl.load(delta_ptr + row, mask=m_mask, other=0.0)
            seg_q = tl.load(seg_ptr + b * S + offs_m, mask=m_mask, other=-1)
            pre_q = tl.load(pre_ptr + b * S + offs_m, mask=m_mask, other=-1)
            p = _probs(q, k, lse, offs_m, offs_n, seg_q, pre_q, seg_k, qk_scale, DOT_PRECISION, UPCAST_DOT)
            dv += _dot(tl.trans(p.to(do.dtype)), do, DOT_PRECISION, UPCAST_DOT)  # [BN, BD]
            dp = _dot(do, tl.trans(v), DOT_PRECISION, UPCAST_DOT)  # [BM, BN]
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, DOT_PRECISION, UPCAST_DOT)  # [BN, BD]
    dk = dk * scale
    off = b * sdk_b + hk * sdk_h + offs_n[:, None].to(tl.int64) * sdk_s + offs_d[None, :] * sdk_d
    mask = (offs_n[:, None] < S) & (offs_d[None, :] < D)
    tl.store(dk_ptr + off, dk.to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + off, dv.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["S", "NQT"])
def _prefix_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, seg_ptr, pre_ptr, blk_ptr, blk_idx,
    scale, S, D, HQ, GQA, NQT,
    sq_b, sq_h, sq_s, sq_d, sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d, sdo_b, sdo_h, sdo_s, sdo_d,
    sdq_b, sdq_h, sdq_s, sdq_d,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = (pid_bh % HQ).to(tl.int64)
    hk = h // GQA
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < S
    q = _tile(q_ptr, b * sq_b + h * sq_h, offs_m, sq_s, offs_d, sq_d, S, D)  # [BM, BD]
    do = _tile(do_ptr, b * sdo_b + h * sdo_h, offs_m, sdo_s, offs_d, sdo_d, S, D)  # [BM, BD]
    row = (b * HQ + h) * S + offs_m
    lse = tl.load(lse_ptr + row, mask=m_mask, other=float("-inf"))
    delta = tl.load(delta_ptr + row, mask=m_mask, other=0.0)
    seg_q = tl.load(seg_ptr + b * S + offs_m, mask=m_mask, other=-1)
    pre_q = tl.load(pre_ptr + b * S + offs_m, mask=m_mask, other=-1)
    qk_scale = scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    tile = b * NQT + pid_m
    lo = tl.load(blk_ptr + tile)
    hi = tl.load(blk_ptr + tile + 1)
    for j in range(lo, hi):
        offs_n = tl.load(blk_idx + j) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = _tile(k_ptr, b * sk_b + hk * sk_h, offs_n, sk_s, offs_d, sk_d, S, D)  # [BN, BD]
        v = _tile(v_ptr, b * sv_b + hk * sv_h, offs_n, sv_s, offs_d, sv_d, S, D)  # [BN, BD]
        seg_k = tl.load(seg_ptr + b * S + offs_n, mask=offs_n < S, other=-1)
        p = _probs(q, k, lse, offs_m, offs_n, seg_q, pre_q, seg_k, qk_scale, DOT_PRECISION, UPCAST_DOT)
        dp = _dot(do, tl.trans(v), DOT_PRECISION, UPCAST_DOT)  # [BM, BN]
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, DOT_PRECISION, UPCAST_DOT)  # [BM, BD]
    dq = dq * scale
    off = b * sdq_b + h * sdq_h + offs_m[:, None].to(tl.int64) * sdq_s + offs_d[None, :] * sdq_d
    tl.store(dq_ptr + off, dq.to(dq_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_d[None, :] < D))
