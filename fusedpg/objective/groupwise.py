"""Variants whose policy term couples the sequences of a group (docs/losses.md#drpo, #hpt): per-sequence rewards
and group ids read from the batch, DRPO's two-phase coefficients and HPT's per-part normalisation.

``advantages`` carries one reward per sequence for these variants and ``group_ids`` the groups (prompts). The
helpers here are shared with ``pairwise`` (CoPG, P3O). Everything runs on the full batch (``prepare`` or
``batch_coefficients``) and leaves per-token tensors in ``batch.extra``, so ``token_loss`` stays exact on any
slice of whole sequences.
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import aggregation
from .core import Segments, Surrogate, clipped_surrogate
from .registry import register


def segments(batch) -> Segments:
    return Segments(batch.seq_local, batch.num_seqs, batch.mask)


def _starts(batch) -> torch.Tensor:
    return torch.tensor(batch.offsets[:-1], dtype=torch.long, device=batch.mask.device)


def seq_rewards(batch, name: str) -> torch.Tensor:
    """The per-sequence rewards ``[S]`` that ``advantages`` carries for ``loss_type=name``."""
    if not batch.adv_per_seq:
        raise ValueError(f"advantages must hold one reward per sequence ([B], or [S] packed) for loss_type={name!r}, "
                         "got per-token advantages")
    return batch.advantages[_starts(batch)] if batch.num_tokens else batch.advantages.new_zeros(batch.num_seqs)


def require_groups(batch, name: str) -> None:
    if batch.group is None:
        raise ValueError(f"group_ids is required by loss_type={name!r} (one id per sequence: its prompt), got None")


def seq_groups(batch, name: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(index [S] in 0..Q-1, the distinct group ids [Q], sizes [Q])`` of the sequences' ``group_ids``."""
    require_groups(batch, name)
    ids = batch.group[_starts(batch)] if batch.num_tokens else batch.group.new_zeros(0)
    uniq, inv, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    return inv, uniq, counts


def group_softmax(x: torch.Tensor, g: torch.Tensor, num: int, sel: torch.Tensor) -> torch.Tensor:
    """Softmax of ``x`` over the selected members of each group (0 elsewhere)."""
    xm = torch.where(sel, x, torch.full_like(x, -torch.inf))
    top = torch.full((num,), -torch.inf, dtype=x.dtype, device=x.device).scatter_reduce(0, g, xm, "amax")
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.where(sel, torch.exp(torch.where(sel, x - top[g], torch.zeros_like(x))), torch.zeros_like(x))
    den = torch.zeros(num, dtype=x.dtype, device=x.device).index_add(0, g, e)
    return e / den[g].clamp(min=torch.finfo(x.dtype).tiny)


# ------------------------------------------------------------------------------------------------------- DRPO
def _drpo_prep(batch, cfg) -> dict:
    """Mask-only checks: binary per-sequence rewards, group ids, a length scale for the positive weights."""
    r = seq_rewards(batch, "drpo")
    require_groups(batch, "drpo")
    bad = (r != 0) & (r != 1)
    if bool(bad.any()):
        raise ValueError(f"advantages must hold binary rewards (0/1) for loss_type='drpo', got {r[bad][0].item()}")
    if batch.shape is None and cfg.max_completion_length is None:
        raise ValueError("max_completion_length is required by loss_type='drpo' with packed [N] input (the length "
                         "reward 1 - |o|/L needs L; padded input uses the width T), got None")
    return {}


def drpo_coefficients(batch, logp: torch.Tensor, cfg) -> dict:
    """DRPO (docs/losses.md#drpo) on the detached current log-probs of the full batch.

    Score ``s_i = mean_t logp`` of sequence i. In a group with positives (R = 1) and negatives (R = 0) a positive
    weighs ``softmax_{pos}((1 - |o_i|/L) / lambda)`` (the closed-form positive distribution, self-normalised over
    the group's positives) and a negative ``-softmax_{neg}(s_j / tau)`` (the gradient of ``tau log mean exp(s/tau)``);
    other groups weigh 0. The weights carry ``S/Q`` (non-empty sequences over groups) so that the default
    ``seq-mean-token-mean`` aggregation averages over the Q groups. ``kappa = beta max(kl - delta, 0)`` with ``kl``
    the batch token mean of ``old - logp`` (the trust-region penalty's detached coefficient).
    """
    if not batch.num_tokens:
        return {"drpo_coef": batch.mask.new_zeros(0), "drpo_kappa": batch.mask.new_zeros(())}
    seg = segments(batch)
    lens = seg.length
    r = seq_rewards(batch, "drpo")
    g, uniq, _ = seq_groups(batch, "drpo")
    q = uniq.numel()
    live = lens > 0
    pos, neg = (r == 1) & live, (r == 0) & live
    zq = torch.zeros(q, dtype=lens.dtype, device=lens.device)
    valid = (zq.index_add(0, g, pos.to(lens.dtype)) > 0) & (zq.index_add(0, g, neg.to(lens.dtype)) > 0)
    width = float(cfg.max_completion_length if cfg.max_completion_length is not None else batch.shape[1])
    score = seg.sum(batch.mask * logp) / lens.clamp(min=1.0)
    w_pos = group_softmax((1.0 - lens / width) / cfg.drpo_lambda, g, q, pos)
    p_neg = group_softmax(score / cfg.drpo_tau, g, q, neg)
    scale = live.sum().to(lens.dtype) / max(q, 1)
    a = torch.where(valid[g], w_pos - p_neg, torch.zeros_like(w_pos)) * scale
    n_tok = batch.mask.sum().clamp(min=1.0)
    kl = (batch.mask * (batch.old_logp - logp)).sum() / n_tok
    kappa = cfg.drpo_beta * (kl - cfg.drpo_delta).clamp(min=0.0)
    return {"drpo_coef": seg.bcast(a), "drpo_kappa": kappa}


@register("drpo", plan="two_phase", needs=("old_logp",), ratio=False, prep=_drpo_prep, coef=drpo_coefficients,
          defaults=dict(aggregation="seq-mean-token-mean"))
def drpo(ctx) -> Surrogate:
    """DRPO (Decoupled Reward Policy Optimization, arXiv 2510.04474; docs/losses.md#drpo): ``-a_i logp`` with the
    two-phase per-sequence weight ``a_i`` (positives: closed-form length weights normalised within the group's
    positives; negatives: minus the softmax of their scores), plus ``kappa (old - logp)``, the trust-region penalty
    with its detached coefficient. ``advantages`` holds binary rewards, ``group_ids`` the prompts."""
    e = ctx.batch.extra
    loss = -e["drpo_coef"] * ctx.lp + e["drpo_kappa"] * (ctx.old - ctx.lp)
    return Surrogate(loss, extra={"drpo_kappa_max": e["drpo_kappa"].reshape(1)})


# -------------------------------------------------------------------------------------------------------- HPT
def _hpt_prep(batch, cfg) -> dict:
    """HPT's demonstrations are the sequences flagged in ``truncated`` (docs/losses.md#hpt). Each part (RL
    rollouts, SFT demonstrations) is normalised by the aggregation on its own, as the code takes two token means."""
    d = batch.extra.get("truncated")
    if d is None:
        return {}
    m = batch.mask
    width = batch.shape[1] if batch.shape else None
    w = sum(aggregation.policy_weights(m * part, batch.seq_local, batch.num_seqs, cfg, width=width,
                                       group=batch.group) for part in (d, 1.0 - d))
    return {"weights": w, "hpt_demo": d}


@register("hpt", plan="one_pass", needs=("old_logp",), clipped=True, prep=_hpt_prep,
          defaults=dict(epsilon_low=0.2, epsilon_high=0.2, aggregation="token-mean"))
def hpt(ctx) -> Surrogate:
    """HPT (Hybrid Post-Training, arXiv 2509.04419; docs/losses.md#hpt): per sequence either the GRPO/PPO-clip term
    (rollouts) or ``-hpt_sft_coef * logp`` (demonstrations, flagged in ``truncated``; no ratio, no clip). Which
    prompts get a demonstration is decided upstream by ``fusedpg.advantages.hpt_gate``."""
    cfg = ctx.cfg
    demo = ctx.batch.extra.get("hpt_demo")
    off = None if demo is None else demo > 0
    if off is not None:
        ctx.on_policy(off)  # demonstrations: lr = 0, so no ratio or clip reaches them
    s = clipped_surrogate(ctx.ratio(), ctx.A, 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high, dual_c=cfg.dual_clip_c,
                          delta=cfg.delta)
    if off is None:
        return s
    loss = torch.where(off, -cfg.hpt_sft_coef * ctx.lp, s.loss)
    return s._replace(loss=loss, extra={"sft_token_sum": ctx.m * demo})
