"""linear_logprob_entropy against the float64 truth under the tolerance model (docs/design.md#tolerance-model, #test-strategy), both backends."""
from __future__ import annotations

import pytest
import torch

import fusedpg
from fusedpg.verification.cases_logprob import LinearCase, check_linear, make_linear_inputs
from fusedpg.linear.reference import linear_logprob_entropy_reference

from conftest import DTYPES, GRID, assert_all_ok


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(GRID.values()), ids=list(GRID))
def test_grid(case: LinearCase, dtype, backend):
    case = LinearCase(**{**case.__dict__, "dtype": dtype})
    results = check_linear(case, impl=backend.impl, device=backend.device)
    # every output and every requested gradient was compared
    names = {r.name for r in results}
    assert {"linear.logp", "linear.entropy"} <= names
    wanted_grads = [g for g in case.grads if g != "bias" or case.bias or case.shift or case.neg_inf_cols]
    assert {f"linear.d_{g}" for g in wanted_grads} <= names
    assert_all_ok(results, f"{backend.impl} {case}")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_output_shape_dtype_3d(dtype, backend):
    x = make_linear_inputs(LinearCase(n=12, batch=4, dtype=dtype), backend.device)
    logp, ent = fusedpg.linear_logprob_entropy(x["hidden"], x["weight"], x["targets"], bias=x["bias"],
                                               impl=backend.impl)
    assert logp.shape == ent.shape == x["targets"].shape == (4, 3)
    assert logp.dtype == ent.dtype == torch.float32
    assert logp.device.type == ent.device.type == torch.device(backend.device).type


def test_reference_impl_matches_truth():
    """impl='reference' is the eager definition; it must agree with the float64 truth too."""
    x = make_linear_inputs(LinearCase(n=9, v=33, temperature="per-token"))
    logp, ent = fusedpg.linear_logprob_entropy(x["hidden"], x["weight"], x["targets"], bias=x["bias"],
                                               temperature=x["temperature"], impl="reference")
    t_logp, t_ent = linear_logprob_entropy_reference(x["hidden"], x["weight"], x["targets"], x["bias"],
                                                     x["temperature"].double())
    assert logp.dtype == ent.dtype == torch.float32
    torch.testing.assert_close(logp, t_logp.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, t_ent.float(), rtol=1e-5, atol=1e-5)


def test_default_impl_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("FUSEDPG_IMPL", raising=False)
    from fusedpg.backend import resolve_impl

    assert resolve_impl(None, torch.device("cpu")) == "torch"
    monkeypatch.setenv("FUSEDPG_IMPL", "triton")  # CUDA tensors, or CPU ones under TRITON_INTERPRET=1 (this suite)
    assert resolve_impl(None, torch.device("cuda" if torch.cuda.is_available() else "cpu")) == "triton"


def test_nan_fill_fixture_is_active():
    from conftest import INT_SENTINEL

    assert torch.isnan(torch.empty(4)).all() and torch.isnan(torch.empty((2, 3), dtype=torch.bfloat16)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(3))).all()
    assert torch.isnan(torch.empty_strided((2, 2), (1, 2))).all()
    assert torch.isnan(torch.zeros(2).new_empty(3)).all()
    assert (torch.empty(3, dtype=torch.long) == INT_SENTINEL).all()
    assert torch.empty(2, dtype=torch.bool).all()


def test_nan_fill_catches_an_unwritten_library_output(monkeypatch, backend):
    """A plan that forgets to write one row of an output allocated with torch.empty fails the equivalence check."""
    from fusedpg.linear import op as function

    plan = function._plan(backend.impl)
    real = plan.forward

    def forgets_last_row(*args, **kwargs):
        logp, ent, m, log_s = real(*args, **kwargs)
        out = torch.empty_like(logp)
        out[:-1] = logp[:-1]
        return out, ent, m, log_s

    monkeypatch.setattr(plan, "forward", forgets_last_row)
    results = {r.name: r for r in check_linear(LinearCase(n=8, v=33, ignore_frac=0.0), impl=backend.impl,
                                               device=backend.device)}
    assert not results["linear.logp"].ok and results["linear.logp"].worst_index == (7,)
    assert results["linear.entropy"].ok


def test_unused_entropy_skips_the_entropy_gradient(monkeypatch):
    """Only logp reaches the loss: the backward gets d = None (no entropy passes over the chunk), as before the
    op stack (custom ops materialise zero gradients unless told not to)."""
    from fusedpg.linear import plan_torch

    seen = []
    real = plan_torch.softmax_grad_
    monkeypatch.setattr(plan_torch, "softmax_grad_", lambda *a: seen.append(a[6] is None) or real(*a))
    x = torch.randn(6, 8, requires_grad=True)
    lp, _ = fusedpg.linear_logprob_entropy(x, torch.randn(11, 8), torch.randint(0, 11, (6,)), impl="torch")
    lp.sum().backward()
    assert seen == [True]
