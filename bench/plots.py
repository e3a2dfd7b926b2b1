"""PNG plots of bench rows, three per case: ``<case>_time.png`` (median ms, bars from q20 to q80),
``<case>_memory.png`` (peak MiB above the inputs) and ``<case>_ratio.png`` (ours ÷ each other impl, time and memory,
with parity at 1 and the stated targets of ``report.TARGETS`` as horizontal lines); and where the rows sweep N or V
(at least ``SWEEP_MIN`` sizes, the rest fixed) ``<case>_memory_scaling.png``: peak memory against N and against V
for ours, ours-low, eager, Liger and CCE, beside the bytes of d_weight. ``python -m fusedpg.bench.plots FILES``
draws them from result files.

The x axis holds the case's shapes, smallest first; one panel per mode; each impl keeps the colour and marker of
``IMPL_COLORS`` / ``IMPL_MARKERS`` in every plot. Rows of several runs (devices, commits or dtypes) get one set of
files per run, prefixed by it. Needs matplotlib (the ``bench`` extra); without it ``plot_rows`` says so and returns
no paths.
"""
from __future__ import annotations

import math
import os
import re
import sys
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

from .report import MIB, TARGETS, ratio

#: One colour per impl, the same in every plot (ours blue; its variant cyan; the eager baselines warm colours).
IMPL_COLORS = {
    "ours": "#1f77b4", "ours-prefix": "#17becf", "eager": "#ff7f0e", "sdpa": "#8c564b", "trl": "#e377c2",
    "fused-loss": "#bcbd22", "compile": "#2ca02c", "floor": "#7f7f7f", "liger": "#9467bd", "cce": "#d62728",
    "flex": "#000000", "gather": "#ff9896", "ours-det": "#9edae5",
    "ours-low": "#393b79", "untruncated": "#637939",
}
IMPL_MARKERS = {
    "ours": "o", "ours-prefix": "D", "eager": "s", "sdpa": "v", "trl": "P", "fused-loss": "X", "compile": "^",
    "floor": "*", "liger": "<", "cce": ">", "flex": "h", "gather": "d", "ours-det": "8", "ours-low": "p", "untruncated": "H",
}
#: Impls missing above (a new peer) get a spare style picked by a checksum of the name: stable across plots and runs.
_SPARE = (("#aec7e8", "p"), ("#ffbb78", "H"), ("#98df8a", "d"), ("#c5b0d5", "8"), ("#c49c94", "1"))
_METRICS = (("time", "median ms per call (bars: q20–q80)"), ("memory", "peak MiB above the inputs"))
#: The kinds of plot, as they end the file names.
KINDS = ("time", "memory", "ratio", "memory_scaling")


def impl_style(impl: str) -> Tuple[str, str]:
    """(colour, marker) of an impl."""
    spare = _SPARE[zlib.crc32(impl.encode()) % len(_SPARE)]
    return IMPL_COLORS.get(impl, spare[0]), IMPL_MARKERS.get(impl, spare[1])


def _shapes(rows: Sequence[Dict]) -> List[str]:
    """The shapes of a case, smallest problem first (ties: order of appearance)."""
    size = {}
    for r in rows:
        size.setdefault(r["shape"], (r.get("n") or 0) * max(r.get("h") or 1, 1) * max(r.get("v") or 1, 1))
    return sorted(size, key=lambda s: size[s])  # sorted is stable: equal sizes keep their order


def _impls(rows: Sequence[Dict]) -> List[str]:
    """ours-role impls first, then the baseline, then the rest, each in order of appearance."""
    rank = {"ours": 0, "baseline": 1}
    seen = list(dict.fromkeys(r["impl"] for r in rows))
    role = {r["impl"]: r.get("role", "") for r in rows}
    return sorted(seen, key=lambda i: rank.get(role[i], 2))


def _value(row: Dict, metric: str):
    """Median ms or peak MiB; None where not positive (log axes; a tiny call can peak at 0 bytes above its inputs)."""
    x = row["median_ms"] if metric == "time" else (row.get("peak_mem_bytes") or 0) / MIB
    return x if x and x > 0 else None


def _nan(x):
    return math.nan if x is None else x


def _axes_setup(ax, shapes: Sequence[str], title: str, ylabel: str, ratio_axis: bool = False) -> None:
    from matplotlib.ticker import FuncFormatter, LogFormatter, NullFormatter

    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels(shapes, rotation=20 if len(shapes) > 1 else 0, ha="right" if len(shapes) > 1 else "center",
                       fontsize=8)
    ax.set_xlim(-0.5, len(shapes) - 0.5)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(True, which="major", alpha=0.35)
    if not any(math.isfinite(y) and y > 0 for line in ax.get_lines() for y in line.get_ydata()):
        ax.text(0.5, 0.5, "nothing above 0 to plot", transform=ax.transAxes, ha="center", fontsize=9)
        return
    ax.set_yscale("log", base=2 if ratio_axis else 10)
    if ratio_axis:  # plain numbers (0.25, 0.5, 1, 2) instead of powers of two
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:  # plain numbers (20, 30, 100) instead of 2x10^1; minor ticks labelled only on a short range
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.2, 0.5)))
    ax.tick_params(axis="y", which="both", labelsize=8)


def _offsets(k: int, width: float = 0.07) -> List[float]:
    """Small x offsets so that markers and bars of k lines at one shape do not sit on top of each other."""
    return [(i - (k - 1) / 2) * width for i in range(k)]


def _legend(fig, axes) -> None:
    handles: Dict = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=min(len(handles), 5),
                   fontsize=8, frameon=False)


def _figure(plt, n_modes: int, n_rows: int, title: str):
    fig, axes = plt.subplots(n_rows, n_modes, figsize=(max(7.0, 4.8 * n_modes), 0.8 + 3.6 * n_rows),
                             squeeze=False, layout="constrained")
    fig.suptitle(title, fontsize=10)
    return fig, axes


def _metric_figure(plt, case: str, rows: Sequence[Dict], shapes, modes, metric: str, ylabel: str, stamp: str):
    fig, axes = _figure(plt, len(modes), 1, f"{case}: {ylabel}\n{stamp}")
    for ax, mode in zip(axes[0], modes):
        here = [r for r in rows if r["mode"] == mode]
        impls = _impls(here)
        for impl, dx in zip(impls, _offsets(len(impls))):
            at = {r["shape"]: r for r in here if r["impl"] == impl}
            xs = [i + dx for i in range(len(shapes))]
            ys = [_nan(_value(at[s], metric)) if s in at else math.nan for s in shapes]
            colour, marker = impl_style(impl)
            kw = dict(color=colour, marker=marker, markersize=6, linewidth=1.5, label=impl)
            if metric == "time":
                err = [[_nan(y - at[s]["q20_ms"]) if s in at else math.nan for s, y in zip(shapes, ys)],
                       [_nan(at[s]["q80_ms"] - y) if s in at else math.nan for s, y in zip(shapes, ys)]]
                ax.errorbar(xs, ys, yerr=err, capsize=3, elinewidth=1, **kw)
            else:
                ax.plot(xs, ys, **kw)
        _axes_setup(ax, shapes, mode, ylabel.split(" (")[0])
    _legend(fig, axes.flat)
    return fig


def _targets(case: str, mode: str, metric: str, rows: Sequence[Dict]):
    """The stated ours ÷ eager targets of ``report.TARGETS`` for a shape among these rows (the lines the plot draws
    are ours against each other impl; targets between other pairs are in the report's target lines)."""
    kind = {"time": "time_ratio", "memory": "mem_ratio"}[metric]
    stamps = {(r.get("device_type"), r["dtype"], r["shape"]) for r in rows}
    return [t for t in TARGETS if t.case == case and t.mode == mode and t.metric == kind
            and (t.impl, t.base) == ("ours", "eager") and (t.device, t.dtype, t.shape) in stamps]


def _ratio_figure(plt, case: str, rows: Sequence[Dict], shapes, modes, stamp: str):
    fig, axes = _figure(plt, len(modes), 2, f"{case}: ours ÷ other impl (below 1: ours faster / smaller)\n{stamp}")
    for col, mode in enumerate(modes):
        here = [r for r in rows if r["mode"] == mode]
        role = {r["impl"]: r.get("role", "") for r in here}
        ours = [i for i in _impls(here) if role[i] == "ours"]
        others = [i for i in _impls(here) if role[i] != "ours"]
        pairs = [(a, b) for a in ours for b in others]
        for row_i, (metric, _) in enumerate(_METRICS):
            ax = axes[row_i][col]
            values = [1.0]
            ax.axhline(1.0, color="#555555", linestyle=":", linewidth=1.2, label="parity (1.0)")
            for t in _targets(case, mode, metric, rows):  # a target is stated for one shape: the text names it
                ax.axhline(t.bound, color="#d62728", linestyle="--", linewidth=1.2, label="stated target")
                ax.annotate(f"target ≤ {t.bound:.3g} at {t.shape}", (0.01, t.bound),
                            xycoords=("axes fraction", "data"),
                            xytext=(0, 3), textcoords="offset points", fontsize=7, color="#d62728")
                values.append(t.bound)
            for (a, b), dx in zip(pairs, _offsets(len(pairs))):
                at = {(r["impl"], r["shape"]): r for r in here}
                ys = [ratio(_value(at[(a, s)], metric), _value(at[(b, s)], metric))
                      if (a, s) in at and (b, s) in at else None for s in shapes]
                colour, marker = impl_style(b)  # the colour and marker of the impl we divide by
                xs = [i + dx for i in range(len(shapes))]
                plain = a == "ours"  # a variant of ours (ours-prefix): hollow markers, dashed line
                ax.plot(xs, [_nan(y) for y in ys], color=colour, marker=marker, markersize=7,
                        markerfacecolor=colour if plain else "white", linestyle="-" if plain else "--",
                        linewidth=1.5, label=f"{a} ÷ {b}")
                for x, y in zip(xs, ys):
                    if y is not None:
                        values.append(y)
                        ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 7), ha="center",
                                    fontsize=7, color=colour,
                                    bbox=dict(boxstyle="round,pad=0.1", facecolor="white", edgecolor="none", alpha=0.8))
            lo, hi = min(values), max(values)
            ax.set_ylim(lo / 1.6, hi * 1.6)
            _axes_setup(ax, shapes, f"{mode}: {metric}", f"ours ÷ impl, {metric}", ratio_axis=True)
    _legend(fig, axes.flat)
    return fig


#: Impls of the memory-scaling plot (those without rows in a run, like the CUDA-only peers on CPU, are left out).
SCALING_IMPLS = ("ours", "ours-low", "eager", "liger", "cce")
#: Fewest sizes that make a sweep: two points of a default run (the judged and the small shape) show no trend.
SWEEP_MIN = 3
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _sweeps(rows: Sequence[Dict]) -> List[Tuple[str, List[Dict]]]:
    """[("n", rows), ("v", rows)]: for each of N and V, the rows of the longest sweep over it (the other sizes and
    the loss type fixed, at least ``SWEEP_MIN`` sizes); absent where the rows hold none."""
    out = []
    for axis in ("n", "v"):
        groups: Dict[Tuple, List[Dict]] = {}
        for r in rows:
            if r.get("n") and r.get("v"):
                fixed = tuple(r.get(k) for k in ("n", "h", "v", "loss_type") if k != axis)
                groups.setdefault(fixed, []).append(r)
        best = max(groups.values(), key=lambda g: len({r[axis] for r in g}), default=[])
        if len({r[axis] for r in best}) >= SWEEP_MIN:
            out.append((axis, best))
    return out


def _scaling_figure(plt, case: str, rows: Sequence[Dict], modes, sweeps, stamp: str):
    """Peak memory above the inputs against N and against V (log-log), with the bytes of d_weight in the input
    dtype (the floor of any plan that returns it) and 1.5x of them (the low-memory target) as references."""
    fig, axes = _figure(plt, len(sweeps), len(modes), f"{case}: extra peak memory against N and V\n{stamp}")
    for row_axes, mode in zip(axes, modes):
        for ax, (axis, sweep) in zip(row_axes, sweeps):
            here = [r for r in sweep if r["mode"] == mode]
            sizes = sorted({r[axis] for r in here})
            first = here[0] if here else sweep[0]
            fixed = ", ".join(f"{k.upper()}={first[k]}" for k in ("n", "h", "v") if k != axis)
            values = []
            for impl in (i for i in SCALING_IMPLS if any(r["impl"] == i for r in here)):
                at = {r[axis]: r for r in here if r["impl"] == impl}
                ys = [_nan(_value(at[x], "memory")) if x in at else math.nan for x in sizes]
                colour, marker = impl_style(impl)
                ax.plot(sizes, ys, color=colour, marker=marker, markersize=6, linewidth=1.5, label=impl)
                values += [y for y in ys if math.isfinite(y)]
            itemsize = _DTYPE_BYTES.get(first["dtype"])
            if itemsize and values:
                dw = [first["h"] * (x if axis == "v" else first["v"]) * itemsize / MIB for x in sizes]
                ax.plot(sizes, dw, color="#555555", linestyle=":", linewidth=1.2, label="bytes of d_weight")
                ax.plot(sizes, [1.5 * y for y in dw], color="#d62728", linestyle="--", linewidth=1.2,
                        label="1.5x d_weight (low-memory target)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes)
            ax.set_xticklabels([str(x) for x in sizes], fontsize=8)
            ax.set_xlabel(f"{axis.upper()} ({fixed})", fontsize=9)
            ax.set_title(mode, fontsize=10)
            ax.set_ylabel("peak MiB above the inputs", fontsize=9)
            ax.grid(True, which="major", alpha=0.35)
            if values:  # plain numbers (20, 30, 100), as in the other plots
                from matplotlib.ticker import LogFormatter

                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
                ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.2, 0.5)))
                ax.tick_params(axis="y", which="both", labelsize=8)
            else:
                ax.text(0.5, 0.5, "nothing above 0 to plot", transform=ax.transAxes, ha="center", fontsize=9)
    _legend(fig, axes.flat)
    return fig


def _runs(rows: Sequence[Dict]) -> Dict[str, List[Dict]]:
    """Rows per run (device, commit, dtype); the file prefix of each ("" when there is only one)."""
    runs: Dict[Tuple, List[Dict]] = {}
    for r in rows:
        runs.setdefault((r.get("device_type", ""), r.get("git_commit", "")[:12], r["dtype"]), []).append(r)
    if len(runs) == 1:
        return {"": next(iter(runs.values()))}
    return {re.sub(r"[^\w.+-]", "", "-".join(k)) + "_": v for k, v in runs.items()}


def plot_rows(rows: Sequence[Dict], out_dir: str, kinds: Sequence[str] = KINDS, prefix: str = "") -> List[str]:
    """Write the ``kinds`` of plot of each case in these rows to out_dir as ``<prefix><run><case>_<kind>.png``
    (``memory_scaling`` only where the rows sweep N or V); the paths written."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        print("fusedpg bench: matplotlib is not installed (pip install 'fusedpg[bench]'): no plots", file=sys.stderr)
        return []
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for run_prefix, run in _runs([r for r in rows if r["status"] == "ok"]).items():
        first = run[0]
        stamp = (f"{first.get('device_name', '?')}, {first['dtype']}, commit {first.get('git_commit', '?')[:12]}, "
                 f"{first.get('utc_time', '')[:10]}")
        for case in dict.fromkeys(r["case"] for r in run):
            case_rows = [r for r in run if r["case"] == case]
            shapes, modes = _shapes(case_rows), list(dict.fromkeys(r["mode"] for r in case_rows))
            figures = [(metric, _metric_figure(plt, case, case_rows, shapes, modes, metric, label, stamp))
                       for metric, label in _METRICS if metric in kinds]
            if "ratio" in kinds:
                figures.append(("ratio", _ratio_figure(plt, case, case_rows, shapes, modes, stamp)))
            sweeps = _sweeps(case_rows) if "memory_scaling" in kinds else []
            if sweeps:
                figures.append(("memory_scaling", _scaling_figure(plt, case, case_rows, modes, sweeps, stamp)))
            for name, fig in figures:
                path = os.path.join(out_dir, f"{prefix}{run_prefix}{case}_{name}.png")
                fig.savefig(path, dpi=120)
                plt.close(fig)
                paths.append(path)
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m fusedpg.bench.plots FILES``: the plots of result files, next to the first one by default."""
    import argparse

    from .report import load_rows

    p = argparse.ArgumentParser(prog="python -m fusedpg.bench.plots", description=main.__doc__)
    p.add_argument("files", nargs="+", help="results.json or rows.jsonl files of fusedpg bench")
    p.add_argument("--kind", action="append", choices=KINDS, help="only these plots (repeatable; default: all)")
    p.add_argument("--out", help="output folder (default: that of the first file)")
    p.add_argument("--prefix", help="file name prefix (default: the first file's name without extension, and '-')")
    args = p.parse_args(argv)
    first = args.files[0]
    prefix = args.prefix if args.prefix is not None else os.path.splitext(os.path.basename(first))[0] + "-"
    paths = plot_rows(load_rows(args.files), args.out or os.path.dirname(os.path.abspath(first)),
                      args.kind or KINDS, prefix)
    print("plots: " + ("\n       ".join(paths) if paths else "none"))
    return 0 if paths else 1


if __name__ == "__main__":
    sys.exit(main())
