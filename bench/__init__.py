"""``fusedpg bench``: time and peak memory of fusedpg's ops against the eager reference and named peers.

What is measured, per (case, shape, dtype, mode, impl), all impls on the same inputs in one process:
  * time of one call: median and 20/80 quantiles (CUDA: triton.testing.do_bench; CPU: perf_counter over
    warm-up + a few reps, impls interleaved);
  * peak memory of that call above what was resident before it (inputs; for ``bwd`` also the forward's graph):
    CUDA max_memory_allocated, CPU the process's VmHWM after a reset through /proc/self/clear_refs (or, where that
    file is not writable, VmHWM of a fresh subprocess per measurement).
Cases and impls live in ``registry.py`` and the ``case_*.py`` modules; ``--help`` lists the registered cases with
their shape forms and default modes (``_description``), ``--list`` what runs here and why not.
"""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import List, Optional

__all__ = ["main", "default_out"]


def _split(values: Optional[List[str]]) -> List[str]:
    return [v.strip() for value in (values or []) for v in value.split(",") if v.strip()]


def default_out(package_dir: Optional[str] = None) -> str:
    """Where a run writes without --out: ``bench/out/`` (gitignored) when this package is the ``bench/`` folder of a
    fusedpg source checkout (an editable install), else ``fusedpg-bench-results/`` in the current folder."""
    here = package_dir or os.path.dirname(os.path.abspath(__file__))
    try:
        with open(os.path.join(here, os.pardir, "pyproject.toml")) as f:
            checkout = 'name = "fusedpg"' in f.read()
    except OSError:
        checkout = False
    return os.path.join(here, "out") if checkout else os.path.join(os.getcwd(), "fusedpg-bench-results")


def _description() -> str:
    """The --help text. It lists the registered cases, so it imports them (and torch): only when help is shown."""
    from .registry import MODES, cases

    def block(first: str, text: str) -> str:
        return textwrap.fill(text, 115, initial_indent=first, subsequent_indent=" " * 13)

    listed = "\n".join(block(f"  {c.name:10s} ", f"--shape {c.shape_form}; default modes {','.join(c.modes)}") + "\n"
                       + block(" " * 13, c.description) for c in cases().values())
    modes = textwrap.fill("Modes (--mode): " + "; ".join(f"{k}: {v}" for k, v in MODES.items()) + ".", 115)
    return f"""Times fusedpg's ops and measures their peak memory against eager PyTorch and peer libraries (Liger,
Cut Cross-Entropy, torch.compile, SDPA, FlexAttention, TRL), every impl on the same inputs. Impls that cannot run
here are reported with the reason, not dropped; --list shows which run on this machine.

Cases (--case NAME), the form of their --shape and their default --mode:
{listed}

A --shape replaces the default shapes of every selected case whose form it has; a selected case with no --shape of
its form is not run.
{modes}

Default run: on CPU, fp32: linear, logits and pg at 4096x1024x32000 (where ours must stay within 1.2x eager's time
and 1/3 of its memory) and small shapes of every case, about 9 minutes on 2 cores; --quick: small shapes only,
about 2 minutes. On CUDA, bf16 at LLM-sized shapes.

Output folder (--out; default here: {default_out()}):
  rows.jsonl (each row as measured), results.json and results.csv, table.md (the ratio table and target lines,
  also printed), <case>_time.png, <case>_memory.png and <case>_ratio.png (plots need matplotlib: pip install
  'fusedpg[bench]'; --no-plots skips them)."""


class _Parser(argparse.ArgumentParser):
    def format_help(self) -> str:
        self.description = _description()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fusedpg bench", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes (CPU: well under 5 minutes)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--case", action="append", help="case names, comma-separated or repeated (default: all)")
    p.add_argument("--shape", action="append",
                   help="repeatable; each case's form is listed above")
    p.add_argument("--impl", action="append",
                   help="impl names, comma-separated or repeated (default: all that run on this device; --list shows "
                        "them); naming an opt-in impl such as "
                        "'compile' on CPU turns it on")
    p.add_argument("--mode", action="append",
                   help="fwd+bwd, fwd, bwd, fwd-nograd, comma-separated or repeated (default: each case's, above)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--reps", type=int,
                   help="timed calls per measurement (default: CPU 5, or 3 once a measurement's calls took 10 s; "
                        "about 10 on CUDA)")
    p.add_argument("--warmup", type=int, default=1, help="CPU warm-up calls per impl (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--max-minutes", type=float, help="stop starting measurements after this long (rows say so)")
    p.add_argument("--out", default=None, help="output folder (default: see above)")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.add_argument("--list", action="store_true", help="list cases, impls (and whether they run here), modes, shapes")
    p.add_argument("--_child", help=argparse.SUPPRESS)  # the memory subprocess of measure.py's fallback
    return p


def _list(device: str) -> None:
    from .registry import MODES, availability, cases

    for case in cases().values():
        print(f"case {case.name}: {case.description}")
        for impl in case.impls:
            status, detail = availability(impl, device, None)
            print(f"  {impl.name:8s} [{impl.role}] {status} on {device}{': ' + detail if detail else ''}")
    print("modes: " + ", ".join(f"{k} ({v})" for k, v in MODES.items()))
    for case in cases().values():
        print(f"case {case.name}: shape form {case.shape_form}; default modes {','.join(case.modes)}")
        for dev in ("cpu", "cuda"):
            for quick in (False, True):
                shapes = case.preset(dev, quick)
                print(f"  shapes {dev}{' --quick' if quick else ''}: " + (" ".join(s.label for s in shapes) or "-"))


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from . import measure
    from .registry import DEFAULT_DTYPE, MODES, all_impl_names, cases, default_items, items_from_text

    if args._child:
        from .runner import child_main

        return child_main(args._child)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("fusedpg bench: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.list:
        _list(device)
        return 0
    registry = cases()
    names, modes = _split(args.case) or list(registry), _split(args.mode) or None
    impls = _split(args.impl)
    for label, chosen, known in (("case", names, registry), ("mode", modes or [], MODES),
                                 ("impl", impls, all_impl_names())):
        bad = [c for c in chosen if c not in known]
        if bad:
            print(f"fusedpg bench: unknown --{label} {bad}; known: {sorted(known)}", file=sys.stderr)
            return 2
    texts = _split(args.shape)
    if texts:
        items, unknown = items_from_text(names, texts)
        if unknown:
            forms = "; ".join(f"{n}: {registry[n].shape_form}" for n in names)
            print(f"fusedpg bench: --shape {unknown} has the form of no selected case ({forms})", file=sys.stderr)
            return 2
        idle = [n for n in names if all(c != n for c, _ in items)]
        if idle:
            print(f"fusedpg bench: no --shape of their form for case(s) {', '.join(idle)}: not run")
    else:
        items = default_items(names, device, args.quick)
    return _run(args, device, names, items, modes, impls or None, DEFAULT_DTYPE, measure)


def _run(args, device, names, items, modes, impls, default_dtype, measure) -> int:
    from .plots import plot_rows
    from .progress import Progress
    from .report import RowSink, environment, markdown_table, ratio_lines, stamp_line, target_lines
    from .runner import Plan, Runner

    memory = "clear_refs" if device == "cuda" or measure.clear_refs_writable() else "subprocess"
    cpu_default_reps = device == "cpu" and args.reps is None
    plan = Plan(device=device, dtype=args.dtype or default_dtype[device], cases=names, shapes=[], modes=modes,
                impls=impls, reps=args.reps or (5 if device == "cpu" else 10), warmup=args.warmup, seed=args.seed,
                max_seconds=None if args.max_minutes is None else 60 * args.max_minutes, memory=memory, items=items,
                rep_seconds=10.0 if cpu_default_reps else None, min_reps=3, defer_compiles=device == "cuda")
    out = os.path.abspath(args.out or default_out())
    env = environment(device)
    sink = RowSink(out, env)
    runner = Runner(plan, sink)
    runner.progress = Progress(runner.count(), enabled=not args.no_progress)
    print(f"fusedpg bench on {env['device_name']} ({plan.dtype}; torch {env['torch_version']}, "
          f"triton {env['triton_version']}, commit {env['git_commit'][:12]})")
    shown = ", ".join(f"{c} {s.label}" for c, s in items)
    print(f"  {shown}; modes {','.join(modes) if modes else 'per case'}; "
          f"{plan.reps} reps" + (" (3 once 10 s are spent)" if plan.rep_seconds else "")
          + (f" after {plan.warmup} warm-up" if device == "cpu" else " (do_bench)")
          + ("; CPU peak memory from a fresh subprocess per measurement (clear_refs not writable)"
             if memory == "subprocess" else ""), flush=True)
    try:
        runner.run()
    finally:
        runner.progress.close()
        files = sink.finish()
    table = markdown_table(sink.rows)
    targets = target_lines(sink.rows) + ratio_lines(sink.rows)
    files["table"] = os.path.join(out, "table.md")
    with open(files["table"], "w") as f:
        f.write(f"# fusedpg bench\n\n{stamp_line(sink.rows)}\n\n{table}\n\n" + "\n".join(f"- {t}" for t in targets)
                + "\n")
    print("\n" + table + "\n")
    for line in targets:
        print(line)
    try:
        plots = [] if args.no_plots else plot_rows(sink.rows, out)
    except Exception as err:  # a plotting failure must not cost a finished run its summary
        print(f"fusedpg bench: no plots ({type(err).__name__}: {err}); rows and table are written", file=sys.stderr)
        plots = []
    print("\nrows:  " + files["json"] + "\n       " + files["csv"] + "\ntable: " + files["table"])
    print("plots: " + ("\n       ".join(plots) if plots else "none"))
    failed = [r for r in sink.rows if r["role"] == "ours" and r["status"] == "error"]
    return 1 if failed else 0
