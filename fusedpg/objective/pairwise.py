"""Pairwise sequence-level variants (docs/losses.md#copg, #p3o): a group of exactly two sequences is a pair.

``group_ids`` defines the pairs (one id per sequence; each id must occur exactly twice) and ``advantages`` carries
one reward per sequence. ``fusedpg.advantages.make_pairs`` builds such a batch from a group's rewards (the row
order to gather and the ``group_ids`` to pass).

Dependency classes: P3O's pair enters only through the reward difference (mask-only, ``prepare``), and its ratio is
the sequence's own, so it is ``"sequence"``. CoPG's coefficient of a sequence depends on its partner's current
log-probs; a pair spans two sequences and the fused driver cuts chunks at any sequence boundary, so a chunk can hold
one half of a pair: CoPG is ``"two_phase"`` (the partner's term comes from the full batch's detached log-probs).
"""
from __future__ import annotations

import torch

from .core import Surrogate, clipped_surrogate, exp_clamped
from .groupwise import segments, seq_groups, seq_rewards
from .registry import register


def partners(batch, name: str) -> torch.Tensor:
    """The index ``[S]`` of each sequence's partner; ValueError naming ``group_ids`` unless every group has 2.

    A batch of one sequence holds no pair: it is its own partner (a zero pair term). The fused op probes its metric
    keys with such a batch; a real one-sequence batch is a pair cut in two by the caller's micro-batching."""
    g, uniq, counts = seq_groups(batch, name)
    if batch.num_seqs == 1:
        return torch.zeros_like(g)
    bad = counts != 2
    if bool(bad.any()):
        k = int(torch.nonzero(bad)[0])
        raise ValueError(f"group_ids must pair the sequences for loss_type={name!r} (every group of exactly 2 "
                         f"sequences), got group id {uniq[k].item()} with {counts[k].item()} sequence(s)")
    order = torch.argsort(g, stable=True)
    out = torch.empty_like(g)
    out[order[0::2]], out[order[1::2]] = order[1::2], order[0::2]
    return out


def _p3o_advantages(batch, cfg) -> dict:
    """P3O: each sequence's advantage is its reward minus its partner's (mask-only)."""
    r = seq_rewards(batch, "p3o")
    if not batch.num_tokens:
        return {}
    return {"advantages": segments(batch).bcast(r - r[partners(batch, "p3o")])}


@register("p3o", plan="sequence", needs=("old_logp",), ratio=False, clipped=True, prep=_p3o_advantages,
          defaults=dict(epsilon_low=0.2, epsilon_high=0.2, aggregation="seq-mean-token-mean"))
def p3o(ctx) -> Surrogate:
    """P3O (Pairwise PPO, arXiv 2310.00212; docs/losses.md#p3o), separate clipping: the PPO core on the
    trajectory ratio ``rho_i = exp(sum_t m lr)`` with ``A_i = R_i - R_partner``."""
    cfg = ctx.cfg
    rho = ctx.seg.bcast(exp_clamped(ctx.seg.sum(ctx.m * ctx.lr), cfg.log_ratio_clamp))
    return clipped_surrogate(rho, ctx.A, 1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high, dual_c=cfg.dual_clip_c,
                             delta=cfg.delta)


def _copg_check(batch, cfg) -> dict:
    seq_rewards(batch, "copg")
    if batch.num_tokens:
        partners(batch, "copg")
    return {}


def copg_coefficients(batch, logp: torch.Tensor, cfg) -> dict:
    """CoPG's contrastive advantage ``A_i = R^b(y_i) - R^b(y_partner)`` with the regularised reward
    ``R^b(y) = R(y) - beta (log pi(y) - log pi_ref(y))`` (sums over the sequence's tokens), on the detached current
    log-probs of the full batch."""
    seg = segments(batch)
    r = seq_rewards(batch, "copg")
    if not batch.num_tokens:
        return {"pair_adv": batch.mask.new_zeros(0)}
    rb = r - cfg.copg_beta * seg.sum(batch.mask * (logp - batch.ref_logp))
    a = rb - rb[partners(batch, "copg")]
    return {"pair_adv": seg.bcast(a)}


@register("copg", plan="two_phase", needs=("ref_logp",), ratio=False, prep=_copg_check, coef=copg_coefficients,
          defaults=dict(aggregation="seq-mean-token-sum"))
def copg(ctx) -> Surrogate:
    """CoPG (Contrastive Policy Gradient, arXiv 2406.19185; docs/losses.md#copg): ``-sg(A_i) logp`` with the
    two-phase contrastive advantage; summed over a pair it is the gradient of ``(R^b(y) - R^b(y'))^2 / (4 beta)``."""
    return Surrogate(-ctx.batch.extra["pair_adv"] * ctx.lp)
