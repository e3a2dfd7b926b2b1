"""``memory_budget=``: the plan and chunk size chosen from a byte budget (``fusedpg.memory_plan``), and the ops
running exactly the chosen plan."""
from __future__ import annotations

import pytest
import torch

import fusedpg
from fusedpg.memory_plan import choose, default_extra, low_extra

N, H, V = 64, 32, 700


def test_the_choice_is_the_fastest_plan_that_fits():
    roomy = choose(4096, 1024, 32000, torch.bfloat16, 1 << 40)
    assert roomy.plan == "default" and roomy.chunk_bytes == (64 << 20) // (32000 * 4) * 32000 * 4
    assert roomy.flops == 8 * 4096 * 1024 * 32000
    assert choose(4096, 1024, 32000, torch.bfloat16, 1 << 40, one_pass=True).flops == 6 * 4096 * 1024 * 32000
    floor = default_extra(4096, 1024, 32000, 2, 0)
    tight = choose(4096, 1024, 32000, torch.bfloat16, floor + 2 * 100 * 32000 * 4)  # room for 100 rows
    assert tight.plan == "default" and tight.chunk_bytes == 100 * 32000 * 4 and tight.extra_bytes <= floor + 2 * 100 * 32000 * 4
    low = choose(4096, 1024, 32000, torch.bfloat16, floor)  # no room for a chunk: the low plan
    assert low.plan == "low" and low.extra_bytes == low_extra(4096, 1024, 32000, 2) <= floor
    with pytest.raises(ValueError, match=r"memory_budget must be at least \d+ bytes for hidden \[4096, 1024\]"):
        choose(4096, 1024, 32000, torch.bfloat16, 32000 * 1024 * 2)  # d_weight alone does not fit
    with pytest.raises(ValueError, match="memory_budget must be a positive int of bytes, got 1.5"):
        choose(4096, 1024, 32000, torch.bfloat16, 1.5)


def _run(**kw):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    logp, ent = fusedpg.linear_logprob_entropy(hidden, weight, targets, impl="torch", **kw)
    (logp.sum() + 0.5 * ent.sum()).backward()
    return logp, ent, hidden.grad, weight.grad


@pytest.mark.parametrize("rows", [N, 20])
def test_a_budget_runs_the_chosen_default_plan(rows):
    budget = default_extra(N, H, V, 4, rows)
    c = choose(N, H, V, torch.float32, budget)
    assert c.plan == "default" and c.chunk_bytes == rows * V * 4
    for a, b in zip(_run(memory_budget=budget), _run(chunk_bytes=c.chunk_bytes)):
        assert torch.equal(a, b)


def test_a_small_budget_runs_the_low_plan():
    """bf16, V >> N: the default plan's fp32 [V, H] accumulator does not fit, the low plan's tiles do."""
    n, h, v = 64, 256, 8192
    budget = low_extra(n, h, v, 2)
    assert budget < default_extra(n, h, v, 2, 16) and choose(n, h, v, torch.bfloat16, budget).plan == "low"
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(n, h, generator=g).bfloat16(), (torch.randn(v, h, generator=g) / h ** 0.5).bfloat16(),
            torch.randint(0, v, (n,), generator=g))

    def run(**kw):
        hidden, weight = (x.clone().requires_grad_() for x in args[:2])
        logp, ent = fusedpg.linear_logprob_entropy(hidden, weight, args[2], impl="torch", **kw)
        (logp.sum() + 0.5 * ent.sum()).backward()
        return logp, ent, hidden.grad, weight.grad

    for a, b in zip(run(memory_budget=budget), run(memory="low")):
        assert torch.equal(a, b)


def test_fused_loss_takes_a_budget():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 32, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    targets = torch.randint(0, V, (2, 32), generator=g)
    mask, adv = torch.ones(2, 32), torch.randn(2, generator=g)
    budget = default_extra(64, H, V, 4, 20)
    ours = fusedpg.fused_linear_pg_loss(hidden, weight, targets, adv, mask, memory_budget=budget, loss_type="gpg")
    ref = fusedpg.fused_linear_pg_loss(hidden, weight, targets, adv, mask, chunk_bytes=20 * V * 4, loss_type="gpg")
    assert torch.equal(ours[0], ref[0])


@pytest.mark.parametrize("kw,match", [
    (dict(memory="low"), "leave memory and chunk_bytes at their defaults, got memory='low'"),
    (dict(chunk_bytes=4096), "leave memory and chunk_bytes at their defaults, got chunk_bytes=4096"),
])
def test_a_budget_with_explicit_plan_settings_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        _run(memory_budget=1 << 30, **kw)
