"""pg_loss against the plain TRL ``_compute_loss`` semantics, for every TRL loss_type and option."""
import math

import pytest
import torch

import fusedpg
from fusedpg.integrations.trl_support import FUSEDPG_METRICS
from fusedpg.integrations.trl_support import LOSS_TYPES as TRL_LOSS_TYPES
from fusedpg.verification.trl_oracle import TRLArgs, pg_loss_options, trl_compute_loss


def make_inputs(seed, B=5, T=7, per_token_adv=False, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.3).double()
    mask[1] = 0.0
    mask[0, 0] = 1.0
    lp = torch.randn(B, T, **f64) * 0.5 - 1.0
    adv = torch.randn(B, T, **f64) if per_token_adv else torch.randn(B, **f64)
    return dict(mask=mask, lp=lp, adv=adv, H=torch.rand(B, T, **f64) * 2,
                old=lp + torch.randn(B, T, **f64) * spread, ref=lp + torch.randn(B, T, **f64) * spread,
                samp=lp + torch.randn(B, T, **f64) * spread * 1.2,
                trunc=torch.rand(B, generator=g) < 0.3)


def compare(args, x, **extra_opts):
    mask = x["mask"]
    eff = mask * (~x["trunc"]).double().unsqueeze(1) if args.mask_truncated_completions else mask
    nib = eff.sum() * 1.5  # as if the generation batch held other micro-steps
    lp1, h1 = x["lp"].clone().requires_grad_(), x["H"].clone().requires_grad_()
    l1, m1 = trl_compute_loss(lp1, x["adv"], mask, args, entropies=h1, old_per_token_logps=x["old"],
                              ref_per_token_logps=x["ref"], sampling_per_token_logps=x["samp"],
                              num_items_in_batch=nib, is_truncated=x["trunc"])
    lp2, h2 = x["lp"].clone().requires_grad_(), x["H"].clone().requires_grad_()
    opts = dict(pg_loss_options(args), **extra_opts)
    l2, m2 = fusedpg.pg_loss(lp2, x["adv"], mask, entropy=h2, old_logp=x["old"], ref_logp=x["ref"],
                             rollout_logp=x["samp"] if args.vllm_importance_sampling_correction else None,
                             truncated=x["trunc"], num_items_in_batch=float(nib), **opts)
    torch.testing.assert_close(l2, l1, rtol=1e-10, atol=1e-12)
    g1 = torch.autograd.grad(l1, [lp1, h1], allow_unused=True)
    g2 = torch.autograd.grad(l2, [lp2, h2], allow_unused=True)
    for a, b in zip(g1, g2):
        a = torch.zeros_like(x["lp"]) if a is None else a
        b = torch.zeros_like(x["lp"]) if b is None else b
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    for k, v in m1.items():
        if k == "clip_ratio/low_min" and math.isinf(v) or k == "clip_ratio/high_max" and math.isinf(v):
            v = 0.0  # fusedpg reports an empty min/max as 0, never inf/NaN
        assert float(m2[FUSEDPG_METRICS[k]]) == pytest.approx(v, rel=1e-9, abs=1e-12), k


LEVELS = {lt: ("token",) if lt == "vespo" else ("token", "sequence") for lt in TRL_LOSS_TYPES}
CASES = [(lt, lvl) for lt in TRL_LOSS_TYPES for lvl in LEVELS[lt]]


def _eps_high(lt):
    return 2.0 if lt == "cispo" else 0.28


@pytest.mark.parametrize("loss_type,level", CASES)
def test_plain(loss_type, level):
    args = TRLArgs(loss_type=loss_type, importance_sampling_level=level, epsilon_high=_eps_high(loss_type),
                   max_completion_length=9)
    for seed in range(3):
        compare(args, make_inputs(seed))


@pytest.mark.parametrize("loss_type,level", CASES)
def test_kl_entropy_ga(loss_type, level):
    args = TRLArgs(loss_type=loss_type, importance_sampling_level=level, epsilon=0.1,
                   epsilon_high=_eps_high(loss_type), beta=0.04, entropy_coef=0.02, gradient_accumulation_steps=3,
                   num_processes=2, max_completion_length=9)
    compare(args, make_inputs(1))
    compare(args, make_inputs(2, per_token_adv=True))
    compare(TRLArgs(**{**args.__dict__, "use_bias_correction_kl": True}), make_inputs(3))


@pytest.mark.parametrize("loss_type,level", CASES)
def test_top_entropy_opsm_truncation(loss_type, level):
    args = TRLArgs(loss_type=loss_type, importance_sampling_level=level, epsilon_high=_eps_high(loss_type),
                   top_entropy_quantile=0.4, off_policy_mask_threshold=0.05, mask_truncated_completions=True,
                   entropy_coef=0.01, max_completion_length=9)
    compare(args, make_inputs(4))
    compare(args, make_inputs(5, per_token_adv=True))


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("loss_type,level", CASES)
def test_vllm_importance_sampling(loss_type, level, mode):
    if loss_type == "vespo" and mode.startswith("sequence"):
        pytest.skip("TRL requires a token mode for VESPO (tested as an error)")
    args = TRLArgs(loss_type=loss_type, importance_sampling_level=level, epsilon_high=_eps_high(loss_type),
                   vllm_importance_sampling_correction=True, vllm_importance_sampling_mode=mode,
                   vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=1.6, beta=0.02,
                   max_completion_length=9)
    compare(args, make_inputs(6, spread=0.3))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
def test_delta(loss_type):
    args = TRLArgs(loss_type=loss_type, epsilon_high=0.28, delta=1.5, max_completion_length=9)
    compare(args, make_inputs(7, spread=0.8))
    compare(TRLArgs(**{**args.__dict__, "importance_sampling_level": "sequence"}), make_inputs(8, spread=0.8))


def test_eval_mode_has_no_ga_division():
    x = make_inputs(9)
    args = TRLArgs(loss_type="grpo", gradient_accumulation_steps=4)
    l_eval, _ = trl_compute_loss(x["lp"], x["adv"], x["mask"], args, old_per_token_logps=x["old"], train=False)
    l_ours, _ = fusedpg.pg_loss(x["lp"], x["adv"], x["mask"], old_logp=x["old"],
                                **dict(pg_loss_options(args), gradient_accumulation_steps=1))
    torch.testing.assert_close(l_ours, l_eval)


def test_default_clamp_matches_trl_below_the_clamp():
    """With the default log_ratio_clamp=20, moderate log-ratios give TRL's exact values."""
    x = make_inputs(10)
    args = TRLArgs(loss_type="dapo", beta=0.04, use_bias_correction_kl=True)
    compare(args, x, log_ratio_clamp=20.0)
