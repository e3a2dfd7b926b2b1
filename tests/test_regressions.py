"""Regression tests for the known peer bugs of docs/peers.md#known-bugs-turned-into-tests that apply to the log-prob + entropy primitives.

Each test names its row of the table (#1 ... #23).
"""
from __future__ import annotations

import inspect
import math
import threading

import pytest
import torch

import fusedpg
from fusedpg.verification.cases_logprob import LinearCase, check_linear, check_logits, make_linear_inputs
from fusedpg.kernel_config import tile_config
from fusedpg.options import LogProbOptions
from fusedpg.linear.reference import linear_logprob_entropy_reference

from conftest import BACKENDS, DTYPES, HAS_CUDA, assert_all_ok


def _fwd_bwd(backend, x, *, op="linear", temperature=None, inplace=False, grad_ent=True, **truncation):
    """Outputs and gradients of one call on fresh leaves built from the inputs dict ``x`` (make_linear_inputs)."""
    temp = x["temperature"] if temperature is None else temperature
    y = x["targets"]
    if op == "linear":
        inputs = [x["hidden"], x["weight"]] + ([x["bias"]] if x["bias"] is not None else [])
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        bias = leaves[2] if len(leaves) > 2 else None
        logp, ent = fusedpg.linear_logprob_entropy(leaves[0], leaves[1], y, bias=bias, temperature=temp,
                                                   impl=backend.impl, **truncation)
    else:
        logits = x["hidden"].double() @ x["weight"].double().T
        if x["bias"] is not None:
            logits = logits + x["bias"].double()
        logits = logits.to(x["hidden"].dtype)
        leaves = [logits.requires_grad_(True)]
        src = logits.clone() if inplace else logits
        logp, ent = fusedpg.logprob_entropy(src, y, temperature=temp, impl=backend.impl, inplace_backward=inplace)
    gl = torch.linspace(-1, 1, logp.numel(), dtype=torch.float32, device=logp.device).reshape(logp.shape)
    loss = (logp * gl).sum() + ((ent * gl.flip(-1)).sum() if grad_ent else 0)
    grads = torch.autograd.grad(loss, leaves)
    return [logp.detach(), ent.detach()] + [g.detach() for g in grads]


# ---------------------------------------------------------------------------------------------------------- #1


def _tile_vocabs(dtype):
    bv = tile_config(dtype).BV  # the linear kernel's vocabulary tile on this backend; the logits kernel uses 32 in
    return sorted({bv - 1, bv, bv + 1, 2 * bv + 1, 31, 33})  # the interpreter and a power of two >= V on CUDA


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shift", [0.0, -30.0], ids=["centred", "all-negative"])
def test_01_vocab_padding_is_masked(backend, dtype, shift):
    """#1 verl#2656: padded vocabulary columns loaded as 0 added phantom exp(0 - m) terms (positive log-probs).
    V = BLOCK +- 1 with peaked logits; with every real logit near -30 a phantom 0-logit column would dominate."""
    for v in _tile_vocabs(dtype):
        case = LinearCase(n=7, h=16, v=v, dtype=dtype, peaked=True, shift=shift, ignore_frac=0.0, seed=v)
        for op in ("linear", "logits"):
            x = make_linear_inputs(case, backend.device)
            logp, ent = _fwd_bwd(backend, x, op=op)[:2]
            assert torch.all(logp <= 0), (op, v, logp)
            assert torch.all(ent >= 0) and torch.all(ent <= math.log(v) * (1 + 1e-6) + 1e-6), (op, v, ent)
        assert_all_ok(check_linear(case, impl=backend.impl, device=backend.device), f"linear V={v}")
        assert_all_ok(check_logits(case, impl=backend.impl, device=backend.device), f"logits V={v}")


# ---------------------------------------------------------------------------------------------------------- #2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_02_targets_at_first_and_last_column(backend, dtype):
    """#2 CCE#59: a target in the last, padded tile hit a padded column. Targets 0 and V - 1 (alone in its tile),
    plus ignored rows, give finite, reference-equal results."""
    bv = tile_config(dtype).BV
    for v in sorted({bv + 1, 33, 2}):
        case = LinearCase(n=10, h=16, v=v, dtype=dtype, target_mode="edges", ignore_frac=0.2, peaked=True)
        x = make_linear_inputs(case)
        assert set(x["targets"].tolist()) == {0, v - 1, -100}
        for results in (check_linear(case, impl=backend.impl, device=backend.device),
                        check_logits(case, impl=backend.impl, device=backend.device),
                        check_logits(case, impl=backend.impl, device=backend.device, inplace=True)):
            assert_all_ok(results, f"V={v}")


# ---------------------------------------------------------------------------------------------------------- #3


@pytest.mark.parametrize("op", ["linear", "logits"])
def test_03_shift_invariance_at_minus_1e4(backend, op):
    """#3 verl#7439: the running max started at 0, so all-negative logits underflowed to -inf log-probs. Adding -1e4
    to every logit (through the bias) leaves outputs finite and unchanged up to the rounding of the shifted logits
    (fp32 ulp at 1e4 is 9.8e-4: each logit moves by at most half of it)."""
    case = LinearCase(n=9, h=16, v=45, bias=True, peaked=True, ignore_frac=0.0)
    x = make_linear_inputs(case, backend.device)
    base = _fwd_bwd(backend, x, op=op)
    moved = _fwd_bwd(backend, dict(x, bias=x["bias"] - 1e4), op=op)  # the logits op gets u + b - 1e4 as logits
    for name, a, b in zip(["logp", "entropy"], base[:2], moved[:2]):
        assert torch.isfinite(b).all(), (name, b)
        torch.testing.assert_close(b, a, rtol=0, atol=2e-3, msg=lambda m: f"{name} not shift-invariant: {m}")
    # gradients w.r.t. the hidden states (or logits) are shift-invariant too
    assert torch.isfinite(moved[2]).all()
    torch.testing.assert_close(moved[2], base[2], rtol=0, atol=2e-3 * float(base[2].abs().max()) + 1e-6)
    # and the shifted run itself is held to the float64 truth of its own inputs
    shifted_case = LinearCase(**{**case.__dict__, "shift": -1e4})
    check = check_linear if op == "linear" else check_logits
    assert_all_ok(check(shifted_case, impl=backend.impl, device=backend.device))


# ---------------------------------------------------------------------------------------------------------- #4


def _rel_rms(a: torch.Tensor, truth: torch.Tensor) -> float:
    err = a.double().cpu() - truth
    return (err.pow(2).mean().sqrt() / truth.pow(2).mean().sqrt()).item()


def _dweight_error(impl, device, n, v, h, chunks, dtype):
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    c = torch.randn(n, generator=g, dtype=torch.float64)
    d = torch.randn(n, generator=g, dtype=torch.float64)
    rows = n // chunks
    if impl == "torch":
        budget = rows * v * 4  # one fp32 [rows, V] buffer per chunk
    else:
        assert rows % tile_config(dtype).BT == 0
        budget = rows * v * dtype.itemsize  # one input-dtype [rows, V] buffer
    w = weight.clone().to(device).requires_grad_(True)
    logp, ent = fusedpg.linear_logprob_entropy(hidden.to(device), w, y.to(device), impl=impl, chunk_bytes=budget)
    ((logp.double().cpu() * c).sum() + (ent.double().cpu() * d).sum()).backward()
    w64 = weight.detach().double().requires_grad_(True)
    logp, ent = linear_logprob_entropy_reference(hidden, w64, y)
    ((logp * c).sum() + (ent * d).sum()).backward()
    return _rel_rms(w.grad, w64.grad)


def test_04_dweight_error_does_not_grow_with_chunk_count(backend):
    """#4 Liger#512: per-chunk dW summed in bf16 diverged. Error of dW at 4 and at 64 row chunks (bf16 inputs)."""
    bt = tile_config(torch.bfloat16).BT if backend.impl == "triton" else 1
    n = 64 * bt if backend.impl == "triton" else 512  # 64 chunks of at least one row tile
    v, h = 32, 16
    e4 = _dweight_error(backend.impl, backend.device, n, v, h, 4, torch.bfloat16)
    e64 = _dweight_error(backend.impl, backend.device, n, v, h, 64, torch.bfloat16)
    assert e64 <= 1.25 * e4, f"dW relative RMS error grew from {e4:.3e} (4 chunks) to {e64:.3e} (64 chunks)"
    assert e4 < 1e-2  # sane to begin with (bf16 output rounding is ~2e-3)


def test_04_metric_catches_bf16_accumulation():
    """The #4 metric discriminates: summing the same per-chunk products in a bf16 accumulator grows the error
    about 3x from 4 to 64 chunks, well past the 1.25x allowed above."""
    g = torch.Generator().manual_seed(0)
    n, v, h = 512, 32, 16
    grad_u = torch.randn(n, v, generator=g) / v
    hid = torch.randn(n, h, generator=g).bfloat16().float()
    truth = grad_u.double().T @ hid.double()
    errs = []
    for k in (4, 64):
        acc = torch.zeros(v, h, dtype=torch.bfloat16)
        for lo in range(0, n, n // k):
            acc = (acc.float() + grad_u[lo:lo + n // k].T @ hid[lo:lo + n // k]).bfloat16()
        errs.append(_rel_rms(acc, truth))
    assert errs[1] > 1.25 * errs[0]


# ---------------------------------------------------------------------------------------------------------- #6


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("op", ["linear", "logits"])
def test_06_outputs_are_fp32(backend, dtype, op):
    """#6 verl#5662: a fused path returned bf16 log-probs, quantising exp(logp - old_logp). Outputs are fp32 for every
    input dtype, and recomputing on the same inputs gives ratio exactly 1."""
    x = make_linear_inputs(LinearCase(n=8, v=40, dtype=dtype), backend.device)
    a = _fwd_bwd(backend, x, op=op)
    b = _fwd_bwd(backend, x, op=op)
    assert a[0].dtype == a[1].dtype == torch.float32
    assert torch.all(torch.exp(a[0] - b[0]) == 1)
    # fp32 resolution: log-probs are not bf16/fp16 values in disguise
    assert not torch.equal(a[0], a[0].to(dtype).float()) or dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------- #7

_ALLOWED_CONSTEXPR = {"HAS_BIAS", "HAS_D", "COMPUTE_ENTROPY", "DOT_PRECISION", "UPCAST_DOT", "BT", "BV", "BK",
                      "KP", "HAS_TAU"}  # KP: the targets per row, padded to a power of two (a tile shape)


def _kernels():
    from fusedpg.kernels import linear_logprob_entropy as lk, logprob_entropy as gk

    return {name: obj for mod in (lk, gk) for name, obj in vars(mod).items() if name.endswith("_kernel")}


def _constexpr_names(kernel):
    params = inspect.signature(kernel.fn).parameters.values()
    return {p.name for p in params if p.annotation is not inspect.Parameter.empty and "constexpr" in str(p.annotation)}


def test_07_hyperparameters_are_not_constexpr():
    """#7 Liger#1366 / TRL: temperature, lengths and vocabulary as tl.constexpr recompile per value. Only tile sizes
    and feature flags may be compile-time constants; temperature arrives through a pointer."""
    kernels = _kernels()
    assert len(kernels) >= 5, sorted(kernels)  # fwd, merge, bwd of the fused head; fwd, bwd on logits
    for name, k in kernels.items():
        const = _constexpr_names(k)
        assert const <= _ALLOWED_CONSTEXPR, f"{name}: unexpected constexpr {sorted(const - _ALLOWED_CONSTEXPR)}"
        args = inspect.signature(k.fn).parameters
        assert "N" in args and "N" not in const, name
        for runtime in ("V", "H", "V_PER_SPLIT", "SPLITS", "stride_t"):
            assert runtime not in const, (name, runtime)
        if "t_ptr" in args:
            assert "t_ptr" not in const


class _LaunchSpy:
    """Wraps a kernel: records each launch's specialisation-relevant key (constexpr values and argument kinds)."""

    def __init__(self, kernel):
        self.kernel, self.const = kernel, _constexpr_names(kernel)
        self.names = list(inspect.signature(kernel.fn).parameters)
        self.keys, self.floats = set(), []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            bound = dict(zip(self.names, args), **kwargs)
            key = []
            for name, val in bound.items():
                if name in self.const:
                    key.append((name, val))
                elif isinstance(val, torch.Tensor):
                    key.append((name, val.dtype))
                elif isinstance(val, float):
                    self.floats.append((name, val))
                elif isinstance(val, int):
                    key.append((name, "1" if val == 1 else "int"))  # Triton specialises ints equal to 1
            self.keys.add(tuple(key))
            return launch(*args, **kwargs)

        return run


def _launch_all(backend, n, temperature, dtype=torch.float32):
    x = make_linear_inputs(LinearCase(n=n, v=40, h=16, dtype=dtype, ignore_frac=0.0), backend.device)
    if temperature == "per-token":
        temperature = torch.rand(n, device=backend.device) + 0.5
    _fwd_bwd(backend, x, op="linear", temperature=temperature)
    _fwd_bwd(backend, x, op="linear", temperature=temperature, top_k=5)  # the chunk logits, the masked gradient
    _fwd_bwd(backend, x, op="logits", temperature=temperature)


def test_07_no_new_kernel_variants_after_warmup(monkeypatch):
    """#7: after a warm-up, new lengths and temperatures launch no new kernel specialisation. In the interpreter the
    launch keys are inspected; on CUDA the JIT caches are counted as well."""
    backend = BACKENDS[1]
    import fusedpg.linear.launch_triton as lt
    import fusedpg.logits.launch_triton as gt

    spies = {}
    for mod in (lt, gt):
        for name in dir(mod):
            if name.endswith("_kernel"):
                spies[name] = _LaunchSpy(getattr(mod, name))
                monkeypatch.setattr(mod, name, spies[name])

    def cache_entries():
        if not HAS_CUDA:
            return 0
        return sum(len(c[0]) for s in spies.values() for c in s.kernel.device_caches.values())

    # Warm-up: one length per integer specialisation class (Triton specialises ints equal to 1 and, on CUDA, ints
    # divisible by 16: n = 1, 17, 32), one length long enough for a single vocabulary split (SPLITS = 1), scalar and
    # per-token temperature. Those classes are a fixed handful of variants, not one per value.
    for n in (17, 32, 1, 63):
        for t in (1.0, "per-token"):
            _launch_all(backend, n, t)
    keys = {name: set(s.keys) for name, s in spies.items()}
    entries = cache_entries()
    for n in (5, 29, 48, 100):
        for t in (0.7, 2.0, "per-token"):
            _launch_all(backend, n, t)
    assert all(s.floats == [] for s in spies.values()), {k: s.floats for k, s in spies.items() if s.floats}
    for name, s in spies.items():
        assert s.keys, f"{name} never launched"
        assert s.keys == keys[name], f"{name}: new launch keys {s.keys - keys[name]}"
    assert cache_entries() == entries


# ---------------------------------------------------------------------------------------------------------- #16


@pytest.mark.parametrize("op", ["linear", "logits"])
def test_16_per_row_temperature_equals_row_loop(backend, op):
    """#16 TRL#4159: trainer and sampler tempered differently. A per-row temperature tensor gives what looping the
    rows with each scalar temperature gives (outputs and per-row gradients)."""
    n = 6
    temps = [0.7, 1.0, 0.25, 2.0, 1e-2, 1e2]
    # unpeaked: a single-row GEMM may sum in another order than the batched one, and a peaked head at T = 1e-2 would
    # amplify that last-bit difference far past the tolerances below (see GRID in conftest.py)
    x = make_linear_inputs(LinearCase(n=n, v=37, h=16, ignore_frac=0.0, seed=5), backend.device)
    t = torch.tensor(temps, device=backend.device)
    whole = _fwd_bwd(backend, x, op=op, temperature=t, grad_ent=False)
    for i, ti in enumerate(temps):
        row = dict(x, hidden=x["hidden"][i:i + 1], targets=x["targets"][i:i + 1])
        one = _fwd_bwd(backend, row, op=op, temperature=ti, grad_ent=False)
        weight_i = -1 + 2 * i / (n - 1)  # _fwd_bwd weights row i of n by linspace(-1, 1, n)[i]
        torch.testing.assert_close(one[0][0], whole[0][i], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(one[1][0], whole[1][i], rtol=1e-5, atol=1e-5)
        # the single-row loss has weight -1 (linspace of one point); rescale to compare this row's gradient
        torch.testing.assert_close(one[2][0] * -weight_i, whole[2][i], rtol=1e-4, atol=1e-5)


def test_16_temperature_0_7_matches_log_softmax(backend):
    """#16: with T = 0.7, logp is log_softmax(u / T) of the float64 reference (the tolerance model)."""
    case = LinearCase(n=11, v=60, temperature=0.7, peaked=True)
    assert_all_ok(check_linear(case, impl=backend.impl, device=backend.device))
    assert_all_ok(check_logits(case, impl=backend.impl, device=backend.device))


# ---------------------------------------------------------------------------------------------------------- #17


@pytest.mark.parametrize("temperature", [1.0, "per-token"])
def test_17_entropy_gradient_gradcheck(temperature):
    """#17 TRL / SkyRL: the entropy gradient was ignored or missing. gradcheck (fp64, torch plan) of alpha * H and of
    logp + alpha * H w.r.t. hidden, weight and bias."""
    case = LinearCase(n=5, h=4, v=7, dtype=torch.float64, temperature=temperature, ignore_frac=0.3, seed=1)
    x = make_linear_inputs(case)
    temp = x["temperature"]
    temp = temp.double() if isinstance(temp, torch.Tensor) else temp
    alpha = 0.37
    leaves = [x["hidden"].detach().requires_grad_(True), x["weight"].detach().requires_grad_(True),
              x["bias"].detach().requires_grad_(True)]

    def entropy_bonus(h, w, b):
        _, ent = fusedpg.linear_logprob_entropy(h, w, x["targets"], bias=b, temperature=temp, impl="torch")
        return alpha * ent

    def both(h, w, b):
        logp, ent = fusedpg.linear_logprob_entropy(h, w, x["targets"], bias=b, temperature=temp, impl="torch")
        return logp + alpha * ent

    assert torch.autograd.gradcheck(entropy_bonus, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradcheck(both, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)
    logits = (x["hidden"] @ x["weight"].T + x["bias"]).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: alpha * fusedpg.logprob_entropy(z, x["targets"], temperature=temp, impl="torch")[1], [logits],
        eps=1e-6, atol=1e-7, rtol=1e-5)


def test_17_entropy_gradient_is_not_zero_and_disabled_entropy_has_none(backend):
    """#17: an entropy-only loss moves the parameters; with compute_entropy=False the entropy carries no graph."""
    x = make_linear_inputs(LinearCase(n=8, v=30, ignore_frac=0.0), backend.device)
    h = x["hidden"].clone().requires_grad_(True)
    _, ent = fusedpg.linear_logprob_entropy(h, x["weight"], x["targets"], impl=backend.impl)
    (gh,) = torch.autograd.grad(ent.sum(), [h])
    assert gh.abs().max() > 1e-3
    logp, ent = fusedpg.linear_logprob_entropy(h, x["weight"], x["targets"], impl=backend.impl, compute_entropy=False)
    assert not ent.requires_grad and torch.all(ent == 0) and logp.requires_grad


# ---------------------------------------------------------------------------------------------------------- #19


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", ["linear", "logits", "logits-inplace"])
def test_19_reruns_are_bitwise_identical(backend, dtype, op):
    """#19 verl / CCE atomics: run-to-run differences. Three reruns give bitwise identical outputs and gradients."""
    x = make_linear_inputs(LinearCase(n=40, v=70, dtype=dtype, temperature="per-token", peaked=True), backend.device)
    runs = [_fwd_bwd(backend, x, op=op.split("-")[0], inplace=op.endswith("inplace")) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------- #20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_20_inputs_unchanged_after_backward(backend, dtype):
    """#20 Liger inplace / QuACK: the caller's tensors were overwritten by gradients. Without the opt-in nothing the
    caller passed changes (logits, hidden, weight, bias, targets, temperature)."""
    x = make_linear_inputs(LinearCase(n=12, v=40, dtype=dtype, temperature="per-token"), backend.device)
    logits = (x["hidden"].float() @ x["weight"].float().T).to(dtype).requires_grad_(True)
    saved = {k: v.clone() for k, v in x.items() if isinstance(v, torch.Tensor)}
    saved_logits = logits.detach().clone()
    logp, ent = fusedpg.logprob_entropy(logits, x["targets"], temperature=x["temperature"], impl=backend.impl)
    (logp.sum() + ent.sum()).backward()
    assert torch.equal(logits.detach(), saved_logits)
    assert not torch.equal(logits.grad, saved_logits)
    leaves = {k: x[k].requires_grad_(True) for k in ("hidden", "weight", "bias")}
    logp, ent = fusedpg.linear_logprob_entropy(leaves["hidden"], leaves["weight"], x["targets"], bias=leaves["bias"],
                                               temperature=x["temperature"], impl=backend.impl)
    (logp.sum() + ent.sum()).backward()
    for k, v in saved.items():
        assert torch.equal(x[k].detach(), v), f"{k} changed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_20_inplace_backward_writes_the_right_gradient_into_logits(backend, dtype):
    """#20: with inplace_backward=True the gradient lands in the logits buffer and is correct."""
    x = make_linear_inputs(LinearCase(n=12, v=40, dtype=dtype, temperature="per-token"), backend.device)
    base = (x["hidden"].float() @ x["weight"].float().T).to(dtype)
    ref = base.clone().requires_grad_(True)
    logp, ent = fusedpg.logprob_entropy(ref, x["targets"], temperature=x["temperature"], impl=backend.impl)
    (logp.sum() + 0.5 * ent.sum()).backward()
    logits = base.clone().requires_grad_(True)
    logp2, ent2 = fusedpg.logprob_entropy(logits, x["targets"], temperature=x["temperature"], impl=backend.impl,
                                          inplace_backward=True)
    assert torch.equal(logp2, logp) and torch.equal(ent2, ent)
    (logp2.sum() + 0.5 * ent2.sum()).backward()
    assert torch.equal(logits.grad, ref.grad)
    assert torch.equal(logits.detach(), ref.grad), "the gradient was not written into the logits buffer"
    assert_all_ok(check_logits(LinearCase(n=12, v=40, dtype=dtype, temperature="per-token"), impl=backend.impl,
                               device=backend.device, inplace=True))


# ---------------------------------------------------------------------------------------------------------- #21


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_21_bias_on_and_off(backend, dtype, bias):
    """#21 CCE#52: losses were often negative (logp > 0) with a bias. Bias on and off, peaked logits, large bias."""
    case = LinearCase(n=14, v=50, dtype=dtype, bias=bias, peaked=True, temperature="per-token", ignore_frac=0.1)
    x = make_linear_inputs(case, backend.device)
    if bias:
        x["bias"] = x["bias"] * 5
    logp, ent = _fwd_bwd(backend, x)[:2]
    assert torch.all(logp <= 0) and torch.all(ent >= 0)
    results = check_linear(case, impl=backend.impl, device=backend.device)
    assert ("linear.d_bias" in {r.name for r in results}) == bias
    assert_all_ok(results)


# ---------------------------------------------------------------------------------------------------------- #23


def test_23_call_from_a_worker_thread(backend):
    """#23 verl#4676: Triton >= 3.5 worker threads lost the allocator. Forward + backward from a non-main thread
    equal the main thread's results."""
    x = make_linear_inputs(LinearCase(n=10, v=40, temperature="per-token"), backend.device)
    main = _fwd_bwd(backend, x) + _fwd_bwd(backend, x, op="logits")
    box = {}

    def work():
        try:
            box["out"] = _fwd_bwd(backend, x) + _fwd_bwd(backend, x, op="logits")
        except BaseException as e:  # pragma: no cover - reported below
            box["err"] = e

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=300)
    assert not t.is_alive()
    assert "err" not in box, repr(box.get("err"))
    for a, b in zip(main, box["out"]):
        assert torch.equal(a, b)
