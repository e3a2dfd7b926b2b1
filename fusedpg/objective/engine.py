"""``token_loss``, ``batch_coefficients`` and ``pg_loss``: the per-token loss layer and its engine contract.

Contract (README.md): ``loss = sum_t token_loss(batch, logp, H, cfg)[0]``, and for any slice of whole sequences
``token_loss(batch.slice(lo, hi), logp[lo:hi], H[lo:hi], cfg)`` is exactly that slice's share, elementwise
differentiable in ``logp`` and ``H``: ``c_t = d(sum)/d logp_t``, ``d_t = d(sum)/d H_t``. For
``plan_of(cfg) == "two_phase"`` the batch must first be completed with
``batch.updated(batch_coefficients(batch, logp.detach(), H.detach(), cfg))`` on the full batch.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .. import checks
from .batch import PGBatch, prepare
from .config import PGLossConfig, make_config, plan_of, requirements, resolve
from .core import TokenContext, exp_clamped, kl_estimate
from .inputs import LossInputs
from .metrics import MetricSums, finalize_metrics
from .registry import EpilogueSpec
from . import selection
from .validate import check_finite as check_finite_inputs

_READY = "phase2_ready"


def _check_current(batch: PGBatch, logp: torch.Tensor, entropy: Optional[torch.Tensor], cfg: PGLossConfig) -> None:
    """The current ``logp`` / ``entropy`` are ``[n]`` floats of the batch slice; entropy where the config needs it."""
    for name, t in (("logp", logp), ("entropy", entropy)):
        if t is not None:
            checks.floating(name, t)
            if tuple(t.shape) != (batch.num_tokens,):
                raise ValueError(f"{name} must be [n] = ({batch.num_tokens},) to match the batch slice, got "
                                 f"{checks._describe(t)}")
    if "entropy" in requirements(cfg) and entropy is None:
        raise ValueError(f"entropy is required by loss_type={cfg.loss_type!r} with these options, got None")


def batch_coefficients(batch: PGBatch, logp: torch.Tensor, entropy: Optional[torch.Tensor],
                       cfg: PGLossConfig, *, entropy_threshold: Optional[torch.Tensor] = None
                       ) -> Dict[str, torch.Tensor]:
    """Phase-1 hook of two-phase plans: from the full batch's detached current ``logp``/``entropy`` ``[N]``,
    the per-token quantities (selection masks, bounds, shaped advantages, re-normalised weights) that make the
    loss token-local again. Merge them with ``batch.updated(...)``. For other plans it only marks the batch.
    ``entropy_threshold`` overrides the local entropy quantile of ``top_entropy_mode="trl"`` (TRL takes it over
    all ranks: the trainer may gather and pass it; nothing here communicates)."""
    cfg = resolve(cfg)
    var = cfg.variant
    _check_current(batch, logp, entropy, cfg)
    lp = torch.where(batch.active, logp.detach().to(batch.dtype), torch.zeros((), dtype=batch.dtype))
    h = None if entropy is None else torch.where(batch.active, entropy.detach().to(batch.dtype),
                                                 torch.zeros((), dtype=batch.dtype))
    out: Dict[str, torch.Tensor] = {}
    if var.coef is not None and not (var.entropy_shaped and cfg.shaping_entropy == "old"):
        out.update(var.coef(batch, h if var.entropy_shaped else lp, cfg))
    if cfg.top_entropy_quantile < 1.0:
        out.update(selection.top_entropy(batch, h, cfg, entropy_threshold))
    out[_READY] = torch.ones((), dtype=batch.dtype)
    return out


def epilogue_spec(cfg: PGLossConfig, batch: PGBatch) -> Optional[EpilogueSpec]:
    """The allow-list of the fused Triton epilogue: its spec when the epilogue computes exactly what
    ``token_loss`` below composes for this config and batch, else ``None`` (the generic path, which runs
    ``token_loss`` itself). The epilogue implements: the variant's surrogate (its ``EpilogueSpec``) at the levels
    the spec allows, ``token_weights``, the rollout IS weight, the aggregation weights, KL with every estimator
    (bias-corrected at token level), and the entropy bonus. A term of ``token_loss`` not listed here must route
    to the generic path: add its condition below when you add the term."""
    cfg = resolve(cfg)
    spec = cfg.variant.epilogue
    if spec is None or plan_of(cfg) == "two_phase":
        return None
    level = cfg.importance_sampling_level
    if level != "token" and not spec.sequence_ratio:
        return None
    if cfg.kl_bias_correction and (level != "token" or spec.geo_mean):
        return None
    if cfg.off_policy_mask_threshold is not None or "entropy_mask" in batch.extra:  # OPSM, top-entropy mask
        return None
    if spec.bounds == "token" and "lo" not in batch.extra:
        return None
    return spec


def token_loss(batch: PGBatch, logp: torch.Tensor, entropy: Optional[torch.Tensor],
               cfg: PGLossConfig) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Per-token contributions ``[n]`` (summing to this slice's share of the loss) and mergeable metric sums.

    Composition (docs/losses.md#composition-order, TRL order): ``l_t`` of the variant, times ``token_weights``, the OPSM sequence
    mask, the top-entropy mask and the rollout IS weight (VESPO folds IS itself); ``w_t (l_t + beta KL_t)``;
    minus ``entropy_coef * w^H_t H_t``.
    """
    cfg = resolve(cfg)
    var = cfg.variant
    _check_current(batch, logp, entropy, cfg)
    if plan_of(cfg) == "two_phase" and _READY not in batch.extra:
        raise ValueError(f"loss_type={cfg.loss_type!r} with these options is two-phase: merge "
                         "batch_coefficients(batch, logp, entropy, cfg) into the batch first (batch.updated)")
    dt = batch.dtype
    ctx = TokenContext(batch, logp.to(dt), None if entropy is None else entropy.to(dt), cfg)
    sur = var.fn(ctx)
    ms = MetricSums(dt, logp.device)
    pol = sur.loss
    if batch.token_weights is not None:
        pol = pol * batch.token_weights
    if cfg.off_policy_mask_threshold is not None:
        q = batch.rollout_logp if batch.rollout_logp is not None else batch.old_logp
        d = ctx.seg.masked_mean(q - ctx.lp.detach())
        keep = (ctx.A >= 0) | ctx.seg.bcast(d <= cfg.off_policy_mask_threshold)
        pol = pol * keep.to(dt)
        if batch.adv_per_seq:
            ms.add("opsm_kept_sum", ctx.seg.amax(keep.to(dt)))
            ms.add("opsm_kept_count", float(ctx.seg.num))
        else:
            ms.add("opsm_kept_sum", keep.to(dt) * ctx.m)
            ms.add("opsm_kept_count", ctx.m)  # the same keys whatever the advantages' shape
    em = batch.extra.get("entropy_mask")
    if em is not None:
        pol = pol * em
        ms.add("entropy_mask_sum", em * ctx.m)
    if batch.is_weights is not None and cfg.loss_type != "vespo":
        pol = pol * batch.is_weights
    w = batch.weights
    contrib = w * pol
    ms.add("loss_policy", contrib)
    kl = None
    if batch.ref_logp is not None:
        kl = kl_estimate(ctx.lp, batch.ref_logp, cfg.kl_estimator, cfg.log_ratio_clamp, cfg.kl_value_clamp)
        if cfg.kl_bias_correction:
            coef = exp_clamped(ctx.log_ratio(cfg.importance_sampling_level), cfg.log_ratio_clamp)
            kl = kl * (coef.detach() if cfg.kl_bias_correction_detach else coef)
        if cfg.beta != 0.0:
            term = cfg.beta * w * kl
            contrib = contrib + term
            ms.add("loss_kl", term)
    if cfg.entropy_coef != 0.0:
        term = -cfg.entropy_coef * batch.entropy_weights * ctx.H
        contrib = contrib + term
        ms.add("loss_entropy", term)
    _metrics(ms, ctx, sur, kl, cfg)
    return contrib, ms.d


def _metrics(ms: MetricSums, ctx: TokenContext, sur, kl, cfg) -> None:
    m, seg, batch = ctx.m, ctx.seg, ctx.batch
    ms.add("tokens", m)
    ms.add("seqs", float(seg.num))
    if ctx.H is not None:
        ms.add("entropy_sum", m * ctx.H)
    if batch.old_logp is not None:
        ms.add("ppo_kl_sum", m * (batch.old_logp - ctx.lp))
    if kl is not None:
        ms.add("kl_sum", m * kl)
    valid = m > 0
    if batch.rollout_logp is not None:  # the sampler/trainer mismatch on the loss tokens, as verl and TRL log it
        gap = ctx.lp.detach() - batch.rollout_logp
        ms.add("rollout_abs_diff_sum", m * gap.abs())
        ms.max("rollout_abs_diff_max", gap.abs(), valid)
        ms.add("rollout_kl_sum", m * (torch.expm1(gap) - gap))  # k3 of KL(sampler || trainer), sampler's tokens
    if batch.is_weights is not None:
        ms.add("is_weight_sum", m * batch.is_weights)
        ms.min("is_weight_min", batch.is_weights, valid)
        ms.max("is_weight_max", batch.is_weights, valid)
    seq_level = cfg.importance_sampling_level == "sequence" and batch.adv_per_seq and cfg.variant.ratio
    if sur.ratio is not None:
        if seq_level:
            r, where, count = seg.amax(sur.ratio), None, float(seg.num)
        else:
            r, where, count = sur.ratio, valid, m
        ms.add("ratio_sum", r if where is None else m * r)
        ms.add("ratio_count", count)
        ms.min("ratio_min", r, where)
        ms.max("ratio_max", r, where)
    if sur.low is not None:
        low, high = sur.low.to(m.dtype), sur.high.to(m.dtype)
        region = torch.clamp(low + high, max=1.0)
        if seq_level:
            low_s, high_s, region_s = seg.amax(low), seg.amax(high), seg.amax(region)
            ms.add("clip_count", float(seg.num))
            per_low, per_high, where = low_s, high_s, None
        else:
            low_s, high_s, region_s = m * low, m * high, m * region
            ms.add("clip_count", m)
            per_low, per_high, where = seg.masked_mean(low), seg.masked_mean(high), seg.length > 0
        ms.add("clip_low_sum", low_s)
        ms.add("clip_high_sum", high_s)
        ms.add("clip_region_sum", region_s)
        ms.min("clip_low_seq_min", per_low, where)
        ms.max("clip_high_seq_max", per_high, where)
    if sur.dual is not None:
        ms.add("dual_clip_sum", m * sur.dual.to(m.dtype))
    for k, v in (sur.extra or {}).items():
        if k.endswith("_min"):
            ms.min(k, v)
        elif k.endswith("_max"):
            ms.max(k, v)
        else:
            ms.add(k, v)
    for k in ("bapo_c_low", "bapo_c_high", "bapo_balance"):
        if k in batch.extra:
            ms.max(k + "_max", batch.extra[k].reshape(1))


def pg_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    entropy: Optional[torch.Tensor] = None,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    rollout_logp: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
    old_entropy: Optional[torch.Tensor] = None,
    seq_ids: Optional[torch.Tensor] = None,
    group_ids: Optional[torch.Tensor] = None,
    step_ids: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    truncated: Optional[torch.Tensor] = None,
    loss_type: Optional[str] = None,
    config: Optional[PGLossConfig] = None,
    check_finite: Optional[bool] = None,
    **options,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Policy-gradient loss from per-token log-probs, for trainers that already have them (verl, OpenRLHF).

    Args:
        logp: current log-probs ``[B, T]`` (or packed ``[N]`` with ``seq_ids``), differentiable.
        advantages: ``[B]`` per sequence or ``[B, T]`` per token (packed: ``[S]`` or ``[N]``).
        mask: binary loss mask of ``logp``'s shape (completion x tool x truncation).
        entropy: current entropy, differentiable (needed by the entropy bonus, the top-entropy mask, GTPO/D³S/EMPG
            with the current entropy; otherwise only a metric).
        old_logp / ref_logp / rollout_logp: old-policy, reference and inference-engine log-probs (no gradient).
        is_weights: precomputed rollout IS weights ``[B]`` or ``[B, T]`` (instead of ``rollout_is``).
        old_entropy, seq_ids, group_ids, step_ids, token_weights, truncated: see ``prepare``.
        loss_type: a registered variant (default ``"dapo"``, or the config's). ``config`` plus keyword options
            build the ``PGLossConfig``; keywords override the config.
        check_finite: raise on NaN/inf in any float input on an unmasked token (or a per-sequence value of a
            sequence with one), naming the tensor and index; default off unless ``FUSEDPG_CHECK_FINITE=1``.

    Returns:
        ``(loss, metrics)``: the scalar loss to backpropagate on this rank for this micro-step, and a dict of
        0-dim tensors: means (``clip_low``, ``ppo_kl``, ``kl``, ``entropy``, ``ratio_mean`` ...) plus the raw
        mergeable sums/counts (``*_sum``, ``tokens``, ``clip_count`` ...). See ``fusedpg.objective.metrics``.
    """
    cfg = make_config(config, loss_type, **options)
    checks.tensor("mask", mask)
    for name, t in (("logp", logp), ("entropy", entropy)):
        if t is not None:
            checks.floating(name, t)
            checks.same_device(name, t, "mask", mask)
            if tuple(t.shape) != tuple(mask.shape):
                raise ValueError(f"{name} must have the shape of mask {tuple(mask.shape)}, got {checks._describe(t)}")
    work = torch.float64 if logp.dtype == torch.float64 else None
    inputs = LossInputs(old_logp, ref_logp, rollout_logp, is_weights, old_entropy, seq_ids, group_ids, step_ids,
                        token_weights, truncated)
    if checks.finite_enabled(check_finite):
        check_finite_inputs(mask, logp=logp, entropy=entropy, advantages=advantages, **inputs.floats())
    batch = prepare(advantages, mask, inputs, dtype=work, config=cfg)
    lp = logp.reshape(-1)
    h = None if entropy is None else entropy.reshape(-1)
    if plan_of(cfg) == "two_phase":
        batch = batch.updated(batch_coefficients(batch, lp.detach(), None if h is None else h.detach(), cfg))
    contrib, sums = token_loss(batch, lp, h, cfg)
    return contrib.sum(), finalize_metrics(sums)
