"""One-pass PG loss epilogue over a chunk of materialised logits: statistics, the per-token loss and its
c = dL/dlogp, d = dL/dH for the PPO-clip family, then dL/du written over the logits, all in one launch.

The per-token math mirrors fusedpg/objective (clipped_surrogate, cispo, sapo, kl_estimate), which is the reference the
tests hold this kernel to; gradients follow torch's conventions (clamp passes the gradient at its bounds, min splits
it evenly on ties) so the two agree to rounding.
"""
import triton
import triton.language as tl

from .logprob_entropy import _load_tempered, row_stats
from .softmax_tile import LOG2E, grad_tile

# SURROGATE codes
CLIP = tl.constexpr(0)
CISPO_TRL = tl.constexpr(1)
CISPO_VERL = tl.constexpr(2)
SAPO = tl.constexpr(3)
# KL codes
KL_NONE = tl.constexpr(0)
KL_K1 = tl.constexpr(1)
KL_ABS = tl.constexpr(2)
KL_K2 = tl.constexpr(3)
KL_K3 = tl.constexpr(4)


@triton.jit
def _min_grad(a, b, ga, gb):
    """Value and gradient of min(a, b), splitting the gradient on ties like torch."""
    val = tl.minimum(a, b)
    g = tl.where(a < b, ga, tl.where(b < a, gb, 0.5 * (ga + gb)))
    return val, g


@triton.jit
def pg_token_terms(lp, ent, old, ref, adv, w, wk, we, lo, hi,
                   ratio_clamp, delta, dual_c, beta, kl_clamp, ent_coef, tau_pos, tau_neg,
                   SURROGATE: tl.constexpr, GRAD_PRESERVING: tl.constexpr, KL: tl.constexpr,
                   KL_STRAIGHT: tl.constexpr, KL_BIAS: tl.constexpr = 0):
    """(loss_t, c_t, d_t) of one token: w * policy(lp) + beta * wk * KL(lp, ref) - ent_coef * we * H.

    KL_BIAS: 0 plain KL; 1 the bias-corrected KL ``r * KL`` (DeepSeek-V3.2) with ``r`` differentiated; 2 with ``r``
    detached.
    """
    lr = lp - old
    inside = (lr >= -ratio_clamp) & (lr <= ratio_clamp)
    r = tl.exp2(tl.minimum(tl.maximum(lr, -ratio_clamp), ratio_clamp) * LOG2E)
    dr = tl.where(inside, r, 0.0)  # d r / d lp
    if SURROGATE == CLIP:
        r1 = tl.minimum(r, delta)
        dr1 = tl.where(r <= delta, dr, 0.0)
        r2 = tl.minimum(tl.maximum(r, lo), hi)
        if GRAD_PRESERVING:
            unit = tl.where(inside, 1.0, 0.0)  # d/dlp of exp(log r - sg(log r))
            dr2 = tl.where(r < lo, lo * unit, tl.where(r > hi, hi * unit, dr))
        else:
            dr2 = tl.where((r >= lo) & (r <= hi), dr, 0.0)
        m, dm = _min_grad(r1 * adv, r2 * adv, dr1 * adv, dr2 * adv)
        pol, dpol = -m, -dm
        neg = adv < 0.0
        pd, dpd = _min_grad(pol, -adv * dual_c, dpol, 0.0 * dpol)
        pol = tl.where(neg, pd, pol)
        dpol = tl.where(neg, dpd, dpol)
    elif SURROGATE == SAPO:
        tau = tl.where(adv > 0.0, tau_pos, tau_neg)
        s = tl.sigmoid(tau * (r - 1.0))
        pol = -adv * s * 4.0 / tau
        dpol = -adv * 4.0 * s * (1.0 - s) * dr
    else:
        if SURROGATE == CISPO_TRL:
            wt = tl.minimum(r, hi)
        else:
            wt = tl.minimum(tl.maximum(r, lo), hi)
        pol = -wt * adv * lp
        dpol = -wt * adv
    loss = w * pol
    c = w * dpol
    if KL != KL_NONE:
        dk = lp - ref
        if KL == KL_K1:
            kl = dk
            gk = dk * 0.0 + 1.0
        elif KL == KL_ABS:
            kl = tl.abs(dk)
            gk = tl.where(dk > 0.0, 1.0, tl.where(dk < 0.0, -1.0, 0.0))
        elif KL == KL_K2:
            kl = 0.5 * dk * dk
            gk = dk
        else:
            nd = -dk
            nd_in = (nd >= -ratio_clamp) & (nd <= ratio_clamp)
            ndc = tl.minimum(tl.maximum(nd, -ratio_clamp), ratio_clamp)
            e = tl.exp2(ndc * LOG2E)
            kl = e - ndc - 1.0
            gk = tl.where(nd_in, 1.0 - e, 0.0)  # d/dlp of exp(-d) + d - 1
        gk = tl.where((kl >= -kl_clamp) & (kl <= kl_clamp), gk, 0.0)
        kl = tl.minimum(tl.maximum(kl, -kl_clamp), kl_clamp)
        if KL_STRAIGHT:
            gk = dk  # the straight-through forms take k2's gradient
        if KL_BIAS == 1:
            gk = gk * r + kl * dr
            kl = kl * r
        elif KL_BIAS == 2:
            gk = gk * r
            kl = kl * r
        loss += beta * wk * kl
        c += beta * wk * gk
    loss -= ent_coef * we * ent
    d = -ent_coef * we
    return loss, c, d


@triton.jit
def _pg_onepass_kernel(
    x_ptr, y_ptr, t_ptr, old_ptr, ref_ptr, adv_ptr, w_ptr, wk_ptr, we_ptr, lo_ptr, hi_ptr,
    logp_ptr, ent_ptr, loss_ptr,
    N, V, stride_n, stride_t, stride_lo, stride_hi,
    ratio_clamp, delta, dual_c, beta, kl_clamp, ent_coef, tau_pos, tau_neg,
    SURROGATE: tl.constexpr, GRAD_PRESERVING: tl.constexpr, KL: tl.constexpr, KL_STRAIGHT: tl.constexpr,
    KL_BIAS: tl.constexpr, HAS_D: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    y = tl.load(y_ptr + rows64, mask=row_mask, other=-1)
    temp = tl.load(t_ptr + rows64 * stride_t, mask=row_mask, other=1.0).to(tl.float32)
    lp, ent, m, log_s = row_stats(x_ptr, rows64, row_mask, y, temp, V, stride_n, True, BT, BV)
    old = tl.load(old_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32)
    wk = tl.load(wk_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32)
    we = tl.load(we_ptr + rows64, mask=row_mask, other=0.0).to(tl.float32)
    loss, c, d = pg_token_terms(
        lp, ent, old, ref, adv, w, wk, we,
        tl.load(lo_ptr + rows64 * stride_lo, mask=row_mask, other=0.0).to(tl.float32),
        tl.load(hi_ptr + rows64 * stride_hi, mask=row_mask, other=1.0).to(tl.float32),
        ratio_clamp, delta, dual_c, beta, kl_clamp, ent_coef, tau_pos, tau_neg,
        SURROGATE, GRAD_PRESERVING, KL, KL_STRAIGHT, KL_BIAS)
    tl.store(logp_ptr + rows64, lp, mask=row_mask)
    tl.store(ent_ptr + rows64, ent, mask=row_mask)
    tl.store(loss_ptr + rows64, loss, mask=row_mask)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        col_mask = cols < V
        cols64 = cols.to(tl.int64)
        z = _load_tempered(x_ptr, rows64, row_mask, cols64, col_mask, temp, stride_n)
        g = grad_tile(z, cols[None, :] == y[:, None], m, log_s, ent, c, d, temp, HAS_D)  # [BT, BV]
        tl.store(x_ptr + rows64[:, None] * stride_n + cols64[None, :], g.to(x_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _pg_seq_terms_kernel(
    lp_ptr, ent_ptr, lrs_ptr, old_ptr, ref_ptr, adv_ptr, w_ptr, wk_ptr, we_ptr, lo_ptr, hi_ptr,
    loss_ptr, cpol_ptr, cloc_ptr, d_ptr,
    N, stride_lo, stride_hi,
    ratio_clamp, delta, dual_c, beta, kl_clamp, ent_coef, tau_pos, tau_neg,
    SURROGATE: tl.constexpr, GRAD_PRESERVING: tl.constexpr, KL: tl.constexpr, KL_STRAIGHT: tl.constexpr,
    BT: tl.constexpr,
):
    """Per-token terms of a sequence-level ratio (GSPO family) once the chunk's statistics exist.

    The policy term is evaluated at the sequence log-ratio ``lrs`` (passed as lp' = old + lrs, so the shared
    pg_token_terms sees lr = lrs); its derivative w.r.t. that log-ratio goes to ``cpol`` for the launcher's
    segment sum. KL and entropy stay token-local (``cloc``, ``d``): a second call with zero policy weight.
    """
    rows = (tl.program_id(0) * BT + tl.arange(0, BT)).to(tl.int64)
    row_mask = rows < N
    lp = tl.load(lp_ptr + rows, mask=row_mask, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
    lrs = tl.load(lrs_ptr + rows, mask=row_mask, other=0.0)
    old = tl.load(old_ptr + rows, mask=row_mask, other=0.0)
    ref = tl.load(ref_ptr + rows, mask=row_mask, other=0.0)
    adv = tl.load(adv_ptr + rows, mask=row_mask, other=0.0)
    w = tl.load(w_ptr + rows, mask=row_mask, other=0.0)
    wk = tl.load(wk_ptr + rows, mask=row_mask, other=0.0)
    we = tl.load(we_ptr + rows, mask=row_mask, other=0.0)
    lo = tl.load(lo_ptr + rows * stride_lo, mask=row_mask, other=0.0)
    hi = tl.load(hi_ptr + rows * stride_hi, mask=row_mask, other=1.0)
    zero = w * 0.0
    loss_pol, cpol, _ = pg_token_terms(old + lrs, ent, old, ref, adv, w, zero, zero, lo, hi, ratio_clamp, delta,
                                       dual_c, beta, kl_clamp, 0.0, tau_pos, tau_neg,
                                       SURROGATE, GRAD_PRESERVING, KL_NONE, False)
    loss_loc, cloc, d = pg_token_terms(lp, ent, old, ref, adv, zero, wk, we, lo, hi, ratio_clamp, delta,
                                       dual_c, beta, kl_clamp, ent_coef, tau_pos, tau_neg,
                                       SURROGATE, GRAD_PRESERVING, KL, KL_STRAIGHT)
    tl.store(loss_ptr + rows, loss_pol + loss_loc, mask=row_mask)
    tl.store(cpol_ptr + rows, cpol, mask=row_mask)
    tl.store(cloc_ptr + rows, cloc, mask=row_mask)
    tl.store(d_ptr + rows, d, mask=row_mask)
