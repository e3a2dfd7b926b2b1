"""``fusedpg verify``: re-check every op and gradient against the float64 reference on this machine.

One table row per op, output and dtype: the worst comparison over the cases of ``cases_logprob``, ``cases_pg``
and ``cases_prefix``."""
from __future__ import annotations

import argparse
import sys
from typing import Iterator, Tuple

import torch

from .cases_logprob import LinearCase, check_linear, check_logits
from .tolerance import Comparison

# Small but awkward: vocabulary tails, ignored rows, per-token temperature, peaked softmax, shifted logits.
_CASES = (
    LinearCase(n=13, h=24, v=50),
    LinearCase(n=9, h=80, v=257, peaked=True, temperature="per-token"),
    LinearCase(n=7, h=40, v=7, shift=-1e4, bias=True),
    LinearCase(n=5, h=32, v=64, neg_inf_cols=3, temperature=0.5),
)


def _primitive_rows(device: str, impl, dtypes) -> Iterator[Tuple[str, str, Comparison]]:
    checks = (
        ("linear_logprob_entropy", lambda c: check_linear(c, impl=impl, device=device)),
        ("logprob_entropy", lambda c: check_logits(c, impl=impl, device=device)),
        ("logprob_entropy[inplace]", lambda c: check_logits(c, impl=impl, device=device, inplace=True)),
    )
    for op, check in checks:
        for dtype in dtypes:
            results = [r for case in _CASES for r in check(LinearCase(**{**case.__dict__, "dtype": dtype}))]
            # one table row per (op, dtype, output): the worst case over all shapes
            for r in _worst_by(results, lambda r: r.name).values():
                yield op, r.name.split(".", 1)[1], r


def _pg_rows(device: str, impl, dtypes) -> Iterator[Tuple[str, str, Comparison]]:
    from ..objective import variant_names
    from .cases_pg import check_fused_pg

    for loss_type in variant_names():
        for dtype in dtypes:
            results = check_fused_pg(loss_type, impl=impl, dtype=dtype, device=device, chunk_bytes=1000)
            # one row per variant and dtype: the worst of loss, gradients and metrics
            worst = _worst_by(results, lambda r: "all")["all"]
            yield "fused_linear_pg_loss", f"{loss_type}:{worst.name.split('.', 1)[1]}", worst


def _attention_rows(device: str, impl, dtypes) -> Iterator[Tuple[str, str, Comparison]]:
    from .cases_prefix import verify_cases

    results = verify_cases(device=device, impl=impl, dtypes=dtypes)
    for r in _worst_by(results, lambda r: (r.name.split(".")[-1], r.dtype)).values():
        yield "shared_prefix_attention", r.name.split(".")[-1], r


def _worst_by(results, key) -> dict:
    worst = {}
    for r in results:
        k, prev = key(r), worst.get(key(r))
        if prev is None or (not r.ok and prev.ok) or (r.ok == prev.ok and r.ratio > prev.ratio):
            worst[k] = r
    return worst


GROUPS = {"primitives": _primitive_rows, "pg": _pg_rows, "attention": _attention_rows}


def run(device: str, impl, dtypes, out=None, groups=tuple(GROUPS)) -> bool:
    out = sys.stdout if out is None else out  # looked up per call, so redirected / captured stdout is honoured
    header = f"{'op':26s} {'output':34s} {'dtype':9s} {'max abs err':>12s} {'ours/eager':>10s}  result"
    print(header, file=out)
    print("-" * len(header), file=out)
    rows = []
    for group in groups:
        for op, label, r in GROUPS[group](device, impl, dtypes):
            rows.append(r)
            print(f"{op:26s} {label:34s} {str(r.dtype).replace('torch.', ''):9s} "
                  f"{r.max_abs_err:12.3e} {r.ratio:10.2f}  {'PASS' if r.ok else 'FAIL'}", file=out, flush=True)
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed", file=out)
    for r in failed:
        print("  " + r.report(), file=out)
    return not failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fusedpg verify", description=__doc__)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--impl", default=None, choices=["triton", "torch"], help="force a backend")
    parser.add_argument("--dtype", action="append", choices=["fp32", "bf16", "fp16"], help="repeatable")
    parser.add_argument("--only", action="append", choices=list(GROUPS), help="op groups to check (repeatable)")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtypes = [names[d] for d in (args.dtype or ["fp32", "bf16", "fp16"])]
    print(f"fusedpg verify on {device} (impl={args.impl or 'auto'}), torch {torch.__version__}")
    return 0 if run(device, args.impl, dtypes, groups=tuple(args.only or GROUPS)) else 1
