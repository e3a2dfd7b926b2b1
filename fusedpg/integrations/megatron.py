"""Megatron-core adapter: log-probs, entropy and the policy-gradient loss of a vocabulary-parallel output layer
(``ColumnParallelLinear``, or its weight shard), with the tensor-parallel group taken from ``parallel_state``.

Megatron computes ``logits = output_layer(hidden)`` (``[S, B, V/tp]`` per rank) and then
``vocab_parallel_cross_entropy``; these functions take the layer and ``hidden`` instead and never form the logits.
Layouts are Megatron's: ``hidden`` is ``[S, B, H]``, ``targets`` (pre-shifted labels) are ``[S, B]``; any leading
shape works as long as the two agree. With sequence parallelism the layer's input is the sequence shard; it is
gathered here with Megatron's own ``gather_from_sequence_parallel_region``, whose backward reduce-scatters
d_hidden, so the op leaves d_hidden unreduced (fusedpg/vocab_parallel/README.md). Tested against Megatron's
``vocab_parallel_cross_entropy`` on gloo ranks in tests/test_megatron.py.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ..linear import linear_logprob_entropy
from ..linear_pg import fused_linear_pg_loss

__all__ = ["megatron_logprob_entropy", "megatron_pg_loss"]


def _head(output_layer: Union[torch.nn.Module, torch.Tensor], hidden: torch.Tensor,
          sequence_parallel: Optional[bool]):
    from megatron.core import parallel_state, tensor_parallel

    if isinstance(output_layer, torch.Tensor):
        weight, bias, sp = output_layer, None, bool(sequence_parallel)
    else:
        weight, bias = output_layer.weight, getattr(output_layer, "bias", None)
        sp = getattr(output_layer, "sequence_parallel", False) if sequence_parallel is None else sequence_parallel
    if sp:  # [S/tp, B, H] -> [S, B, H]; its backward reduce-scatters d_hidden, so the op must not all-reduce it
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden)
    keywords = dict(vocab_parallel_group=parallel_state.get_tensor_model_parallel_group(), reduce_hidden_grad=not sp)
    return hidden, weight, bias, keywords


def megatron_logprob_entropy(hidden: torch.Tensor, targets: torch.Tensor,
                             output_layer: Union[torch.nn.Module, torch.Tensor], *,
                             sequence_parallel: Optional[bool] = None, **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(logp, entropy)`` of ``targets`` ``[S, B]`` under the sharded head; ``kwargs`` as in
    :func:`fusedpg.linear_logprob_entropy` (``temperature``, ``vocab_size`` for a padded vocabulary, ...).

    Equivalent Megatron: ``-vocab_parallel_cross_entropy(output_layer(hidden)[0].float(), targets)``."""
    hidden, weight, bias, keywords = _head(output_layer, hidden, sequence_parallel)
    return linear_logprob_entropy(hidden, weight, targets, bias=bias, **keywords, **kwargs)


def megatron_pg_loss(hidden: torch.Tensor, targets: torch.Tensor, output_layer: Union[torch.nn.Module, torch.Tensor],
                     advantages: torch.Tensor, mask: torch.Tensor, *, sequence_parallel: Optional[bool] = None,
                     **kwargs):
    """:func:`fusedpg.fused_linear_pg_loss` on the sharded head: ``(loss, metrics)``. ``advantages``, ``mask`` and
    the per-token loss inputs follow ``targets``' layout; normalisers count data-parallel ranks only."""
    hidden, weight, bias, keywords = _head(output_layer, hidden, sequence_parallel)
    return fused_linear_pg_loss(hidden, weight, targets, advantages, mask, bias=bias, **keywords, **kwargs)
