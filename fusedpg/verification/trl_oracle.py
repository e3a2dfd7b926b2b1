"""A deliberately plain re-statement of TRL's documented ``GRPOTrainer._compute_loss`` semantics.

This is an independent reference (written from the behaviour described in docs/losses.md and TRL's
documentation, not shared with ``pg_loss``): padded ``[B, T]`` tensors, TRL's option names, TRL's order of
operations, no clamps, none of ``pg_loss``'s code. ``pg_loss`` is tested against it for every TRL ``loss_type``
(grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo) and option (epsilon / epsilon_high, delta, beta with
the bias-corrected KL, importance_sampling_level, top_entropy_quantile, the vLLM IS modes, OPSM,
mask_truncated_completions, the static entropy bonus). Collectives are replaced by local tensors
(``num_items_in_batch`` and ``num_processes`` are inputs). The loss-type families, ``coef_1``, the k3 KL and the
logged metric names are TRL's facts kept once, in ``fusedpg.integrations.trl_support``, which the trainer
integrations use too; ``pg_loss_options`` is that module's option mapping.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ..integrations.trl_support import (
    CLIPPED, GLOBAL_NORM, LOSS_TYPES, grpo_options, importance_weights, k3_kl, masked_seq_mean, metric_terms,
)


@dataclass(frozen=True)
class TRLArgs:
    """The ``GRPOConfig`` fields that ``_compute_loss`` reads (TRL names and defaults)."""

    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None  # defaults to epsilon
    delta: Optional[float] = None
    beta: float = 0.0
    use_bias_correction_kl: bool = False
    importance_sampling_level: str = "token"
    top_entropy_quantile: float = 1.0
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    off_policy_mask_threshold: Optional[float] = None
    entropy_coef: float = 0.0
    max_completion_length: int = 256
    gradient_accumulation_steps: int = 1
    num_processes: int = 1
    vllm_importance_sampling_correction: bool = False
    vllm_importance_sampling_mode: str = "sequence_mask"
    vllm_importance_sampling_clip_min: Optional[float] = None
    vllm_importance_sampling_clip_max: Optional[float] = 3.0
    mask_truncated_completions: bool = False


def importance_sampling_ratio(old: torch.Tensor, sampling: torch.Tensor, mask: torch.Tensor,
                              args: TRLArgs) -> torch.Tensor:
    """The vLLM IS ratio TRL precomputes at generation time: ``exp((old - sampling) * mask)`` per token, or its
    per-sequence sum, truncated (clamp) or masked (set to 0) outside ``[clip_min, clip_max]``."""
    diff = (old - sampling) * mask
    if args.vllm_importance_sampling_mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    lo, hi = args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max
    if args.vllm_importance_sampling_mode.endswith("truncate"):
        return torch.clamp(ratio, min=lo, max=hi)
    lo = -math.inf if lo is None else lo
    hi = math.inf if hi is None else hi
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


def high_entropy_mask(entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """Tokens with ``H >= quantile(H_valid, threshold)`` (single process: no gather)."""
    local = entropies[mask.bool()].float()
    if local.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    tau = torch.quantile(local, threshold)
    return ((entropies * mask.float()) >= tau) & mask.bool()


def off_policy_mask(advantages, logps, sampling_logps, mask, threshold) -> torch.Tensor:
    kl = sampling_logps - logps.detach()
    avg = (kl * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    return ((advantages >= 0) | (avg <= threshold)).to(mask.dtype)


def gamma_weights(advantages, log_ratio, mask, is_ratio, args: TRLArgs) -> torch.Tensor:
    floor = math.log(1e-8)
    with torch.no_grad():
        seq = torch.sum(torch.clamp(log_ratio, -20.0, 20.0) * mask, dim=-1, keepdim=True)
        if is_ratio is not None:
            seq = seq + torch.sum(torch.clamp(torch.log(is_ratio), floor, 20.0), dim=-1, keepdim=True)
        log_w = torch.clamp(seq, floor, 20.0)
        pos = advantages >= 0
        full = torch.full_like
        k = torch.where(pos, full(advantages, args.vespo_k_pos), full(advantages, args.vespo_k_neg))
        lam = torch.where(pos, full(advantages, args.vespo_lambda_pos), full(advantages, args.vespo_lambda_neg))
        lam = lam.clamp(min=1e-4)
        return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def trl_compute_loss(
    per_token_logps: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    args: TRLArgs,
    *,
    entropies: Optional[torch.Tensor] = None,
    old_per_token_logps: Optional[torch.Tensor] = None,
    ref_per_token_logps: Optional[torch.Tensor] = None,
    sampling_per_token_logps: Optional[torch.Tensor] = None,
    num_items_in_batch: Optional[torch.Tensor] = None,
    is_truncated: Optional[torch.Tensor] = None,
    tool_mask: Optional[torch.Tensor] = None,
    train: bool = True,
) -> Tuple[torch.Tensor, Dict[str, float]]:
    """One micro-step's loss and logged metrics, as TRL computes them (single process)."""
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {args.loss_type!r}")
    eps_low, eps_high = args.epsilon, args.epsilon if args.epsilon_high is None else args.epsilon_high
    completion_mask = completion_mask.to(per_token_logps.dtype)
    if args.mask_truncated_completions and is_truncated is not None:
        completion_mask = completion_mask * (~is_truncated.bool()).unsqueeze(1).to(completion_mask.dtype)
    mask = completion_mask if tool_mask is None else completion_mask * tool_mask
    if num_items_in_batch is None:
        num_items_in_batch = mask.sum()
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    is_ratio = None
    if args.vllm_importance_sampling_correction:
        is_ratio = importance_sampling_ratio(old, sampling_per_token_logps, mask, args)

    entropy_mask = None
    if args.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(entropies, mask, 1 - args.top_entropy_quantile)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if args.off_policy_mask_threshold is not None:
        sampling = sampling_per_token_logps if sampling_per_token_logps is not None else old
        opsm = off_policy_mask(advantages, per_token_logps, sampling, mask, args.off_policy_mask_threshold)

    log_ratio = per_token_logps - old
    coef_1 = importance_weights(log_ratio, mask, args.importance_sampling_level)
    per_token_kl = phi = None
    if args.beta != 0.0:
        per_token_kl = k3_kl(ref_per_token_logps - per_token_logps, coef_1 if args.use_bias_correction_kl else None)

    if args.loss_type == "cispo":
        per_token_loss = -torch.clamp(coef_1, max=eps_high).detach() * advantages * per_token_logps
    elif args.loss_type in CLIPPED:
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if args.delta is not None:
            coef_1 = torch.clamp(coef_1, max=args.delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    elif args.loss_type == "sapo":
        tau = torch.where(advantages > 0, torch.full_like(advantages, args.sapo_temperature_pos),
                          torch.full_like(advantages, args.sapo_temperature_neg))
        per_token_loss = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * advantages
    else:  # vespo
        phi = gamma_weights(advantages, log_ratio, mask, is_ratio, args)
        per_token_loss = -phi * advantages * per_token_logps

    if args.off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * opsm
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if is_ratio is not None and args.loss_type != "vespo":
        per_token_loss = per_token_loss * is_ratio
    if args.beta != 0.0:
        per_token_loss = per_token_loss + args.beta * per_token_kl

    ga = args.gradient_accumulation_steps if train else 1.0
    if args.loss_type in ("grpo", "sapo"):
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / ga
    elif args.loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / ga
    elif args.loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * args.max_completion_length) / ga
    elif args.loss_type in GLOBAL_NORM:
        normalizer = torch.as_tensor(num_items_in_batch, dtype=mask.dtype).clamp(min=1.0) / args.num_processes
        loss = (per_token_loss * mask).sum() / normalizer
    else:  # luspo
        loss = (per_token_loss * mask.sum(1, keepdim=True)).mean() / ga

    if args.entropy_coef != 0.0:
        eff = mask if entropy_mask is None else mask * entropy_mask
        if args.loss_type in GLOBAL_NORM:
            ent = (entropies * eff).sum() / normalizer
        else:
            ent = (entropies * eff).sum() / eff.sum().clamp(min=1.0) / ga
        loss = loss - args.entropy_coef * ent

    def masked_mean(x):
        if x.shape[1] == 1:
            return (x.sum() / max(x.shape[0], 1)).item()
        return ((x * mask).sum() / mask.sum().clamp(min=1.0)).item()

    metrics: Dict[str, float] = {}
    terms = metric_terms(args.loss_type, coef_1, advantages, eps_low, eps_high, per_token_kl=per_token_kl,
                         entropies=entropies, phi=phi)
    for name, (reduce, x) in terms.items():
        if reduce == "mean":
            metrics[name] = masked_mean(x)
        else:  # TRL's nanmin / nanmax over sequences
            per_seq = torch.nan_to_num(masked_seq_mean(x, mask), nan=math.inf if reduce == "min" else -math.inf)
            metrics[name] = (per_seq.min() if reduce == "min" else per_seq.max()).item()
    return loss, metrics


def pg_loss_options(args: TRLArgs) -> dict:
    """The ``pg_loss`` keyword options that express ``args``: the trainer integrations' mapping
    (``trl_support.grpo_options``, LUSPO unmasked as documented), plus the options TRL's trainer applies before
    the loss (truncated completions, the vLLM IS ratio)."""
    eps_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    out = grpo_options(
        args.loss_type, epsilon_low=args.epsilon, epsilon_high=eps_high, beta=args.beta,
        use_bias_correction_kl=args.use_bias_correction_kl, importance_sampling_level=args.importance_sampling_level,
        sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
        vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
        vespo_lambda_neg=args.vespo_lambda_neg,
        delta=args.delta, top_entropy_quantile=args.top_entropy_quantile,
        off_policy_mask_threshold=args.off_policy_mask_threshold, max_completion_length=args.max_completion_length,
        gradient_accumulation_steps=args.gradient_accumulation_steps, world_size=args.num_processes,
        entropy_coef=args.entropy_coef, unmasked_luspo=True)
    out["mask_truncated_completions"] = args.mask_truncated_completions
    if args.vllm_importance_sampling_correction:
        out.update(rollout_is=args.vllm_importance_sampling_mode, rollout_is_min=args.vllm_importance_sampling_clip_min,
                   rollout_is_max=args.vllm_importance_sampling_clip_max)
    return out
