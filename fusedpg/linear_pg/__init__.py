"""The fused policy-gradient loss from hidden states: LM head -> log-prob / entropy -> PG loss -> gradients,
chunk by chunk, without the N x V logits. See README.md here for the plans."""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch

from .. import checks
from ..backend import resolve_impl
from ..linear import linear_logprob_entropy
from ..memory_plan import resolve as resolve_memory
from ..options import LogProbOptions
from ..objective.validate import check_finite as check_finite_inputs
from ..objective import (LossInputs, PGLossConfig, batch_coefficients, finalize_metrics, make_config, plan_of,
                         prepare, token_loss)
from .op import config_key, config_of, fused_linear_pg_loss_op, metric_keys, plan_for

__all__ = ["fused_linear_pg_loss", "FusedLinearPGLoss", "fused_plan"]


def fused_plan(config: Optional[PGLossConfig] = None, loss_type: Optional[str] = None, **options) -> str:
    """The plan the fused loss runs for these options, in the loss layer's words (``plan_of``): ``"one_pass"``
    (token-local: gradients formed in the forward), ``"sequence"`` (reductions over the token's own sequence: also
    one pass, because chunks hold whole sequences) or ``"two_phase"`` (statistics, a batch-wide reduction in
    torch, then a recompute backward)."""
    return plan_of(make_config(config, loss_type, **options))


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
    check_finite: Optional[bool] = None,
    vocab_parallel_group=None,
    vocab_size: Optional[int] = None,
    reduce_hidden_grad: bool = True,
    deterministic: Optional[bool] = None,
    top_k: Union[int, torch.Tensor, None] = None,
    top_p: Union[float, torch.Tensor, None] = None,
    min_p: Union[float, torch.Tensor, None] = None,
    memory: str = "default",
    memory_budget: Optional[int] = None,
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
        plan: ``None`` (automatic, see :func:`fused_plan`) or ``"two_phase"`` to force the recompute plan
            (``"one_pass"`` / ``"sequence"`` are accepted where the config allows them).
        rollout_logp, is_weights, old_entropy, group_ids, step_ids, token_weights, truncated: as in
            :func:`fusedpg.objective.prepare`, for the variants that use them.
        check_finite: as in :func:`fusedpg.pg_loss`, plus hidden (unmasked tokens), weight and bias.
        deterministic: the head's rows bitwise batch-invariant and every gradient run-to-run reproducible, as in
            :func:`fusedpg.linear_logprob_entropy`; the loss then runs on the deterministic head's ``[N]`` outputs
            with its recompute backward (8·N·H·V FLOPs for every plan). Default ``FUSEDPG_DETERMINISTIC``, else off.
        top_k, top_p, min_p: score the sampler's truncated distribution, as in :func:`fusedpg.linear_logprob_entropy`
            (the same recompute structure); the metrics gain ``outside_kept``, the fraction of loss tokens whose
            target lies outside the kept set.
        memory: ``"low"`` runs the head's backward blocked over the vocabulary (no ``[V, H]`` fp32 accumulator,
            d_weight written once in the weight's dtype) after the loss layer on the head's ``[N]`` outputs.
        memory_budget: bytes the call may allocate besides its inputs; chooses ``memory`` and ``chunk_bytes`` as in
            :func:`fusedpg.linear_logprob_entropy` (one-pass variants counted at 6·N·H·V).
        vocab_parallel_group, vocab_size, reduce_hidden_grad: a vocabulary-sharded head, as in
            :func:`fusedpg.linear_logprob_entropy`. The merged log-probs and entropy are the same on every rank, so
            is the loss; every plan runs as a recompute (statistics, loss, then the head's backward). Normalisers
            (``num_items_in_batch``, ``world_size``) count the data-parallel ranks only: tensor-parallel ranks hold
            the same tokens (fusedpg/vocab_parallel/README.md).

    Returns:
        ``(loss, metrics)``: the scalar loss (differentiable w.r.t. hidden, weight, bias) and the metric dict of
        :func:`fusedpg.pg_loss` plus ``"plan"`` is not a tensor and is exposed by :func:`fused_plan`.

    Equivalent PyTorch (materialising the logits)::

        logp, entropy = fusedpg.linear_logprob_entropy(hidden, weight, targets, bias=bias, temperature=T)
        loss, metrics = fusedpg.pg_loss(logp, advantages, mask, entropy=entropy, old_logp=old_logp, ...)
    """
    if loss_type == "otr":  # candidates sampled inside the head's pass: its own composition (otr.py)
        return _otr(hidden, weight, targets, advantages, mask, bias=bias, temperature=temperature, impl=impl,
                    chunk_bytes=chunk_bytes, deterministic=deterministic, config=config, plan=plan,
                    inputs=LossInputs(old_logp, ref_logp, rollout_logp, is_weights, old_entropy, seq_ids, group_ids,
                                      step_ids, token_weights, truncated), **options)
    parallel = vocab_parallel_group is not None or type(weight).__name__ == "DTensor"
    if not parallel:
        checks.linear_inputs(hidden, weight, targets, bias)
    checks.tensor("mask", mask)
    lead = hidden.shape[:-1]
    if tuple(mask.shape) != tuple(lead):
        raise ValueError(f"mask must have hidden's leading shape {tuple(lead)}, got {checks._describe(mask)}")
    inputs = LossInputs(old_logp, ref_logp, rollout_logp, is_weights, old_entropy, seq_ids, group_ids, step_ids,
                        token_weights, truncated)
    if checks.finite_enabled(check_finite):
        check_finite_inputs(mask, hidden=hidden, weight=weight, bias=bias, advantages=advantages, **inputs.floats())
    key = config_key(config, loss_type, tuple(options.items()))
    run_plan = plan_for(key, plan)
    memory, chunk_bytes = resolve_memory(memory_budget, memory, chunk_bytes, hidden, weight,
                                         one_pass=run_plan != "two_phase")
    temp = checks.temperature(temperature, lead, hidden.device)
    impl = resolve_impl(impl, hidden.device)
    flat_temp = temperature.reshape(-1) if isinstance(temperature, torch.Tensor) else temperature
    h2 = hidden.reshape(-1, hidden.shape[-1])
    deterministic = LogProbOptions.default_deterministic(deterministic)
    truncated = top_k is not None or top_p is not None or min_p is not None
    low = checks.memory_mode(memory)
    flat = (lambda x: x.reshape(-1) if isinstance(x, torch.Tensor) else x)
    if parallel or deterministic or truncated or low:
        loss, metrics = _composed(lambda y: linear_logprob_entropy(
            h2, weight, y, bias=bias, temperature=flat_temp, impl=impl, chunk_bytes=chunk_bytes,
            vocab_parallel_group=vocab_parallel_group, vocab_size=vocab_size, reduce_hidden_grad=reduce_hidden_grad,
            deterministic=deterministic, top_k=flat(top_k), top_p=flat(top_p), min_p=flat(min_p),
            **({"memory": "low"} if low else {})),
            targets, advantages, mask, inputs, config_of(key),
            torch.float64 if hidden.dtype == torch.float64 else torch.float32, lead, return_token_stats or truncated)
        if truncated:
            metrics = _outside_kept(metrics, mask, lead, return_token_stats)
        return loss, metrics
    if impl == "reference":
        return _composed(lambda y: linear_logprob_entropy(h2, weight, y, bias=bias, temperature=flat_temp,
                                                          check_targets=False, impl="reference"),
                         targets, advantages, mask, inputs, config_of(key),
                         torch.float64 if hidden.dtype == torch.float64 else None, lead, return_token_stats)
    grad_on = torch.is_grad_enabled()
    out = fused_linear_pg_loss_op(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1), advantages, mask, inputs.as_list(),
        *temp.op_args(), key, impl, checks.chunk_bytes(chunk_bytes), run_plan,
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad, bool(return_token_stats))
    sums = out[1].detach()
    metrics = finalize_metrics({k: sums[i] for i, k in enumerate(metric_keys(key, inputs.present()))})
    if return_token_stats:
        metrics["logp"], metrics["entropy"] = out[5].detach().reshape(lead), out[6].detach().reshape(lead)
    return out[0], metrics


def _otr(hidden, weight, labels, advantages, mask, *, config, plan, inputs, **kwargs):
    """``loss_type="otr"``: rewards come from the labels, so the loss takes no advantages and no per-token inputs."""
    from .otr import otr_loss

    if advantages is not None:
        raise ValueError("advantages must be None for loss_type='otr' (each candidate's reward comes from targets, "
                         f"the ground-truth tokens), got {checks._describe(advantages)}")
    given = list(inputs.present()) + (["config"] if config is not None else []) + (["plan"] if plan else [])
    if given:
        raise ValueError(f"loss_type='otr' takes none of {given}: its options are num_samples, otr_beta, "
                         "otr_baseline, seed, sample_ids and aggregation")
    return otr_loss(hidden, weight, labels, mask=mask, **kwargs)


def _outside_kept(metrics, mask, lead, keep_stats):
    """The fraction of loss tokens whose target the sampler's truncation leaves out (their log-prob is the floor)."""
    from ..truncation import OUTSIDE_LOGP

    on = mask.reshape(lead) != 0
    outside = (metrics["logp"] <= OUTSIDE_LOGP) & on
    metrics["outside_kept"] = outside.sum().to(metrics["logp"].dtype) / on.sum().clamp(min=1)
    if not keep_stats:
        del metrics["logp"], metrics["entropy"]
    return metrics


def _composed(head, targets, advantages, mask, inputs, cfg, work, lead, want_stats):
    """The loss layer on a differentiable head ``head(targets [N]) -> (logp, entropy)`` ``[N]``: the float64
    materialised reference, or the vocabulary-parallel head. Tokens outside the loss are scored as ignored."""
    batch = prepare(advantages, mask, inputs, dtype=work, config=cfg)
    masked = torch.where(batch.active, targets.reshape(-1), torch.full_like(targets.reshape(-1), -100))
    logp, ent = head(masked)
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

    def extra_repr(self) -> str:
        return repr(self.config)

    def forward(self, hidden, weight, targets, advantages, mask, **kwargs):
        return fused_linear_pg_loss(hidden, weight, targets, advantages, mask, config=self.config, **kwargs)
