"""One-Token Rollout: K candidates sampled inside the fused pass (a counter-based inverse-CDF sampler), scored by the
multi-target head, rewarded by the ground truth; against float64 references under the tolerance model, through
both backends, plus the sampler's own law and its independence of the batch."""
from __future__ import annotations

import pytest
import torch

import fusedpg
from fusedpg import otr_loss, otr_sft_loss, sample_logprob_entropy
from fusedpg.linear.reference import linear_logprob_entropy_reference, sample_reference
from fusedpg.linear_pg.otr import otr_loss_reference
from fusedpg.verification.tolerance import assert_close_to_truth

B, T, H, V, K = 2, 6, 16, 71, 3


def _inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5 * 2
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 0] = -100
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_draws_are_the_float64_inverse_cdf(dtype):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(300, 32, generator=g).to(dtype)
    weight = (torch.randn(700, 32, generator=g) * 0.3).to(dtype)  # three cumsum blocks, a partial one
    ids = torch.randint(0, 2 ** 32, (300,), generator=g)
    tokens, _, _ = sample_logprob_entropy(hidden, weight, 4, seed=2 ** 40 + 7, sample_ids=ids, temperature=0.8)
    ref, margin = sample_reference(hidden, weight, 4, 2 ** 40 + 7, ids, temperature=0.8)
    # a draw may differ only where its uniform lies within the fp32 rounding of the probabilities of an edge
    differ = tokens != ref
    assert not (differ & (margin > 1e-5)).any()
    assert differ.sum() <= 2


def test_draws_follow_the_softmax():
    """20000 rows of the same logits with distinct ids: the empirical law against softmax, by Pearson's chi-square
    (7 degrees of freedom; 24.3 is its 0.999 quantile) and the K columns' collision rate (independent draws)."""
    z = torch.tensor([2.0, 0.1, -3.0, 1.0, -1.5, -2.0, 0.8, 1.4])
    weight = (z / 4)[:, None].expand(8, 4).contiguous()
    tokens, _, _ = sample_logprob_entropy(torch.ones(20000, 4), weight, 2, seed=123)
    n = tokens.numel()
    counts = torch.bincount(tokens.reshape(-1), minlength=8).double()
    p = z.double().softmax(0)
    assert ((counts - n * p) ** 2 / (n * p)).sum() < 24.3
    assert abs((tokens[:, 0] == tokens[:, 1]).double().mean() - (p ** 2).sum()) < 0.02


def test_logp_entropy_and_gradients_of_the_draws_match_the_reference(backend):
    hidden, weight, bias, labels = _inputs(torch.float32)
    dev = backend.device
    g = torch.Generator().manual_seed(3)
    up = (torch.randn(B, T, K, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64))
    h, w, b = (x.clone().to(dev).requires_grad_() for x in (hidden, weight, bias))
    tokens, logp, ent = sample_logprob_entropy(h, w, K, seed=11, valid=(labels != -100).to(dev), bias=b,
                                               temperature=0.9, impl=backend.impl, chunk_bytes=5 * V * 4)
    ((logp.double() * up[0].to(dev)).sum() + (ent.double() * up[1].to(dev)).sum()).backward()
    ours = dict(logp=logp.detach(), entropy=ent.detach(), d_hidden=h.grad, d_weight=w.grad, d_bias=b.grad)
    y = tokens.cpu()
    assert (y[0, 0] == -100).all() and ((y[labels != -100] >= 0) & (y[labels != -100] < V)).all()

    def run(dtype, head_dtype):
        hh, ww, bb = (x.to(dtype).clone().requires_grad_() for x in _inputs()[:3])
        lp, en = linear_logprob_entropy_reference(hh, ww, y, bb, 0.9, dtype=head_dtype)
        ((lp.double() * up[0]).sum() + (en.double() * up[1]).sum()).backward()
        return dict(logp=lp.detach(), entropy=en.detach(), d_hidden=hh.grad, d_weight=ww.grad, d_bias=bb.grad)

    eager, truth = run(torch.float32, None), run(torch.float64, torch.float64)
    for out in ours:
        assert_close_to_truth(f"otr_sample.{out}", ours[out].cpu(), eager[out], truth[out], torch.float32)


def test_draws_do_not_depend_on_the_batch():
    """deterministic=True: a row drawn alone equals the same row (same id) inside other batches and chunkings."""
    hidden, weight, _, _ = _inputs(torch.float32)
    flat = hidden.reshape(-1, H)
    ids = torch.arange(flat.shape[0]) * 7919 + 13
    alone = sample_logprob_entropy(flat[4:5], weight, K, seed=5, sample_ids=ids[4:5], deterministic=True)
    for perm, chunk in ((torch.arange(12), None), (torch.arange(11, -1, -1), 2 * V * 4), (torch.arange(12), V * 4)):
        batch = sample_logprob_entropy(flat[perm], weight, K, seed=5, sample_ids=ids[perm], chunk_bytes=chunk,
                                       deterministic=True)
        row = int((perm == 4).nonzero())
        for a, x in zip(alone, batch):
            assert torch.equal(a[0], x[row])
    other_seed = sample_logprob_entropy(flat, weight, K, seed=6, sample_ids=ids)[0]
    assert not torch.equal(other_seed, sample_logprob_entropy(flat, weight, K, seed=5, sample_ids=ids)[0])


@pytest.mark.parametrize("aggregation,baseline", [("token-mean", "none"), ("seq-mean-token-mean", "mean"),
                                                  ("sum", "none")])
def test_otr_loss_and_gradients_match_the_reference(backend, aggregation, baseline):
    hidden, weight, bias, labels = _inputs(torch.float32)
    dev = backend.device
    mask = torch.ones(B, T)
    mask[1, -2:] = 0
    h, w = hidden.clone().to(dev).requires_grad_(), weight.clone().to(dev).requires_grad_()
    loss, metrics = otr_loss(h, w, labels.to(dev), mask=mask.to(dev), num_samples=K, otr_beta=0.3,
                             otr_baseline=baseline, seed=4, bias=bias.to(dev), aggregation=aggregation,
                             impl=backend.impl)
    loss.backward()
    tokens = metrics["tokens"].cpu()
    assert (tokens[1, -2:] == -100).all()

    hh, ww = (_inputs()[i].clone().requires_grad_() for i in (0, 1))
    ref = otr_loss_reference(hh, ww, labels, tokens, mask=mask, otr_beta=0.3, otr_baseline=baseline,
                             aggregation=aggregation, bias=bias.double())
    ref.backward()
    truth = dict(loss=ref.detach(), d_hidden=hh.grad, d_weight=ww.grad)
    ours = dict(loss=loss.detach(), d_hidden=h.grad, d_weight=w.grad)
    for out in ours:
        assert_close_to_truth(f"otr.{aggregation}.{out}", ours[out].cpu(), None, truth[out], torch.float32)
    valid = (labels != -100) & (mask != 0)
    hits = (tokens == labels[..., None]) & valid[..., None]
    assert metrics["hit_rate"] == hits.sum() / (valid.sum() * K)


def test_fused_loss_type_otr_is_the_otr_loss():
    hidden, weight, _, labels = _inputs(torch.float32)
    mask = torch.ones(B, T)
    a = otr_loss(hidden, weight, labels, mask=mask, num_samples=2, seed=9, otr_beta=0.5)
    b = fusedpg.fused_linear_pg_loss(hidden, weight, labels, None, mask, loss_type="otr", num_samples=2, seed=9,
                                     otr_beta=0.5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["tokens"], b[1]["tokens"])
    with pytest.raises(ValueError, match="advantages must be None"):
        fusedpg.fused_linear_pg_loss(hidden, weight, labels, torch.ones(B), mask, loss_type="otr")
    with pytest.raises(ValueError, match="old_logp"):
        fusedpg.fused_linear_pg_loss(hidden, weight, labels, None, mask, loss_type="otr", old_logp=torch.zeros(B, T))


def test_otr_sft_loss_on_a_transformers_model():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg)
    ids = torch.randint(0, 97, (2, 9))
    labels = ids.clone()
    labels[:, :3] = -100  # the prompt
    loss, metrics = otr_sft_loss(model, ids, labels, num_samples=3, seed=1)
    loss.backward()
    assert isinstance(model.get_output_embeddings(), fusedpg.FusedLMHead)
    assert model.lm_head.weight.grad is not None and model.model.layers[0].mlp.up_proj.weight.grad is not None
    hidden = model.model(input_ids=ids).last_hidden_state.detach()
    ref = otr_loss_reference(hidden[:, :-1].double(), model.lm_head.weight.detach().double(), labels[:, 1:],
                             metrics["tokens"])
    assert_close_to_truth("otr_sft.loss", loss.detach(), None, ref, torch.float32)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_samples=0), "num_samples must be an int >= 1"),
    (dict(num_samples=2.0), "num_samples must be an int >= 1"),
    (dict(otr_beta=-1.0), "otr_beta must be a number >= 0"),
    (dict(otr_baseline="group"), "otr_baseline must be 'none' or 'mean'"),
    (dict(aggregation="dapo"), "aggregation must be one of"),
    (dict(seed=-1), "seed must be an int in"),
    (dict(sample_ids=torch.zeros(3, dtype=torch.long)), "sample_ids must have hidden's leading shape"),
    (dict(sample_ids=torch.full((B, T), -1)), r"sample_ids must lie in \[0, 2\*\*32\)"),
    (dict(mask=torch.ones(3)), "mask must have hidden's leading shape"),
])
def test_bad_otr_arguments_name_the_argument(kwargs, match):
    hidden, weight, _, labels = _inputs(torch.float32)
    with pytest.raises((ValueError, TypeError), match=match):
        otr_loss(hidden, weight, labels, **kwargs)


def test_bad_sampler_arguments_name_the_argument():
    hidden, weight, _, _ = _inputs(torch.float32)
    with pytest.raises(TypeError, match="valid must be a bool tensor"):
        sample_logprob_entropy(hidden, weight, 2, seed=0, valid=torch.ones(B, T))
    with pytest.raises(TypeError, match="sample_ids must be an integer tensor"):
        sample_logprob_entropy(hidden, weight, 2, seed=0, sample_ids=torch.ones(B, T))
    with pytest.raises(ValueError, match="labels must have hidden's leading shape"):
        otr_loss(hidden, weight, torch.zeros(3, dtype=torch.long))


def test_verify_runs_the_seed_methods():
    import io

    from fusedpg.verification import runner

    buf = io.StringIO()
    assert runner.run("cpu", "torch", [torch.float32], out=buf, groups=("seed",))
    rows = [line for line in buf.getvalue().splitlines() if line.endswith("PASS")]
    assert [r.split()[0] for r in rows] == ["otr_loss", "copo_advantages", "knapsack_group_sizes"]
