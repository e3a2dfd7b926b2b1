"""Bad input: a ValueError / TypeError that names the argument, for every case the issue lists."""
import pytest
import torch

import fusedpg
from fusedpg.objective import PGLossConfig, prepare, token_loss, variant_names
from fusedpg.verification.cases_objective import make_case


@pytest.fixture
def case():
    t, _ = make_case("grpo", batch=3, width=4)
    return t


def call(t, **kw):
    base = dict(old_logp=t["old_logp"])
    base.update(kw)
    return fusedpg.pg_loss(t["logp"], t["advantages"], t["mask"], **base)


def test_unknown_loss_type_lists_valid_ones(case):
    with pytest.raises(ValueError, match="loss_type") as e:
        call(case, loss_type="ppo2")
    for name in variant_names():
        assert name in str(e.value)
    with pytest.raises(TypeError, match="loss_type"):
        PGLossConfig(loss_type=3)


def test_unknown_option_and_bad_choice(case):
    with pytest.raises(TypeError, match="unknown option.*epsilon"):
        call(case, epsilon=0.2)
    with pytest.raises(ValueError, match="kl_estimator"):
        call(case, kl_estimator="k4")
    with pytest.raises(ValueError, match="aggregation"):
        call(case, aggregation="mean")
    with pytest.raises(TypeError, match="config"):
        call(case, config={"loss_type": "grpo"})


def test_unknown_option_message_is_short_with_a_suggestion(case):
    with pytest.raises(TypeError) as e:
        call(case, epsilon=0.2)  # TRL's spelling
    msg = str(e.value)
    assert "epsilon_low" in msg and "epsilon_high" in msg and len(msg) < 200, msg
    with pytest.raises(TypeError, match="did you mean 'entropy_coef'") as e:
        call(case, entropy_coeff_=0.1)
    assert len(str(e.value)) < 200
    with pytest.raises(TypeError, match="kl_loss_coef.*beta"):
        call(case, kl_loss_coef=0.1)  # verl's spelling
    with pytest.raises(TypeError, match="unknown option 'zzz': see fusedpg.PGLossConfig"):
        call(case, zzz=1)


@pytest.mark.parametrize("name,value,want", [("beta", -1.0, ">= 0"), ("epsilon_low", -0.1, ">= 0"),
                                             ("top_entropy_quantile", 0.0, "in \\(0, 1\\]"),
                                             ("log_ratio_clamp", 0.0, "> 0"), ("num_sequences", -2.0, ">= 0")])
def test_out_of_range_options_name_the_bound(case, name, value, want):
    with pytest.raises(ValueError, match=f"{name} must be {want}, got {value}"):
        call(case, **{name: value})


def test_keywords_override_config():
    # documented in make_config: the keyword wins over the config's field
    from fusedpg.objective.config import make_config

    cfg = make_config(PGLossConfig(loss_type="grpo", beta=0.5), beta=0.1)
    assert cfg.beta == 0.1 and cfg.loss_type == "grpo"
    assert make_config(cfg, "dapo").loss_type == "dapo"


@pytest.mark.parametrize("name,shape", [("advantages", (3, 5)), ("advantages", (2,)), ("old_logp", (3, 3)),
                                        ("ref_logp", (4, 4)), ("rollout_logp", (12,)), ("old_entropy", (3,))])
def test_shape_mismatch_names_the_argument(case, name, shape):
    kw = dict(beta=0.1, ref_logp=case["ref_logp"], off_policy_mask_threshold=0.1, rollout_logp=case["rollout_logp"],
              old_entropy=case["old_entropy"])
    kw[name] = torch.zeros(shape, dtype=torch.float64)
    t = dict(case)
    if name == "advantages":
        t["advantages"] = kw.pop(name)
    with pytest.raises(ValueError, match=name):
        call(t, **kw)


def test_logp_and_entropy_shape_and_dtype(case):
    with pytest.raises(ValueError, match="logp"):
        fusedpg.pg_loss(case["logp"][:, :3], case["advantages"], case["mask"], old_logp=case["old_logp"])
    with pytest.raises(ValueError, match="entropy"):
        call(case, entropy=case["entropy"].T)
    with pytest.raises(TypeError, match="logp"):
        fusedpg.pg_loss(case["logp"].long(), case["advantages"], case["mask"], old_logp=case["old_logp"])
    with pytest.raises(TypeError, match="advantages"):
        fusedpg.pg_loss(case["logp"], case["advantages"].long(), case["mask"], old_logp=case["old_logp"])


def test_non_binary_masks(case):
    bad = case["mask"].clone()
    bad[0, 0] = 0.5
    with pytest.raises(ValueError, match="mask must be binary.*0.5"):
        fusedpg.pg_loss(case["logp"], case["advantages"], bad, old_logp=case["old_logp"])
    with pytest.raises(ValueError, match="truncated must be binary"):
        call(case, truncated=torch.tensor([0.0, 2.0, 1.0]), mask_truncated_completions=True)
    with pytest.raises(ValueError, match="advantages must hold binary rewards"):
        call(case, loss_type="psr")


@pytest.mark.parametrize("options,name", [
    (dict(loss_type="dapo", delta=1.2), "delta"),  # <= 1 + 0.28
    (dict(loss_type="grpo", delta=1.2, epsilon_high=0.2), "delta"),
    (dict(loss_type="cispo", delta=3.0), "delta"),
    (dict(loss_type="ppo", dual_clip_c=0.9), "dual_clip_c"),
    (dict(loss_type="grpo", aggregation="dr_grpo"), "max_completion_length"),
    (dict(loss_type="gpg", importance_sampling_level="sequence"), "importance_sampling_level"),
    (dict(loss_type="vespo", importance_sampling_level="sequence"), "importance_sampling_level"),
    (dict(loss_type="geo_mean", importance_sampling_level="sequence_token"), "importance_sampling_level"),
    (dict(loss_type="vespo", rollout_is="sequence_mask"), "rollout_is"),
    (dict(loss_type="grpo", luspo_unmasked=True), "luspo_unmasked"),
    (dict(loss_type="gtpo", kl_bias_correction=True), "kl_bias_correction"),
    (dict(rollout_is="token_mask", rollout_is_min=2.0, rollout_is_max=1.0), "rollout_is_min"),
    (dict(top_entropy_quantile=0.0), "top_entropy_quantile"),
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
    (dict(world_size=1.5), "world_size"),
    (dict(log_ratio_clamp=-1.0), "log_ratio_clamp"),
    (dict(epsilon_low=-0.1), "epsilon_low"),
    (dict(clip_cov_lb=5.0, clip_cov_ub=1.0), "clip_cov_lb"),
    (dict(beta=float("nan")), "beta"),
])
def test_contradicting_options(case, options, name):
    with pytest.raises(ValueError, match=name):
        call(case, rollout_logp=case["rollout_logp"], **options)


def test_packed_input_needs_seq_ids_for_sequence_quantities(case):
    lp, adv, m = case["logp"].reshape(-1), case["advantages"], case["mask"].reshape(-1)
    old = case["old_logp"].reshape(-1)
    for opts in (dict(loss_type="dapo", importance_sampling_level="sequence"), dict(loss_type="gspo"),
                 dict(loss_type="grpo"), dict(loss_type="clip_cov")):
        with pytest.raises(ValueError, match="seq_ids is required"):
            fusedpg.pg_loss(lp, adv[:1], m, old_logp=old, **opts)
    # token-local with a token normaliser is fine without seq_ids (one sequence)
    fusedpg.pg_loss(lp, adv[:1], m, old_logp=old, loss_type="dapo")
    seq = torch.arange(3).repeat_interleave(4)
    with pytest.raises(ValueError, match="seq_ids must be non-decreasing"):
        fusedpg.pg_loss(lp, adv, m, old_logp=old, seq_ids=seq.flip(0), loss_type="grpo")
    with pytest.raises(ValueError, match="seq_ids is for packed"):
        call(case, seq_ids=seq)
    with pytest.raises(TypeError, match="seq_ids"):
        fusedpg.pg_loss(lp, adv, m, old_logp=old, seq_ids=seq.double(), loss_type="grpo")
    with pytest.raises(ValueError, match="loss_scale_factor"):
        fusedpg.pg_loss(lp, adv, m, old_logp=old, seq_ids=seq, aggregation="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="luspo_unmasked"):
        fusedpg.pg_loss(lp, adv, m, old_logp=old, seq_ids=seq, loss_type="luspo", luspo_unmasked=True)


@pytest.mark.parametrize("options,name", [
    (dict(loss_type="grpo"), "old_logp"),
    (dict(loss_type="gpg", beta=0.1), "ref_logp"),
    (dict(loss_type="gpg", rollout_is="token_mask", old_logp=0), "rollout_logp"),
    (dict(loss_type="gpg", kl_bias_correction=False, entropy_coef=0.1), "entropy"),
    (dict(loss_type="gtpo"), "entropy"),
    (dict(loss_type="gtpo", shaping_entropy="old"), "old_entropy"),
    (dict(loss_type="alol"), "ref_logp"),
    (dict(loss_type="gpg", off_policy_mask_threshold=0.1), "old_logp or rollout_logp"),
])
def test_missing_inputs(case, options, name):
    if "old_logp" in options:
        options = dict(options, old_logp=case["old_logp"])
    with pytest.raises(ValueError, match=f"{name}.*required|required.*{name}|{name} is required"):
        fusedpg.pg_loss(case["logp"], case["advantages"], case["mask"], **options)


def test_other_bad_arguments(case):
    with pytest.raises(ValueError, match="is_weights"):
        call(case, is_weights=torch.ones(3, dtype=torch.float64), rollout_is="token_mask",
             rollout_logp=case["rollout_logp"])
    with pytest.raises(ValueError, match="group_ids"):
        call(case, group_ids=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="truncated"):
        call(case, truncated=torch.zeros(5, dtype=torch.bool), mask_truncated_completions=True)
    with pytest.raises(ValueError, match="mask must be"):
        fusedpg.pg_loss(case["logp"][None], case["advantages"], case["mask"][None], old_logp=case["old_logp"][None])
    batch = prepare(case["advantages"], case["mask"], old_logp=case["old_logp"], loss_type="grpo")
    with pytest.raises(ValueError, match="logp must be"):
        token_loss(batch, case["logp"], None, PGLossConfig(loss_type="grpo"))
