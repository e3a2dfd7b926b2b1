"""Shared fixtures of the fusedpg test suite.

* Without CUDA the Triton kernels run in the CPU interpreter: ``TRITON_INTERPRET=1`` is set here, at import time,
  before any test module imports a kernel (``triton.jit`` reads the variable when it decorates a function).
* ``backend`` parametrises a test over the implementations: ``torch`` (the chunked CPU plan) and ``triton`` (the
  interpreter on CPU, the real kernels on CUDA).
* ``nan_fill_empty`` (autouse) makes every ``torch.empty``-style allocation start as NaN (integers: a sentinel), so a
  kernel or plan that leaves part of an output unwritten fails loudly instead of passing on recycled memory.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

#: Integer allocations from torch.empty start with this value (or the dtype's max where it does not fit).
INT_SENTINEL = -7777


def pytest_configure(config):
    # The interpreter evaluates masked-off lanes too (rows past N hold finite garbage such as exp2(1e4) = inf); numpy
    # warns about them although they are never stored. Real results are checked by the tests themselves.
    config.addinivalue_line("filterwarnings", "ignore::RuntimeWarning:triton.runtime.interpreter")


class Backend(NamedTuple):
    impl: str
    device: str

    @property
    def interpreted(self) -> bool:
        return self.impl == "triton" and self.device == "cpu"


BACKENDS = [Backend("torch", "cpu"), Backend("triton", "cuda" if HAS_CUDA else "cpu")]


@pytest.fixture(params=BACKENDS, ids=[b.impl for b in BACKENDS])
def backend(request) -> Backend:
    return request.param


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a fresh allocation with NaN (floating / complex), a sentinel (integers) or True (bool)."""
    if t.numel() == 0 or t.device.type == "meta":
        return t
    with torch.no_grad():
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype == torch.bool:
            t.fill_(True)
        else:
            info = torch.iinfo(t.dtype)
            t.fill_(INT_SENTINEL if info.min <= INT_SENTINEL <= info.max else info.max)
    return t


@pytest.fixture(autouse=True)
def nan_fill_empty(monkeypatch):
    """Poison torch.empty, torch.empty_like, torch.empty_strided and Tensor.new_empty for the test's duration."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    real_empty_strided, real_new_empty = torch.empty_strided, torch.Tensor.new_empty

    def empty(*args, **kwargs):
        return poison_(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return poison_(real_empty_like(*args, **kwargs))

    def empty_strided(*args, **kwargs):
        return poison_(real_empty_strided(*args, **kwargs))

    def new_empty(self, *args, **kwargs):
        return poison_(real_new_empty(self, *args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    monkeypatch.setattr(torch, "empty_strided", empty_strided)
    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
    yield


def assert_all_ok(results, context: str = "") -> None:
    """Fail with every failing comparison's report (name, max abs err, eager err, rel RMS, worst index)."""
    bad = [r.report() for r in results if not r.ok]
    if bad:
        raise AssertionError((context + "\n" if context else "") + "\n".join(bad))


# --------------------------------------------------------------------------------------------------------------
# The awkward grid of docs/design.md#test-strategy. Interpreter shapes stay tiny; the tile sizes there are BT=16, BV=32, BK=16 for
# the linear kernels and BT=4, BV=32 for the logits kernels, so V = 1, 7, 50, 257 cover a one-column tile, a
# partial first tile, a two-tile tail and a one-column last tile; 1187 is a prime stand-in for 151936-like sizes.
# --------------------------------------------------------------------------------------------------------------
from fusedpg.verification.cases_logprob import LinearCase  # noqa: E402

GRID = {
    "base": LinearCase(),
    "V1": LinearCase(v=1),
    "V7": LinearCase(v=7, ignore_frac=0.0),
    "V257-peaked": LinearCase(n=9, v=257, peaked=True),
    "V1187-odd-peaked": LinearCase(n=5, h=40, v=1187, peaked=True, ignore_frac=0.0),
    "N0": LinearCase(n=0),
    "N1": LinearCase(n=1, ignore_frac=0.0),
    "N63": LinearCase(n=63, v=33),
    "H80": LinearCase(h=80, v=40),
    "no-bias": LinearCase(bias=False),
    "half-ignored": LinearCase(ignore_frac=0.5, seed=1),
    "all-ignored": LinearCase(ignore_frac=1.0),
    "T-per-token": LinearCase(temperature="per-token"),
    "T-tensor": LinearCase(temperature="tensor"),
    # Unpeaked on purpose: with a peaked head at T = 1e-2 (logits ~ 1e3) the fp32 entropy is so ill-conditioned that
    # the matmul's summation order alone (any order other than eager's own GEMM, e.g. compacted rows or K tiles)
    # exceeds the elementwise model on ~5% of seeds, for an otherwise exact implementation (measured by emulating
    # the K-split in torch). The logits op, which sees the eager logits, carries the peaked T = 1e-2 cases.
    "T1e-2": LinearCase(temperature=1e-2),
    "T1e2": LinearCase(temperature=1e2, peaked=True),
    "logits+1e4": LinearCase(shift=1e4),
    "logits-1e4-peaked": LinearCase(shift=-1e4, peaked=True, temperature="per-token"),
    "neg-inf-cols": LinearCase(neg_inf_cols=9, peaked=True),
    "peaked": LinearCase(peaked=True, bias=False, seed=2),
    "3d": LinearCase(n=12, batch=3, temperature="per-token"),
    "transposed": LinearCase(layout="transposed"),
    "strided-3d": LinearCase(n=12, batch=2, layout="strided", temperature="per-token"),
    "grad-hidden-only": LinearCase(grads=("hidden",)),
    "grad-weight-only": LinearCase(grads=("weight",)),
    "no-grad": LinearCase(grads=()),
    "upstream-logp-only": LinearCase(entropy_grad=False),
    "upstream-entropy-only": LinearCase(logp_grad=False),
    "no-entropy": LinearCase(compute_entropy=False),
    "no-entropy-entropy-upstream-only": LinearCase(compute_entropy=False, logp_grad=False),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
