"""Rows out: environment stamp, JSON/JSONL/CSV writers, the markdown ratio table and the target lines.

A row is long-format: one (case, shape, dtype, mode, impl) with its median and 20/80-quantile milliseconds, its
peak memory above the inputs in bytes, a status ("ok", "missing", "skipped", "oom", "error") and the machine
stamp (device, torch/triton/fusedpg versions, git commit, UTC time) so that a file of rows stands alone.
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from typing import Dict, Iterable, List, Optional, Sequence

import torch

MIB = float(1 << 20)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit(path: Optional[str] = None) -> str:
    """The commit of the checkout holding ``path`` (this package by default), with "+dirty" for local changes to
    tracked files. Outside a git checkout (a copied work tree on a GPU machine): ``FUSEDPG_GIT_COMMIT`` if set,
    else "unknown"."""
    where = path or os.path.dirname(os.path.abspath(__file__))
    fallback = os.environ.get("FUSEDPG_GIT_COMMIT", "").strip() or "unknown"
    try:
        sha = subprocess.run(["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return fallback
    return (sha + "+dirty" if dirty else sha) if sha else fallback


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> Dict:
    """The stamp merged into every row."""
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"{cpu_name()} ({os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads)"
    return {
        "device_type": device, "device_name": name, "torch_version": torch.__version__,
        "triton_version": _version("triton"), "cuda_version": torch.version.cuda or "",
        "fusedpg_version": _version("fusedpg"), "git_commit": git_commit(),
        "utc_time": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python_version": platform.python_version(),
    }


class RowSink:
    """Appends each row to ``rows.jsonl`` as it arrives (a run cut short keeps its rows), then writes
    ``results.json`` and ``results.csv`` at the end."""

    def __init__(self, out_dir: str, env: Dict):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.env, self.rows = out_dir, env, []
        self.jsonl = os.path.join(out_dir, "rows.jsonl")
        open(self.jsonl, "w").close()

    def __call__(self, row: Dict) -> None:
        full = {**row, **self.env}
        self.rows.append(full)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(full) + "\n")

    def finish(self) -> Dict[str, str]:
        paths = {"json": os.path.join(self.out_dir, "results.json"), "csv": os.path.join(self.out_dir, "results.csv")}
        write_json(paths["json"], self.rows)
        write_csv(paths["csv"], self.rows)
        return paths


def write_json(path: str, rows: Sequence[Dict]) -> None:
    with open(path, "w") as f:
        json.dump(list(rows), f, indent=1)
        f.write("\n")


def write_csv(path: str, rows: Sequence[Dict]) -> None:
    fields: List[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def load_rows(paths: Iterable[str]) -> List[Dict]:
    rows: List[Dict] = []
    for path in paths:
        with open(path) as f:
            rows.extend(json.load(f) if path.endswith(".json") else (json.loads(line) for line in f if line.strip()))
    return rows


def _key(row: Dict):
    return row["case"], row["shape"], row["dtype"], row["mode"]


def ratio(ours: Optional[float], theirs: Optional[float]) -> Optional[float]:
    if ours is None or theirs is None or theirs <= 0:
        return None
    return ours / theirs


def _fmt(x: Optional[float], spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _ms(x: Optional[float]) -> str:
    """Milliseconds with three or four significant digits and never an exponent (CPU calls take 10^4 ms)."""
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}" if x >= 0.01 else f"{x:.2g}"


def markdown_table(rows: Sequence[Dict]) -> str:
    """One line per measured row, grouped by (case, shape, dtype, mode); the last two columns divide ours by that
    impl (below 1: ours is faster / smaller). Rows that could not run here for a fixed reason (missing, skipped)
    become one note per case and impl under the table; out-of-memory, errors and time-budget skips stay in place."""
    head = ("| case | shape | dtype | mode | impl | median ms | q20–q80 ms | peak MiB above inputs | TFLOP/s "
            "| ours ÷ impl time | ours ÷ impl memory |")
    lines = [head, "|" + "---|" * 5 + "---:|" * 6]
    groups: Dict = {}
    notes: Dict = {}
    for row in rows:
        if row["status"] in ("missing", "skipped") and "time budget" not in row.get("detail", ""):
            notes.setdefault((row["case"], row["impl"], row["status"], row.get("detail", "")), set()).add(row["mode"])
            continue
        groups.setdefault(_key(row), []).append(row)
    for key, group in groups.items():
        ours = next((r for r in group if r["impl"] == "ours" and r["status"] == "ok"), None)
        for r in group:
            cells = list(key) + [r["impl"]]
            if r["status"] != "ok":
                cells += [f"{r['status']}: {r.get('detail', '')}".replace("|", "/")] + [""] * 5
            else:
                mem = r.get("peak_mem_bytes")
                cells += [
                    _ms(r["median_ms"]), f"{_ms(r['q20_ms'])}–{_ms(r['q80_ms'])}",
                    _fmt(None if mem is None else mem / MIB, ".1f"), _fmt(r.get("tflops"), ".3g"),
                    _fmt(ratio(ours and ours["median_ms"], r["median_ms"])),
                    _fmt(ratio(ours and ours.get("peak_mem_bytes"), mem)),
                ]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    all_modes: Dict[str, set] = {}
    for r in rows:
        all_modes.setdefault(r["case"], set()).add(r["mode"])
    if notes:
        lines.append("")
    for (case, impl, status, detail), modes in notes.items():
        where = "" if modes == all_modes[case] else f" (mode {', '.join(sorted(modes))})"
        lines.append(f"- not measured: {case} / {impl}{where}: {status}, {detail}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    """A stated goal for one measured group. ``metric``: "time_ratio" / "mem_ratio" (``impl`` ÷ ``base``), "ms"
    (``impl``'s median) or "dweight_mem" (``impl``'s peak memory above the inputs ÷ the bytes of ``d_weight`` in the
    input dtype: the floor, since the gradient itself must exist)."""

    device: str
    case: str
    shape: str
    dtype: str
    mode: str
    metric: str
    bound: float
    source: str
    impl: str = "ours"
    base: str = "eager"


_CPU_GOAL = "CPU goal: within 1.2x eager time and a third of its memory"
_LOW_GOAL = "issue 12: ours-low within 1.5x the bytes of d_weight and 1.4x the default plan's time"
_FLOOR_GOAL = "issue 12: ours-low within 1.5x the bytes of d_weight, the default plan within 1.2x the 3-GEMM floor"
_DET_GOAL = "issue 11: determinism costs at most 1.15x on GPU"
_TRUNC_GOAL = "issue 11: top-k/top-p at most 1.3x the untruncated op on GPU"
_FWD_BWD = "fwd+bwd"
TARGETS = (
    *(Target("cpu", case, shape, "fp32", _FWD_BWD, metric, bound, _CPU_GOAL)
      for case, shape in (("linear", "4096x1024x32000"), ("pg", "4096x1024x32000:dapo"))
      for metric, bound in (("time_ratio", 1.2), ("mem_ratio", 1 / 3))),
    *(Target("cpu", case, shape, dtype, _FWD_BWD, metric, bound, _LOW_GOAL, impl="ours-low", base="ours")
      for case, shape in (("linear", "4096x1024x32000"), ("pg", "4096x1024x32000:dapo"))
      for dtype in ("fp32", "bf16") for metric, bound in (("dweight_mem", 1.5), ("time_ratio", 1.4))),
    # docs/peers.md#gpu-targets, recompute design, bf16, H100/H200.
    *(Target("cuda", "linear", s, "bf16", _FWD_BWD, "ms", b, "docs/peers.md#gpu-targets")
      for s, b in (("8192x4096x151936", 60), ("16384x2048x151936", 64), ("8192x4096x128256", 50))),
    *(Target("cuda", "linear", s, "bf16", "fwd", "ms", b, "docs/peers.md#gpu-targets")
      for s, b in (("8192x4096x151936", 16), ("16384x2048x151936", 17), ("8192x4096x128256", 14))),
    *(t for case, shape in (("linear", "8192x4096x151936"), ("pg", "8192x4096x151936:dapo")) for t in (
        Target("cuda", case, shape, "bf16", _FWD_BWD, "dweight_mem", 1.5, _FLOOR_GOAL, impl="ours-low"),
        Target("cuda", case, shape, "bf16", _FWD_BWD, "time_ratio", 1.2, _FLOOR_GOAL, base="floor"))),
    *(Target("cuda", case, "4096x4096x151936", "bf16", _FWD_BWD, "time_ratio", 1.15, _DET_GOAL, impl="ours-det",
             base="ours") for case in ("linear", "logits")),
    Target("cuda", "sampler", "4096x4096x151936", "bf16", _FWD_BWD, "time_ratio", 1.3, _TRUNC_GOAL,
           base="untruncated"),
)
_ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


def _metric_text(t: Target) -> str:
    return {"time_ratio": f"time {t.impl}/{t.base}", "mem_ratio": f"peak memory {t.impl}/{t.base}",
            "ms": f"{t.impl} median ms", "dweight_mem": f"peak memory {t.impl} / bytes of d_weight"}[t.metric]


def _target_value(t: Target, group: Dict[str, Dict]) -> Optional[float]:
    row = group[t.impl]
    if row["status"] != "ok":
        return None
    if t.metric == "ms":
        return row["median_ms"]
    if t.metric == "dweight_mem":
        dweight = row.get("v", 0) * row.get("h", 0) * _ITEMSIZE.get(t.dtype, 0)
        return ratio(row.get("peak_mem_bytes"), dweight or None)
    field = "median_ms" if t.metric == "time_ratio" else "peak_mem_bytes"
    base = group.get(t.base, {})
    return ratio(row.get(field), base.get(field) if base.get("status") == "ok" else None)


def target_lines(rows: Sequence[Dict]) -> List[str]:
    """One line per target whose group was measured: the value, the bound and whether it is met."""
    lines = []
    for t in TARGETS:
        group = {r["impl"]: r for r in rows if r.get("device_type", t.device) == t.device
                 and _key(r) == (t.case, t.shape, t.dtype, t.mode)}
        if t.impl not in group:
            continue
        value = _target_value(t, group)
        verdict = "not measured" if value is None else ("MET" if value <= t.bound else "MISSED")
        lines.append(f"target {t.case} {t.shape} {t.dtype} {t.mode}: {_metric_text(t)} = {_fmt(value, '.3f')} "
                     f"(target <= {t.bound:.3g}, {t.source}): {verdict}")
    return lines


#: Cases whose every measured group gets a ratio line (ours against the baseline, plus the shape's analytic bound).
RATIO_CASES = ("pg", "attention", "model", "trl")


def ratio_lines(rows: Sequence[Dict]) -> List[str]:
    """One line per (case, shape, dtype, mode) of RATIO_CASES where ours and the baseline were measured: ours ÷
    baseline time and memory, the speedup, and the analytic figure the shape carries (``analytic`` field: the ideal
    FLOP ratio of grouped attention, the prompt FLOPs a grouped model step saves)."""
    groups: Dict = {}
    for r in rows:
        if r["case"] in RATIO_CASES:
            groups.setdefault((r.get("device_type", "?"),) + _key(r), []).append(r)
    lines = []
    for (_, case, shape, dtype, mode), group in groups.items():
        ours = next((r for r in group if r["impl"] == "ours"), None)
        base = next((r for r in group if r.get("role") == "baseline"), None)
        if ours is None or base is None:
            continue
        analytic = ours.get("analytic") or base.get("analytic") or ""
        if ours["status"] != "ok" or base["status"] != "ok":
            why = ours if ours["status"] != "ok" else base
            lines.append(f"ratio {case} {shape} {dtype} {mode}: not measured ({why['impl']}: {why['status']})"
                         + (f"; {analytic}" if analytic else ""))
            continue
        t = ratio(ours["median_ms"], base["median_ms"])
        m = ratio(ours.get("peak_mem_bytes"), base.get("peak_mem_bytes"))
        speed = f" (speedup {1 / t:.2f}x)" if t else ""
        lines.append(f"ratio {case} {shape} {dtype} {mode}: ours/{base['impl']} time = {_fmt(t, '.3f')}{speed}, "
                     f"peak memory = {_fmt(m, '.3f')}" + (f"; {analytic}" if analytic else ""))
    return lines


def stamp_line(rows: Sequence[Dict]) -> str:
    """Which machine and code produced rows (the first row's stamp; mixed files list every device/commit)."""
    pairs = sorted({(r.get("device_name", "?"), r.get("git_commit", "?")) for r in rows})
    first = rows[0] if rows else {}
    return "; ".join(f"{d}, commit {c[:12]}{'+dirty' if c.endswith('+dirty') else ''}" for d, c in pairs) + (
        f"; torch {first.get('torch_version', '?')}, triton {first.get('triton_version', '?')}, "
        f"{first.get('utc_time', '?')}")
