"""Case ``sampler``: log-prob + entropy of the truncated sampling distribution (top-k 50, top-p 0.9), forward and
backward, from hidden states and the LM head.

Impls: ``ours`` (``linear_logprob_entropy(..., top_k=50, top_p=0.9)``: a threshold per row found by selection on
each chunk (k-th value, radix passes), no sort), ``eager`` (the dense reference: materialised logits, vLLM's sort
and cumsum, at the input dtype), ``untruncated`` (ours on the full softmax: what truncation costs on top) and
``ours-low`` (``memory="low"``).
"""
from __future__ import annotations

import torch

import fusedpg
from fusedpg.linear.reference import linear_logprob_entropy_reference

from .case_linear import flops, make_inputs
from .registry import SMALL_CPU, Case, Impl, Inputs, Shape, register_case

TOP_K, TOP_P = 50, 0.9


def _make(fn):
    def prepare(inp: Inputs, shape: Shape):
        h, w, y = inp["hidden"], inp["weight"], inp["targets"]
        grads = (inp["g_logp"], inp["g_entropy"])
        return lambda: (fn(h, w, y), grads)

    return prepare


CASE = register_case(Case(
    name="sampler",
    description=f"truncated sampling distribution (top_k={TOP_K}, top_p={TOP_P}): log-prob + entropy from hidden",
    make_inputs=make_inputs,
    impls=(
        Impl("ours", _make(lambda h, w, y: fusedpg.linear_logprob_entropy(h, w, y, top_k=TOP_K, top_p=TOP_P)),
             role="ours"),
        Impl("ours-low", _make(lambda h, w, y: fusedpg.linear_logprob_entropy(h, w, y, top_k=TOP_K, top_p=TOP_P,
                                                                             memory="low")),
             note='memory="low": row tiles of whole logits rows, vocabulary-blocked backward'),
        Impl("eager", _make(lambda h, w, y: linear_logprob_entropy_reference(
            h, w, y, dtype=None, truncation=(TOP_K, TOP_P, None))), role="baseline",
             note="materialised logits, vLLM's sort + cumsum"),
        Impl("untruncated", _make(lambda h, w, y: fusedpg.linear_logprob_entropy(h, w, y)),
             note="ours on the full softmax"),
    ),
    flops=flops,
    presets={("cpu", False): (SMALL_CPU,), ("cpu", True): (Shape(256, 256, 8192),),
             ("cuda", False): (Shape(8192, 4096, 151936),), ("cuda", True): (Shape(2048, 4096, 151936),)},
    modes=("fwd+bwd",),
))
