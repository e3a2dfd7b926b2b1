"""The public ops inside torch.compile(fullgraph=True) on CPU: each is one custom op (the same code eager runs), no
graph break, results, gradients and metric dictionaries equal to eager."""
import pytest
import torch

import fusedpg

B, T, H, V = 3, 5, 8, 13


def _data(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g, dtype=dtype)
    w = torch.randn(V, H, generator=g, dtype=dtype) * 0.5
    b = torch.randn(V, generator=g, dtype=dtype) * 0.1
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=dtype)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    adv = torch.randn(B, generator=g, dtype=dtype)
    with torch.no_grad():
        lp, _ = fusedpg.linear_logprob_entropy(x, w, y, bias=b)
    old = lp + 0.1 * torch.randn(B, T, generator=g, dtype=dtype)
    ref = lp + 0.1 * torch.randn(B, T, generator=g, dtype=dtype)
    return x, w, b, y, mask, adv, old, ref


def _grads(fn, leaves, *args):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves, *args)
    loss = out[0] if isinstance(out, tuple) else out
    return out, torch.autograd.grad(loss, leaves)


def _same(eager, compiled, rtol=1e-6, atol=1e-6):
    (o1, g1), (o2, g2) = eager, compiled
    o1 = o1 if isinstance(o1, tuple) else (o1,)
    o2 = o2 if isinstance(o2, tuple) else (o2,)
    for a, b in zip(o1, o2):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_ops_registered():
    for name in ("linear_logprob_entropy", "linear_logprob_entropy_backward", "logprob_entropy",
                 "logprob_entropy_backward", "logprob_entropy_backward_", "fused_linear_pg_loss",
                 "shared_prefix_attention", "shared_prefix_attention_backward"):
        assert hasattr(torch.ops.fusedpg, name), name


def test_linear_logprob_entropy_fullgraph_inductor():
    x, w, b, y, *_ = _data()
    y = y.clone()
    y[0, 4] = -100

    def f(x, w, b, y):
        lp, h = fusedpg.linear_logprob_entropy(x, w, y, bias=b, temperature=0.7)
        return (1.3 * lp + 0.5 * h).sum(), lp, h

    torch._dynamo.reset()
    _same(_grads(f, (x, w, b), y), _grads(torch.compile(f, fullgraph=True), (x, w, b), y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_token_temperature", [False, True])
def test_logprob_entropy_fullgraph(per_token_temperature):
    x, w, b, y, *_ = _data(1)
    logits = x @ w.T
    temp = torch.full((B, T), 0.9) if per_token_temperature else 0.9

    def f(z, y):
        lp, h = fusedpg.logprob_entropy(z, y, temperature=temp)
        return (lp - 0.3 * h).sum(), lp, h

    _same(_grads(f, (logits,), y), _grads(torch.compile(f, fullgraph=True, backend="aot_eager"), (logits,), y))


@pytest.mark.parametrize("options", [
    dict(loss_type="grpo", beta=0.04, entropy_coef=0.01),
    dict(loss_type="dapo", importance_sampling_level="sequence", num_items_in_batch=9.0),
    dict(loss_type="cispo", top_entropy_quantile=0.5),  # two-phase plan
])
def test_fused_linear_pg_loss_fullgraph(options):
    x, w, b, y, mask, adv, old, ref = _data(2)
    cfg = fusedpg.PGLossConfig(**options)

    def f(x, w, b, y, adv, mask, old, ref):
        loss, met = fusedpg.fused_linear_pg_loss(x, w, y, adv, mask, old_logp=old, ref_logp=ref, bias=b, config=cfg,
                                                 temperature=0.8, return_token_stats=True)
        return loss, met["logp"], met["entropy"], met["tokens"]

    eager = _grads(f, (x, w, b), y, adv, mask, old, ref)
    compiled = _grads(torch.compile(f, fullgraph=True, backend="aot_eager"), (x, w, b), y, adv, mask, old, ref)
    _same(eager, compiled)


def test_checks_still_run_inside_the_op():
    x, w, b, y, *_ = _data(4)
    bad = y.clone()
    bad[0, 0] = V + 3

    @torch.compile(fullgraph=True, backend="eager")
    def f(x, w, y):
        return fusedpg.linear_logprob_entropy(x, w, y)[0].sum()

    with pytest.raises(ValueError, match="targets must lie"):
        f(x, w, bad)


def test_opcheck_linear_op():
    x, w, b, y, *_ = _data(5)
    args = (x.reshape(-1, H).requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(), y.reshape(-1),
            None, 0.9, -100, True, True, "torch", 0, False, None, None, None)
    torch.library.opcheck(torch.ops.fusedpg.linear_logprob_entropy.default, args)
    torch.library.opcheck(torch.ops.fusedpg.linear_logprob_entropy.default, args[:-4] + (True, None, None, None))
    n = args[0].shape[0]  # deterministic, and the truncated distribution (per-row top-k, top-p)
    truncated = (torch.full((n,), 5, dtype=torch.long), torch.full((n,), 0.9), None)
    torch.library.opcheck(torch.ops.fusedpg.linear_logprob_entropy.default, args[:-3] + truncated)


def test_fresh_process_registers_ops_lazily():
    """A fresh process: importing fusedpg registers the ops, and fullgraph=True holds on the first compile."""
    import subprocess
    import sys

    code = (
        "import torch, fusedpg\n"
        "x = torch.randn(6, 8, requires_grad=True); w = torch.randn(5, 8, requires_grad=True)\n"
        "y = torch.randint(0, 5, (6,))\n"
        "f = lambda x, w, y: fusedpg.linear_logprob_entropy(x, w, y)[0].sum()\n"
        "a = f(x, w, y); b = torch.compile(f, fullgraph=True, backend='aot_eager')(x, w, y)\n"
        "ga = torch.autograd.grad(a, (x, w)); gb = torch.autograd.grad(b, (x, w))\n"
        "assert torch.allclose(a, b) and all(torch.allclose(p, q) for p, q in zip(ga, gb))\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("options", [
    dict(loss_type="grpo", beta=0.04), dict(loss_type="bapo"), dict(loss_type="vespo", is_weights=True), dict(loss_type="dapo", off_policy_mask_threshold=0.5),
    dict(loss_type="clip_cov"), dict(loss_type="gspo", beta=0.1, entropy_coef=0.01),
])
def test_every_metric_key_of_eager_under_compile(options):
    """Metrics come from one definition (the loss layer): the compiled call returns the eager keys and values,
    including the variant-specific ones (BAPO's bounds, Clip-Cov's selection, VESPO's phi, OPSM)."""
    x, w, b, y, mask, adv, old, ref = _data(6)
    kw = dict(options)
    isw = torch.rand(B) + 0.5 if kw.pop("is_weights", False) else None

    def f(x, w, y, adv, mask, old, ref):
        return fusedpg.fused_linear_pg_loss(x, w, y, adv, mask, old_logp=old, ref_logp=ref, is_weights=isw, seed=0,
                                            **kw)

    eager_loss, eager_met = f(x, w, y, adv, mask, old, ref)
    # f is one code object across the parameters: a fresh dynamo keeps their floats constants (a recompile with
    # other values would mark them dynamic, and the loss config must be a constant of the graph)
    torch._dynamo.reset()
    loss, met = torch.compile(f, fullgraph=True, backend="eager")(x, w, y, adv, mask, old, ref)
    torch.testing.assert_close(loss, eager_loss)
    assert set(met) == set(eager_met)
    for k in eager_met:
        torch.testing.assert_close(met[k], eager_met[k], msg=k)


def test_inplace_backward_under_compile():
    x, w, b, y, *_ = _data(7)

    def f(z, y):
        lp, h = fusedpg.logprob_entropy(z * 1.0, y, inplace_backward=True)
        return (lp - 0.3 * h).sum()

    z1 = (x @ w.T).detach().requires_grad_()
    z2 = z1.detach().clone().requires_grad_()
    torch.autograd.grad(f(z1, y), z1)
    g1 = torch.autograd.grad(f(z1, y), z1)[0]
    g2 = torch.autograd.grad(torch.compile(f, fullgraph=True, backend="aot_eager")(z2, y), z2)[0]
    torch.testing.assert_close(g1, g2)
