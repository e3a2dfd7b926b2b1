"""Reference of the fused PG loss: the materialised head of ``fusedpg.linear.reference`` followed by ``pg_loss``."""
from __future__ import annotations

from typing import Optional

import torch

from ..objective import pg_loss
from ..linear.reference import linear_logprob_entropy_reference


def fused_linear_pg_loss_reference(hidden, weight, targets, advantages, mask, *, bias=None, temperature=1.0,
                                   dtype: Optional[torch.dtype] = torch.float64, **pg_kwargs):
    """``pg_loss`` on ``linear_logprob_entropy_reference``: float64 by default; ``dtype=None`` is the eager
    same-dtype baseline (logits at the input dtype, upcast to fp32). Tokens outside ``mask`` are scored with
    target 0 (their log-probs are masked out by the loss)."""
    y = torch.where(mask.bool(), targets, torch.zeros_like(targets))
    logp, ent = linear_logprob_entropy_reference(hidden, weight, y, bias, temperature, dtype=dtype)
    return pg_loss(logp, advantages, mask, entropy=ent, **pg_kwargs)
