"""Pieces of the TRL integration that do not need TRL itself: the supported versions, the hidden-state forward a
model gains for the fused passes, and the mapping from a ``GRPOTrainer``'s arguments to fusedpg's loss options."""
from __future__ import annotations

import functools
import math
import types
from dataclasses import dataclass
from typing import Optional

import torch
from transformers.utils import ModelOutput

SUPPORTED_TRL = ">=1.16,<2"
TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
_GLOBAL_NORM = ("cispo", "dapo", "vespo")
_MULTIMODAL = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "token_type_ids",
               "mm_token_type_ids", "image_position_ids", "spatial_shapes", "num_tiles")


@dataclass
class HiddenStateOutput(ModelOutput):
    last_hidden_state: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None


def add_hidden_state_forward(model) -> None:
    """Let ``model(..., fusedpg_hidden=True)`` return the backbone's last hidden state (and the MoE load-balancing
    loss) instead of logits. Other calls go to the previous forward unchanged. Calling it through the wrapped model
    (DDP, PEFT) keeps DDP's reducer armed (peers.md §2 row 11)."""
    if getattr(model, "_fusedpg_hidden_forward", False):
        return
    previous = model.forward
    text_config = model.config.get_text_config()

    @functools.wraps(type(model).forward)
    def _forward(self, *args, fusedpg_hidden=False, **kwargs):
        if not fusedpg_hidden:
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        out = self.base_model(*args, **kwargs)
        aux = None
        if kwargs.get("output_router_logits"):
            from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

            aux = load_balancing_loss_func(out.router_logits, text_config.num_experts,
                                           text_config.num_experts_per_tok, kwargs.get("attention_mask"))
        return HiddenStateOutput(last_hidden_state=out.last_hidden_state, aux_loss=aux)

    model.forward = types.MethodType(_forward, model)
    model._fusedpg_hidden_forward = True


def trl_loss_options(trainer, *, train: bool, num_items_in_batch: Optional[float], num_tokens: float,
                     entropy_coef: float) -> dict:
    """The :class:`fusedpg.PGLossConfig` keywords that reproduce TRL 1.16's ``_compute_loss`` for ``trainer``'s
    settings in one micro-step (``num_tokens`` = local valid tokens, ``entropy_coef`` = the coefficient applied)."""
    args, lt = trainer.args, trainer.loss_type
    if lt not in TRL_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {TRL_LOSS_TYPES}, got {lt!r}")
    ga = int(trainer.current_gradient_accumulation_steps) if train else 1
    world = int(trainer.accelerator.num_processes)
    opts = dict(loss_type=lt, epsilon_low=float(trainer.epsilon_low), epsilon_high=float(trainer.epsilon_high),
                dual_clip_c=math.inf, log_ratio_clamp=None, beta=float(trainer.beta), kl_estimator="k3",
                kl_bias_correction=bool(args.use_bias_correction_kl) and trainer.beta != 0.0,
                importance_sampling_level=trainer.importance_sampling_level,
                top_entropy_quantile=float(trainer.top_entropy_quantile), top_entropy_mode="trl",
                sapo_tau_pos=float(args.sapo_temperature_pos), sapo_tau_neg=float(args.sapo_temperature_neg),
                vespo_k_pos=float(args.vespo_k_pos), vespo_lambda_pos=float(args.vespo_lambda_pos),
                vespo_k_neg=float(args.vespo_k_neg), vespo_lambda_neg=float(args.vespo_lambda_neg),
                off_policy_mask_threshold=trainer.off_policy_mask_threshold,
                aggregation={"sapo": "grpo", "cispo": "dapo", "vespo": "dapo"}.get(lt, lt),
                max_completion_length=int(trainer.max_completion_length), gradient_accumulation_steps=ga,
                world_size=world, cispo_mode="trl", luspo_unmasked=False, entropy_coef=float(entropy_coef))
    if args.delta is not None and lt in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        opts["delta"] = float(args.delta)
    if lt in _GLOBAL_NORM:
        # TRL: sum / (clamp(N_glob, 1) / P * GA / steps_per_generation); fusedpg: sum * P / N_eff
        nib = max(float(num_items_in_batch), 1.0)
        if train:
            nib = nib * ga / float(args.steps_per_generation)
        opts["num_items_in_batch"] = nib
        if entropy_coef != 0.0:
            if trainer.top_entropy_quantile < 1.0:
                raise NotImplementedError(
                    f"the entropy bonus with top_entropy_quantile < 1 and loss_type={lt!r}: TRL divides the bonus by "
                    "the number of selected tokens, which fusedpg's one fused pass cannot know in advance")
            # fusedpg weights the dapo-family bonus like the policy term (P / N_eff); TRL 1.16 takes the local mean
            # over valid tokens divided by GA: rescale the coefficient by (N_eff / P) / (max(N_local, 1) * GA).
            opts["entropy_coef"] = entropy_coef * (nib / world) / (max(num_tokens, 1.0) * ga)
    return opts


def _fold_vespo_is(ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TRL folds ``sum over the ratio's last dim of clamp(log r, log 1e-8, 20)`` into VESPO's log-weight; fusedpg folds
    ``sum_t m_t clamp(log w_t)``: spread the total evenly over the sequence's valid tokens."""
    b, t = mask.shape
    logs = ratio.reshape(b, -1).float().log().clamp(math.log(1e-8), 20.0).sum(-1, keepdim=True)
    return torch.exp(logs / mask.sum(-1, keepdim=True).clamp(min=1.0)).expand(b, t).to(mask.dtype)
