"""The kernels compile for a GPU target with the installed Triton, on a machine without a GPU: Triton 3.9 refuses
module globals that are not ``tl.constexpr`` objects (``LOG2E: tl.constexpr = ...`` is only an annotation), which
the CPU interpreter never notices. Run in a subprocess: the test session runs the kernels interpreted."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

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
