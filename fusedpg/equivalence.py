"""Equivalence cases: run an op, the eager reference at the same dtype and the float64 truth on the same inputs and
upstream gradients, and compare every output and gradient under the tolerance model.

Used by the tests and by ``fusedpg verify`` so the two can never drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .reference import linear_logprob_entropy_reference, logprob_entropy_reference
from .testing import Comparison, compare


@dataclass(frozen=True)
class LinearCase:
    """Inputs of one linear log-prob + entropy check. ``peaked`` builds a head whose rows copy hidden rows, so the
    softmax is sharp (uniform random data hides masking bugs); ``shift`` adds a constant to every logit."""

    n: int = 13
    h: int = 24
    v: int = 50
    dtype: torch.dtype = torch.float32
    bias: bool = True
    temperature: object = 1.0  # float, or "per-token"
    ignore_frac: float = 0.2
    peaked: bool = False
    shift: float = 0.0
    neg_inf_cols: int = 0
    entropy_grad: bool = True
    seed: int = 0


def make_linear_inputs(case: LinearCase, device="cpu") -> Dict[str, object]:
    g = torch.Generator().manual_seed(case.seed)
    hidden = torch.randn(case.n, case.h, generator=g, dtype=torch.float64)
    weight = torch.randn(case.v, case.h, generator=g, dtype=torch.float64) / case.h ** 0.5
    if case.peaked and case.n:
        rows = torch.randint(0, case.n, (case.v,), generator=g)
        weight = weight + 4.0 * hidden[rows] / case.h ** 0.5
    bias = torch.randn(case.v, generator=g, dtype=torch.float64) if case.bias or case.shift or case.neg_inf_cols else None
    if bias is not None:
        bias = bias + case.shift
        if case.neg_inf_cols:
            bias[torch.randperm(case.v, generator=g)[: case.neg_inf_cols]] = float("-inf")
    targets = torch.randint(0, case.v, (case.n,), generator=g)
    if bias is not None and case.neg_inf_cols:
        # keep targets on finite columns so every truth is finite
        finite = torch.nonzero(torch.isfinite(bias)).squeeze(1)
        targets = finite[torch.randint(0, finite.numel(), (case.n,), generator=g)]
    targets[torch.rand(case.n, generator=g) < case.ignore_frac] = -100
    if case.temperature == "per-token":
        temperature = torch.rand(case.n, generator=g, dtype=torch.float64) * 1.5 + 0.25
    else:
        temperature = float(case.temperature)
    grad_logp = torch.randn(case.n, generator=g, dtype=torch.float64)
    grad_ent = torch.randn(case.n, generator=g, dtype=torch.float64) if case.entropy_grad else None
    cast = lambda x: None if x is None else x.to(case.dtype).to(device)  # noqa: E731
    return dict(
        hidden=cast(hidden), weight=cast(weight), bias=cast(bias), targets=targets.to(device),
        temperature=temperature if isinstance(temperature, float) else temperature.float().to(device),
        grad_logp=grad_logp, grad_ent=grad_ent,
    )


def _run(fn: Callable, tensors: Sequence[Optional[torch.Tensor]], grad_logp, grad_ent, work: torch.dtype):
    leaves = [None if t is None else t.detach().to(work).requires_grad_(True) for t in tensors]
    logp, ent = fn(*leaves)
    loss = (logp.double() * grad_logp.to(logp.device)).sum()
    if grad_ent is not None:
        loss = loss + (ent.double() * grad_ent.to(ent.device)).sum()
    grads = torch.autograd.grad(loss, [x for x in leaves if x is not None], allow_unused=True) if loss.requires_grad else []
    return [logp, ent] + [torch.zeros_like(x) if gr is None else gr for x, gr in zip([x for x in leaves if x is not None], grads)]


def check_linear(case: LinearCase, impl: Optional[str] = None, device="cpu", op=None) -> List[Comparison]:
    """Compare ``linear_logprob_entropy`` (or ``op`` with its signature) against eager-D and float64 truth."""
    from . import linear_logprob_entropy

    op = op or linear_logprob_entropy
    x = make_linear_inputs(case, device)
    temp = x["temperature"]
    names = ["hidden", "weight"] + (["bias"] if x["bias"] is not None else [])
    tensors = [x["hidden"], x["weight"], x["bias"]]

    def ours(h, w, b):
        return op(h, w, x["targets"], bias=b, temperature=temp, impl=impl)

    def eager(h, w, b):
        return linear_logprob_entropy_reference(h, w, x["targets"], b, temp, dtype=None)

    def truth(h, w, b):
        t = temp.double() if isinstance(temp, torch.Tensor) else temp
        return linear_logprob_entropy_reference(h, w, x["targets"], b, t)

    got = _run(ours, tensors, x["grad_logp"], x["grad_ent"], case.dtype)
    ref_d = _run(eager, tensors, x["grad_logp"], x["grad_ent"], case.dtype)
    ref64 = _run(truth, tensors, x["grad_logp"], x["grad_ent"], torch.float64)
    labels = ["logp", "entropy"] + [f"d_{n}" for n in names]
    return [compare(f"linear.{lab}", a, b, c, case.dtype) for lab, a, b, c in zip(labels, got, ref_d, ref64)]


def check_logits(case: LinearCase, impl: Optional[str] = None, device="cpu", inplace: bool = False) -> List[Comparison]:
    """Compare ``logprob_entropy`` on logits built from the same case against eager-D and float64 truth."""
    from . import logprob_entropy

    x = make_linear_inputs(case, device)
    logits64 = x["hidden"].double() @ x["weight"].double().T
    if x["bias"] is not None:
        logits64 = logits64 + x["bias"].double()
    logits = logits64.to(case.dtype)
    temp = x["temperature"]

    def ours(z):
        if inplace:
            z = z.clone()  # the in-place backward overwrites its input, so hand it a private buffer
        return logprob_entropy(z, x["targets"], temperature=temp, impl=impl, inplace_backward=inplace)

    def eager(z):
        return logprob_entropy_reference(z, x["targets"], temp, dtype=None)

    def truth(z):
        t = temp.double() if isinstance(temp, torch.Tensor) else temp
        return logprob_entropy_reference(z, x["targets"], t)

    got = _run(ours, [logits], x["grad_logp"], x["grad_ent"], case.dtype)
    ref_d = _run(eager, [logits], x["grad_logp"], x["grad_ent"], case.dtype)
    ref64 = _run(truth, [logits.double()], x["grad_logp"], x["grad_ent"], torch.float64)
    labels = ["logp", "entropy", "d_logits"]
    return [compare(f"logits.{lab}", a, b, c, case.dtype) for lab, a, b, c in zip(labels, got, ref_d, ref64)]
