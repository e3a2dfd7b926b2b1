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


def test_one_target_in_k_form_equals_the_single_target_call():
    hidden, weight, ids, _ = _inputs(torch.float32)
    y = ids[..., 0].clamp(min=0)
    single = fusedpg.linear_logprob_entropy(hidden, weight, y, impl="torch")
    multi = fusedpg.linear_logprob_entropy(hidden, weight, y[..., None], impl="torch")
    assert torch.equal(multi[0][..., 0], single[0]) and torch.equal(multi[1], single[1])


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
