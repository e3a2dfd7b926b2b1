"""COPO's blended advantage, HPT's gate, pairs for CoPG/P3O and Knapsack RL's budget allocation
(docs/losses.md#advantage-estimators), on hand-computed cases, plus allocate -> ragged groups -> advantages."""
import math

import pytest
import torch

import fusedpg
from fusedpg import advantages as adv
from fusedpg.budget import knapsack_best_value_reference

D = torch.float64


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ----------------------------------------------------------------------------------------------------------- COPO
def test_copo_hand_computed():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0], dtype=D)
    a, loc, glob, w = adv.copo_advantages(r, group_sizes=[4, 4], return_parts=True)
    h1 = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))  # answers = rewards: 3 right, 1 wrong
    lam = (1 - 1 / 4) / math.log2(4)
    g1, g2 = 0.75 * (1 - lam * h1), 0.0  # mean reward x consistency factor; the all-wrong prompt gets 0
    sd = abs(g1 - g2) / math.sqrt(2)  # unbiased std of two values
    want_glob = [(g1 - (g1 + g2) / 2) / (sd + 1e-6)] * 4 + [(g2 - (g1 + g2) / 2) / (sd + 1e-6)] * 4
    want_loc = [(x - 0.75) / (0.5 + 1e-6) for x in (1.0, 0.0, 1.0, 1.0)] + [0.0] * 4
    want_w = [_sigmoid(h1 - 0.5)] * 4 + [_sigmoid(-0.5)] * 4
    torch.testing.assert_close(glob, torch.tensor(want_glob, dtype=D))
    torch.testing.assert_close(loc, torch.tensor(want_loc, dtype=D))
    torch.testing.assert_close(w, torch.tensor(want_w, dtype=D))
    torch.testing.assert_close(a, w * loc + (1 - w) * glob)
    assert (a[4:] < 0).all()  # the zero-variance prompt still gets a signal (GRPO's would be 0)
    forced = adv.copo_advantages(r, group_sizes=[4, 4], mode="soft_forced")
    torch.testing.assert_close(forced[4:], glob[4:])  # local advantage 0 there: fully global
    torch.testing.assert_close(forced[:4], a[:4])


def test_copo_answer_ids_and_plain_global_reward():
    r = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0], dtype=D)
    ids = torch.tensor([7, 7, 3, 9, 4, 4])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    _, _, glob, w = adv.copo_advantages(r, groups, answer_ids=ids, return_parts=True, blend_k=2.0, blend_b=1.0)
    h = 1.5  # answers 7, 7, 3, 9: -(1/2 log 1/2 + 2 * 1/4 log 1/4)
    torch.testing.assert_close(w[:4], torch.full((4,), _sigmoid(2.0 * (h - 1.0)), dtype=D))
    torch.testing.assert_close(w[4:], torch.full((2,), _sigmoid(-2.0), dtype=D))  # one answer: entropy 0
    g = [0.5 * (1 - (0.75 / 2) * h), 0.5]
    want = (g[0] - sum(g) / 2) / (abs(g[0] - g[1]) / math.sqrt(2) + 1e-6)
    torch.testing.assert_close(glob[0], torch.tensor(want, dtype=D))
    _, _, plain, _ = adv.copo_advantages(r, groups, answer_ids=ids, consistency=False, return_parts=True)
    assert plain.abs().max() < 1e-5  # both prompts have mean reward 1/2
    one = adv.copo_advantages(r[:4], group_sizes=[4], return_parts=True)
    assert not one[2].any()  # one prompt: no spread to standardise


def test_copo_blend_of_losses_and_of_advantages():
    """The code blends two clipped losses per token: two loss calls with token_weights 1 - w and w give it exactly;
    one call on the blended advantage gives it on-policy (ratio 1, inside the clip range)."""
    g = torch.Generator().manual_seed(3)
    r = (torch.rand(12, generator=g) < 0.5).to(D)
    mask = (torch.rand(12, 5, generator=g) < 0.8).to(D)
    lp = -torch.rand(12, 5, generator=g, dtype=D)
    old = lp + torch.randn(12, 5, generator=g, dtype=D) * 0.5
    a, loc, glob, w = adv.copo_advantages(r, group_sizes=[4, 4, 4], return_parts=True)

    def ppo(x, old_lp, a_seq):
        ratio = torch.exp(x - old_lp)
        return -torch.minimum(ratio * a_seq[:, None], ratio.clamp(0.8, 1.2) * a_seq[:, None])

    code = ((1 - w)[:, None] * ppo(lp, old, glob) + w[:, None] * ppo(lp, old, loc)) * mask
    kw = dict(old_logp=old, loss_type="grpo", aggregation="token-mean")
    two = sum(fusedpg.pg_loss(lp, part, mask, token_weights=tw[:, None].expand(12, 5), **kw)[0]
              for part, tw in ((glob, 1 - w), (loc, w)))
    torch.testing.assert_close(two, code.sum() / mask.sum())
    on_policy = ((1 - w)[:, None] * ppo(lp, lp, glob) + w[:, None] * ppo(lp, lp, loc)) * mask
    one, _ = fusedpg.pg_loss(lp, a, mask, old_logp=lp, loss_type="grpo", aggregation="token-mean")
    torch.testing.assert_close(one, on_policy.sum() / mask.sum())


def test_copo_input_checks():
    r = torch.tensor([1.0, 0.0], dtype=D)
    with pytest.raises(ValueError, match="mode must be 'soft' or 'soft_forced', got 'hard'"):
        adv.copo_advantages(r, group_sizes=[2], mode="hard")
    with pytest.raises(ValueError, match="rewards must be finite .* index 1"):
        adv.copo_advantages(torch.tensor([1.0, math.nan], dtype=D), group_sizes=[2])
    with pytest.raises(ValueError, match=r"answer_ids must have shape \(2,\)"):
        adv.copo_advantages(r, group_sizes=[2], answer_ids=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="answer_ids must be an integer tensor"):
        adv.copo_advantages(r, group_sizes=[2], answer_ids=torch.tensor([1.0, 2.0]))


# ------------------------------------------------------------------------------------------------------------ HPT
def test_hpt_gate():
    r = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0], dtype=D)
    ids = torch.tensor([5, 5, 5, 2, 2, 9, 9, 9])
    assert adv.hpt_gate(r, ids).tolist() == [False] * 3 + [True] * 2 + [False] * 3
    assert adv.hpt_gate(r, ids, threshold=1).tolist() == [True] * 5 + [False] * 3
    assert adv.hpt_gate(r * 2, ids, success=2.0).tolist() == adv.hpt_gate(r, ids).tolist()
    for bad in (-1, 0.5, True):
        with pytest.raises(ValueError, match="threshold must be an int >= 0"):
            adv.hpt_gate(r, ids, threshold=bad)
    with pytest.raises(ValueError, match="success must be a finite reward value"):
        adv.hpt_gate(r, ids, success=math.inf)


# ---------------------------------------------------------------------------------------------------------- pairs
def test_make_pairs_modes():
    r = torch.tensor([0.2, 0.9, 0.2, -1.0, 3.0, 0.5, 0.5], dtype=D)
    ids = torch.tensor([4, 4, 4, 4, 8, 1, 1])  # group 8 is a single completion: no pair
    rows, pid = adv.make_pairs(r, ids)
    assert rows.tolist() == [0, 1, 2, 3, 5, 6] and pid.tolist() == [0, 0, 1, 1, 2, 2]
    rows, _ = adv.make_pairs(r, ids, mode="best_worst")
    assert rows.tolist() == [1, 3, 5, 6]
    rows, pid = adv.make_pairs(r, ids, mode="all")
    assert rows.tolist() == [0, 1, 0, 2, 0, 3, 1, 2, 1, 3, 2, 3, 5, 6] and pid.tolist()[-2:] == [6, 6]
    rows, _ = adv.make_pairs(r, ids, mode="all", skip_ties=True)
    assert rows.tolist() == [0, 1, 0, 3, 1, 2, 1, 3, 2, 3]
    with pytest.raises(ValueError, match="mode must be one of 'disjoint', 'best_worst', 'all'; got 'ranked'"):
        adv.make_pairs(r, ids, mode="ranked")


@pytest.mark.parametrize("loss_type", ["copg", "p3o"])
def test_pairs_feed_the_pairwise_losses(loss_type):
    g = torch.Generator().manual_seed(0)
    r = torch.randn(6, generator=g, dtype=D)
    lp, old, ref = (-torch.rand(6, 5, generator=g, dtype=D) for _ in range(3))
    mask = torch.ones(6, 5, dtype=D)
    rows, pid = adv.make_pairs(r, group_sizes=[3, 3], mode="all")
    loss, _ = fusedpg.pg_loss(lp[rows], r[rows], mask[rows], old_logp=old[rows], ref_logp=ref[rows], group_ids=pid,
                              loss_type=loss_type)
    assert torch.isfinite(loss) and rows.numel() == 12


# -------------------------------------------------------------------------------------------------------- budgets
def test_knapsack_value():
    assert adv.knapsack_value(3, 0.5) == pytest.approx((1 - 0.125 - 0.125) * 0.5 * 0.25)
    assert adv.knapsack_value(10, 0.0) == 0 and adv.knapsack_value(10, 1.0) == 0


@pytest.mark.parametrize("seed", range(4))
def test_knapsack_allocation_is_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(4, generator=g, dtype=D) * 0.9 + 0.05
    budget = int(torch.randint(8, 25, (1,), generator=g))
    sizes = adv.knapsack_group_sizes(p, budget, min_size=2, max_size=8, confidence=None)
    assert sizes.sum() == budget and sizes.min() >= 2 and sizes.max() <= 8
    got = sum(adv.knapsack_value(int(n), float(q)) for n, q in zip(sizes, p))
    assert got == pytest.approx(knapsack_best_value_reference(p.tolist(), budget, 2, 8), rel=1e-12, abs=1e-15)


def test_knapsack_fallback_and_unknown_rates():
    p = torch.tensor([0.0, 0.5, 0.9, 1.0, 0.2], dtype=D)
    # needs at confidence 0.9: ceil(log 0.1 / log max(p, 1-p)) = 4, 22 -> 16 (max), 11: 25 of the 30 left over
    # after the minimums; the 5 spare go to the unsolved prompt, the 25 by marginal gain
    sizes = adv.knapsack_group_sizes(p, 40, min_size=2, max_size=16)
    assert sizes.tolist() == [7, 9, 6, 2, 16]
    assert adv.knapsack_group_sizes(p, 40, min_size=2, max_size=16, confidence=None).tolist() == [2, 9, 11, 2, 16]
    full = adv.knapsack_group_sizes(p, 80, min_size=2, max_size=16, confidence=None)  # informative ones saturate
    assert full.tolist() == [16, 16, 16, 16, 16]
    q = torch.tensor([math.nan, 0.5, 1.0], dtype=D)
    sizes = adv.knapsack_group_sizes(q, 12, min_size=1, max_size=8, confidence=None)
    assert sizes.tolist() == [4, 7, 1]  # unknown: the uniform share 12 // 3; the informative prompt takes the rest
    assert adv.knapsack_group_sizes(torch.tensor([0.0, 1.0], dtype=D), 6, min_size=2).tolist() == [4, 2]


def test_knapsack_input_checks():
    p = torch.tensor([0.5, 0.5], dtype=D)
    with pytest.raises(ValueError, match=r"total_budget must lie in \[P \* min_size, P \* max_size\] = \[4, 8\]"):
        adv.knapsack_group_sizes(p, 9, min_size=2, max_size=4)
    with pytest.raises(ValueError, match="total_budget must be an int >= 0, got 3.5"):
        adv.knapsack_group_sizes(p, 3.5)
    with pytest.raises(ValueError, match="min_size must be an int >= 1, got 0"):
        adv.knapsack_group_sizes(p, 4, min_size=0)
    with pytest.raises(ValueError, match="max_size must be an int >= 3, got 2"):
        adv.knapsack_group_sizes(p, 6, min_size=3, max_size=2)
    with pytest.raises(ValueError, match=r"success_rates must lie in \[0, 1\] \(NaN: unknown\), got 1.5"):
        adv.knapsack_group_sizes(torch.tensor([1.5, 0.5], dtype=D), 4)
    with pytest.raises(ValueError, match=r"success_rates must be \[P\]"):
        adv.knapsack_group_sizes(p.reshape(1, 2), 4)
    with pytest.raises(TypeError, match="success_rates must be a floating tensor"):
        adv.knapsack_group_sizes(torch.tensor([1, 0]), 4)
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\) or None, got 1.0"):
        adv.knapsack_group_sizes(p, 4, confidence=1.0)


def test_allocate_then_ragged_groups_then_group_normalised_advantages():
    """End to end: success-rate estimates -> knapsack group sizes -> ragged groups of rollouts -> GRPO advantages."""
    p = torch.tensor([0.05, 0.5, 0.95, 0.3, 0.0, 0.7], dtype=D)
    sizes = adv.knapsack_group_sizes(p, 48, min_size=2, max_size=16)
    assert sizes.sum() == 48 and len(set(sizes.tolist())) > 1  # ragged
    g = torch.Generator().manual_seed(0)
    rewards = torch.cat([(torch.rand(int(n), generator=g, dtype=D) < q).to(D) for n, q in zip(sizes, p)])
    a = adv.group_normalized_advantages(rewards, group_sizes=sizes.tolist())
    ids = torch.arange(len(sizes)).repeat_interleave(sizes)
    for k in range(len(sizes)):
        x = rewards[ids == k]
        torch.testing.assert_close(a[ids == k], (x - x.mean()) / (x.std() + 1e-6))
    torch.testing.assert_close(adv.group_normalized_advantages(rewards, ids), a)
    flat = adv.zero_variance_groups(rewards, group_sizes=sizes.tolist())
    assert flat.tolist() == [bool((rewards[ids == k] == rewards[ids == k][0]).all()) for k in ids.tolist()]
