"""The engine contract: prepare -> (batch_coefficients) -> token_loss on sequence-aligned slices == pg_loss."""
import math

import pytest
import torch

import fusedpg
from fusedpg.objective import (PGLossConfig, batch_coefficients, finalize_metrics, make_config, merge_metrics, plan_of,
                            prepare, token_loss, variant_names)
from fusedpg.verification.cases_objective import grad_inputs, make_case

TENSORS = ("old_logp", "ref_logp", "rollout_logp", "old_entropy", "seq_ids", "group_ids", "step_ids",
           "token_weights")

# Options on top of each variant that exercise the composed terms (KL, entropy bonus, OPSM, rollout IS).
EXTRAS = [
    {},
    dict(beta=0.05, entropy_coef=0.01),
    dict(beta=0.05, kl_estimator="low_var_kl+", off_policy_mask_threshold=0.02),
]


def _prepare(t, cfg):
    kw = {k: t[k] for k in TENSORS if k in t}
    return prepare(t["advantages"], t["mask"], config=cfg, **kw)


def chunked_loss(t, cfg, cut_every=2):
    """Full-batch phase 1 (if two-phase), then token_loss on slices of ``cut_every`` sequences each."""
    batch = _prepare(t, cfg)
    lp, h = grad_inputs(t)
    lpf, hf = lp.reshape(-1), h.reshape(-1)
    if plan_of(cfg) == "two_phase":
        batch = batch.updated(batch_coefficients(batch, lpf.detach(), hf.detach(), cfg))
    total, sums = 0.0, {}
    offs = batch.offsets
    for a in range(0, len(offs) - 1, cut_every):
        lo, hi = offs[a], offs[min(a + cut_every, len(offs) - 1)]
        c, s = token_loss(batch.slice(lo, hi), lpf[lo:hi], hf[lo:hi], cfg)
        assert c.shape == (hi - lo,)
        total = total + c.sum()
        sums = merge_metrics(sums, s)
    return total, finalize_metrics(sums), lp, h


def full_loss(t, cfg):
    lp, h = grad_inputs(t)
    kw = {k: t[k] for k in TENSORS if k in t}
    loss, metrics = fusedpg.pg_loss(lp, t["advantages"], t["mask"], entropy=h, config=cfg, **kw)
    return loss, metrics, lp, h


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("extra", range(len(EXTRAS)))
@pytest.mark.parametrize("loss_type", variant_names())
def test_chunks_sum_to_full_loss(loss_type, extra, packed):
    t, opts = make_case(loss_type, batch=5, width=6, packed=packed, seed=hash((loss_type, extra)) % 1000)
    cfg = make_config(loss_type=loss_type, **opts, **EXTRAS[extra])
    loss, metrics, lp, h = full_loss(t, cfg)
    total, msums, lp2, h2 = chunked_loss(t, cfg)
    torch.testing.assert_close(total, loss, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad(loss, [lp, h], allow_unused=True)
    g2 = torch.autograd.grad(total, [lp2, h2], allow_unused=True)
    for a, b in zip(g1, g2):
        if a is None or b is None:
            assert (a is None or not a.any()) and (b is None or not b.any())
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for k, v in metrics.items():
        torch.testing.assert_close(msums[k], v, rtol=1e-12, atol=1e-12, msg=k)


def test_masked_tokens_get_zero_gradient():
    for loss_type in variant_names():
        t, opts = make_case(loss_type, seed=3)
        loss, _, lp, h = full_loss(t, make_config(loss_type=loss_type, beta=0.1, entropy_coef=0.1, **opts))
        g = torch.autograd.grad(loss, [lp, h], allow_unused=True)
        off = t["mask"] == 0
        for x in g:
            assert x is None or not x[off].any(), loss_type


def test_plan_classes():
    one = {"ppo", "grpo", "dr_grpo", "dapo", "bnpo", "bnpo_adv", "ngrpo", "aepo", "psr", "nsr", "w_reinforce",
           "gppo", "dcpo", "cispo", "sapo", "gpg", "alol_token", "topr", "hpt"}
    seq = {"gspo", "gspo_token", "luspo", "geo_mean", "vespo", "alol", "gtpo", "p3o"}
    two = {"bapo", "clip_cov", "kl_cov", "top_entropy", "d3s", "empg", "drpo", "copg"}
    assert one | seq | two == set(variant_names())
    kw = {"dr_grpo": dict(max_completion_length=8)}
    for names, plan in ((one, "one_pass"), (seq, "sequence"), (two, "two_phase")):
        for n in names:
            assert plan_of(PGLossConfig(loss_type=n, **kw.get(n, {}))) == plan, n
    assert plan_of(PGLossConfig(loss_type="gtpo", shaping_entropy="old")) == "one_pass"
    assert plan_of(PGLossConfig(loss_type="d3s", shaping_entropy="old")) == "one_pass"
    assert plan_of(PGLossConfig(loss_type="grpo", importance_sampling_level="sequence")) == "sequence"
    assert plan_of(PGLossConfig(loss_type="dapo", off_policy_mask_threshold=0.5)) == "sequence"
    assert plan_of(PGLossConfig(loss_type="dapo", top_entropy_quantile=0.2)) == "two_phase"


def test_slice_must_align_with_sequences():
    t, opts = make_case("grpo", batch=3, width=4)
    batch = _prepare(t, make_config(loss_type="grpo"))
    assert batch.offsets == (0, 4, 8, 12)
    with pytest.raises(ValueError, match="sequence boundaries"):
        batch.slice(0, 5)
    s = batch.slice(4, 12)
    assert s.num_tokens == 8 and s.num_seqs == 2 and s.offsets == (0, 4, 8)
    assert s.seq_local.tolist() == [0] * 4 + [1] * 4


def test_two_phase_requires_coefficients():
    t, opts = make_case("clip_cov")
    cfg = make_config(loss_type="clip_cov", **opts)
    batch = _prepare(t, cfg)
    with pytest.raises(ValueError, match="batch_coefficients"):
        token_loss(batch, t["logp"].reshape(-1), t["entropy"].reshape(-1), cfg)


def test_keywords_override_config():
    cfg = PGLossConfig(loss_type="grpo", epsilon_high=0.3)
    t, _ = make_case("grpo")
    l1, _ = fusedpg.pg_loss(t["logp"], t["advantages"], t["mask"], old_logp=t["old_logp"], config=cfg, beta=0.1,
                            ref_logp=t["ref_logp"])
    l2, _ = fusedpg.pg_loss(t["logp"], t["advantages"], t["mask"], old_logp=t["old_logp"], loss_type="grpo",
                            epsilon_high=0.3, beta=0.1, ref_logp=t["ref_logp"])
    assert l1 == l2
    assert make_config(cfg, epsilon_high=0.5).epsilon_high == 0.5 and cfg.epsilon_high == 0.3
    # defaults are resolved lazily, per variant
    assert make_config(PGLossConfig(loss_type="dapo"), loss_type="grpo").epsilon_high is None
    assert math.isinf(fusedpg.objective.resolve(PGLossConfig(loss_type="grpo")).dual_clip_c)
    assert fusedpg.objective.resolve(PGLossConfig(loss_type="ppo")).dual_clip_c == 3.0
