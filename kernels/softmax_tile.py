"""Online softmax statistics over vocabulary tiles, shared by every log-prob / entropy kernel.

A row's state is (m, s, q): the running max m of the tempered logits z, s = sum exp(z - m) and
q = sum exp(z - m) * (z - m). Keeping q relative to the running max avoids the cancellation of lse - E_p[z] at
large logits. Then lse = m + log s and H = log s - q / s (docs/math.md#online-statistics).
"""
import triton
import triton.language as tl

LOG2E: tl.constexpr = 1.4426950408889634
# Shifted logits below this floor have exp() == 0 in fp32; clamping keeps 0 * (z - m) at 0 for -inf columns.
SHIFT_FLOOR: tl.constexpr = -10000.0


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
def finalize_stats(m, s, q, zy, COMPUTE_ENTROPY: tl.constexpr):
    """(logp, entropy, m, log_s) from a full row state and the target's tempered logit zy.

    A row whose every logit is -inf (s = 0) gets logp = log_s = -inf, m = 0 and entropy 0. Without
    COMPUTE_ENTROPY q is not accumulated and the entropy is 0.
    """
    alive = s > 0
    log_s = tl.where(alive, tl.log(tl.where(alive, s, 1.0)), float("-inf"))
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    logp = tl.where(alive, (zy - m_ref) - log_s, log_s)
    if COMPUTE_ENTROPY:
        entropy = tl.where(alive, log_s - q / tl.where(alive, s, 1.0), 0.0)
    else:
        entropy = tl.zeros_like(log_s)
    return logp, entropy, m_ref, log_s


@triton.jit
def grad_tile(z, hit, m, log_s, entropy, c, d, temp, HAS_D: tl.constexpr):
    """dL/du for a tile: (c (1[v = y] - p) - d p (log p + H)) / T, with log p = (z - m) - log s.

    z [BT, BV] tempered logits (masked columns -inf), hit [BT, BV] the target mask, the rest [BT].
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
    g = tl.where(hit, c[:, None], 0.0) - p * coef
    return tl.math.div_rn(g, temp[:, None])  # [BT, BV]; rounded like the reference's grad / T


@triton.jit
def load_grad_rows(y_ptr, t_ptr, mx_ptr, ls_ptr, ent_ptr, c_ptr, d_ptr, rows64, row_mask, stride_t,
                   HAS_D: tl.constexpr):
    """Per-row inputs of a gradient tile: target, temperature, saved (m, log s, H) and upstream (c, d)."""
    y = tl.load(y_ptr + rows64, mask=row_mask, other=-1)
    temp = tl.load(t_ptr + rows64 * stride_t, mask=row_mask, other=1.0).to(tl.float32)
    m = tl.load(mx_ptr + rows64, mask=row_mask, other=0.0)
    log_s = tl.load(ls_ptr + rows64, mask=row_mask, other=0.0)
    entropy = tl.load(ent_ptr + rows64, mask=row_mask, other=0.0)
    c = tl.load(c_ptr + rows64, mask=row_mask, other=0.0)
    if HAS_D:
        d = tl.load(d_ptr + rows64, mask=row_mask, other=0.0)
    else:
        d = c
    return y, temp, m, log_s, entropy, c, d
