"""Batch-scoped selections of the two-phase variants (docs/losses.md: #top-entropy-mask, #bapo,
#clip-cov-and-kl-cov, #d3s).

Each takes the *detached* full-batch values (current ``logp``/``H``, or the old entropy for a one-pass
variant) and returns per-token quantities that make the loss token-local again. Populations are the valid
tokens of the local batch: cross-rank versions (TRL's global entropy quantile, BAPO's all-reduce) are the
trainer's job; nothing here communicates.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import aggregation
from .core import exp_clamped


def quantile_linear(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) by sorting, without its 2^24-element limit."""
    v, _ = torch.sort(values)
    pos = q * (v.numel() - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, v.numel() - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def top_k_mask(score: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest ``score`` among ``valid`` tokens (ties broken by ``torch.topk``)."""
    out = torch.zeros_like(valid)
    idx = torch.nonzero(valid).flatten()
    k = min(k, idx.numel())
    if k > 0:
        out[idx[torch.topk(score[idx], k).indices]] = True
    return out


def top_entropy(batch, entropy: torch.Tensor, cfg, threshold: Optional[torch.Tensor] = None) -> dict:
    """80/20 forking-token mask (docs/losses.md#top-entropy-mask). ``trl``: keep
    ``H >= quantile(H_valid, 1 - rho)`` (ties kept), mask the policy term and the entropy bonus, keep the full
    denominators. ``original``: keep the top ``ceil(rho N)`` tokens and use them as the aggregation mask of every
    term (selected-token denominator). ``threshold`` replaces the local quantile (e.g. TRL's quantile over all
    ranks, computed by the trainer)."""
    valid = batch.mask > 0
    rho = cfg.top_entropy_quantile
    if not bool(valid.any()):
        keep = torch.zeros_like(valid)
    elif cfg.top_entropy_mode == "trl":
        tau = threshold if threshold is not None else \
            quantile_linear(entropy[valid].to(torch.float64), 1.0 - rho).to(entropy.dtype)
        keep = (entropy * batch.mask >= tau) & valid
    else:
        keep = top_k_mask(entropy, valid, max(1, math.ceil(rho * int(valid.sum()))))
    em = keep.to(batch.dtype)
    out = {"entropy_mask": em}
    eff = batch.mask * em
    if cfg.top_entropy_mode == "original":
        width = batch.shape[1] if batch.shape else None
        w = aggregation.policy_weights(eff, batch.seq_local, batch.num_seqs, cfg, width=width, group=batch.group)
        out.update(weights=w, entropy_weights=aggregation.entropy_weights(eff, eff, w, cfg))
    else:
        out["entropy_weights"] = aggregation.entropy_weights(batch.mask, eff, batch.weights, cfg)
    return out


def covariance(batch, logp: torch.Tensor) -> torch.Tensor:
    """``(A - mean A)(logp - mean logp)`` with the means over valid tokens (Clip-Cov / KL-Cov)."""
    m = batch.mask
    n = m.sum().clamp(min=1.0)
    a = batch.advantages
    return (a - (a * m).sum() / n) * (logp - (logp * m).sum() / n)


def clip_cov_keep(batch, logp: torch.Tensor, cfg) -> dict:
    """Clip-Cov (docs/losses.md#clip-cov-and-kl-cov): among valid, not PPO-clipped tokens with ``lb < Cov < ub``,
    zero ``k`` picked uniformly at random (``cfg.seed`` seeds a private generator; None uses torch's global RNG)."""
    valid = batch.mask > 0
    a = batch.advantages
    r = exp_clamped(logp - batch.old_logp, cfg.log_ratio_clamp)
    clipped = (-a * r.clamp(1 - cfg.epsilon_low, 1 + cfg.epsilon_high) > -a * r) & valid
    cov = covariance(batch, logp)
    cand = torch.nonzero((cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub) & valid & ~clipped).flatten()
    k = max(int(cfg.clip_cov_ratio * int(valid.sum())), 1)
    keep = torch.ones_like(batch.mask)
    if cand.numel():
        gen = None if cfg.seed is None else torch.Generator().manual_seed(cfg.seed)
        perm = torch.randperm(cand.numel(), generator=gen).to(cand.device)
        keep[cand[perm[:k]]] = 0.0
    return {"keep": keep}


def kl_cov_select(batch, logp: torch.Tensor, cfg) -> dict:
    """KL-Cov (docs/losses.md#clip-cov-and-kl-cov): the top ``max(1, floor(ratio N))`` valid tokens by Cov get
    the ``kappa |lr|`` penalty."""
    valid = batch.mask > 0
    k = max(1, int(int(valid.sum()) * cfg.kl_cov_ratio))
    return {"kl_cov_sel": top_k_mask(covariance(batch, logp), valid, k).to(batch.dtype)}


def bapo_bounds(batch, logp: torch.Tensor, cfg) -> dict:
    """BAPO (docs/losses.md#bapo): raise ``c_low`` then ``c_high`` in steps until the positive contribution reaches
    the target.

    ``e_t = m A (A >= 0 ? min(r, c_high) : max(r, c_low))``, ``pos = sum max(e, 0)``, ``neg = sum max(-e, 0)``;
    target kind ``share``: ``pos / (pos + neg) >= target`` (paper, rho_0 = 0.5), ``ratio``: ``pos / neg >= target``
    (the example script). [unconfirmed] which the authors intend: both are exposed, ``share`` is the default.
    """
    m, a = batch.mask, batch.advantages
    r = exp_clamped(logp - batch.old_logp, cfg.log_ratio_clamp)

    def rho(c_low: float, c_high: float) -> float:
        e = m * a * torch.where(a >= 0, r.clamp(max=c_high), r.clamp(min=c_low))
        pos, neg = e.clamp(min=0).sum().item(), (-e).clamp(min=0).sum().item()
        return pos / (pos + neg + 1e-8) if cfg.bapo_target_kind == "share" else pos / (neg + 1e-8)

    (a_lo, b_lo), (a_hi, b_hi) = cfg.bapo_low_range, cfg.bapo_high_range
    k_lo = k_hi = 0
    c_low, c_high = a_lo, a_hi
    value = rho(c_low, c_high)
    while value < cfg.bapo_target and c_low < b_lo - 1e-12:
        k_lo += 1
        c_low = a_lo + k_lo * cfg.bapo_low_step
        value = rho(c_low, c_high)
    while value < cfg.bapo_target and c_high < b_hi - 1e-12:
        k_hi += 1
        c_high = a_hi + k_hi * cfg.bapo_high_step
        value = rho(c_low, c_high)
    full = torch.ones_like(m)
    scalar = lambda v: torch.tensor(v, dtype=m.dtype, device=m.device)  # noqa: E731
    return {"lo": full * c_low, "hi": full * c_high, "bapo_c_low": scalar(c_low), "bapo_c_high": scalar(c_high),
            "bapo_balance": scalar(value)}


def d3s_keep(batch, entropy: torch.Tensor, cfg) -> dict:
    """D³S token level [unconfirmed]: keep the top ``ceil(ratio N)`` valid tokens by ``|A| * H``."""
    valid = batch.mask > 0
    k = max(1, math.ceil(cfg.d3s_token_ratio * int(valid.sum())))
    return {"keep": top_k_mask(batch.advantages.abs() * entropy, valid, k).to(batch.dtype)}


def seq_entropy_shaped_advantage(a: torch.Tensor, mean_h: torch.Tensor, cfg) -> torch.Tensor:
    """GTPO (docs/losses.md#gtpo): ``A_hat = 0`` if the sequence's mean entropy exceeds the threshold, else
    ``A - coef * H``."""
    return torch.where(mean_h > cfg.gtpo_entropy_threshold, torch.zeros_like(a), a - cfg.gtpo_entropy_coef * mean_h)


def empg_advantage(batch, entropy: torch.Tensor, cfg, base: Optional[torch.Tensor] = None) -> dict:
    from ..advantages import empg_advantages

    a = batch.advantages if base is None else base
    return {"advantages": empg_advantages(a, entropy, batch.mask, batch.seq_local, batch.step, k=cfg.empg_k,
                                          k_future=cfg.empg_k_future, zeta=cfg.empg_zeta)}
