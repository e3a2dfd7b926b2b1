"""Pairs of completions for the pairwise variants ``loss_type="copg"`` / ``"p3o"`` (docs/losses.md#copg, #p3o).

Those variants read a pair as a group of exactly two sequences in ``group_ids``. ``make_pairs`` turns a batch of
groups (one reward per completion) into such a batch: the row order to gather (a completion may appear in several
pairs) and the ``group_ids`` to pass. Host-side batch construction, not differentiable. Re-exported by
``fusedpg.advantages``.
"""
from __future__ import annotations

from itertools import combinations
from typing import List, Tuple

import torch

from .advantages import _groups, _rewards

__all__ = ["make_pairs", "PAIR_MODES"]

PAIR_MODES = ("disjoint", "best_worst", "all")


@torch.no_grad()
def make_pairs(rewards, group_ids=None, *, group_sizes=None, mode: str = "disjoint",
               skip_ties: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(rows [2P], pair_ids [2P])``: gather every per-sequence tensor with ``rows`` and pass ``pair_ids`` as
    ``group_ids`` (rows ``2k`` and ``2k + 1`` are pair ``k``; pairs follow the groups' first appearance).

    ``mode``: ``"disjoint"`` (the papers' setting: independent completions taken two by two in the group's order;
    an odd one out is left out), ``"best_worst"`` (per group the highest and the lowest reward, ties broken by
    order: first best, last worst) or ``"all"`` (every unordered pair of the group; the pair losses are symmetric,
    so ordered pairs would count each twice). ``skip_ties`` drops pairs with equal rewards (they carry no P3O
    signal; CoPG still learns from them through its KL term). Groups of one give no pair.
    """
    r = _rewards(rewards)
    if mode not in PAIR_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, PAIR_MODES))}; got {mode!r}")
    g, num = _groups(r.numel(), group_ids, group_sizes, r.device)
    members: List[List[int]] = [[] for _ in range(num)]
    first = [-1] * num
    for i, k in enumerate(g.tolist()):
        members[k].append(i)
        first[k] = i if first[k] < 0 else first[k]
    vals = r.tolist()
    pairs: List[Tuple[int, int]] = []
    for k in sorted(range(num), key=lambda k: first[k]):
        idx = members[k]
        if mode == "disjoint":
            cand = list(zip(idx[0::2], idx[1::2]))
        elif mode == "best_worst":
            ranked = sorted(idx, key=lambda i: -vals[i])  # stable: first of the best, last of the worst
            cand = [(ranked[0], ranked[-1])] if len(idx) > 1 else []
        else:
            cand = list(combinations(idx, 2))
        pairs += [p for p in cand if not (skip_ties and vals[p[0]] == vals[p[1]])]
    rows = torch.tensor([i for p in pairs for i in p], dtype=torch.long, device=r.device)
    return rows, torch.arange(len(pairs), device=r.device).repeat_interleave(2)
