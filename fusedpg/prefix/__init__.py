"""Shared-prefix ("Prefix Grouper") attention for GRPO groups: encode each prompt once for its G completions.

``pack`` builds packed ``input_ids``/``position_ids`` and a ``PrefixLayout``; ``shared_prefix_attention`` is the
attention op (Triton forward and backward, a torch CPU plan, a dense reference); ``register_transformers`` makes it
an attention implementation of Hugging Face ``transformers`` (imported only when called). README.md here has the
math and the usage.
"""
from .attention import shared_prefix_attention
from .layout import Packed, PrefixLayout, pack
from .reference import shared_prefix_attention_reference, visibility


def unpack(x, layout: PrefixLayout, *, predict: bool = True, padded: bool = False):
    """``layout.unpack(x, predict=predict, padded=padded)``: per-completion rows of a packed tensor."""
    return layout.unpack(x, predict=predict, padded=padded)


def register_transformers(*args, **kwargs):
    """See ``fusedpg.prefix.hf.register_transformers`` (imported lazily: transformers is optional)."""
    from .hf import register_transformers as _register

    return _register(*args, **kwargs)


__all__ = ["pack", "unpack", "Packed", "PrefixLayout", "shared_prefix_attention", "shared_prefix_attention_reference",
           "visibility", "register_transformers"]
