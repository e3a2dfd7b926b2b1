"""The low-memory plan (``memory="low"``): both passes blocked over the vocabulary, each block tiled over the rows.

A block of ``cols`` head rows is upcast once into a reused fp32 buffer, and inside it ``rows`` rows of hidden at a
time into another, so neither input is ever copied to fp32 whole. The forward merges per-block row statistics in
block order (the vocabulary-parallel merge); the backward writes each block's d_weight rows once, in the weight's
dtype, after an fp32 sum over all N rows, and adds the block's share of d_hidden into an fp32 ``[N, H]``
accumulator (the returned gradient itself when hidden is fp32). Extra memory besides the gradients: that
accumulator and ``LOW_BUFFER_BYTES`` of reused buffers; never a ``[V, H]`` fp32 buffer
(fusedpg/linear/README.md#low-memory-plan). Inputs are already compacted to non-ignored rows.

Deterministic mode: the tiles are fixed (``fixed_rows.block_rows`` rows, each a fresh zero-padded copy whose padding
rows are dead; ``deterministic_columns`` columns), whatever N and ``chunk_bytes``, and d_hidden adds each tile's
product from a fresh buffer, so every GEMM sees one shape and one alignment and a row's results depend on that row
alone.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .. import fixed_rows
from ..options import LogProbOptions
from ..softmax_math import compute_dtype, merged, partial, rescaled, softmax_grad_, softmax_stats
from ..temperature import Temperature
from ..truncation import Truncation, apply_, truncate_

#: CPU: bytes of the reused fp32 buffers together (unless chunk_bytes asks for less): half for the hidden tile
#: ``[rows, H]``, a quarter each for the head block ``[cols, H]`` and its d_weight rows; the logits tile
#: ``[rows, cols]`` comes on top. At 4096x1024x32000 bf16 that is 512 x 256 tiles and about 6 MiB next to the 62.5 MiB
#: of d_weight; halving the row tiles saved 1 MiB and cost 15 % of the time in per-tile overhead (2 CPU cores).
LOW_BUFFER_BYTES = 4 << 20
#: Other devices keep every row in one tile (``[N, block]`` logits of at most this many bytes): a GPU needs big
#: GEMMs, and its caching allocator reuses the buffers.
LOW_BLOCK_BYTES = 16 << 20
#: Fewest columns of a block: each block adds one rounded partial into d_hidden; with 16-column blocks those broke
#: the tolerance model in a peaked, per-token-temperature case (ratio 5 to eager), with 256 they do not.
LOW_MIN_COLUMNS = 256


def deterministic_columns(device: torch.device) -> int:
    """Columns of a vocabulary block in deterministic mode: whole fixed segments, at least ``LOW_MIN_COLUMNS``."""
    seg = fixed_rows.vocab_segment(device)
    return -(-LOW_MIN_COLUMNS // seg) * seg


def low_tiles(n: int, h: int, device: torch.device, opts: LogProbOptions, itemsize: int) -> Tuple[int, int]:
    """(columns per vocabulary block, rows per tile) for hidden ``[n, h]`` at the working dtype's ``itemsize``."""
    if opts.deterministic:  # neither N nor chunk_bytes may change a GEMM's shape
        return deterministic_columns(device), fixed_rows.block_rows(device)
    if device.type != "cpu":
        return max(LOW_MIN_COLUMNS, min(opts.chunk_bytes, LOW_BLOCK_BYTES) // max(1, n * itemsize)), n
    budget = min(opts.chunk_bytes, LOW_BUFFER_BYTES)
    cols = max(LOW_MIN_COLUMNS, budget // max(1, 4 * h * itemsize))
    return cols, max(1, min(n, budget // max(1, 2 * max(h, cols) * itemsize)))


def _tiles(x: torch.Tensor, size: int, work: torch.dtype,
           idx: Optional[torch.Tensor] = None) -> Callable[[int, int], torch.Tensor]:
    """``take(lo, hi)``: rows lo:hi of x ``[R, K]`` (with ``idx``: rows ``idx[lo:hi]``, gathered tile by tile, so
    the caller never copies the active rows whole) at the work dtype; a view, or an upcast into one reused buffer
    (a lone tile is upcast once). The buffer is overwritten by the next take."""
    if idx is not None:
        if size >= idx.numel():
            whole = x.index_select(0, idx).to(work)
            return lambda lo, hi: whole[lo:hi]
        if x.dtype == work:
            return lambda lo, hi: x.index_select(0, idx[lo:hi])
        buf = torch.empty((size,) + tuple(x.shape[1:]), dtype=work, device=x.device)
        return lambda lo, hi: buf[:hi - lo].copy_(x.index_select(0, idx[lo:hi]))
    if x.dtype == work:
        return lambda lo, hi: x[lo:hi]
    if size >= x.shape[0]:
        whole = x.to(work)
        return lambda lo, hi: whole[lo:hi]
    buf = torch.empty((size,) + tuple(x.shape[1:]), dtype=work, device=x.device)
    return lambda lo, hi: buf[:hi - lo].copy_(x[lo:hi])


def _logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], temp: Temperature,
            buf: torch.Tensor) -> torch.Tensor:
    """Tempered logits ``[rows, cols]`` of a tile, written into the front of the flat buffer ``buf``."""
    z = buf[:h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0])
    if b is None:
        torch.mm(h, w.T, out=z)
    else:
        torch.addmm(b, h, w.T, out=z)
    return temp.divide_(z)


def _blocks(hidden, weight, bias, opts: LogProbOptions, idx: Optional[torch.Tensor] = None, whole_rows=False):
    """Shared set-up of both passes: (work dtype, cols, rows, head-block take, hidden-tile take, bias take, logits
    buffer, per-row take); ``idx``: the active rows of hidden (None: all). The per-row take,
    ``fixed_rows.chunking``'s, slices a row tile's per-row inputs (deterministic: pads them to the fixed tile).
    ``whole_rows`` (truncation: a tile's rows of logits are assembled whole): tiles of at most ``chunk_bytes`` and
    ``LOW_BLOCK_BYTES`` of such rows (the threshold search's temporaries are a few times that; measured on CPU,
    4 MiB tiles cut the peak by a fifth for 1.35x the time, README.md#low-memory-plan)."""
    n, h = hidden.shape[0] if idx is None else idx.numel(), hidden.shape[1]
    work = compute_dtype(hidden.dtype)
    if whole_rows:
        budget = min(opts.chunk_bytes, LOW_BLOCK_BYTES)
        n = min(n, max(1, budget // (weight.shape[0] * work.itemsize)))
    cols, rows = low_tiles(n, h, hidden.device, opts, work.itemsize)
    take_b = (lambda lo, hi: None) if bias is None else _tiles(bias, cols, work)
    take_h = _tiles(hidden, rows, work, idx)
    if opts.deterministic:  # each tile a fresh zero-padded copy of the fixed size
        tile = take_h
        take_h = lambda lo, hi: fixed_rows.block(tile(lo, hi), 0, hi - lo, rows)  # noqa: E731
    _, per_row = fixed_rows.chunking(opts.deterministic, rows, hidden.device)
    tile_rows = rows if opts.deterministic else min(rows, n)
    z_buf = torch.empty(tile_rows * min(cols, weight.shape[0]), dtype=work, device=hidden.device)
    return work, cols, rows, _tiles(weight, cols, work), take_h, take_b, z_buf, per_row


def forward_truncated(hidden, weight, bias, targets, temp: Temperature, trunc: Truncation, tau_out: torch.Tensor,
                      opts: LogProbOptions, idx: Optional[torch.Tensor] = None):
    """The low-memory forward of a truncated distribution: its thresholds need whole rows of logits, so each row
    tile's ``[rows, V]`` logits are assembled from the very (tile, block) products the backward recomputes, and the
    backward's comparison with the thresholds sees the forward's logits bit for bit (the threshold token sits
    exactly at the cut). Arguments as ``forward_vocab_blocked`` plus ``trunc`` (per-row settings of the n rows) and
    ``tau_out`` ``[n]`` (the thresholds, written); returns (logp, entropy, m, log_s) like ``plan_torch.forward``."""
    n, vocab = targets.shape[0], weight.shape[0]
    work, cols, rows, take_w, take_h, take_b, z_buf, per_row = _blocks(hidden, weight, bias, opts, idx, True)
    outs = [torch.empty(targets.shape if i == 0 else n, dtype=work, device=hidden.device) for i in range(4)]
    z = None  # [tile rows, V], sized by the first (largest) tile
    for r_lo in range(0, n, rows):
        r_hi = min(n, r_lo + rows)
        h, t = take_h(r_lo, r_hi), per_row(temp, r_lo, r_hi)
        z = torch.empty(h.shape[0], vocab, dtype=work, device=hidden.device) if z is None else z
        zt = z[:h.shape[0]]
        for lo in range(0, vocab, cols):
            hi = min(vocab, lo + cols)
            zt[:, lo:hi] = _logits(h, take_w(lo, hi), take_b(lo, hi), t, z_buf)
        tau_out[r_lo:r_hi] = truncate_(zt, per_row(trunc, r_lo, r_hi))[:r_hi - r_lo]
        for out, val in zip(outs, softmax_stats(zt, per_row(targets, r_lo, r_hi, -1), opts.compute_entropy)):
            out[r_lo:r_hi] = val[:r_hi - r_lo]
    return tuple(outs)


def _local(targets: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    # a target outside this block has no one-hot term here (the vocabulary-parallel convention: -1)
    return torch.where((targets >= lo) & (targets < hi), targets - lo, -1)


def forward_vocab_blocked(hidden, weight, bias, targets, temp: Temperature, opts: LogProbOptions,
                          idx: Optional[torch.Tensor] = None):
    """The low-memory forward: each vocabulary block's row statistics, merged in block order. hidden ``[N, H]``,
    weight ``[V, H]``, targets ``[N]`` -> (logp, entropy, m, log_s), each ``[N]``, like ``plan_torch.forward``.
    With ``idx`` ``[n]``, hidden is the full ``[N_all, H]`` and the rest holds the n rows ``idx`` (gathered per
    tile, not copied whole)."""
    n, vocab = targets.shape[0], weight.shape[0]
    work, cols, rows, take_w, take_h, take_b, z_buf, per_row = _blocks(hidden, weight, bias, opts, idx)
    run = None
    for lo in range(0, vocab, cols):
        hi = min(vocab, lo + cols)
        w, b, local = take_w(lo, hi), take_b(lo, hi), _local(targets, lo, hi)
        stats = [torch.empty(n, dtype=work, device=hidden.device) for _ in range(4)]
        for r_lo in range(0, n, rows):
            r_hi = min(n, r_lo + rows)
            z = _logits(take_h(r_lo, r_hi), w, b, per_row(temp, r_lo, r_hi), z_buf)
            for out, val in zip(stats, softmax_stats(z, per_row(local, r_lo, r_hi, -1), opts.compute_entropy)):
                out[r_lo:r_hi] = val[:r_hi - r_lo]
        run = _fold(run, partial(*stats, local))
    return merged(*run[1:], run[0], opts.compute_entropy)


def _fold(run, part: torch.Tensor):
    """Fold one block's partial ``[5, N]`` (``softmax_math.partial``) into the running merge (top, s, t, y), each
    ``[N]``: ``rescaled``'s sum-exp, entropy and target-logit terms, taken from the running max ``top`` and
    rescaled when it grows, so the forward keeps O(N) statistics instead of one partial per block."""
    if run is None:
        return (part[0],) + rescaled(part, part[0])
    top, s, t, y = run
    new = torch.maximum(top, part[0])
    shift = top - new  # sum_v e^(z_v - new) (z_v - new) = e^shift (t + s shift) over the blocks folded so far
    scale = torch.exp(shift)
    s_part, t_part, y_part = rescaled(part, new)
    # y of a row whose target is still ahead is a placeholder, replaced in the target's block
    return new, s * scale + s_part, (t + s * shift) * scale + t_part, torch.where(part[4] > 0, y_part, y + shift)


def backward_vocab_blocked(hidden, weight, bias, targets, temp: Temperature, m, log_s, entropy, c, d,
                           opts: LogProbOptions, needs: Tuple[bool, bool, bool], idx: Optional[torch.Tensor] = None,
                           tau: Optional[torch.Tensor] = None):
    """The low-memory backward: gradients (d_hidden ``[N, H]``, d_weight ``[V, H]``, d_bias ``[V]``) in the
    inputs' dtypes, None where not needed. m, log_s, entropy (the forward's row statistics), c = dL/dlogp and
    d = dL/dentropy (or None) are ``[N]``; targets and c may be ``[N, K]`` (several targets per row).

    Per vocabulary block it recomputes the block's logits tile by tile, forms dL/du from the row statistics, sums
    the block's d_weight rows over all N rows in fp32 (in place when the weight is fp32) and writes them once, and
    adds the block's share of d_hidden into the fp32 ``[N, H]`` accumulator. With ``idx`` ``[n]`` (the active
    rows; the per-row inputs hold those n rows), hidden and d_hidden are full-size ``[N_all, H]``: no compacted
    copy of hidden and no scatter of d_hidden, whose inactive rows are 0. ``tau`` ``[n]``: ``forward_truncated``'s
    thresholds (its tiles are these; logits below them are outside the kept set; the caller has zeroed c on rows
    whose target fell outside it).
    """
    need_h, need_w, need_b = needs
    work = compute_dtype(hidden.dtype)
    dh = torch.zeros(hidden.shape, dtype=work, device=hidden.device) if need_h else None
    dw = torch.empty_like(weight) if need_w else None
    db = torch.empty_like(bias) if need_b else None
    _backward_blocks(hidden, weight, bias, targets, temp, m, log_s, entropy, c.to(work),
                     None if d is None else d.to(work), opts, dh, dw, db, idx, tau)
    if dh is not None and hidden.dtype.itemsize < work.itemsize:
        dh = _narrowed(dh, hidden.dtype, max(1, LOW_BUFFER_BYTES // (4 * hidden.shape[1] * work.itemsize)))
    return dh, dw, db


def _narrowed(acc: torch.Tensor, dtype: torch.dtype, rows: int) -> torch.Tensor:
    """acc ``[N, H]`` rounded to the narrower ``dtype`` in place: the result, an ``[N, H]`` view, fills the front of
    acc's storage, so a half-precision d_hidden and its fp32 accumulator never take memory side by side (the
    storage keeps its fp32 size while the gradient lives). Tiles of ``rows`` go through a small copy because a
    tile's destination overlaps its own source, never a later tile's."""
    n, h = acc.shape
    out = acc.view(-1).view(dtype)[:n * h].view(n, h)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        out[lo:hi] = acc[lo:hi].to(dtype)
    return out


def _backward_blocks(hidden, weight, bias, targets, temp: Temperature, m, log_s, entropy, c, d,
                     opts: LogProbOptions, dh, dw, db, idx=None, tau=None) -> None:
    """The blocks of ``backward_vocab_blocked``: fills dh (fp32 accumulator), dw and db (each None when not
    needed); its buffers are freed on return."""
    n, vocab = targets.shape[0], weight.shape[0]
    work, cols, rows, take_w, take_h, take_b, z_buf, per_row = _blocks(hidden, weight, bias, opts, idx,
                                                                       tau is not None)
    # the fp32 sum of a half-precision d_weight's block rows, written once per block
    dw_buf = None if dw is None or dw.dtype == work else torch.empty((cols, weight.shape[1]), dtype=work,
                                                                        device=weight.device)
    for lo in range(0, vocab, cols):
        hi = min(vocab, lo + cols)
        w, b, local = take_w(lo, hi), take_b(lo, hi), _local(targets, lo, hi)
        acc_w = None if dw is None else (dw[lo:hi] if dw_buf is None else dw_buf[:hi - lo])
        acc_b = None
        for r_lo in range(0, n, rows):
            r_hi = min(n, r_lo + rows)
            h, t = take_h(r_lo, r_hi), per_row(temp, r_lo, r_hi)
            z = _logits(h, w, b, t, z_buf)
            if tau is not None:  # outside the kept set: no probability, so no gradient
                apply_(z, per_row(tau, r_lo, r_hi, float("-inf")))
            # deterministic: padding rows are dead (log s = -inf): no probability, a zero gradient row
            g = softmax_grad_(z, per_row(local, r_lo, r_hi, -1), per_row(m, r_lo, r_hi),
                              per_row(log_s, r_lo, r_hi, float("-inf")), per_row(entropy, r_lo, r_hi),
                              per_row(c, r_lo, r_hi), per_row(d, r_lo, r_hi), t)
            if acc_w is not None:  # beta 0 ignores the uninitialised rows before the first tile
                acc_w.addmm_(g.T, h, beta=1.0 if r_lo > 0 else 0.0)
            if db is not None:
                acc_b = g.sum(0) if acc_b is None else acc_b.add_(g.sum(0))
            if dh is not None and idx is None and not opts.deterministic:
                dh[r_lo:r_hi].addmm_(g, w)
            elif dh is not None and idx is None:  # the product in a fresh buffer: one alignment for every row
                dh[r_lo:r_hi] += torch.mm(g, w)[:r_hi - r_lo]
            elif dh is not None:
                dh.index_add_(0, idx[r_lo:r_hi], torch.mm(g, w)[:r_hi - r_lo])
        if dw_buf is not None:
            dw[lo:hi] = acc_w
        if db is not None:
            db[lo:hi] = acc_b
