"""fusedpg.integrations.liger.LigerFusedLinearGRPOLoss against liger-kernel's own module (compiled=False on CPU):
same constructor and forward, same loss, gradients and metric tuple for every loss type Liger supports."""
import inspect

import pytest
import torch

from fusedpg.integrations import liger as ours_mod

liger = pytest.importorskip("liger_kernel.chunked_loss")

B, T, H, V = 3, 5, 16, 40


def _batch(seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.3
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        lp = torch.log_softmax(x @ w.T + (0 if b is None else b), -1).gather(-1, y[..., None])[..., 0]
    old = lp + 0.2 * torch.randn(B, T, generator=g)
    ref = lp + 0.2 * torch.randn(B, T, generator=g)
    return dict(x=x, w=w, b=b, y=y, mask=mask, adv=adv, old=old, ref=ref, g=g)


def _run(cls, ctor, d, call):
    module = cls(**ctor)
    xs, ws = d["x"].clone().requires_grad_(), d["w"].clone().requires_grad_()
    bs = None if d["b"] is None else d["b"].clone().requires_grad_()
    loss, metrics = module(xs, ws, d["y"], d["mask"], d["adv"], bs, **call)
    loss.backward()
    return loss.detach(), xs.grad, ws.grad, None if bs is None else bs.grad, metrics


def _compare(ctor, d, call, rtol=2e-5, atol=2e-6):
    ref = _run(liger.LigerFusedLinearGRPOLoss, dict(compiled=False, **ctor), d, call)
    got = _run(ours_mod.LigerFusedLinearGRPOLoss, dict(compiled=False, impl="torch", **ctor), d, call)
    torch.testing.assert_close(got[0].float(), ref[0].float(), rtol=rtol, atol=atol)
    for a, b in zip(got[1:4], ref[1:4]):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=rtol * 5, atol=atol * 5)
    assert isinstance(got[4], tuple) and len(got[4]) == len(ref[4])
    for a, b in zip(got[4], ref[4]):
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol)


def test_signature_matches_liger():
    ours, theirs = ours_mod.LigerFusedLinearGRPOLoss, liger.LigerFusedLinearGRPOLoss
    p_ours = inspect.signature(ours.__init__).parameters
    for name, p in inspect.signature(theirs.__init__).parameters.items():
        assert name in p_ours and p_ours[name].default == p.default, name
        assert p_ours[name].kind == p.kind, name
    assert list(inspect.signature(ours.forward).parameters) == list(inspect.signature(theirs.forward).parameters)
    for name, p in inspect.signature(theirs.forward).parameters.items():
        assert inspect.signature(ours.forward).parameters[name].default == p.default


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]


def _ctor(loss_type, **kw):
    out = dict(loss_type=loss_type)
    if loss_type == "dr_grpo":
        out["max_completion_length"] = T + 2
    if loss_type == "cispo":
        out["epsilon_high"] = 5.0
    out.update(kw)
    return out


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.04, 0.0])
def test_loss_types_token_level(loss_type, beta):
    d = _batch(0)
    _compare(_ctor(loss_type, beta=beta), d, dict(ref_per_token_logps=d["ref"], old_per_token_logps=d["old"]))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
def test_sequence_level(loss_type):
    d = _batch(1)
    _compare(_ctor(loss_type, importance_sampling_level="sequence"), d,
             dict(ref_per_token_logps=d["ref"], old_per_token_logps=d["old"]))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo", "vespo"])
def test_options_bias_temperature_is_ratio_num_items(loss_type):
    d = _batch(2, bias=True)
    g = d["g"]
    is_ratio = torch.rand(B, T, generator=g) + 0.5
    kw = dict(ref_per_token_logps=d["ref"], old_per_token_logps=d["old"], vllm_is_ratio=is_ratio,
              num_items_in_batch=torch.tensor(17))
    _compare(_ctor(loss_type, temperature=0.7, use_bias_correction_kl=loss_type != "vespo"), d, kw)


@pytest.mark.parametrize("shape", ["B", "B1"])
def test_sequence_is_ratio_shapes_and_delta(shape):
    d = _batch(3)
    r = torch.rand(B, generator=d["g"]) + 0.5
    kw = dict(ref_per_token_logps=d["ref"], old_per_token_logps=d["old"],
              vllm_is_ratio=r if shape == "B" else r[:, None])
    _compare(_ctor("dapo", delta=1.5), d, kw)
    _compare(_ctor("grpo", importance_sampling_level="sequence", use_bias_correction_kl=True), d, kw)


def test_on_policy_and_ref_input_and_no_ref_model():
    d = _batch(4)
    # old=None (on-policy), reference log-probs computed from ref_input / ref_weight
    ref_w = d["w"] + 0.05 * torch.randn(V, H, generator=d["g"])
    ref_x = d["x"] + 0.1 * torch.randn(B, T, H, generator=d["g"])
    _compare(_ctor("grpo"), d, dict(ref_input=ref_x, ref_weight=ref_w))
    # beta != 0 without a reference model: KL is zero (value and gradient), the metric is still reported
    _compare(_ctor("dapo", use_ref_model=False), d, dict(old_per_token_logps=d["old"]))


def test_errors_like_liger():
    with pytest.raises(ValueError, match="Sequence-level"):
        ours_mod.LigerFusedLinearGRPOLoss(loss_type="sapo", importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="max_completion_length"):
        ours_mod.LigerFusedLinearGRPOLoss(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="sapo_temperature_pos"):
        ours_mod.LigerFusedLinearGRPOLoss(sapo_temperature_pos=0.0)


@pytest.mark.parametrize("loss_type", ["dapo", "sapo"])
def test_triton_impl(loss_type):
    """The adapter on the Triton plan (the CPU interpreter here, the real kernels on CUDA)."""
    d = _batch(5)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    d = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in d.items() if k != "g"}
    d["g"] = None
    call = dict(ref_per_token_logps=d["ref"], old_per_token_logps=d["old"])
    ref = _run(liger.LigerFusedLinearGRPOLoss, dict(compiled=False, loss_type=loss_type), d, call)
    got = _run(ours_mod.LigerFusedLinearGRPOLoss, dict(compiled=False, loss_type=loss_type, impl="triton"), d, call)
    torch.testing.assert_close(got[0].float(), ref[0].float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1].float(), ref[1].float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[2].float(), ref[2].float(), rtol=1e-4, atol=1e-5)
    for a, b in zip(got[4], ref[4]):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5)
