"""Every policy-loss variant (docs/losses.md#variants), each written once as a function of per-token scalars.

A variant function takes a ``TokenContext`` (``ctx.lp``, ``ctx.lr``, ``ctx.A``, ``ctx.ratio()``, ``ctx.seg`` for
sequence reductions, ``ctx.batch`` for precomputed per-token quantities, ``ctx.cfg``) and returns a
``Surrogate``: the per-token policy loss ``l_t`` (sequence-level values broadcast over their tokens) and the
metric indicators. Aggregation, rollout IS, OPSM, the entropy mask, KL and the entropy bonus are composed by
``token_loss`` (docs/losses.md#composition-order), never here. Recipes that share a surrogate are registered on the
same function. Per-variant derivations of ``c_t``/``d_t``: README.md in this folder.
"""
from __future__ import annotations

import math

import torch

from . import selection
from .core import Surrogate, clipped_surrogate, exp_clamped
from .registry import EpilogueSpec, register

_CLIP = EpilogueSpec("clip", sequence_ratio=True)

_OLD = ("old_logp",)


def _bounds(cfg):
    return 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high


# ----------------------------------------------------------------------------------- PPO-clip family (token)
def _binary_rewards(mode):
    """PSR / NSR / W-REINFORCE (docs/losses.md#psr-nsr-and-w-reinforce): ``advantages`` holds binary rewards
    R in {0, 1}, mapped once here."""

    def prep(batch, cfg):
        from ..advantages import psr_nsr_advantages

        r = batch.advantages
        valid = batch.mask > 0
        if bool(((r != 0) & (r != 1) & valid).any()):
            bad = r[(r != 0) & (r != 1) & valid][0].item()
            raise ValueError(f"advantages must hold binary rewards (0/1) for loss_type={mode!r}, got {bad}")
        return {"advantages": psr_nsr_advantages(r, mode, positive_weight=cfg.w_reinforce_lambda)}

    return prep


def _dcpo_bounds(batch, cfg):
    """DCPO (docs/losses.md#dcpo): per-token bounds from the old probability q: ``|(r - 1) r q| <= eps``, hi capped
    at max(c, 10)."""
    q = torch.exp(batch.old_logp)
    lo = 0.5 + 0.5 * torch.sqrt((1.0 - 4.0 * cfg.epsilon_low / q).clamp(min=0.0))
    cap = max(cfg.dual_clip_c, 10.0)
    hi = torch.where(q > 0, 0.5 + 0.5 * torch.sqrt(1.0 + 4.0 * cfg.epsilon_high / q.clamp(min=1e-38)),
                     torch.full_like(q, math.inf)).clamp(max=cap)
    return {"lo": lo, "hi": hi}


def _entropy_hook(fn):
    """Adapter: run an entropy-shaped precompute on ``old_entropy`` in ``prepare`` when shaping_entropy='old'."""

    def prep(batch, cfg):
        if cfg.shaping_entropy != "old":
            return {}
        return dict(fn(batch, batch.old_entropy, cfg), advantages_base=batch.advantages)

    return prep


def _empg(batch, entropy, cfg):
    base = batch.extra.get("advantages_base", batch.advantages)
    return dict(selection.empg_advantage(batch, entropy, cfg, base=base), advantages_base=base)


def _clip(name, plan="one_pass", epilogue=_CLIP, **kw):
    """``register`` for a PPO-clip recipe: old log-probs, ``delta`` applies, the clip epilogue unless given."""
    return register(name, epilogue=epilogue, plan=plan, needs=_OLD, clipped=True, **kw)


_PPO = dict(epsilon_low=0.2, epsilon_high=0.2)
_GSPO = dict(epsilon_low=3e-4, epsilon_high=4e-4)


@_clip("ppo", defaults=dict(_PPO, dual_clip_c=3.0))
@_clip("grpo", defaults=dict(_PPO, aggregation="grpo"))
@_clip("dr_grpo", defaults=dict(_PPO, aggregation="dr_grpo"))
@_clip("dapo", defaults=dict(epsilon_high=0.28, aggregation="dapo"))
@_clip("bnpo", defaults=dict(_PPO, aggregation="bnpo"))
@_clip("bnpo_adv", defaults=dict(epsilon_high=0.28, dual_clip_c=10.0, aggregation="seq-mean-token-sum"))
@_clip("ngrpo", defaults=dict(epsilon_low=0.16, epsilon_high=0.24))
@_clip("aepo", defaults=_PPO)
@_clip("psr", defaults=_PPO, prep=_binary_rewards("psr"))
@_clip("nsr", defaults=_PPO, prep=_binary_rewards("nsr"))
@_clip("w_reinforce", defaults=_PPO, prep=_binary_rewards("w_reinforce"))
@_clip("top_entropy", plan="two_phase", defaults=dict(epsilon_high=0.28, aggregation="dapo", top_entropy_quantile=0.2))
@_clip("gspo", plan="sequence", defaults=dict(_GSPO, importance_sampling_level="sequence", aggregation="grpo"))
@_clip("gspo_token", plan="sequence",
       defaults=dict(_GSPO, importance_sampling_level="sequence_token", aggregation="seq-mean-token-mean"))
@_clip("luspo", plan="sequence", defaults=dict(_GSPO, importance_sampling_level="sequence", aggregation="luspo"))
@_clip("empg", plan="two_phase", defaults=_PPO, entropy_shaped=True, prep=_entropy_hook(_empg), coef=_empg)
def clipped(ctx) -> Surrogate:
    """PPO clip ``max(-A r, -A clip(r, 1-eps_l, 1+eps_h))`` with optional dual clip and ``delta``; ``r`` at
    ``importance_sampling_level`` (GSPO: the sequence ratio). One function, many recipes (docs/losses.md#variants:
    PPO, GRPO, Dr.GRPO, DAPO, BNPO, GSPO, NGRPO, PSR/NSR/W-REINFORCE, EMPG, the 80/20 mask, AEPO, LUSPO, delta).
    EMPG shapes ``A`` beforehand (precomputed from ``old_entropy``, or two-phase from the current entropy); its
    step-entropy details are [unconfirmed] upstream, see ``advantages.empg_advantages``.
    LUSPO: the masked sequence form; TRL's unmasked B*T mean only with ``luspo_unmasked`` (parity)."""
    lo, hi = _bounds(ctx.cfg)
    return clipped_surrogate(ctx.ratio(), ctx.A, lo, hi, dual_c=ctx.cfg.dual_clip_c, delta=ctx.cfg.delta)


@_clip("gppo", epilogue=EpilogueSpec("clip", gradient_preserving=True, sequence_ratio=True),
       defaults=dict(epsilon_high=0.28, dual_clip_c=10.0))
def gppo(ctx) -> Surrogate:
    """GPPO (docs/losses.md#gppo): the clip keeps the gradient ``-A * bound`` outside the range instead of zeroing
    it."""
    lo, hi = _bounds(ctx.cfg)
    return clipped_surrogate(ctx.ratio(), ctx.A, lo, hi, dual_c=ctx.cfg.dual_clip_c, delta=ctx.cfg.delta,
                             gradient_preserving=True)


@_clip("dcpo", epilogue=EpilogueSpec("clip", bounds="token"), prep=_dcpo_bounds,
       defaults=dict(epsilon_high=0.28, dual_clip_c=10.0, aggregation="group-token-mean"))
@_clip("bapo", epilogue=None, plan="two_phase", coef=selection.bapo_bounds, defaults=dict(dual_clip_c=3.0))
def clipped_absolute(ctx) -> Surrogate:
    """PPO clip with absolute per-token bounds from ``batch.extra['lo'/'hi']``: DCPO (from the old probability,
    precomputed) and BAPO (searched on the current batch, two-phase)."""
    e = ctx.batch.extra
    return clipped_surrogate(ctx.ratio(), ctx.A, e["lo"], e["hi"], dual_c=ctx.cfg.dual_clip_c, delta=ctx.cfg.delta)


@_clip("clip_cov", epilogue=None, plan="two_phase", coef=selection.clip_cov_keep, defaults=_PPO)
@_clip("d3s", epilogue=None, plan="two_phase", defaults=dict(_PPO, aggregation="grpo"), entropy_shaped=True,
       prep=_entropy_hook(selection.d3s_keep), coef=selection.d3s_keep)
def clipped_selected(ctx) -> Surrogate:
    """PPO clip times a token selection ``keep`` (Clip-Cov: random high-covariance tokens zeroed but kept in the
    denominator; D³S: top-|A|·H tokens kept). D³S is [unconfirmed] upstream (no code): ratio 0.2 of the local
    batch's valid tokens, current entropy by default, the mask keeps the denominator
    (fusedpg/objective/README.md#decisions; docs/losses.md#d3s)."""
    lo, hi = _bounds(ctx.cfg)
    s = clipped_surrogate(ctx.ratio(), ctx.A, lo, hi, dual_c=ctx.cfg.dual_clip_c, delta=ctx.cfg.delta)
    keep = ctx.batch.extra["keep"]
    return s._replace(loss=s.loss * keep, extra={"selected_sum": ctx.m * (1 - keep)})


# ------------------------------------------------------------------------------------- other token variants
@register("cispo", epilogue=EpilogueSpec("cispo"), plan="one_pass", needs=_OLD, defaults=lambda cfg: dict(
    epsilon_low=0.2, epsilon_high=5.0, aggregation="dapo") if cfg.cispo_mode == "trl" else dict(
    epsilon_low=10.0, epsilon_high=0.2, aggregation="dapo"))
def cispo(ctx) -> Surrogate:
    """CISPO (docs/losses.md#cispo): ``-sg(w) A logp``; TRL: ``w = min(r, eps_high)`` (absolute cap), verl:
    ``clip(r)``."""
    r, a, cfg = ctx.ratio(), ctx.A, ctx.cfg
    if cfg.cispo_mode == "trl":
        w = r.clamp(max=cfg.epsilon_high)
        low, high = torch.zeros_like(a, dtype=torch.bool), (r > cfg.epsilon_high) & (a > 0)
    else:
        lo, hi = _bounds(cfg)
        w = r.clamp(lo, hi)
        low, high = (r < lo) & (a < 0), (r > hi) & (a > 0)
    return Surrogate(-w.detach() * a * ctx.lp, r.detach(), low.detach(), high.detach())


@register("topr", plan="one_pass", needs=_OLD, defaults=dict(aggregation="dapo"))
def topr(ctx) -> Surrogate:
    """TOPR (Tapered Off-Policy REINFORCE, Le Roux et al. 2025, arXiv 2503.14286): REINFORCE without importance
    weight where ``A >= 0``, and with the truncated weight ``sg(min(r, 1))`` where ``A < 0``: ``-w A logp``. The
    paper's ratio is the trajectory's; ``importance_sampling_level="sequence"`` gives that, the default is per token."""
    r, a = ctx.ratio(), ctx.A
    w = torch.where(a >= 0, torch.ones_like(r), r.clamp(max=1.0))
    none = torch.zeros_like(a, dtype=torch.bool)
    return Surrogate(-w.detach() * a * ctx.lp, r.detach(), none, (r > 1.0).detach() & (a < 0))


@register("sapo", epilogue=EpilogueSpec("sapo"), plan="one_pass", needs=_OLD, defaults=dict(aggregation="grpo"))
def sapo(ctx) -> Surrogate:
    """SAPO (docs/losses.md#sapo): soft gate ``-A (4/tau) sigmoid(tau (r - 1))``, tau by the sign of A. No clipping."""
    r, a, cfg = ctx.ratio(), ctx.A, ctx.cfg
    tau = torch.where(a > 0, torch.full_like(a, cfg.sapo_tau_pos), torch.full_like(a, cfg.sapo_tau_neg))
    none = torch.zeros_like(a, dtype=torch.bool)
    return Surrogate(-a * torch.sigmoid(tau * (r - 1.0)) * 4.0 / tau, r.detach(), none, none)


@register("kl_cov", plan="two_phase", needs=_OLD, coef=selection.kl_cov_select)
def kl_cov(ctx) -> Surrogate:
    """KL-Cov (docs/losses.md#clip-cov-and-kl-cov): unclipped ``-A r``, plus ``kappa |lr|`` on the selected
    high-covariance tokens."""
    r, sel = ctx.ratio(), ctx.batch.extra["kl_cov_sel"]
    loss = -ctx.A * r + ctx.cfg.kl_cov_coef * ctx.lr.abs() * sel
    return Surrogate(loss, r.detach(), extra={"selected_sum": ctx.m * sel})


@register("gpg", plan="one_pass", ratio=False)
def gpg(ctx) -> Surrogate:
    """GPG (docs/losses.md#gpg): ``-A logp``; no ratio, no clip."""
    return Surrogate(-ctx.A * ctx.lp)


@register("alol_token", plan="one_pass", ratio=False, defaults=dict(epsilon_low=0.9, epsilon_high=0.9,
                                                                 aggregation="seq-mean-token-sum"))
def alol_token(ctx) -> Surrogate:
    """A-LoL token ratio (docs/losses.md#a-lol, "A-LoL seq" upstream): ``-A sg(clip(exp(logp - ref))) logp`` per
    token."""
    lo, hi = _bounds(ctx.cfg)
    rho = torch.ones_like(ctx.lp) if ctx.cfg.alol_ratio == "none" else \
        exp_clamped(ctx.lp.detach() - ctx.ref, ctx.cfg.log_ratio_clamp).clamp(lo, hi)
    return Surrogate(-ctx.A * rho * ctx.lp, rho)


# ---------------------------------------------------------------------------------- sequence-scoped variants
@register("alol", plan="sequence", ratio=False, defaults=dict(epsilon_low=0.9, epsilon_high=0.9,
                                                              aggregation="seq-mean-token-sum"))
def alol(ctx) -> Surrogate:
    """A-LoL (docs/losses.md#a-lol): sequence ratio ``clip(exp(sum_t m (logp - ref)))`` detached, times ``-A logp``."""
    lo, hi = _bounds(ctx.cfg)
    if ctx.cfg.alol_ratio == "none":
        rho = torch.ones_like(ctx.lp)
    else:
        s = ctx.seg.bcast(ctx.seg.sum(ctx.m * (ctx.lp.detach() - ctx.ref)))
        rho = exp_clamped(s, ctx.cfg.log_ratio_clamp).clamp(lo, hi)
    return Surrogate(-ctx.A * rho * ctx.lp, rho)


def _geo_mean_is(batch, cfg):
    """verl applies rollout IS to GMPO as the per-sequence geometric mean of the token weights."""
    if batch.is_weights is None:
        return {}
    from .core import Segments

    seg = Segments(batch.seq_local, batch.num_seqs, batch.mask)
    return {"is_weights": seg.bcast(torch.exp(seg.masked_mean(torch.log(batch.is_weights + 1e-10))))}


@register("geo_mean", epilogue=EpilogueSpec("clip", geo_mean=True), plan="sequence", needs=_OLD, prep=_geo_mean_is,
          defaults=dict(epsilon_low=0.4, epsilon_high=0.4, aggregation="grpo"))
def geo_mean(ctx) -> Surrogate:
    """GMPO (docs/losses.md#gmpo): per-token clip of ``lr`` in log space on the binding side,
    ``rho_i = exp(mean_t lr')``, ``l_i = -mean_t(A) rho_i``. Bounds are log-space: ``[-eps_low, eps_high]``."""
    cfg, lr, a, seg = ctx.cfg, ctx.lr, ctx.A, ctx.seg
    sgn = torch.sign(a)
    lr_c = sgn * torch.min(sgn * lr, sgn * lr.clamp(-cfg.epsilon_low, cfg.epsilon_high))
    rho = seg.bcast(exp_clamped(seg.masked_mean(lr_c), cfg.log_ratio_clamp))
    a_bar = seg.bcast(seg.masked_mean(a))
    low = (lr < -cfg.epsilon_low) & (a < 0)
    high = (lr > cfg.epsilon_high) & (a > 0)
    return Surrogate(-a_bar * rho, rho.detach(), low.detach(), high.detach())


@register("vespo", plan="sequence", needs=_OLD, defaults=dict(aggregation="dapo"))
def vespo(ctx) -> Surrogate:
    """VESPO (docs/losses.md#vespo): detached gamma weight ``phi(w_i)`` of the summed sequence log-ratio (rollout IS
    folded in), ``l = -phi A logp``. Its own clamps (±20, log 1e-8) replace ``log_ratio_clamp``."""
    cfg, seg, a = ctx.cfg, ctx.seg, ctx.A
    floor = math.log(1e-8)
    s = seg.sum(ctx.m * ctx.lr.detach().clamp(-20.0, 20.0))
    isw = ctx.batch.is_weights
    if isw is not None:
        s = s + seg.sum(ctx.m * torch.log(isw).clamp(floor, 20.0))
    log_w = seg.bcast(s.clamp(floor, 20.0))
    pos = a >= 0
    k = torch.where(pos, torch.full_like(a, cfg.vespo_k_pos), torch.full_like(a, cfg.vespo_k_neg))
    lam = torch.where(pos, torch.full_like(a, cfg.vespo_lambda_pos), torch.full_like(a, cfg.vespo_lambda_neg))
    lam = lam.clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    if ctx.batch.adv_per_seq:  # TRL logs phi over sequences (all rows), or over tokens for per-token A
        extra = {"vespo_phi_sum": seg.amax(phi), "vespo_phi_count": float(seg.num)}
    else:
        extra = {"vespo_phi_sum": ctx.m * phi, "vespo_phi_count": ctx.m}
    return Surrogate(-phi * a * ctx.lp, torch.exp(log_w), extra=extra)


def _gtpo_old(batch, cfg):
    from .core import Segments

    seg = Segments(batch.seq_local, batch.num_seqs, batch.mask)
    return {"advantages": selection.seq_entropy_shaped_advantage(
        batch.advantages, seg.bcast(seg.masked_mean(batch.old_entropy)), cfg)}


@register("gtpo", plan="sequence", ratio=False, entropy_shaped=True, defaults=dict(aggregation="grpo"),
          prep=lambda batch, cfg: _gtpo_old(batch, cfg) if cfg.shaping_entropy == "old" else {})
def gtpo(ctx) -> Surrogate:
    """GTPO (docs/losses.md#gtpo): REINFORCE with ratio ``exp(logp - sg(logp))`` (value 1) and ``A_hat`` shaped by the
    sequence's mean entropy; conflict weights ``delta/n_conf`` come in as ``token_weights``
    (``fusedpg.objective.gtpo_token_weights``)."""
    a = ctx.A
    if ctx.cfg.shaping_entropy == "current":
        a = selection.seq_entropy_shaped_advantage(a, ctx.seg.bcast(ctx.seg.masked_mean(ctx.H.detach())), ctx.cfg)
    return Surrogate(-a * torch.exp(ctx.lp - ctx.lp.detach()))
