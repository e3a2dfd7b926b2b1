"""top_k / top_p / min_p: log-probs, entropy and gradients of the sampler's truncated distribution against the dense
float64 reference that sorts and cumsums as vLLM does, under the tolerance model, through both backends; ties,
k = 1, k >= V, p = 1, tiny p, min_p combined; targets outside the kept set; bad settings."""
from __future__ import annotations

import pytest
import torch

import fusedpg
from fusedpg.linear.reference import linear_logprob_entropy_reference
from fusedpg.logits.reference import truncate_reference
from fusedpg.truncation import OUTSIDE_LOGP, Truncation, truncate_
from fusedpg.verification.tolerance import assert_close_to_truth

N, H, V = 14, 16, 97
GRID = {
    "k1": dict(top_k=1), "k5": dict(top_k=5), "k>=V": dict(top_k=V + 3), "p1": dict(top_p=1.0),
    "p0.7": dict(top_p=0.7), "tiny p": dict(top_p=1e-6), "min_p": dict(min_p=0.05),
    "all three": dict(top_k=30, top_p=0.9, min_p=0.01), "per-row": "per-row",
}


def _inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5 * 2
    targets = torch.randint(0, V, (N,), generator=g)
    # half the targets are the row's most likely token (inside every kept set), the rest random
    best = (hidden @ weight.T).argmax(-1)
    targets[::2] = best[::2]
    targets[3] = -100
    up = torch.randn(2, N, generator=g, dtype=torch.float64)
    return hidden.to(dtype), weight.to(dtype), targets, up


def _settings(name):
    if GRID[name] != "per-row":
        return GRID[name]
    g = torch.Generator().manual_seed(9)
    return dict(top_k=torch.randint(0, 12, (N,), generator=g), top_p=0.5 + 0.5 * torch.rand(N, generator=g),
                min_p=0.02 * torch.rand(N, generator=g))


def _run(fn, hidden, weight, targets, up, **kw):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = fn(h, w, targets, **kw)
    (logp.double() * up[0] + ent.double() * up[1]).sum().backward()
    return dict(logp=logp.detach(), entropy=ent.detach(), d_hidden=h.grad, d_weight=w.grad)


def _reference(dtype, settings):
    hidden, weight, targets, up = _inputs(torch.float64 if dtype == torch.float64 else torch.float32)
    trunc = (settings.get("top_k"), settings.get("top_p"), settings.get("min_p"))
    return _run(lambda h, w, y: linear_logprob_entropy_reference(
        h, w, y, None, 0.8, dtype=None if dtype != torch.float64 else torch.float64, truncation=trunc),
        hidden, weight, targets, up)


@pytest.mark.parametrize("name", list(GRID))
def test_linear_matches_the_vllm_style_reference(backend, name):
    settings = _settings(name)
    hidden, weight, targets, up = _inputs(torch.float32)
    ours = _run(lambda h, w, y: fusedpg.linear_logprob_entropy(
        h.to(backend.device), w.to(backend.device), y.to(backend.device), temperature=0.8, impl=backend.impl,
        chunk_bytes=5 * V * 4, **{k: v.to(backend.device) if isinstance(v, torch.Tensor) else v
                                  for k, v in settings.items()}),
        hidden, weight, targets, up)
    eager, truth = _reference(torch.float32, settings), _reference(torch.float64, settings)
    for out in ours:
        assert_close_to_truth(f"{name}.{out}", ours[out].cpu(), eager[out], truth[out], torch.float32)
    assert torch.isfinite(ours["logp"]).all() and torch.isfinite(ours["d_hidden"]).all()


@pytest.mark.parametrize("name", ["all three", "per-row"])
def test_float64_top_p_after_top_k_matches_the_reference(name):
    """fp64 keys take the bisection; with logits already masked to -inf (by top-k or min-p) its ``hi - lo`` once
    overflowed int64 and the top-p cut came out wrong (found by the vocabulary-parallel fp64 test)."""
    settings = _settings(name)
    hidden, weight, targets, up = _inputs(torch.float64)
    ours = _run(lambda h, w, y: fusedpg.linear_logprob_entropy(h, w, y, temperature=0.8, impl="torch", **settings),
                hidden, weight, targets, up)
    truth = _reference(torch.float64, settings)
    for out in ours:
        assert_close_to_truth(f"fp64.{name}.{out}", ours[out], None, truth[out], torch.float64)


@pytest.mark.parametrize("name", ["k5", "p0.7", "all three"])
def test_logits_op_matches_the_reference(backend, name):
    settings = _settings(name)
    hidden, weight, targets, up = _inputs(torch.float64)
    logits64 = hidden @ weight.T

    def run(logits, fn):
        x = logits.clone().requires_grad_()
        logp, ent = fn(x)
        (logp.double() * up[0] + ent.double() * up[1]).sum().backward()
        return dict(logp=logp.detach(), entropy=ent.detach(), d_logits=x.grad)

    trunc = (settings.get("top_k"), settings.get("top_p"), settings.get("min_p"))
    ours = run(logits64.float().to(backend.device), lambda x: fusedpg.logprob_entropy(
        x, targets.to(backend.device), temperature=0.8, impl=backend.impl, **settings))
    from fusedpg.logits.reference import logprob_entropy_reference as ref

    eager = run(logits64.float(), lambda x: ref(x, targets, 0.8, dtype=None, truncation=trunc))
    truth = run(logits64, lambda x: ref(x, targets, 0.8, truncation=trunc))
    for out in ours:
        assert_close_to_truth(f"logits.{name}.{out}", ours[out].cpu(), eager[out], truth[out], torch.float32)


def test_targets_outside_the_kept_set_get_the_floor_and_no_log_prob_gradient(backend):
    """Both backends: the Triton gradient kernel masks with the thresholds and relies on the op's autograd to drop
    the c of such rows, the torch plan drops it itself."""
    hidden, weight, targets, up = _inputs(torch.float32)
    targets = (hidden @ weight.T).argmin(-1)  # the least likely token: outside any top-5
    targets[::2] = (hidden @ weight.T)[::2].argmax(-1)  # and the most likely, inside, on every other row
    h, w = hidden.clone().to(backend.device).requires_grad_(), weight.clone().to(backend.device).requires_grad_()
    logp, _ = fusedpg.linear_logprob_entropy(h, w, targets.to(backend.device), top_k=5, impl=backend.impl)
    assert torch.equal(logp[1::2], torch.full_like(logp[1::2], OUTSIDE_LOGP))
    assert (logp[::2] > OUTSIDE_LOGP).all()
    logp.sum().backward()
    assert not h.grad[1::2].any() and h.grad[::2].any()  # a constant floor: only the entropy would send gradient
    ref_w = weight.clone().requires_grad_()
    ref = linear_logprob_entropy_reference(hidden[::2], ref_w, targets[::2], truncation=(5, None, None))[0]
    ref.sum().backward()
    torch.testing.assert_close(w.grad.cpu(), ref_w.grad.float(), rtol=1e-4, atol=1e-5)


def test_ties_at_the_boundary_are_kept():
    z = torch.tensor([[3.0, 3.0, 3.0, 1.0, 0.0], [2.0, 1.0, 1.0, 1.0, -1.0]])

    def kept(**kw):
        zz = z.clone()
        tau = truncate_(zz, Truncation(**{k: torch.tensor(v) for k, v in kw.items()}))
        assert torch.equal(zz > float("-inf"), z >= tau[:, None])  # the threshold is the kept set
        return (zz > float("-inf")).sum(1).tolist()

    assert kept(top_k=[2, 2]) == [3, 4]  # every logit equal to the k-th largest stays, as in vLLM
    # top-p: the boundary token's ties all stay (vLLM's sort keeps an arbitrary subset of them)
    assert kept(top_p=[0.4, 0.5]) == [3, 4]
    ref = (truncate_reference(z, top_k=2) > float("-inf")).sum(1).tolist()
    assert ref == [3, 4]


def test_deterministic_and_truncated_together_are_batch_invariant():
    hidden, weight, targets, _ = _inputs(torch.float32)
    alone, _ = fusedpg.linear_logprob_entropy(hidden[:1], weight, targets[:1], top_p=0.8, deterministic=True)
    batch, _ = fusedpg.linear_logprob_entropy(hidden, weight, targets, top_p=0.8, deterministic=True,
                                              chunk_bytes=3 * V * 4)
    assert torch.equal(alone[0], batch[0])


def test_fused_loss_reports_outside_kept_and_matches_the_composition():
    hidden, weight, targets, _ = _inputs(torch.float32)
    mask = torch.ones(1, N)
    kw = dict(loss_type="grpo", top_k=10, top_p=0.9, impl="torch")
    loss, metrics = fusedpg.fused_linear_pg_loss(hidden[None], weight, targets.clamp(min=0)[None], torch.ones(1),
                                                 mask, old_logp=torch.full((1, N), -3.0), **kw)
    logp, ent = fusedpg.linear_logprob_entropy(hidden, weight, targets.clamp(min=0), top_k=10, top_p=0.9)
    want, _ = fusedpg.pg_loss(logp[None], torch.ones(1), mask, old_logp=torch.full((1, N), -3.0), entropy=ent[None],
                              loss_type="grpo")
    torch.testing.assert_close(loss, want)
    assert float(metrics["outside_kept"]) == pytest.approx(float((logp <= OUTSIDE_LOGP).float().mean()))
    assert "logp" not in metrics


@pytest.mark.parametrize("kw,exc,words", [
    (dict(top_k=-1), ValueError, "top_k must be >= 0"), (dict(top_p=0.0), ValueError, "top_p must be in (0, 1]"),
    (dict(top_p=1.5), ValueError, "top_p"), (dict(min_p=2.0), ValueError, "min_p must be in [0, 1]"),
    (dict(top_k=2.5), TypeError, "top_k must be an int"), (dict(top_p=torch.ones(3)), ValueError, "shape (14,)"),
])
def test_bad_settings_name_the_argument(kw, exc, words):
    hidden, weight, targets, _ = _inputs(torch.float32)
    with pytest.raises(exc) as err:
        fusedpg.linear_logprob_entropy(hidden, weight, targets, **kw)
    assert words in str(err.value)


def test_rollout_mismatch_metrics(backend):
    """With rollout_logp the metrics carry the sampler/trainer gap over the loss tokens: mean and max
    |logp - rollout_logp| and the k3 KL, the same from pg_loss and the fused loss."""
    hidden, weight, targets, _ = _inputs(torch.float32)
    y = targets.clamp(min=0)[None]
    mask = torch.ones(1, N)
    mask[0, 2] = 0
    logp, _ = fusedpg.linear_logprob_entropy(hidden, weight, y[0])
    rollout = (logp + 0.1 * torch.randn(N, generator=torch.Generator().manual_seed(3)))[None]
    gap = (logp[None] - rollout)[mask > 0]
    want = {"rollout_abs_diff": gap.abs().mean(), "rollout_abs_diff_max": gap.abs().max(),
            "rollout_kl": (torch.expm1(gap) - gap).mean()}
    _, ref = fusedpg.pg_loss(logp[None], torch.ones(1), mask, old_logp=logp[None], rollout_logp=rollout,
                             loss_type="grpo")
    dev = backend.device
    _, fused = fusedpg.fused_linear_pg_loss(hidden[None].to(dev), weight.to(dev), y.to(dev), torch.ones(1).to(dev),
                                            mask.to(dev), old_logp=logp[None].to(dev), rollout_logp=rollout.to(dev),
                                            loss_type="grpo", impl=backend.impl)
    for key, value in want.items():
        torch.testing.assert_close(ref[key], value, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(fused[key].cpu(), value, rtol=1e-4, atol=1e-6)


def test_backward_reuses_the_forward_thresholds(monkeypatch):
    """The recompute applies the thresholds the forward saved: no selection runs in either op's backward (every
    gradient test above then checks that backward against the float64 reference)."""
    import fusedpg.linear.plan_torch as lpt
    import fusedpg.logits.plan_torch as gpt

    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(9, 16, generator=g), torch.randn(200, 16, generator=g) / 2
    targets = torch.randint(0, 200, (9,), generator=g)
    h = hidden.clone().requires_grad_()
    logp, ent = fusedpg.linear_logprob_entropy(h, weight, targets, top_k=40, top_p=0.8, min_p=0.01, impl="torch")
    x = (hidden @ weight.T).requires_grad_()
    lp2, ent2 = fusedpg.logprob_entropy(x, targets, top_k=40, top_p=0.8, impl="torch")

    def selected(*_):
        raise AssertionError("the backward selected the thresholds again")

    for mod in (lpt, gpt):
        monkeypatch.setattr(mod, "truncate_", selected)
    (logp.sum() + ent.sum() + lp2.sum() + ent2.sum()).backward()
    assert h.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


@pytest.mark.parametrize("settings", [dict(top_k=7), dict(top_k=[3, 9], top_p=0.7), dict(top_p=0.8, min_p=0.05)])
def test_no_host_read_per_chunk(monkeypatch, settings):
    """The thresholds' host-side facts (is top-k / top-p on, one k for every row) are read once per call, not in
    each chunk's selection: on CUDA a per-chunk read is a device synchronisation per chunk."""
    import fusedpg.linear.plan_torch as lpt
    from fusedpg import truncation

    n = 12
    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(n, 16, generator=g), torch.randn(100, 16, generator=g)
    targets = torch.randint(0, 100, (n,), generator=g)
    kw = {k: (torch.tensor([v[0]] * (n // 2) + [v[1]] * (n // 2)) if isinstance(v, list) else v)
          for k, v in settings.items()}
    inside = []

    def guarded(z, trunc):
        inside.append(True)
        try:
            return truncation.truncate_(z, trunc)
        finally:
            inside.pop()

    def refuse(name, original):
        def method(self, *a, **k):
            if inside:
                raise AssertionError(f"host read ({name}) inside a chunk's selection")
            return original(self, *a, **k)
        return method

    for name in ("__bool__", "item", "tolist", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(lpt, "truncate_", guarded)
    logp, _ = fusedpg.linear_logprob_entropy(hidden, weight, targets, impl="torch", chunk_bytes=3 * 100 * 4, **kw)
    assert torch.isfinite(logp).all()


def test_radix_select_is_the_largest_threshold_that_reaches_the_target():
    """The 4-pass radix select (fp32 keys): counts give exactly the bisection's key; masses give the largest key
    whose float64 mass from the top reaches the target (the next larger key falls short), ties and negatives
    included."""
    from fusedpg.truncation import RADIX_COLUMNS, _keys, _radix_select, _select

    g = torch.Generator().manual_seed(7)
    z = torch.randn(64, RADIX_COLUMNS + 300, generator=g) * 4  # two column blocks
    z[:, :50] = z[:, :1]  # ties
    z[3] = -z[3].abs()  # a row of negatives only
    keys = _keys(z)
    k = torch.randint(1, z.shape[1], (64,), generator=g)
    bisect_k = _select(keys.to(torch.int64), None, k, 65)  # int64 keys take the bisection
    assert torch.equal(_radix_select(keys, None, k), bisect_k)
    w = torch.exp(z - z.amax(1, keepdim=True))
    target = 0.7 * w.sum(1)
    t = _radix_select(keys, w, target)
    mass = lambda thr: (w.double() * (keys.to(torch.int64) >= thr[:, None])).sum(1)  # noqa: E731
    nxt = torch.where(keys.to(torch.int64) > t[:, None], keys.to(torch.int64), torch.iinfo(torch.int64).max).amin(1)
    assert (mass(t) >= target.double()).all() and (mass(nxt) < target.double()).all()


def test_triton_digit_select_picks_the_torch_radix_thresholds():
    """The Triton backend's select (kernels/truncation.py: eight 4-bit passes, weights formed in the kernel) finds
    the same thresholds as the torch radix select: counts exactly, masses with the goal a fraction of the row's
    total; ties, negative rows and masked (-inf) columns included. Interpreted on CPU."""
    from fusedpg.truncation import _kernel_select, _keys, _radix_select

    g = torch.Generator().manual_seed(3)
    z = torch.randn(12, 300, generator=g) * 3
    z[:, :40] = z[:, :1]  # ties
    z[2] = -z[2].abs()  # negatives only
    z[5, 100:] = float("-inf")  # masked by min-p / top-k before top-p
    k = torch.randint(1, 300, (12,), generator=g)
    k[5] = 50
    m = z.amax(1, keepdim=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel's device (the interpreter on CPU)
    zd, md = z.to(dev), m.to(dev)
    assert torch.equal(_kernel_select(zd, md, k.double().to(dev), False).cpu(), _radix_select(_keys(z), None, k))
    w = torch.exp(z - m)
    p = torch.rand(12, generator=g).double()
    ours = _kernel_select(zd, md, lambda total: p.to(dev) * total, True).cpu()
    torch_keys = _radix_select(_keys(z), w, p * w.double().sum(1))
    assert torch.equal(ours, torch_keys)


def test_truncated_backward_without_the_saved_thresholds_is_refused():
    """A direct call of the backward op with top_k but no ``tau`` would silently give the untruncated gradient."""
    from fusedpg.logits.op import logprob_entropy_backward_op

    x, y = torch.randn(3, 10), torch.tensor([1, 2, 3])
    z = torch.zeros(3)
    with pytest.raises(ValueError, match="tau must be the forward's truncation thresholds"):
        logprob_entropy_backward_op(x, y, torch.ones(3), None, None, 1.0, z, z, z, -100, True, "torch", 0, False,
                                    torch.full((3,), 2), None, None)
