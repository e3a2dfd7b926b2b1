"""Verification cases of the seed methods that are not loss variants of the registry (those run in the ``pg``
group): One-Token Rollout (sampled inside the head's pass), COPO's blended advantages and Knapsack RL's budgets."""
from __future__ import annotations

from typing import List, Optional

import torch

from .tolerance import Comparison, compare


def check_otr(*, impl: Optional[str] = None, dtype: torch.dtype = torch.float32, device="cpu",
              b: int = 3, t: int = 7, h: int = 24, v: int = 61, k: int = 4) -> List[Comparison]:
    """Loss and gradients of ``otr_loss`` against the float64 loss of the same sampled candidates."""
    from ..linear_pg.otr import otr_loss, otr_loss_reference

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h ** 0.5 * 2
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :2] = -100
    leaves = [x.to(dtype).to(device).requires_grad_() for x in (hidden, weight)]
    loss, metrics = otr_loss(leaves[0], leaves[1], labels.to(device), num_samples=k, seed=3, otr_beta=0.2,
                             aggregation="seq-mean-token-mean", impl=impl, chunk_bytes=2 * v * 4)
    ours = [loss.detach()] + list(torch.autograd.grad(loss, leaves))
    tokens = metrics["tokens"].cpu()

    def ref(work, head):
        xs = [x.to(work).requires_grad_() for x in (hidden, weight)]
        out = otr_loss_reference(xs[0], xs[1], labels, tokens, otr_beta=0.2, aggregation="seq-mean-token-mean",
                                 dtype=head)
        return [out.detach()] + list(torch.autograd.grad(out, xs))

    eager, truth = ref(dtype, None), ref(torch.float64, torch.float64)
    return [compare(f"otr.{n}", a, e, tr, dtype)
            for n, a, e, tr in zip(("loss", "d_hidden", "d_weight"), ours, eager, truth)]


def check_copo(dtype: torch.dtype = torch.float32) -> List[Comparison]:
    """COPO's blended advantages at ``dtype`` against the same estimator in float64 (ragged groups, answer ids)."""
    from ..advantages_blend import copo_advantages

    g = torch.Generator().manual_seed(1)
    sizes = [4, 6, 3, 5]
    rewards = (torch.rand(sum(sizes), generator=g, dtype=torch.float64) > 0.5).double()
    answers = torch.randint(0, 3, (sum(sizes),), generator=g)
    ours = copo_advantages(rewards.to(dtype), group_sizes=sizes, answer_ids=answers)
    truth = copo_advantages(rewards, group_sizes=sizes, answer_ids=answers)
    return [compare("copo.advantages", ours, None, truth, dtype)]


def check_knapsack() -> List[Comparison]:
    """The greedy allocation's total value against exhaustive search over every allocation (small instances)."""
    from ..budget import knapsack_best_value_reference, knapsack_group_sizes, knapsack_value

    out = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        p = torch.rand(4, generator=g, dtype=torch.float64) * 0.9 + 0.05
        budget = 8 + 5 * seed
        sizes = knapsack_group_sizes(p, budget, min_size=2, max_size=8, confidence=None)
        got = sum(knapsack_value(int(n), float(q)) for n, q in zip(sizes, p))
        best = knapsack_best_value_reference(p.tolist(), budget, 2, 8)
        out.append(compare("knapsack.value", torch.tensor(got, dtype=torch.float64), None,
                           torch.tensor(best, dtype=torch.float64), torch.float64))
    return out
