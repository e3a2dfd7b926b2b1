"""Every registered variant, under every option that changes the loss composition, either runs in the fused Triton
epilogue with exactly ``token_loss``'s per-token loss and logits gradient (checked through the interpreter), or is
routed to the generic path by the one allow-list, ``fusedpg.objective.epilogue_spec``. No term is dropped silently."""
from __future__ import annotations

import itertools

import pytest
import torch

from fusedpg.objective import epilogue_spec, make_config, prepare, token_loss, variant_names
from fusedpg.objective.config import KL_ESTIMATORS, ROLLOUT_IS_MODES
from fusedpg.temperature import Temperature

B, T, V = 2, 4, 16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU the kernels run in the interpreter (conftest)
OPTIONS = (
    [dict()]
    + [dict(beta=0.05, kl_estimator=e) for e in KL_ESTIMATORS]
    + [dict(beta=0.05, kl_bias_correction=True), dict(beta=0.05, kl_bias_correction=True,
                                                        kl_bias_correction_detach=True)]
    + [dict(entropy_coef=0.02), dict(off_policy_mask_threshold=0.05), dict(dual_clip_c=3.0), dict(delta=2.5),
       dict(top_entropy_quantile=0.5), dict(importance_sampling_level="sequence"),
       dict(importance_sampling_level="sequence_token")]
    + [dict(rollout_is=m) for m in ROLLOUT_IS_MODES]
)


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B * T, V, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, V, (B * T,), generator=g)
    lp = torch.log_softmax(logits, -1).gather(1, y[:, None])[:, 0]
    mask = torch.ones(B, T)
    mask[1, 3:] = 0
    data = dict(
        advantages=torch.tensor([0.7, -1.1]), mask=mask,
        old_logp=(lp + 0.3 * torch.randn(B * T, generator=g, dtype=torch.float64)).float().reshape(B, T),
        ref_logp=(lp + 0.2 * torch.randn(B * T, generator=g, dtype=torch.float64)).float().reshape(B, T),
        rollout_logp=(lp + 0.1 * torch.randn(B * T, generator=g, dtype=torch.float64)).float().reshape(B, T),
        old_entropy=torch.rand(B, T, generator=g) + 0.5,
    )
    return logits, y, data


def _batch(name, options, data):
    try:
        cfg = make_config(loss_type=name, **options)
        adv = data["advantages"].clamp(0, 1).round() if name in ("psr", "nsr", "w_reinforce") else data["advantages"]
        kw = {k: v for k, v in data.items() if k not in ("advantages", "mask")}
        if name in ("gtpo", "d3s", "empg"):  # shaped by the old entropy: one pass
            cfg = cfg.replace(shaping_entropy="old")
        return cfg, prepare(adv, data["mask"], config=cfg, **kw)
    except (ValueError, TypeError):
        return None  # a combination the config rejects: nothing to route


def _truth(logits, y, batch, cfg):
    """token_loss on the float64 log-probs of the logits: per-token loss and dL/dlogits by autograd."""
    x = logits.clone().requires_grad_()
    logsm = torch.log_softmax(x, -1)
    lp = logsm.gather(1, y[:, None])[:, 0]
    ent = -(logsm.exp() * logsm).sum(-1)
    contrib, _ = token_loss(batch, lp.float(), ent.float(), cfg)
    contrib = contrib.double()
    (grad,) = torch.autograd.grad(contrib.sum(), x)
    return contrib.detach(), grad


def _grid():
    for name, options in itertools.product(variant_names(), OPTIONS):
        yield pytest.param(name, options, id=f"{name}-" + "-".join(f"{k}={v}" for k, v in options.items()))


@pytest.mark.parametrize("name,options", list(_grid()))
def test_epilogue_equals_token_loss_or_is_routed(name, options):
    logits, y, data = _inputs(hash((name, tuple(options))) % 1000)
    made = _batch(name, options, data)
    if made is None:
        return
    cfg, batch = made
    spec = epilogue_spec(cfg, batch)
    if spec is None:
        return  # the driver runs token_loss itself on this config
    from fusedpg.linear_pg.epilogue import Epilogue

    rows = torch.nonzero(batch.active).squeeze(1)
    x = logits.float().index_select(0, rows).contiguous().to(DEVICE)
    lp, en, loss_t = Epilogue(spec, cfg, batch).run(x, y.index_select(0, rows).to(DEVICE), Temperature(),
                                                   batch, rows)
    want_loss, want_grad = _truth(logits, y, batch, cfg)
    torch.testing.assert_close(loss_t.double().cpu(), want_loss[rows], rtol=2e-4, atol=2e-6)
    torch.testing.assert_close(x.double().cpu(), want_grad[rows], rtol=2e-4, atol=2e-6)


def test_the_grid_exercises_both_routes():
    """The grid is not vacuous: it sends the kernel-backed surrogates (at token and sequence level) through the
    interpreter and routes the compositions the kernel lacks (OPSM, top-entropy mask, VESPO) to the generic path."""
    fused, routed = set(), set()
    for name, options in itertools.product(variant_names(), OPTIONS):
        made = _batch(name, options, _inputs(0)[2])
        if made is not None:
            key = (name, tuple(options.items()))
            (fused if epilogue_spec(*made) is not None else routed).add(key)
    for name in ("grpo", "dapo", "gppo", "dcpo", "cispo", "sapo", "geo_mean"):
        assert (name, ()) in fused, name
    assert ("gspo", ()) in fused and ("grpo", (("importance_sampling_level", "sequence"),)) in fused
    assert ("grpo", (("off_policy_mask_threshold", 0.05),)) in routed
    assert ("grpo", (("top_entropy_quantile", 0.5),)) in routed and ("vespo", ()) in routed
