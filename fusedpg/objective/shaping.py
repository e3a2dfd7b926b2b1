"""Precomputed per-token shaping of the loss (mask-only, no gradient): GTPO's conflict-token weights
(docs/losses.md#gtpo).

The result goes to ``pg_loss(..., token_weights=...)``, which multiplies the policy term of each token.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import checks
from ..advantages import _groups

__all__ = ["gtpo_token_weights"]


@torch.no_grad()
def gtpo_token_weights(token_ids: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, group_ids=None, *,
                       group_sizes=None, divide_by_conflicts: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """GTPO conflict-token weights (docs/losses.md#gtpo) for ``pg_loss(..., token_weights=...)``:
    ``(delta / n_conf, n_conf)``.

    Within a group, position ``t`` of completion ``i`` (token ``v``) conflicts when ``v`` sits at ``t`` in at
    least one completion with ``A > 0`` and one with ``A < 0``. Only the contiguous run of conflicts from the
    start counts, and likewise aligned from each completion's end. Per direction a run token weighs 2 in a
    positive completion, 0 in a negative one, 1 otherwise; ``delta`` is the product of both directions.
    ``n_conf_i`` counts tokens in either run (at least 1); the division is in the authors' code, not the paper
    (``divide_by_conflicts``). Inputs: ``token_ids``/``mask`` ``[B, T]`` (right-padded), ``advantages`` ``[B]``.
    """
    checks.integer("token_ids", token_ids)
    if token_ids.dim() != 2 or tuple(mask.shape) != tuple(token_ids.shape):
        raise ValueError(f"token_ids and mask must both be [B, T], got {tuple(token_ids.shape)} and "
                         f"{tuple(mask.shape)}")
    b, t = token_ids.shape
    if tuple(advantages.shape) != (b,):
        raise ValueError(f"advantages must be [B] = ({b},), got {checks._describe(advantages)}")
    g, num = _groups(b, group_ids, group_sizes, token_ids.device)
    valid = mask.bool()
    lengths = valid.long().sum(1)
    # right-aligned copies: column u holds position (len - T + u)
    src = (torch.arange(t).unsqueeze(0) - (t - lengths).unsqueeze(1))
    ok_r = src >= 0
    ids_r = torch.where(ok_r, token_ids.gather(1, src.clamp(min=0)), torch.full_like(token_ids, -1))
    out = torch.ones(b, t, dtype=advantages.dtype)
    run_any = torch.zeros(b, t, dtype=torch.bool)
    for ids, ok, aligned_right in ((token_ids, valid, False), (ids_r, ok_r, True)):
        conflict = torch.zeros(b, t, dtype=torch.bool)
        for grp in range(num):
            rows = torch.nonzero(g == grp).flatten()
            a = advantages[rows]
            x, v = ids[rows], ok[rows]
            same = (x.unsqueeze(1) == x.unsqueeze(0)) & v.unsqueeze(1) & v.unsqueeze(0)  # [i, j, t]
            has_pos = (same & (a > 0).view(1, -1, 1)).any(1)
            has_neg = (same & (a < 0).view(1, -1, 1)).any(1)
            conflict[rows] = has_pos & has_neg & v
        order = conflict.flip(1) if aligned_right else conflict
        run = torch.cumprod(order.long(), 1).bool()
        run = run.flip(1) if aligned_right else run
        if aligned_right:  # back to left-aligned positions
            back = torch.zeros_like(run)
            back.scatter_(1, src.clamp(min=0), run & ok_r)
            run = back & valid
        pos, neg = run & (advantages > 0).unsqueeze(1), run & (advantages < 0).unsqueeze(1)
        w = torch.where(pos, 2.0, torch.where(neg, 0.0, 1.0))
        out = out * w.to(out.dtype)
        run_any |= run
    n_conf = run_any.sum(1).clamp(min=1).to(advantages.dtype)
    out = out * valid
    return (out / n_conf.unsqueeze(1) if divide_by_conflicts else out), n_conf
