"""Case ``linear``: hidden ``[N, H]`` and LM-head weight ``[V, H]`` -> per-token log-prob and entropy, with
gradients to hidden and weight.

Impls: ``ours`` (fusedpg.linear_logprob_entropy), ``eager`` (the reference with materialised logits at the input
dtype, upcast, log_softmax, gather, entropy: what trainers do today), ``compile`` (torch.compile of eager),
``floor`` (the three GEMMs of the same shapes: logits forward, d_hidden and d_weight backward), and the peers
``liger`` (LigerFusedLinearGRPOLoss, log-prob only, gradients in forward) and ``cce`` (Cut Cross-Entropy's
linear_cross_entropy, log-prob only).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import fusedpg
from fusedpg.linear.reference import linear_logprob_entropy_reference

from .registry import Case, Impl, Inputs, Shape, register_case

#: Logits of the synthetic inputs have this standard deviation. Peaked logits matter for peers whose speed depends
#: on the data (CCE skips gradient tiles whose probabilities are all tiny; with std-1 logits it would skip almost
#: everything and look faster than it is on a real model, apple/ml-cross-entropy#15).
LOGIT_STD = 4.0


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    # Generated in place at the final dtype so no temporary copy raises the process's memory high-water mark.
    hidden = torch.randn(shape.n, shape.h, generator=gen, device=device, dtype=dtype)
    weight = torch.randn(shape.v, shape.h, generator=gen, device=device, dtype=dtype).mul_(LOGIT_STD / shape.h ** 0.5)
    targets = torch.randint(0, shape.v, (shape.n,), generator=gen, device=device)
    # Fixed, non-trivial gradients of both outputs, as a loss on log-prob and an entropy bonus would send.
    g_logp = torch.randn(shape.n, generator=gen, device=device)
    g_entropy = torch.randn(shape.n, generator=gen, device=device).mul_(0.01)
    return Inputs(
        leaves={"hidden": hidden.requires_grad_(), "weight": weight.requires_grad_()},
        extra={"targets": targets, "g_logp": g_logp, "g_entropy": g_entropy},
    )


def flops(shape: Shape, mode: str):
    """Useful FLOPs: 2NHV for the logits GEMM, 4NHV for the two gradient GEMMs (docs/math.md#flop-accounting)."""
    nhv = float(shape.n) * shape.h * shape.v
    return {"fwd": 2 * nhv, "fwd-nograd": 2 * nhv, "bwd": 4 * nhv, "fwd+bwd": 6 * nhv}.get(mode)


def _ours(inp: Inputs, shape: Shape):
    h, w, y = inp["hidden"], inp["weight"], inp["targets"]
    grads = (inp["g_logp"], inp["g_entropy"])
    return lambda: (fusedpg.linear_logprob_entropy(h, w, y), grads)


def _ours_det(inp: Inputs, shape: Shape):
    h, w, y = inp["hidden"], inp["weight"], inp["targets"]
    grads = (inp["g_logp"], inp["g_entropy"])
    return lambda: (fusedpg.linear_logprob_entropy(h, w, y, deterministic=True), grads)


def _ours_low(inp: Inputs, shape: Shape):
    h, w, y = inp["hidden"], inp["weight"], inp["targets"]
    grads = (inp["g_logp"], inp["g_entropy"])
    return lambda: (fusedpg.linear_logprob_entropy(h, w, y, memory="low"), grads)


def small_on_cpu(shape, device):
    """The deterministic mode's cost is measured where a CPU run stays short (every shape on CUDA)."""
    if device == "cpu" and shape.n * shape.v > 1024 * 8192:
        return "CPU runs it at the small shape only (its cost ratio is the point, not the large-shape time)"
    return None


def _eager_fn(h, w, y):
    return linear_logprob_entropy_reference(h, w, y, dtype=None)


def _eager(inp: Inputs, shape: Shape):
    h, w, y = inp["hidden"], inp["weight"], inp["targets"]
    grads = (inp["g_logp"], inp["g_entropy"])
    return lambda: (_eager_fn(h, w, y), grads)


@functools.lru_cache(maxsize=None)
def compiled(fn):
    """One torch.compile wrapper per function and process, so new shapes recompile (or go dynamic) but the
    wrapper and its cache survive across measurements."""
    return torch.compile(fn)


def _compile(inp: Inputs, shape: Shape):
    h, w, y = inp["hidden"], inp["weight"], inp["targets"]
    grads = (inp["g_logp"], inp["g_entropy"])
    fn = compiled(_eager_fn)
    return lambda: (fn(h, w, y), grads)


def _floor(inp: Inputs, shape: Shape):
    # F.linear's autograd runs exactly the two gradient GEMMs (g @ W and g^T @ h), each into a fresh contiguous
    # tensor, so fwd = 1 GEMM, bwd = 2 GEMMs, fwd+bwd = 3: the compute floor of any design that does not recompute.
    h, w = inp["hidden"], inp["weight"]
    g = torch.empty(shape.n, shape.v, dtype=h.dtype, device=h.device).normal_()
    return lambda: ((F.linear(h, w),), (g,))


def _rows_per_sequence(n: int, cap: int = 1024) -> int:
    """Largest divisor of n not above cap: Liger's GRPO loss wants [B, T] sequences."""
    return max(t for t in range(1, min(n, cap) + 1) if n % t == 0)


def _liger(inp: Inputs, shape: Shape):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    h, w, y = inp["hidden"], inp["weight"], inp["targets"]
    t = _rows_per_sequence(shape.n)
    b = shape.n // t
    # beta=0 and no reference model: the bare policy-gradient loss, the closest Liger has to our primitive.
    loss_fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False)
    mask = torch.ones(b, t, device=h.device, dtype=torch.long)
    adv = torch.randn(b, device=h.device)
    one = torch.ones((), device=h.device)

    def fn():
        loss = loss_fn(h.view(b, t, shape.h), w, y.view(b, t), mask, adv)
        loss = loss[0] if isinstance(loss, (tuple, list)) else loss
        return (loss,), (one.to(loss.dtype),)

    return fn


def _cce(inp: Inputs, shape: Shape):
    from cut_cross_entropy import linear_cross_entropy

    h, w, y = inp["hidden"], inp["weight"], inp["targets"]
    g_nll = -inp["g_logp"]  # nll = -logp, so this sends the same gradient as ours receives for log-prob

    def fn():
        return (linear_cross_entropy(h, w, y, reduction="none"),), (g_nll,)

    return fn


CASE = register_case(Case(
    name="linear",
    description="hidden [N,H] @ weight[V,H]^T -> log-prob + entropy (fusedpg.linear_logprob_entropy)",
    make_inputs=make_inputs,
    flops=flops,
    impls=(
        Impl("ours", _ours, role="ours"),
        Impl("ours-low", _ours_low, note='memory="low": vocabulary-blocked backward'),
        Impl("ours-det", _ours_det, note="deterministic=True: batch-invariant rows", applies=small_on_cpu),
        Impl("eager", _eager, role="baseline", note="materialised logits, upcast, log_softmax, gather, entropy"),
        Impl("floor", _floor, role="floor", devices=("cuda",), opt_in=("cpu",),
             note="3 GEMMs of the same shapes (logits, d_hidden, d_weight); no softmax"),
        Impl("cce", _cce, devices=("cuda",), requires=("cut_cross_entropy",), note="log-prob only"),
        Impl("liger", _liger, devices=("cuda",), requires=("liger_kernel",), grads_in_forward=True,
             compiles=True,
             note="LigerFusedLinearGRPOLoss(beta=0): log-prob only, gradients in forward"),
        # Last: its first call per shape compiles, and a time budget should cut it before the others.
        Impl("compile", _compile, devices=("cuda",), opt_in=("cpu",), compiles=True,
             note="torch.compile(eager)"),
    ),
))
