"""Valid edge inputs: finite, correct results (empty batches and rows, zero advantages, extreme log-ratios)."""
import math

import pytest
import torch

import fusedpg
from fusedpg.objective import variant_names
from fusedpg.verification.cases_objective import grad_inputs, make_case

TENSORS = ("old_logp", "ref_logp", "rollout_logp", "old_entropy", "group_ids", "step_ids", "token_weights", "seq_ids")
ALL_TERMS = dict(beta=0.1, entropy_coef=0.05)


def run(loss_type, t, opts, **extra):
    lp, h = grad_inputs(t)
    kw = {k: t[k] for k in TENSORS if k in t}
    loss, metrics = fusedpg.pg_loss(lp, t["advantages"], t["mask"], entropy=h, loss_type=loss_type, **kw, **opts,
                                    **extra)
    gl, gh = torch.autograd.grad(loss, [lp, h], allow_unused=True)
    gl = torch.zeros_like(lp) if gl is None else gl
    gh = torch.zeros_like(h) if gh is None else gh
    return loss, metrics, gl, gh


def finite(loss, metrics, *grads):
    assert torch.isfinite(loss)
    for g in grads:
        assert torch.isfinite(g).all()
    for k, v in metrics.items():
        assert torch.isfinite(v).all(), k


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("loss_type", variant_names())
def test_all_masked_batch(loss_type, packed):
    t, opts = make_case(loss_type, batch=3, width=4, packed=packed)
    t["mask"] = torch.zeros_like(t["mask"])
    for name in ("old_logp", "ref_logp", "rollout_logp"):  # garbage where masked must not leak
        t[name] = torch.full_like(t[name], -math.inf)
    t["logp"] = torch.full_like(t["logp"], float("nan"))
    loss, metrics, gl, gh = run(loss_type, t, opts, **ALL_TERMS)
    finite(loss, metrics, gl, gh)
    assert loss == 0 and not gl.any() and not gh.any()
    assert metrics["tokens"] == 0


@pytest.mark.parametrize("loss_type", variant_names())
def test_masked_garbage_does_not_change_anything(loss_type):
    """-inf old/ref/rollout log-probs and NaN current values on masked tokens: same loss and grads as zeros."""
    t, opts = make_case(loss_type, seed=5)
    loss0, m0, g0, h0 = run(loss_type, t, opts, **ALL_TERMS, off_policy_mask_threshold=0.05)
    off = t["mask"] == 0
    t2 = dict(t)
    for name in ("old_logp", "ref_logp", "rollout_logp"):
        t2[name] = t[name].masked_fill(off, -math.inf)
    t2["logp"] = t["logp"].masked_fill(off, float("nan"))
    t2["entropy"] = t["entropy"].masked_fill(off, float("inf"))
    loss1, m1, g1, h1 = run(loss_type, t2, opts, **ALL_TERMS, off_policy_mask_threshold=0.05)
    torch.testing.assert_close(loss1, loss0)
    torch.testing.assert_close(g1, g0)
    torch.testing.assert_close(h1, h0)


@pytest.mark.parametrize("loss_type", variant_names())
def test_zero_advantages(loss_type):
    t, opts = make_case(loss_type, seed=6)
    if loss_type in ("psr", "nsr", "w_reinforce"):
        pytest.skip("advantages are binary rewards for these variants")
    if loss_type in ("empg", "kl_cov", "copg", "drpo"):
        pytest.skip("EMPG's future bonus zeta f(H_next), KL-Cov's kappa |lr| penalty, CoPG's -beta log(pi/pi_ref) "
                    "and DRPO's trust-region penalty do not vanish with A")
    t["advantages"] = torch.zeros_like(t["advantages"])
    loss, metrics, gl, gh = run(loss_type, t, opts)
    finite(loss, metrics, gl, gh)
    assert loss == 0 and not gl.any()
    if "clip_low" in metrics:
        assert metrics["clip_low"] == 0 and metrics["clip_high"] == 0


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("loss_type", variant_names())
def test_extreme_log_ratios_stay_finite(loss_type, sign):
    """Log-ratios (and KL exponents) of +-100 in fp32: clamped at 20 before exp by default."""
    t, opts = make_case(loss_type, seed=7, dtype=torch.float32)
    t["old_logp"] = t["logp"] - sign * 100.0
    t["ref_logp"] = t["logp"] + sign * 100.0
    t["rollout_logp"] = t["old_logp"] + sign * 100.0
    for is_mode in (None, "sequence_truncate"):
        extra = dict(ALL_TERMS, kl_bias_correction=get_ratio(loss_type), rollout_is=is_mode)
        if loss_type == "vespo" and is_mode:
            extra["rollout_is"] = "token_mask"
        loss, metrics, gl, gh = run(loss_type, t, opts, **extra)
        finite(loss, metrics, gl, gh)


def get_ratio(loss_type):
    return fusedpg.objective.get_variant(loss_type).ratio


def test_clamp_zeroes_the_gradient_beyond_it_and_none_reproduces_trl_overflow():
    t, _ = make_case("dapo", seed=8, dtype=torch.float32, empty_rows=0)
    t["old_logp"] = t["logp"] - 100.0
    t["advantages"] = -t["advantages"].abs()  # A < 0, r huge: the unclipped branch binds
    loss, _, gl, _ = run("dapo", t, {})
    assert torch.isfinite(loss) and not gl.any()  # beyond the clamp: constant, zero gradient
    loss_trl, _, _, _ = run("dapo", t, {}, log_ratio_clamp=None)
    assert torch.isinf(loss_trl)  # TRL semantics overflow in fp32 (documented)


def test_bf16_inputs_compute_in_fp32():
    t, opts = make_case("grpo", seed=9)
    lp = t["logp"].bfloat16().requires_grad_()
    loss, metrics = fusedpg.pg_loss(lp, t["advantages"].bfloat16(), t["mask"].bool(),
                                    old_logp=t["old_logp"].bfloat16(), loss_type="grpo")
    assert loss.dtype == torch.float32 and metrics["tokens"].dtype == torch.float32
    (g,) = torch.autograd.grad(loss, lp)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()


def test_empty_inputs():
    for shape in ((0, 5), (3, 0), (0,)):
        lp = torch.zeros(shape, requires_grad=True)
        m = torch.zeros(shape)
        adv = torch.zeros(shape[0]) if len(shape) == 2 else torch.zeros(0)
        kw = {} if len(shape) == 2 else dict(seq_ids=torch.zeros(0, dtype=torch.long))
        loss, metrics = fusedpg.pg_loss(lp, adv, m, old_logp=torch.zeros(shape), loss_type="grpo", **kw)
        assert loss == 0 and metrics["tokens"] == 0
        finite(loss, metrics)


def test_empty_rows_count_in_trl_grpo_but_not_in_verl_seq_mean():
    t, _ = make_case("grpo", seed=10, batch=4, empty_rows=2)
    _, _, b_trl = None, None, fusedpg.objective.prepare(t["advantages"], t["mask"], old_logp=t["old_logp"],
                                                     loss_type="grpo")
    b_verl = fusedpg.objective.prepare(t["advantages"], t["mask"], old_logp=t["old_logp"], loss_type="grpo",
                                    aggregation="seq-mean-token-mean")
    torch.testing.assert_close(b_trl.weights.sum(), torch.tensor(0.5, dtype=torch.float64))  # 2 of 4 rows
    torch.testing.assert_close(b_verl.weights.sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-7, rtol=0)
