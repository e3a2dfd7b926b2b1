"""Per-variant gradients: fp64 gradcheck of token_loss, and c_t / d_t against the closed forms of fusedpg/objective/README.md#variants."""
import math

import pytest
import torch

import fusedpg
from fusedpg.objective import batch_coefficients, make_config, plan_of, prepare, resolve, token_loss, variant_names
from fusedpg.verification.cases_objective import grad_inputs, make_case
from fusedpg.objective.core import kl_estimate
from fusedpg.objective.shaping import gtpo_token_weights

TENSORS = ("old_logp", "ref_logp", "rollout_logp", "old_entropy", "group_ids", "step_ids", "token_weights")


#: Variants whose loss value is a surrogate built with stop-gradients (docs/losses.md#comparing-values-and-gradients): finite differences of the
#: value do not give their gradient, so they are checked against the closed form below instead.
STOP_GRADIENT = {"cispo", "vespo", "alol", "alol_token", "gppo", "gtpo", "gspo_token", "topr", "drpo", "copg"}


@pytest.mark.parametrize("loss_type", sorted(set(variant_names()) - STOP_GRADIENT))
def test_gradcheck(loss_type):
    t, opts = make_case(loss_type, batch=3, width=4, seed=11)
    if loss_type in ("gspo", "luspo"):
        opts.update(epsilon_low=0.3, epsilon_high=0.3)  # GSPO's 3e-4 range would clip everything
    cfg = make_config(loss_type=loss_type, beta=0.03, entropy_coef=0.02, kl_estimator="k3", **opts)
    batch = prepare(t["advantages"], t["mask"], config=cfg, **{k: t[k] for k in TENSORS if k in t})
    lp0, h0 = t["logp"].reshape(-1), t["entropy"].reshape(-1)
    if plan_of(cfg) == "two_phase":  # coefficients are phase-1 constants: hold them fixed
        batch = batch.updated(batch_coefficients(batch, lp0, h0, cfg))
    lp, h = lp0.clone().requires_grad_(), h0.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: token_loss(batch, a, b, cfg)[0], (lp, h), eps=1e-6, atol=1e-6)


def c_d(loss_type, t, **opts):
    """(c, d, batch) of pg_loss on the case: c = dL/dlogp, d = dL/dH, flattened."""
    lp, h = grad_inputs(t)
    kw = {k: t[k] for k in TENSORS if k in t}
    loss, _ = fusedpg.pg_loss(lp, t["advantages"], t["mask"], entropy=h, loss_type=loss_type, **kw, **opts)
    c, d = torch.autograd.grad(loss, [lp, h], allow_unused=True)
    cfg = make_config(loss_type=loss_type, **opts)
    batch = prepare(t["advantages"], t["mask"], config=cfg, **kw)
    zero = torch.zeros(batch.num_tokens, dtype=torch.float64)
    return (zero if c is None else c.reshape(-1)), (zero if d is None else d.reshape(-1)), batch, resolve(cfg)


def flat(t, name):
    return t[name].reshape(-1)


def quantities(t, batch):
    m = batch.mask
    lp = flat(t, "logp") * m
    old = batch.old_logp
    return m, lp, old, torch.exp(lp - old), batch.advantages, batch.weights


@pytest.mark.parametrize("loss_type", ["ppo", "grpo", "dapo", "bnpo", "ngrpo", "dr_grpo"])
def test_ppo_family_closed_form(loss_type):
    t, opts = make_case(loss_type, seed=2, log_ratio_scale=0.6, batch=6, width=8)
    c, d, b, cfg = c_d(loss_type, t, beta=0.05, **opts)
    m, lp, old, r, a, w = quantities(t, b)
    lo, hi = 1 - cfg.epsilon_low, 1 + cfg.epsilon_high
    clipped = ((a > 0) & (r > hi)) | ((a < 0) & (r < lo))
    dual = (a < 0) & (torch.maximum(r, r.clamp(lo, hi)) > cfg.dual_clip_c)
    g = torch.where(clipped | dual, torch.zeros_like(r), -a * r)
    kl_grad = 1 - torch.exp(b.ref_logp - lp)
    torch.testing.assert_close(c, m * (w * g + 0.05 * w * kl_grad))
    assert not d.any()


def test_gppo_gradient_table():
    t, opts = make_case("gppo", seed=3, log_ratio_scale=1.0, batch=6, width=8)
    c, _, b, cfg = c_d("gppo", t)
    m, lp, old, r, a, w = quantities(t, b)
    lo, hi = 1 - cfg.epsilon_low, 1 + cfg.epsilon_high
    g = torch.where((a < 0) & (r < lo), -a * lo, torch.where((a > 0) & (r > hi), -a * hi, -a * r))
    g = torch.where((a < 0) & (r > cfg.dual_clip_c), torch.zeros_like(g), g)
    torch.testing.assert_close(c, w * g)


@pytest.mark.parametrize("mode", ["trl", "verl"])
def test_cispo(mode):
    t, opts = make_case("cispo", seed=4, log_ratio_scale=0.8)
    c, _, b, cfg = c_d("cispo", t, cispo_mode=mode, epsilon_high=1.5 if mode == "trl" else 0.2)
    m, lp, old, r, a, w = quantities(t, b)
    wt = r.clamp(max=1.5) if mode == "trl" else r.clamp(1 - cfg.epsilon_low, 1.2)
    torch.testing.assert_close(c, -w * wt * a)


def test_topr():
    t, _ = make_case("topr", seed=6, log_ratio_scale=0.8)
    c, _, b, cfg = c_d("topr", t)
    m, lp, old, r, a, w = quantities(t, b)
    torch.testing.assert_close(c, -w * torch.where(a >= 0, torch.ones_like(r), r.clamp(max=1.0)) * a)


def test_sapo():
    t, _ = make_case("sapo", seed=5, log_ratio_scale=0.8)
    c, _, b, cfg = c_d("sapo", t)
    m, lp, old, r, a, w = quantities(t, b)
    tau = torch.where(a > 0, torch.full_like(a, 1.0), torch.full_like(a, 1.05))
    s = torch.sigmoid(tau * (r - 1))
    torch.testing.assert_close(c, w * (-a * 4 * s * (1 - s) * r))


@pytest.mark.parametrize("loss_type", ["gspo", "luspo"])
def test_gspo_luspo_sequence_gradient(loss_type):
    t, _ = make_case(loss_type, seed=6, log_ratio_scale=1e-4, batch=5)  # stays inside GSPO's tiny clip range
    c, _, b, cfg = c_d(loss_type, t, epsilon_low=0.5, epsilon_high=0.5)
    m, lp, old, r, a, w = quantities(t, b)
    seq, n = b.seq_local, b.num_seqs
    lens = torch.zeros(n, dtype=m.dtype).index_add(0, seq, m)
    s = torch.exp(torch.zeros(n, dtype=m.dtype).index_add(0, seq, m * (lp - old)) / lens.clamp(min=1))
    per = 1.0 / (lens.clamp(min=1) * n) if loss_type == "gspo" else torch.full_like(lens, 1.0 / n)
    torch.testing.assert_close(c, (-a * s[seq] * m * per[seq]))


def test_geo_mean():
    t, _ = make_case("geo_mean", seed=7, log_ratio_scale=0.5, batch=5)
    c, _, b, cfg = c_d("geo_mean", t)
    m, lp, old, r, a, w = quantities(t, b)
    lr, seq, n = lp - old, b.seq_local, b.num_seqs
    lens = torch.zeros(n, dtype=m.dtype).index_add(0, seq, m).clamp(min=1)
    lr_c = torch.where(a > 0, torch.minimum(lr, lr.clamp(-0.4, 0.4)), torch.maximum(lr, lr.clamp(-0.4, 0.4)))
    rho = torch.exp(torch.zeros(n, dtype=m.dtype).index_add(0, seq, m * lr_c) / lens)[seq]
    free = ((a > 0) & (lr <= 0.4)) | ((a < 0) & (lr >= -0.4))
    torch.testing.assert_close(c, -a * rho * m * free / (lens[seq] * n))


def test_gpg_alol_vespo_gtpo_value_free_gradients():
    t, _ = make_case("gpg", seed=8)
    c, _, b, _ = c_d("gpg", t)
    torch.testing.assert_close(c, -b.advantages * b.weights)
    t, _ = make_case("alol", seed=8)
    c, _, b, cfg = c_d("alol", t)
    m, lp = b.mask, flat(t, "logp") * b.mask
    s = torch.zeros(b.num_seqs, dtype=m.dtype).index_add(0, b.seq_local, m * (lp - b.ref_logp))
    rho = torch.exp(s).clamp(0.1, 1.9)[b.seq_local]
    nonempty = int((torch.zeros(b.num_seqs, dtype=m.dtype).index_add(0, b.seq_local, m) > 0).sum())
    torch.testing.assert_close(c, -b.advantages * rho * m / nonempty)
    t, _ = make_case("gtpo", seed=8)
    c, _, b, cfg = c_d("gtpo", t)
    seq, n = b.seq_local, b.num_seqs
    lens = torch.zeros(n, dtype=m.dtype).index_add(0, seq, b.mask).clamp(min=1)
    hbar = (torch.zeros(n, dtype=m.dtype).index_add(0, seq, b.mask * flat(t, "entropy")) / lens)[seq]
    ahat = torch.where(hbar > 0.7, torch.zeros_like(hbar), b.advantages - 0.1 * hbar)
    torch.testing.assert_close(c, -ahat * flat(t, "token_weights") * b.mask / (lens[seq] * n))


def test_kl_estimator_gradients():
    d = torch.linspace(-3, 3, 13, dtype=torch.float64).requires_grad_()
    ref = torch.zeros_like(d)
    table = {"k1": torch.ones_like(d), "abs": torch.sign(d), "k2": d, "k3": 1 - torch.exp(-d),
             "low_var_kl": 1 - torch.exp(-d), "k1+": d, "k3+": d, "abs+": d, "k2+": d}
    for name, expect in table.items():
        (g,) = torch.autograd.grad(kl_estimate(d, ref, name, None, None).sum(), d)
        torch.testing.assert_close(g, expect.detach(), msg=name)
    x = d.detach()
    values = {"k3+": torch.exp(-x) + x - 1, "abs+": x.abs(), "k1+": x}
    for name, expect in values.items():
        torch.testing.assert_close(kl_estimate(x, ref, name, None, None), expect)
    torch.testing.assert_close(kl_estimate(x * 10, ref, "k3", None, 10.0).max(), torch.tensor(10.0, dtype=x.dtype))


def test_bias_corrected_kl_token_level():
    t, _ = make_case("dapo", seed=9)
    beta = 0.3
    c0, _, b, _ = c_d("dapo", t)
    c1, _, _, _ = c_d("dapo", t, beta=beta, kl_bias_correction=True)
    m, lp, old, r, a, w = quantities(t, b)
    dl = lp - b.ref_logp
    k3 = torch.exp(-dl) + dl - 1
    torch.testing.assert_close(c1 - c0, beta * w * (r * (1 - torch.exp(-dl)) + r * k3))


def test_entropy_bonus_is_the_only_d():
    for agg in ("dapo", "grpo", "token-mean", "seq-mean-token-mean"):
        t, _ = make_case("ppo", seed=10)
        _, d, b, cfg = c_d("ppo", t, entropy_coef=0.25, aggregation=agg)
        torch.testing.assert_close(d, -0.25 * b.entropy_weights)
        if agg in ("dapo", "token-mean", "seq-mean-token-mean"):
            torch.testing.assert_close(b.entropy_weights, b.weights)
    _, d, _, _ = c_d("ppo", t)
    assert not d.any()


def test_dcpo_bounds():
    t, _ = make_case("dcpo", seed=12)
    b = prepare(t["advantages"], t["mask"], old_logp=t["old_logp"], loss_type="dcpo")
    q = torch.exp(b.old_logp)
    lo = 0.5 + 0.5 * torch.sqrt((1 - 4 * 0.2 / q).clamp(min=0))
    hi = (0.5 + 0.5 * torch.sqrt(1 + 4 * 0.28 / q)).clamp(max=10.0)
    torch.testing.assert_close(b.extra["lo"], lo)
    torch.testing.assert_close(b.extra["hi"], hi)


def test_clip_cov_picked_tokens_have_no_gradient_but_stay_in_denominator():
    t, opts = make_case("clip_cov", seed=13, batch=6, width=8)
    c, _, b, cfg = c_d("clip_cov", t, **opts)
    c_ppo, _, b_ppo, _ = c_d("ppo", t, dual_clip_c=math.inf, aggregation="token-mean")
    coef = batch_coefficients(b, flat(t, "logp"), flat(t, "entropy"), cfg)
    keep = coef["keep"]
    assert (keep == 0).sum() == max(int(0.2 * b.mask.sum()), 1)
    torch.testing.assert_close(c, c_ppo * keep)
    again = batch_coefficients(b, flat(t, "logp"), flat(t, "entropy"), cfg)["keep"]
    assert torch.equal(keep, again)  # seeded: reproducible


def test_kl_cov_selected_tokens():
    t, opts = make_case("kl_cov", seed=14, batch=6, width=8)
    c, _, b, cfg = c_d("kl_cov", t, **opts)
    m, lp, old, r, a, w = quantities(t, b)
    sel = batch_coefficients(b, flat(t, "logp"), None, cfg)["kl_cov_sel"]
    assert sel.sum() == max(1, int(m.sum() * 0.2))
    torch.testing.assert_close(c, w * (-a * r + cfg.kl_cov_coef * torch.sign(lp - old) * sel))


def test_top_entropy_trl_and_original():
    t, _ = make_case("dapo", seed=15, batch=6, width=8)
    h = flat(t, "entropy")
    c_all, _, b, _ = c_d("dapo", t)
    c_trl, _, _, _ = c_d("dapo", t, top_entropy_quantile=0.3)
    valid = b.mask > 0
    tau = torch.quantile(h[valid], 0.7)
    keep = (h >= tau) & valid
    torch.testing.assert_close(c_trl, c_all * keep)
    c_orig, _, _, _ = c_d("dapo", t, top_entropy_quantile=0.3, top_entropy_mode="original")
    k = math.ceil(0.3 * int(valid.sum()))
    top = torch.zeros_like(valid)
    idx = torch.nonzero(valid).flatten()
    top[idx[torch.topk(h[idx], k).indices]] = True
    torch.testing.assert_close(c_orig, c_all * top * b.mask.sum() / k)


def test_bapo_bounds_reach_target():
    t, _ = make_case("bapo", seed=16, batch=6, width=8, log_ratio_scale=0.5)
    cfg = make_config(loss_type="bapo", bapo_target=0.6)
    b = prepare(t["advantages"], t["mask"], old_logp=t["old_logp"], config=cfg)
    coef = batch_coefficients(b, flat(t, "logp"), None, cfg)
    c_low, c_high = float(coef["bapo_c_low"]), float(coef["bapo_c_high"])
    assert 0.6 <= c_low <= 0.9 + 1e-9 and 1.2 <= c_high <= 3.0 + 1e-9
    assert float(coef["bapo_balance"]) >= 0.6 or (c_low >= 0.9 - 1e-9 and c_high >= 3.0 - 1e-9)


def test_gspo_token_vespo_alol_token_closed_form():
    t, _ = make_case("gspo_token", seed=17, log_ratio_scale=0.2, batch=5)
    c, _, b, cfg = c_d("gspo_token", t, epsilon_low=0.1, epsilon_high=0.1)
    m, lp, old, r, a, w = quantities(t, b)
    seq, n = b.seq_local, b.num_seqs
    lens = torch.zeros(n, dtype=m.dtype).index_add(0, seq, m).clamp(min=1)
    s = torch.exp(torch.zeros(n, dtype=m.dtype).index_add(0, seq, m * (lp - old)) / lens)[seq]
    clipped = ((a > 0) & (s > 1.1)) | ((a < 0) & (s < 0.9))
    torch.testing.assert_close(c, torch.where(clipped, torch.zeros_like(s), -a * s * w))

    t, _ = make_case("vespo", seed=18, log_ratio_scale=0.2, batch=5)
    c, _, b, cfg = c_d("vespo", t)
    m, lp, old, r, a, w = quantities(t, b)
    log_w = torch.zeros(b.num_seqs, dtype=m.dtype).index_add(0, b.seq_local, m * (lp - old))[b.seq_local]
    k = torch.where(a >= 0, 2.0, 3.0).to(m.dtype)
    lam = torch.where(a >= 0, 3.0, 2.0).to(m.dtype)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    torch.testing.assert_close(c, -phi * a * w)

    t, _ = make_case("alol_token", seed=19)
    c, _, b, cfg = c_d("alol_token", t)
    lp = flat(t, "logp") * b.mask
    rho = torch.exp(lp - b.ref_logp).clamp(0.1, 1.9)
    torch.testing.assert_close(c, -b.advantages * rho * b.weights)


def test_gtpo_token_weights():
    ids = torch.tensor([[1, 2, 3, 9, 0], [1, 2, 4, 9, 0], [1, 5, 3, 9, 9]])
    m = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    a = torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    w, n = gtpo_token_weights(ids, a, m, group_sizes=[3], divide_by_conflicts=False)
    expect = torch.tensor([[2, 2, 1, 2, 0], [0, 0, 1, 0, 0], [2, 1, 1, 1, 2]], dtype=torch.float64)
    torch.testing.assert_close(w, expect)
    torch.testing.assert_close(n, torch.tensor([3.0, 3.0, 2.0], dtype=torch.float64))
    w2, _ = gtpo_token_weights(ids, a, m, group_sizes=[3])
    torch.testing.assert_close(w2, expect / n[:, None])
    w3, n3 = gtpo_token_weights(ids, a, m, torch.tensor([0, 1, 2]))  # every completion alone: no conflicts
    torch.testing.assert_close(w3, m.double())
    assert (n3 == 1).all()


def test_adaptive_entropy_coefficient():
    ctl = fusedpg.objective.AdaptiveEntropyCoef(init=0.01, target=0.2, step=0.005)
    assert ctl.coef == 0.0  # no measured window yet (TRL starts with inf entropy)
    ctl.observe(1.0, 10)  # mean 0.1 <= target: raise
    assert ctl.step() == pytest.approx(0.015) and ctl.coef == pytest.approx(0.015)
    ctl.observe(5.0, 10)  # 0.5 > target: lower, and the bonus is off for the next window
    assert ctl.step() == pytest.approx(0.01) and ctl.coef == 0.0
    other = fusedpg.objective.AdaptiveEntropyCoef()
    other.load_state_dict(ctl.state_dict())
    assert other.state_dict() == ctl.state_dict()
