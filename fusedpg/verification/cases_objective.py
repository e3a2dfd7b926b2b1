"""Random, valid inputs for every loss variant: shared by the loss tests, the fused engine's tests and, through
``cases_pg``, ``fusedpg verify``.

``make_case(loss_type, ...)`` returns ``(tensors, options)``: ``tensors`` are the ``pg_loss`` tensor arguments
(``logp`` and ``entropy`` as leaf tensors without grad), ``options`` the keyword options that make the variant
valid on that batch (Dr.GRPO's ``max_completion_length``, binary rewards for PSR/NSR/DRPO...). CoPG and P3O get an
even batch (``batch`` is raised by one if odd) whose ``group_ids`` pair neighbouring rows; HPT gets ``truncated``
(its demonstration flags).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..objective.registry import get_variant


def make_case(loss_type: str, *, batch: int = 4, width: int = 7, packed: bool = False, seed: int = 0,
              dtype: torch.dtype = torch.float64, per_token_adv: bool = False, empty_rows: int = 1,
              log_ratio_scale: float = 0.3, mask_prob: float = 0.75) -> Tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    var = get_variant(loss_type)
    per_seq_rewards = loss_type in _REWARDS
    if loss_type in _PAIRS and batch % 2:
        batch += 1  # a group of exactly two sequences is a pair
    lengths = torch.randint(1, width + 1, (batch,), generator=g)
    mask = torch.zeros(batch, width, dtype=dtype)
    for i, n in enumerate(lengths.tolist()):
        mask[i, :n] = (torch.rand(n, generator=g) < mask_prob).to(dtype)
        mask[i, 0] = 1.0
    if empty_rows:
        mask[torch.randperm(batch, generator=g)[:empty_rows]] = 0.0
    logp = -torch.rand(batch, width, generator=g, dtype=dtype) * 2.0 - 0.05
    old = logp + randn(batch, width) * log_ratio_scale
    ref = logp + randn(batch, width) * log_ratio_scale
    roll = old + randn(batch, width) * 0.1
    ent = torch.rand(batch, width, generator=g, dtype=dtype) * 2.0
    adv = randn(batch, width) if per_token_adv and not per_seq_rewards else randn(batch)
    opts = {}
    if loss_type in ("psr", "nsr", "w_reinforce", "drpo"):
        adv = (torch.rand(adv.shape, generator=g) < 0.5).to(dtype)
    if loss_type in ("clip_cov", "kl_cov"):
        opts.update(clip_cov_ratio=0.2, kl_cov_ratio=0.2, clip_cov_lb=-1e9, clip_cov_ub=1e9, seed=seed)
    if loss_type in ("dr_grpo", "drpo"):
        opts["max_completion_length"] = width
    t = dict(logp=logp, advantages=adv, mask=mask, entropy=ent, old_logp=old, ref_logp=ref, rollout_logp=roll,
             old_entropy=ent * 0.9 + 0.05, step_ids=(torch.arange(width) // 3).expand(batch, width).clone(),
             group_ids=torch.arange(batch) // (3 if loss_type == "drpo" else 2))
    if var.name == "gtpo":
        t["token_weights"] = torch.randint(0, 3, (batch, width), generator=g).to(dtype)
    if var.name == "hpt":  # HPT's demonstrations are flagged in ``truncated``
        t["truncated"] = torch.rand(batch, generator=g) < 0.4
    if packed:
        t = _pack(t, mask, lengths)
    return t, opts


#: variants whose ``advantages`` are one reward per sequence, and those whose ``group_ids`` must form pairs
_REWARDS = ("drpo", "copg", "p3o")
_PAIRS = ("copg", "p3o")


def _pack(t: dict, mask: torch.Tensor, lengths: torch.Tensor) -> dict:
    """Drop the padding: ``[B, T]`` -> packed ``[N]`` with ``seq_ids`` (per-sequence tensors stay ``[S]``)."""
    keep = torch.zeros_like(mask, dtype=torch.bool)
    for i, n in enumerate(lengths.tolist()):
        keep[i, :n] = True
    out = {}
    for k, v in t.items():
        if isinstance(v, torch.Tensor) and v.shape == mask.shape:
            out[k] = v[keep]
        else:
            out[k] = v
    out["seq_ids"] = torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask)[keep]
    return out


def grad_inputs(t: dict, entropy: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Fresh leaf copies of ``logp`` / ``entropy`` with ``requires_grad``."""
    lp = t["logp"].detach().clone().requires_grad_()
    h = t["entropy"].detach().clone().requires_grad_() if entropy else None
    return lp, h
