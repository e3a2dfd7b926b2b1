"""``deterministic=True``: a row's log-prob, entropy and input gradient are bitwise the same whatever batch it sits in
(its size, the other rows' values, ignored rows, its position, chunk_bytes), and every gradient is bitwise the same
on a rerun. Checked with torch.equal through the torch plan and the Triton interpreter."""
from __future__ import annotations

import pytest
import torch

import fusedpg

H, V = 16, 300
CHUNKS = (None, 4 * V * 4, 7 * V * 4)  # default, 4 rows, 7 rows of fp32 logits


def _row():
    g = torch.Generator().manual_seed(1)
    return torch.randn(H, generator=g), 0.8, 17  # hidden row, its temperature, its target


def _batch(n, pos, seed, dtype=torch.float32):
    """n rows of random data (a few ignored) with the probe row at ``pos``."""
    g = torch.Generator().manual_seed(seed)
    x, t, y = _row()
    hidden = torch.randn(n, H, generator=g)
    hidden[pos] = x
    temps = 0.5 + torch.rand(n, generator=g)
    temps[pos] = t
    targets = torch.randint(0, V, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.2] = -100
    targets[pos] = y
    up = torch.randn(2, n, generator=g)
    up[:, pos] = torch.tensor([0.7, -0.3])
    return hidden.to(dtype), temps, targets, up


def _weight(dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype), torch.randn(V, generator=g).to(dtype)


def _on(impl):
    """Where the inputs live: the Triton plan runs on CUDA when there is one (else the interpreter, on CPU)."""
    return (lambda x: x.to("cuda")) if impl == "triton" and torch.cuda.is_available() else (lambda x: x)


def _linear(hidden, temps, targets, up, impl, chunk_bytes, **kw):
    on = _on(impl)
    w, b = (on(x) for x in _weight(hidden.dtype))
    h, w, b = on(hidden.clone()).requires_grad_(), w.requires_grad_(), b.requires_grad_()
    logp, ent = fusedpg.linear_logprob_entropy(h, w, on(targets), bias=b, temperature=on(temps), impl=impl,
                                               chunk_bytes=chunk_bytes, **kw)
    (logp * on(up[0]) + ent * on(up[1])).sum().backward()
    return tuple(x.cpu() for x in (logp.detach(), ent.detach(), h.grad, w.grad, b.grad))


def _logits(hidden, temps, targets, up, impl, chunk_bytes, **kw):
    on = _on(impl)
    w, b = _weight(hidden.dtype)
    # one GEMV per row: the probe row's logits must not depend on the batch they are built in
    z = on(torch.stack([torch.addmv(b, w, x) for x in hidden])).detach().requires_grad_()
    logp, ent = fusedpg.logprob_entropy(z, on(targets), temperature=on(temps), impl=impl, chunk_bytes=chunk_bytes,
                                        **kw)
    (logp * on(up[0]) + ent * on(up[1])).sum().backward()
    return tuple(x.cpu() for x in (logp.detach(), ent.detach(), z.grad))


OPS = {"linear": _linear, "logits": _logits}


@pytest.mark.parametrize("op", list(OPS))
def test_a_row_is_bitwise_the_same_in_every_batch(backend, op):
    if backend.interpreted and op == "logits":
        pytest.skip("the Triton logits kernel reads each row alone by construction; the torch plan is the risk")
    run = OPS[op]
    alone = run(*_batch(1, 0, seed=3), backend.impl, None, deterministic=True)
    sizes = ((5, 0), (23, 11), (40, 39)) if not backend.interpreted else ((5, 4), (23, 11))
    for (n, pos), chunk in zip(sizes, CHUNKS):
        for seed in (4, 5):
            got = run(*_batch(n, pos, seed), backend.impl, chunk, deterministic=True)
            for name, a, b in zip(("logp", "entropy", "d_input"), alone[:3], got[:3]):
                assert torch.equal(a[0], b[pos]), f"{op} {name}: N={n} pos={pos} chunk={chunk} seed={seed}"


@pytest.mark.parametrize("op", list(OPS))
def test_reruns_are_bitwise_identical_including_the_weight_gradient(backend, op):
    run = OPS[op]
    batch = _batch(23, 5, seed=6)
    first = run(*batch, backend.impl, CHUNKS[1], deterministic=True)
    again = run(*batch, backend.impl, CHUNKS[1], deterministic=True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_weight_gradient_does_not_depend_on_chunk_bytes(backend):
    """d_weight and d_bias are one running sum over the rows in a fixed order (the torch plan's fixed row blocks, the
    Triton plan's fixed-tile GEMM continued chunk to chunk), so they do not change with ``chunk_bytes`` either."""
    batch = _batch(40, 7, seed=8)
    first, *rest = (_linear(*batch, backend.impl, chunk, deterministic=True) for chunk in CHUNKS)
    for chunk, other in zip(CHUNKS[1:], rest):
        assert torch.equal(first[3], other[3]) and torch.equal(first[4], other[4]), f"chunk_bytes={chunk}"


@pytest.mark.parametrize("truncated", [False, True], ids=["full", "top-k-top-p"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_low_memory_plan_rows_and_reruns(dtype, truncated):
    """memory="low" (vocabulary blocks, row tiles, ignored rows gathered tile by tile) keeps the guarantees: its
    deterministic tiles have a fixed shape whatever N and chunk_bytes."""
    low = dict(deterministic=True, memory="low", **(dict(top_k=40, top_p=0.8) if truncated else {}))
    alone = _linear(*_batch(1, 0, seed=3, dtype=dtype), "torch", None, **low)
    for (n, pos), chunk in zip(((5, 0), (23, 11), (40, 39)), CHUNKS):
        got = _linear(*_batch(n, pos, 4, dtype=dtype), "torch", chunk, **low)
        for name, a, b in zip(("logp", "entropy", "d_input"), alone[:3], got[:3]):
            assert torch.equal(a[0], b[pos]), f"{name}: N={n} pos={pos} chunk={chunk}"
    batch = _batch(23, 5, seed=6, dtype=dtype)
    first, again = (_linear(*batch, "torch", CHUNKS[1], **low) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_environment_switch(monkeypatch):
    batch = _batch(9, 2, seed=7)
    want = _linear(*batch, "torch", CHUNKS[2], deterministic=True)
    monkeypatch.setenv("FUSEDPG_DETERMINISTIC", "1")
    got = _linear(*batch, "torch", CHUNKS[2])
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_deterministic_results_are_correct(backend):
    """The padding and fixed blocks change nothing but the rounding order: the default mode agrees closely."""
    batch = _batch(23, 5, seed=8)
    det = _linear(*batch, backend.impl, None, deterministic=True)
    ref = _linear(*batch, backend.impl, None, deterministic=False)
    for a, b in zip(det, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_loss_rows_and_reruns(backend):
    def run(n, pos, seed):
        on = _on(backend.impl)
        hidden, temps, targets, _ = _batch(n, pos, seed)
        w, _ = _weight()
        mask = (targets != -100).float()
        h, w = on(hidden.clone()).requires_grad_(), on(w).requires_grad_()
        g = torch.Generator().manual_seed(seed)
        loss, metrics = fusedpg.fused_linear_pg_loss(
            h[None], w, on(targets.clamp(min=0))[None], on(torch.randn(1, generator=g)), on(mask)[None],
            old_logp=on(torch.full((1, n), -5.0)), loss_type="grpo", temperature=on(temps)[None], impl=backend.impl,
            return_token_stats=True, deterministic=True)
        loss.backward()
        return tuple(x.cpu() for x in (loss.detach(), h.grad, w.grad, metrics["logp"][0], metrics["entropy"][0]))

    first, again = run(23, 5, 9), run(23, 5, 9)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = run(12, 3, 10)
    assert torch.equal(first[3][5], other[3][3]) and torch.equal(first[4][5], other[4][3])


def test_segment_width_from_the_environment(monkeypatch):
    """FUSEDPG_DETERMINISTIC_SEGMENT sets the fixed vocabulary segment (so that a GPU's tensor-parallel shards can be
    whole segments); the results stay correct and batch-invariant, and a bad value names the variable."""
    from fusedpg import fixed_rows

    monkeypatch.setenv("FUSEDPG_DETERMINISTIC_SEGMENT", "64")
    assert fixed_rows.vocab_segment(torch.device("cpu")) == 64
    hidden, temps, targets, up = _batch(9, 4, seed=3)
    alone = _linear(*(x[4:5] if x.dim() == 1 else x[4:5] for x in (hidden, temps, targets)), up[:, 4:5], "torch",
                    None, deterministic=True)
    inside = _linear(hidden, temps, targets, up, "torch", None, deterministic=True)
    assert torch.equal(alone[0][0], inside[0][4]) and torch.equal(alone[2][0], inside[2][4])
    default = _linear(hidden, temps, targets, up, "torch", None, deterministic=False)
    for got, want in zip(inside, default):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("FUSEDPG_DETERMINISTIC_SEGMENT", "0")
    with pytest.raises(ValueError, match="FUSEDPG_DETERMINISTIC_SEGMENT must be a positive number"):
        fixed_rows.vocab_segment(torch.device("cpu"))
