"""verl adapters (fusedpg.integrations.verl), tested without verl (verl 0.9.1's core_algos imports ray, omegaconf,
tensordict and its worker configs at import time, which CI does not install): the policy losses against
fusedpg.pg_loss with the mapped options, the option mapping against a transcription of verl 0.9.1's
compute_policy_loss_vanilla, registration through a stand-in core_algos module, and linear_cross_entropy against
the materialised reference."""
import sys
import types
from types import SimpleNamespace

import pytest
import torch

import fusedpg
from fusedpg.integrations import verl as fv

B, T = 4, 6


def _batch(seed=0, binary_rewards=False):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g) * 3 - 0.05).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g)
    mask = torch.ones(B, T)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    if binary_rewards:
        adv = (torch.rand(B, 1, generator=g) > 0.5).float().expand(B, T) * mask
    else:
        adv = torch.randn(B, 1, generator=g).expand(B, T) * mask
    ent = torch.rand(B, T, generator=g) * 2
    return logp, old, adv.contiguous(), mask, ent


def _config(**kw):
    base = dict(clip_ratio=0.2, clip_ratio_low=0.15, clip_ratio_high=0.28, clip_ratio_c=3.0,
                global_batch_info={}, loss_scale_factor=None)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("name", fv.VERL_LOSS_NAMES)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_policy_losses_match_pg_loss(name, agg):
    logp, old, adv, mask, ent = _batch(1, binary_rewards=name in ("nsr", "w_reinforce"))
    cfg = _config(global_batch_info=dict(dp_size=2, batch_num_tokens=30, global_batch_size=7))
    kw = dict(entropy=ent) if name in ("empg", "gtpo", "d3s") else {}
    loss, met = fv.POLICY_LOSSES[name](old, logp, adv, mask, agg, cfg, None, **kw)
    (g,) = torch.autograd.grad(loss, logp)
    assert set(met) == {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
    assert all(isinstance(v, float) for v in met.values())

    lp2 = logp.detach().clone().requires_grad_()
    ref, ref_met = fusedpg.pg_loss(lp2, adv, mask, old_logp=old, entropy=kw.get("entropy"), loss_type=name,
                                   aggregation=agg, epsilon_low=0.15, epsilon_high=0.28, dual_clip_c=3.0,
                                   world_size=2, num_items_in_batch=30.0, num_sequences=7.0)
    (g2,) = torch.autograd.grad(ref, lp2)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g, g2)
    for key, ours in (("ppo_kl", "actor/ppo_kl"), ("clip_region", "actor/pg_clipfrac"),
                      ("dual_clip", "actor/pg_clipfrac_lower")):
        assert met[ours] == pytest.approx(ref_met[key].item() if key in ref_met else 0.0)  # absent: not clipped


def _verl_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights):
    """verl 0.9.1 compute_policy_loss_vanilla + agg_loss (token-mean / seq-mean-token-mean), transcribed."""
    def masked_mean(x, m):
        return (x * m).sum() / m.sum()

    nkl = torch.clamp(log_prob - old_log_prob, -20.0, 20.0)
    ratio = torch.exp(nkl)
    ppo_kl = masked_mean(-nkl, response_mask)
    l1 = -advantages * ratio
    l2 = -advantages * torch.clamp(ratio, 1 - config.clip_ratio_low, 1 + config.clip_ratio_high)
    c1 = torch.maximum(l1, l2)
    clipfrac = masked_mean(torch.gt(l2, l1).float(), response_mask)
    l3 = -advantages * config.clip_ratio_c
    c2 = torch.min(l3, c1)
    lower = masked_mean(torch.gt(c1, l3) * (advantages < 0).float(), response_mask)
    pg = torch.where(advantages < 0, c2, c1)
    if rollout_is_weights is not None:
        pg = pg * rollout_is_weights
    info = config.global_batch_info
    if loss_agg_mode == "token-mean":
        loss = (pg * response_mask).sum() / info["batch_num_tokens"] * info["dp_size"]
    else:
        n = response_mask.sum(-1)
        seq = (pg * response_mask).sum(-1) / (n + 1e-8)
        loss = (seq * (n > 0).float()).sum() / info["global_batch_size"] * info["dp_size"]
    return loss, {"actor/pg_clipfrac": clipfrac.item(), "actor/ppo_kl": ppo_kl.item(),
                  "actor/pg_clipfrac_lower": lower.item()}


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_option_mapping_reproduces_verl_vanilla(agg):
    logp, old, adv, mask, _ = _batch(2)
    old = old + 0.6 * torch.randn(B, T, generator=torch.Generator().manual_seed(9))  # exercise both clips
    isw = torch.rand(B, T, generator=torch.Generator().manual_seed(3)) + 0.5
    cfg = _config(global_batch_info=dict(dp_size=2, batch_num_tokens=30, global_batch_size=7))
    ours = fv.make_policy_loss("ppo")(old, logp, adv, mask, agg, cfg, isw)
    theirs = _verl_vanilla(old, logp, adv, mask, agg, cfg, isw)
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(torch.autograd.grad(ours[0], logp)[0], torch.autograd.grad(theirs[0], logp)[0])
    for k, v in theirs[1].items():
        assert ours[1][k] == pytest.approx(v, abs=1e-7), k


def test_entropy_shaped_variants_need_entropy():
    logp, old, adv, mask, ent = _batch(3)
    with pytest.raises(ValueError, match="entropy"):
        fv.compute_policy_loss_gtpo(old, logp, adv, mask, "token-mean", _config())
    loss, _ = fv.compute_policy_loss_d3s(old, logp, adv, mask, "token-mean", _config(), old_entropy=ent)
    assert torch.isfinite(loss)


def test_fusedpg_options_from_config():
    logp, old, adv, mask, ent = _batch(4)
    cfg = _config(fusedpg={"d3s_token_ratio": 0.5})
    a = fv.compute_policy_loss_d3s(old, logp, adv, mask, "token-mean", cfg, entropy=ent)[0]
    b = fusedpg.pg_loss(logp, adv, mask, old_logp=old, entropy=ent, loss_type="d3s", aggregation="token-mean",
                        epsilon_low=0.15, epsilon_high=0.28, dual_clip_c=3.0, d3s_token_ratio=0.5)[0]
    torch.testing.assert_close(a, b)
    with pytest.raises(TypeError, match="unknown"):
        fv.compute_policy_loss_gppo(old, logp, adv, mask, "token-mean", _config(fusedpg={"nope": 1}))


def _fake_core_algos(dict_form=True):
    mod = types.ModuleType("verl.trainer.ppo.core_algos")
    mod.POLICY_LOSS_REGISTRY = {"vanilla": None, "gspo": None}

    def register_policy_loss(name):
        def deco(fn):
            mod.POLICY_LOSS_REGISTRY[name] = fn
            return fn
        return deco

    if dict_form:
        def compute_policy_loss_vanilla(old_log_prob, log_prob) -> "tuple[torch.Tensor, dict[str, Any]]":
            pass
    else:
        def compute_policy_loss_vanilla(old_log_prob, log_prob) -> "tuple[torch.Tensor, torch.Tensor]":
            pass
    mod.register_policy_loss = register_policy_loss
    mod.compute_policy_loss_vanilla = compute_policy_loss_vanilla
    return mod


@pytest.mark.parametrize("dict_form", [True, False])
def test_register_with_verl_registry(dict_form):
    mod = _fake_core_algos(dict_form)
    done = fv.register(mod)
    for name in fv.VERL_LOSS_NAMES:
        assert f"fusedpg_{name}" in mod.POLICY_LOSS_REGISTRY and name in mod.POLICY_LOSS_REGISTRY
    logp, old, adv, mask, _ = _batch(5)
    out = mod.POLICY_LOSS_REGISTRY["gppo"](old, logp, adv, mask, "token-mean", _config())
    assert len(out) == (2 if dict_form else 4)
    assert set(done) >= {"gppo", "fusedpg_gppo"}


def test_auto_registration_on_import(monkeypatch):
    mod = _fake_core_algos()
    pkgs = {n: types.ModuleType(n) for n in ("verl", "verl.trainer", "verl.trainer.ppo")}
    pkgs["verl.trainer.ppo"].core_algos = mod
    for n, m in pkgs.items():
        monkeypatch.setitem(sys.modules, n, m)
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.core_algos", mod)
    assert "fusedpg_dcpo" in fv._auto_register()
    assert "dcpo" in mod.POLICY_LOSS_REGISTRY


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_linear_cross_entropy_contract(reduction):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    w = (0.3 * torch.randn(37, 16, generator=g)).requires_grad_()
    y = torch.randint(0, 37, (10,), generator=g)
    lp, ent = fv.linear_cross_entropy(h.reshape(10, 16), w, y, 0.7, reduction)
    z = (h.reshape(10, 16) @ w.T) / 0.7
    ref_lp = z.log_softmax(-1).gather(-1, y[:, None])[:, 0]
    ref_ent = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    red = {"none": lambda x: x, "sum": torch.sum, "mean": torch.mean}[reduction]
    torch.testing.assert_close(lp, red(ref_lp), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, red(ref_ent), rtol=1e-5, atol=1e-5)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    gh, gw = torch.autograd.grad((lp - 0.1 * ent).sum(), (h, w))
    rh, rw = torch.autograd.grad((red(ref_lp) - 0.1 * red(ref_ent)).sum(), (h, w))
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="vocab_parallel_group needs an initialised"):  # no process group here
        fv.linear_cross_entropy(h.reshape(10, 16), w, y, 1.0, "none", dist_process_group=object())
