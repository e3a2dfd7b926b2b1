"""The fused policy-gradient loss from hidden states: LM head -> log-prob / entropy -> PG loss -> gradients,
chunk by chunk, without the N x V logits. See README.md here for the plans."""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch

from .. import checks
from ..backend import resolve_impl
from ..linear import linear_logprob_entropy
from ..objective import (PGLossConfig, batch_coefficients, finalize_metrics, make_config, plan_of, prepare,
                      token_loss)
from ..options import LogProbOptions
from .driver import FusedLinearPGLossFunction, FusedRun

__all__ = ["fused_linear_pg_loss", "FusedLinearPGLoss", "fused_plan"]


def fused_plan(config: Optional[PGLossConfig] = None, loss_type: Optional[str] = None, **options) -> str:
    """The execution plan the fused loss picks for these options: ``"one_pass"`` (gradients formed in the forward,
    token-local and whole-sequence variants; chunks hold whole sequences) or ``"two_phase"`` (statistics, a
    batch-wide reduction in torch, then a recompute backward)."""
    cfg = make_config(config, loss_type, **options)
    return "two_phase" if plan_of(cfg) == "two_phase" else "one_pass"


def fused_linear_pg_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    loss_type: Optional[str] = None,
    config: Optional[PGLossConfig] = None,
    temperature: Union[float, torch.Tensor] = 1.0,
    seq_ids: Optional[torch.Tensor] = None,
    return_token_stats: bool = False,
    impl: Optional[str] = None,
    chunk_bytes: Optional[int] = None,
    plan: Optional[str] = None,
    rollout_logp: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
    old_entropy: Optional[torch.Tensor] = None,
    group_ids: Optional[torch.Tensor] = None,
    step_ids: Optional[torch.Tensor] = None,
    token_weights: Optional[torch.Tensor] = None,
    truncated: Optional[torch.Tensor] = None,
    **options,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Policy-gradient loss straight from the last hidden states and the LM-head weight.

    Args:
        hidden: ``[B, T, H]``, or packed ``[N, H]`` with ``seq_ids`` ``[N]``; bf16 / fp16 / fp32.
        weight: ``[V, H]``; bias: optional ``[V]``.
        targets: sampled token ids of hidden's leading shape (what ``logp`` scores).
        advantages: ``[B]`` per sequence or ``[B, T]`` per token. mask: binary ``[B, T]`` loss mask.
        old_logp, ref_logp: ``[B, T]`` old-policy / reference log-probs (no gradient), where the variant needs them.
        loss_type, config, **options: as in :func:`fusedpg.pg_loss` (one frozen :class:`PGLossConfig`).
        temperature: float or a tensor of the leading shape.
        return_token_stats: also return detached per-token ``logp`` and ``entropy`` (mask's shape) in the metrics,
            e.g. to reuse as ``old_logp``.
        impl: ``"triton"`` / ``"torch"`` / ``"reference"`` (float64 head, materialised).
        chunk_bytes: budget of one chunk's ``[rows, V]`` buffer (default: the LogProbOptions defaults).
        plan: ``None`` (automatic, see :func:`fused_plan`) or ``"two_phase"`` to force the recompute plan.
        rollout_logp, is_weights, old_entropy, group_ids, step_ids, token_weights, truncated: as in
            :func:`fusedpg.objective.prepare`, for the variants that use them.

    Returns:
        ``(loss, metrics)``: the scalar loss (differentiable w.r.t. hidden, weight, bias) and the metric dict of
        :func:`fusedpg.pg_loss` plus ``"plan"`` is not a tensor and is exposed by :func:`fused_plan`.

    Equivalent PyTorch (materialising the logits)::

        logp, entropy = fusedpg.linear_logprob_entropy(hidden, weight, targets, bias=bias, temperature=T)
        loss, metrics = fusedpg.pg_loss(logp, advantages, mask, entropy=entropy, old_logp=old_logp, ...)
    """
    checks.linear_inputs(hidden, weight, targets, bias)
    if torch.compiler.is_compiling():  # custom op: no graph break; validation runs inside the op
        from ..integrations.compile import config_key, fused_linear_pg_loss_op

        return fused_linear_pg_loss_op(
            hidden, weight, targets, advantages, mask, config_json=config_key(config, loss_type, **options),
            old_logp=old_logp, ref_logp=ref_logp, bias=bias, temperature=temperature, seq_ids=seq_ids,
            return_token_stats=return_token_stats, impl=impl, chunk_bytes=chunk_bytes, plan=plan,
            rollout_logp=rollout_logp, is_weights=is_weights, old_entropy=old_entropy, group_ids=group_ids,
            step_ids=step_ids, token_weights=token_weights, truncated=truncated)
    checks.tensor("mask", mask)
    lead = hidden.shape[:-1]
    if tuple(mask.shape) != tuple(lead):
        raise ValueError(f"mask must have hidden's leading shape {tuple(lead)}, got {checks._describe(mask)}")
    cfg = make_config(config, loss_type, **options)
    temp = checks.temperature(temperature, lead, hidden.device)
    impl = resolve_impl(impl, hidden.device)
    work = torch.float64 if hidden.dtype == torch.float64 else None
    if plan not in (None, "one_pass", "two_phase"):
        raise ValueError(f"plan must be None, 'one_pass' or 'two_phase', got {plan!r}")
    auto = "two_phase" if plan_of(cfg) == "two_phase" else "one_pass"
    if plan == "one_pass" and auto == "two_phase":
        raise ValueError(f"plan='one_pass' is impossible for loss_type={cfg.loss_type!r} with these options: it "
                         "needs current-policy reductions over the batch (two_phase)")
    batch = prepare(advantages, mask, old_logp=old_logp, ref_logp=ref_logp, seq_ids=seq_ids, dtype=work, config=cfg,
                    rollout_logp=rollout_logp, is_weights=is_weights, old_entropy=old_entropy, group_ids=group_ids,
                    step_ids=step_ids, token_weights=token_weights, truncated=truncated)
    y = targets.reshape(-1)
    active = batch.active
    if y.numel() and bool(((y < 0) | (y >= weight.shape[0]))[active].any()):
        bad = y[active & ((y < 0) | (y >= weight.shape[0]))][0].item()
        raise ValueError(f"targets must lie in [0, {weight.shape[0]}) on every token of the loss mask, got {bad}")
    h2 = hidden.reshape(-1, hidden.shape[-1])
    if impl == "reference" or (plan or auto) == "two_phase":
        return _two_phase(h2, weight, bias, y, temperature if impl == "reference" else temp, batch, cfg, impl, lead,
                          return_token_stats)
    opts = LogProbOptions(compute_entropy=True)
    if chunk_bytes is not None:
        opts = LogProbOptions(compute_entropy=True, chunk_bytes=int(chunk_bytes), device_chunk_bytes=int(chunk_bytes))
    run = FusedRun(batch, cfg, y, temp, impl, opts, want_token_stats=return_token_stats)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    loss = FusedLinearPGLossFunction.apply(h2, weight, bias, run, needs)
    metrics = finalize_metrics(run.metrics)
    if return_token_stats:
        metrics["logp"], metrics["entropy"] = run.logp.reshape(lead), run.entropy.reshape(lead)
    return loss, metrics


def _two_phase(h2, weight, bias, y, temp, batch, cfg, impl, lead, want_stats):
    """Phase 1 (logp, H for active tokens), the batch-wide reduction, phase 2 through the primitive's backward."""
    masked = torch.where(batch.active, y, torch.full_like(y, -100))
    logp, ent = linear_logprob_entropy(h2, weight, masked, bias=bias, temperature=temp, ignore_index=-100,
                                       check_targets=False, impl=impl)
    logp, ent = logp.to(batch.dtype), ent.to(batch.dtype)
    if plan_of(cfg) == "two_phase":
        batch = batch.updated(batch_coefficients(batch, logp.detach(), ent.detach(), cfg))
    contrib, sums = token_loss(batch, logp, ent, cfg)
    metrics = finalize_metrics({k: v.detach() for k, v in sums.items()})
    if want_stats:
        metrics["logp"], metrics["entropy"] = logp.detach().reshape(lead), ent.detach().reshape(lead)
    return contrib.sum(), metrics


class FusedLinearPGLoss(torch.nn.Module):
    """Module form: stores a :class:`PGLossConfig` and calls :func:`fused_linear_pg_loss`.

    ``loss_fn = FusedLinearPGLoss(PGLossConfig(loss_type="grpo", beta=0.04))``;
    ``loss, metrics = loss_fn(hidden, lm_head.weight, targets, advantages, mask, old_logp=..., ref_logp=...)``.
    """

    def __init__(self, config: Optional[PGLossConfig] = None, **options):
        super().__init__()
        self.config = make_config(config, **options)

    @property
    def plan(self) -> str:
        return fused_plan(self.config)

    def forward(self, hidden, weight, targets, advantages, mask, **kwargs):
        return fused_linear_pg_loss(hidden, weight, targets, advantages, mask, config=self.config, **kwargs)
