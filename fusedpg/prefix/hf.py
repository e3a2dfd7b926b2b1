"""Hugging Face ``transformers`` integration: shared-prefix attention as a registered attention implementation.

Usage (transformers >= 4.53, 5.x)::

    name = fusedpg.prefix.register_transformers()            # "fusedpg_prefix"; once, before building models
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=name)   # or from_pretrained(...)
    packed = fusedpg.prefix.pack(prompts, completions)
    out = model.model(**packed.model_kwargs())                # input_ids, position_ids, prefix_layout, ...
    rows = packed.layout.unpack(out.last_hidden_state)        # [sum L, hidden]: rows that predict each completion

The layout travels as the forward keyword argument ``prefix_layout``: transformers hands unknown forward kwargs down
to every attention call, and gradient checkpointing replays them, so no model code changes. Without
``prefix_layout`` the registered implementation *is* its fallback (``"sdpa"`` by default, or ``"eager"``, ...): the
fallback's mask function builds the mask and the fallback's attention function runs, bit for bit as before —
generation included. With a layout the transformers mask is ignored; ``packed.model_kwargs()`` passes a zero-size
4-D placeholder as ``attention_mask`` so that transformers does not build an ``S x S`` mask for nothing.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch

from .attention import check_inputs, shared_prefix_attention
from .layout import PrefixLayout

LAYOUT_KWARG = "prefix_layout"
DEFAULT_NAME = "fusedpg_prefix"


def _fallback_attention(module, fallback: str):
    if fallback == "eager":
        # Each modeling file defines its own eager function (softcapping, sinks...); use the module's own.
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            from transformers.models.llama.modeling_llama import eager_attention_forward as fn
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[fallback]


def _check_call(module, query, layout: PrefixLayout, dropout: float, kwargs) -> None:
    if dropout and dropout > 0:
        raise ValueError(f"dropout must be 0 with prefix_layout (got {dropout}; module.training={module.training}): "
                         "the repeated batch draws G independent dropout masks on the prompt, so grouped training "
                         "could not match it. Set the config's attention_dropout to 0.0")
    window = kwargs.get("sliding_window")
    longest = max(p + max(c) for p, c in zip(layout.prompt_lens, layout.completion_lens))
    if window is not None and int(window) < longest:
        raise ValueError(f"sliding_window={window} is shorter than the longest prompt + completion ({longest}); "
                         "shared-prefix attention implements full causal attention only")
    if kwargs.get("softcap") is not None:
        raise ValueError(f"softcap={kwargs['softcap']} is not supported by shared-prefix attention")
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        raise ValueError("is_causal=False is not supported by shared-prefix attention (it is causal by construction)")
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        layout.check_position_ids(position_ids, "position_ids")


def make_attention_function(fallback: str = "sdpa"):
    """The attention function registered by ``register_transformers``; ``fallback`` runs when no layout is given."""

    def fusedpg_prefix_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                 value: torch.Tensor, attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                                 scaling: Optional[float] = None, **kwargs):
        layout = kwargs.get(LAYOUT_KWARG)
        if layout is None:
            if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.shape[-1] == 0:
                raise ValueError("prefix_layout is missing: attention_mask is the layout's placeholder "
                                 "(from Packed.model_kwargs()), so pass prefix_layout=layout too")
            return _fallback_attention(module, fallback)(module, query, key, value, attention_mask, dropout=dropout,
                                                         scaling=scaling, **kwargs)
        if not isinstance(layout, PrefixLayout):
            raise TypeError(f"prefix_layout must be a fusedpg.prefix.PrefixLayout, got {type(layout).__name__}")
        if torch.is_autocast_enabled(query.device.type):  # as sdpa does: q (RoPE-upcast) and k, v may differ
            dtype = torch.get_autocast_dtype(query.device.type)
            query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        check_inputs(query, key, value, layout)
        _check_call(module, query, layout, dropout, kwargs)
        out = shared_prefix_attention(query, key, value, layout, scale=scaling)  # [B, Hq, S, D]
        return out.transpose(1, 2), None  # [B, S, Hq, D], contiguous for the Triton and torch plans

    fusedpg_prefix_attention.fallback = fallback
    return fusedpg_prefix_attention


def register_transformers(name: str = DEFAULT_NAME, fallback: str = "sdpa") -> str:
    """Register shared-prefix attention with transformers as ``attn_implementation=name``; return ``name``.

    Registers the attention function with ``AttentionInterface`` and, for the mask, the fallback's own mask function
    with ``AttentionMaskInterface``, so that a model not given ``prefix_layout`` computes exactly what
    ``attn_implementation=fallback`` computes. Call it before building the model (transformers validates the name).
    Idempotent; call again with another ``name`` for another fallback.
    """
    import transformers
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    version = tuple(int(x) for x in transformers.__version__.split(".")[:2] if x.isdigit())
    if version < (4, 53):
        raise RuntimeError(f"fusedpg.prefix needs transformers >= 4.53 (its attention-mask registry), "
                           f"found {transformers.__version__}")
    if fallback != "eager" and fallback not in AttentionInterface._global_mapping:
        raise ValueError(f"fallback must be 'eager' or a registered attention implementation, got {fallback!r}")
    if fallback not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        raise ValueError(f"fallback must have a registered mask function, got {fallback!r}")
    AttentionInterface.register(name, make_attention_function(fallback))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[fallback])
    return name
