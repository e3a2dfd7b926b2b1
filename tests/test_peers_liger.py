"""Cross-check against liger-kernel's LigerFusedLinearGRPOLoss (compiled=False runs on CPU) for every loss type it
supports, and record where Liger's defaults differ from TRL's documented ones."""
import pytest
import torch

import fusedpg

liger = pytest.importorskip("liger_kernel.chunked_loss")

B, T, H, V = 3, 5, 16, 40
EPS = dict(epsilon_low=0.2, epsilon_high=0.2)

# (liger loss_type, liger kwargs, fusedpg kwargs): the same semantics spelled in each library.
CASES = [
    ("grpo", {}, {}), ("bnpo", {}, {}), ("dapo", {}, {}), ("sapo", {}, {}), ("vespo", {}, {}),
    ("dr_grpo", dict(max_completion_length=T), dict(max_completion_length=T)),
    ("cispo", dict(epsilon_high=5.0), dict(epsilon_high=5.0)),
    ("luspo", dict(importance_sampling_level="sequence"), dict(luspo_unmasked=True, **EPS)),
    ("luspo", dict(importance_sampling_level="token"),
     dict(luspo_unmasked=True, importance_sampling_level="token", **EPS)),
    ("grpo", dict(importance_sampling_level="sequence"), dict(importance_sampling_level="sequence")),
    ("dapo", dict(delta=1.5), dict(delta=1.5)),
    ("dapo", dict(use_bias_correction_kl=True), dict(kl_bias_correction=True)),
    ("dapo", dict(beta=0.0, use_ref_model=False), dict(beta=0.0)),
]


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    with torch.no_grad():
        lp, _ = fusedpg.linear_logprob_entropy(x, w, y, impl="torch")
    old = lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = lp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    return x, w, y, mask, adv, old, ref


def _liger(loss_type, kw, batch):
    x, w, y, mask, adv, old, ref = batch
    kw = dict(kw)
    beta = kw.pop("beta", 0.04)
    module = liger.LigerFusedLinearGRPOLoss(compiled=False, loss_type=loss_type, beta=beta,
                                            use_ref_model=kw.pop("use_ref_model", True), **kw)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = module(xs, ws, y, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old)
    out[0].backward()
    return out[0].detach().double(), xs.grad, ws.grad, out[1]


def _ours(loss_type, kw, batch, impl="torch"):
    """(loss, d_x, d_w, metrics) on CPU; the Triton plan runs on CUDA where there is one (else the interpreter)."""
    device = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"
    x, w, y, mask, adv, old, ref = (t.to(device) for t in batch)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss, met = fusedpg.fused_linear_pg_loss(xs, ws, y, adv, mask, old_logp=old, ref_logp=ref, loss_type=loss_type,
                                             impl=impl, **{"beta": 0.04, **kw})
    loss.backward()
    met = {k: v.cpu() if torch.is_tensor(v) else v for k, v in met.items()}
    return loss.detach().cpu(), xs.grad.cpu(), ws.grad.cpu(), met


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("loss_type,liger_kw,ours_kw", CASES)
def test_matches_liger(loss_type, liger_kw, ours_kw, impl):
    batch = _batch(0)
    if impl == "triton":  # the kernels take bf16 / fp16 / fp32
        batch = tuple(t.float() if t.is_floating_point() else t for t in batch)
    ref_loss, ref_dx, ref_dw, ref_metrics = _liger(loss_type, liger_kw, batch)
    loss, dx, dw, metrics = _ours(loss_type, ours_kw, batch, impl)
    # Liger computes the loss in fp32 even for fp64 inputs: compare at fp32 precision (a peer, not the reference).
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(dx.double(), ref_dx.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw.double(), ref_dw.double(), rtol=1e-5, atol=1e-6)
    if ours_kw.get("beta", 0.04) != 0.0:  # Liger's metrics: (mean KL, clip ratio) with a reference model
        torch.testing.assert_close(metrics["kl"].float(), ref_metrics[0].float(), rtol=1e-5, atol=1e-6)


def test_liger_cispo_default_cap_differs_from_trl():
    """Liger's constructor default epsilon_high=0.2 is used as CISPO's *absolute* cap min(r, 0.2), while TRL (and
    fusedpg) default CISPO to the recommended cap 5.0 (docs/losses.md#cispo). Same formula, different default."""
    batch = _batch(1)
    liger_default = _liger("cispo", {}, batch)[0]
    assert torch.allclose(liger_default, _ours("cispo", dict(epsilon_high=0.2), batch)[0], rtol=2e-6, atol=2e-6)
    assert not torch.allclose(liger_default, _ours("cispo", {}, batch)[0], rtol=1e-3, atol=1e-4)


def test_liger_luspo_counts_padding_cells():
    """Liger's luspo (like TRL) averages l_t * |o_i| over all B*T cells, padding included; fusedpg's default luspo
    is the masked sequence form of the paper, and matches Liger only with luspo_unmasked=True."""
    batch = _batch(2)
    kw = dict(importance_sampling_level="sequence")
    liger_loss = _liger("luspo", kw, batch)[0]
    assert torch.allclose(liger_loss, _ours("luspo", dict(luspo_unmasked=True, **EPS), batch)[0], atol=2e-6)
    assert not torch.allclose(liger_loss, _ours("luspo", dict(EPS), batch)[0], atol=1e-4)
