"""``fusedpg verify``: re-check every op and gradient against a float64 reference on this machine.

Prints one row per op, output and dtype: the worst over small, awkward cases (vocabulary tails, ignored rows,
per-token temperature, peaked softmax, logits near 1e4). Exits 1 when a row fails, 2 when an argument cannot work
here."""
from __future__ import annotations

import argparse
import re
import sys
from typing import Iterator, Optional, Tuple

import torch

from ..backend import resolve_impl, triton_interpreting
from .cases_logprob import LinearCase, check_linear, check_logits
from .tolerance import SLACK, Comparison

# Small but awkward: vocabulary tails, ignored rows, per-token temperature, peaked softmax, shifted logits.
_CASES = (
    LinearCase(n=13, h=24, v=50),
    LinearCase(n=9, h=80, v=257, peaked=True, temperature="per-token"),
    LinearCase(n=7, h=40, v=7, shift=-1e4, bias=True),
    LinearCase(n=5, h=32, v=64, neg_inf_cols=3, temperature=0.5),
)


# vLLM's three truncations at once (top-k, then top-p on the rest, min-p relative to the most likely token)
_TRUNC = {"top_k": 20, "top_p": 0.9, "min_p": 0.01}


def _linear_with(**fixed):
    """``linear_logprob_entropy`` with some keywords fixed (``deterministic=True``, ``memory="low"``)."""
    def op(*args, **kwargs):
        from .. import linear_logprob_entropy

        return linear_logprob_entropy(*args, **fixed, **kwargs)

    return op


def _primitive_rows(device: str, impl, dtypes) -> Iterator[Tuple[str, str, Comparison]]:
    checks = (
        ("linear_logprob_entropy", lambda c: check_linear(c, impl=impl, device=device)),
        ("logprob_entropy", lambda c: check_logits(c, impl=impl, device=device)),
        ("logprob_entropy[inplace]", lambda c: check_logits(c, impl=impl, device=device, inplace=True)),
        ("linear_logprob_entropy[det]",
         lambda c: check_linear(c, impl=impl, device=device, op=_linear_with(deterministic=True))),
        ("logprob_entropy[det]", lambda c: check_logits(c, impl=impl, device=device, deterministic=True)),
        ("linear_logprob_entropy[trunc]", lambda c: check_linear(c, impl=impl, device=device, truncation=_TRUNC)),
        ("linear_logprob_entropy[K=3]", lambda c: check_linear(LinearCase(**{**c.__dict__, "k": 3, "batch": 1}),
                                                               impl=impl, device=device)),
        ("logprob_entropy[K=3]", lambda c: check_logits(LinearCase(**{**c.__dict__, "k": 3, "batch": 1}),
                                                        impl=impl, device=device)),
        # memory="low" (its GEMMs are torch's whatever the impl): plain, and deterministic with the truncated head
        ("linear_logprob_entropy[low]", lambda c: check_linear(c, impl=impl, device=device,
                                                               op=_linear_with(memory="low"))),
        ("linear_logprob_entropy[low,det,trunc]",
         lambda c: check_linear(c, impl=impl, device=device, op=_linear_with(memory="low", deterministic=True),
                                truncation=_TRUNC)),
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


def _seed_rows(device: str, impl, dtypes) -> Iterator[Tuple[str, str, Comparison]]:
    from .cases_seed import check_copo, check_knapsack, check_otr

    for dtype in dtypes:
        for r in _worst_by(check_otr(impl=impl, dtype=dtype, device=device), lambda r: "all").values():
            yield "otr_loss", f"otr:{r.name.split('.', 1)[1]}", r
        for r in check_copo(dtype):
            yield "copo_advantages", "advantages", r
    yield "knapsack_group_sizes", "total value vs exhaustive", _worst_by(check_knapsack(), lambda r: "all")["all"]


def _tp_rows(device: str, impl, dtypes) -> Iterator[Tuple[str, str, Comparison]]:
    """Two gloo ranks on the CPU (torch plan) whatever the device: vocabulary-parallel merges and gradients."""
    from .cases_tp import check_tp

    rows = check_tp(dtypes)
    for op in dict.fromkeys(label for label, _ in rows):
        mine = [r for label, r in rows if label == op]
        for r in _worst_by(mine, lambda r: (r.name.split(".", 1)[1], r.dtype)).values():
            yield op, r.name.split(".", 1)[1], r


GROUPS = {"primitives": _primitive_rows, "pg": _pg_rows, "seed": _seed_rows, "attention": _attention_rows,
          "tp": _tp_rows}
_SLACKS = ", ".join(f"{str(d)[6:]} {SLACK[d]:g}" for d in (torch.float32, torch.bfloat16, torch.float16))
LEGEND = (  # printed under the table and in --help
    "ours/eager = max |ours - float64| / max |eager - float64|, eager being plain PyTorch at the row's dtype\n"
    "(for scale; inf: eager exact, ours not). A row passes when every element has\n"
    "|ours - float64| <= 2 * |eager - float64| + slack * max(1, max |float64|),\n"
    f"slack {_SLACKS}: a ratio above 2 can pass where eager is almost exact.\n"
    "Rows '== 1 process' pass only when torch.equal holds (max abs err is then 0). The vocab_parallel rows\n"
    "(group tp) run 2 gloo ranks on the CPU with the torch plan (the [det,bitwise,triton] rows: the Triton\n"
    "interpreter), whatever --device.")


def run(device: str, impl, dtypes, out=None, groups=tuple(GROUPS)) -> bool:
    out = sys.stdout if out is None else out  # looked up per call, so redirected / captured stdout is honoured
    header = f"{'op':38s} {'output':34s} {'dtype':9s} {'max abs err':>12s} {'ours/eager':>10s}  result"
    print(header, file=out)
    print("-" * len(header), file=out)
    rows = []
    for group in groups:
        for op, label, r in GROUPS[group](device, impl, dtypes):
            rows.append(r)
            print(f"{op:38s} {label:34s} {str(r.dtype).replace('torch.', ''):9s} "
                  f"{r.max_abs_err:12.3e} {r.ratio:10.2f}  {'PASS' if r.ok else 'FAIL'}", file=out, flush=True)
    print("-" * len(header) + "\n" + LEGEND, file=out)
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed", file=out)
    for r in failed:
        print("  " + r.report(), file=out)
    return not failed


def _bad_arguments(device: str, impl: Optional[str]) -> Optional[str]:
    """One line saying which argument cannot work here (expected / given), or None."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        return f"--device must be cpu, cuda or cuda:N, got {device!r}"
    if device != "cpu" and not torch.cuda.is_available():
        return (f"--device {device} needs a CUDA GPU and a CUDA build of torch, got torch {torch.__version__} "
                "with torch.cuda.is_available() False (use --device cpu)")
    if (torch.device(device).index or 0) >= max(1, torch.cuda.device_count()):
        return f"--device {device}: expected a GPU index below {torch.cuda.device_count()}, the GPUs visible"
    if impl == "triton" and device == "cpu" and not triton_interpreting():
        return ("--impl triton needs --device cuda or TRITON_INTERPRET=1 (Triton's CPU interpreter), got --device cpu "
                "without TRITON_INTERPRET (use --impl torch for the CPU plan)")
    try:
        resolve_impl(impl, torch.device(device))
    except ValueError as err:  # FUSEDPG_IMPL unknown, or triton where it cannot run
        return str(err)
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fusedpg verify", description=f"{__doc__.replace('``', '')}\n\n{LEGEND}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--impl", default=None, choices=["triton", "torch"],
                        help="triton (CUDA, or CPU with TRITON_INTERPRET=1) or torch (default: triton on CUDA)")
    parser.add_argument("--dtype", action="append", choices=["fp32", "bf16", "fp16"],
                        help="input dtype, repeatable (default: all three)")
    parser.add_argument("--only", action="append", choices=list(GROUPS),
                        help="repeatable: primitives (log-prob and entropy ops), pg (policy-gradient losses), "
                             "seed (OTR, COPO, Knapsack budgets), attention (shared-prefix attention), tp "
                             "(a vocabulary-parallel head on 2 gloo ranks, CPU); default: all")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bad = _bad_arguments(device, args.impl)
    if bad:
        print(f"fusedpg verify: {bad}", file=sys.stderr)
        return 2
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtypes = [names[d] for d in (args.dtype or ["fp32", "bf16", "fp16"])]
    print(f"fusedpg verify on {device} (impl={args.impl or 'auto'}), torch {torch.__version__}")
    return 0 if run(device, args.impl, dtypes, groups=tuple(args.only or GROUPS)) else 1
