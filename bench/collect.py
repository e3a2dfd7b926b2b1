"""``python -m fusedpg.bench.collect SOURCE [--results DIR] [--suffix TEXT]``: a ``bench/device.sh`` run -> committed
result files.

SOURCE is the script's OUTDIR or its ``--pack`` archive (.tgz). Every ``results.json`` under it (floor-linear,
floor-pg, parity-cost, bench) is merged into one ``<device>-<yyyymmdd>-<commit12>[-suffix].json`` in DIR (default
bench/results/, named as its README says), and beside it a ``.md`` holding the rendered tables with their target
lines, then the script's step summary and the tails of the parity, verify and pytest logs; the plots of the floor
and suite steps are copied beside them. Those files are what the README cites.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import sys
import tarfile
import tempfile
from typing import Dict, List, Optional

from .render import RESULTS_DIR, render
from .report import load_rows, write_json

#: Steps whose plots are copied (``<stem>-<step>-<plot>.png``): the memory floor with its N and V sweeps, the suite.
PLOT_STEPS = ("floor-linear", "bench")
#: Logs whose last lines go into the .md, in this order.
LOGS = ("summary.txt", "parity.txt", "verify.txt", "pytest.txt")
TAIL = 40


def device_slug(row: Dict) -> str:
    """``h200`` from "NVIDIA H200", ``cpu`` for CPU rows: the file name's device part."""
    if row.get("device_type") == "cpu":
        return "cpu"
    words = re.findall(r"[a-z0-9]+", row.get("device_name", "gpu").lower())
    words = [w for w in words if w not in ("nvidia", "geforce", "tesla", "sxm", "pcie", "nvl")] or ["gpu"]
    return "-".join(words[:2])


def file_stem(rows: List[Dict], suffix: str = "") -> str:
    first = rows[0]
    day = str(first.get("utc_time", "00000000"))[:10].replace("-", "")
    commit = str(first.get("git_commit", "unknown")).split("+")[0][:12]
    return f"{device_slug(first)}-{day}-{commit}" + (f"-{suffix}" if suffix else "")


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-TAIL:])


def collect(source: str, results_dir: str = RESULTS_DIR, suffix: str = "") -> List[str]:
    """Write the merged rows and the .md; return their paths. ValueError when SOURCE holds no results."""
    with tempfile.TemporaryDirectory() as tmp:
        root = source
        if os.path.isfile(source):
            with tarfile.open(source) as tar:
                if hasattr(tarfile, "data_filter"):  # refuse links and paths that leave tmp (Python >= 3.9.17)
                    tar.extractall(tmp, filter="data")
                else:
                    tar.extractall(tmp)
            root = tmp
        files = sorted(glob.glob(os.path.join(root, "**", "results.json"), recursive=True))
        rows = load_rows(files)
        if not rows:
            raise ValueError(f"SOURCE must be a device.sh OUTDIR or --pack archive holding results.json files, got "
                             f"{source!r} with none")
        stem = os.path.join(results_dir, file_stem(rows, suffix))
        plots = {f"{stem}-{os.path.basename(os.path.dirname(png))}-{os.path.basename(png)}": png
                 for step in PLOT_STEPS for png in sorted(glob.glob(os.path.join(root, step, "*.png")))}
        parts = [render(rows)]
        for name in LOGS:
            path = os.path.join(root, name)
            if os.path.exists(path):
                parts.append(f"#### {name} (last {TAIL} lines)\n\n```\n{_tail(path)}```\n")
        os.makedirs(results_dir, exist_ok=True)
        for dst, src in plots.items():
            shutil.copyfile(src, dst)
    write_json(stem + ".json", rows)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(parts))
    return [stem + ".json", stem + ".md", *plots]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusedpg.bench.collect", description=__doc__)
    p.add_argument("source", help="bench/device.sh OUTDIR, or its --pack .tgz")
    p.add_argument("--results", default=RESULTS_DIR, help=f"where the files go (default {RESULTS_DIR})")
    p.add_argument("--suffix", default="", help="appended to the file name, e.g. 'device'")
    args = p.parse_args(argv)
    try:
        paths = collect(args.source, args.results, args.suffix)
    except ValueError as err:
        print(f"collect: {err}", file=sys.stderr)
        return 2
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
