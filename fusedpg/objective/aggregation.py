"""Aggregation weights ``w_t`` (docs/losses.md#aggregation): ``loss = sum_t w_t * l_t``, a function of the masks
only.

The weights are what one rank's micro-step loss multiplies each token by; DDP then averages gradients over P
ranks (the ``* P`` of the global-count modes cancels that average). Every count is a caller scalar or a local
count; nothing here communicates. Conventions:

* TRL names (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``luspo``) follow ``GRPOTrainer._compute_loss``: B counts
  every row (fully masked rows included), sequence lengths are ``max(|o_i|, 1)``, GA divides except in ``dapo``.
* verl names follow ``core_algos.agg_loss``: fully masked rows are excluded from S, lengths get ``+ 1e-8``; with
  global counts (``num_items_in_batch`` / ``num_sequences``) the weights take ``* P`` and no ``1/GA`` (verl's new
  engine), without them they are micro-batch local with ``1/GA`` (the legacy actor's scaling).
* ``dapo`` / ``token-mean`` without ``num_items_in_batch`` is the local token mean divided by GA (= ``bnpo``).
* ``group-token-mean`` is DCPO's OTM as coded: per-group token mean, averaged over the groups present.
"""
from __future__ import annotations

from typing import Optional

import torch

#: TRL loss types whose entropy bonus is the local mean over the effective mask (docs/losses.md#entropy-bonus).
_TRL_LOCAL_ENTROPY = ("grpo", "bnpo", "dr_grpo", "luspo")


def _per_seq(mask: torch.Tensor, seq: torch.Tensor, num_seqs: int) -> torch.Tensor:
    return torch.zeros(num_seqs, dtype=mask.dtype, device=mask.device).index_add(0, seq, mask)


def policy_weights(mask: torch.Tensor, seq: torch.Tensor, num_seqs: int, cfg, *, width: Optional[int] = None,
                   group: Optional[torch.Tensor] = None, token_shaped: bool = False) -> torch.Tensor:
    """``w_t`` for ``cfg.aggregation`` (resolved config). ``mask`` is the float loss mask ``[N]``, ``seq`` the
    sequence index ``[N]`` in ``0..num_seqs-1``, ``width`` the padded T (if the input was ``[B, T]``)."""
    agg, ga, ws = cfg.aggregation, float(cfg.gradient_accumulation_steps), float(cfg.world_size)
    m = mask
    lens_s = _per_seq(m, seq, num_seqs)
    lens = lens_s[seq]
    rows = float(max(num_seqs, 1))
    n_tok = m.sum()
    nonempty = (lens_s > 0).sum().clamp(min=1).to(m.dtype)
    nib, nsq = cfg.num_items_in_batch, cfg.num_sequences
    if agg == "grpo":
        return m / (lens.clamp(min=1.0) * rows * ga)
    if agg == "bnpo":
        return m / (n_tok.clamp(min=1.0) * ga)
    if agg == "dr_grpo":
        return m / (rows * float(cfg.max_completion_length) * ga)
    if agg in ("dapo", "token-mean"):
        if nib is not None:
            return m * ws / max(float(nib), 1.0)
        return m / (n_tok.clamp(min=1.0) * ga)
    if agg == "luspo":
        if cfg.luspo_unmasked and token_shaped:
            # TRL/Liger: mean over all B*T cells of l * |o_i|, padding included (parity only)
            return lens / (rows * float(width) * ga)
        return m / (rows * ga)
    if agg == "seq-mean-token-mean":
        denom = (lens + 1e-8) * (nonempty * ga if nsq is None else max(float(nsq), 1.0) / ws)
        return m / denom
    if agg == "seq-mean-token-sum":
        return m / (nonempty * ga) if nsq is None else m * ws / max(float(nsq), 1.0)
    if agg == "seq-mean-token-sum-norm":
        c = cfg.loss_scale_factor if cfg.loss_scale_factor is not None else width
        return m / (float(c) * ga)
    if agg == "group-token-mean":
        if group is None:
            return m / (n_tok.clamp(min=1.0) * ga)
        _, inv = torch.unique(group, return_inverse=True)
        n_groups = int(inv.max().item()) + 1 if inv.numel() else 1
        per_group = torch.zeros(n_groups, dtype=m.dtype, device=m.device).index_add(0, inv, m)
        return m / (per_group[inv].clamp(min=1.0) * n_groups * ga)
    raise ValueError(f"aggregation {agg!r} is not implemented")


def entropy_weights(mask: torch.Tensor, effective: torch.Tensor, w: torch.Tensor, cfg) -> torch.Tensor:
    """Weights of the entropy bonus ``H_hat = sum_t w^H_t H_t`` (docs/losses.md#entropy-bonus).

    TRL ``grpo``/``bnpo``/``dr_grpo``/``luspo``: the local mean over the effective mask ``m * M``, divided by GA.
    Everything else (TRL ``dapo`` family, verl modes): the policy weights restricted to ``M``, i.e. the same
    normaliser (TRL's dapo divides by every valid token, not only the selected ones).
    """
    if cfg.aggregation in _TRL_LOCAL_ENTROPY:
        return effective / (effective.sum().clamp(min=1.0) * float(cfg.gradient_accumulation_steps))
    return torch.where(effective > 0, w, torch.zeros_like(w)) * (mask > 0)
