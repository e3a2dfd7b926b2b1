"""Log-prob / entropy kernels on materialised logits (the logits-input path).

Forward: one program per block of BT rows streams the row in BV-wide tiles, reading the logits exactly once.
Backward: program (row block, vocabulary block) rereads its tile and writes dL/du, possibly over the logits
buffer itself (in-place mode), so no N x V temporary is created.

Several targets per row (targets ``[N, K]``, KP = K padded to a power of 2 > 1): the row statistics are streamed once
and the K target logits are loaded straight from the logits; the backward adds the K one-hot terms per tile.
KP = 1 is the single-target code, unchanged (targets ``[N]``).
"""
import triton
import triton.language as tl

from .softmax_tile import (add_onehot, finalize_stats, grad_tile, load_grad_rows, merge_stats, target_block,
                           tile_stats)


@triton.jit
def _load_tempered(x_ptr, rows64, row_mask, cols64, col_mask, temp, stride_n):
    # [BT, BV] fp32, masked columns at -inf
    x = tl.load(x_ptr + rows64[:, None] * stride_n + cols64[None, :],
                mask=row_mask[:, None] & col_mask[None, :], other=float("-inf")).to(tl.float32)
    # Correctly rounded division, as the reference's logits / T (a rounded 1/T would add a second rounding).
    return tl.where(col_mask[None, :], tl.math.div_rn(x, temp[:, None]), float("-inf"))


@triton.jit
def row_stats(x_ptr, rows64, row_mask, y, temp, V, stride_n, COMPUTE_ENTROPY: tl.constexpr, BT: tl.constexpr,
              BV: tl.constexpr, MULTI: tl.constexpr = False):
    """(logp, entropy, m, log_s) of BT full rows of logits, streamed once in BV-wide tiles; each [BT], or logp
    [BT, KP] for MULTI targets y [BT, KP] (-1: none)."""
    m = tl.full([BT], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BT], dtype=tl.float32)
    q = tl.zeros([BT], dtype=tl.float32)
    zy = tl.zeros([BT], dtype=tl.float32)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        col_mask = cols < V
        z = _load_tempered(x_ptr, rows64, row_mask, cols.to(tl.int64), col_mask, temp, stride_n)
        if not MULTI:
            zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
        m_b, s_b, q_b = tile_stats(z, COMPUTE_ENTROPY)
        m, s, q = merge_stats(m, s, q, m_b, s_b, q_b)
    if MULTI:  # K gathers instead of K masked sums over every tile; the same load and division as the tile's
        x_y = tl.load(x_ptr + rows64[:, None] * stride_n + y, mask=row_mask[:, None] & (y >= 0), other=0.0)
        zy = tl.math.div_rn(x_y.to(tl.float32), temp[:, None])  # [BT, KP]
    return finalize_stats(m, s, q, zy, COMPUTE_ENTROPY, MULTI)


@triton.jit
def _logprob_entropy_fwd_kernel(
    x_ptr, y_ptr, t_ptr, logp_ptr, ent_ptr, mx_ptr, ls_ptr,
    N, V, K, stride_n, stride_t,
    COMPUTE_ENTROPY: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, KP: tl.constexpr = 1,
):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    if KP == 1:
        y_at, y_mask = rows64, row_mask
    else:
        y_at, y_mask = target_block(rows64, row_mask, K, KP)
    y = tl.load(y_ptr + y_at, mask=y_mask, other=-1)  # [BT] or [BT, KP]
    temp = tl.load(t_ptr + rows64 * stride_t, mask=row_mask, other=1.0).to(tl.float32)
    logp, entropy, m, log_s = row_stats(x_ptr, rows64, row_mask, y, temp, V, stride_n, COMPUTE_ENTROPY, BT, BV,
                                        KP > 1)
    tl.store(logp_ptr + y_at, logp, mask=y_mask)
    tl.store(ent_ptr + rows64, entropy, mask=row_mask)
    tl.store(mx_ptr + rows64, m, mask=row_mask)
    tl.store(ls_ptr + rows64, log_s, mask=row_mask)


@triton.jit
def _logprob_entropy_bwd_kernel(
    x_ptr, y_ptr, t_ptr, mx_ptr, ls_ptr, ent_ptr, c_ptr, d_ptr, g_ptr,
    N, V, K, stride_n, stride_t, stride_gn,
    HAS_D: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, KP: tl.constexpr = 1,
):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BV + tl.arange(0, BV)
    row_mask = rows < N
    col_mask = cols < V
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    y, temp, m, log_s, entropy, c, d = load_grad_rows(y_ptr, t_ptr, mx_ptr, ls_ptr, ent_ptr, c_ptr, d_ptr, rows64,
                                                      row_mask, stride_t, HAS_D, KP > 1, K)
    z = _load_tempered(x_ptr, rows64, row_mask, cols64, col_mask, temp, stride_n)
    if KP == 1:
        g = grad_tile(z, cols[None, :] == y[:, None], m, log_s, entropy, c, d, temp, HAS_D)  # [BT, BV]
    else:  # several targets: c is the row's sum_k c_k here, and the K one-hot terms come after the p terms
        g = grad_tile(z, None, m, log_s, entropy, c, d, temp, HAS_D, False)
        g = add_onehot(g, y_ptr, c_ptr, rows64, row_mask, cols, log_s, temp, K)  # [BT, BV]
    tl.store(g_ptr + rows64[:, None] * stride_gn + cols64[None, :], g.to(g_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])
