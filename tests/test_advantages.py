"""Advantage estimators (docs/losses.md#advantage-estimators) against direct per-group loops."""
import math

import pytest
import torch

from fusedpg import advantages as adv


def ragged(seed=0, n=13, groups=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, groups, (n,), generator=g) * 7 + 3  # arbitrary ids, any order
    ids[0] = 99  # a singleton group
    return torch.randn(n, generator=g, dtype=torch.float64), ids


def loop(r, ids, fn):
    out = torch.empty_like(r)
    for gid in ids.unique():
        sel = ids == gid
        out[sel] = fn(r[sel])
    return out


@pytest.mark.parametrize("scale", ["group", "none"])
def test_group_normalized_verl_and_trl_styles(scale):
    r, ids = ragged()

    def verl(x):
        if x.numel() == 1:
            return x.clone() if scale == "none" else (x - 0) / (1 + 1e-6)
        y = x - x.mean()
        return y / (x.std() + 1e-6) if scale == "group" else y

    def trl(x):
        if x.numel() == 1:
            return torch.zeros_like(x)
        y = x - x.mean()
        return y / (x.std() + 1e-4) if scale == "group" else y

    torch.testing.assert_close(adv.group_normalized_advantages(r, ids, scale=scale), loop(r, ids, verl))
    torch.testing.assert_close(adv.group_normalized_advantages(r, ids, scale=scale, eps=1e-4, singleton="zero"),
                               loop(r, ids, trl))


def test_batch_scale_nan_rewards_and_sizes():
    r = torch.tensor([1.0, 0.0, float("nan"), 1.0, 1.0, 0.0], dtype=torch.float64)
    a = adv.group_normalized_advantages(r, group_sizes=[3, 3], eps=1e-4, singleton="zero")
    valid = r[:2]
    torch.testing.assert_close(a[:2], (valid - valid.mean()) / (valid.std() + 1e-4))
    assert a[2] == 0
    b = adv.group_normalized_advantages(r, group_sizes=[3, 3], scale="batch", eps=1e-4)
    sd = r[~torch.isnan(r)].std()
    torch.testing.assert_close(b[3:], (r[3:] - r[3:].mean()) / (sd + 1e-4))
    ids = torch.tensor([5, 5, 5, 2, 2, 2])
    torch.testing.assert_close(adv.group_normalized_advantages(r, ids),
                               adv.group_normalized_advantages(r, group_sizes=[3, 3]))
    torch.testing.assert_close(adv.dr_grpo_advantages(r, ids), adv.group_normalized_advantages(r, ids, scale="none"))


def test_rloo():
    r, ids = ragged(1)
    expect = loop(r, ids, lambda x: x - (x.sum() - x) / (x.numel() - 1) if x.numel() > 1 else torch.zeros_like(x))
    torch.testing.assert_close(adv.rloo_advantages(r, ids), expect)
    single = adv.rloo_advantages(r, ids, singleton="reward")
    assert single[0] == r[0]


def test_ngrpo():
    r = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.5], dtype=torch.float64)
    sizes = [3, 3, 2, 1]
    a = adv.ngrpo_advantages(r, group_sizes=sizes)

    def one(x):
        y = torch.cat([x, torch.ones(1, dtype=x.dtype)])
        return (x - y.mean()) / (y.std() + 1e-6)

    torch.testing.assert_close(a[:8], torch.cat([one(r[:3]), one(r[3:6]), one(r[6:8])]))
    assert (a[:3] < 0).all() and (a[3:6] == 0).all()  # all wrong: negative; all correct: 0
    torch.testing.assert_close(a[8], r[8] / (1 + 1e-6))  # singleton: mean 0, std 1


def test_bnpo_beta_normalisation():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    sizes = [3, 3, 3]
    a = adv.bnpo_advantages(r, group_sizes=sizes)
    p = torch.tensor([2 / 3, 1 / 3, 2 / 3], dtype=torch.float64)
    mu, var = p.mean().item(), p.var().item()
    k = mu * (1 - mu) / var - 1
    al, be = max(1 + k * mu / 3, 1), max(1 + k * (1 - mu) / 3, 1)
    logB = math.lgamma(al) + math.lgamma(be) - math.lgamma(al + be)
    f = [math.exp((al - 1) * math.log(x) + (be - 1) * math.log(1 - x) - logB) for x in p.tolist()]
    expect = torch.cat([min(1 / f[i], 1e6) * (r[3 * i:3 * i + 3] - p[i]) for i in range(3)])
    torch.testing.assert_close(a, expect)
    one = adv.bnpo_advantages(r[:3], group_sizes=[3])  # a single group: mean 0, variance 1 -> alpha = beta = 1
    torch.testing.assert_close(one, r[:3] - 2 / 3)


def test_gpg_and_psr_nsr():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    a = adv.gpg_advantages(r, group_sizes=[3, 3])
    alpha = 6 / 3
    torch.testing.assert_close(a, alpha * torch.cat([r[:3] - r[:3].mean(), r[3:] - r[3:].mean()]))
    torch.testing.assert_close(adv.gpg_advantages(r, group_sizes=[3, 3], alpha=1.5, f_norm=2.0), a / alpha * 1.5 / 2)
    torch.testing.assert_close(adv.psr_nsr_advantages(r, "psr"), r)
    torch.testing.assert_close(adv.psr_nsr_advantages(r, "nsr"), r - 1)
    torch.testing.assert_close(adv.psr_nsr_advantages(r, "w_reinforce", 0.1), torch.where(r > 0, 0.1, -1.0).double())


def test_spo_tracker():
    t = adv.SPOTracker()
    t.init_prompt("a", [1, 1, 0, 1])
    n_init = 1 / (1 - 0.875)
    assert t.alpha["a"] == pytest.approx(n_init * 3.5 / 5) and t.beta["a"] == pytest.approx(n_init * 1.5 / 5)
    r = torch.tensor([1.0, 0.0], dtype=torch.float64)
    raw = r - t.baseline(["a", "b"])
    torch.testing.assert_close(t.advantages(["a", "b"], r, standardize=False), raw)
    torch.testing.assert_close(t.advantages(["a", "b"], r), (raw - raw.mean()) / (raw.std() + 1e-8))
    a0 = t.alpha["a"]
    t.update(["a", "b"], r, divergence=torch.tensor([0.06, 10.0]))
    assert t.alpha["a"] == pytest.approx(0.875 * a0 + 1.0)  # 2^-1 = 0.5 clipped up to rho_min
    assert t.beta["b"] == pytest.approx(0.875 * 0.5 + 1.0)
    t.update(["c"], torch.tensor([1.0], dtype=torch.float64))
    assert t.alpha["c"] == pytest.approx(0.96 * 0.5 + 1.0)
    u = adv.SPOTracker()
    u.load_state_dict(t.state_dict())
    assert u.state_dict() == t.state_dict()


def test_dcpo_smooth_advantage():
    sas = adv.DCPOSmoothAdvantage()
    r1 = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    ids = [7, 7, 7, 8, 8, 8]
    a1 = sas(ids, r1)
    x = r1[:3]
    torch.testing.assert_close(a1[:3], (x - x.mean()) / x.std())  # first visit: A_tot = A_new
    assert (a1[3:] == 0).all()  # zero variance, first visit
    r2 = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    state = sas.state_dict()
    a2 = sas(ids, r2)
    i = 2
    mu_t = (mu_o := x.mean().item()) * 0.5 + 0.5 * 1.0
    var_t = (x.var().item() + 0.0 + 0.5 * (1.0 - mu_o) ** 2) / 2
    a_tot = (r2[:3] - mu_t) / math.sqrt(var_t)
    torch.testing.assert_close(a2[:3], a_tot / i)  # zero-variance step: A = A_tot / i
    other = adv.DCPOSmoothAdvantage()
    other.load_state_dict(state)
    torch.testing.assert_close(other(ids, r2), a2)


def test_empg_shaping():
    a = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    h = torch.tensor([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    m = torch.ones_like(a)
    steps = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])
    out = adv.empg_advantages(a, h, m, step_ids=steps, zeta=0.1)
    hn = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64) * (2 / (2 + 1e-8))  # steps (0,0), (0,1), (1,0)
    g = torch.exp(-hn) / torch.exp(-hn).mean()
    expect = torch.tensor([[g[0] + 0.1 * math.exp(-hn[1].item())] * 2 + [g[1]] * 2, [-g[2]] * 4],
                          dtype=torch.float64)
    torch.testing.assert_close(out, expect)


def test_bad_group_arguments():
    r = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="group_ids .* or group_sizes"):
        adv.group_normalized_advantages(r)
    with pytest.raises(ValueError, match="group_sizes"):
        adv.rloo_advantages(r, group_sizes=[3, 3])
    with pytest.raises(ValueError, match="group_ids"):
        adv.ngrpo_advantages(r, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="group_ids"):
        adv.bnpo_advantages(r, torch.zeros(4))
    with pytest.raises(ValueError, match="rewards"):
        adv.gpg_advantages(r[None], group_sizes=[4])
    with pytest.raises(ValueError, match="scale"):
        adv.group_normalized_advantages(r, group_sizes=[4], scale="std")


def test_normalize_then_sum():
    r = torch.tensor([[1.0, 0.0], [0.0, float("nan")], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    out = adv.normalize_then_sum(r, group_sizes=[2, 2], weights=[1.0, 0.5])
    cols = []
    for j in range(2):
        x = r[:, j].clone()
        y = torch.empty_like(x)
        for s in (slice(0, 2), slice(2, 4)):
            v = x[s][~torch.isnan(x[s])]
            sd = v.std() if v.numel() > 1 else torch.tensor(float("nan"), dtype=x.dtype)
            y[s] = (x[s] - v.mean()) / (sd + 1e-4)
        cols.append(y)
    summed = (torch.stack(cols, 1) * torch.tensor([1.0, 0.5], dtype=torch.float64)).nansum(1)
    torch.testing.assert_close(out, (summed - summed.mean()) / (summed.std() + 1e-4))


def test_dapo_helpers():
    pen = adv.dapo_overlong_penalty(torch.tensor([100, 16384, 18432, 20480, 30000]), 20480, 4096)
    torch.testing.assert_close(pen, torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0], dtype=torch.float64))
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5], dtype=torch.float64)
    flags = adv.zero_variance_groups(r, torch.tensor([3, 3, 1, 1, 8]))
    assert flags.tolist() == [True, True, False, False, True]


def test_empg_empty_step_stays_finite():
    """A fully masked sequence is an empty step: it is left out of the min-max range and gets no inf/NaN (its
    exp() used to overflow, and the previous step's future term became 0 * inf = NaN)."""
    a = torch.tensor([-0.7, 0.4], dtype=torch.float64)[:, None].expand(2, 3).contiguous()
    h = torch.tensor([[0.6, 0.6, 0.6], [1.8, 1.8, 1.8]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    out = adv.empg_advantages(a, h, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], a[0])  # the one non-empty step: g = 1, no future term
