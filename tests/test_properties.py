"""Property tests: hypothesis draws shapes, options and values; every output and gradient must match the float64
truth under the tolerance model (docs/design.md#tolerance-model). Derandomised, so a CI run is reproducible; the draw still covers
200 cases per run on the torch plan and 40 through the Triton interpreter (or the CUDA kernels)."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusedpg.verification.cases_logprob import LinearCase, check_linear, check_logits

from conftest import BACKENDS, assert_all_ok

_TORCH, _TRITON = BACKENDS

# Temperatures on a log grid 1e-2 .. 1e2 plus "per-token" tensors.
_TEMPERATURES = st.one_of(
    st.sampled_from([1.0, 1e-2, 1e2, "per-token", "tensor"]),
    st.floats(min_value=-2.0, max_value=2.0).map(lambda e: float(round(10.0 ** e, 6))),
)


@st.composite
def cases(draw, max_n=40, max_h=48, max_v=300):
    n = draw(st.integers(0, max_n))
    v = draw(st.integers(1, max_v))
    peaked = draw(st.booleans())
    temperature = draw(_TEMPERATURES)
    if peaked and isinstance(temperature, float) and temperature < 0.1:
        # A peaked head at T < 0.1 makes the fp32 entropy so ill-conditioned that the summation order of the
        # logits matmul alone (the plan's compacted-row GEMM vs eager's) exceeds the elementwise model on a few
        # percent of seeds, for an exact implementation too. Peaked T = 1e-2 is covered on the logits op, where
        # the logits are the eager ones (tests/test_logits.py); unpeaked T = 1e-2 is drawn here.
        temperature = 0.1
    return LinearCase(
        n=n,
        h=draw(st.integers(1, max_h)),
        v=v,
        dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
        bias=draw(st.booleans()),
        temperature=temperature,
        ignore_frac=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0])),
        peaked=peaked,
        shift=draw(st.sampled_from([0.0, 0.0, 0.0, 1e4, -1e4, -30.0])) if not peaked or temperature == 1.0 else 0.0,
        neg_inf_cols=draw(st.integers(0, max(0, v - 1) // 3)) if draw(st.booleans()) else 0,
        entropy_grad=draw(st.booleans()),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
    )


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), op=st.sampled_from(["linear", "logits", "logits-inplace"]))
def test_torch_plan_matches_truth(case, op):
    if op == "linear":
        results = check_linear(case, impl=_TORCH.impl, device=_TORCH.device)
    else:
        results = check_logits(case, impl=_TORCH.impl, device=_TORCH.device, inplace=op.endswith("inplace"))
    assert_all_ok(results, f"{op} {case}")


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(max_n=20, max_h=40, max_v=100), op=st.sampled_from(["linear", "logits", "logits-inplace"]))
def test_triton_matches_truth(case, op):
    if op == "linear":
        results = check_linear(case, impl=_TRITON.impl, device=_TRITON.device)
    else:
        results = check_logits(case, impl=_TRITON.impl, device=_TRITON.device, inplace=op.endswith("inplace"))
    assert_all_ok(results, f"{op} {case}")


def test_case_strategy_covers_the_grid():
    """The strategy reaches the awkward corners (guards against a strategy that silently draws only easy cases)."""
    seen = {"n0": False, "v1": False, "all-ignored": False, "neg-inf": False, "shift": False, "per-token": False,
            "bf16": False, "fp16": False, "T-small": False, "T-large": False, "peaked": False, "no-bias": False}

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(case=cases())
    def probe(case):
        seen["n0"] |= case.n == 0
        seen["v1"] |= case.v == 1
        seen["all-ignored"] |= case.ignore_frac == 1.0
        seen["neg-inf"] |= case.neg_inf_cols > 0
        seen["shift"] |= abs(case.shift) == 1e4
        seen["per-token"] |= case.temperature == "per-token"
        seen["bf16"] |= case.dtype == torch.bfloat16
        seen["fp16"] |= case.dtype == torch.float16
        seen["T-small"] |= isinstance(case.temperature, float) and case.temperature <= 0.02
        seen["T-large"] |= isinstance(case.temperature, float) and case.temperature >= 50
        seen["peaked"] |= case.peaked
        seen["no-bias"] |= not case.bias

    probe()
    assert all(seen.values()), [k for k, v in seen.items() if not v]
