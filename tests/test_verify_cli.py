"""``fusedpg verify``: prints the comparison table and exits 0 when every op matches, non-zero when one does not."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import torch

import fusedpg
from fusedpg import cli
from fusedpg.verification import runner

from conftest import BACKENDS


def _table_rows(out: str):
    # table rows; the indented lines after the summary are the failing comparisons' full reports
    return [line for line in out.splitlines() if line.endswith(("PASS", "FAIL")) and not line.startswith(" ")]


def test_verify_torch_prints_table_and_passes(capsys):
    # every op group (the primitives, the PG losses, shared-prefix attention) at one dtype; all dtypes of the
    # primitives are below
    assert runner.main(["--impl", "torch", "--device", "cpu", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "max abs err" in out and "ours/eager" in out
    # the legend under the table says what the ratio is and what passes
    assert "ours/eager = max |ours - float64| / max |eager - float64|" in out
    assert "|ours - float64| <= 2 * |eager - float64| + slack * max(1, max |float64|)" in out
    assert "slack float32 1e-05, bfloat16 0.016, float16 0.002" in out
    assert out.index("ours/eager = ") > out.index(_table_rows(out)[-1])
    rows = _table_rows(out)
    assert rows and all(r.endswith("PASS") for r in rows)
    assert f"{len(rows)} passed, 0 failed" in out
    for op in ("linear_logprob_entropy", "logprob_entropy ", "logprob_entropy[inplace]"):
        assert any(r.startswith(op) for r in rows), op


def test_verify_primitives_table():
    """--only primitives: one row per op x dtype x output (linear: logp, entropy, d_hidden, d_weight, d_bias)."""
    import io

    buf = io.StringIO()
    assert runner.run("cpu", "torch", [torch.float32, torch.bfloat16, torch.float16], out=buf,
                      groups=("primitives",))
    rows = _table_rows(buf.getvalue())
    # deterministic modes, the truncated head, K targets (both ops), memory="low" plain and deterministic + truncated
    assert len(rows) == 3 * (5 + 3 + 3 + 5 + 3 + 5 + 5 + 3 + 5 + 5)
    for dtype in ("float32", "bfloat16", "float16"):
        for out in ("logp", "entropy", "d_hidden", "d_weight", "d_bias"):
            assert any(r.startswith("linear_logprob_entropy") and f" {out} " in r and dtype in r for r in rows)
        for op in ("logprob_entropy ", "logprob_entropy[inplace]", "logprob_entropy[det]"):
            assert any(r.startswith(op) and " d_logits " in r and dtype in r for r in rows)
        assert any(r.startswith("linear_logprob_entropy[det]") and " d_hidden " in r and dtype in r for r in rows)
        for op in ("linear_logprob_entropy[low] ", "linear_logprob_entropy[low,det,trunc]"):
            assert any(r.startswith(op) and " d_weight " in r and dtype in r for r in rows), op


def test_verify_tp_group_runs_two_gloo_ranks():
    """--only tp: the merged log-probs, entropy and every gradient of a head sharded over 2 gloo ranks (plain,
    deterministic, truncated) against float64, and the deterministic whole-segment results equal to one process on
    both plans."""
    import io

    buf = io.StringIO()
    assert runner.run("cpu", None, [torch.float32], out=buf, groups=("tp",))
    rows = _table_rows(buf.getvalue())
    assert len(rows) == 3 * 5 + 2 * 4, rows
    for op in ("vocab_parallel ", "vocab_parallel[det] ", "vocab_parallel[trunc]"):
        assert sum(r.startswith(op) for r in rows) == 5, op
    for op in ("vocab_parallel[det,bitwise] ", "vocab_parallel[det,bitwise,triton]"):
        bitwise = [r for r in rows if r.startswith(op)]
        assert len(bitwise) == 4 and all("== 1 process" in r and " 0.000e+00 " in r for r in bitwise), op


def test_verify_triton_one_dtype(capsys):
    impl, device = BACKENDS[1]
    assert cli.main(["verify", "--impl", impl, "--device", device, "--dtype", "bf16", "--only", "primitives"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert len(rows) == 11 + 8 + 5 + 5 + 3 + 10 and all("bfloat16" in r and r.endswith("PASS") for r in rows)


def test_verify_fails_on_wrong_numbers(monkeypatch, capsys):
    real = fusedpg.linear_logprob_entropy

    def off_by_a_little(*args, **kwargs):
        logp, ent = real(*args, **kwargs)
        return logp + 1e-3, ent

    monkeypatch.setattr(fusedpg, "linear_logprob_entropy", off_by_a_little)
    assert runner.main(["--impl", "torch", "--dtype", "fp32", "--only", "primitives"]) == 1
    out = capsys.readouterr().out
    failing = [r for r in _table_rows(out) if r.endswith("FAIL")]
    assert failing and all(r.startswith("linear_logprob_entropy") and " logp " in r for r in failing)
    # every linear_logprob_entropy row (default, deterministic, truncated, K targets) fails on logp; each failure's
    # full report is printed
    assert f"{len(failing)} failed" in out and len(failing) >= 3 and "linear.logp [float32]" in out
    assert cli.main(["verify", "--impl", "torch", "--dtype", "fp32", "--only", "primitives"]) == 1


def test_verify_fails_on_wrong_gradient(monkeypatch, capsys):
    real = fusedpg.logprob_entropy

    def entropy_without_gradient(logits, *args, **kwargs):
        logp, ent = real(logits, *args, **kwargs)
        return logp, ent.detach()

    monkeypatch.setattr(fusedpg, "logprob_entropy", entropy_without_gradient)
    assert runner.main(["--impl", "torch", "--dtype", "fp32", "--only", "primitives"]) != 0
    failing = [r for r in _table_rows(capsys.readouterr().out) if r.endswith("FAIL")]
    assert failing and all(r.startswith("logprob_entropy") and "d_logits" in r for r in failing)


def test_verify_help_explains_the_ratio_and_the_pass_rule(capsys):
    assert cli.main(["verify", "--help"]) == 0
    text = capsys.readouterr().out
    assert runner.LEGEND in text and "A row passes when" in text and "``" not in text


def _one_line_error(capsys, *needles):
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err and len(err.splitlines()) == 1, captured.err
    assert err.startswith("fusedpg verify: ") and captured.out == ""  # nothing ran, not even the header
    for needle in needles:
        assert needle in err, (needle, err)


def test_verify_cuda_without_cuda_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        assert cli.main(["verify", "--device", device]) == 2
        _one_line_error(capsys, f"--device {device}", "CUDA", "torch.cuda.is_available() False", torch.__version__)


def test_verify_triton_without_gpu_or_interpreter_is_one_line(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FUSEDPG_IMPL", raising=False)
    assert cli.main(["verify", "--impl", "triton", "--device", "cpu", "--only", "primitives"]) == 2
    _one_line_error(capsys, "--impl triton", "TRITON_INTERPRET=1", "--device cuda", "got --device cpu")
    monkeypatch.setenv("FUSEDPG_IMPL", "triton")  # the same choice through the environment
    assert runner.main(["--device", "cpu"]) == 2
    _one_line_error(capsys, "FUSEDPG_IMPL='triton'", "TRITON_INTERPRET=1", "got tensors on cpu")
    monkeypatch.setenv("FUSEDPG_IMPL", "bogus")
    assert runner.main(["--device", "cpu"]) == 2
    _one_line_error(capsys, "FUSEDPG_IMPL", "'bogus'")


def test_verify_unknown_device_is_one_line(capsys):
    for device in ("tpu", "foo", "cuda:x"):
        assert cli.main(["verify", "--device", device]) == 2
        _one_line_error(capsys, "--device", "cpu, cuda or cuda:N", repr(device))


def _run_cli(argv):
    env = dict(os.environ, FUSEDPG_IMPL="torch")
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)


def test_console_script_in_a_fresh_process():
    exe = shutil.which("fusedpg")
    argv = [exe] if exe else [sys.executable, "-m", "fusedpg.cli"]
    proc = _run_cli(argv + ["verify", "--impl", "torch", "--device", "cpu", "--dtype", "fp32",
                            "--only", "primitives"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed, 0 failed" in proc.stdout
    proc = _run_cli(argv + ["verify", "--dtype", "fp64"])  # not a choice: argparse exits 2
    assert proc.returncode == 2 and "fp64" in proc.stderr
    proc = _run_cli(argv + ["verify", "--device", "tpu"])  # the installed script: one line, no traceback
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fusedpg verify: --device must be cpu, cuda or cuda:N, got 'tpu'"
