"""logprob_entropy (logits input, with and without the in-place backward) against the float64 truth."""
from __future__ import annotations

import pytest
import torch

import fusedpg
from fusedpg.verification.cases_logprob import LinearCase, check_logits

from conftest import DTYPES, GRID, assert_all_ok

# Cases whose only difference from "base" lies in the LM head (which inputs of the head need grad) say nothing new
# about the logits op.
_HEAD_ONLY = {"grad-hidden-only", "grad-weight-only"}
LOGITS_GRID = {k: v for k, v in GRID.items() if k not in _HEAD_ONLY}
# The logits op sees exactly the eager logits, so the very ill-conditioned peaked head at T = 1e-2 (logits ~ 1e3)
# can be held to the elementwise model here (on the fused head the matmul's summation order alone moves its entropy
# by several eager errors; see GRID in tests/conftest.py).
LOGITS_GRID["T1e-2-peaked"] = LinearCase(temperature=1e-2, peaked=True)
LOGITS_GRID["T1e-2-peaked-per-token"] = LinearCase(temperature="per-token", peaked=True, shift=-30.0)
# In-place mode needs contiguous logits and only changes the backward.
INPLACE_GRID = {k: v for k, v in LOGITS_GRID.items() if v.layout == "contiguous" and v.grads}


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(LOGITS_GRID.values()), ids=list(LOGITS_GRID))
def test_grid(case: LinearCase, dtype, backend):
    case = LinearCase(**{**case.__dict__, "dtype": dtype})
    results = check_logits(case, impl=backend.impl, device=backend.device)
    names = {r.name for r in results}
    assert {"logits.logp", "logits.entropy"} <= names and (not case.grads or "logits.d_logits" in names)
    assert_all_ok(results, f"{backend.impl} {case}")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(INPLACE_GRID.values()), ids=list(INPLACE_GRID))
def test_grid_inplace_backward(case: LinearCase, dtype, backend):
    case = LinearCase(**{**case.__dict__, "dtype": dtype})
    results = check_logits(case, impl=backend.impl, device=backend.device, inplace=True)
    assert "logits.d_logits" in {r.name for r in results}
    assert_all_ok(results, f"{backend.impl} inplace {case}")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_row_of_only_neg_inf(dtype, backend):
    """A row whose every logit is -inf: logp = -inf, entropy 0, zero (finite) gradient; other rows unaffected."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 37, generator=g).to(dtype).to(backend.device)
    logits[2] = float("-inf")
    logits[4, :30] = float("-inf")  # a row that is -inf except for the last tile's columns
    y = torch.tensor([0, 36, 5, 1, 33], device=backend.device)
    x = logits.clone().requires_grad_(True)
    logp, ent = fusedpg.logprob_entropy(x, y, impl=backend.impl)
    (logp.masked_fill(torch.isinf(logp), 0).sum() + ent.sum()).backward()
    assert logp[2].item() == float("-inf") and ent[2].item() == 0.0
    assert torch.all(x.grad[2] == 0)
    assert torch.isfinite(x.grad).all() and torch.isfinite(ent).all()
    keep = torch.tensor([0, 1, 3, 4])
    ref_logp = torch.log_softmax(logits.double()[keep.to(logits.device)], -1)
    ref_logp = ref_logp.gather(1, y[keep.to(y.device), None]).squeeze(1)
    atol = 1e-5 if dtype == torch.float32 else 2e-2  # logits of the row are the same rounded values for both
    torch.testing.assert_close(logp[keep].double().cpu(), ref_logp.cpu(), rtol=0, atol=atol)


def test_output_shape_dtype_3d(backend):
    """Outputs are fp32 with the leading shape for every input dtype and 3-D logits."""
    for dtype in DTYPES.values():
        logits = torch.randn(2, 3, 11, dtype=dtype, device=backend.device)
        y = torch.randint(0, 11, (2, 3), device=backend.device)
        logp, ent = fusedpg.logprob_entropy(logits, y, impl=backend.impl)
        assert logp.shape == ent.shape == (2, 3) and logp.dtype == ent.dtype == torch.float32
