"""The fused PG loss from hidden states against the materialised float64 reference, for every variant, both
backends, both plans, and the inputs the loss-engine issue names."""
import pytest
import torch

import fusedpg
from fusedpg.objective import variant_names
from fusedpg.verification.cases_pg import check_fused_pg, fused_inputs

IMPLS = ["torch", "triton"]
ALL = variant_names()
SMALL_CHUNK = 50 * 4 * 5  # five rows of a V = 50 fp32 logits chunk: many sequence-aligned chunks


def _assert_ok(results):
    bad = [r.report() for r in results if not r.ok]
    assert not bad, "\n".join(bad)
    assert any(r.name.endswith(".d_weight") for r in results)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", ALL)
def test_every_variant_matches_reference_fp32(loss_type, impl):
    _assert_ok(check_fused_pg(loss_type, impl=impl, dtype=torch.float32, chunk_bytes=SMALL_CHUNK,
                              options=dict(beta=0.04, entropy_coef=0.01) if loss_type in ("dapo", "grpo") else None))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "gspo", "cispo", "clip_cov", "sapo"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(loss_type, impl, dtype):
    _assert_ok(check_fused_pg(loss_type, impl=impl, dtype=dtype, chunk_bytes=SMALL_CHUNK, seed=3))


# "one_pass" and "sequence" both finish the gradients in the forward (chunks hold whole sequences)
ONE_PASS = [lt for lt in ALL if fusedpg.fused_plan(loss_type=lt, **fused_inputs(lt)["options"]) != "two_phase"]


def test_most_variants_run_one_pass():
    assert {"dapo", "grpo", "dr_grpo", "bnpo", "gspo", "geo_mean", "cispo", "gppo", "dcpo", "sapo"} <= set(ONE_PASS)
    assert not {"clip_cov", "kl_cov", "bapo"} & set(ONE_PASS)


@pytest.mark.parametrize("loss_type", ONE_PASS)
def test_plans_agree(loss_type):
    """The one-pass plan (checked against the reference above) and the forced two-phase plan agree."""
    x = fused_inputs(loss_type, seed=5)
    runs = []
    for plan in ("one_pass", "two_phase"):
        h, w = x["hidden"].float().requires_grad_(), x["weight"].float().requires_grad_()
        t = {k: (v.float() if v.is_floating_point() else v) for k, v in x["tensors"].items()}
        adv, mask = t.pop("advantages"), t.pop("mask")
        loss, _ = fusedpg.fused_linear_pg_loss(h, w, x["targets"], adv, mask, loss_type=loss_type, plan=plan,
                                               chunk_bytes=SMALL_CHUNK, **t, **x["options"])
        loss.backward()
        runs.append((loss.detach(), h.grad, w.grad))
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_plan_is_chosen_and_inspectable():
    assert fusedpg.fused_plan(loss_type="dapo") == "one_pass"
    assert fusedpg.fused_plan(loss_type="clip_cov") == "two_phase"
    assert fusedpg.fused_plan(loss_type="grpo", top_entropy_quantile=0.2) == "two_phase"
    assert fusedpg.FusedLinearPGLoss(loss_type="kl_cov").plan == "two_phase"
    x = fused_inputs("clip_cov")
    with pytest.raises(ValueError, match="plan"):
        fusedpg.fused_linear_pg_loss(x["hidden"].float(), x["weight"].float(), x["targets"],
                                     x["tensors"]["advantages"].float(), x["tensors"]["mask"], loss_type="clip_cov",
                                     old_logp=x["tensors"]["old_logp"].float(), plan="one_pass", **x["options"])


def _simple(loss_type="dapo", **over):
    x = fused_inputs(loss_type)
    h, w = x["hidden"].float().requires_grad_(), x["weight"].float().requires_grad_()
    t = {k: (v.float() if v.is_floating_point() else v) for k, v in x["tensors"].items() if k in ("advantages", "mask", "old_logp")}
    t.update(over)
    return h, w, x["targets"], t


def test_all_masked_gives_zero_loss_and_grads():
    h, w, y, t = _simple()
    t["mask"] = torch.zeros_like(t["mask"])
    loss, met = fusedpg.fused_linear_pg_loss(h, w, y, t.pop("advantages"), t.pop("mask"), **t)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(h.grad == 0) and torch.all(w.grad == 0)
    assert all(torch.isfinite(v).all() for v in met.values() if isinstance(v, torch.Tensor))


def test_token_stats_and_module_form():
    h, w, y, t = _simple()
    adv, mask = t.pop("advantages"), t.pop("mask")
    loss, met = fusedpg.fused_linear_pg_loss(h, w, y, adv, mask, return_token_stats=True, **t)
    logp, ent = fusedpg.linear_logprob_entropy(h, w, torch.where(mask.bool(), y, -100))
    torch.testing.assert_close(met["logp"], logp.double() if met["logp"].dtype == torch.float64 else logp)
    torch.testing.assert_close(met["entropy"], ent)
    module_loss, _ = fusedpg.FusedLinearPGLoss(loss_type="dapo")(h, w, y, adv, mask, **t)
    torch.testing.assert_close(module_loss, loss)


def test_no_grad_call_computes_loss_only():
    h, w, y, t = _simple()
    adv, mask = t.pop("advantages"), t.pop("mask")
    with torch.no_grad():
        loss, _ = fusedpg.fused_linear_pg_loss(h, w, y, adv, mask, **t)
    ref, _ = fusedpg.fused_linear_pg_loss(h, w, y, adv, mask, **t)
    torch.testing.assert_close(loss, ref.detach())


def test_bad_inputs_name_the_argument():
    h, w, y, t = _simple()
    adv, mask = t.pop("advantages"), t.pop("mask")
    with pytest.raises(ValueError, match="mask"):
        fusedpg.fused_linear_pg_loss(h, w, y, adv, mask[:, :-1], **t)
    bad = y.clone()
    bad[mask.bool()] = 10_000
    with pytest.raises(ValueError, match="targets"):
        fusedpg.fused_linear_pg_loss(h, w, bad, adv, mask, **t)
    with pytest.raises(ValueError, match="loss_type"):
        fusedpg.fused_linear_pg_loss(h, w, y, adv, mask, loss_type="nope", **t)
    with pytest.raises(ValueError, match="plan"):
        fusedpg.fused_linear_pg_loss(h, w, y, adv, mask, plan="three_phase", **t)


def test_masked_targets_may_be_ignore_index():
    h, w, y, t = _simple()
    adv, mask = t.pop("advantages"), t.pop("mask")
    y2 = torch.where(mask.bool(), y, torch.full_like(y, -100))
    a, _ = fusedpg.fused_linear_pg_loss(h, w, y, adv, mask, **t)
    b, _ = fusedpg.fused_linear_pg_loss(h, w, y2, adv, mask, **t)
    torch.testing.assert_close(a, b)


EPILOGUE_CASES = [
    ("dapo", {}), ("grpo", dict(beta=0.04, entropy_coef=0.01)), ("ppo", dict(beta=0.1, kl_estimator="k1")),
    ("grpo", dict(delta=1.5, beta=0.1, kl_estimator="k2")), ("gppo", {}), ("dcpo", {}), ("cispo", {}),
    ("cispo", dict(cispo_mode="verl")), ("sapo", dict(beta=0.04, kl_estimator="abs")),
    ("bnpo", dict(beta=0.04, kl_estimator="k3+")), ("dr_grpo", dict(kl_value_clamp=0.01, beta=1.0)), ("nsr", {}),
    ("ngrpo", {}),
    # sequence-level ratios: statistics kernel, sequence terms kernel between two segment sums, gradient kernel
    ("gspo", {}), ("gspo_token", {}), ("luspo", {}), ("luspo", dict(luspo_unmasked=True)),
    ("grpo", dict(importance_sampling_level="sequence", beta=0.04, entropy_coef=0.01)),
    ("dapo", dict(importance_sampling_level="sequence_token", delta=2.0, beta=0.1, kl_estimator="k2")),
    ("gspo", dict(dual_clip_c=3.0)),
    # bias-corrected KL (DeepSeek-V3.2): r * KL with r differentiated or detached
    ("grpo", dict(beta=0.1, kl_bias_correction=True)),
    ("dapo", dict(beta=0.1, kl_bias_correction=True, kl_bias_correction_detach=True)),
    ("cispo", dict(beta=0.04, kl_bias_correction=True, kl_estimator="k1")),
    # GMPO: log-space token clip (host), geometric-mean ratio and -A_bar rho in the sequence-terms kernel
    ("geo_mean", {}), ("geo_mean", dict(beta=0.04, entropy_coef=0.01)), ("geo_mean", dict(epsilon_low=0.05,
                                                                                          epsilon_high=0.05)),
]


def _spec(loss_type, options):
    from fusedpg.objective import epilogue_spec, make_config, prepare

    x = fused_inputs(loss_type)
    cfg = make_config(None, loss_type, **{**x["options"], **options})
    t = x["tensors"]
    return epilogue_spec(cfg, prepare(t["advantages"], t["mask"], old_logp=t["old_logp"], ref_logp=t["ref_logp"],
                                      config=cfg))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type,options", EPILOGUE_CASES)
def test_triton_one_pass_epilogue(loss_type, options, dtype):
    """The in-kernel loss math (ratio, clip, dual clip, delta, KL, entropy) against the loss layer."""
    assert _spec(loss_type, options) is not None
    _assert_ok(check_fused_pg(loss_type, impl="triton", dtype=dtype, options=options, chunk_bytes=SMALL_CHUNK))


@pytest.mark.parametrize("loss_type,options", [("grpo", dict(off_policy_mask_threshold=0.5)),
                                               ("gspo", dict(beta=0.1, kl_bias_correction=True)), ("vespo", {}),
                                               ("alol", {}), ("cispo", dict(importance_sampling_level="sequence"))])
def test_epilogue_declines_what_it_does_not_cover(loss_type, options):
    assert _spec(loss_type, options) is None


@pytest.mark.parametrize("loss_type", ["grpo", "gspo", "clip_cov"])
def test_empty_batch_has_the_metric_keys_of_any_batch(loss_type):
    """B = 0: a zero loss that backpropagates, and the keys (all zero) a non-empty batch would return."""
    h_dim, v = 8, 13
    w = torch.randn(v, h_dim, requires_grad=True)

    def call(b):
        x = torch.randn(b, 5, h_dim, requires_grad=True)
        return fusedpg.fused_linear_pg_loss(x, w, torch.zeros(b, 5, dtype=torch.long), torch.zeros(b),
                                            torch.ones(b, 5), old_logp=torch.full((b, 5), -2.0), loss_type=loss_type)

    loss, metrics = call(0)
    loss.backward()
    assert loss.item() == 0.0 and not w.grad.any()
    assert set(metrics) == set(call(2)[1])
    assert all(v.item() == 0.0 for v in metrics.values())
