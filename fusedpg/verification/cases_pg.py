"""Equivalence cases of the fused PG loss, shared by the tests and ``fusedpg verify``: the fused loss against the
materialised float64 reference, with the eager same-dtype run as the yardstick of the tolerance model."""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ..linear.reference import linear_logprob_entropy_reference
from ..linear_pg.reference import fused_linear_pg_loss_reference
from .cases_objective import make_case
from .tolerance import Comparison, compare

_TENSOR_KEYS = ("old_entropy", "group_ids", "step_ids", "token_weights", "truncated")
METRICS = ("clip_low", "clip_high", "clip_region", "ppo_kl", "kl", "entropy", "ratio_mean", "tokens")


def fused_inputs(loss_type: str, *, batch: int = 4, width: int = 6, h: int = 24, v: int = 50, seed: int = 0,
                 bias: bool = True, temperature: float = 1.0) -> Dict[str, object]:
    """A head and a batch for ``loss_type``: old/ref/rollout log-probs are drawn around the *current* policy's
    float64 log-probs, so ratios land on both sides of the clip bounds."""
    t, opts = make_case(loss_type, batch=batch, width=width, seed=seed)
    batch = t["mask"].shape[0]  # pair variants round an odd batch up
    g = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn(batch, width, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) / h ** 0.5 * 2
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, v, (batch, width), generator=g)
    logp, _ = linear_logprob_entropy_reference(hidden, weight, targets, b, temperature)
    noise = lambda s: torch.randn(batch, width, generator=g, dtype=torch.float64) * s  # noqa: E731
    old = logp + noise(0.3)
    tensors = dict(advantages=t["advantages"], mask=t["mask"], old_logp=old, ref_logp=logp + noise(0.3),
                   rollout_logp=old + noise(0.1))
    tensors.update({k: t[k] for k in _TENSOR_KEYS if k in t})
    return dict(hidden=hidden, weight=weight, bias=b, targets=targets, tensors=tensors, options=opts,
                temperature=temperature)


def check_fused_pg(loss_type: str, *, impl: Optional[str] = None, dtype: torch.dtype = torch.float32,
                   plan: Optional[str] = None, seed: int = 0, chunk_bytes: Optional[int] = None,
                   options: Optional[dict] = None, device: Optional[str] = None, **shape) -> List[Comparison]:
    """Loss, metrics and the gradients of hidden, weight and bias of ``fused_linear_pg_loss`` vs the reference.
    ``device``: where the inputs live (default: CUDA for ``impl="triton"`` when there is one, else the CPU)."""
    from ..linear_pg import fused_linear_pg_loss

    if device is None:
        device = "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"

    x = fused_inputs(loss_type, seed=seed, **shape)
    x["targets"] = x["targets"].to(device)
    x["tensors"] = {k: v.to(device) for k, v in x["tensors"].items()}
    opts = {**x["options"], **(options or {}), "loss_type": loss_type}
    head = [None if a is None else a.to(device) for a in (x["hidden"], x["weight"], x["bias"])]

    def run(fn, work, **kw):
        leaves = [None if a is None else a.detach().to(work).requires_grad_() for a in head]
        fdt = torch.float64 if work == torch.float64 else torch.float32
        tens = {k: (v.to(fdt) if v.is_floating_point() else v) for k, v in x["tensors"].items()}
        loss, met = fn(leaves[0], leaves[1], x["targets"], bias=leaves[2], temperature=x["temperature"],
                       **tens, **opts, **kw)
        grads = torch.autograd.grad(loss, [a for a in leaves if a is not None], allow_unused=True)
        grads = [torch.zeros_like(a) if gr is None else gr for a, gr in zip([a for a in leaves if a is not None], grads)]
        return [loss.detach()] + grads, met

    def call_ours(h, w, y, **kw):
        adv, mask = kw.pop("advantages"), kw.pop("mask")
        return fused_linear_pg_loss(h, w, y, adv, mask, impl=impl, plan=plan, chunk_bytes=chunk_bytes, **kw)

    def call_ref(dt):
        def f(h, w, y, **kw):
            adv, mask = kw.pop("advantages"), kw.pop("mask")
            return fused_linear_pg_loss_reference(h, w, y, adv, mask, dtype=dt, **kw)
        return f

    ours, m_ours = run(call_ours, dtype)
    eager, m_eager = run(call_ref(None), dtype)
    truth, m_truth = run(call_ref(torch.float64), torch.float64)
    names = ["loss", "d_hidden", "d_weight"] + (["d_bias"] if x["bias"] is not None else [])
    out = [compare(f"pg[{loss_type}].{n}", a, b, c, dtype) for n, a, b, c in zip(names, ours, eager, truth)]
    for k in METRICS:
        if k in m_truth and k in m_ours:
            out.append(compare(f"pg[{loss_type}].metric.{k}", m_ours[k].reshape(()), m_eager[k].reshape(()),
                               m_truth[k].reshape(()), dtype))
    return out
