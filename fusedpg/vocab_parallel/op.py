"""The custom ops of vocabulary-parallel ``linear_logprob_entropy``: each rank runs the single-device op on its shard
of the LM head, then the per-row softmax statistics are merged across the group (README.md here).

``targets`` here are already local: a column of this shard, ``-1`` where the target lies in another shard, and
``IGNORE`` for ignored rows. ``m`` and ``log_s`` returned are the merged (global) statistics the backward needs.
"""
from __future__ import annotations

from dataclasses import replace
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .. import checks
from ..linear.op import _plan, backward_grads, chunk_logits, grads_like, stats_like
from ..linear import plan_torch
from ..options import DEFAULT_CHUNK_BYTES, LogProbOptions
from ..rows import Rows
from ..softmax_math import compute_dtype, merged, partial, rescaled, rows_per_chunk
from ..temperature import Temperature
from ..truncation import OUTSIDE_LOGP, Truncation
from .groups import group_of, shard_sizes

IGNORE = -100


def _merge(lp, ent, m, log_s, targets, compute_entropy: bool, group):
    """Two collectives: MAX of the row maxima, one packed SUM of the rescaled terms."""
    part = partial(lp, ent, m, log_s, targets)
    top = m.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    packed = torch.stack(rescaled(part, top))
    dist.all_reduce(packed, group=group)
    return merged(*packed.unbind(0), top, compute_entropy)


def _gathered(x: torch.Tensor, group) -> list:
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x, group=group)
    return out


def _gather_merge(plan, parts, zy, targets, compute_entropy: bool, group, counts):
    """Deterministic mode: every rank's per-segment softmax states are all-gathered and folded in global segment
    order by the plan's own merge, so with whole-segment shards the merged statistics are the one-process ones,
    bitwise (README.md#deterministic-mode). ``counts``: every rank's number of segments."""
    padded = torch.cat([parts, parts.new_zeros(parts.shape[0], 3, max(counts) - parts.shape[2])], 2)  # equal sizes
    parts = torch.cat([p[:, :, :c] for p, c in zip(_gathered(padded, group), counts)], 2)
    owned = _gathered(torch.stack([zy, (targets >= 0).to(zy.dtype)]), group)
    zy = owned[0][0]
    for other in owned[1:]:  # exactly one rank owns each target column
        zy = torch.where(other[1] > 0, other[0], zy)
    return plan.merge_partials(parts, zy, compute_entropy)


def _lockstep_budget(chunk_bytes: int, vocab: int, widest: int, itemsize: int) -> int:
    """A chunk budget giving this shard the rows per chunk of the widest shard: a truncation's collectives run per
    chunk, so every rank must run the same chunks."""
    rows = rows_per_chunk(widest, chunk_bytes or DEFAULT_CHUNK_BYTES, itemsize)
    return rows * vocab * itemsize


@torch.library.custom_op("fusedpg::vocab_parallel_linear_logprob_entropy", mutates_args=())
def vocab_parallel_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    temp_rows: Optional[torch.Tensor], temp_value: float, compute_entropy: bool, impl: str, chunk_bytes: int,
    group: str, deterministic: bool, reduce_hidden_grad: bool, top_k: Optional[torch.Tensor] = None,
    top_p: Optional[torch.Tensor] = None, min_p: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden ``[N, H]``, this rank's weight ``[V_r, H]``, local targets ``[N]`` -> (logp, entropy, m, log_s)
    ``[N]`` over the whole vocabulary, identical on every rank of ``group``, and the truncation thresholds ``tau``
    (``[N]``, empty without top_k / top_p / min_p; the thresholds are found over the whole vocabulary)."""
    n, work = targets.shape[0], compute_dtype(hidden.dtype)
    temp = Temperature.of(temp_rows, temp_value)
    checks.temperature_values(temp)
    pg = group_of(group)
    sizes = shard_sizes(group, weight.shape[0], weight.device)
    trunc = Truncation(top_k, top_p, min_p, across=pg).resolved(sum(sizes))
    tau = torch.full((n if trunc.active else 0,), float("-inf"), dtype=work, device=hidden.device)
    rows = Rows(targets, IGNORE)
    if rows.count == 0:
        z = torch.zeros(n, dtype=work, device=hidden.device)
        return z, z.clone(), z.clone(), z.clone(), tau
    plan = plan_torch if trunc.active else _plan(impl)  # the thresholds are found by the torch plan's loop
    budget = _lockstep_budget(chunk_bytes, weight.shape[0], max(sizes), work.itemsize) if trunc.active else chunk_bytes
    opts = LogProbOptions.budgeted(budget, compute_entropy=compute_entropy, deterministic=deterministic)
    y = rows.take(targets)
    tau_c = torch.empty(rows.count if trunc.active else 0, dtype=work, device=hidden.device)
    logits = chunk_logits(impl, deterministic, weight, bias) if trunc.active else None  # the Triton tiles
    extra = (replace(trunc.take(rows.idx), kernel=logits is not None), tau_c) if trunc.active else ()
    if logits is not None:
        extra += (logits,)
    args = (rows.take(hidden), weight, bias, y, temp.take(rows.idx), opts) + extra
    if deterministic:
        width = plan.segment_columns(hidden.dtype, hidden.device)  # the same on every rank: counts need no collective
        stats = _gather_merge(plan, *plan.forward_partials(*args), y, compute_entropy, pg,
                              [-(-size // width) for size in sizes])
    else:
        stats = _merge(*plan.forward(*args)[:4], y, compute_entropy, pg)
    logp, entropy, top, log_s = (rows.scatter(x.to(work)) for x in stats)
    if trunc.active:  # a target outside the kept set: the documented finite floor
        logp = torch.where(torch.isneginf(logp), OUTSIDE_LOGP, logp)
        tau = rows.scatter(tau_c)
    return logp, entropy, top, log_s, tau


@vocab_parallel_op.register_fake
def _(hidden, weight, bias, targets, *args):
    truncated = any(x is not None for x in args[-3:])
    stats = stats_like(hidden, weight, bias, targets)
    return stats + (hidden.new_empty(hidden.shape[0] if truncated else 0, dtype=stats[1].dtype),)



class _RankFold:
    """The deterministic d_hidden fold handed along the ranks ``CHUNK`` rows at a time: a chunk's running sum comes
    from the previous rank (``start``), this rank adds its segments' products block by block, and the finished chunk
    goes on to the next rank (``done``, without waiting), so rank r works a chunk behind rank r - 1 instead of
    after it."""

    CHUNK = 128  # rows per message: a multiple of every device's fixed row block

    def __init__(self, group, width: int, dtype: torch.dtype, device: torch.device):
        self.group, self.rank, self.world = group, dist.get_rank(group), dist.get_world_size(group)
        self.new = (lambda rows: torch.empty(rows, width, dtype=dtype, device=device))  # noqa: E731
        self.got = self.out = None
        self.sends = []

    def start(self, lo: int, hi: int, rows: int, n: int) -> torch.Tensor:
        """Rows ``[lo, hi)`` of the fold so far, in a fresh zero-padded ``[rows, H]`` block."""
        acc = self.new(rows).zero_()
        if self.rank > 0:
            if lo % self.CHUNK == 0:
                self.got = self.new(min(n, lo + self.CHUNK) - lo)
                dist.recv(self.got, src=dist.get_global_rank(self.group, self.rank - 1), group=self.group)
            at = lo % self.CHUNK
            acc[:hi - lo] = self.got[at:at + hi - lo]
        return acc

    def done(self, lo: int, hi: int, block: torch.Tensor, n: int) -> None:
        if self.rank == self.world - 1:
            return
        if lo % self.CHUNK == 0:
            self.out = self.new(min(n, lo + self.CHUNK) - lo)
        at = lo % self.CHUNK
        self.out[at:at + hi - lo] = block
        if at + hi - lo == self.out.shape[0]:
            dst = dist.get_global_rank(self.group, self.rank + 1)
            self.sends.append((dist.isend(self.out, dst=dst, group=self.group), self.out))

    def finish(self) -> None:
        for work, _ in self.sends:
            work.wait()
        self.sends = []


@torch.library.custom_op("fusedpg::vocab_parallel_linear_logprob_entropy_backward", mutates_args=())
def vocab_parallel_backward_op(
    grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor], hidden: torch.Tensor,
    weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor, temp_rows: Optional[torch.Tensor],
    temp_value: float, m: torch.Tensor, log_s: torch.Tensor, entropy: torch.Tensor, compute_entropy: bool, impl: str,
    chunk_bytes: int, group: str, deterministic: bool, reduce_hidden_grad: bool, need_hidden: bool,
    need_weight: bool, need_bias: bool, top_k: Optional[torch.Tensor] = None, top_p: Optional[torch.Tensor] = None,
    min_p: Optional[torch.Tensor] = None, tau: Optional[torch.Tensor] = None,
) -> List[torch.Tensor]:
    """The shard's (d_hidden, d_weight, d_bias) from the merged statistics; d_hidden summed over the group when
    ``reduce_hidden_grad`` (each rank holds the part of ``g @ W`` from its own columns). Truncated: ``grad_logp``
    is already 0 on rows whose target fell outside the kept set (on every rank, not only the target's)."""
    pg = group_of(group)
    # deterministic: d_hidden is one running sum over the vocabulary in order (the torch plan's segment fold, the
    # Triton plan's fixed-tile GEMM), passed rank to rank
    chain = deterministic and need_hidden and reduce_hidden_grad
    fold = _RankFold(pg, hidden.shape[1], compute_dtype(hidden.dtype), hidden.device) if chain else None
    dh, dw, db = backward_grads(
        grad_logp, grad_entropy, hidden, weight, bias, targets, temp_rows, temp_value, m, log_s, entropy, IGNORE,
        compute_entropy, impl, chunk_bytes, deterministic, need_hidden, need_weight, need_bias, top_k, top_p, min_p,
        False, tau, fold)
    if chain:  # the last rank's fold is one process's d_hidden: everyone takes it
        fold.finish()
        dh = dh.contiguous()
        dist.broadcast(dh, src=dist.get_global_rank(pg, fold.world - 1), group=pg)
        dh = dh.to(hidden.dtype)
    elif need_hidden and reduce_hidden_grad:
        total = dh.to(compute_dtype(dh.dtype))  # summed at fp32, rounded once
        dist.all_reduce(total, group=pg)
        dh = total.to(dh.dtype)
    return [dh, dw, db]


@vocab_parallel_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, targets, temp_rows, temp_value, m, log_s, entropy,
      compute_entropy, impl, chunk_bytes, group, deterministic, reduce_hidden_grad, need_hidden, need_weight,
      need_bias, top_k=None, top_p=None, min_p=None, tau=None):
    return grads_like(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _setup(ctx, inputs, output):
    hidden, weight, bias, targets, temp_rows, temp_value, compute_entropy, impl, chunk_bytes, group, det, reduce, \
        top_k, top_p, min_p = inputs
    logp, entropy, m, log_s, tau = output
    ctx.set_materialize_grads(False)
    # rows whose target fell outside the kept set have a constant log-prob: no rank may send its c
    outside = logp == OUTSIDE_LOGP if tau.numel() else None
    ctx.save_for_backward(hidden, weight, bias, targets, temp_rows, m, log_s, entropy, top_k, top_p, min_p, tau,
                          outside)
    ctx.args = (temp_value, compute_entropy, impl, chunk_bytes, group, det, reduce)


def _backward(ctx, grad_logp, grad_entropy, _grad_m, _grad_log_s, _grad_tau):
    hidden, weight, bias, targets, temp_rows, m, log_s, entropy, top_k, top_p, min_p, tau, outside = ctx.saved_tensors
    temp_value, compute_entropy, impl, chunk_bytes, group, det, reduce = ctx.args
    if outside is not None and grad_logp is not None:
        grad_logp = grad_logp.masked_fill(outside, 0.0)
    need = ctx.needs_input_grad
    need_b = bias is not None and need[2]
    dh, dw, db = vocab_parallel_backward_op(
        grad_logp, grad_entropy, hidden, weight, bias, targets, temp_rows, temp_value, m, log_s, entropy,
        compute_entropy, impl, chunk_bytes, group, det, reduce, need[0], need[1], need_b, top_k, top_p, min_p,
        tau if tau.numel() else None)
    return (dh if need[0] else None, dw if need[1] else None, db if need_b else None) + (None,) * 12


vocab_parallel_op.register_autograd(_backward, setup_context=_setup)
