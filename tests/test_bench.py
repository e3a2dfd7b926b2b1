"""The benchmark suite: measurement helpers, the case registry, writers, the CLI and bench/device.sh --dry-run.

Everything runs on CPU at tiny shapes; the timing numbers themselves are not checked, only that they exist and
that the memory probe sees an allocation of known size.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fusedpg.bench import main, measure, report
from fusedpg.bench.registry import (DEFAULT_DTYPE, DEFAULT_MODES, JUDGED_CPU, SHAPE_PRESETS, Case, Impl, Inputs,
                                    Shape, availability)
from fusedpg.bench.runner import Plan, Runner, mode_call

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ("case", "shape", "dtype", "mode", "impl", "status", "median_ms", "q20_ms", "q80_ms", "peak_mem_bytes",
            "device_name", "torch_version", "triton_version", "git_commit", "utc_time")
MIB = 1 << 20
linux_proc = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")


def test_quantiles_interpolate_like_numpy():
    assert measure.quantiles([4.0, 1.0, 3.0, 2.0]) == pytest.approx([2.5, 1.6, 3.4])
    assert measure.quantiles([7.0]) == [7.0, 7.0, 7.0]
    with pytest.raises(ValueError):
        measure.quantiles([])


def test_shape_parse_and_presets():
    assert Shape.parse("4096x1024x32000") == JUDGED_CPU and JUDGED_CPU.label == "4096x1024x32000"
    with pytest.raises(ValueError, match="NxHxV"):
        Shape.parse("4096x1024")
    # The judged CPU shape is in the default CPU run, at fp32, with fwd+bwd.
    assert JUDGED_CPU in SHAPE_PRESETS[("cpu", False)]
    assert DEFAULT_DTYPE["cpu"] == "fp32" and "fwd+bwd" in DEFAULT_MODES


def test_availability_reports_missing_and_opt_in():
    noop = lambda inp, shape: None  # noqa: E731
    missing = Impl("ghost", noop, requires=("fusedpg_no_such_module_xyz",))
    assert availability(missing, "cpu", None)[0] == "missing"
    gpu_only = Impl("g", noop, devices=("cuda",))
    assert availability(gpu_only, "cpu", None)[0] == "skipped"
    opt = Impl("c", noop, devices=("cuda",), opt_in=("cpu",))
    assert availability(opt, "cpu", None)[0] == "skipped"
    assert availability(opt, "cpu", ["c"])[0] == "run"
    assert availability(opt, "cpu", ["other"])[0] == "filtered"


@linux_proc
def test_cpu_sample_sees_an_allocation_of_known_size():
    if not measure.clear_refs_writable():
        pytest.skip("/proc/self/clear_refs not writable here")
    keep = []

    def call():
        t = torch.ones(64 * MIB // 4)  # 64 MiB, touched
        keep.append(t.sum())

    ms, peak = measure.cpu_sample(call, lambda: None)
    assert ms > 0
    assert 60 * MIB <= peak <= 100 * MIB


@linux_proc
def test_fresh_process_peak_in_a_subprocess():
    code = ("import torch; from fusedpg.bench import measure; "
            "print(measure.fresh_process_peak(lambda: torch.ones(48 << 18).sum(), lambda: None))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 40 * MIB <= int(out.stdout.strip().splitlines()[-1]) <= 100 * MIB


def test_mode_call_runs_forward_and_backward_as_named():
    w = torch.ones(3, requires_grad=True)
    counts = {"fwd": 0}

    def fn():
        counts["fwd"] += 1
        return (w * 2,), (torch.ones(3),)

    setup, call = mode_call("fwd", fn)
    assert setup is None
    call()
    assert counts["fwd"] == 1 and w.grad is None
    mode_call("fwd+bwd", fn)[1]()
    assert counts["fwd"] == 2 and torch.equal(w.grad, torch.full((3,), 2.0))
    w.grad = None
    setup, call = mode_call("bwd", fn)
    setup()
    call()  # backward only: no new forward, graph freed after
    assert counts["fwd"] == 3 and torch.equal(w.grad, torch.full((3,), 2.0))
    with pytest.raises(ValueError):
        mode_call("sideways", fn)


def _row(impl, ms, mem, status="ok", mode="fwd+bwd", shape="4096x1024x32000", detail=""):
    return {"case": "linear", "shape": shape, "dtype": "fp32", "mode": mode, "impl": impl, "status": status,
            "detail": detail, "median_ms": ms, "q20_ms": ms and ms * 0.9, "q80_ms": ms and ms * 1.1,
            "peak_mem_bytes": mem, "tflops": None, "device_type": "cpu", "device_name": "test cpu",
            "git_commit": "abc123", "role": "ours" if impl == "ours" else "peer"}


def test_markdown_table_ratios_notes_and_targets():
    rows = [_row("ours", 110.0, 100 * MIB), _row("eager", 100.0, 400 * MIB),
            _row("cce", None, None, status="skipped", detail="runs on cuda only"),
            _row("floor", None, None, status="oom", detail="OutOfMemoryError: boom")]
    table = report.markdown_table(rows)
    lines = table.splitlines()
    eager = next(line for line in lines if "| eager |" in line)
    assert "| 1.10 | 0.25 |" in eager  # ours ÷ eager: time 110/100, memory 100/400
    assert any("| floor |" in line and "oom" in line for line in lines)  # stays in the table
    assert any(line.startswith("- not measured: linear / cce") and "cuda only" in line for line in lines)
    targets = report.target_lines(rows)
    assert len(targets) == 2
    assert "time ours/eager = 1.100" in targets[0] and targets[0].endswith("MET")
    assert "peak memory ours/eager = 0.250" in targets[1] and targets[1].endswith("MET")
    worse = report.target_lines([_row("ours", 130.0, 200 * MIB), _row("eager", 100.0, 400 * MIB)])
    assert all(t.endswith("MISSED") for t in worse)


def test_row_sink_writes_json_jsonl_csv(tmp_path):
    sink = report.RowSink(str(tmp_path), {"device_name": "test cpu", "git_commit": "abc"})
    sink(_row("ours", 1.0, 10))
    sink(_row("eager", 2.0, 20))
    paths = sink.finish()
    assert json.load(open(paths["json"]))[1]["impl"] == "eager"
    assert len(report.load_rows([str(tmp_path / "rows.jsonl")])) == 2
    header = open(paths["csv"]).readline().strip().split(",")
    assert "median_ms" in header and "peak_mem_bytes" in header


def test_git_commit_is_a_sha_or_unknown(tmp_path):
    assert report.git_commit(str(tmp_path)) == "unknown" or len(report.git_commit(str(tmp_path))) >= 40
    here = report.git_commit(REPO)
    assert here == "unknown" or len(here.split("+")[0]) == 40


def _run_main(tmp_path, *extra):
    out = tmp_path / "out"
    rc = main(["--device", "cpu", "--shape", "32x16x64", "--reps", "2", "--out", str(out), "--no-progress", *extra])
    rows = json.load(open(out / "results.json")) if (out / "results.json").exists() else []
    return rc, rows, out


def test_main_end_to_end_rows_table_and_plots(tmp_path, capsys):
    rc, rows, out = _run_main(tmp_path)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| case |" in printed and "plots:" in printed
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["case"], r["impl"]) for r in ok} == {("linear", "ours"), ("linear", "eager"), ("logits", "ours"),
                                                    ("logits", "eager")}
    assert {r["mode"] for r in ok} == set(DEFAULT_MODES)
    for r in rows:
        assert all(k in r for k in REQUIRED), r
    assert all(r["median_ms"] > 0 and r["q20_ms"] <= r["median_ms"] <= r["q80_ms"] for r in ok)
    assert all(r["peak_mem_bytes"] is not None for r in ok)
    # Peers that cannot run on CPU are rows with a reason, never dropped.
    assert {r["impl"] for r in rows if r["status"] in ("skipped", "missing")} >= {"cce", "liger", "compile"}
    assert (out / "table.md").exists() and (out / "results.csv").exists()
    if importlib.util.find_spec("matplotlib") is None:
        return
    assert (out / "linear_time.png").exists() and (out / "logits_memory.png").exists()


def test_main_filters_list_and_bad_arguments(tmp_path, capsys):
    rc, rows, _ = _run_main(tmp_path, "--case", "linear", "--impl", "ours,floor", "--mode", "fwd", "--no-plots")
    assert rc == 0
    assert {(r["impl"], r["status"]) for r in rows} == {("ours", "ok"), ("floor", "ok")}  # floor: opt-in on CPU
    assert main(["--list", "--device", "cpu"]) == 0
    assert "case linear" in capsys.readouterr().out
    assert main(["--device", "cpu", "--impl", "nope"]) == 2
    assert main(["--device", "cpu", "--shape", "12x3"]) == 2


def test_errors_become_rows_and_other_impls_go_on(tmp_path, monkeypatch):
    from fusedpg.bench import registry

    def boom(inp, shape):
        raise RuntimeError("kaput")

    def fine(inp, shape):
        x = inp["x"]
        return lambda: ((x * 2,), (torch.ones_like(x),))

    case = Case("toy", "toy", lambda s, d, dev, seed: Inputs(leaves={"x": torch.ones(s.n, requires_grad=True)}),
                impls=(Impl("ours", fine, role="ours"), Impl("bad", boom)))
    monkeypatch.setitem(registry._CASES, "toy", case)
    rows = []
    plan = Plan(device="cpu", dtype="fp32", cases=["toy"], shapes=[Shape(8, 1, 1)], modes=["fwd+bwd", "bwd"],
                impls=None, reps=2, warmup=0)
    Runner(plan, rows.append).run()
    status = {(r["mode"], r["impl"]): (r["status"], r["detail"]) for r in rows}
    assert status[("bwd", "bad")][0] == "error" and "kaput" in status[("bwd", "bad")][1]
    assert status[("fwd+bwd", "ours")][0] == "ok" and status[("bwd", "ours")][0] == "ok"


@linux_proc
def test_subprocess_memory_fallback(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDPG_BENCH_MEMORY", "subprocess")
    rc, rows, _ = _run_main(tmp_path, "--case", "logits", "--mode", "fwd+bwd", "--no-plots")
    ok = [r for r in rows if r["status"] == "ok"]
    assert rc == 0 and len(ok) == 2
    assert all(r["mem_method"] == "VmHWM in a fresh process" and r["peak_mem_bytes"] is not None for r in ok)


def test_plots_skip_without_matplotlib(tmp_path, monkeypatch, capsys):
    from fusedpg.bench.plots import plot_rows

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_rows([_row("ours", 1.0, 1)], str(tmp_path)) == []
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_progress_plain_lines_without_tqdm(monkeypatch, capsys):
    from fusedpg.bench.progress import Progress

    monkeypatch.setitem(sys.modules, "tqdm", None)
    p = Progress(2)
    p.step("linear 1x1x1 fwd ours", "1.0 ms")
    p.step(None)
    p.close()
    err = capsys.readouterr().err
    assert "[1/2] linear 1x1x1 fwd ours: 1.0 ms" in err and "[2/2] skipped" in err


def test_render_states_device_and_commit(tmp_path, capsys):
    from fusedpg.bench.render import main as render_main

    path = tmp_path / "r.json"
    report.write_json(str(path), [_row("ours", 110.0, 100 * MIB), _row("eager", 100.0, 400 * MIB)])
    assert render_main([str(path), "--mode", "fwd+bwd"]) == 0
    text = capsys.readouterr().out
    assert "### test cpu, fusedpg commit `abc123`" in text and "| eager |" in text and "target" in text


@pytest.mark.skipif(shutil.which("bash") is None or not os.path.exists("/proc/self/status"), reason="bash, Linux")
def test_device_script_dry_run(tmp_path):
    out = tmp_path / "dev"
    proc = subprocess.run(["bash", os.path.join(REPO, "bench", "device.sh"), str(out), "--dry-run"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for name in ("device.log", "summary.txt", "verify.txt", "pip-freeze.txt", "nvidia-smi.txt",
                 "bench/results.json", "bench/table.md", "bench/rows.jsonl"):
        assert (out / name).exists(), name
    summary = (out / "summary.txt").read_text()
    assert "verify rc=0" in summary and "bench rc=0" in summary
    rows = json.load(open(out / "bench" / "results.json"))
    assert any(r["status"] == "ok" and r["impl"] == "ours" for r in rows)
