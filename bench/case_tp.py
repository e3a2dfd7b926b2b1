"""Case ``tp``: a vocabulary-parallel LM head on 2 gloo ranks (CPU), log-prob + entropy forward and backward.

This process is rank 0 and is the one measured (time and its own peak memory: per-rank figures); a helper process
is rank 1 and mirrors every call, so each collective has its partner. Each rank holds half of the head's rows.

Impls: ``ours`` (``linear_logprob_entropy(..., vocab_parallel_group=...)``: a local GEMM over the shard, two small
all-reduces of per-row statistics, d_hidden all-reduced in backward), ``ours-det`` (the same with
``deterministic=True``: per-segment states all-gathered and folded in order, README of fusedpg/vocab_parallel) and
``gather`` (the baseline: all-gather the
shards into the full head, then one process's ``linear_logprob_entropy`` on every rank, which is what a trainer
without a vocabulary-parallel loss does). The helper runs with one torch thread.
"""
from __future__ import annotations

import atexit
import os
import tempfile
from datetime import timedelta

import torch
import torch.distributed as dist

import fusedpg

from .case_linear import LOGIT_STD
from .registry import Case, Impl, Inputs, Shape, register_case

WORLD = 2
_IMPLS = ("ours", "gather", "ours-det")
_FWD, _BWD, _QUIT = 1, 2, 3
_STATE = {}


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int, rank: int = 0) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)  # the same full head on every rank; each keeps its rows
    hidden = torch.randn(shape.n, shape.h, generator=gen, device=device, dtype=dtype)
    weight = torch.randn(shape.v, shape.h, generator=gen, device=device, dtype=dtype).mul_(LOGIT_STD / shape.h ** 0.5)
    targets = torch.randint(0, shape.v, (shape.n,), generator=gen, device=device)
    g_logp = torch.randn(shape.n, generator=gen, device=device)
    g_entropy = torch.randn(shape.n, generator=gen, device=device).mul_(0.01)
    shard = torch.tensor_split(weight, WORLD)[rank].clone()
    del weight
    return Inputs(leaves={"hidden": hidden.requires_grad_(), "weight": shard.requires_grad_()},
                  extra={"targets": targets, "g_logp": g_logp, "g_entropy": g_entropy})


def _forward(impl: str, inp: Inputs):
    h, w, y = inp["hidden"], inp["weight"], inp["targets"]
    if impl in ("ours", "ours-det"):
        return fusedpg.linear_logprob_entropy(h, w, y, vocab_parallel_group=dist.group.WORLD,
                                              deterministic=impl == "ours-det")
    parts = [torch.empty_like(w) for _ in range(WORLD)]
    dist.all_gather(parts, w.detach())
    parts[dist.get_rank()] = w  # the own rows stay differentiable: their gradient is this rank's d_weight
    return fusedpg.linear_logprob_entropy(h, torch.cat(parts), y)


def _helper(init: str, threads: int) -> None:
    """Rank 1: replays rank 0's calls (forward, then backward when rank 0's starts) until told to stop."""
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=init, rank=1, world_size=WORLD, timeout=timedelta(minutes=10))
    inputs, outs, command = None, None, torch.zeros(6, dtype=torch.int64)
    while True:
        dist.broadcast(command, src=0)
        kind, impl, n, h, v, seed = command.tolist()
        if kind == _QUIT:
            break
        if kind == _FWD:
            if _STATE.get("helper_key") != (n, h, v, seed):
                inputs = make_inputs(Shape(n, h, v), torch.float32, torch.device("cpu"), seed, rank=1)
                _STATE["helper_key"] = (n, h, v, seed)
            for leaf in inputs.leaves.values():
                leaf.grad = None
            outs = _forward(_IMPLS[impl], inputs)
        elif kind == _BWD and outs is not None:
            torch.autograd.backward(outs, (inputs["g_logp"], inputs["g_entropy"]))
            outs = None
    dist.destroy_process_group()


def _send(*command: int) -> None:
    dist.broadcast(torch.tensor(list(command) + [0] * (6 - len(command)), dtype=torch.int64), src=0)


def _start() -> None:
    if _STATE.get("helper") is not None:
        return
    if dist.is_initialized():
        raise RuntimeError("the tp case needs this process free of another torch.distributed group")
    init = f"file://{tempfile.mkdtemp(prefix='fusedpg-tp-')}/init"
    helper = torch.multiprocessing.get_context("spawn").Process(target=_helper, args=(init, 1), daemon=True)
    helper.start()
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=WORLD, timeout=timedelta(minutes=10))
    _STATE["helper"] = helper
    atexit.register(_stop)  # a run stopped between prepare and teardown


def _stop() -> None:
    helper = _STATE.pop("helper", None)
    if helper is not None and dist.is_initialized():
        _send(_QUIT)
        dist.destroy_process_group()
        helper.join(timeout=30)


def _make(impl: str):
    def prepare(inp: Inputs, shape: Shape):
        _start()
        key = (shape.n, shape.h, shape.v, int(inp.extra.get("seed", torch.tensor(0))))
        grads = (inp["g_logp"], inp["g_entropy"])

        def call():
            _send(_FWD, _IMPLS.index(impl), *key)
            outs = _forward(impl, inp)
            if outs[0].requires_grad:  # rank 1 starts its backward when rank 0's reaches the outputs
                outs[0].register_hook(lambda g: _send(_BWD) or g)
            return outs, grads

        return call

    return prepare


def _inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int) -> Inputs:
    inp = make_inputs(shape, dtype, device, seed)
    inp.extra["seed"] = torch.tensor(seed)
    return inp


def _cpu_only(shape, device):
    if device != "cpu":
        return "2 gloo ranks on CPU; the device machine has one GPU"
    if os.name != "posix":
        return "needs /proc (Linux) for per-rank memory"
    return None


CASE = register_case(Case(
    name="tp",
    description=f"vocabulary-parallel head, {WORLD} gloo ranks: shard + merged statistics vs gather then one process",
    make_inputs=_inputs,
    impls=(
        Impl("ours", _make("ours"), role="ours", devices=("cpu",), applies=_cpu_only,
             note="vocab_parallel_group=: local GEMM, 2 all-reduces of row statistics"),
        Impl("gather", _make("gather"), role="baseline", devices=("cpu",), applies=_cpu_only,
             note="all-gather the head, then one process"),
        Impl("ours-det", _make("ours-det"), devices=("cpu",), applies=_cpu_only,
             note="deterministic=True: per-segment states all-gathered, folded in global segment order"),
    ),
    presets={("cpu", False): (Shape(1024, 256, 16000),), ("cpu", True): (Shape(512, 256, 8000),)},
    modes=("fwd+bwd",),
    teardown=lambda: _stop(),
))
