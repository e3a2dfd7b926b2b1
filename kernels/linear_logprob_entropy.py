"""Fused LM head + log-prob / entropy kernels. Logits tiles are produced by tl.dot and consumed in registers.

Forward: program (row block, vocabulary split) streams its vocabulary range in [BT, BV] tiles, each tile the
K-loop product of hidden [BT, H] and weight [BV, H] in fp32, and keeps the online (m, s, q) state per row plus the
target logit. A merge kernel folds the splits. Backward: program (row block, vocabulary block) recomputes one tile
and writes dL/du for it; the launcher turns the [rows, V] chunk into dhidden and dweight with two GEMMs.

Several targets per row (targets ``[N, K]``, KP = K padded to a power of 2 > 1): the statistics and the GEMM run once
per tile as for one target; only the K target logits (forward) and the K one-hot terms (backward) are per target.
KP = 1 is the single-target code, unchanged (targets ``[N]``).
"""
import triton
import triton.language as tl

from .softmax_tile import (add_onehot, finalize_stats, grad_tile, load_grad_rows, merge_stats, target_block,
                           tile_stats, tile_targets)


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows64, row_mask, cols64, col_mask, temp, H,
                 stride_hn, stride_hk, stride_wv, stride_wk,
                 HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                 BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
    """Tempered logits z = (h W^T + b) / T for a [BT, BV] tile, fp32, masked columns at -inf."""
    acc = tl.zeros([BT, BV], dtype=tl.float32)
    for k0 in range(0, H, BK):
        ks = k0 + tl.arange(0, BK)
        k_mask = ks < H
        # [BT, BK]
        a = tl.load(h_ptr + rows64[:, None] * stride_hn + ks[None, :] * stride_hk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        # [BK, BV]
        b = tl.load(w_ptr + cols64[None, :] * stride_wv + ks[:, None] * stride_wk,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST_DOT:
            # Triton's CPU interpreter (3.6-3.8) runs tl.dot on numpy's BLAS, which computes bf16 wrongly and
            # rounds a row differently by its position in the tile. fp32 products summed over K in order are what
            # a GPU's MMA gives every row alike, so interpreter tests stay meaningful, batch invariance included.
            acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols64, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    # Correctly rounded division, as the reference's u / T: multiplying by a rounded 1/T adds a second rounding,
    # up to one more ulp of z (4e-3 at |z| ~ 4e4).
    z = tl.math.div_rn(acc, temp[:, None])
    return tl.where(col_mask[None, :], z, float("-inf"))


@triton.jit
def _linear_logprob_entropy_fwd_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, t_ptr,
    m_ptr, s_ptr, q_ptr, zy_ptr,
    N, V, H, V_PER_SPLIT, K,
    stride_hn, stride_hk, stride_wv, stride_wk, stride_t,
    HAS_BIAS: tl.constexpr, COMPUTE_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr = 1,
):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_t * BT + tl.arange(0, BT)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    if KP == 1:
        y = tl.load(y_ptr + rows64, mask=row_mask, other=-1)
        zy = tl.zeros([BT], dtype=tl.float32)
    else:
        y_at, y_mask = target_block(rows64, row_mask, K, KP)
        y = tl.load(y_ptr + y_at, mask=y_mask, other=-1)  # [BT, KP]
        zy = tl.zeros([BT, KP], dtype=tl.float32)
    temp = tl.load(t_ptr + rows64 * stride_t, mask=row_mask, other=1.0).to(tl.float32)
    m = tl.full([BT], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BT], dtype=tl.float32)
    q = tl.zeros([BT], dtype=tl.float32)
    v_lo = pid_s * V_PER_SPLIT
    # Every split walks the same V_PER_SPLIT offsets; the last split's blocks past V are skipped by the branch.
    for off in range(0, V_PER_SPLIT, BV):
        v0 = v_lo + off
        if v0 < V:
            cols = v0 + tl.arange(0, BV)
            col_mask = cols < V
            z = _logits_tile(h_ptr, w_ptr, b_ptr, rows64, row_mask, cols.to(tl.int64), col_mask, temp, H,
                             stride_hn, stride_hk, stride_wv, stride_wk, HAS_BIAS, DOT_PRECISION, UPCAST_DOT,
                             BT, BV, BK)
            if KP == 1:
                hit = cols[None, :] == y[:, None]
                zy += tl.sum(tl.where(hit, z, 0.0), 1)
            else:
                zy += tile_targets(z, cols, y, K)
            m_b, s_b, q_b = tile_stats(z, COMPUTE_ENTROPY)
            m, s, q = merge_stats(m, s, q, m_b, s_b, q_b)
    part = pid_s * N + rows64
    tl.store(m_ptr + part, m, mask=row_mask)
    tl.store(s_ptr + part, s, mask=row_mask)
    tl.store(q_ptr + part, q, mask=row_mask)
    # Exactly one split owns each target column, so exactly one program writes each zy.
    if KP == 1:
        tl.store(zy_ptr + rows64, zy, mask=row_mask & (y >= v_lo) & (y < v_lo + V_PER_SPLIT))
    else:  # an ignored target (-1) matches no column: the split of column 0 writes its 0
        y_own = tl.maximum(y, 0)
        tl.store(zy_ptr + y_at, zy, mask=y_mask & (y_own >= v_lo) & (y_own < v_lo + V_PER_SPLIT))


@triton.jit
def _linear_logprob_entropy_merge_kernel(
    m_ptr, s_ptr, q_ptr, zy_ptr, logp_ptr, ent_ptr, mx_ptr, ls_ptr, N, SPLITS, K,
    COMPUTE_ENTROPY: tl.constexpr, BT: tl.constexpr, KP: tl.constexpr = 1,
):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    m = tl.full([BT], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BT], dtype=tl.float32)
    q = tl.zeros([BT], dtype=tl.float32)
    for i in range(0, SPLITS):
        part = i * N + rows64
        m_i = tl.load(m_ptr + part, mask=row_mask, other=float("-inf"))
        s_i = tl.load(s_ptr + part, mask=row_mask, other=0.0)
        q_i = tl.load(q_ptr + part, mask=row_mask, other=0.0)
        m, s, q = merge_stats(m, s, q, m_i, s_i, q_i)
    if KP == 1:
        zy = tl.load(zy_ptr + rows64, mask=row_mask, other=0.0)
        logp, entropy, m, log_s = finalize_stats(m, s, q, zy, COMPUTE_ENTROPY)
        tl.store(logp_ptr + rows64, logp, mask=row_mask)
    else:
        y_at, y_mask = target_block(rows64, row_mask, K, KP)
        zy = tl.load(zy_ptr + y_at, mask=y_mask, other=0.0)
        logp, entropy, m, log_s = finalize_stats(m, s, q, zy, COMPUTE_ENTROPY, True)
        tl.store(logp_ptr + y_at, logp, mask=y_mask)
    tl.store(ent_ptr + rows64, entropy, mask=row_mask)
    tl.store(mx_ptr + rows64, m, mask=row_mask)
    tl.store(ls_ptr + rows64, log_s, mask=row_mask)


@triton.jit
def _linear_logprob_entropy_bwd_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, t_ptr, mx_ptr, ls_ptr, ent_ptr, c_ptr, d_ptr, g_ptr, tau_ptr,
    N, V, H, K,
    stride_hn, stride_hk, stride_wv, stride_wk, stride_t, stride_gn,
    HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, KP: tl.constexpr = 1,
    HAS_TAU: tl.constexpr = False,
):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BV + tl.arange(0, BV)
    row_mask = rows < N
    col_mask = cols < V
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    y, temp, m, log_s, entropy, c, d = load_grad_rows(y_ptr, t_ptr, mx_ptr, ls_ptr, ent_ptr, c_ptr, d_ptr, rows64,
                                                      row_mask, stride_t, HAS_D, KP > 1, K)
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows64, row_mask, cols64, col_mask, temp, H,
                     stride_hn, stride_hk, stride_wv, stride_wk, HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BT, BV, BK)
    if HAS_TAU:  # the truncated distribution: the forward's row thresholds (the kept set is z >= tau)
        tau = tl.load(tau_ptr + rows64, mask=row_mask, other=float("-inf"))
        z = tl.where(z >= tau[:, None], z, float("-inf"))
    if KP == 1:
        hit = cols[None, :] == y[:, None]
        g = grad_tile(z, hit, m, log_s, entropy, c, d, temp, HAS_D)  # [BT, BV]
    else:  # several targets: c is the row's sum_k c_k here, and the K one-hot terms come after the p terms
        g = grad_tile(z, None, m, log_s, entropy, c, d, temp, HAS_D, False)
        g = add_onehot(g, y_ptr, c_ptr, rows64, row_mask, cols, log_s, temp, K)  # [BT, BV]
    tl.store(g_ptr + rows64[:, None] * stride_gn + cols64[None, :], g.to(g_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _linear_logits_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, z_ptr,
    N, V, H,
    stride_hn, stride_hk, stride_wv, stride_wk, stride_t, stride_zn,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
):
    """The tempered logits of a chunk, fp32 ``[N, V]``, tile by tile as the fused kernels form them (the truncated
    head finds its thresholds on this buffer)."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BV + tl.arange(0, BV)
    row_mask = rows < N
    col_mask = cols < V
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    temp = tl.load(t_ptr + rows64 * stride_t, mask=row_mask, other=1.0).to(tl.float32)
    z = _logits_tile(h_ptr, w_ptr, b_ptr, rows64, row_mask, cols64, col_mask, temp, H,
                     stride_hn, stride_hk, stride_wv, stride_wk, HAS_BIAS, DOT_PRECISION, UPCAST_DOT, BT, BV, BK)
    tl.store(z_ptr + rows64[:, None] * stride_zn + cols64[None, :], z, mask=row_mask[:, None] & col_mask[None, :])
