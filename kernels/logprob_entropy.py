"""Log-prob / entropy kernels on materialised logits (the logits-input path).

Forward: one program per block of BT rows streams the row in BV-wide tiles, reading the logits exactly once.
Backward: program (row block, vocabulary block) rereads its tile and writes dL/du, possibly over the logits
buffer itself (in-place mode), so no N x V temporary is created.
"""
import triton
import triton.language as tl

from .softmax_tile import finalize_stats, grad_tile, load_grad_rows, merge_stats, tile_stats


@triton.jit
def _load_tempered(x_ptr, rows64, row_mask, cols64, col_mask, temp, stride_n):
    # [BT, BV] fp32, masked columns at -inf
    x = tl.load(x_ptr + rows64[:, None] * stride_n + cols64[None, :],
                mask=row_mask[:, None] & col_mask[None, :], other=float("-inf")).to(tl.float32)
    # Correctly rounded division, as the reference's logits / T (a rounded 1/T would add a second rounding).
    return tl.where(col_mask[None, :], tl.math.div_rn(x, temp[:, None]), float("-inf"))


@triton.jit
def row_stats(x_ptr, rows64, row_mask, y, temp, V, stride_n, COMPUTE_ENTROPY: tl.constexpr, BT: tl.constexpr,
              BV: tl.constexpr):
    """(logp, entropy, m, log_s) of BT full rows of logits, streamed once in BV-wide tiles."""
    m = tl.full([BT], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BT], dtype=tl.float32)
    q = tl.zeros([BT], dtype=tl.float32)
    zy = tl.zeros([BT], dtype=tl.float32)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        col_mask = cols < V
        z = _load_tempered(x_ptr, rows64, row_mask, cols.to(tl.int64), col_mask, temp, stride_n)
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
        m_b, s_b, q_b = tile_stats(z, COMPUTE_ENTROPY)
        m, s, q = merge_stats(m, s, q, m_b, s_b, q_b)
    return finalize_stats(m, s, q, zy, COMPUTE_ENTROPY)


@triton.jit
def _logprob_entropy_fwd_kernel(
    x_ptr, y_ptr, t_ptr, logp_ptr, ent_ptr, mx_ptr, ls_ptr,
    N, V, stride_n, stride_t,
    COMPUTE_ENTROPY: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    y = tl.load(y_ptr + rows64, mask=row_mask, other=-1)
    temp = tl.load(t_ptr + rows64 * stride_t, mask=row_mask, other=1.0).to(tl.float32)
    logp, entropy, m, log_s = row_stats(x_ptr, rows64, row_mask, y, temp, V, stride_n, COMPUTE_ENTROPY, BT, BV)
    tl.store(logp_ptr + rows64, logp, mask=row_mask)
    tl.store(ent_ptr + rows64, entropy, mask=row_mask)
    tl.store(mx_ptr + rows64, m, mask=row_mask)
    tl.store(ls_ptr + rows64, log_s, mask=row_mask)


@triton.jit
def _logprob_entropy_bwd_kernel(
    x_ptr, y_ptr, t_ptr, mx_ptr, ls_ptr, ent_ptr, c_ptr, d_ptr, g_ptr,
    N, V, stride_n, stride_t, stride_gn,
    HAS_D: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BV + tl.arange(0, BV)
    row_mask = rows < N
    col_mask = cols < V
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    y, temp, m, log_s, entropy, c, d = load_grad_rows(y_ptr, t_ptr, mx_ptr, ls_ptr, ent_ptr, c_ptr, d_ptr, rows64,
                                                      row_mask, stride_t, HAS_D)
    z = _load_tempered(x_ptr, rows64, row_mask, cols64, col_mask, temp, stride_n)
    g = grad_tile(z, cols[None, :] == y[:, None], m, log_s, entropy, c, d, temp, HAS_D)  # [BT, BV]
    tl.store(g_ptr + rows64[:, None] * stride_gn + cols64[None, :], g.to(g_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])
