"""Several targets per position: ``targets [..., K]`` give log-probs ``[..., K]`` and one entropy from one pass,
with exact gradients and ``ignore_index`` per target; and top-k distillation on top of it, against dense float64
references under the tolerance model, through both backends."""
from __future__ import annotations

import pytest
import torch

import fusedpg
from fusedpg.linear.reference import linear_logprob_entropy_reference
from fusedpg.logits.reference import logprob_entropy_reference
from fusedpg.objective import on_policy_distillation_advantage, topk_distillation_loss
from fusedpg.verification.tolerance import assert_close_to_truth

B, T, H, V, K = 2, 5, 16, 61, 4


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5 * 2
    ids = torch.randint(0, V, (B, T, K), generator=g)
    ids[0, 1, 2] = -100  # one ignored target
    ids[1, 3] = -100  # a position with every target ignored
    up = (torch.randn(B, T, K, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64))
    return hidden.to(dtype), weight.to(dtype), ids, up


def _grads(fn, hidden, weight, ids, up):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = fn(h, w, ids)
    ((logp.double() * up[0]).sum() + (ent.double() * up[1]).sum()).backward()
    return dict(logp=logp.detach(), entropy=ent.detach(), d_hidden=h.grad, d_weight=w.grad)


def test_linear_multi_target_matches_the_reference(backend):
    hidden, weight, ids, up = _inputs(torch.float32)
    dev = backend.device
    ours = _grads(lambda h, w, y: fusedpg.linear_logprob_entropy(h.to(dev), w.to(dev), y.to(dev), temperature=0.9,
                                                                 impl=backend.impl, chunk_bytes=3 * V * 4),
                  hidden, weight, ids, up)
    eager = _grads(lambda h, w, y: linear_logprob_entropy_reference(h, w, y, None, 0.9, dtype=None),
                   hidden, weight, ids, up)
    h64, w64, _, _ = _inputs()
    truth = _grads(lambda h, w, y: linear_logprob_entropy_reference(h, w, y, None, 0.9), h64, w64, ids, up)
    assert ours["logp"].shape == (B, T, K) and ours["entropy"].shape == (B, T)
    for out in ours:
        assert_close_to_truth(f"multi.{out}", ours[out].cpu(), eager[out], truth[out], torch.float32)
    assert ours["logp"][0, 1, 2] == 0 and not ours["logp"][1, 3].any() and ours["entropy"][1, 3] == 0


def test_one_target_in_k_form_equals_the_single_target_call(backend):
    """``[..., 1]`` targets give bitwise the ``[...]`` call: outputs and gradients (the Triton launchers send them to
    the single-target kernels)."""
    hidden, weight, ids, up = _inputs(torch.float32)
    y = ids[..., 0]
    y[0, 0] = -100  # an ignored position: a row whose only target is ignored
    dev = backend.device

    def run(targets, c):
        h, w = hidden.clone().to(dev).requires_grad_(), weight.clone().to(dev).requires_grad_()
        logp, ent = fusedpg.linear_logprob_entropy(h, w, targets.to(dev), impl=backend.impl)
        x = (h @ w.T).detach().requires_grad_()
        lp2, ent2 = fusedpg.logprob_entropy(x, targets.to(dev), impl=backend.impl)
        ((logp * c).sum() + (ent * up[1].float().to(dev)).sum() + (lp2 * c).sum() + ent2.sum()).backward()
        return logp.reshape(y.shape), ent, lp2.reshape(y.shape), ent2, h.grad, w.grad, x.grad

    c = up[0][..., 0].float().to(dev)
    for one, many in zip(run(y, c), run(y[..., None], c[..., None])):
        assert torch.equal(one, many)


def test_logits_multi_target_matches_the_reference(backend):
    hidden, weight, ids, up = _inputs()
    logits64 = hidden @ weight.T

    def run(logits, fn):
        x = logits.clone().requires_grad_()
        logp, ent = fn(x)
        ((logp.double() * up[0]).sum() + (ent.double() * up[1]).sum()).backward()
        return dict(logp=logp.detach(), entropy=ent.detach(), d_logits=x.grad)

    ours = run(logits64.float().to(backend.device),
               lambda x: fusedpg.logprob_entropy(x, ids.to(backend.device), impl=backend.impl))
    eager = run(logits64.float(), lambda x: logprob_entropy_reference(x, ids, dtype=None))
    truth = run(logits64, lambda x: logprob_entropy_reference(x, ids))
    for out in ours:
        assert_close_to_truth(f"multi_logits.{out}", ours[out].cpu(), eager[out], truth[out], torch.float32)


# Awkward shapes for the kernels' multi-target path (interpreter tiles: BT=16, BV=32, BK=16 for the linear kernels,
# BT=4, BV=32 for the logits ones): N and V off the tile, a one-column last tile, K = 1 in [N, 1] form, K = 3 and
# 5 (padded to 4 and 8), several backward chunks, a per-token and a one-element temperature tensor, bf16 and fp32.
CASES = {
    "N37-V131-K3-fp32-per-token-T": dict(n=37, v=131, k=3, dtype=torch.float32, temperature="per-token", chunks=True),
    "N21-V257-K5-bf16": dict(n=21, v=257, k=5, dtype=torch.bfloat16, temperature=0.7),
    "N19-V100-K1-fp32-T-tensor": dict(n=19, v=100, k=1, dtype=torch.float32, temperature="tensor"),
    "N9-V96-K3-bf16-det": dict(n=9, v=96, k=3, dtype=torch.bfloat16, temperature=1.3, deterministic=True),
}
HK = 32


def _case_inputs(n, v, k, dtype, temperature, seed=0, **_):
    """float64 hidden [n, HK], weight [v, HK], bias [v]; targets [n, k] with duplicates, edge columns, ignored
    targets mixed in and a row whose targets are all ignored; upstream (c [n, k], d [n]); the temperature."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, HK, generator=g, dtype=torch.float64)
    weight = torch.randn(v, HK, generator=g, dtype=torch.float64) / HK ** 0.5 * 2
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    ids = torch.randint(0, v, (n, k), generator=g)
    ids[3, 0], ids[4, -1] = 0, v - 1  # the first and the last (partial) tile's edge columns
    ids[1] = -100  # every target of a row ignored
    if k > 1:
        ids[0, 1] = ids[0, 0]  # a duplicate target: its c adds up
        ids[2, 1:] = -100  # a row with one target left
        ids[5, 0] = -100  # an ignored target before kept ones
    up = (torch.randn(n, k, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64))
    if temperature == "per-token":
        temperature = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    elif temperature == "tensor":
        temperature = torch.rand(1, generator=g, dtype=torch.float64) + 0.5
    return dict(hidden=hidden, weight=weight, bias=bias), ids, up, temperature


def _differentiate(fn, leaves: dict, up, dtype, device="cpu"):
    """fn(**leaves at dtype) -> (logp, entropy); returns them and d_<leaf> of sum(logp c) + sum(entropy d)
    (c None: logp gets no upstream gradient at all)."""
    xs = {name: t.detach().to(device=device, dtype=dtype, copy=True).requires_grad_() for name, t in leaves.items()}
    logp, ent = fn(**xs)
    loss = (ent.double() * up[1].to(device)).sum()
    if up[0] is not None:
        loss = loss + (logp.double() * up[0].to(device)).sum()
    loss.backward()
    return dict(logp=logp.detach(), entropy=ent.detach(), **{f"d_{n}": x.grad for n, x in xs.items()})


def _check_all(prefix, ours, eager, truth, dtype):
    assert set(ours) == set(truth)
    for out in ours:
        assert_close_to_truth(f"{prefix}.{out}", ours[out].cpu(), eager[out], truth[out], dtype)


def _temps(temperature, dtype, device="cpu"):
    """The temperature for (ours, eager, truth): tensors fp32 for the ops and the eager reference, fp64 for truth."""
    if not isinstance(temperature, torch.Tensor):
        return temperature, temperature, temperature
    return temperature.float().to(device), temperature.float(), temperature


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_linear_multi_target_awkward_shapes(backend, case):
    leaves, ids, up, temperature = _case_inputs(**case)
    dtype, dev = case["dtype"], backend.device
    t_ours, t_eager, t_truth = _temps(temperature, dtype, dev)
    # chunks: a backward chunk of 16 rows (the interpreter's BT), so N = 37 runs three of them
    kw = dict(chunk_bytes=16 * case["v"] * 4 if case.get("chunks") else None,
              deterministic=case.get("deterministic", False))
    ours = _differentiate(lambda hidden, weight, bias: fusedpg.linear_logprob_entropy(
        hidden, weight, ids.to(dev), bias=bias, temperature=t_ours, impl=backend.impl, **kw), leaves, up, dtype, dev)
    eager = _differentiate(lambda hidden, weight, bias: linear_logprob_entropy_reference(
        hidden, weight, ids, bias, t_eager, dtype=None), leaves, up, dtype)
    truth = _differentiate(lambda hidden, weight, bias: linear_logprob_entropy_reference(
        hidden, weight, ids, bias, t_truth), leaves, up, torch.float64)
    _check_all("linear_multi", ours, eager, truth, dtype)
    assert ours["logp"].shape == ids.shape and ours["entropy"].shape == ids.shape[:1]
    ignored = ids == -100
    assert not ours["logp"][ignored].any() and ours["entropy"][1] == 0 and not ours["d_hidden"][1].any()


@pytest.mark.parametrize("inplace", [False, True], ids=["new-grad", "inplace"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_logits_multi_target_awkward_shapes(backend, case, inplace):
    leaves, ids, up, temperature = _case_inputs(**case)
    dtype, dev = case["dtype"], backend.device
    t_ours, t_eager, t_truth = _temps(temperature, dtype, dev)
    logits = {"logits": leaves["hidden"] @ leaves["weight"].T + leaves["bias"]}
    rounded = {"logits": logits["logits"].to(dtype).double()}  # the logits every path sees

    def ours_fn(logits):
        x = logits.clone() if inplace else logits  # the in-place backward overwrites its input
        return fusedpg.logprob_entropy(x, ids.to(dev), temperature=t_ours, impl=backend.impl,
                                       inplace_backward=inplace, deterministic=case.get("deterministic", False))

    ours = _differentiate(ours_fn, rounded, up, dtype, dev)
    eager = _differentiate(lambda logits: logprob_entropy_reference(logits, ids, t_eager, dtype=None),
                           rounded, up, dtype)
    truth = _differentiate(lambda logits: logprob_entropy_reference(logits, ids, t_truth), rounded, up,
                           torch.float64)
    _check_all("logits_multi", ours, eager, truth, dtype)
    assert not ours["logp"][ids == -100].any() and ours["entropy"][1] == 0 and not ours["d_logits"][1].any()


def test_multi_target_entropy_only_upstream(backend):
    """Only the entropy is differentiated (the backward gets grad_logp = None), through both ops."""
    leaves, ids, up, _ = _case_inputs(n=7, v=45, k=3, dtype=torch.float32, temperature=1.0)
    up, dev = (None, up[1]), backend.device
    leaves = {"hidden": leaves["hidden"], "weight": leaves["weight"]}
    ops = {
        "linear": (lambda hidden, weight: fusedpg.linear_logprob_entropy(hidden, weight, ids.to(dev),
                                                                         impl=backend.impl),
                   lambda hidden, weight, **kw: linear_logprob_entropy_reference(hidden, weight, ids, **kw)),
        "logits": (lambda hidden, weight: fusedpg.logprob_entropy(hidden @ weight.T, ids.to(dev), impl=backend.impl),
                   lambda hidden, weight, **kw: logprob_entropy_reference(hidden @ weight.T, ids, **kw)),
    }
    for op, (ours_fn, ref) in ops.items():
        ours = _differentiate(ours_fn, leaves, up, torch.float32, dev)
        eager = _differentiate(lambda **x: ref(**x, dtype=None), leaves, up, torch.float32)
        truth = _differentiate(ref, leaves, up, torch.float64)
        _check_all(f"{op}_entropy_only", ours, eager, truth, torch.float32)


def test_multi_target_runs_the_triton_kernels(monkeypatch):
    """impl='triton' with [N, K] targets runs the kernels themselves, forward and backward, for both ops."""
    import fusedpg.linear.plan_torch as linear_plan
    import fusedpg.logits.plan_torch as logits_plan

    def refuse(*args, **kwargs):
        raise AssertionError("the torch plan ran for impl='triton'")

    for plan in (linear_plan, logits_plan):
        for name in ("forward", "backward"):
            monkeypatch.setattr(plan, name, refuse)
    leaves, ids, up, _ = _case_inputs(n=7, v=40, k=3, dtype=torch.float32, temperature=1.0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = (leaves["hidden"] @ leaves["weight"].T).float().to(dev)
    for fn, leaf in ((lambda t: fusedpg.linear_logprob_entropy(t, leaves["weight"].float().to(dev), ids.to(dev),
                                                               impl="triton"), leaves["hidden"].float().to(dev)),
                     (lambda t: fusedpg.logprob_entropy(t, ids.to(dev), impl="triton"), x)):
        leaf = leaf.clone().requires_grad_()
        logp, ent = fn(leaf)
        ((logp * up[0].float().to(dev)).sum() + ent.sum()).backward()
        assert logp.shape == ids.shape and torch.isfinite(leaf.grad).all()


def _dense_distillation(logits, teacher_ids, teacher_logp, kind, beta=0.5):
    """The divergences on dense student logits, buckets spelled out: the K ids and the rest."""
    logsm = torch.log_softmax(logits, -1)
    s_log = logsm.gather(-1, teacher_ids)
    t = torch.softmax(teacher_logp, -1)
    s = s_log.exp()
    rest = 1 - s.sum(-1, keepdim=True)
    if kind == "forward":
        per = (t * (t.log() - s_log)).sum(-1)
    elif kind == "reverse":
        sn = s / s.sum(-1, keepdim=True)
        per = (sn * (sn.log() - t.log())).sum(-1)
    else:
        s_all, t_all = torch.cat([s, rest], -1), torch.cat([t, torch.zeros_like(rest)], -1)
        m = beta * t_all + (1 - beta) * s_all
        kl_t = torch.where(t_all > 0, t_all * (t_all.log() - m.log()), torch.zeros_like(t_all)).sum(-1)
        per = beta * kl_t + (1 - beta) * (s_all * (s_all.log() - m.log())).sum(-1)
    return per.mean()


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_topk_distillation_matches_the_dense_buckets(backend, kind):
    g = torch.Generator().manual_seed(4)
    hidden, weight, _, _ = _inputs(torch.float32)
    teacher_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    teacher_logp, teacher_ids = torch.log_softmax(teacher_logits, -1).topk(K, -1)  # what a teacher hands over
    dev = backend.device
    h, w = hidden.clone().to(dev).requires_grad_(), weight.clone().to(dev).requires_grad_()
    student, _ = fusedpg.linear_logprob_entropy(h, w, teacher_ids.to(dev), impl=backend.impl)
    loss = topk_distillation_loss(student, teacher_logp.float().to(dev), kind=kind)
    loss.backward()
    results = {}
    for dtype in (torch.float32, torch.float64):
        h64, w64 = hidden.to(dtype).clone().requires_grad_(), weight.to(dtype).clone().requires_grad_()
        want = _dense_distillation(h64 @ w64.T, teacher_ids, teacher_logp.to(dtype), kind)
        want.backward()
        results[dtype] = dict(loss=want.detach(), d_hidden=h64.grad, d_weight=w64.grad)
    for name, ours in (("loss", loss.detach()), ("d_hidden", h.grad), ("d_weight", w.grad)):
        assert_close_to_truth(f"{kind}.{name}", ours.cpu(), results[torch.float32][name],
                              results[torch.float64][name], torch.float32)


def test_distillation_inputs_and_on_policy_advantage():
    s = torch.log_softmax(torch.randn(3, 5), -1)[:, :2]
    with pytest.raises(ValueError, match="teacher_logp must have student_logp's shape"):
        topk_distillation_loss(s, s[:, :1])
    with pytest.raises(ValueError, match="kind must be one of"):
        topk_distillation_loss(s, s, kind="tv")
    with pytest.raises(ValueError, match="beta must lie in"):
        topk_distillation_loss(s, s, kind="jsd", beta=1.0)
    assert float(topk_distillation_loss(s, s, kind="reverse")) == pytest.approx(0.0, abs=1e-6)
    adv = on_policy_distillation_advantage(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]]))
    assert torch.equal(adv, torch.tensor([[0.5, -1.0]])) and not adv.requires_grad


def test_multi_target_shape_errors():
    hidden, weight, ids, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"targets must have hidden's leading shape \(2, 5\) or \(2, 5, 'K'\)"):
        fusedpg.linear_logprob_entropy(hidden, weight, ids[:, :3])
    with pytest.raises(ValueError, match="targets must have hidden's leading shape"):  # the fused loss: one target
        fusedpg.fused_linear_pg_loss(hidden, weight, ids.clamp(min=0), torch.ones(B), torch.ones(B, T),
                                     old_logp=torch.zeros(B, T), loss_type="grpo")
