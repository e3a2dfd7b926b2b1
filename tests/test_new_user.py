"""What a new user tripped on (float64 loss inputs, empty batches, the wrong attention, non-finite inputs):
each defect found on a fresh clone, pinned."""
from __future__ import annotations

import re

import pytest
import torch

import fusedpg
from fusedpg.integrations.liger import LIGER_LOSS_TYPES, LigerFusedLinearGRPOLoss

B, T, H, V = 3, 4, 8, 16


def _head(dtype, b=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, T, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    targets = torch.randint(0, V, (b, T), generator=g)
    mask = (torch.rand(b, T, generator=g) > 0.2).float()
    adv = torch.randn(b, generator=g, dtype=torch.float64)  # numpy rewards give float64
    old = torch.randn(b, T, generator=g, dtype=torch.float64) * 0.1 - 2.0
    return hidden, weight, targets, mask, adv, old, old + 0.05


def _run(hidden, weight, *args, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = fusedpg.fused_linear_pg_loss(h, w, *args, **kw)
    loss.backward()
    return [loss.detach(), h.grad, w.grad] + [metrics[k] for k in sorted(metrics)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "clip_cov", "gspo", "cispo"])
def test_float64_loss_inputs_give_the_float32_result(backend, dtype, loss_type):
    if backend.interpreted and (dtype != torch.float32 or loss_type not in ("grpo", "gspo")):
        pytest.skip("interpreter: one-pass and sequence plans in fp32 are enough")
    hidden, weight, targets, mask, adv, old, ref = _head(dtype)
    kw = dict(loss_type=loss_type, beta=0.1, impl=backend.impl, seed=0 if loss_type == "clip_cov" else None)
    dev = backend.device
    args64 = [x.to(dev) for x in (targets, adv, mask)]
    got = _run(hidden.to(dev), weight.to(dev), args64[0], args64[1], args64[2], old_logp=old.to(dev),
               ref_logp=ref.to(dev), **kw)
    want = _run(hidden.to(dev), weight.to(dev), args64[0], adv.float().to(dev), args64[2],
                old_logp=old.float().to(dev), ref_logp=ref.float().to(dev), **kw)
    assert got[0].dtype == torch.float32
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("loss_type", LIGER_LOSS_TYPES)
def test_liger_module_takes_float64_and_empty_batches(loss_type):
    kw = dict(beta=0.04, loss_type=loss_type, max_completion_length=T, impl="torch")
    for b in (0, B):
        hidden, weight, targets, mask, adv, old, ref = _head(torch.float32, b=b)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, metrics = LigerFusedLinearGRPOLoss(**kw)(h, w, targets, mask, adv, ref_per_token_logps=ref,
                                                       old_per_token_logps=old)
        loss.backward()
        assert loss.dtype == torch.float32 and len(metrics) == 2 and torch.isfinite(loss)
        want, _ = LigerFusedLinearGRPOLoss(**kw)(hidden, weight, targets, mask, adv.float(),
                                                 ref_per_token_logps=ref.float(), old_per_token_logps=old.float())
        assert torch.equal(loss.detach(), want)
        if b == 0:
            assert float(loss.detach()) == 0.0 and not w.grad.any() and (h.grad is None or h.grad.numel() == 0)
            assert all(float(m) == 0.0 for m in metrics)


def _poison(x, index, value=float("nan")):
    x = x.clone()
    x[index] = value
    return x


def _finite_calls(hidden, weight, targets, mask, adv, old):
    lp, ent = fusedpg.linear_logprob_entropy(hidden, weight, targets, impl="torch")
    return {
        "fused_linear_pg_loss": lambda **kw: fusedpg.fused_linear_pg_loss(
            hidden, weight, targets, adv, mask, old_logp=old, loss_type="grpo", impl="torch", **kw),
        "pg_loss": lambda **kw: fusedpg.pg_loss(lp, adv, mask, old_logp=old, entropy=ent, loss_type="grpo", **kw),
    }


@pytest.mark.parametrize("name,index,value", [("hidden", (1, 2, 3), float("nan")), ("weight", (5, 1), float("inf")),
                                              ("advantages", (2,), float("nan")), ("old_logp", (0, 1), float("nan"))])
def test_check_finite_names_the_tensor_and_the_first_bad_index(name, index, value, monkeypatch):
    hidden, weight, targets, mask, adv, old, _ = _head(torch.float32)
    mask = torch.ones_like(mask)
    tensors = dict(hidden=hidden, weight=weight, advantages=adv.float(), old_logp=old.float())
    tensors[name] = _poison(tensors[name], index, value)
    calls = _finite_calls(tensors["hidden"], tensors["weight"], targets, mask, tensors["advantages"],
                          tensors["old_logp"])
    for entry, call in calls.items():
        if entry == "pg_loss" and name in ("hidden", "weight"):
            continue  # pg_loss sees log-probs, not the head
        with pytest.raises(ValueError, match=rf"{name} must be finite.*{value}.*index {re.escape(str(index))}"):
            call(check_finite=True)
        monkeypatch.setenv("FUSEDPG_CHECK_FINITE", "1")
        with pytest.raises(ValueError, match=rf"{name} must be finite"):
            call()
        monkeypatch.delenv("FUSEDPG_CHECK_FINITE")
        loss, _ = call()  # default off: no check, the NaN / inf goes through as before
        assert not torch.isfinite(loss) or name == "weight"


def test_check_finite_exempts_masked_tokens_and_their_sequences():
    hidden, weight, targets, mask, adv, old, _ = _head(torch.float32)
    mask = torch.ones_like(mask)
    mask[1, 2] = 0
    mask[2] = 0  # sequence 2 is fully masked: its per-sequence advantage is never read
    hidden, old, adv = _poison(hidden, (1, 2, 0)), _poison(old.float(), (1, 2)), _poison(adv.float(), (2,))
    for entry, call in _finite_calls(hidden, weight, targets, mask, adv, old).items():
        loss, _ = call(check_finite=True)
        assert torch.isfinite(loss), entry
    targets = targets.masked_fill(mask == 0, -100)
    logp, _ = fusedpg.linear_logprob_entropy(hidden, weight, targets, check_finite=True, impl="torch")
    assert torch.isfinite(logp).all()
    logits = _poison(hidden @ weight.T, (0, 0, 3), float("-inf"))  # a banned token: allowed
    logits = _poison(logits, (1, 2, 0))  # on an ignored row: exempt
    assert torch.isfinite(fusedpg.logprob_entropy(logits, targets, check_finite=True, impl="torch")[0]).all()
    with pytest.raises(ValueError, match=r"logits must be finite.*index \(0, 0, 4\)"):
        fusedpg.logprob_entropy(_poison(logits, (0, 0, 4), float("inf")), targets, check_finite=True)


def test_module_reprs_show_their_config():
    from fusedpg.objective.config import PGLossConfig

    assert repr(PGLossConfig(loss_type="grpo", beta=0.04)) == "PGLossConfig(loss_type='grpo', beta=0.04)"
    assert "PGLossConfig(loss_type='cispo')" in repr(fusedpg.FusedLinearPGLoss(loss_type="cispo"))
    text = repr(LigerFusedLinearGRPOLoss(loss_type="sapo", beta=0.0))
    assert "loss_type='sapo'" in text and "beta=0.0" in text and "temperature=1.0" in text


def test_check_finite_on_shared_prefix_attention():
    from fusedpg.prefix import pack

    layout = pack([[1, 2, 3], [7]], [[[4, 5], [6]], [[8]]], pad_token_id=0).layout  # row 1 is padded
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(layout.n_rows, 2, layout.seq_len, 4, generator=g) for _ in range(3))
    pad = int((layout.labels("cpu")[0][1] < 0).nonzero()[0, 0])
    k[1, 1, pad, 2] = float("nan")  # padding is exempt
    fusedpg.shared_prefix_attention(q, k, v, layout, check_finite=True, impl="torch")
    v[0, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"v must be finite.*index \(0, 1, 2, 3\)"):
        fusedpg.shared_prefix_attention(q, k, v, layout, check_finite=True, impl="torch")
