"""Case ``logits``: materialised logits ``[N, V]`` -> per-token log-prob and entropy, with the logits gradient.

For trainers that already hold the logits. The shape's H is unused (kept so both cases share one shape list).
Impls: ``ours`` (fusedpg.logprob_entropy), ``eager`` (upcast, log_softmax, gather, entropy) and ``compile``.
The memory figures include the ``[N, V]`` logits gradient that every impl must produce.
"""
from __future__ import annotations

import functools

import torch

import fusedpg
from fusedpg.logits.reference import logprob_entropy_reference

from .case_linear import LOGIT_STD, compiled, small_on_cpu
from .registry import Case, Impl, Inputs, Shape, register_case


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(shape.n, shape.v, generator=gen, device=device, dtype=dtype).mul_(LOGIT_STD)
    targets = torch.randint(0, shape.v, (shape.n,), generator=gen, device=device)
    g_logp = torch.randn(shape.n, generator=gen, device=device)
    g_entropy = torch.randn(shape.n, generator=gen, device=device).mul_(0.01)
    return Inputs(leaves={"logits": logits.requires_grad_()},
                  extra={"targets": targets, "g_logp": g_logp, "g_entropy": g_entropy})


def _eager_fn(logits, y):
    return logprob_entropy_reference(logits, y, dtype=None)


def _make(fn_of):
    def prepare(inp: Inputs, shape: Shape):
        logits, y = inp["logits"], inp["targets"]
        grads = (inp["g_logp"], inp["g_entropy"])
        fn = fn_of()
        return lambda: (fn(logits, y), grads)

    return prepare


CASE = register_case(Case(
    name="logits",
    description="logits [N,V] -> log-prob + entropy (fusedpg.logprob_entropy)",
    make_inputs=make_inputs,
    impls=(
        Impl("ours", _make(lambda: fusedpg.logprob_entropy), role="ours"),
        Impl("ours-det", _make(lambda: functools.partial(fusedpg.logprob_entropy, deterministic=True)),
             note="deterministic=True: batch-invariant rows", applies=small_on_cpu),
        Impl("eager", _make(lambda: _eager_fn), role="baseline", note="upcast, log_softmax, gather, entropy"),
        Impl("compile", _make(lambda: compiled(_eager_fn)), devices=("cuda",), opt_in=("cpu",), compiles=True,
             note="torch.compile(eager)"),
    ),
))
