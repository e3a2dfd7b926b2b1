"""Per-chunk softmax statistics and logits gradient in torch, shared by the torch (CPU) plans.

Both functions take a chunk of *tempered* logits ``z = u / T`` as an owned fp32/fp64 buffer and overwrite it, so a
chunk costs at most two ``[rows, V]`` buffers. The math is in docs/math.md#online-statistics; the derivation is in
``fusedpg/linear/README.md``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# exp(x) is exactly 0 in fp32 below about -104 and in fp64 below about -745, so clamping shifted logits at this
# floor changes no probability, while it turns -inf columns into finite numbers: 0 * floor = 0 instead of NaN.
SHIFT_FLOOR = -1.0e4


def softmax_stats(
    z: torch.Tensor, targets: torch.Tensor, compute_entropy: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """z ``[R, V]`` (overwritten), targets ``[R]`` -> (logp, entropy, m, log_s), each ``[R]``; targets ``[R, K]``
    (several per row, statistics computed once) give logp ``[R, K]``.

    Equivalent to ``lse = z.logsumexp(-1); logp = z.gather(targets) - lse; H = lse - (softmax(z) * z).sum(-1)``,
    with ``lse = m + log_s`` kept as its two parts: at logits of 1e4 a rounded lse would cost 1e-3 of accuracy in
    ``z - lse``, while ``(z - m) - log_s`` is exact to the last bit. A row whose every logit is -inf gets
    ``logp = log_s = -inf`` and ``H = 0``. A negative target (its column lies in another vocabulary shard, see
    ``fusedpg/vocab_parallel``) gives a meaningless logp and the rest as usual.
    """
    multi = targets.dim() == 2
    zy = z.gather(1, target_columns(targets))
    m = z.amax(1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    z.sub_(m.unsqueeze(1)).clamp_(min=SHIFT_FLOOR)
    e = torch.exp(z)
    s = e.sum(1)
    log_s = torch.log(s)
    # an all -inf row: log_s = -inf; zy - m would be NaN
    logp = torch.where(s[:, None] > 0, (zy - m[:, None]) - log_s[:, None], log_s[:, None])
    logp = logp if multi else logp.squeeze(1)
    if compute_entropy:
        q = torch.linalg.vecdot(e, z)  # sum_v e_v (z_v - m): relative to the max, so no cancellation
        entropy = torch.where(s > 0, log_s - q / s, torch.zeros_like(s))
    else:
        entropy = torch.zeros_like(s)
    return logp, entropy, m, log_s


def softmax_grad_(
    z: torch.Tensor,
    targets: torch.Tensor,
    m: Optional[torch.Tensor],
    log_s: torch.Tensor,
    entropy: torch.Tensor,
    c: torch.Tensor,
    d: Optional[torch.Tensor],
    temperature,
) -> torch.Tensor:
    """Gradient w.r.t. the untempered logits ``u``, written over z ``[R, V]`` and returned.

    ``g_v = (c (1[v = y] - p_v) - d p_v (log p_v + H)) / T`` with ``log p = (z - m) - log_s``; ``d=None`` skips
    the entropy term; ``m=None`` when z already holds ``z - m``. c, d, m, log_s, entropy are ``[R]``;
    temperature a ``Temperature`` of the chunk's rows. A negative target has no ``1[v = y]`` term (its column lies in
    another vocabulary shard). Several targets per row: targets and c ``[R, K]``, and the ``p_v`` term takes the
    row's ``sum_k c_k``.
    """
    # An all -inf row (log_s = -inf) has no gradient: shift it by +inf so every p is 0, and drop its c.
    dead = torch.isneginf(log_s)
    log_s = torch.where(dead, torch.full_like(log_s, float("inf")), log_s)
    per_target = (c if c.dim() == 2 else c.unsqueeze(1)).masked_fill(dead.unsqueeze(1), 0.0)
    # 1/T is folded into the per-row coefficients, which saves a pass over the [R, V] chunk.
    per_target = temperature.scale(per_target)
    c, d = per_target.sum(1), None if d is None else temperature.scale(d)
    if m is not None:
        z.sub_(m.unsqueeze(1))
    z.sub_(log_s.unsqueeze(1)).clamp_(min=SHIFT_FLOOR)  # log p
    p = torch.exp(z)
    if d is None:
        g = p.mul_(-c.unsqueeze(1))
    else:
        # -(c + d (log p + H)) = (-d) log p - (c + d H): two passes over the chunk, then one product with p
        g = p.mul_(z.mul_(-d.unsqueeze(1)).sub_((c + d * entropy).unsqueeze(1)))
    here = (targets if targets.dim() == 2 else targets.unsqueeze(1)) >= 0
    return g.scatter_add_(1, target_columns(targets), per_target.masked_fill(~here, 0.0))


def target_columns(targets: torch.Tensor) -> torch.Tensor:
    """``[R, K]`` gather / scatter indices of the targets (a negative one, in another shard, reads column 0)."""
    idx = targets.clamp(min=0)
    return idx if idx.dim() == 2 else idx.unsqueeze(1)


def partial(logp, entropy, m, log_s, targets) -> torch.Tensor:
    """One vocabulary part's (a TP shard's, a low-memory block's) statistics as a mergeable ``[5, R]`` partial:
    m, log s, entropy, ``z_y - m`` where the target lies in the part, and that flag (a negative target: elsewhere)."""
    here = targets >= 0
    y_rel = torch.where(here, logp + log_s, torch.zeros_like(logp))
    return torch.stack([m, log_s, entropy, y_rel, here.to(m.dtype)])


def rescaled(part: torch.Tensor, top: torch.Tensor):
    """A partial's (sum-exp, entropy term, target logit) taken from its own max to ``top`` (fusedpg/vocab_parallel/
    README.md has the algebra)."""
    m, log_s, ent, y_rel, here = part.unbind(0)
    shift = m - top
    s = torch.exp(log_s + shift)
    t = torch.where(s > 0, s * (log_s - ent + shift), torch.zeros_like(s))
    return s, t, torch.where(here > 0, y_rel + shift, torch.zeros_like(s))


def merged(s, t, y, top, compute_entropy: bool):
    """(logp, entropy, m, log_s) over the whole vocabulary from the summed rescaled terms."""
    alive = s > 0
    log_s = torch.log(s)
    logp = torch.where(alive, y - log_s, log_s)
    entropy = torch.where(alive, log_s - t / torch.where(alive, s, 1.0), torch.zeros_like(s))
    return logp, entropy if compute_entropy else torch.zeros_like(s), top, log_s


def segment_stats(z3: torch.Tensor, compute_entropy: bool):
    """z3 ``[R, S, seg]`` tempered logits (overwritten) -> per-segment (m, s, q), each ``[R, S]``: the segment's max
    (``-inf`` for an all ``-inf`` segment), ``s = sum exp(z - m)`` and ``q = sum exp(z - m) (z - m)``."""
    m = z3.amax(2)
    z3.sub_(torch.where(torch.isfinite(m), m, torch.zeros_like(m)).unsqueeze(2)).clamp_(min=SHIFT_FLOOR)
    e = torch.exp(z3)
    s = e.sum(2)
    return m, s, torch.linalg.vecdot(e, z3) if compute_entropy else torch.zeros_like(s)


def merge_segments(m: torch.Tensor, s: torch.Tensor, q: torch.Tensor, zy: torch.Tensor, compute_entropy: bool):
    """(logp, entropy, m, log_s) ``[R]`` (logp ``[R, K]`` for ``zy`` ``[R, K]``) from per-segment states ``[R, S]``
    and the targets' tempered logits ``zy``, the segments summed in their order along the last dimension."""
    top = m.amax(1)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    empty = torch.isneginf(m)
    delta = torch.where(empty, 0.0, m - top.unsqueeze(1))
    alpha = torch.where(empty, 0.0, torch.exp(delta))
    total = (alpha * s).sum(1)
    log_s = torch.log(total)
    alive = total > 0
    shift = (zy - top.unsqueeze(1)) if zy.dim() == 2 else zy - top
    wide = (lambda x: x.unsqueeze(1) if zy.dim() == 2 else x)
    logp = torch.where(wide(alive), shift - wide(log_s), wide(log_s))
    if not compute_entropy:
        return logp, torch.zeros_like(total), top, log_s
    q_total = (alpha * (q + delta * s)).sum(1)
    return logp, torch.where(alive, log_s - q_total / torch.where(alive, total, 1.0), 0.0), top, log_s


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for every input dtype; fp64 inputs stay fp64 so gradcheck can run."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows_per_chunk(vocab: int, chunk_bytes: int, elem_bytes: int = 4) -> int:
    return max(1, chunk_bytes // max(1, vocab * elem_bytes))
