"""Plain-torch reference of ``logprob_entropy``: it defines what every log-prob kernel must compute.

float64 by default; with ``dtype=None`` it runs the way trainers do today (fp32 upcast), which is the ``torch_D``
term of the tolerance model (``fusedpg/verification/tolerance.py``) and the benchmark's eager baseline.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch


def logprob_entropy_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: Union[float, torch.Tensor] = 1.0,
    ignore_index: int = -100,
    dtype: Optional[torch.dtype] = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """logits ``[..., V]``, targets ``[...]`` -> (logp, entropy), each ``[...]``, differentiable through both.

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
    valid = targets != ignore_index
    logsm = torch.log_softmax(z, dim=-1)
    logp = logsm.gather(-1, torch.where(valid, targets, 0).long().unsqueeze(-1)).squeeze(-1)
    p = logsm.exp()
    # p * log p is 0 where p == 0 (-inf logit columns); mask log p first so its gradient stays finite too.
    safe = torch.where(p > 0, logsm, torch.zeros((), dtype=work, device=z.device))
    entropy = -(p * safe).sum(-1)
    zero = torch.zeros((), dtype=work, device=z.device)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)
