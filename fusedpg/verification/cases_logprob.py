"""Equivalence cases of the log-prob + entropy primitives: run an op, the eager reference at the same dtype and the
float64 truth on the same inputs and upstream gradients, and compare every output and gradient under the tolerance
model.

Used by the tests and by ``fusedpg verify`` so the two can never drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..linear.reference import linear_logprob_entropy_reference
from ..logits.reference import logprob_entropy_reference
from .tolerance import Comparison, compare


@dataclass(frozen=True)
class LinearCase:
    """Inputs of one linear log-prob + entropy check. ``peaked`` builds a head whose rows copy hidden rows, so the
    softmax is sharp (uniform random data hides masking bugs); ``shift`` adds a constant to every logit.

    temperature:     a float, ``"per-token"`` (a tensor of the leading shape) or ``"tensor"`` (a one-element tensor).
    batch:           > 1 gives 3-D inputs ``[batch, n // batch, ...]``.
    layout:          ``"contiguous"``, ``"transposed"`` or ``"strided"``: the layout of hidden / weight / logits leaves
                     (same values, non-contiguous memory).
    grads:           the inputs that require grad (of ``hidden``, ``weight``, ``bias``; the logits check uses
                     ``logits`` when this is non-empty).
    logp_grad, entropy_grad: which outputs receive an upstream gradient.
    compute_entropy: passed to the op; when False its entropy must be exactly 0 and the upstream entropy gradient
                     must have no effect.
    target_mode:     ``"random"``, or ``"edges"``: targets alternate between 0 and V - 1 (the last, partial tile).
    """

    n: int = 13
    h: int = 24
    v: int = 50
    dtype: torch.dtype = torch.float32
    bias: bool = True
    temperature: object = 1.0  # float, "per-token" or "tensor"
    ignore_frac: float = 0.2
    peaked: bool = False
    shift: float = 0.0
    neg_inf_cols: int = 0
    entropy_grad: bool = True
    seed: int = 0
    logp_grad: bool = True
    batch: int = 1
    layout: str = "contiguous"
    grads: tuple = ("hidden", "weight", "bias")
    compute_entropy: bool = True
    target_mode: str = "random"
    k: int = 0  # > 0: K targets per row (``[n, K]``, a few of them ignored)


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
    if case.target_mode == "edges":
        targets = torch.arange(case.n) % 2 * (case.v - 1)
    elif case.target_mode != "random":
        raise ValueError(f"target_mode must be 'random' or 'edges', got {case.target_mode!r}")
    targets[torch.rand(case.n, generator=g) < case.ignore_frac] = -100
    if case.k:  # K targets per row: the first column as drawn above, the rest random, a few ignored
        extra = torch.randint(0, case.v, (case.n, case.k - 1), generator=g)
        extra[torch.rand(case.n, case.k - 1, generator=g) < case.ignore_frac] = -100
        targets = torch.cat([targets[:, None], extra], 1)
    if case.temperature == "per-token":
        temperature = torch.rand(case.n, generator=g, dtype=torch.float64) * 1.5 + 0.25
    elif case.temperature == "tensor":
        temperature = torch.rand(1, generator=g, dtype=torch.float64) * 1.5 + 0.25
    else:
        temperature = float(case.temperature)
    grad_logp = torch.randn(targets.shape, generator=g, dtype=torch.float64) if case.logp_grad else None
    grad_ent = torch.randn(case.n, generator=g, dtype=torch.float64) if case.entropy_grad else None
    if case.batch > 1:
        if case.n % case.batch:
            raise ValueError(f"batch must divide n, got n={case.n}, batch={case.batch}")
        lead = (case.batch, case.n // case.batch)
        hidden, targets = hidden.reshape(*lead, case.h), targets.reshape(lead)
        grad_logp = None if grad_logp is None else grad_logp.reshape(lead)
        grad_ent = None if grad_ent is None else grad_ent.reshape(lead)
        if case.temperature == "per-token":
            temperature = temperature.reshape(lead)
    cast = lambda x: None if x is None else x.to(case.dtype).to(device)  # noqa: E731
    return dict(
        hidden=cast(hidden), weight=cast(weight), bias=cast(bias), targets=targets.to(device),
        temperature=temperature if isinstance(temperature, float) else temperature.float().to(device),
        grad_logp=grad_logp, grad_ent=grad_ent,
    )


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` (same values) in a non-contiguous layout: ``"transposed"`` memory of the last two dims, or
    ``"strided"``: every other element of the last dim (2-D and 3-D), so no dim has stride 1 where it usually does.
    A 1-D tensor is made strided in both non-contiguous layouts."""
    if layout == "contiguous" or x.numel() == 0:
        return x
    if x.dim() >= 2 and layout == "transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout in ("transposed", "strided"):
        buf = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        out = buf[..., ::2]
        out.copy_(x)
        return out
    raise ValueError(f"layout must be 'contiguous', 'transposed' or 'strided', got {layout!r}")


def _run_named(fn: Callable, tensors: Dict[str, Optional[torch.Tensor]], want: Sequence[str], grad_logp, grad_ent,
               work: torch.dtype, layout: str = "contiguous") -> Dict[str, torch.Tensor]:
    """Run ``fn(**leaves)`` and differentiate ``sum(logp * grad_logp + entropy * grad_ent)`` w.r.t. the leaves named
    in ``want``. Returns ``{"logp", "entropy", "d_<name>" for name in want}``; a gradient autograd leaves unset is
    returned as zeros."""
    leaves = {}
    for name, t in tensors.items():
        if t is None:
            leaves[name] = None
            continue
        x = with_layout(t.detach().to(work), layout)
        leaves[name] = x.requires_grad_(name in want)
    logp, ent = fn(**leaves)
    loss = None
    if grad_logp is not None:
        loss = (logp.double() * grad_logp.to(logp.device)).sum()
    if grad_ent is not None and ent.requires_grad:
        term = (ent.double() * grad_ent.to(ent.device)).sum()
        loss = term if loss is None else loss + term
    out = {"logp": logp, "entropy": ent}
    wanted = [n for n in want if leaves.get(n) is not None]
    if loss is not None and loss.requires_grad and wanted:
        grads = torch.autograd.grad(loss, [leaves[n] for n in wanted], allow_unused=True)
    else:
        grads = [None] * len(wanted)
    for n, gr in zip(wanted, grads):
        out[f"d_{n}"] = torch.zeros_like(leaves[n]) if gr is None else gr
    return out


def _compare_all(prefix: str, case: LinearCase, got, ref_d, ref64) -> List[Comparison]:
    results = []
    for name, ours in got.items():
        if name == "entropy" and not case.compute_entropy:
            # entropy is not computed: it must be exactly zero (ignored rows included)
            zeros = torch.zeros_like(ref64[name])
            results.append(compare(f"{prefix}.{name}", ours, zeros, zeros, case.dtype))
            continue
        results.append(compare(f"{prefix}.{name}", ours, ref_d[name], ref64[name], case.dtype))
    return results


def check_linear(case: LinearCase, impl: Optional[str] = None, device="cpu", op=None,
                 truncation: Optional[dict] = None) -> List[Comparison]:
    """Compare ``linear_logprob_entropy`` (or ``op`` with its signature) against eager-D and float64 truth;
    ``truncation``: top_k / top_p / min_p keywords, scored against the vLLM-style dense reference."""
    from .. import linear_logprob_entropy  # looked up per call: tests swap it on the package

    op = op or linear_logprob_entropy
    x = make_linear_inputs(case, device)
    temp = x["temperature"]
    tensors = {"hidden": x["hidden"], "weight": x["weight"], "bias": x["bias"]}
    want = [n for n in ("hidden", "weight", "bias") if n in case.grads and tensors[n] is not None]
    # with compute_entropy=False no gradient may flow from the entropy output: the references get none
    ref_ent = x["grad_ent"] if case.compute_entropy else None

    trunc = truncation or {}
    ref_trunc = (trunc.get("top_k"), trunc.get("top_p"), trunc.get("min_p")) if trunc else None

    def ours(hidden, weight, bias):
        return op(hidden, weight, x["targets"], bias=bias, temperature=temp, impl=impl,
                  compute_entropy=case.compute_entropy, **trunc)

    def eager(hidden, weight, bias):
        return linear_logprob_entropy_reference(hidden, weight, x["targets"], bias, temp, dtype=None,
                                                truncation=ref_trunc)

    def truth(hidden, weight, bias):
        t = temp.double() if isinstance(temp, torch.Tensor) else temp
        return linear_logprob_entropy_reference(hidden, weight, x["targets"], bias, t, truncation=ref_trunc)

    got = _run_named(ours, tensors, want, x["grad_logp"], x["grad_ent"], case.dtype, case.layout)
    ref_d = _run_named(eager, tensors, want, x["grad_logp"], ref_ent, case.dtype)
    ref64 = _run_named(truth, tensors, want, x["grad_logp"], ref_ent, torch.float64)
    return _compare_all("linear", case, got, ref_d, ref64)


def check_logits(case: LinearCase, impl: Optional[str] = None, device="cpu", inplace: bool = False,
                 deterministic: bool = False) -> List[Comparison]:
    """Compare ``logprob_entropy`` on logits built from the same case against eager-D and float64 truth."""
    from .. import logprob_entropy

    x = make_linear_inputs(case, device)
    logits64 = x["hidden"].double() @ x["weight"].double().T
    if x["bias"] is not None:
        logits64 = logits64 + x["bias"].double()
    logits = logits64.to(case.dtype)
    temp = x["temperature"]
    want = ["logits"] if case.grads else []
    ref_ent = x["grad_ent"] if case.compute_entropy else None

    def ours(logits):
        if inplace:
            logits = logits.clone()  # the in-place backward overwrites its input, so hand it a private buffer
        return logprob_entropy(logits, x["targets"], temperature=temp, impl=impl, inplace_backward=inplace,
                               compute_entropy=case.compute_entropy, deterministic=deterministic)

    def eager(logits):
        return logprob_entropy_reference(logits, x["targets"], temp, dtype=None)

    def truth(logits):
        t = temp.double() if isinstance(temp, torch.Tensor) else temp
        return logprob_entropy_reference(logits, x["targets"], t)

    layout = "contiguous" if inplace else case.layout  # in-place mode requires contiguous logits
    got = _run_named(ours, {"logits": logits}, want, x["grad_logp"], x["grad_ent"], case.dtype, layout)
    ref_d = _run_named(eager, {"logits": logits}, want, x["grad_logp"], ref_ent, case.dtype)
    ref64 = _run_named(truth, {"logits": logits.double()}, want, x["grad_logp"], ref_ent, torch.float64)
    return _compare_all("logits", case, got, ref_d, ref64)
