"""Plain-torch reference of ``logprob_entropy``: it defines what every log-prob kernel must compute.

float64 by default; with ``dtype=None`` it runs the way trainers do today (fp32 upcast), which is the ``torch_D``
term of the tolerance model (``fusedpg/verification/tolerance.py``) and the benchmark's eager baseline.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ..truncation import OUTSIDE_LOGP


def logprob_entropy_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: Union[float, torch.Tensor] = 1.0,
    ignore_index: int = -100,
    dtype: Optional[torch.dtype] = torch.float64,
    truncation: Optional[tuple] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """logits ``[..., V]``, targets ``[...]`` -> (logp, entropy), each ``[...]``, differentiable through both.
    ``truncation=(top_k, top_p, min_p)``: of the truncated sampling distribution, by ``truncate_reference``.

    Equivalent to ``z = logits / T; logp = log_softmax(z).gather(targets); H = -(softmax(z) * log_softmax(z)).sum()``
    with ignored rows set to 0. ``dtype=None`` computes in fp32 (eager trainer semantics).
    """
    work = dtype or torch.float32
    z = logits.to(work)
    if isinstance(temperature, torch.Tensor) and temperature.numel() == 1:
        z = z / temperature.to(work).reshape(())  # one temperature for every row, given as a tensor
    elif isinstance(temperature, torch.Tensor):
        z = z / temperature.to(work).reshape(*z.shape[:-1], 1)
    else:
        z = z / temperature
    if truncation is not None:
        z = truncate_reference(z, *truncation)
    valid = targets != ignore_index
    multi = targets.dim() == z.dim()  # [..., K] targets: K log-probs per position, one entropy
    logsm = torch.log_softmax(z, dim=-1)
    idx = torch.where(valid, targets, 0).long()
    logp = logsm.gather(-1, idx) if multi else logsm.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    p = logsm.exp()
    # p * log p is 0 where p == 0 (-inf logit columns); mask log p first so its gradient stays finite too.
    safe = torch.where(p > 0, logsm, torch.zeros((), dtype=work, device=z.device))
    entropy = -(p * safe).sum(-1)
    zero = torch.zeros((), dtype=work, device=z.device)
    if truncation is not None:  # a target outside the kept set: the documented finite floor, no gradient
        logp = torch.where(torch.isneginf(logp), torch.full_like(logp, OUTSIDE_LOGP), logp)
    return torch.where(valid, logp, zero), torch.where(valid.any(-1) if multi else valid, entropy, zero)


def _per_row(value, rows: int, like: torch.Tensor):
    if value is None:
        return None
    return (value.reshape(-1) if isinstance(value, torch.Tensor) else torch.full((rows,), value)).to(like.device)


def truncate_reference(z: torch.Tensor, top_k=None, top_p=None, min_p=None) -> torch.Tensor:
    """vLLM v1's sampler on dense tempered logits ``[..., V]``, with its sort and cumsum: min-p on the
    probabilities, then top-k (keep logits >= the k-th largest), then top-p on the renormalised rest (ascending
    sort, drop while the cumulative mass is <= 1 - p, always keep the largest). Returns a masked copy."""
    shape, vocab = z.shape, z.shape[-1]
    z = z.reshape(-1, vocab)
    rows = z.shape[0]
    min_p, top_k, top_p = (_per_row(v, rows, z) for v in (min_p, top_k, top_p))
    if min_p is not None:
        probs = torch.softmax(z, -1)
        drop = probs < min_p.to(z.dtype)[:, None] * probs.amax(-1, keepdim=True)
        z = z.masked_fill(drop, float("-inf"))
    if top_k is not None:
        k = top_k.long().clamp(min=1, max=vocab)
        kth = z.sort(-1, descending=True).values.gather(-1, (k - 1)[:, None])
        off = ((top_k <= 0) | (top_k >= vocab))[:, None]
        z = z.masked_fill(~off & (z < kth), float("-inf"))
    if top_p is not None:
        sorted_z, order = z.sort(-1)
        cum = torch.softmax(sorted_z, -1).cumsum(-1)
        drop = cum <= 1 - top_p.to(z.dtype)[:, None]
        drop[:, -1] = False
        drop &= (top_p < 1)[:, None]
        z = z.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return z.reshape(shape)
