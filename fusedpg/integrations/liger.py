"""A drop-in replacement for liger-kernel's ``LigerFusedLinearGRPOLoss`` backed by fusedpg: Liger's constructor,
``forward`` signature, loss and metrics ``(kl_mean, clip_ratio)`` / ``(clip_ratio,)``. Semantics, differences and
the extra keyword arguments (``impl``, ``chunk_bytes``, ``allreduce_normalizer``):
docs/integrations.md#liger-kernel-ligerfusedlineargrpoloss.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..linear_pg import fused_linear_pg_loss
from .trl_support import (
    GLOBAL_NORM, LOSS_TYPES, grpo_options, head_logprobs, importance_weights, k3_kl, metric_terms, rollout_is_weights,
)

__all__ = ["LigerFusedLinearGRPOLoss", "liger_options", "LIGER_LOSS_TYPES"]

#: Liger's loss types are TRL's.
LIGER_LOSS_TYPES = LOSS_TYPES


def liger_options(*, loss_type: str, importance_sampling_level: str, max_completion_length: Optional[int],
                  **settings) -> dict:
    """The :class:`fusedpg.PGLossConfig` keywords that express Liger's GRPO loss with these options (the
    constructor's names, plus ``num_items_in_batch`` and ``world_size``): TRL's mapping, LUSPO unmasked."""
    if loss_type not in LIGER_LOSS_TYPES:
        raise ValueError(f"Unknown loss type: {loss_type}; LigerFusedLinearGRPOLoss supports {LIGER_LOSS_TYPES}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"Unknown importance sampling level: {importance_sampling_level}. Possible values are "
                         "'token' and 'sequence'.")
    if importance_sampling_level == "sequence" and loss_type in ("cispo", "sapo", "vespo"):
        raise ValueError(f"Sequence-level importance sampling is not supported for loss_type='{loss_type}'. "
                         "Use importance_sampling_level='token' instead.")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("max_completion_length must be provided for loss_type 'dr_grpo'")
    return grpo_options(loss_type, importance_sampling_level=importance_sampling_level,
                        max_completion_length=max_completion_length, unmasked_luspo=True, **settings)


class LigerFusedLinearGRPOLoss(torch.nn.Module):
    """Fused linear layer with GRPO loss (liger-kernel's API, fusedpg's kernels). See the module docstring."""

    def __init__(
        self,
        beta: float = 0.04,
        compiled: bool = True,
        use_ref_model: bool = True,
        chunk_size: int = 1,
        epsilon_low: float = 0.2,
        epsilon_high: float = 0.2,
        loss_type: str = "dapo",
        max_completion_length: Optional[int] = None,
        importance_sampling_level: str = "token",
        sapo_temperature_pos: float = 1.0,
        sapo_temperature_neg: float = 1.05,
        temperature: float = 1.0,
        delta: Optional[float] = None,
        use_bias_correction_kl: bool = False,
        vespo_k_pos: float = 2.0,
        vespo_lambda_pos: float = 3.0,
        vespo_k_neg: float = 3.0,
        vespo_lambda_neg: float = 2.0,
        *,
        impl: Optional[str] = None,
        chunk_bytes: Optional[int] = None,
        allreduce_normalizer: bool = True,
    ):
        super().__init__()
        if sapo_temperature_pos <= 0:
            raise ValueError(f"sapo_temperature_pos must be positive, got {sapo_temperature_pos}")
        if sapo_temperature_neg <= 0:
            raise ValueError(f"sapo_temperature_neg must be positive, got {sapo_temperature_neg}")
        if delta is not None and delta <= 0:
            raise ValueError(f"delta must be positive, got {delta}")
        self.beta = beta
        self.compiled = compiled
        self.use_ref_model = use_ref_model
        self.chunk_size = chunk_size
        self.epsilon_low = epsilon_low
        self.epsilon_high = epsilon_high
        self.loss_type = loss_type
        self.max_completion_length = max_completion_length
        self.importance_sampling_level = importance_sampling_level
        self.sapo_temperature_pos = sapo_temperature_pos
        self.sapo_temperature_neg = sapo_temperature_neg
        self.temperature = temperature
        self.delta = delta
        self.use_bias_correction_kl = use_bias_correction_kl
        self.vespo_k_pos = vespo_k_pos
        self.vespo_lambda_pos = vespo_lambda_pos
        self.vespo_k_neg = vespo_k_neg
        self.vespo_lambda_neg = vespo_lambda_neg
        self.impl = impl
        self.chunk_bytes = chunk_bytes
        self.allreduce_normalizer = allreduce_normalizer
        liger_options(**self._option_kwargs())  # validate now, as Liger does (partly) at construction

    def extra_repr(self) -> str:
        shown = {**self._option_kwargs(), "use_ref_model": self.use_ref_model, "temperature": self.temperature,
                 "impl": self.impl}
        return ", ".join(f"{k}={v!r}" for k, v in shown.items())

    def _option_kwargs(self, **extra) -> dict:
        return dict(beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                    loss_type=self.loss_type, max_completion_length=self.max_completion_length,
                    importance_sampling_level=self.importance_sampling_level,
                    sapo_temperature_pos=self.sapo_temperature_pos, sapo_temperature_neg=self.sapo_temperature_neg,
                    delta=self.delta, use_bias_correction_kl=self.use_bias_correction_kl,
                    vespo_k_pos=self.vespo_k_pos, vespo_lambda_pos=self.vespo_lambda_pos,
                    vespo_k_neg=self.vespo_k_neg, vespo_lambda_neg=self.vespo_lambda_neg, **extra)

    def forward(
        self,
        _input,
        lin_weight,
        selected_token_ids,
        attention_mask,
        advantages,
        bias=None,
        ref_per_token_logps=None,
        old_per_token_logps=None,
        ref_input=None,
        ref_weight=None,
        ref_bias=None,
        vllm_is_ratio=None,
        num_items_in_batch=None,
    ):
        if lin_weight.numel() == 0 or hasattr(lin_weight, "full_tensor"):
            got = "a DTensor shard (FSDP2)" if lin_weight.numel() else "an empty ZeRO-3 partition"
            raise ValueError(f"lin_weight must be the full LM-head weight, got {got}: call the loss inside the wrapped "
                             "model's forward (fusedpg.call_through), where the wrapper gathers it, or use "
                             "fusedpg.FusedLMHead (README: More than one GPU)")
        B, T = attention_mask.shape
        work = _input.dtype if _input.dtype == torch.float64 else torch.float32
        mask = attention_mask.to(work)
        beta = float(self.beta)
        ref = None
        if beta != 0.0 and self.use_ref_model:
            if ref_per_token_logps is None:
                if ref_input is None:
                    raise ValueError("If use_ref_model is True, ref_per_token_logps or ref_input must be provided")
                ref = head_logprobs(ref_input, lin_weight if ref_weight is None else ref_weight, selected_token_ids,
                                    ref_bias, temperature=self.temperature, impl=self.impl)
            else:
                ref = ref_per_token_logps
            ref = ref.detach().to(work)
        # Liger with beta != 0 and no reference model uses ref = logp.detach(): KL 0, zero gradient.
        kl_active = beta != 0.0 and ref is not None
        is_w = None
        if vllm_is_ratio is not None:
            if vllm_is_ratio.dim() not in (1, 2) or vllm_is_ratio.shape[0] != B or (
                    vllm_is_ratio.dim() == 2 and vllm_is_ratio.shape[1] not in (1, T)):
                raise ValueError(f"vllm_is_ratio must be ({B},), ({B}, 1) or ({B}, {T}), got "
                                 f"{tuple(vllm_is_ratio.shape)}")
            is_w = rollout_is_weights(self.loss_type, vllm_is_ratio.detach().to(work), mask)
        world = 1
        dist_on = torch.distributed.is_available() and torch.distributed.is_initialized()
        if dist_on:
            world = torch.distributed.get_world_size()
        nib = num_items_in_batch
        if nib is None and dist_on and self.allreduce_normalizer and self.loss_type in GLOBAL_NORM:
            total = mask.sum().detach().clone()
            torch.distributed.all_reduce(total)
            nib = total
        if isinstance(nib, torch.Tensor):
            nib = float(nib.item())
        if nib is None:
            world = 1  # local token mean: P / N_glob with P = 1
        opts = liger_options(**self._option_kwargs(num_items_in_batch=nib, world_size=world))
        if not kl_active:
            opts.update(beta=0.0, kl_bias_correction=False)
        if old_per_token_logps is None:  # on-policy: ratio 1 up to rounding, gradient -A as on-policy
            old = head_logprobs(_input, lin_weight, selected_token_ids, bias, temperature=self.temperature,
                                impl=self.impl, check_targets=False).to(work)
        else:
            old = old_per_token_logps.detach().to(work)
        loss, met = fused_linear_pg_loss(
            _input, lin_weight, selected_token_ids, advantages, mask, old_logp=old, ref_logp=ref if kl_active else None,
            bias=bias, temperature=self.temperature, return_token_stats=True, impl=self.impl,
            chunk_bytes=self.chunk_bytes, is_weights=is_w, **opts)
        metrics = self._metrics(met["logp"].detach().to(work), old, ref, advantages.detach().to(work), mask, beta,
                                kl_active)
        return loss.float() if loss.dtype != torch.float64 else loss, metrics

    def _metrics(self, logp, old, ref, adv, mask, beta, kl_active):
        """Liger's metrics: masked KL mean (if beta != 0) and the direction-aware clip fraction over tokens."""
        on = mask > 0
        denom = mask.sum().clamp(min=1.0)
        lr = torch.zeros_like(logp) if old is None else torch.where(on, logp - old, torch.zeros_like(logp))
        coef = importance_weights(lr, mask, self.importance_sampling_level)
        out = []
        if beta != 0.0:
            if kl_active:
                kl = k3_kl(torch.where(on, ref - logp, torch.zeros_like(logp)),
                           coef if self.use_bias_correction_kl else None)
                out.append((kl * mask).sum() / denom)
            else:
                out.append(torch.zeros((), dtype=logp.dtype, device=logp.device))
        # TRL's clip_ratio/region_mean (cispo: cispo_clip_ratio); none for sapo and vespo
        terms = metric_terms(self.loss_type, coef, adv if adv.dim() == 2 else adv[:, None], self.epsilon_low,
                             self.epsilon_high)
        _, clipped = terms.get("clip_ratio/region_mean", terms.get("cispo_clip_ratio", ("mean", None)))
        clipped = torch.zeros_like(mask) if clipped is None else clipped.expand_as(mask)
        out.append((clipped * mask).sum() / denom)
        return tuple(m.detach() for m in out)
