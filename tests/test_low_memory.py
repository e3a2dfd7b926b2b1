"""memory="low": the head's backward blocked over the vocabulary. Every output and gradient against the float64
reference under the tolerance model (fp32 and bf16, both backends' forwards, small vocabulary blocks), the fused
loss on both plan classes, the combinations it refuses, and less peak memory than the default backward on CPU."""
from __future__ import annotations

import pytest
import torch

import fusedpg
from fusedpg.verification.cases_logprob import LinearCase, check_linear

from conftest import assert_all_ok


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [LinearCase(n=13, h=24, v=50), LinearCase(n=9, h=32, v=700, peaked=True,
                                                                            temperature="per-token"),
                                  LinearCase(n=7, h=40, v=600, neg_inf_cols=3, bias=True, shift=-30.0)],
                         ids=["plain", "peaked-per-token", "neg-inf-cols"])
# chunk_bytes of 256-column blocks (the fewest) tiled by 1 row, by 3 rows (a short last tile), or in one tile
@pytest.mark.parametrize("chunk_bytes", [1 << 10, 6 << 10, 32 << 10], ids=["rows-1", "rows-3", "rows-all"])
def test_low_memory_backward_under_the_tolerance_model(backend, dtype, case, chunk_bytes):
    if backend.interpreted and dtype != torch.float32:
        pytest.skip("interpreter: fp32 is enough; memory=\"low\" runs torch GEMMs whatever the impl")

    def low(*args, **kwargs):
        return fusedpg.linear_logprob_entropy(*args, memory="low", chunk_bytes=chunk_bytes, **kwargs)

    assert_all_ok(check_linear(LinearCase(**{**case.__dict__, "dtype": dtype}), impl=backend.impl,
                               device=backend.device, op=low))


def test_weight_gradient_is_written_in_the_weight_dtype():
    h = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.bfloat16, requires_grad=True)
    logp, _ = fusedpg.linear_logprob_entropy(h, w, torch.randint(0, 40, (8,)), memory="low", impl="torch")
    logp.sum().backward()
    assert w.grad.dtype == torch.bfloat16 and h.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("loss_type", ["grpo", "gspo", "clip_cov"])
def test_fused_loss_low_memory_equals_the_default(loss_type):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 6, 16, generator=g), torch.randn(300, 16, generator=g) / 4
    y, adv = torch.randint(0, 300, (2, 6), generator=g), torch.randn(2, generator=g)
    out = {}
    for memory in ("default", "low"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, _ = fusedpg.fused_linear_pg_loss(hh, ww, y, adv, torch.ones(2, 6), old_logp=torch.full((2, 6), -5.0),
                                               loss_type=loss_type, seed=0, memory=memory, impl="torch",
                                               chunk_bytes=12 * 4 * 64)
        loss.backward()
        out[memory] = (loss.detach(), hh.grad, ww.grad)
    for a, b in zip(out["default"], out["low"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_refused_combinations_name_the_option():
    h, w, y = torch.randn(4, 8), torch.randn(20, 8), torch.randint(0, 20, (4,))
    with pytest.raises(ValueError, match="memory must be 'default' or 'low', got 'tiny'"):
        fusedpg.linear_logprob_entropy(h, w, y, memory="tiny")
    with pytest.raises(ValueError, match="memory='low' does not combine with deterministic=True"):
        fusedpg.linear_logprob_entropy(h, w, y, memory="low", deterministic=True)
    with pytest.raises(ValueError, match="memory='low' does not combine with top_k"):
        fusedpg.linear_logprob_entropy(h, w, y, memory="low", top_k=5)


def test_low_memory_backward_peaks_lower_on_cpu():
    """Peak resident memory of the backward alone (the bench's probe): no [V, H] fp32 accumulator."""
    measure = pytest.importorskip("fusedpg.bench.measure")
    if not measure.clear_refs_writable():
        pytest.skip("needs /proc/self/clear_refs")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(256, 256, generator=g, dtype=torch.bfloat16)
    w = torch.randn(16384, 256, generator=g, dtype=torch.bfloat16)
    y = torch.randint(0, 16384, (256,), generator=g)
    peaks = {}
    for memory in ("default", "low"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        state = {}

        def setup():
            state["out"] = fusedpg.linear_logprob_entropy(hh, ww, y, memory=memory, impl="torch", chunk_bytes=1 << 20)

        def call():
            logp, ent = state.pop("out")
            (logp.sum() + ent.sum()).backward()

        def reset():
            hh.grad = ww.grad = None

        peaks[memory] = min(measure.cpu_sample(call, reset, setup)[1] for _ in range(2))
    # default: an fp32 copy of the head and a [V, H] fp32 accumulator (16 MiB each) besides the bf16 d_weight
    # (8 MiB): about 45 MiB; low: d_weight and four 1 MiB tile buffers, about 15 MiB
    assert peaks["low"] < 0.5 * peaks["default"], peaks
