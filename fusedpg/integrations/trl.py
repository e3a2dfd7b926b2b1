"""TRL integration: ``FusedPGGRPOTrainer``, a drop-in ``trl.GRPOTrainer`` whose loss and old/ref log-prob passes
run on hidden states through fusedpg's fused LM head + loss (no ``B x T x V`` logits), with TRL's own loss,
gradients and logged metrics. What it covers, where it falls back to TRL and how it differs:
docs/integrations.md#trl-fusedpggrpotrainer. Checked against an unmodified TRL in tests/test_integrations_trl.py.
"""
from __future__ import annotations

import functools
import types
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from transformers.utils import ModelOutput

from ..head import UNSUPPORTED_HEAD_CONFIG, call_through, install_lm_head

try:  # optional dependency: the module imports without TRL, the trainer class needs it
    from trl import GRPOTrainer as _GRPOTrainer
    from trl.trainer.utils import nanmax, nanmin
except ImportError:  # pragma: no cover - exercised only without the extra
    _GRPOTrainer = None

from .trl_support import (
    GLOBAL_NORM, MULTIMODAL_KEYS, SUPPORTED_TRL, importance_weights, k3_kl, masked_seq_mean, metric_terms,
    rollout_is_weights, trl_loss_options,
)

__all__ = ["FusedPGGRPOTrainer", "trl_loss_options", "add_hidden_state_forward", "SUPPORTED_TRL"]


@dataclass
class HiddenStateOutput(ModelOutput):
    last_hidden_state: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None


def add_hidden_state_forward(model) -> None:
    """Let ``model(..., fusedpg_hidden=True)`` return the backbone's last hidden state (and the MoE load-balancing
    loss) instead of logits. Other calls go to the previous forward unchanged. Calling it through the wrapped model
    (DDP, PEFT) keeps DDP's reducer armed (docs/peers.md#known-bugs-turned-into-tests, row 11)."""
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


if _GRPOTrainer is not None:

    class FusedPGGRPOTrainer(_GRPOTrainer):
        """``trl.GRPOTrainer`` whose training loss runs on hidden states through fusedpg (see the module docstring)."""

        def __init__(self, *args, fusedpg_impl: Optional[str] = None, fusedpg_chunk_bytes: Optional[int] = None,
                     prefix_grouper: bool = False, fusedpg_sampler_parity: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.fusedpg_sampler_parity = bool(fusedpg_sampler_parity)
            self.fusedpg_impl = fusedpg_impl
            self.fusedpg_chunk_bytes = fusedpg_chunk_bytes
            self.prefix_grouper = bool(prefix_grouper)
            if self.prefix_grouper:
                impl = getattr(self.model.config, "_attn_implementation", None)
                from ..prefix.hf import DEFAULT_NAME

                if impl is None or not str(impl).startswith(DEFAULT_NAME):
                    raise ValueError("prefix_grouper=True needs a model built with attn_implementation="
                                     "fusedpg.prefix.register_transformers() (got attn_implementation="
                                     f"{impl!r})")
            self._fusedpg_warned = False
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            add_hidden_state_forward(base)
            self._fusedpg_base = base
            if self._fusedpg_unsupported({}, base) is None:
                install_lm_head(base)  # now, before Trainer.train wraps the model: the wrappers must hook this head

        # -- helpers ---------------------------------------------------------------------------------------------
        def _fusedpg_unsupported(self, inputs, base=None) -> Optional[str]:
            base = self._fusedpg_base if base is None else base
            if any(inputs.get(k) is not None for k in MULTIMODAL_KEYS):
                return "multimodal inputs"
            cfg = base.config.get_text_config()
            for name in UNSUPPORTED_HEAD_CONFIG:
                if getattr(cfg, name, None) not in (None, 1.0):
                    return f"a model with {name}={getattr(cfg, name)!r}"
            head = base.get_output_embeddings()
            if not isinstance(head, torch.nn.Linear) or hasattr(head, "lora_A") or hasattr(head, "base_layer"):
                return "an lm_head that is not a plain linear layer (e.g. LoRA-wrapped)"
            return None

        def _fusedpg_run(self, model, base, ids, am, k: int, grouped: bool, head_fn):
            """(model output, ``head_fn(head, hidden)``) with the backbone's last hidden states ``[B, k, H]``, both run
            as one forward of ``model``'s outermost wrapper (``fusedpg.call_through``): DDP arms its all-reduce,
            ZeRO-3 gathers the head's weight inside the head's forward, FSDP2 unshards it, and each reduces the
            head's gradient through its own hooks."""
            head = base.get_output_embeddings()

            def step():
                out, hidden = self._fusedpg_forward(base.forward, ids, am, k, grouped)
                return out, head_fn(head, hidden)

            return call_through(model, step)

        def _fusedpg_pack(self, prompt_ids, prompt_mask, completion_ids, completion_mask):
            """Group consecutive rows that share a prompt and pack them (None if a completion mask is not a
            contiguous prefix, where the packed rows would not line up with TRL's)."""
            from ..prefix import pack

            pm, cm = prompt_mask.bool(), completion_mask.bool()
            lens = cm.sum(-1)
            if bool((cm != (torch.arange(cm.shape[1], device=cm.device)[None] < lens[:, None])).any()):
                return None
            prompts, groups = [], []
            for i in range(pm.shape[0]):
                prompt = prompt_ids[i][pm[i]]
                comp = completion_ids[i][:max(int(lens[i]), 1)]  # an empty completion keeps one masked token
                if prompts and prompts[-1].shape == prompt.shape and bool((prompts[-1] == prompt).all()):
                    groups[-1].append(comp)
                else:
                    prompts.append(prompt)
                    groups.append([comp])
            pad = self.processing_class.pad_token_id if self.processing_class.pad_token_id is not None else 0
            return pack(prompts, groups, pad_token_id=int(pad), device=prompt_ids.device)

        def _fusedpg_forward(self, model, ids, am, k: int, grouped: bool):
            """(model output, last hidden states ``[B, k, H]`` at the positions that predict the last ``k`` tokens),
            through ``model``'s own forward so that its wrappers' hooks run; packed per prompt when ``grouped``
            (Prefix Grouper: each prompt once, its completions attend to it)."""
            packed = self._fusedpg_pack(ids[:, :-k], am[:, :-k], ids[:, -k:], am[:, -k:]) if grouped else None
            with self.accelerator.autocast():
                if packed is None:
                    out = model(input_ids=ids, attention_mask=am, fusedpg_hidden=True)
                    return out, out.last_hidden_state[:, -k - 1:-1]
                out = model(**packed.model_kwargs(), fusedpg_hidden=True)
            hidden = packed.layout.unpack(out.last_hidden_state, padded=True)
            return out, torch.nn.functional.pad(hidden, (0, 0, 0, k - hidden.shape[1]))

        def _fusedpg_nograd_base(self, model):
            """The causal-LM module under ``model``'s wrappers (DDP/DeepSpeed, PEFT), with the hidden-state forward
            added (the reference model gets it on first use), or None where fusedpg's no-grad pass cannot apply."""
            try:
                base = self.accelerator.unwrap_model(model)
            except Exception:  # pragma: no cover - an exotic wrapper: keep TRL's pass
                return None
            if hasattr(base, "get_base_model"):
                base = base.get_base_model()
            if not hasattr(base, "base_model") or not hasattr(base, "get_output_embeddings") or not hasattr(
                    base, "config"):
                return None
            add_hidden_state_forward(base)
            return base

        def _fusedpg_sampling(self) -> dict:
            """With ``fusedpg_sampler_parity=True``: score the distribution the rollouts were drawn from (GRPOConfig's
            ``top_k``, ``top_p``, ``min_p``); otherwise TRL's full softmax."""
            if not self.fusedpg_sampler_parity:
                return {}
            settings = {"top_k": int(self.top_k or 0), "top_p": float(1.0 if self.top_p is None else self.top_p),
                        "min_p": float(self.min_p or 0.0)}
            off = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}
            return {k: v for k, v in settings.items() if v != off[k]}

        def _fusedpg_installed(self, base) -> bool:
            """Install the fused head on ``base`` (the reference model on first use); False where a wrapper already
            hooks its head (a reference model DeepSpeed or FSDP2 prepared in ``__init__``): TRL's pass runs there."""
            try:
                install_lm_head(base)
            except ValueError:
                return False
            return True

        # -- TRL's no-grad log-prob passes (old policy, reference policy) ---------------------------------------
        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                               **kwargs):
            """TRL's old/ref log-prob pass (``_generate_and_score_completions``, under ``torch.no_grad``) on fusedpg:
            the backbone's hidden states and :func:`fusedpg.linear_logprob_entropy` (no ``N x V`` logits), with the
            packed grouped forward when ``prefix_grouper`` is on. Same return as TRL's; calls with autograd on (TRL's
            own ``_compute_loss``, used on the fallback path), with the MoE aux loss, or that the fused path does not
            cover (multimodal, soft-capped/scaled logits, a LoRA-wrapped head, a reference model wrapped before the
            fused head could be installed) go to TRL's."""
            base = None
            if not torch.is_grad_enabled() and not compute_aux_loss:
                base = self._fusedpg_nograd_base(model)
            if base is None or self._fusedpg_unsupported(kwargs, base) is not None or not self._fusedpg_installed(base):
                return super()._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                    compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **kwargs)
            grouped = False
            if self.prefix_grouper:
                from ..prefix.hf import DEFAULT_NAME

                grouped = str(getattr(base.config, "_attn_implementation", None)).startswith(DEFAULT_NAME)
            k = int(logits_to_keep)
            batch_size = batch_size or input_ids.size(0)
            all_logps, all_entropies = [], []
            for start in range(0, input_ids.size(0), batch_size):
                ids, am = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
                valid = am[:, -k:] != 0
                targets = ids[:, -k:].masked_fill(~valid, -100)
                _, (logps, ent) = self._fusedpg_run(
                    model, base, ids, am, k, grouped,
                    lambda head, hidden: head(hidden, targets, temperature=float(self.temperature),
                                              compute_entropy=compute_entropy, check_targets=False,
                                              impl=self.fusedpg_impl, **self._fusedpg_sampling()))
                all_logps.append(logps)
                if compute_entropy:
                    all_entropies.append(torch.where(valid, ent, torch.zeros_like(ent)))
            logps = torch.cat(all_logps, dim=0)
            entropies = torch.cat(all_entropies, dim=0) if compute_entropy else None
            return logps, entropies, None

        # -- the loss --------------------------------------------------------------------------------------------
        def _compute_loss(self, model, inputs):
            reason = self._fusedpg_unsupported(inputs)
            if reason is not None:
                if not self._fusedpg_warned:
                    warnings.warn(f"fusedpg: falling back to TRL's loss for {reason}", stacklevel=2)
                    self._fusedpg_warned = True
                return super()._compute_loss(model, inputs)

            mode = "train" if self.model.training else "eval"
            prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
            completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
            input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
            attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
            mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
            maskf = mask.float()
            targets = completion_ids
            temperature = float(self.temperature)
            advantages = inputs["advantages"]
            adv2 = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
            old = inputs.get("old_per_token_logps")
            ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
            is_ratio = inputs.get("importance_sampling_ratio")
            is_used = self.loss_type == "vespo" or (self.use_vllm and self.vllm_importance_sampling_correction)
            is_weights = rollout_is_weights(self.loss_type, is_ratio if is_used else None, maskf)
            rollout = None
            if self.off_policy_mask_threshold is not None:
                rollout = inputs.get("sampling_per_token_logps")

            if self._entropy_bonus_enabled:
                if self.use_adaptive_entropy:
                    apply_coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
                else:
                    apply_coef = self.entropy_coef
            else:
                apply_coef = 0.0
            nib = inputs.get("num_items_in_batch")
            num_tokens = float(maskf.sum())
            opts = trl_loss_options(self, train=mode == "train",
                                    num_items_in_batch=None if nib is None else float(nib),
                                    num_tokens=num_tokens, entropy_coef=float(apply_coef))

            def head_loss(head, hidden):
                old_logp = old
                if old_logp is None:  # on-policy: old = current log-probs (one no-grad pass of the head only)
                    with torch.no_grad():
                        old_logp = head(hidden.detach(), targets.masked_fill(mask == 0, -100), compute_entropy=False,
                                        temperature=temperature, impl=self.fusedpg_impl, check_targets=False,
                                        **self._fusedpg_sampling())[0]
                return old_logp, head(hidden, targets, advantages=advantages, mask=maskf, old_logp=old_logp,
                                      ref_logp=ref, temperature=temperature, return_token_stats=True,
                                      impl=self.fusedpg_impl, chunk_bytes=self.fusedpg_chunk_bytes,
                                      rollout_logp=rollout, is_weights=is_weights, **self._fusedpg_sampling(), **opts)

            out, (old, (loss, met)) = self._fusedpg_run(model, self._fusedpg_base, input_ids, attention_mask,
                                                        completion_ids.size(1), self.prefix_grouper, head_loss)
            ga = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            if self.aux_loss_enabled and out.aux_loss is not None:
                loss = loss + self.router_aux_loss_coef * out.aux_loss / ga
                self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(out.aux_loss).mean().item())

            self._fusedpg_log(mode, met, maskf, adv2, old, ref, is_ratio, ga, apply_coef)
            return loss

        def _fusedpg_log(self, mode, met, mask, advantages, old, ref, is_ratio, ga, apply_coef):
            """TRL's logged metrics, from the detached per-token log-probs and entropy of the fused pass."""
            logp = met["logp"].float()
            entropies = met["entropy"].float()
            on = mask > 0
            lr = torch.where(on, logp - old.float(), torch.zeros_like(logp))
            coef_1 = importance_weights(lr, mask, self.importance_sampling_level)

            def global_masked_mean(x):
                if x.shape[1] == 1:
                    local_sum, local_count = x.sum(), torch.tensor(float(x.shape[0]), device=x.device)
                else:
                    local_sum, local_count = (x * mask).sum(), mask.sum().float()
                totals = self.accelerator.reduce(torch.stack([local_sum, local_count]), reduction="sum")
                return (totals[0] / totals[1].clamp(min=1.0)).item()

            entropy_mask = None
            if self.top_entropy_quantile < 1.0:
                entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile)

            if self._entropy_bonus_enabled:
                # TRL's policy_loss: the loss before the GA division (dapo family: after its normaliser), KL included
                policy = (met["loss_policy"] + met.get("loss_kl", torch.zeros_like(met["loss_policy"]))).detach()
                if self.loss_type not in GLOBAL_NORM:
                    policy = policy * ga
                self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy).nanmean().item())
                effective = mask if entropy_mask is None else mask * entropy_mask
                if self.use_adaptive_entropy and mode == "train":
                    stats = torch.stack([(entropies * effective).sum(), effective.sum()]).detach()
                    if self._entropy_window_stats is None:
                        self._entropy_window_stats = stats
                    else:
                        self._entropy_window_stats = self._entropy_window_stats + stats
                    if self.accelerator.sync_gradients:
                        window = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                        world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
                        if world_entropy <= self.args.entropy_target:
                            self.entropy_coef = min(self.entropy_coef + self.args.entropy_coef_delta,
                                                    self.args.entropy_coef_max)
                        else:
                            self.entropy_coef = max(self.entropy_coef - self.args.entropy_coef_delta,
                                                    self.args.entropy_coef_min)
                        self._last_world_entropy = world_entropy
                        self._entropy_window_stats = None
                if mode == "train" and self.accelerator.sync_gradients:
                    self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

            per_token_kl = phi = None
            if self.beta != 0.0:
                per_token_kl = k3_kl(torch.where(on, ref.float() - logp, torch.zeros_like(logp)),
                                     coef_1 if self.args.use_bias_correction_kl else None)
            if self.loss_type == "vespo":
                phi = self.get_gamma_weights(advantages=advantages, log_ratio_per_token=lr, mask=mask,
                                             importance_sampling_ratio=is_ratio, k_pos=self.args.vespo_k_pos,
                                             lambda_pos=self.args.vespo_lambda_pos, k_neg=self.args.vespo_k_neg,
                                             lambda_neg=self.args.vespo_lambda_neg)
            terms = metric_terms(self.loss_type, coef_1, advantages, self.epsilon_low, self.epsilon_high,
                                 per_token_kl=per_token_kl, entropies=entropies, phi=phi)
            for name, (reduce, x) in terms.items():
                if reduce == "mean":
                    value = global_masked_mean(x)
                else:  # min / max over every rank's sequences
                    per_seq = self.accelerator.gather(masked_seq_mean(x, mask))
                    value = (nanmin(per_seq) if reduce == "min" else nanmax(per_seq)).item()
                self._metrics[mode][name].append(value)

else:  # pragma: no cover

    class FusedPGGRPOTrainer:  # type: ignore[no-redef]
        def __init__(self, *args, **kwargs):
            raise ImportError(f"fusedpg.integrations.trl needs TRL ({SUPPORTED_TRL}): pip install 'fusedpg[trl]'")
