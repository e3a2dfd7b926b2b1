"""``python -m fusedpg.bench.render [FILES...]``: committed results -> the markdown the README pastes.

Reads result files (results.json or rows.jsonl written by ``fusedpg bench``; default: every ``*.json`` in
bench/results/) and prints, for each (device, commit) found, a heading that states the GPU (or CPU) and the
commit, the ratio table, and the target lines. ``--mode``/``--case`` keep the README table short.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from typing import Dict, List, Optional

from .report import load_rows, markdown_table, target_lines

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def render(rows: List[Dict]) -> str:
    sections: Dict = {}
    for row in rows:
        key = (row.get("device_name", "unknown device"), row.get("git_commit", "unknown"))
        sections.setdefault(key, []).append(row)
    out = []
    for (device, commit), group in sections.items():
        first = group[0]
        out.append(f"### {device}, fusedpg commit `{commit[:12]}{'+dirty' if commit.endswith('+dirty') else ''}`\n")
        out.append(f"torch {first.get('torch_version', '?')}, triton {first.get('triton_version', '?')}"
                   f"{', CUDA ' + first['cuda_version'] if first.get('cuda_version') else ''}, "
                   f"measured {first.get('utc_time', '?')}; time = median of the calls (q20–q80 in the next column), "
                   "memory = peak above the inputs.\n")
        out.append(markdown_table(group) + "\n")
        targets = target_lines(group)
        if targets:
            out.append("\n".join(f"- {t}" for t in targets) + "\n")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusedpg.bench.render", description=__doc__)
    p.add_argument("files", nargs="*", help=f"result files (default: {RESULTS_DIR}/*.json)")
    p.add_argument("--mode", action="append", help="keep only these modes (repeatable)")
    p.add_argument("--case", action="append", help="keep only these cases (repeatable)")
    p.add_argument("--out", help="write here instead of stdout")
    args = p.parse_args(argv)
    files = args.files or sorted(glob.glob(os.path.join(RESULTS_DIR, "*.json")))
    if not files:
        print(f"render: no result files (looked in {RESULTS_DIR})", file=sys.stderr)
        return 1
    rows = [r for r in load_rows(files)
            if (not args.mode or r["mode"] in args.mode) and (not args.case or r["case"] in args.case)]
    text = render(rows)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
