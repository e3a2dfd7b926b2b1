"""DRPO, CoPG, P3O and HPT as loss variants (fusedpg/objective/README.md#variants): gradients against independent
float64 statements of each paper's loss, their input checks, and why CoPG is two-phase."""
import math

import pytest
import torch

import fusedpg
from fusedpg.objective import batch_coefficients, make_config, plan_of, prepare, token_loss
from fusedpg.verification.cases_objective import make_case

D = torch.float64


def _case(lengths, width, seed=0, scale=0.4):
    """Rows of the given valid lengths (right-padded), log-probs around old/ref by ``scale``."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    mask = torch.zeros(b, width, dtype=D)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    lp = -torch.rand(b, width, generator=g, dtype=D) * 2 - 0.1
    old = lp + torch.randn(b, width, generator=g, dtype=D) * scale
    ref = lp + torch.randn(b, width, generator=g, dtype=D) * scale
    return mask, lp, old, ref


def _grad(loss, lp):
    (c,) = torch.autograd.grad(loss, lp)
    return c


def _ours(loss_type, lp, rewards, mask, **kw):
    x = lp.clone().requires_grad_()
    loss, metrics = fusedpg.pg_loss(x, rewards, mask, loss_type=loss_type, **kw)
    return loss, _grad(loss, x), metrics


# ----------------------------------------------------------------------------------------------------------- DRPO
def _drpo_reference(lp, old, mask, rewards, groups, width, lam, tau, beta, delta):
    """The DRPO objective as stated (arXiv 2510.04474 and its verl code), written from scratch: per question,
    -(sum_pos w_i s_i - tau log mean_neg exp(s_j / tau)) / Q with the length weights normalised over the positives,
    plus sg(beta max(kl - delta, 0)) kl with kl the token mean of old - logp."""
    s = (lp * mask).sum(1) / mask.sum(1)
    lens = mask.sum(1)
    ids = groups.unique()
    total = lp.new_zeros(())
    for q in ids.tolist():
        pos = (groups == q) & (rewards == 1)
        neg = (groups == q) & (rewards == 0)
        if pos.any() and neg.any():
            w = torch.softmax((1 - lens[pos] / width) / lam, 0)
            lme = tau * (torch.logsumexp(s[neg] / tau, 0) - math.log(int(neg.sum())))
            total = total - ((w * s[pos]).sum() - lme) / len(ids)
    kl = ((old - lp) * mask).sum() / mask.sum()
    return total + beta * (kl.detach() - delta).clamp(min=0) * kl


@pytest.mark.parametrize("beta", [0.0, 1000.0])
def test_drpo_gradient_is_the_papers(beta):
    width = 5
    lengths = [5, 5, 5, 5, 5, 5, 5] if beta else [2, 5, 3, 1, 4, 5, 2]  # equal lengths: penalty token means agree
    mask, lp, old, _ = _case(lengths, width, seed=1)
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0], dtype=D)
    groups = torch.tensor([3, 3, 3, 3, 8, 8, 1])  # group 1 has only a negative: it carries no DRPO term
    kw = dict(drpo_beta=beta, drpo_delta=1e-4, drpo_tau=2.0, drpo_lambda=0.5)
    loss, c, metrics = _ours("drpo", lp, rewards, mask, old_logp=old, group_ids=groups, **kw)
    x = lp.clone().requires_grad_()
    ref = _drpo_reference(x, old, mask, rewards, groups, width, 0.5, 2.0, beta, 1e-4)
    torch.testing.assert_close(c, _grad(ref, x))
    kl = float(((old - lp) * mask).sum() / mask.sum())
    assert metrics["drpo_kappa_max"] == pytest.approx(beta * max(kl - 1e-4, 0.0))
    assert not c[mask == 0].any()


def test_drpo_hand_computed_weights():
    """One group: positives of lengths 2 and 4 (L = 4, lambda = 0.1) and one negative; 2 groups, 5 sequences."""
    mask, lp, old, _ = _case([2, 4, 3, 1, 2], 4, seed=2)
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0], dtype=D)
    groups = torch.tensor([0, 0, 0, 1, 1])
    _, c, _ = _ours("drpo", lp, rewards, mask, old_logp=old, group_ids=groups, drpo_beta=0.0)
    w0 = math.exp(5) / (math.exp(5) + 1)  # (1 - 2/4)/0.1 = 5 against (1 - 4/4)/0.1 = 0
    scale = 5 / 2  # S / Q
    per_seq = torch.tensor([-scale * w0, -scale * (1 - w0), scale * 1.0, 0.0, 0.0], dtype=D)  # dL/ds_i * S
    want = per_seq[:, None] * mask / (mask.sum(1, keepdim=True) * 5)  # seq-mean-token-mean weights
    torch.testing.assert_close(c, want)


def test_drpo_input_checks():
    mask, lp, old, _ = _case([2, 3], 3)
    with pytest.raises(ValueError, match="binary rewards"):
        fusedpg.pg_loss(lp, torch.tensor([0.5, 1.0], dtype=D), mask, old_logp=old, group_ids=torch.tensor([0, 0]),
                        loss_type="drpo")
    with pytest.raises(ValueError, match="group_ids is required"):
        fusedpg.pg_loss(lp, torch.tensor([0.0, 1.0], dtype=D), mask, old_logp=old, loss_type="drpo")
    with pytest.raises(ValueError, match="max_completion_length is required"):
        fusedpg.pg_loss(lp.reshape(-1), torch.tensor([0.0, 1.0], dtype=D), mask.reshape(-1),
                        old_logp=old.reshape(-1), seq_ids=torch.arange(2).repeat_interleave(3),
                        group_ids=torch.tensor([0, 0]), loss_type="drpo")
    with pytest.raises(ValueError, match="one reward per sequence"):
        fusedpg.pg_loss(lp, torch.zeros(2, 3, dtype=D), mask, old_logp=old, group_ids=torch.tensor([0, 0]),
                        loss_type="drpo")
    for name in ("drpo_tau", "drpo_lambda"):
        with pytest.raises(ValueError, match=f"{name} must be > 0, got 0.0"):
            make_config(loss_type="drpo", **{name: 0.0})
    with pytest.raises(ValueError, match="drpo_beta must be >= 0"):
        make_config(loss_type="drpo", drpo_beta=-1.0)


# ----------------------------------------------------------------------------------------------------------- CoPG
def _copg_reference(lp, ref, mask, rewards, groups, beta):
    """CoPG's pair loss (R^b(y) - R^b(y'))^2 with R^b = R - beta log(pi/pi_ref), averaged over pairs, over 4 beta."""
    rb = rewards - beta * ((lp - ref) * mask).sum(1)
    total, pairs = lp.new_zeros(()), groups.unique()
    for q in pairs.tolist():
        i, j = torch.nonzero(groups == q).flatten().tolist()
        total = total + (rb[i] - rb[j]) ** 2
    return total / (len(pairs) * 4 * beta)


def test_copg_gradient_is_the_contrastive_policy_gradient():
    mask, lp, _, ref = _case([3, 4, 2, 4, 1, 3], 4, seed=3)
    rewards = torch.tensor([1.0, -0.5, 0.3, 0.3, 2.0, 0.0], dtype=D)
    groups = torch.tensor([7, 7, 2, 2, 5, 5])
    _, c, _ = _ours("copg", lp, rewards, mask, ref_logp=ref, group_ids=groups, copg_beta=0.3)
    x = lp.clone().requires_grad_()
    torch.testing.assert_close(c, _grad(_copg_reference(x, ref, mask, rewards, groups, 0.3), x))
    # beta = 0: policy gradient with the partner's reward as baseline, one sequence-sum per row over S = 6 rows
    _, c0, _ = _ours("copg", lp, rewards, mask, ref_logp=ref, group_ids=groups, copg_beta=0.0)
    partner = torch.tensor([1, 0, 3, 2, 5, 4])
    torch.testing.assert_close(c0, -(rewards - rewards[partner])[:, None] * mask / 6)


def test_copg_is_two_phase_because_a_chunk_can_cut_a_pair():
    """A slice holding one half of a pair still gives its exact share, with the partner's term from phase 1."""
    mask, lp, _, ref = _case([3, 4, 2, 4], 4, seed=4)
    rewards = torch.tensor([1.0, 0.0, 0.2, 0.9], dtype=D)
    groups = torch.tensor([0, 1, 0, 1])  # pairs (0, 2) and (1, 3): every sequence boundary cuts a pair
    cfg = make_config(loss_type="copg", copg_beta=0.2)
    assert plan_of(cfg) == "two_phase"
    batch = prepare(rewards, mask, ref_logp=ref, group_ids=groups, config=cfg)
    flat = lp.reshape(-1)
    with pytest.raises(ValueError, match="batch_coefficients"):
        token_loss(batch, flat, None, cfg)
    batch = batch.updated(batch_coefficients(batch, flat, None, cfg))
    full, _ = token_loss(batch, flat, None, cfg)
    parts = [token_loss(batch.slice(lo, hi), flat[lo:hi], None, cfg)[0] for lo, hi in ((0, 4), (4, 12), (12, 16))]
    torch.testing.assert_close(torch.cat(parts), full)


def test_pair_checks_name_group_ids():
    mask, lp, old, ref = _case([2, 3, 2], 3)
    r = torch.tensor([1.0, 0.0, 1.0], dtype=D)
    for lt in ("copg", "p3o"):
        kw = dict(old_logp=old, ref_logp=ref, loss_type=lt)
        with pytest.raises(ValueError, match=r"group_ids must pair .* got group id 4 with 3 sequence"):
            fusedpg.pg_loss(lp, r, mask, group_ids=torch.tensor([4, 4, 4]), **kw)
        with pytest.raises(ValueError, match=r"group_ids must pair .* got group id 1 with 1 sequence"):
            fusedpg.pg_loss(lp, r, mask, group_ids=torch.tensor([0, 1, 0]), **kw)
        with pytest.raises(ValueError, match="group_ids is required"):
            fusedpg.pg_loss(lp, r, mask, **kw)
        with pytest.raises(ValueError, match="one reward per sequence"):
            fusedpg.pg_loss(lp, torch.zeros(3, 3, dtype=D), mask, group_ids=torch.tensor([0, 0, 1]), **kw)
    with pytest.raises(ValueError, match="copg_beta must be >= 0"):
        make_config(loss_type="copg", copg_beta=-0.1)


def test_a_lone_sequence_has_no_pair_term():
    """A batch of one sequence (the fused op's metric-key probe is one) is its own partner: zero pair term."""
    mask, lp, old, ref = _case([3], 3)
    for lt in ("copg", "p3o"):
        loss, c, _ = _ours(lt, lp, torch.tensor([1.0], dtype=D), mask, old_logp=old, ref_logp=ref,
                           group_ids=torch.tensor([0]))
        assert loss == 0 and not c.any()


# ------------------------------------------------------------------------------------------------------------ P3O
def test_p3o_is_trajectory_ppo_on_the_reward_difference():
    mask, lp, old, _ = _case([3, 4, 2, 4, 3, 1], 4, seed=5, scale=0.25)
    rewards = torch.tensor([1.0, 0.0, 0.4, 0.9, -1.0, 2.0], dtype=D)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    loss, c, _ = _ours("p3o", lp, rewards, mask, old_logp=old, group_ids=groups)
    x = lp.clone().requires_grad_()
    rho = torch.exp(((x - old) * mask).sum(1))
    a = rewards - rewards[torch.tensor([1, 0, 3, 2, 5, 4])]
    per_seq = -torch.minimum(rho * a, rho.clamp(0.8, 1.2) * a)  # PPO clip, separate per response
    ref = per_seq.mean()  # seq-mean-token-mean: one value per sequence, averaged over the 6 sequences
    clipped = ((a > 0) & (rho > 1.2)) | ((a < 0) & (rho < 0.8))
    assert clipped.any() and not clipped.all()  # the case exercises both branches
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(c, _grad(ref, x))


def test_p3o_rejects_a_sequence_level_ratio_option():
    with pytest.raises(ValueError, match="importance_sampling_level must be 'token' for loss_type='p3o'"):
        fusedpg.objective.resolve(make_config(loss_type="p3o", importance_sampling_level="sequence"))


# ------------------------------------------------------------------------------------------------------------ HPT
def test_hpt_is_sft_on_demonstrations_plus_ppo_on_rollouts():
    mask, lp, old, _ = _case([3, 4, 2, 4, 3], 4, seed=6, scale=0.3)
    adv = torch.tensor([0.8, -1.2, 0.0, 0.5, -0.3], dtype=D)
    demo = torch.tensor([False, True, False, False, True])
    loss, c, metrics = _ours("hpt", lp, adv, mask, old_logp=old, truncated=demo, hpt_sft_coef=0.3)
    x = lp.clone().requires_grad_()
    r = torch.exp(x - old)
    ppo = -torch.minimum(r * adv[:, None], r.clamp(0.8, 1.2) * adv[:, None])
    rl, sft = mask * (~demo[:, None]), mask * demo[:, None]
    ref = (ppo * rl).sum() / rl.sum() + 0.3 * (-x * sft).sum() / sft.sum()  # the code's two token means
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(c, _grad(ref, x))
    assert metrics["sft_token"] == pytest.approx(float(sft.sum() / mask.sum()))


def test_hpt_without_demonstrations_is_grpo_token_mean():
    t, _ = make_case("grpo", seed=7)
    kw = dict(old_logp=t["old_logp"])
    a, ca, _ = _ours("hpt", t["logp"], t["advantages"], t["mask"], **kw)
    b, cb, _ = _ours("grpo", t["logp"], t["advantages"], t["mask"], aggregation="token-mean", **kw)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ca, cb)
    with pytest.raises(ValueError, match="mask_truncated_completions must be False for loss_type='hpt'"):
        fusedpg.pg_loss(t["logp"], t["advantages"], t["mask"], loss_type="hpt", mask_truncated_completions=True,
                        truncated=torch.zeros(t["mask"].shape[0], dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match="hpt_sft_coef must be >= 0"):
        make_config(loss_type="hpt", hpt_sft_coef=-1.0)


# ------------------------------------------------------------------------------------------------------- together
@pytest.mark.parametrize("loss_type", ["drpo", "copg", "p3o", "hpt"])
def test_sequence_order_and_packing_do_not_matter(loss_type):
    t, opts = make_case(loss_type, batch=6, width=5, seed=11, empty_rows=0)
    names = ("old_logp", "ref_logp", "group_ids", "truncated")
    kw = {k: t[k] for k in names if k in t}
    loss, c, _ = _ours(loss_type, t["logp"], t["advantages"], t["mask"], **kw, **opts)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    kq = {k: v[perm] for k, v in kw.items()}
    loss_q, c_q, _ = _ours(loss_type, t["logp"][perm], t["advantages"][perm], t["mask"][perm], **kq, **opts)
    torch.testing.assert_close(loss_q, loss)
    torch.testing.assert_close(c_q, c[perm])
    p, _ = make_case(loss_type, batch=6, width=5, seed=11, empty_rows=0, packed=True)
    kp = {k: p[k] for k in names + ("seq_ids",) if k in p}
    loss_p, _, _ = _ours(loss_type, p["logp"], p["advantages"], p["mask"], **kp, **opts)
    torch.testing.assert_close(loss_p, loss)
