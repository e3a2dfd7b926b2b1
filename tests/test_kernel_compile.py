"""The kernels compile for a GPU target with the installed Triton, on a machine without a GPU: Triton 3.9 refuses
module globals that are not ``tl.constexpr`` objects (``LOG2E: tl.constexpr = ...`` is only an annotation), which
the CPU interpreter never notices. Run in a subprocess: the test session runs the kernels interpreted."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusedpg.kernels.logprob_entropy import _logprob_entropy_fwd_kernel

sig = {"x_ptr": "*fp32", "y_ptr": "*i64", "t_ptr": "*fp32", "logp_ptr": "*fp32", "ent_ptr": "*fp32",
       "mx_ptr": "*fp32", "ls_ptr": "*fp32", "N": "i32", "V": "i32", "K": "i32", "stride_n": "i32",
       "stride_t": "i32", "COMPUTE_ENTROPY": "constexpr", "BT": "constexpr", "BV": "constexpr", "KP": "constexpr"}
src = ASTSource(_logprob_entropy_fwd_kernel, sig, constexprs={"COMPUTE_ENTROPY": True, "BT": 1, "BV": 1024, "KP": 1})


def build(src):
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 64))
        assert "tt.func" in compiled.asm["ttir"]
    except RuntimeError as err:  # no CUDA toolchain (ptxas) here: the front end, where globals are checked, ran
        if "ptxas" not in str(err).lower():
            raise


build(src)
# the truncated head's kernels, bf16: the chunk logits, and the gradient tile masked by the thresholds
from fusedpg.kernels.linear_logprob_entropy import _linear_logits_kernel, _linear_logprob_entropy_bwd_kernel

tiles = {"DOT_PRECISION": "tf32", "UPCAST_DOT": False, "BT": 64, "BV": 128, "BK": 64}
for kernel, consts in ((_linear_logits_kernel, dict(tiles, HAS_BIAS=False)),
                       (_linear_logprob_entropy_bwd_kernel, dict(tiles, HAS_BIAS=False, HAS_D=True, KP=1,
                                                                 HAS_TAU=True))):
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*bf16" if name in ("h_ptr", "w_ptr", "b_ptr", "g_ptr") else (
                "*i64" if name == "y_ptr" else "*fp32")
        else:
            sig[name] = "i32"
    build(ASTSource(kernel, sig, constexprs=consts))
print("ok")
'''


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# ------------------------------------------------------------------------------------------------------------------
# Every kernel as the ops launch it: the launches of a small bf16 run under the interpreter are recorded (argument
# types and compile-time constants), then each distinct one is compiled for sm_90 without the interpreter, so a
# kernel that only the interpreter accepts (a type mismatch a GPU compile rejects) fails here, before a device run.

_COMPILE_RECORDED = r'''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib

failed = []
for rec in json.load(open(sys.argv[1])):
    kernel = getattr(importlib.import_module(rec["module"]), rec["kernel"])
    src = ASTSource(kernel, rec["signature"], constexprs=rec["constexprs"])
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 64))
        assert "tt.func" in compiled.asm["ttir"]
    except RuntimeError as err:  # no CUDA toolchain (ptxas): the front end ran
        if "ptxas" not in str(err).lower():
            failed.append(f"{rec['kernel']} {rec['constexprs']}: {str(err)[-800:]}")
    except Exception as err:
        failed.append(f"{rec['kernel']} {rec['constexprs']}: {type(err).__name__}: {str(err)[-800:]}")
print("\n".join(failed) if failed else "ok")
'''

_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64",
        torch.int64: "*i64", torch.int32: "*i32", torch.int8: "*i8", torch.bool: "*i1", torch.uint8: "*u8"}


_TILES = {"BT", "BV", "BK", "BM", "BH", "BR", "BLOCK_M", "BLOCK_N", "BLOCK_D"}


def _record_launches(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    seen = {}
    real_run = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        names = list(params)
        const_names = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
        bound = dict(zip(names, args), **{k: v for k, v in kwargs.items() if k in params})
        consts = {n: bound[n] if n in bound else params[n].default for n in const_names}
        if "UPCAST_DOT" in consts:  # the interpreter's workaround; a GPU compiles tl.dot, whose tiles are >= 16
            consts["UPCAST_DOT"] = False
            consts.update({n: 16 for n, v in consts.items() if n in _TILES and isinstance(v, int) and v < 16})
        sig = {}
        for n in names:
            if n in const_names:
                sig[n] = "constexpr"
            elif isinstance(bound[n], torch.Tensor):
                sig[n] = _PTR[bound[n].dtype]
            elif isinstance(bound[n], bool):
                sig[n] = "i1"
            elif isinstance(bound[n], int):
                sig[n] = "i64" if abs(bound[n]) >= 2 ** 31 else "i32"
            else:
                sig[n] = "fp32"
        key = (self.fn.__module__, self.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(map(str, consts.items()))))
        seen.setdefault(key, dict(module=self.fn.__module__, kernel=self.fn.__name__, signature=sig,
                                  constexprs={k: v for k, v in consts.items()}))
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return seen


def _run_every_kernel():
    import fusedpg
    from fusedpg.gemm import triton_accumulate_mm_
    from fusedpg.prefix import shared_prefix_attention
    from fusedpg.verification.cases_prefix import CASES, case_layout, make_inputs, run_attention

    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16
    hidden = torch.randn(2, 9, 16, generator=g).to(bf).requires_grad_()
    weight = (torch.randn(70, 16, generator=g) / 4).to(bf).requires_grad_()
    bias = torch.zeros(70, dtype=bf, requires_grad=True)
    y = torch.randint(0, 70, (2, 9), generator=g)
    temps = torch.rand(2, 9, generator=g) + 0.5
    runs = [dict(), dict(bias=bias, temperature=temps), dict(top_k=5, top_p=0.9), dict(deterministic=True, bias=bias)]
    for kw in runs:
        logp, ent = fusedpg.linear_logprob_entropy(hidden, weight, y, impl="triton", **kw)
        (logp.float().sum() + ent.float().sum()).backward()
    logp, ent = fusedpg.linear_logprob_entropy(hidden, weight, torch.stack([y, y.flip(-1)], -1), impl="triton")
    (logp.float().sum() + ent.float().sum()).backward()
    logits = (hidden.detach().float() @ weight.detach().float().T).to(bf).requires_grad_()
    for targets in (y, torch.stack([y, y.flip(-1)], -1)):
        logp, ent = fusedpg.logprob_entropy(logits, targets, impl="triton")
        (logp.float().sum() + ent.float().sum()).backward()
    adv, mask = torch.randn(2, generator=g), torch.ones(2, 9)
    old = torch.full((2, 9), -4.0)
    for loss_type, extra in (("grpo", dict(beta=0.1, ref_logp=old)), ("dapo", {}), ("gspo", {}), ("cispo", {})):
        loss, _ = fusedpg.fused_linear_pg_loss(hidden, weight, y, adv, mask, old_logp=old, loss_type=loss_type,
                                               impl="triton", **extra)
        loss.backward()
    layout = case_layout(CASES[0])
    run_attention(lambda q, k, v: shared_prefix_attention(q, k, v, layout, impl="triton"),
                  make_inputs(CASES[0], layout), bf)
    acc = torch.zeros(8, 16)
    triton_accumulate_mm_(acc, torch.randn(5, 8).to(bf), torch.randn(5, 16).to(bf))


def test_every_kernel_as_launched_compiles_for_sm90(monkeypatch, tmp_path):
    import json

    if not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("records the interpreter's launches (a CUDA machine compiles them by running the suite)")
    seen = _record_launches(monkeypatch)
    _run_every_kernel()
    kernels = {rec["kernel"] for rec in seen.values()}
    from fusedpg import kernels as package
    import importlib
    import pkgutil

    every = {name for m in pkgutil.iter_modules(package.__path__)
             for name in vars(importlib.import_module(f"fusedpg.kernels.{m.name}")) if name.endswith("_kernel")}
    assert kernels == every, f"never launched: {sorted(every - kernels)}"
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(list(seen.values())))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_RECORDED, str(path)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), (out.stdout[-4000:] + out.stderr[-2000:])
