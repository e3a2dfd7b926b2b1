"""Distillation from a teacher's top-k distribution, on the student's log-probs of the same ids.

The teacher gives, per position, K token ids and their log-probs ``[..., K]``; the student's log-probs of those ids
come from the multi-target head (``fusedpg.linear_logprob_entropy(hidden, weight, teacher_ids)``), so the student's
``N x V`` logits never exist and every gradient is exact. Both distributions live on K + 1 buckets: the K ids and a
**rest** bucket holding everything else.

* teacher: its top-k renormalised, ``t_k = softmax(teacher_logp)_k``, and ``t_rest = 0`` (a top-k list says nothing
  about the tail);
* student: ``s_k = exp(student_logp_k)`` and ``s_rest = 1 - sum_k s_k``, its exact tail mass.

``forward`` is ``KL(t || s) = sum_k t_k (log t_k - log s_k)``: the rest bucket has ``t_rest = 0`` and adds nothing,
but the student's tail mass is still paid for through ``s_k``. ``reverse`` is ``KL(s || t)`` on the K ids with the
student renormalised over them (``t_rest = 0`` would make the rest bucket infinite). ``jsd`` is the generalised
Jensen-Shannon divergence ``beta KL(t || m) + (1 - beta) KL(s || m)``, ``m = beta t + (1 - beta) s``, over all K + 1
buckets (finite: ``m_rest = (1 - beta) s_rest``). Sources and the choice of buckets: docs/losses.md#top-k-distillation.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import checks

KINDS = ("forward", "reverse", "jsd")


def _xlogy_ratio(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``p (log p - log q)`` with 0 where p = 0 (0 log 0 = 0, whatever q)."""
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))


def topk_distillation_loss(student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: Optional[torch.Tensor] = None,
                           *, kind: str = "forward", beta: float = 0.5) -> torch.Tensor:
    """Mean over the positions of ``mask`` of the divergence ``kind`` between the teacher's renormalised top-k and
    the student (shapes ``[..., K]``; ``mask`` ``[...]``, default all). Differentiable w.r.t. ``student_logp``.

    Equivalent PyTorch on dense student logits (K + 1 buckets, see the module docstring)::

        t = teacher_logp.softmax(-1); s = student_logp.exp(); rest = 1 - s.sum(-1)
        forward = (t * (t.log() - student_logp)).sum(-1)
    """
    checks.floating("student_logp", student_logp)
    checks.floating("teacher_logp", teacher_logp)
    if student_logp.shape != teacher_logp.shape or student_logp.dim() < 1:
        raise ValueError(f"teacher_logp must have student_logp's shape {tuple(student_logp.shape)} ([..., K]), got "
                         f"{checks._describe(teacher_logp)}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must lie in (0, 1), got {beta!r}")
    lead = student_logp.shape[:-1]
    if mask is None:
        mask = torch.ones(lead, dtype=student_logp.dtype, device=student_logp.device)
    elif tuple(mask.shape) != tuple(lead):
        raise ValueError(f"mask must have shape {tuple(lead)}, got {checks._describe(mask)}")
    work = torch.promote_types(student_logp.dtype, torch.float32)
    s_log, t_log = student_logp.to(work), torch.log_softmax(teacher_logp.detach().to(work), -1)
    t = t_log.exp()
    if kind == "forward":
        per = _xlogy_ratio(t, t_log, s_log).sum(-1)
    elif kind == "reverse":
        s_norm_log = torch.log_softmax(s_log, -1)
        per = _xlogy_ratio(s_norm_log.exp(), s_norm_log, t_log).sum(-1)
    else:
        s = s_log.exp()
        rest = (1.0 - s.sum(-1, keepdim=True)).clamp(min=0.0)
        s_all = torch.cat([s, rest], -1)
        t_all = torch.cat([t, torch.zeros_like(rest)], -1)
        m = beta * t_all + (1.0 - beta) * s_all
        log_m = torch.log(m.clamp(min=torch.finfo(work).tiny))
        log_s_all = torch.cat([s_log, torch.log(rest.clamp(min=torch.finfo(work).tiny))], -1)
        log_t_all = torch.cat([t_log, torch.zeros_like(rest)], -1)
        per = beta * _xlogy_ratio(t_all, log_t_all, log_m).sum(-1) + \
            (1.0 - beta) * _xlogy_ratio(s_all, log_s_all, log_m).sum(-1)
    m = mask.to(work)
    return (per * m).sum() / m.sum().clamp(min=1.0)


def on_policy_distillation_advantage(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """Per-token advantage of on-policy distillation: ``teacher_logp - student_logp`` of the sampled token
    (detached), to pass as ``advantages`` ``[B, T]`` to :func:`fusedpg.pg_loss` or the fused loss."""
    checks.floating("teacher_logp", teacher_logp)
    checks.floating("student_logp", student_logp)
    if teacher_logp.shape != student_logp.shape:
        raise ValueError(f"teacher_logp must have student_logp's shape {tuple(student_logp.shape)}, got "
                         f"{checks._describe(teacher_logp)}")
    return (teacher_logp.detach() - student_logp.detach()).to(torch.promote_types(student_logp.dtype,
                                                                                  torch.float32))
