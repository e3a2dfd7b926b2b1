"""TRL's GRPO loss in fusedpg's terms: the one home of the trainer facts that the TRL trainer (``trl.py``), the
Liger-compatible module (``liger.py``, Liger's loss is TRL's without gradient accumulation) and the TRL oracle of
``fusedpg.verification`` share. Imports neither TRL nor transformers.

* ``LOSS_TYPES`` and its families ``CLIPPED`` and ``GLOBAL_NORM``; ``AGGREGATION``, fusedpg's aggregation of each.
* :func:`grpo_options`: ``GRPOConfig``-named settings -> :class:`fusedpg.PGLossConfig` keywords;
  :func:`trl_loss_options`: the same for one micro-step of a live TRL 1.16 ``GRPOTrainer``.
* :func:`rollout_is_weights`: a precomputed rollout IS ratio as fusedpg's ``is_weights`` (folded into VESPO's weight).
* :func:`head_logprobs`: the on-policy ``old_logp`` (TRL and Liger use ``logp.detach()``; fusedpg's losses take
  old log-probs as an input, so one no-grad head pass forms them) and reference log-probs.
* :func:`importance_weights`, :func:`k3_kl`, :func:`metric_terms`, :func:`masked_seq_mean`: the quantities behind
  TRL's logged metric names (Liger returns two of them); ``FUSEDPG_METRICS``: the fusedpg metric reporting each.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from ..linear import linear_logprob_entropy

SUPPORTED_TRL = ">=1.16,<2"
#: TRL's (and Liger's) ``loss_type`` values.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
#: The PPO-clip family: ``delta`` applies and the ``clip_ratio/*`` metrics are logged.
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
#: Normalised by the global count of valid tokens, ``num_items_in_batch / num_processes``.
GLOBAL_NORM = ("cispo", "dapo", "vespo")
#: fusedpg's aggregation of a loss type, where it is not the loss type's own name.
AGGREGATION = {"sapo": "grpo", "cispo": "dapo", "vespo": "dapo"}
#: Keys of TRL's multimodal batches.
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "token_type_ids",
                   "mm_token_type_ids", "image_position_ids", "spatial_shapes", "num_tiles")
#: TRL's logged loss metric -> the metric of ``pg_loss`` / ``fused_linear_pg_loss`` that reports the same number.
FUSEDPG_METRICS = {"kl": "kl", "entropy": "entropy", "clip_ratio/low_mean": "clip_low",
                   "clip_ratio/high_mean": "clip_high", "clip_ratio/region_mean": "clip_region",
                   "clip_ratio/low_min": "clip_low_min_seq", "clip_ratio/high_max": "clip_high_max_seq",
                   "cispo_clip_ratio": "clip_high", "vespo/phi_seq_mean": "vespo_phi"}


def grpo_options(loss_type: str, *, epsilon_low: float, epsilon_high: float, beta: float,
                 use_bias_correction_kl: bool, importance_sampling_level: str, sapo_temperature_pos: float,
                 sapo_temperature_neg: float, vespo_k_pos: float, vespo_lambda_pos: float, vespo_k_neg: float,
                 vespo_lambda_neg: float, delta: Optional[float] = None, top_entropy_quantile: float = 1.0,
                 off_policy_mask_threshold: Optional[float] = None, max_completion_length: Optional[int] = None,
                 gradient_accumulation_steps: int = 1, world_size: int = 1,
                 num_items_in_batch: Optional[float] = None, entropy_coef: float = 0.0,
                 unmasked_luspo: bool = False) -> dict:
    """The :class:`fusedpg.PGLossConfig` keywords of TRL's GRPO loss with these settings (``GRPOConfig`` names):
    no dual clip, no log-ratio clamp, k3 KL (bias-corrected on request), CISPO's ``epsilon_high`` as an absolute
    cap, ``delta`` on the clipped family only. ``unmasked_luspo``: LUSPO averages over all ``B*T`` cells (Liger
    0.8 and TRL's documented form) instead of TRL 1.16's masked mean."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    opts = dict(loss_type=loss_type, aggregation=AGGREGATION.get(loss_type, loss_type),
                epsilon_low=float(epsilon_low), epsilon_high=float(epsilon_high), dual_clip_c=math.inf,
                log_ratio_clamp=None, beta=float(beta), kl_estimator="k3",
                kl_bias_correction=bool(use_bias_correction_kl) and beta != 0.0,
                importance_sampling_level=importance_sampling_level,
                top_entropy_quantile=float(top_entropy_quantile), top_entropy_mode="trl",
                sapo_tau_pos=float(sapo_temperature_pos), sapo_tau_neg=float(sapo_temperature_neg),
                vespo_k_pos=float(vespo_k_pos), vespo_lambda_pos=float(vespo_lambda_pos),
                vespo_k_neg=float(vespo_k_neg), vespo_lambda_neg=float(vespo_lambda_neg),
                off_policy_mask_threshold=off_policy_mask_threshold,
                gradient_accumulation_steps=int(gradient_accumulation_steps), world_size=int(world_size),
                cispo_mode="trl", luspo_unmasked=bool(unmasked_luspo) and loss_type == "luspo",
                entropy_coef=float(entropy_coef))
    if delta is not None and loss_type in CLIPPED:
        opts["delta"] = float(delta)
    if max_completion_length is not None:
        opts["max_completion_length"] = int(max_completion_length)
    if num_items_in_batch is not None:
        opts["num_items_in_batch"] = float(num_items_in_batch)
    return opts


def trl_loss_options(trainer, *, train: bool, num_items_in_batch: Optional[float], num_tokens: float,
                     entropy_coef: float) -> dict:
    """The :class:`fusedpg.PGLossConfig` keywords that reproduce TRL 1.16's ``_compute_loss`` for ``trainer``'s
    settings in one micro-step (``num_tokens`` = local valid tokens, ``entropy_coef`` = the coefficient applied)."""
    args, lt = trainer.args, trainer.loss_type
    ga = int(trainer.current_gradient_accumulation_steps) if train else 1
    world = int(trainer.accelerator.num_processes)
    nib = None
    if lt in GLOBAL_NORM:
        # TRL: sum / (clamp(N_glob, 1) / P * GA / steps_per_generation); fusedpg: sum * P / N_eff
        nib = max(float(num_items_in_batch), 1.0)
        if train:
            nib = nib * ga / float(args.steps_per_generation)
        if entropy_coef != 0.0:
            if trainer.top_entropy_quantile < 1.0:
                raise NotImplementedError(
                    f"the entropy bonus with top_entropy_quantile < 1 and loss_type={lt!r}: TRL divides the bonus by "
                    "the number of selected tokens, which fusedpg's one fused pass cannot know in advance")
            # fusedpg weights the dapo-family bonus like the policy term (P / N_eff); TRL 1.16 takes the local mean
            # over valid tokens divided by GA: rescale the coefficient by (N_eff / P) / (max(N_local, 1) * GA).
            entropy_coef = entropy_coef * (nib / world) / (max(num_tokens, 1.0) * ga)
    return grpo_options(
        lt, epsilon_low=trainer.epsilon_low, epsilon_high=trainer.epsilon_high, beta=trainer.beta,
        use_bias_correction_kl=args.use_bias_correction_kl,
        importance_sampling_level=trainer.importance_sampling_level,
        sapo_temperature_pos=args.sapo_temperature_pos, sapo_temperature_neg=args.sapo_temperature_neg,
        vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
        vespo_lambda_neg=args.vespo_lambda_neg, delta=args.delta, top_entropy_quantile=trainer.top_entropy_quantile,
        off_policy_mask_threshold=trainer.off_policy_mask_threshold,
        max_completion_length=trainer.max_completion_length, gradient_accumulation_steps=ga, world_size=world,
        num_items_in_batch=nib, entropy_coef=entropy_coef)


def rollout_is_weights(loss_type: str, ratio: Optional[torch.Tensor], mask: torch.Tensor) -> Optional[torch.Tensor]:
    """A precomputed rollout IS ratio (TRL's ``importance_sampling_ratio``, Liger's ``vllm_is_ratio``: ``(B,)``,
    ``(B, 1)`` or ``(B, T)``) as fusedpg's ``is_weights``. It multiplies the policy term, except for VESPO, whose
    log-weight TRL and Liger add ``sum over the ratio's last dim of clamp(log r, log 1e-8, 20)`` to; fusedpg adds
    ``sum_t m_t clamp(log w_t)``, so the total is spread evenly over the sequence's valid tokens."""
    if ratio is None:
        return None
    if loss_type == "vespo":
        b, t = mask.shape
        logs = ratio.reshape(b, -1).to(mask.dtype).log().clamp(math.log(1e-8), 20.0).sum(-1, keepdim=True)
        return torch.exp(logs / mask.sum(-1, keepdim=True).clamp(min=1.0)).expand(b, t)
    return ratio[:, 0] if ratio.dim() == 2 and ratio.shape[1] == 1 else ratio


def head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, *, temperature: float, impl: Optional[str] = None,
                  check_targets: Optional[bool] = None) -> torch.Tensor:
    """Per-token log-probs of the LM head without autograd (one fused pass, no ``N x V`` logits)."""
    with torch.no_grad():
        logp, _ = linear_logprob_entropy(hidden.detach(), weight.detach(), targets,
                                         bias=None if bias is None else bias.detach(), temperature=temperature,
                                         compute_entropy=False, check_targets=check_targets, impl=impl)
    return logp


def importance_weights(log_ratio: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """TRL's ``coef_1``: ``exp`` of the per-token log-ratio (``level="token"``), or of each sequence's masked mean
    (``"sequence"``, shape ``[B, 1]``)."""
    if level == "token":
        return torch.exp(log_ratio)
    return torch.exp(((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1))


def k3_kl(ref_minus_logp: torch.Tensor, coef_1: Optional[torch.Tensor] = None) -> torch.Tensor:
    """TRL's per-token KL ``exp(d) - d - 1`` with ``d = ref - logp``; times ``coef_1`` when bias-corrected."""
    kl = torch.exp(ref_minus_logp) - ref_minus_logp - 1
    return kl if coef_1 is None else kl * coef_1


def masked_seq_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean over its valid tokens (NaN for an empty one); ``[B, 1]`` is already per sequence."""
    return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)


def metric_terms(loss_type: str, coef_1: torch.Tensor, advantages: torch.Tensor, epsilon_low: float,
                 epsilon_high: float, *, per_token_kl: Optional[torch.Tensor] = None,
                 entropies: Optional[torch.Tensor] = None,
                 phi: Optional[torch.Tensor] = None) -> Dict[str, Tuple[str, torch.Tensor]]:
    """TRL's logged loss metrics by name, as ``name -> (reduce, x)``: ``x`` per token (``[B, T]``) or per sequence
    (``[B, 1]``), ``reduce`` how TRL reduces it: ``"mean"`` over valid tokens, or ``"min"`` / ``"max"`` over
    sequences of :func:`masked_seq_mean`. ``kl``, ``entropy`` and VESPO's ``phi`` are listed when given."""
    terms = {}
    if per_token_kl is not None:
        terms["kl"] = ("mean", per_token_kl)
    if entropies is not None:
        terms["entropy"] = ("mean", entropies)
    if loss_type in CLIPPED:
        low = ((coef_1 < 1 - epsilon_low) & (advantages < 0)).to(coef_1.dtype)
        high = ((coef_1 > 1 + epsilon_high) & (advantages > 0)).to(coef_1.dtype)
        terms.update({"clip_ratio/low_mean": ("mean", low), "clip_ratio/high_mean": ("mean", high),
                      "clip_ratio/region_mean": ("mean", ((low + high) > 0).to(coef_1.dtype)),
                      "clip_ratio/low_min": ("min", low), "clip_ratio/high_max": ("max", high)})
    elif loss_type == "cispo":
        terms["cispo_clip_ratio"] = ("mean", ((coef_1 > epsilon_high) & (advantages > 0)).to(coef_1.dtype))
    elif loss_type == "vespo" and phi is not None:
        terms["vespo/phi_seq_mean"] = ("mean", phi)
    return terms
