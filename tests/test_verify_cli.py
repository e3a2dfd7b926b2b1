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
    assert len(rows) == 3 * (5 + 3 + 3)
    for dtype in ("float32", "bfloat16", "float16"):
        for out in ("logp", "entropy", "d_hidden", "d_weight", "d_bias"):
            assert any(r.startswith("linear_logprob_entropy") and f" {out} " in r and dtype in r for r in rows)
        for op in ("logprob_entropy ", "logprob_entropy[inplace]"):
            assert any(r.startswith(op) and " d_logits " in r and dtype in r for r in rows)


def test_verify_triton_one_dtype(capsys):
    impl, device = BACKENDS[1]
    assert cli.main(["verify", "--impl", impl, "--device", device, "--dtype", "bf16", "--only", "primitives"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert len(rows) == 11 and all("bfloat16" in r and r.endswith("PASS") for r in rows)


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
    assert "1 failed" in out and "linear.logp [float32]" in out  # the failure's full report is printed
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


def test_cli_usage_and_unknown_command(capsys):
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    assert "usage: fusedpg" in capsys.readouterr().out
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


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
