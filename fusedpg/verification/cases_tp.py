"""Verify group ``tp``: a vocabulary-parallel head on two gloo ranks of this machine's CPU.

Each rank holds half of the head's rows and runs the same verification cases as the ``primitives`` group through
``vocab_parallel_group=`` (the merged log-probs, entropy and every gradient against the float64 reference), plain,
truncated (the thresholds found over the whole vocabulary) and deterministic, on the torch plan; a last check
compares the deterministic results of whole-segment shards with one process bit for bit, on the torch plan and on
the Triton plan (the ranks run the Triton interpreter: they hold CPU tensors). Rank 0 reports.
"""
from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import replace
from typing import List, Tuple

import torch
import torch.distributed as dist

from .tolerance import Comparison

WORLD = 2


def _summed_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """``x`` whose gradient is summed over the ranks: each rank's shard fills its own rows of the full head's
    gradient, so the cases compare the whole ``d_weight`` as they do in one process."""
    def hook(grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad

    if x.requires_grad:
        x.register_hook(hook)
    return x


def _shard_bounds(vocab: int) -> Tuple[int, int]:
    sizes = [len(part) for part in torch.tensor_split(torch.arange(vocab), WORLD)]
    rank = dist.get_rank()
    return sum(sizes[:rank]), sum(sizes[:rank + 1])


def _sharded(**fixed):
    """``linear_logprob_entropy``'s signature, run on this rank's rows of the head over the group."""
    from .. import linear_logprob_entropy

    def op(hidden, weight, targets, bias=None, **kwargs):
        lo, hi = _shard_bounds(weight.shape[0])
        shard = _summed_over_ranks(weight)[lo:hi]
        part = None if bias is None else _summed_over_ranks(bias)[lo:hi]
        return linear_logprob_entropy(hidden, shard, targets, bias=part, vocab_parallel_group=dist.group.WORLD,
                                      **kwargs, **fixed)

    return op


def _bitwise(dtype: torch.dtype, impl: str) -> List[Comparison]:
    """Deterministic mode, two whole 128-column segments per rank: logp, entropy, this rank's d_weight rows and
    d_hidden against one process, ``torch.equal`` (every rank's verdict combined)."""
    from .. import linear_logprob_entropy

    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(40, 32, generator=g).to(dtype)
    weight = (torch.randn(512, 32, generator=g) / 4).to(dtype)
    targets = torch.randint(0, 512, (40,), generator=g)
    temps = torch.rand(40, generator=g) + 0.5

    def run(w, **kw):
        w, h = w.detach().clone().requires_grad_(), hidden.clone().requires_grad_()
        logp, ent = linear_logprob_entropy(h, w, targets, temperature=temps, deterministic=True, impl=impl, **kw)
        (logp.sum() + 0.1 * ent.sum()).backward()
        return logp.detach(), ent.detach(), w.grad, h.grad

    lo, hi = _shard_bounds(weight.shape[0])
    one = run(weight)
    tp = run(weight[lo:hi], vocab_parallel_group=dist.group.WORLD)
    out = []
    for name, a, b in zip(("logp", "entropy", "d_weight", "d_hidden"), tp, (one[0], one[1], one[2][lo:hi], one[3])):
        equal = torch.tensor(int(torch.equal(a, b)))
        dist.all_reduce(equal, op=dist.ReduceOp.MIN)
        err = (a.double() - b.double()).abs().max().item()
        out.append(Comparison(f"bitwise.{name} == 1 process", dtype, err, 0.0, 0.0, (), bool(equal)))
    return out


def _rank_main(rank: int, init: str, path: str, dtypes) -> None:
    from .cases_logprob import LinearCase, check_linear

    # before any kernel module is imported: Triton reads it when a kernel is defined (the ranks hold CPU tensors)
    os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    cases = (LinearCase(n=13, h=24, v=50), LinearCase(n=9, h=40, v=257, temperature="per-token", bias=True))
    rows = []
    for dtype in dtypes:
        for label, fixed, trunc in (("vocab_parallel", {}, None),
                                    ("vocab_parallel[det]", dict(deterministic=True), None),
                                    ("vocab_parallel[trunc]", {}, {"top_k": 20, "top_p": 0.9, "min_p": 0.01})):
            for case in cases:
                rows += [(label, r) for r in check_linear(replace(case, dtype=dtype), impl="torch",
                                                          op=_sharded(**fixed), truncation=trunc)]
        rows += [("vocab_parallel[det,bitwise]", r) for r in _bitwise(dtype, "torch")]
        rows += [("vocab_parallel[det,bitwise,triton]", r) for r in _bitwise(dtype, "triton")]
    if rank == 0:
        with open(path, "wb") as f:
            pickle.dump(rows, f)
    dist.destroy_process_group()
    # a normal interpreter exit after gloo's teardown can abort in a spawned process ("terminate called without an
    # active exception"); the results are written, so leave at once (an exception above still propagates)
    os._exit(0)


def check_tp(dtypes) -> List[Tuple[str, Comparison]]:
    """(op label, comparison) rows of two spawned gloo ranks (CPU), whatever the verify device."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="fusedpg-verify-tp-") as tmp:
        path = os.path.join(tmp, "rows.pkl")
        mp.spawn(_rank_main, args=(f"file://{tmp}/init", path, list(dtypes)), nprocs=WORLD, join=True)
        with open(path, "rb") as f:
            return pickle.load(f)
