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


def sample_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    num_samples: int,
    seed: int,
    sample_ids: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    temperature: Union[float, torch.Tensor] = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float64 inverse-CDF draws of ``sample_logprob_entropy`` for hidden ``[N, H]`` and ids ``[N]``, with one flat
    cumsum over the row: (tokens ``[N, K]``, margin ``[N, K]``), the margin being the distance of the draw's
    uniform to the nearest edge of the drawn token's interval, as a fraction of the row's mass (a draw whose
    margin is below the op's rounding of the probabilities may legitimately differ)."""
    from ..sampling import uniforms

    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z / (temperature.double().reshape(-1, 1) if isinstance(temperature, torch.Tensor) else temperature)
    p = torch.softmax(z, -1)
    cum = p.cumsum(-1)
    u = uniforms(seed, sample_ids, num_samples) * cum[:, -1:]
    tokens = torch.searchsorted(cum, u, right=True).clamp(max=z.shape[1] - 1)
    lo = torch.where(tokens > 0, cum.gather(1, (tokens - 1).clamp(min=0)), torch.zeros_like(u))
    margin = torch.minimum(u - lo, cum.gather(1, tokens) - u) / cum[:, -1:]
    return tokens, margin
