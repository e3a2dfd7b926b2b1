"""One host synchronisation per call of the fused loss (fusedpg/linear_pg/README.md#host-synchronisation).

On CPU a read costs nothing, so the tests make every read visible instead: ``fusedpg.host.host_read`` (the one
read) is counted, and during the call every other way to read the device from fusedpg code raises (``.item()``,
``.tolist()``, ``bool(t)``, ``nonzero``, boolean indexing, ``torch.tensor`` of host data, which is a host-to-device
copy that synchronises on CUDA too). On CUDA, ``torch.cuda.set_sync_debug_mode("error")`` checks the same directly.
"""
from __future__ import annotations

import contextlib
import sys

import pytest
import torch

import fusedpg
from fusedpg import host

B, T, H, V = 3, 5, 16, 40
CHUNK = 6 * V * 4  # six fp32 rows of logits: several chunks per call (a per-chunk read would show)
CASES = [(impl, lt, layout) for impl in ("torch", "triton") for lt in ("grpo", "dapo")
         for layout in ("padded", "packed")]
#: Where each impl's inputs live: the Triton plan on CUDA where there is one (the interpreter on CPU otherwise).
DEVICE = {"torch": "cpu", "triton": "cuda" if torch.cuda.is_available() else "cpu"}


def _inputs(layout: str, device="cpu", seed: int = 0, per_token_temperature: bool = False):
    """(leaves, args, kwargs) of one call: a float 0/1 mask (its binary check is one of the queued reads)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B * T, H, generator=g).to(device).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(device).requires_grad_()
    targets = torch.randint(0, V, (B * T,), generator=g)
    mask = (torch.rand(B * T, generator=g) > 0.3).float()
    old = torch.randn(B * T, generator=g) - 3
    kw = {}
    if layout == "packed":
        kw["seq_ids"] = torch.tensor([0] * 4 + [1] * 6 + [2] * 5, device=device)
        h, y, m, o = hidden, targets, mask, old
    else:
        h, y, m, o = hidden.view(B, T, H), targets.view(B, T), mask.view(B, T), old.view(B, T)
    if per_token_temperature:
        kw["temperature"] = (0.5 + torch.rand(y.shape, generator=g)).to(device)
    adv = torch.randn(B, generator=g).to(device)
    return (hidden, weight), (h, weight, y.to(device), adv, m.to(device)), dict(old_logp=o.to(device), **kw)


def _step(impl, loss_type, args, kw):
    """Forward and backward: a training step's use of the loss."""
    loss, metrics = fusedpg.fused_linear_pg_loss(*args, loss_type=loss_type, impl=impl, chunk_bytes=CHUNK, **kw)
    loss.backward()
    return loss, metrics


def _count_reads(monkeypatch):
    calls = []
    real = host.host_read

    def counted(t):
        calls.append(t.numel())
        return real(t)

    monkeypatch.setattr(host, "host_read", counted)
    return calls


@pytest.mark.parametrize("impl,loss_type,layout", CASES)
def test_one_read_per_call(monkeypatch, impl, loss_type, layout):
    _, args, kw = _inputs(layout, DEVICE[impl])
    _step(impl, loss_type, args, kw)  # first call: the metric-key probe (CPU tensors) runs once per config
    calls = _count_reads(monkeypatch)
    _step(impl, loss_type, args, kw)
    assert len(calls) == 1, calls


def test_one_read_with_per_token_temperature(monkeypatch):
    _, args, kw = _inputs("padded", per_token_temperature=True)
    _step("torch", "dapo", args, kw)
    calls = _count_reads(monkeypatch)
    _step("torch", "dapo", args, kw)
    assert len(calls) == 1, calls


@contextlib.contextmanager
def _no_other_reads(monkeypatch):
    """Every other host read from fusedpg code raises; ``host_read`` may read."""
    inside = []

    def from_fusedpg() -> bool:
        name = sys._getframe(2).f_code.co_filename.replace("\\", "/")
        return not inside and ("/fusedpg/" in name or "/kernels/" in name)

    def guard(owner, name, when=lambda *a, **k: True):
        real = getattr(owner, name)

        def patched(*a, **k):
            if from_fusedpg() and when(*a, **k):
                raise AssertionError(f"a host read outside host_read: {name}")
            return real(*a, **k)

        monkeypatch.setattr(owner, name, patched)

    host_data = lambda data, *a, **k: not isinstance(data, torch.Tensor)  # noqa: E731
    bool_index = lambda t, idx: any(isinstance(i, torch.Tensor) and i.dtype == torch.bool  # noqa: E731
                                    for i in (idx if isinstance(idx, tuple) else (idx,)))
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique", "cpu",
                 "numpy", "masked_select"):
        guard(torch.Tensor, name)
    for name in ("nonzero", "unique", "masked_select"):
        guard(torch, name)
    guard(torch, "tensor", host_data)
    guard(torch, "as_tensor", host_data)
    guard(torch.Tensor, "__getitem__", bool_index)
    real_read = host.host_read

    def read(t):
        inside.append(True)
        try:
            return real_read(t)
        finally:
            inside.pop()

    monkeypatch.setattr(host, "host_read", read)
    yield


@pytest.mark.parametrize("impl,loss_type,layout", CASES)
def test_no_read_outside_host_read(monkeypatch, impl, loss_type, layout):
    _, args, kw = _inputs(layout, DEVICE[impl])
    _step(impl, loss_type, args, kw)  # warm caches (metric-key probe, kernel compilation) outside the guard
    with _no_other_reads(monkeypatch):
        _step(impl, loss_type, args, kw)


def test_the_guard_sees_a_read(monkeypatch):
    """The guard is live: a ``.item()`` planted on the path raises."""
    from fusedpg.linear_pg import driver

    _, args, kw = _inputs("padded")
    _step("torch", "dapo", args, kw)
    # compiled as driver.py's code, as a read added there would be
    planted = eval(compile("lambda keep: real(keep)[:keep.sum().item()]", driver.__file__, "eval"),
                   {"real": driver.kept_first})
    monkeypatch.setattr(driver, "kept_first", planted)
    with _no_other_reads(monkeypatch), pytest.raises(AssertionError, match="outside host_read: item"):
        _step("torch", "dapo", args, kw)


def test_queued_checks_still_raise():
    """Validation moved into the one read still names the bad value."""
    _, args, kw = _inputs("padded")
    bad = args[2].clone()
    bad[0, 0] = V
    mask = args[4].clone()
    mask[0, 0] = 1.0
    with pytest.raises(ValueError, match=f"targets must lie in \\[0, {V}\\) on every token of the loss mask, got {V}"):
        fusedpg.fused_linear_pg_loss(args[0], args[1], bad, args[3], mask, loss_type="dapo", **kw)
    mask[0, 1] = 0.5
    with pytest.raises(ValueError, match="mask must be binary"):
        fusedpg.fused_linear_pg_loss(*args[:4], mask, loss_type="dapo", **kw)
    _, args, kw = _inputs("packed")
    for flags in (torch.zeros(2), torch.zeros(0)):  # packed: the count of sequences is on the device
        with pytest.raises(ValueError, match=r"truncated must hold one flag per sequence \(3,\)"):
            fusedpg.fused_linear_pg_loss(*args, loss_type="dapo", truncated=flags, **kw)
    kw["seq_ids"] = kw["seq_ids"].flip(0)
    with pytest.raises(ValueError, match="seq_ids must be non-decreasing"):
        fusedpg.fused_linear_pg_loss(*args, loss_type="dapo", **kw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device check of the one read needs CUDA")
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_cuda_sync_debug_mode(monkeypatch, loss_type, layout):
    """On CUDA, any synchronising operation besides the one read errors under ``set_sync_debug_mode("error")``."""
    _, args, kw = _inputs(layout, device="cuda")
    _step("triton", loss_type, args, kw)  # compile the kernels and fill the caches first
    torch.cuda.synchronize()
    calls = []
    real = host.host_read

    def read(t):
        calls.append(t.numel())
        torch.cuda.set_sync_debug_mode(0)
        try:
            return real(t)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(host, "host_read", read)
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step("triton", loss_type, args, kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(calls) == 1, calls
