"""The benchmark suite: measurement helpers, the case registry, writers, the CLI and bench/device.sh --dry-run.

Everything runs on CPU at tiny shapes; the timing numbers themselves are not checked, only that they exist and
that the memory probe sees an allocation of known size. One torch thread for the whole module: on a loaded
2-core machine every tiny multi-threaded op waits for a time slice (milliseconds each), which made this file take
minutes inside the full suite.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from fusedpg.bench import collect, main, measure, report
from fusedpg.bench.registry import (DEFAULT_DTYPE, DEFAULT_MODES, JUDGED_CPU, SHAPE_PRESETS, Case, Impl, Inputs,
                                    Shape, availability, cases, default_items, items_from_text)
from fusedpg.bench.runner import Plan, Runner, mode_call

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = ("case", "shape", "dtype", "mode", "impl", "status", "median_ms", "q20_ms", "q80_ms", "peak_mem_bytes",
            "device_name", "torch_version", "triton_version", "git_commit", "utc_time")
MIB = 1 << 20
linux_proc = pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
#: Common arguments of the end-to-end run: tiny shapes of every case, one call per measurement.
TINY = ("--device", "cpu", "--shape", "32x16x64", "--shape", "8+2x2", "--reps", "1", "--warmup", "0", "--no-progress")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def test_case_shapes_parse_and_default_run_order():
    reg = cases()
    assert [s.label for s in reg["pg"].parse_shape("64x32x128")] == [f"64x32x128:{t}" for t in
                                                                       ("dapo", "grpo", "clip_cov")]
    assert [s.label for s in reg["pg"].parse_shape("64x32x128:grpo")] == ["64x32x128:grpo"]
    with pytest.raises(ValueError):
        reg["pg"].parse_shape("64x32x128:nope")
    att = reg["attention"].parse_shape("2048+256x16:32/8x128")[0]
    assert (att.prompt, att.completion, att.g, att.hq, att.hkv, att.d) == (2048, 256, 16, 32, 8, 128)
    assert att.ideal_ratio == pytest.approx(16 * (2048 * 2049 / 2 + 2048 * 256 + 256 * 257 / 2)
                                            / (2048 * 2049 / 2 + 16 * (2048 * 256 + 256 * 257 / 2)))
    model = reg["model"].parse_shape("qwen2-0.5b:2048+256x16")[0]
    assert model.fields()["prompt_flops_saved"] == pytest.approx(15 / 16) and model.fields()["ideal_flop_ratio"] > 2
    for name, case in reg.items():  # every label parses back to itself (the memory subprocess relies on it)
        for quick in (False, True):
            for shape in case.preset("cpu", quick) + case.preset("cuda", quick):
                assert [s.label for s in case.parse_shape(shape.label)] == [shape.label], (name, shape)
    # --shape text goes to every case of its form; text no selected case understands is reported.
    items, unknown = items_from_text(["linear", "attention", "model"], ["32x16x64", "8+2x2", "9:9"])
    assert [(c, s.label) for c, s in items] == [("linear", "32x16x64"), ("attention", "8+2x2:4/2x64"),
                                                ("model", "tiny-qwen2:8+2x2")]
    assert unknown == ["9:9"]
    twice, _ = items_from_text(["pg"], ["32x16x64:dapo", "32x16x64"])  # dapo once, then grpo and clip_cov
    assert [s.label for _, s in twice] == ["32x16x64:dapo", "32x16x64:grpo", "32x16x64:clip_cov"]
    # The default CPU run: the two judged shapes first, then small shapes of every case.
    default = [(c, s.label) for c, s in default_items(list(reg), "cpu", False)]
    assert default[:3] == [("linear", "4096x1024x32000"), ("logits", "4096x1024x32000"), ("pg", "4096x1024x32000:dapo")]
    assert {c for c, _ in default} == set(reg)
    assert sum(label.startswith("4096x1024x32000") for _, label in default) == 3  # nothing else that big
    quick = default_items(list(reg), "cpu", True)
    assert {c for c, _ in quick} == set(reg) and all(s.n <= 1024 * 2 for _, s in quick)


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
    pg = [dict(r, case="pg", shape="4096x1024x32000:dapo") for r in rows[:2]]
    pg_targets = report.target_lines(pg)
    assert len(pg_targets) == 2 and all(t.startswith("target pg 4096x1024x32000:dapo fp32 fwd+bwd") for t in pg_targets)
    assert report.ratio_lines(pg) == []  # no baseline role in these rows
    pg[1]["role"] = "baseline"
    assert report.ratio_lines(pg)[0].startswith("ratio pg 4096x1024x32000:dapo fp32 fwd+bwd: ours/eager time = 1.100")
    assert "time ours/eager = 1.100" in targets[0] and targets[0].endswith("MET")
    assert "peak memory ours/eager = 0.250" in targets[1] and targets[1].endswith("MET")
    worse = report.target_lines([_row("ours", 130.0, 200 * MIB), _row("eager", 100.0, 400 * MIB)])
    assert all(t.endswith("MISSED") for t in worse)


def test_issue_targets_low_memory_floor_and_parity_costs():
    """The stated goals of the low-memory plan and of sampler parity come out as target lines of their own pairs."""
    dweight = 32000 * 1024 * 2  # bytes of a bf16 d_weight at the judged CPU shape
    bf16 = {"dtype": "bf16", "n": 4096, "h": 1024, "v": 32000}
    rows = [dict(_row("ours", 100.0, 400 * MIB), **bf16), dict(_row("ours-low", 130.0, int(1.4 * dweight)), **bf16)]
    lines = report.target_lines(rows)
    assert [line.split(": ", 1)[1].split(" (")[0] for line in lines] == [
        "peak memory ours-low / bytes of d_weight = 1.400", "time ours-low/ours = 1.300"]
    assert all(line.endswith("MET") for line in lines)
    rows[1].update(median_ms=150.0, peak_mem_bytes=2 * dweight)
    assert all(line.endswith("MISSED") for line in report.target_lines(rows))
    rows[1]["status"] = "oom"
    assert all(line.endswith("not measured") for line in report.target_lines(rows))

    def gpu(case, impl, ms, shape="4096x4096x151936"):
        return dict(_row(impl, ms, MIB, shape=shape), case=case, dtype="bf16", device_type="cuda")

    parity = [gpu("linear", "ours", 100.0), gpu("linear", "ours-det", 114.0), gpu("sampler", "ours", 140.0),
              gpu("sampler", "untruncated", 100.0), gpu("linear", "floor", 90.0, "8192x4096x151936"),
              gpu("linear", "ours", 120.0, "8192x4096x151936")]
    text = "\n".join(report.target_lines(parity))
    assert "time ours-det/ours = 1.140" in text and "time ours/untruncated = 1.400" in text
    assert "time ours/floor = 1.333" in text and "ours median ms = 120.000" in text
    verdicts = {line.split(":")[1]: line.rsplit(": ", 1)[1] for line in text.splitlines()}
    assert sorted(verdicts.values()) == ["MET", "MISSED", "MISSED", "MISSED"]  # 114 <= 1.15x; 1.4, 1.33, 120 ms not


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


def _run_main(tmp_path, *extra, shapes=("--shape", "32x16x64")):
    out = tmp_path / "out"
    rc = main(["--device", "cpu", *shapes, "--reps", "2", "--warmup", "0", "--out", str(out), "--no-progress",
               *extra])
    rows = json.load(open(out / "results.json")) if (out / "results.json").exists() else []
    return rc, rows, out


def test_main_end_to_end_rows_table_and_plots(tmp_path, capsys):
    """Every case at a tiny shape: rows, the table, the target and ratio lines, plots."""
    out = tmp_path / "out"
    rc = main([*TINY, "--out", str(out)])
    rows = json.load(open(out / "results.json"))
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| case |" in printed and "plots:" in printed
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["case"], r["impl"]) for r in ok} == {
        ("linear", "ours"), ("linear", "eager"), ("logits", "ours"), ("logits", "eager"), ("pg", "ours"),
        ("pg", "eager"), ("attention", "ours"), ("attention", "sdpa"), ("model", "ours"), ("model", "eager"),
        ("model", "fused-loss"), ("tp", "ours"), ("tp", "gather"), ("tp", "ours-det"), ("linear", "ours-det"),
        ("logits", "ours-det"), ("linear", "ours-low"), ("pg", "ours-low"),
        ("sampler", "ours"), ("sampler", "eager"), ("sampler", "untruncated"), ("sampler", "ours-low")}
    assert not torch.distributed.is_initialized()  # the tp case's helper rank and group are gone after its group
    assert {r["mode"] for r in ok if r["case"] == "linear"} == set(DEFAULT_MODES)
    assert {r["mode"] for r in ok if r["case"] in ("pg", "model")} == {"fwd+bwd"}
    assert {r["loss_type"] for r in ok if r["case"] == "pg"} == {"dapo", "grpo", "clip_cov"}
    for r in rows:
        assert all(k in r for k in REQUIRED), r
    assert all(r["median_ms"] > 0 and r["q20_ms"] <= r["median_ms"] <= r["q80_ms"] for r in ok)
    assert all(r["peak_mem_bytes"] is not None for r in ok)
    # Peers that cannot run on CPU are rows with a reason, never dropped.
    skipped = {(r["case"], r["impl"]) for r in rows if r["status"] in ("skipped", "missing")}
    assert skipped >= {("linear", "cce"), ("linear", "liger"), ("linear", "compile"), ("pg", "liger"),
                       ("pg", "compile"), ("pg", "floor"), ("attention", "flex")}
    assert "- not measured: attention / flex" in printed and "- not measured: pg / liger" in printed
    # Ratio lines: pg per loss type; attention and model with their analytic figure.
    for text in ("ratio pg 32x16x64:dapo fp32 fwd+bwd: ours/eager time = ",
                 "ratio attention 8+2x2:4/2x64 fp32 fwd+bwd: ours/sdpa time = ", "ideal FLOP ratio repeated/grouped",
                 "ratio model tiny-qwen2:8+2x2 fp32 fwd+bwd: ours/eager time = ", "prompt FLOPs saved = (G-1)/G"):
        assert text in printed, text
    assert (out / "table.md").exists() and (out / "results.csv").exists()
    assert "ratio attention" in (out / "table.md").read_text()
    if importlib.util.find_spec("matplotlib") is None:
        return
    for name in ("linear_time", "logits_memory", "pg_time", "attention_time", "model_memory"):
        assert (out / f"{name}.png").exists(), name


def test_pg_peers_opt_in_not_applicable_and_missing(tmp_path, monkeypatch):
    """Liger runs on CPU when named (compiled=False), is "not applicable" to clip_cov, and "missing" without it."""
    shapes = ("--shape", "32x16x64:grpo", "--shape", "32x16x64:clip_cov")
    if importlib.util.find_spec("liger_kernel") is not None:
        rc, rows, _ = _run_main(tmp_path, "--case", "pg", "--impl", "ours,liger", "--no-plots", shapes=shapes)
        status = {(r["loss_type"], r["impl"]): (r["status"], r["detail"]) for r in rows}
        assert rc == 0 and status[("grpo", "liger")][0] == "ok"
        assert status[("clip_cov", "liger")][0] == "skipped" and "not applicable" in status[("clip_cov", "liger")][1]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "liger_kernel" else real(name, *a))
    rc, rows, _ = _run_main(tmp_path, "--case", "pg", "--impl", "ours,liger", "--no-plots",
                            shapes=("--shape", "32x16x64:dapo"))
    assert rc == 0 and {(r["impl"], r["status"]) for r in rows} == {("ours", "ok"), ("liger", "missing")}


def test_main_filters_list_and_bad_arguments(tmp_path, capsys):
    rc, rows, _ = _run_main(tmp_path, "--case", "linear", "--impl", "ours,floor", "--mode", "fwd", "--no-plots")
    assert rc == 0
    assert {(r["impl"], r["status"]) for r in rows} == {("ours", "ok"), ("floor", "ok")}  # floor: opt-in on CPU
    assert main(["--list", "--device", "cpu"]) == 0
    assert "case linear" in capsys.readouterr().out
    assert main(["--device", "cpu", "--impl", "nope"]) == 2
    assert main(["--device", "cpu", "--shape", "12x3"]) == 2
    assert main(["--device", "cpu", "--case", "linear", "--shape", "8+2x2"]) == 2  # no selected case has that form


def test_reps_stop_early_and_compiling_impls_run_last():
    from fusedpg.bench import registry

    def slow(inp, shape):
        x = inp["x"]

        def fn():
            time.sleep(0.005)
            return (x * 2,), (torch.ones_like(x),)
        return fn

    case = Case("toy2", "toy", lambda s, d, dev, seed: Inputs(leaves={"x": torch.ones(s.n, requires_grad=True)}),
                impls=(Impl("late", slow, compiles=True), Impl("ours", slow, role="ours")))
    registry._CASES["toy2"] = case
    try:
        rows = []
        plan = Plan(device="cpu", dtype="fp32", cases=["toy2"], shapes=[Shape(8, 1, 1), Shape(16, 1, 1)],
                    modes=["fwd+bwd"], impls=None, reps=10, warmup=0, rep_seconds=0.001, min_reps=2,
                    defer_compiles=True)
        Runner(plan, rows.append).run()
    finally:
        del registry._CASES["toy2"]
    assert [(r["shape"], r["impl"]) for r in rows] == [("8x1x1", "ours"), ("16x1x1", "ours"), ("8x1x1", "late"),
                                                       ("16x1x1", "late")]
    assert all(r["status"] == "ok" and r["reps"] == 2 for r in rows)


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
    rc, rows, _ = _run_main(tmp_path, "--case", "logits", "--mode", "fwd+bwd", "--no-plots", "--reps", "1",
                            "--impl", "ours", "--impl", "eager")
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
    assert "### CPU: test cpu, fusedpg commit `abc123`" in text and "| eager |" in text and "target" in text
    assert "CPU results" in text


@pytest.mark.skipif(shutil.which("bash") is None or not os.path.exists("/proc/self/status"), reason="bash, Linux")
def test_device_script_dry_run(tmp_path):
    """Every step in order under one budget, the archive re-written after each step, and collect's files from it."""
    out, pack = tmp_path / "dev", tmp_path / "ret" / "device.tgz"
    proc = subprocess.run(["bash", os.path.join(REPO, "bench", "device.sh"), str(out), "--dry-run", "--pack",
                           str(pack)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for name in ("device.log", "summary.txt", "verify.txt", "pip-freeze.txt", "nvidia-smi.txt",
                 "floor-linear/results.json", "floor-pg/results.json", "parity-cost/results.json",
                 "bench/results.json", "bench/table.md", "bench/rows.jsonl"):
        assert (out / name).exists(), name
    summary = (out / "summary.txt").read_text()
    steps = [line.split(" rc=")[0] for line in summary.splitlines()]
    assert steps == ["floor-linear", "floor-pg", "parity-cost", "verify", "bench"], summary
    assert all(" rc=0 " in line for line in summary.splitlines()), summary
    rows = json.load(open(out / "bench" / "results.json"))
    assert any(r["status"] == "ok" and r["impl"] == "ours" for r in rows)
    assert {(r["case"], r["impl"]) for r in json.load(open(out / "parity-cost" / "results.json"))
            if r["status"] == "ok"} == {("linear", "ours"), ("linear", "ours-det"), ("logits", "ours"),
                                        ("logits", "ours-det"), ("sampler", "ours"), ("sampler", "untruncated")}
    paths = collect.collect(str(pack), str(tmp_path / "results"), suffix="dry")
    merged = json.load(open(paths[0]))
    assert os.path.basename(paths[0]).startswith("cpu-") and paths[0].endswith("-dry.json")
    assert len(merged) == sum(len(json.load(open(p))) for p in out.glob("*/results.json"))
    md = open(paths[1]).read()
    assert "| case |" in md and "#### summary.txt" in md and "bench rc=0" in md
    assert any(p.endswith("-dry-floor-linear-linear_memory.png") and os.path.getsize(p) > 1000 for p in paths[2:])


def test_device_script_budget_skips_steps(tmp_path):
    """A spent budget skips the remaining steps (and says so) instead of overrunning its caller's timeout."""
    out = tmp_path / "dev"
    proc = subprocess.run(["bash", os.path.join(REPO, "bench", "device.sh"), str(out), "--dry-run", "--budget", "25"],
                          capture_output=True, text=True, timeout=120)
    summary = (out / "summary.txt").read_text()
    assert "bench skipped: budget spent" in summary, summary + proc.stdout[-2000:]
    assert proc.returncode == 0


def test_collect_names_and_refuses():
    rows = [{"device_type": "cuda", "device_name": "NVIDIA H200", "utc_time": "2026-12-01T09:00:00Z",
             "git_commit": "0123456789abcdef0123+dirty"}]
    assert collect.file_stem(rows) == "h200-20261201-0123456789ab"
    assert collect.file_stem([dict(rows[0], device_type="cpu")], "x") == "cpu-20261201-0123456789ab-x"
    assert collect.main([os.path.join(REPO, "docs")]) == 2  # no results.json under it


def _synthetic_rows():
    """Two cases, two shapes, two modes, a spare-styled peer; one shape carries the CPU linear targets."""
    rows = []
    for case, shapes, impls in (("linear", ("1024x256x8192", "4096x1024x32000"), ("ours", "eager", "compile")),
                                ("pg", ("1024x256x8192:dapo", "1024x256x8192:grpo"), ("ours", "eager", "newpeer"))):
        for i, shape in enumerate(shapes):
            n = 1024 * (4 ** i)
            for mode in ("fwd+bwd", "fwd"):
                for k, impl in enumerate(impls):
                    row = _row(impl, 10.0 * (k + 1) * n / 1024, (k + 1) * n * MIB, mode=mode, shape=shape)
                    rows.append(dict(row, case=case, n=n, h=256, v=8192, role="baseline" if impl == "eager"
                                     else row["role"], git_commit="abc123def4567", utc_time="2026-12-01T00:00:00Z"))
    rows.append(dict(rows[0], impl="cce", status="skipped", median_ms=None, peak_mem_bytes=None))  # not plotted
    return rows


def _legend_colours(fig):
    out = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            line = handle.lines[0] if hasattr(handle, "lines") else handle  # errorbar containers hold their line
            out[label] = line.get_color()
    return out


def test_plots_lines_ratio_and_fixed_colours(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from fusedpg.bench import plots
    from fusedpg.bench.registry import all_impl_names
    from fusedpg.bench.render import main as render_main

    figures = {}  # first line of the title ("linear: ours ÷ other impl ...") -> figure
    real_close = plt.close

    def keep(fig):
        figures[fig._suptitle.get_text().split("\n")[0]] = fig
        real_close(fig)

    monkeypatch.setattr(plt, "close", keep)
    paths = plots.plot_rows(_synthetic_rows(), str(tmp_path / "p"))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == sorted(f"{c}_{m}.png" for c in ("linear", "pg") for m in ("time", "memory", "ratio"))
    assert all(os.path.getsize(p) > 10_000 for p in paths)
    # one colour per impl, the same in every figure and case; a ratio line has the colour of the impl divided by
    colours: dict = {}
    for fig in figures.values():
        for label, colour in _legend_colours(fig).items():
            impl = label.split(" ÷ ")[-1]
            if impl in ("parity (1.0)", "stated target"):
                continue
            colours.setdefault(impl, set()).add(colour)
    assert all(len(c) == 1 for c in colours.values()), colours
    assert colours["eager"] == {plots.IMPL_COLORS["eager"]} and colours["ours"] == {plots.IMPL_COLORS["ours"]}
    assert colours["newpeer"] == {plots.impl_style("newpeer")[0]}  # not in the table: a stable spare colour
    # the ratio figure of linear draws parity and the CPU time target (1.2 at 4096x1024x32000) as horizontal lines
    ratio_fig = next(f for k, f in figures.items() if k.startswith("linear:") and "÷" in k)
    flat = {round(line.get_ydata()[0], 3) for ax in ratio_fig.axes for line in ax.get_lines()
            if len(set(line.get_ydata())) == 1}
    assert {1.0, 1.2, 0.333} <= flat
    # every impl of the registry has its own colour and marker
    known = all_impl_names()
    assert set(known) <= set(plots.IMPL_COLORS) and set(known) <= set(plots.IMPL_MARKERS)
    assert len({plots.IMPL_COLORS[i] for i in known}) == len(known)
    assert len({plots.IMPL_MARKERS[i] for i in known}) == len(known)
    # the same plots from a results file
    path = tmp_path / "r.json"
    report.write_json(str(path), _synthetic_rows())
    assert render_main([str(path), "--plots", str(tmp_path / "q")]) == 0
    assert len(os.listdir(tmp_path / "q")) == 6


def test_plots_of_calls_without_memory_above_inputs(tmp_path):
    """Tiny calls can peak at 0 bytes above their inputs: nothing to draw on a log axis, and no crash."""
    pytest.importorskip("matplotlib")
    from fusedpg.bench.plots import plot_rows

    rows = [dict(r, peak_mem_bytes=0) for r in _synthetic_rows() if r["case"] == "linear"]
    rows[0] = dict(rows[0], peak_mem_bytes=None)
    assert len(plot_rows(rows, str(tmp_path))) == 3


def test_default_out_checkout_and_installed(tmp_path, monkeypatch):
    from fusedpg.bench import default_out

    checkout = tmp_path / "src"
    (checkout / "bench").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text('[project]\nname = "fusedpg"\n')
    assert default_out(str(checkout / "bench")) == str(checkout / "bench" / "out")
    installed = tmp_path / "site-packages" / "fusedpg" / "bench"
    installed.mkdir(parents=True)
    (tmp_path / "site-packages" / "pyproject.toml").write_text('[project]\nname = "other"\n')  # not ours
    monkeypatch.chdir(tmp_path)
    assert default_out(str(installed)) == str(tmp_path / "fusedpg-bench-results")
    assert default_out(str(tmp_path / "site-packages" / "fusedpg" / "missing")) == str(
        tmp_path / "fusedpg-bench-results")
    import fusedpg.bench

    if os.path.dirname(os.path.abspath(fusedpg.bench.__file__)) == os.path.join(REPO, "bench"):  # editable
        assert default_out() == os.path.join(REPO, "bench", "out")


def test_help_lists_every_case_its_shape_form_and_the_output_folder(capsys):
    from fusedpg.bench import default_out

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())  # help lines are wrapped
    for case in cases().values():
        assert f"{case.name} --shape {' '.join(case.shape_form.split())}" in flat, case.name
        assert " ".join(case.description.split()) in flat
    assert "trl" in text and default_out() in text
    for jargon in ("judged", "foundation", "preset"):
        assert jargon not in text.lower(), jargon
