"""Bad input raises ValueError / TypeError naming the argument, the expectation and the value given (fusedpg/checks.py);
valid edge inputs give correct, finite results."""
from __future__ import annotations

import pytest
import torch

import fusedpg
from fusedpg import checks
from fusedpg.verification.cases_logprob import LinearCase, check_linear, check_logits

from conftest import BACKENDS, assert_all_ok

N, H, V = 6, 8, 11


def _inputs(dtype=torch.float32, n=N, h=H, v=V, device="cpu"):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(dtype).to(device)
    weight = torch.randn(v, h, generator=g).to(dtype).to(device)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    return hidden, weight, targets


def _linear(hidden=None, weight=None, targets=None, **kw):
    h, w, y = _inputs()
    return fusedpg.linear_logprob_entropy(h if hidden is None else hidden, w if weight is None else weight,
                                          y if targets is None else targets, **kw)


def _logits(logits=None, targets=None, **kw):
    h, w, y = _inputs()
    return fusedpg.logprob_entropy(h @ w.T if logits is None else logits, y if targets is None else targets, **kw)


def _raises(exc, *names, value=None):
    """pytest.raises for ``exc`` whose message names every one of ``names`` (and the value given, if any)."""

    class _Ctx:
        def __enter__(self):
            self.cm = pytest.raises(exc)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *a):
            handled = self.cm.__exit__(*a)
            if not handled:  # another exception type: let it propagate as the failure
                return False
            msg = str(self.info.value)
            got = type(self.info.value).__name__
            assert type(self.info.value) is exc, f"expected exactly {exc.__name__}, got {got}"
            for name in names:
                assert name in msg, f"message does not name {name!r}: {msg}"
            if value is not None:
                assert str(value) in msg, f"message does not give the value {value!r}: {msg}"
            return handled

    return _Ctx()


# ---------------------------------------------------------------------------------------------------- shapes


def test_hidden_size_mismatch():
    h, w, y = _inputs()
    with _raises(ValueError, "weight", "hidden", value=(V, H + 1)):
        fusedpg.linear_logprob_entropy(h, torch.randn(V, H + 1), y)


def test_targets_leading_shape_mismatch_linear():
    h, w, y = _inputs()
    with _raises(ValueError, "targets", "hidden", value=(N - 1,)):
        fusedpg.linear_logprob_entropy(h, w, y[:-1])


def test_targets_leading_shape_mismatch_3d_linear():
    h, w, y = _inputs(n=6)
    with _raises(ValueError, "targets", value=(3, 2)):
        fusedpg.linear_logprob_entropy(h.reshape(2, 3, H), w, y.reshape(3, 2))


def test_targets_leading_shape_mismatch_logits():
    h, w, y = _inputs()
    with _raises(ValueError, "targets", "logits", value=(N - 1,)):  # ([N, 1] is K = 1 target per row, valid)
        fusedpg.logprob_entropy(h @ w.T, y[:-1])


@pytest.mark.parametrize("shape", [(H,), (1, 2, 3, H)])
def test_hidden_rank(shape):
    with _raises(ValueError, "hidden", value=shape):
        fusedpg.linear_logprob_entropy(torch.randn(shape), torch.randn(V, H), torch.zeros(shape[:-1], dtype=torch.long))


def test_weight_rank():
    h, w, y = _inputs()
    with _raises(ValueError, "weight", value=(1, V, H)):
        fusedpg.linear_logprob_entropy(h, w[None], y)


def test_logits_rank():
    with _raises(ValueError, "logits", value=(V,)):
        fusedpg.logprob_entropy(torch.randn(V), torch.tensor(0))


# ---------------------------------------------------------------------------------------------------- dtypes / devices


def test_hidden_weight_dtype_mismatch():
    h, w, y = _inputs()
    with _raises(TypeError, "weight", "hidden", value=torch.bfloat16):
        fusedpg.linear_logprob_entropy(h, w.bfloat16(), y)


def test_bias_dtype_mismatch():
    h, w, y = _inputs()
    with _raises(TypeError, "bias", value=torch.float16):
        fusedpg.linear_logprob_entropy(h, w, y, bias=torch.zeros(V, dtype=torch.float16))


def test_weight_on_other_device():
    h, w, y = _inputs()
    with _raises(ValueError, "weight", "hidden", value="meta"):
        fusedpg.linear_logprob_entropy(h, w.to("meta"), y)


def test_targets_on_other_device():
    h, w, y = _inputs()
    with _raises(ValueError, "targets", value="meta"):
        fusedpg.linear_logprob_entropy(h, w, y.to("meta"))
    with _raises(ValueError, "targets", "logits", value="meta"):
        fusedpg.logprob_entropy(h @ w.T, y.to("meta"))


def test_bias_on_other_device():
    h, w, y = _inputs()
    with _raises(ValueError, "bias", value="meta"):
        fusedpg.linear_logprob_entropy(h, w, y, bias=torch.zeros(V, device="meta"))


def test_temperature_on_other_device():
    h, w, y = _inputs()
    with _raises(ValueError, "temperature", value="meta"):
        fusedpg.linear_logprob_entropy(h, w, y, temperature=torch.ones(N, device="meta"))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_hidden_not_floating(dtype):
    h, w, y = _inputs()
    with _raises(TypeError, "hidden", value=dtype):
        fusedpg.linear_logprob_entropy(h.to(dtype), w, y)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_weight_not_floating(dtype):
    h, w, y = _inputs()
    with _raises(TypeError, "weight", value=dtype):
        fusedpg.linear_logprob_entropy(h, w.to(dtype), y)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_logits_not_floating(dtype):
    h, w, y = _inputs()
    with _raises(TypeError, "logits", value=dtype):
        fusedpg.logprob_entropy((h @ w.T).to(dtype), y)


def test_bias_not_floating():
    h, w, y = _inputs()
    with _raises(TypeError, "bias", value=torch.int64):
        fusedpg.linear_logprob_entropy(h, w, y, bias=torch.zeros(V, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.complex64])
def test_targets_not_integer(dtype):
    h, w, y = _inputs()
    with _raises(TypeError, "targets", value=dtype):
        fusedpg.linear_logprob_entropy(h, w, y.to(dtype))
    with _raises(TypeError, "targets", value=dtype):
        fusedpg.logprob_entropy(h @ w.T, y.to(dtype))


def test_not_a_tensor():
    h, w, y = _inputs()
    with _raises(TypeError, "hidden", value="list"):
        fusedpg.linear_logprob_entropy(h.tolist(), w, y)
    with _raises(TypeError, "logits", value="list"):
        fusedpg.logprob_entropy((h @ w.T).tolist(), y)


# ---------------------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize("bad", [V, V + 100, -1, -99])
def test_targets_out_of_range(bad):
    h, w, y = _inputs()
    y = y.clone()
    y[3] = bad
    with _raises(ValueError, "targets", f"[0, {V})", value=bad):
        fusedpg.linear_logprob_entropy(h, w, y)
    with _raises(ValueError, "targets", value=bad):
        fusedpg.logprob_entropy(h @ w.T, y)


def test_custom_ignore_index_is_not_out_of_range():
    h, w, y = _inputs()
    y = y.clone()
    y[1] = -1
    logp, ent = fusedpg.linear_logprob_entropy(h, w, y, ignore_index=-1)
    assert logp[1].item() == 0.0 and ent[1].item() == 0.0
    with _raises(ValueError, "targets", value=-100):  # -100 is only special when it is the ignore_index
        y[2] = -100
        fusedpg.linear_logprob_entropy(h, w, y, ignore_index=-1)


def test_check_targets_false_skips_the_check(monkeypatch):
    calls = []
    real = checks.targets_in_range
    monkeypatch.setattr(checks, "targets_in_range", lambda *a: calls.append(a) or real(*a))
    h, w, y = _inputs()
    ref = fusedpg.linear_logprob_entropy(h, w, y)
    assert len(calls) == 1
    got = fusedpg.linear_logprob_entropy(h, w, y, check_targets=False)
    fusedpg.logprob_entropy(h @ w.T, y, check_targets=False)
    assert len(calls) == 1, "check_targets=False must skip the range check"
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    # the check really is what raises on bad targets: without it an out-of-range target is not reported by us
    y_bad = y.clone()
    y_bad[0] = V
    with pytest.raises(ValueError, match="targets"):
        fusedpg.linear_logprob_entropy(h, w, y_bad)
    assert len(calls) == 2


def test_env_switches_target_check_off(monkeypatch):
    calls = []
    real = checks.targets_in_range
    monkeypatch.setattr(checks, "targets_in_range", lambda *a: calls.append(a) or real(*a))
    h, w, y = _inputs()
    monkeypatch.setenv("FUSEDPG_CHECK_TARGETS", "0")
    fusedpg.linear_logprob_entropy(h, w, y)
    fusedpg.logprob_entropy(h @ w.T, y)
    assert calls == []
    fusedpg.linear_logprob_entropy(h, w, y, check_targets=True)  # an explicit argument wins over the environment
    assert len(calls) == 1
    monkeypatch.setenv("FUSEDPG_CHECK_TARGETS", "1")
    fusedpg.logprob_entropy(h @ w.T, y)
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------------- temperature


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("inf"), float("-inf"), float("nan")])
def test_temperature_not_positive_finite(bad):
    with _raises(ValueError, "temperature", value=float(bad)):
        _linear(temperature=bad)
    with _raises(ValueError, "temperature", value=float(bad)):
        _logits(temperature=bad)


@pytest.mark.parametrize("bad", [0.0, -2.0, float("inf"), float("nan")])
def test_temperature_tensor_with_bad_entry(bad):
    t = torch.ones(N)
    t[4] = bad
    with _raises(ValueError, "temperature", value=bad):
        _linear(temperature=t)
    with _raises(ValueError, "temperature", value=bad):
        _logits(temperature=t)


def test_temperature_tensor_with_zero_on_an_ignored_row_is_still_rejected():
    h, w, y = _inputs()
    y = y.clone()
    y[0] = -100
    t = torch.ones(N)
    t[0] = 0.0
    with _raises(ValueError, "temperature", value=0.0):
        fusedpg.linear_logprob_entropy(h, w, y, temperature=t)


def test_temperature_tensor_wrong_shape():
    with _raises(ValueError, "temperature", value=(N + 1,)):
        _linear(temperature=torch.ones(N + 1))
    with _raises(ValueError, "temperature", value=(2, 3)):
        _logits(temperature=torch.ones(2, 3))  # N = 6 elements, but not the leading shape [6]


@pytest.mark.parametrize("bad", ["1.0", True, None])
def test_temperature_wrong_type(bad):
    with _raises(TypeError, "temperature", value=type(bad).__name__):
        _linear(temperature=bad)


def test_temperature_integer_tensor():
    with _raises(TypeError, "temperature", value=torch.int64):
        _linear(temperature=torch.ones(N, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------- vocabulary / bias


def test_empty_vocabulary():
    h, w, y = _inputs()
    with _raises(ValueError, "weight", "V >= 1", value=(0, H)):
        fusedpg.linear_logprob_entropy(h, torch.zeros(0, H), torch.zeros(N, dtype=torch.long), check_targets=False)
    with _raises(ValueError, "logits", "V >= 1", value=(N, 0)):
        fusedpg.logprob_entropy(torch.zeros(N, 0), torch.zeros(N, dtype=torch.long), check_targets=False)


@pytest.mark.parametrize("shape", [(V + 1,), (1, V), (V - 1,), ()])
def test_bias_wrong_shape(shape):
    with _raises(ValueError, "bias", f"({V},)", value=shape):
        _linear(bias=torch.zeros(shape))


# ---------------------------------------------------------------------------------------------------- impl


@pytest.mark.parametrize("impl", ["cuda", "Torch", "fast", ""])
def test_unknown_impl(impl):
    with _raises(ValueError, "impl", value=repr(impl)):
        _linear(impl=impl)
    with _raises(ValueError, "impl", value=repr(impl)):
        _logits(impl=impl)


def test_unknown_impl_from_environment(monkeypatch):
    monkeypatch.setenv("FUSEDPG_IMPL", "bogus")
    with _raises(ValueError, "FUSEDPG_IMPL", value="'bogus'"):
        _linear()


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with _raises(ValueError, "triton", "TRITON_INTERPRET", value="cpu"):
        _linear(impl="triton")


def test_triton_rejects_fp64():
    """fp64 runs on the torch plan only (for gradcheck); the Triton path says so."""
    backend = BACKENDS[1]
    h, w, y = _inputs(torch.float64, device=backend.device)
    with _raises(TypeError, "hidden", "triton", value=torch.float64):
        fusedpg.linear_logprob_entropy(h, w, y, impl="triton")
    with _raises(TypeError, "logits", "triton", value=torch.float64):
        fusedpg.logprob_entropy(h @ w.T, y, impl="triton")


def test_inplace_backward_needs_contiguous_logits():
    h, w, y = _inputs()
    logits = (w @ h.T).T  # [N, V] with transposed memory
    with _raises(ValueError, "logits", "contiguous"):
        fusedpg.logprob_entropy(logits, y, inplace_backward=True)


# ---------------------------------------------------------------------------------------------------- valid edge inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_batch_with_backward(backend, dtype):
    """N = 0 (2-D and 3-D): empty fp32 outputs and zero-filled gradients of the right shapes, no launch errors."""
    for lead in [(0,), (2, 0), (0, 5)]:
        h = torch.randn(*lead, H, dtype=dtype, device=backend.device, requires_grad=True)
        w = torch.randn(V, H, dtype=dtype, device=backend.device, requires_grad=True)
        b = torch.randn(V, dtype=dtype, device=backend.device, requires_grad=True)
        y = torch.zeros(lead, dtype=torch.long, device=backend.device)
        logp, ent = fusedpg.linear_logprob_entropy(h, w, y, bias=b, temperature=0.5, impl=backend.impl)
        assert logp.shape == ent.shape == lead and logp.dtype == torch.float32
        (logp.sum() + ent.sum()).backward()
        for p in (h, w, b):
            assert p.grad is not None and p.grad.shape == p.shape and torch.all(p.grad == 0)
        z = torch.randn(*lead, V, dtype=dtype, device=backend.device, requires_grad=True)
        for inplace in (False, True):
            logp, ent = fusedpg.logprob_entropy(z, y, impl=backend.impl, inplace_backward=inplace)
            assert logp.shape == ent.shape == lead
            (logp.sum() + ent.sum()).backward()
            assert z.grad.shape == z.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_row_ignored(backend, dtype):
    """All rows ignored: outputs exactly 0, gradients exactly 0 (not NaN from an unwritten buffer)."""
    h, w, _ = _inputs(dtype, device=backend.device)
    y = torch.full((N,), -100, device=backend.device)
    h.requires_grad_(True)
    w.requires_grad_(True)
    b = torch.randn(V, dtype=dtype, device=backend.device, requires_grad=True)
    t = torch.full((N,), 0.7, device=backend.device)
    logp, ent = fusedpg.linear_logprob_entropy(h, w, y, bias=b, temperature=t, impl=backend.impl)
    assert torch.all(logp == 0) and torch.all(ent == 0)
    (logp.sum() * 3 + ent.sum()).backward()
    for p in (h, w, b):
        assert torch.all(p.grad == 0), p.grad
    z = (h.detach() @ w.detach().T).requires_grad_(True)
    for inplace in (False, True):
        z.grad = None
        logp, ent = fusedpg.logprob_entropy(z.clone() if inplace else z, y, impl=backend.impl, inplace_backward=inplace)
        assert torch.all(logp == 0) and torch.all(ent == 0)
        (logp.sum() + ent.sum()).backward()
        assert torch.all(z.grad == 0)


@pytest.mark.parametrize("kw", [
    dict(neg_inf_cols=20, peaked=True),
    dict(shift=1e4),
    dict(shift=-1e4),
    dict(temperature=1e-2),
    dict(temperature=1e2),
    dict(temperature="per-token", shift=-1e4),
], ids=["neg-inf-cols", "logits+1e4", "logits-1e4", "T1e-2", "T1e2", "T-per-token-logits-1e4"])
def test_valid_edge_inputs_are_correct(backend, kw):
    """Valid but extreme inputs: finite outputs and gradients that match the float64 truth."""
    case = LinearCase(n=10, v=40, **kw)
    for results in (check_linear(case, impl=backend.impl, device=backend.device),
                    check_logits(case, impl=backend.impl, device=backend.device),
                    check_logits(case, impl=backend.impl, device=backend.device, inplace=True)):
        assert_all_ok(results, f"{backend.impl} {kw}")  # a NaN or inf where truth is finite fails here


@pytest.mark.parametrize("value", [0, -5])
def test_chunk_bytes_must_be_positive_on_every_entry_point(value):
    h, w, y = _inputs()
    calls = {
        "linear_logprob_entropy": lambda: _linear(chunk_bytes=value),
        "logprob_entropy": lambda: _logits(chunk_bytes=value),
        "fused_linear_pg_loss": lambda: fusedpg.fused_linear_pg_loss(
            h, w, y, torch.ones(N), torch.ones(N), loss_type="grpo", chunk_bytes=value),
    }
    for name, call in calls.items():
        with _raises(ValueError, "chunk_bytes", value=value):
            call()
