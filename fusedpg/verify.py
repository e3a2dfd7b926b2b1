"""``fusedpg verify``: re-check every op and gradient against the float64 reference on this machine."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Iterable, List, Tuple

import torch

from .equivalence import LinearCase, check_linear, check_logits
from .testing import Comparison

# Small but awkward: vocabulary tails, ignored rows, per-token temperature, peaked softmax, shifted logits.
_CASES = (
    LinearCase(n=13, h=24, v=50),
    LinearCase(n=9, h=80, v=257, peaked=True, temperature="per-token"),
    LinearCase(n=7, h=40, v=7, shift=-1e4, bias=True),
    LinearCase(n=5, h=32, v=64, neg_inf_cols=3, temperature=0.5),
)


def _checks(device: str, impl) -> Iterable[Tuple[str, Callable[[LinearCase], List[Comparison]]]]:
    yield "linear_logprob_entropy", lambda c: check_linear(c, impl=impl, device=device)
    yield "logprob_entropy", lambda c: check_logits(c, impl=impl, device=device)
    yield "logprob_entropy[inplace]", lambda c: check_logits(c, impl=impl, device=device, inplace=True)


def run(device: str, impl, dtypes, out=None) -> bool:
    out = sys.stdout if out is None else out  # looked up per call, so redirected / captured stdout is honoured
    rows = []
    for op, check in _checks(device, impl):
        for dtype in dtypes:
            results = [r for case in _CASES for r in check(LinearCase(**{**case.__dict__, "dtype": dtype}))]
            # one table row per (op, dtype, output): the worst case over all shapes
            by_name = {}
            for r in results:
                prev = by_name.get(r.name)
                if prev is None or (not r.ok and prev.ok) or (r.ok == prev.ok and r.ratio > prev.ratio):
                    by_name[r.name] = r
            rows.extend((op, r) for r in by_name.values())
    header = f"{'op':26s} {'output':18s} {'dtype':9s} {'max abs err':>12s} {'ours/eager':>10s}  result"
    print(header, file=out)
    print("-" * len(header), file=out)
    for op, r in rows:
        print(f"{op:26s} {r.name.split('.', 1)[1]:18s} {str(r.dtype).replace('torch.', ''):9s} "
              f"{r.max_abs_err:12.3e} {r.ratio:10.2f}  {'PASS' if r.ok else 'FAIL'}", file=out)
    failed = [r for _, r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed", file=out)
    for r in failed:
        print("  " + r.report(), file=out)
    return not failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fusedpg verify", description=__doc__)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--impl", default=None, choices=["triton", "torch"], help="force a backend")
    parser.add_argument("--dtype", action="append", choices=["fp32", "bf16", "fp16"], help="repeatable")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtypes = [names[d] for d in (args.dtype or ["fp32", "bf16", "fp16"])]
    print(f"fusedpg verify on {device} (impl={args.impl or 'auto'}), torch {torch.__version__}")
    return 0 if run(device, args.impl, dtypes) else 1
