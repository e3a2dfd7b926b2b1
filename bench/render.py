"""``python -m fusedpg.bench.render [FILES...]``: committed results -> the markdown the README pastes.

Reads result files (results.json or rows.jsonl written by ``fusedpg bench``; default: every ``*.json`` in
bench/results/) and prints, for each (device, commit) found, a heading that states the device (``GPU: <name>`` or
``CPU: <name>``, CPU results flagged as such: they show the code works, not GPU performance) and the commit, the
ratio table, the target lines and the ratio lines (pg, attention, model: ours against the baseline next to the
analytic bound). ``--mode``/``--case`` keep the README table short; ``--heading`` sets the section's title level;
``--plots DIR`` also draws the plots of ``fusedpg bench`` (``plots.py``) from the same rows into DIR.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Dict, List, Optional

from .report import load_rows, markdown_table, ratio_lines, target_lines

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_title(row: Dict) -> str:
    """``GPU: <name>`` / ``CPU: <name>`` from a row's stamp (rows without a device type: the bare name)."""
    kind = {"cuda": "GPU", "cpu": "CPU"}.get(row.get("device_type", ""), "")
    name = row.get("device_name", "unknown device")
    return f"{kind}: {name}" if kind else name


def render(rows: List[Dict], heading: str = "###") -> str:
    sections: Dict = {}
    for row in rows:
        key = (device_title(row), row.get("git_commit", "unknown"))
        sections.setdefault(key, []).append(row)
    out = []
    for (device, commit), group in sections.items():
        first = group[0]
        dirty = "+dirty" if commit.endswith("+dirty") else ""
        out.append(f"{heading} {device}, fusedpg commit `{commit[:12]}{dirty}`\n")
        if first.get("device_type") == "cpu":
            out.append("CPU results: the CPU plans at CPU shapes, to show the suite and the library working; they "
                       "say nothing about GPU performance (see the GPU sections for that).\n")
        out.append(f"torch {first.get('torch_version', '?')}, triton {first.get('triton_version', '?')}"
                   f"{', CUDA ' + first['cuda_version'] if first.get('cuda_version') else ''}, "
                   f"measured {first.get('utc_time', '?')}; time = median of the calls (q20–q80 in the next column), "
                   "memory = peak above the inputs.\n")
        out.append(markdown_table(group) + "\n")
        targets = target_lines(group) + ratio_lines(group)
        if targets:
            out.append("\n".join(f"- {t}" for t in targets) + "\n")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusedpg.bench.render", description=__doc__)
    p.add_argument("files", nargs="*", help=f"result files (default: {RESULTS_DIR}/*.json)")
    p.add_argument("--mode", action="append", help="keep only these modes (repeatable)")
    p.add_argument("--case", action="append", help="keep only these cases (repeatable)")
    p.add_argument("--heading", default="###", help="markdown heading of each section (default ###)")
    p.add_argument("--out", help="write here instead of stdout")
    p.add_argument("--plots", metavar="DIR", help="also write the PNG plots of these rows to DIR")
    args = p.parse_args(argv)
    files = args.files or sorted(glob.glob(os.path.join(RESULTS_DIR, "*.json")))
    if not files:
        print(f"render: no result files (looked in {RESULTS_DIR})", file=sys.stderr)
        return 1
    rows = [r for r in load_rows(files)
            if (not args.mode or r["mode"] in args.mode) and (not args.case or r["case"] in args.case)]
    text = render(rows, args.heading)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    if args.plots:
        from .plots import plot_rows

        paths = plot_rows(rows, args.plots)
        print("plots: " + ("\n       ".join(paths) if paths else "none"), file=sys.stderr)
        return 0 if paths else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
