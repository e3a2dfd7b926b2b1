"""PNG plots of median time and peak memory against N, one figure per case and metric, one panel per mode.

Each line is one impl at one ``series`` (everything but N: H and V, the loss type, the heads); error bars span the
20/80 quantiles. Needs matplotlib (the ``bench`` extra);
without it ``plot_rows`` says so and returns no paths.
"""
from __future__ import annotations

import os
import sys
from typing import Dict, List, Sequence

from .report import MIB


def plot_rows(rows: Sequence[Dict], out_dir: str) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        print("fusedpg bench: matplotlib is not installed (pip install 'fusedpg[bench]'): no plots", file=sys.stderr)
        return []
    ok = [r for r in rows if r["status"] == "ok"]
    paths = []
    for case in dict.fromkeys(r["case"] for r in ok):
        case_rows = [r for r in ok if r["case"] == case]
        modes = list(dict.fromkeys(r["mode"] for r in case_rows))
        stamp = f"{case_rows[0].get('device_name', '')}, {case_rows[0]['dtype']}"
        for metric, label in (("time", "median ms (q20–q80)"), ("memory", "peak MiB above inputs")):
            fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
            for ax, mode in zip(axes[0], modes):
                series: Dict = {}
                for r in case_rows:
                    if r["mode"] == mode:
                        series.setdefault((r["impl"], r.get("series") or f"H={r['h']} V={r['v']}"), []).append(r)
                for (impl, fixed), pts in sorted(series.items()):
                    pts = sorted(pts, key=lambda r: r["n"])
                    xs = [r["n"] for r in pts]
                    name = f"{impl} {fixed}"
                    if metric == "time":
                        ys = [r["median_ms"] for r in pts]
                        err = [[y - r["q20_ms"] for y, r in zip(ys, pts)], [r["q80_ms"] - y for y, r in zip(ys, pts)]]
                        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
                    else:
                        # log axis: only positive peaks
                        mem = [(r["n"], r["peak_mem_bytes"] / MIB) for r in pts if r.get("peak_mem_bytes")]
                        if mem:
                            ax.plot(*zip(*mem), marker="o", label=name)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("N (tokens; attention/model: tokens of the repeated batch)")
                ax.set_ylabel(label)
                ax.set_title(f"{case} {mode}")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
            fig.suptitle(stamp, fontsize=9)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{case}_{metric}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths
