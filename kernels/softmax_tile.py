"""Online softmax statistics over vocabulary tiles, shared by every log-prob / entropy kernel.

A row's state is (m, s, q): the running max m of the tempered logits z, s = sum exp(z - m) and
q = sum exp(z - m) * (z - m). Keeping q relative to the running max avoids the cancellation of lse - E_p[z] at
large logits. Then lse = m + log s and H = log s - q / s (docs/math.md#online-statistics).
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
# Shifted logits below this floor have exp() == 0 in fp32; clamping keeps 0 * (z - m) at 0 for -inf columns.
SHIFT_FLOOR = tl.constexpr(-10000.0)


@triton.jit
def merge_stats(m_a, s_a, q_a, m_b, s_b, q_b):
    """Combine two partial states of the same rows; a state with m = -inf is empty."""
    m = tl.maximum(m_a, m_b)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    # delta_* = m_* - m is -inf for an empty state; its s is 0, so use 0 rather than -inf * 0 = NaN.
    delta_a = tl.where(m_a == float("-inf"), 0.0, m_a - m_ref)
    delta_b = tl.where(m_b == float("-inf"), 0.0, m_b - m_ref)
    alpha_a = tl.exp2((m_a - m_ref) * LOG2E)
    alpha_b = tl.exp2((m_b - m_ref) * LOG2E)
    s = alpha_a * s_a + alpha_b * s_b
    q = alpha_a * (q_a + delta_a * s_a) + alpha_b * (q_b + delta_b * s_b)
    return m, s, q


@triton.jit
def tile_stats(z, COMPUTE_ENTROPY: tl.constexpr):
    """State of a tile z [BT, BV] (masked columns at -inf), relative to the tile's own row max."""
    m = tl.max(z, 1)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    zs = tl.maximum(z - m_ref[:, None], SHIFT_FLOOR)  # [BT, BV]
    e = tl.exp2(zs * LOG2E)
    s = tl.sum(e, 1)
    if COMPUTE_ENTROPY:
        q = tl.sum(e * zs, 1)
    else:
        q = tl.zeros_like(s)
    return m, s, q


@triton.jit
def finalize_stats(m, s, q, zy, COMPUTE_ENTROPY: tl.constexpr, MULTI: tl.constexpr = False):
    """(logp, entropy, m, log_s) from a full row state [BT] and the target's tempered logit zy [BT] (MULTI: the
    targets' zy [BT, KP], giving logp [BT, KP]; the statistics stay [BT]).

    A row whose every logit is -inf (s = 0) gets logp = log_s = -inf, m = 0 and entropy 0. Without
    COMPUTE_ENTROPY q is not accumulated and the entropy is 0.
    """
    alive = s > 0
    log_s = tl.where(alive, tl.log(tl.where(alive, s, 1.0)), float("-inf"))
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    if MULTI:
        logp = tl.where(alive[:, None], (zy - m_ref[:, None]) - log_s[:, None], log_s[:, None])
    else:
        logp = tl.where(alive, (zy - m_ref) - log_s, log_s)
    if COMPUTE_ENTROPY:
        entropy = tl.where(alive, log_s - q / tl.where(alive, s, 1.0), 0.0)
    else:
        entropy = tl.zeros_like(log_s)
    return logp, entropy, m_ref, log_s


@triton.jit
def grad_tile(z, hit, m, log_s, entropy, c, d, temp, HAS_D: tl.constexpr, ONE_HOT: tl.constexpr = True):
    """dL/du for a tile: (c (1[v = y] - p) - d p (log p + H)) / T, with log p = (z - m) - log s.

    z [BT, BV] tempered logits (masked columns -inf), hit [BT, BV] the target mask, the rest [BT].
    Without ONE_HOT (several targets per row; hit unused) c is the row's sum_k c_k and the c_k 1[v = y_k] / T terms
    are left to ``add_onehot``.
    Rows with log s = -inf (all logits -inf) get no gradient.
    """
    dead = log_s == float("-inf")
    log_s = tl.where(dead, float("inf"), log_s)
    c = tl.where(dead, 0.0, c)
    logp = tl.maximum((z - m[:, None]) - log_s[:, None], SHIFT_FLOOR)  # [BT, BV]
    p = tl.exp2(logp * LOG2E)
    if HAS_D:
        coef = c[:, None] + d[:, None] * (logp + entropy[:, None])
    else:
        coef = c[:, None] + tl.zeros_like(logp)
    if ONE_HOT:
        g = tl.where(hit, c[:, None], 0.0) - p * coef
    else:
        g = -(p * coef)
    return tl.math.div_rn(g, temp[:, None])  # [BT, BV]; rounded like the reference's grad / T


@triton.jit
def load_grad_rows(y_ptr, t_ptr, mx_ptr, ls_ptr, ent_ptr, c_ptr, d_ptr, rows64, row_mask, stride_t,
                   HAS_D: tl.constexpr, MULTI: tl.constexpr = False, K=1):
    """Per-row inputs of a gradient tile: target, temperature, saved (m, log s, H) and upstream (c, d).

    MULTI: targets and c are ``[N, K]``: y is left at -1 (``add_onehot`` reads the targets per tile) and c is the
    row's sum_k c_k, which the p term takes.
    """
    if MULTI:
        y = tl.full(rows64.shape, -1, tl.int64)
    else:
        y = tl.load(y_ptr + rows64, mask=row_mask, other=-1)
    temp = tl.load(t_ptr + rows64 * stride_t, mask=row_mask, other=1.0).to(tl.float32)
    m = tl.load(mx_ptr + rows64, mask=row_mask, other=0.0)
    log_s = tl.load(ls_ptr + rows64, mask=row_mask, other=0.0)
    entropy = tl.load(ent_ptr + rows64, mask=row_mask, other=0.0)
    if MULTI:
        c = tl.zeros_like(temp)
        for k in range(0, K):
            c += tl.load(c_ptr + rows64 * K + k, mask=row_mask, other=0.0)
    else:
        c = tl.load(c_ptr + rows64, mask=row_mask, other=0.0)
    if HAS_D:
        d = tl.load(d_ptr + rows64, mask=row_mask, other=0.0)
    else:
        d = c
    return y, temp, m, log_s, entropy, c, d


@triton.jit
def target_block(rows64, row_mask, K, KP: tl.constexpr):
    """(offsets, mask) [BT, KP] of the rows' K targets in a row-major ``[N, K]`` tensor, K padded to KP."""
    ks = tl.arange(0, KP)
    return rows64[:, None] * K + ks[None, :], row_mask[:, None] & (ks < K)[None, :]


@triton.jit
def tile_targets(z, cols, y, K):
    """The tempered logits z [BT, BV] at the targets y [BT, KP] whose columns lie in cols [BV], 0 at the others.

    One masked row sum per target: a register tile cannot be indexed by column, and looping over K keeps one
    [BT, BV] temporary live instead of a [BT, KP, BV] comparison. A target of -1 (ignored) matches no column.
    """
    ks = tl.arange(0, y.shape[1])
    zy = tl.zeros(y.shape, dtype=tl.float32)
    for k in range(0, K):
        y_k = tl.sum(tl.where(ks[None, :] == k, y, 0), 1)  # [BT]: column k of y, from registers
        z_k = tl.sum(tl.where(cols[None, :] == y_k[:, None], z, 0.0), 1)
        zy += tl.where(ks[None, :] == k, z_k[:, None], 0.0)
    return zy  # [BT, KP]


@triton.jit
def add_onehot(g, y_ptr, c_ptr, rows64, row_mask, cols, log_s, temp, K):
    """g [BT, BV] plus the tile's one-hot terms sum_k c_k 1[v = y_k] / T, for targets and upstream c ``[N, K]``.

    Added after ``grad_tile`` (ONE_HOT=False), with 1/T folded into c_k as the torch plan does, so only g stays live
    across the loop: a one-hot [BT, BV] accumulator built beside z spilled registers on sm_90. A target of -1
    (ignored, its c 0) matches no column; duplicate targets add their c; rows with log s = -inf get nothing, as in
    grad_tile.
    """
    dead = log_s == float("-inf")
    for k in range(0, K):
        y_k = tl.load(y_ptr + rows64 * K + k, mask=row_mask, other=-1)
        c_k = tl.load(c_ptr + rows64 * K + k, mask=row_mask, other=0.0)
        c_k = tl.where(dead, 0.0, tl.math.div_rn(c_k, temp))
        g += tl.where(cols[None, :] == y_k[:, None], c_k[:, None], 0.0)
    return g
