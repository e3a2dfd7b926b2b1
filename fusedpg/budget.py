"""Rollout budget allocation across prompts: Knapsack RL (arXiv 2509.25849; docs/losses.md#knapsack-rl).

Each prompt is an item whose value with ``n`` rollouts is ``V(n, p) = (1 - p^n - (1-p)^n) p (1-p)^2``: the
probability that its group has non-zero reward variance (GRPO gets a gradient) times the paper's gradient-value
term ``p (1-p)^2``, with ``p`` the prompt's estimated success rate. The total ``sum_i n_i`` is the budget, each
``n_i`` within ``[min_size, max_size]``. ``V`` is concave in ``n``, so giving each next rollout to the prompt with
the largest marginal gain is an exact solution of the knapsack (the paper solves the same problem by dynamic
programming). The sizes feed the ragged-group advantage estimators (``group_sizes=``). Host-side, float64.
"""
from __future__ import annotations

import heapq
import itertools
import math
from typing import List, Optional, Sequence

import torch

from . import checks

__all__ = ["knapsack_value", "knapsack_group_sizes", "knapsack_best_value_reference"]


def knapsack_value(n, p):
    """``(1 - p^n - (1-p)^n) p (1-p)^2`` (floats or tensors): the value of a prompt of success rate ``p`` given
    ``n`` rollouts."""
    return (1 - p ** n - (1 - p) ** n) * p * (1 - p) ** 2


def _spread(sizes: List[int], idx: Sequence[int], amount: int, cap: int) -> int:
    """Give ``amount`` rollouts to ``idx`` one at a time, round robin, none above ``cap``; returns what is left."""
    while amount > 0:
        room = [i for i in idx if sizes[i] < cap]
        if not room:
            break
        for i in room[:amount]:
            sizes[i] += 1
        amount -= min(len(room), amount)
    return amount


def _int_arg(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


@torch.no_grad()
def knapsack_group_sizes(success_rates: torch.Tensor, total_budget: int, *, min_size: int = 2,
                         max_size: Optional[int] = None, confidence: Optional[float] = 0.9) -> torch.Tensor:
    """Rollouts per prompt (int64 ``[P]``, summing to ``total_budget``) maximising ``sum_i V(n_i, p_i)``.

    ``success_rates``: ``[P]`` estimates in ``[0, 1]`` (e.g. the last epoch's accuracy), NaN where unknown (such a
    prompt gets the uniform share ``total_budget // P``, clipped to the bounds, and more only when every other
    prompt is full). Prompts with
    ``p`` in ``{0, 1}`` have value 0 and keep ``min_size`` unless the fallback gives them more.

    ``confidence`` (the code's ``alpha``; ``None`` switches the fallback off): a prompt with ``0 < p < 1`` needs about
    ``log(1 - confidence) / log(max(p, 1 - p))`` rollouts for a mixed group with that probability. When those
    needs (clipped to the bounds) leave budget over, the surplus goes first to the unsolved prompts (``p = 0``; if
    none, the other zero-value prompts), round robin, as the authors' fallback does; the rest is allocated by
    marginal gain. Budget left once every informative prompt is at ``max_size`` goes to the others the same way.
    """
    checks.floating("success_rates", success_rates)
    if success_rates.dim() != 1:
        raise ValueError(f"success_rates must be [P] (one per prompt), got {checks._describe(success_rates)}")
    p = success_rates.detach().to(torch.float64).cpu().tolist()
    n = len(p)
    if any(not math.isnan(x) and not 0.0 <= x <= 1.0 for x in p):
        bad = next(x for x in p if not math.isnan(x) and not 0.0 <= x <= 1.0)
        raise ValueError(f"success_rates must lie in [0, 1] (NaN: unknown), got {bad}")
    budget = _int_arg("total_budget", total_budget, 0)
    lo = _int_arg("min_size", min_size, 1)
    hi = _int_arg("max_size", max_size, lo) if max_size is not None else max(budget, lo)
    if not n * lo <= budget <= n * hi:
        raise ValueError(f"total_budget must lie in [P * min_size, P * max_size] = [{n * lo}, {n * hi}] for "
                         f"P = {n} prompts, got {budget}")
    if confidence is not None and not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1) or None, got {confidence!r}")
    unknown = [i for i in range(n) if math.isnan(p[i])]
    sizes = [lo] * n
    for i in unknown:
        sizes[i] = min(max(budget // n, lo), hi)
    info = [i for i in range(n) if not math.isnan(p[i]) and 0.0 < p[i] < 1.0]
    zero = [i for i in range(n) if p[i] == 0.0]
    rest = [i for i in range(n) if p[i] == 1.0] + unknown
    left = budget - sum(sizes)
    if confidence is not None:
        need = sum(min(max(math.ceil(math.log(1 - confidence) / math.log(max(p[i], 1 - p[i]))), lo), hi) - lo
                   for i in info)
        targets = zero or rest
        if targets and (need < left or not info):
            surplus = left - need if info else left
            left = left - surplus + _spread(sizes, targets, surplus, hi)
    heap = [(-(knapsack_value(lo + 1, p[i]) - knapsack_value(lo, p[i])), i) for i in info if lo < hi]
    heapq.heapify(heap)
    while left > 0 and heap:
        _, i = heapq.heappop(heap)
        sizes[i] += 1
        left -= 1
        if sizes[i] < hi:
            gain = knapsack_value(sizes[i] + 1, p[i]) - knapsack_value(sizes[i], p[i])
            heapq.heappush(heap, (-gain, i))
    for group in (zero, rest, info):
        left = _spread(sizes, group, left, hi)
    return torch.tensor(sizes, dtype=torch.long)


def knapsack_best_value_reference(p: Sequence[float], budget: int, lo: int, hi: int) -> float:
    """Exhaustive search (the reference of small cases): the largest ``sum_i V(n_i, p_i)`` over every allocation
    within ``[lo, hi]`` that spends exactly ``budget``; ``-inf`` if none does. ``(hi - lo + 1)^P`` allocations."""
    best = -math.inf
    for sizes in itertools.product(range(lo, hi + 1), repeat=len(p)):
        if sum(sizes) == budget:
            best = max(best, sum(knapsack_value(n, q) for n, q in zip(sizes, p)))
    return best
