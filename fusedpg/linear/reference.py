"""Plain-torch reference of ``linear_logprob_entropy``: the LM head, materialised, then the logits reference."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ..logits.reference import logprob_entropy_reference


def linear_logprob_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: Union[float, torch.Tensor] = 1.0,
    ignore_index: int = -100,
    dtype: Optional[torch.dtype] = torch.float64,
    truncation: Optional[tuple] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """hidden ``[..., H]``, weight ``[V, H]``, targets ``[...]`` -> (logp, entropy), each ``[...]``.

    Equivalent to ``logprob_entropy_reference(hidden @ weight.T + bias, ...)``. With a ``dtype`` the head runs
    in that dtype; with ``dtype=None`` it runs at the input dtype (materialising the logits, as trainers do).
    """
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return logprob_entropy_reference(logits, targets, temperature, ignore_index, dtype, truncation)
