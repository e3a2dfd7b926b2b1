"""The chunk driver of the fused PG loss: sequence-aligned chunks of active tokens, statistics, per-token
coefficients from the loss layer, gradient contributions (one pass); and the two-phase plan."""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from ..gemm import accumulate_mm_
from ..objective import (PGBatch, PGLossConfig, batch_coefficients, epilogue_spec, merge_metrics, plan_of,
                         token_loss)
from ..options import LogProbOptions
from ..rows import kept_first
from ..softmax_math import rows_per_chunk
from ..temperature import Temperature
from .autograd_worker import loss_and_coefficients
from .steps import TorchStep, TritonStep


def _sequence_chunks(offsets, counted, max_rows: int) -> List[Tuple[int, int]]:
    """Chunks of whole sequences with at most ``max_rows`` active tokens (a longer sequence alone), as pairs of
    indices into ``offsets``; ``counted`` holds the active tokens before each offset."""
    if len(offsets) < 2:
        return []
    chunks, lo = [], 0
    for j in range(1, len(offsets) - 1):  # cut before sequence j when the chunk would outgrow max_rows with it
        if offsets[j] > offsets[lo] and counted[j + 1] - counted[lo] > max_rows:
            chunks.append((lo, j))
            lo = j
    last = len(offsets) - 1
    if offsets[last] > offsets[lo] or not chunks:
        chunks.append((lo, last))
    return chunks


class PassResult(NamedTuple):
    """What one call of the fused loss produces (gradients ``None`` where not needed)."""

    loss: torch.Tensor
    sums: Dict[str, torch.Tensor]
    dh: Optional[torch.Tensor]
    dw: Optional[torch.Tensor]
    db: Optional[torch.Tensor]
    logp: torch.Tensor
    entropy: torch.Tensor


def one_pass(hidden, weight, bias, targets, temp: Temperature, batch: PGBatch, cfg: PGLossConfig, impl: str,
             chunk_bytes: int, needs) -> PassResult:
    """Loss, metric sums and, where ``needs`` asks, (dh, dW, db), all in this one pass over the chunks. ``batch``
    carries ``active_offsets`` (``prepare_pending(..., count_active=True)``): the chunks are planned without a read."""
    opts = LogProbOptions.budgeted(chunk_bytes)
    need_h, need_w, need_b = needs
    work = batch.dtype
    n = hidden.shape[0]
    step = (TritonStep if impl == "triton" else TorchStep)(weight, bias, opts)
    budget = opts.device_chunk_bytes if impl == "triton" else opts.chunk_bytes
    max_rows = rows_per_chunk(weight.shape[0], budget, 4)
    dh = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
    dw = torch.zeros(weight.shape, dtype=torch.float32 if work != torch.float64 else work,
                     device=weight.device) if need_w else None
    db = torch.zeros(weight.shape[0], dtype=dw.dtype if dw is not None else torch.float32,
                     device=weight.device) if need_b else None
    logp_all = torch.zeros(n, dtype=work, device=hidden.device)
    ent_all = torch.zeros(n, dtype=work, device=hidden.device)
    loss = torch.zeros((), dtype=work, device=hidden.device)
    sums: Dict[str, torch.Tensor] = {}
    kernel = _epilogue(cfg, batch) if impl == "triton" else None
    counted = batch.active_offsets  # counted by prepare in the call's one host read (op.py)
    active_rows = kept_first(batch.active)  # its first counted[-1] entries: the active rows, with no nonzero sync
    for s, e in _sequence_chunks(batch.offsets, counted, max_rows):
        lo, hi = batch.offsets[s], batch.offsets[e]
        idx = active_rows[counted[s]:counted[e]]
        part = batch.slice(lo, hi)
        h, y, t = hidden.index_select(0, idx), targets.index_select(0, idx), temp.take(idx)
        grad_out = (torch.empty_like(h) if need_h else None, dw, db)
        if kernel is not None:
            total, part_sums, lp, en = _chunk_epilogue(weight, bias, h, y, t, part, idx - lo, kernel, grad_out, cfg)
        else:
            total, part_sums, lp, en = _chunk_generic(step, h, y, t, part, idx - lo, any(needs), grad_out, cfg)
        if need_h and idx.numel():
            dh.index_copy_(0, idx, grad_out[0])
        loss = loss + total
        sums = merge_metrics(sums, part_sums)
        logp_all[lo:hi], ent_all[lo:hi] = lp, en
    return PassResult(loss, sums, dh, dw, db, logp_all, ent_all)


def two_phase(hidden, weight, bias, targets, temp: Temperature, batch: PGBatch, cfg: PGLossConfig, impl: str,
              chunk_bytes: int, needs) -> PassResult:
    """Phase 1 (logp, H of active tokens), the batch-wide reduction and the loss on ``[N]``, phase 2 (the
    primitive's recompute backward with the loss's ``(c, d)``)."""
    from ..linear.op import linear_logprob_entropy_backward_op, linear_logprob_entropy_op

    masked = torch.where(batch.active, targets, torch.full_like(targets, IGNORE))
    head = (hidden, weight, bias, masked, *temp.op_args())
    lp_out, en_out, m, log_s, _ = linear_logprob_entropy_op(*head, IGNORE, True, False, impl, chunk_bytes, False,
                                                         None, None, None)
    lp, en = lp_out.to(batch.dtype), en_out.to(batch.dtype)
    if plan_of(cfg) == "two_phase":
        batch = batch.updated(batch_coefficients(batch, lp, en, cfg))
    total, sums, c, d = loss_and_coefficients(lambda a, b: _summed(token_loss(batch, a, b, cfg)), lp, en, any(needs))
    grads = (None, None, None)
    if c is not None:
        grads = linear_logprob_entropy_backward_op(c, d, *head, m, log_s, en_out, IGNORE, True, impl, chunk_bytes,
                                                   False, *needs, None, None, None)
        grads = [g if need else None for g, need in zip(grads, needs)]
    return PassResult(total, sums, *grads, lp, en)


IGNORE = -100


def _summed(out):
    contrib, sums = out
    return contrib.sum(), sums


def _chunk_generic(step, h, y, t, part, rows, grads, grad_out, cfg):
    """Statistics from the backend step, (c, d) from the loss layer by autograd on ``[n]`` scalars."""
    work = part.dtype
    n = part.num_tokens
    lp = torch.zeros(n, dtype=work, device=h.device)
    en = torch.zeros(n, dtype=work, device=h.device)
    if rows.numel():
        lp_a, en_a = step.stats(h, y, t)
        lp[rows], en[rows] = lp_a.to(work), en_a.to(work)
    total, part_sums, c, d = loss_and_coefficients(lambda a, b: _summed(token_loss(part, a, b, cfg)), lp, en,
                                                   grads and rows.numel() > 0)
    if c is not None:
        step.grads(h, y, t, c.index_select(0, rows), None if d is None else d.index_select(0, rows), *grad_out)
    return total, part_sums, lp, en


def _chunk_epilogue(weight, bias, h, y, t, part, rows, kernel, grad_out, cfg):
    """cuBLAS logits chunk, then the variant's Triton epilogue for statistics, loss, c, d and dL/du."""
    work = part.dtype
    n = part.num_tokens
    lp = torch.zeros(n, dtype=work, device=h.device)
    en = torch.zeros(n, dtype=work, device=h.device)
    total = torch.zeros((), dtype=work, device=h.device)
    if rows.numel():
        x = torch.mm(h, weight.T)
        if bias is not None:
            x += bias
        lp_a, en_a, loss_t = kernel.run(x, y, t, part, rows)
        lp[rows], en[rows] = lp_a.to(work), en_a.to(work)
        total = loss_t.to(work).sum()
        dh_out, dw_acc, db_acc = grad_out
        if dh_out is not None:
            torch.mm(x, weight, out=dh_out)
        if dw_acc is not None:
            accumulate_mm_(dw_acc, x, h)
        if db_acc is not None:
            db_acc += x.sum(0, dtype=torch.float32)
    _, part_sums = token_loss(part, lp, en, cfg)  # metrics only: detached [n] math
    return total, {k: v.detach() for k, v in part_sums.items()}, lp, en


def _epilogue(cfg, batch):
    spec = epilogue_spec(cfg, batch)
    if spec is None:
        return None
    from .epilogue import Epilogue  # imports triton: only on this path

    return Epilogue(spec, cfg, batch)
