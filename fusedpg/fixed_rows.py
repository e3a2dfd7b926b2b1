"""The deterministic mode's one rule: every matmul and every row reduction runs on a fixed number of rows.

A BLAS call's result for one row can depend on the call's shape (its blocking, its threading), and so can a
reduction's over a ``[rows, V]`` chunk: measured on CPU, a row's log-prob changes with N. With ``deterministic=True``
the plans cut their rows into blocks of ``DETERMINISTIC_ROWS`` and copy each block, zero-padded, into a fresh buffer
(fresh: BLAS libraries may also round differently at another memory alignment), so the library always sees the
same shapes and a row's result depends on that row alone: not on N, the other rows, its position or
``chunk_bytes``. Padding rows carry zero coefficients, so they add nothing to ``d_weight``.

Columns get the same treatment: the torch plan forms each fixed vocabulary segment's logits from its own
``[rows, H] x [H, segment]`` product (``SegmentedHead``), so a column's logit depends on its segment alone, not on V or
on where a tensor-parallel shard starts; with whole-segment shards the per-segment statistics, and everything merged
from them, are the one-process ones (fusedpg/vocab_parallel/README.md#deterministic-mode).
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch

from .options import DETERMINISTIC_ROWS, DETERMINISTIC_SEGMENT
from .temperature import Temperature
from .truncation import Truncation


def block_rows(device: torch.device) -> int:
    return DETERMINISTIC_ROWS.get(device.type, DETERMINISTIC_ROWS["cpu"])


def vocab_segment(device: torch.device) -> int:
    """Columns of a fixed vocabulary segment: ``FUSEDPG_DETERMINISTIC_SEGMENT`` when set (vocabulary-parallel
    results equal one process's bitwise when every shard is a whole number of segments: 128 fits Megatron's padded
    shards), else the device default."""
    value = os.environ.get("FUSEDPG_DETERMINISTIC_SEGMENT", "").strip()
    if not value:
        return DETERMINISTIC_SEGMENT.get(device.type, DETERMINISTIC_SEGMENT["cpu"])
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"FUSEDPG_DETERMINISTIC_SEGMENT must be a positive number of vocabulary columns, got {value!r}")
    return int(value)


def block(x: Optional[torch.Tensor], lo: int, hi: int, rows: int, fill: float = 0) -> Optional[torch.Tensor]:
    """Rows ``[lo, hi)`` of ``x`` in a fresh contiguous buffer of ``rows`` rows, padded with ``fill``."""
    if x is None:
        return None
    out = x.new_full((rows,) + tuple(x.shape[1:]), fill)
    out[:hi - lo] = x[lo:hi]
    return out


def chunking(deterministic: bool, default_step: int, device: torch.device):
    """(rows per chunk, ``take(x, lo, hi, fill=0)``): a plain slice of a tensor, a ``Temperature`` or a
    ``Truncation``, or in deterministic mode a fresh block of the fixed size, padded with ``fill`` (the neutral
    setting for a temperature or a truncation)."""
    if not deterministic:
        return default_step, _slice
    rows = block_rows(device)

    def take(x, lo, hi, fill=0):
        if isinstance(x, Temperature):
            return x.slice(lo, hi).padded(rows)
        if isinstance(x, Truncation):
            return x.slice(lo, hi, rows)
        return block(x, lo, hi, rows, fill)

    return rows, take


def _slice(x, lo, hi, fill=0):
    if x is None:
        return None
    return x.slice(lo, hi) if isinstance(x, (Temperature, Truncation)) else x[lo:hi]


def mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = a @ b`` computed ``block_rows`` rows of ``a`` at a time (each output row independent of the rest)."""
    rows = block_rows(a.device)
    for lo in range(0, a.shape[0], rows):
        hi = min(a.shape[0], lo + rows)
        out[lo:hi] = torch.mm(block(a, lo, hi, rows), b)[:hi - lo]
    return out


class SegmentedHead:
    """A ``[V, H]`` head (and bias) seen as ``count`` segments of ``seg`` rows: whole segments are views, a last
    partial one is a zero-padded copy whose padded columns come out at ``-inf``."""

    def __init__(self, w: torch.Tensor, b: Optional[torch.Tensor], seg: int):
        vocab, h_dim = w.shape
        self.vocab, self.seg = vocab, seg
        full, tail = divmod(vocab, seg)
        self.count = full + (tail > 0)
        #: (first segment, weight [k, seg, H], bias [k, 1, seg] or None) per group of segments
        self.groups: List[Tuple[int, torch.Tensor, Optional[torch.Tensor]]] = []
        if full:
            self.groups.append((0, w[:full * seg].view(full, seg, h_dim),
                                None if b is None else b[:full * seg].view(full, 1, seg)))
        if tail:
            wt = w.new_zeros(1, seg, h_dim)
            wt[0, :tail] = w[full * seg:]
            bt = None if b is None else torch.cat([b[full * seg:], b.new_zeros(seg - tail)]).view(1, 1, seg)
            self.groups.append((full, wt, bt))

    @property
    def width(self) -> int:
        return self.count * self.seg

    def logits(self, h: torch.Tensor, temp: Temperature) -> torch.Tensor:
        """Tempered logits ``[R, count * seg]`` of the rows ``h`` ``[R, H]`` (padded columns ``-inf``)."""
        rows = h.shape[0]
        z = torch.empty(rows, self.count, self.seg, dtype=h.dtype, device=h.device)
        for first, w3, b3 in self.groups:
            hx = h.expand(w3.shape[0], rows, h.shape[1])
            prod = torch.bmm(hx, w3.transpose(1, 2)) if b3 is None else torch.baddbmm(b3, hx, w3.transpose(1, 2))
            z[:, first:first + w3.shape[0]] = prod.transpose(0, 1)
        z = temp.divide_(z.view(rows, self.width))
        return z.index_fill_(1, torch.arange(self.vocab, self.width, device=z.device), float("-inf"))

    def weight_grad_(self, dw: torch.Tensor, g: torch.Tensor, h: torch.Tensor, tail: Optional[torch.Tensor]):
        """``dw += g.T @ h`` segment by segment, ``g`` ``[R, count * seg]``; a partial last segment accumulates in
        ``tail`` ``[seg, H]`` (its first ``V mod seg`` rows belong at the end of ``dw``)."""
        rows = g.shape[0]
        g3 = g.view(rows, self.count, self.seg)
        for first, w3, _ in self.groups:
            k = w3.shape[0]
            end = (first + k) * self.seg
            out = dw[first * self.seg:end].view(k, self.seg, -1) if end <= self.vocab else tail.view(1, self.seg, -1)
            out.baddbmm_(g3[:, first:first + k].permute(1, 2, 0), h.expand(k, rows, h.shape[1]))

    def hidden_grad_(self, acc: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``acc += g @ W`` ``[R, H]`` as a fold over the segments in order: ``acc += g_s @ W_s`` one segment after
        another (products batched, ``FOLD_GROUP`` segments at a time), so a vocabulary-parallel rank can continue
        the fold of the ranks before it and end with one process's bits."""
        rows = g.shape[0]
        g3 = g.view(rows, self.count, self.seg)
        for first, w3, _ in self.groups:
            for lo in range(0, w3.shape[0], FOLD_GROUP):
                hi = min(w3.shape[0], lo + FOLD_GROUP)
                for prod in torch.bmm(g3[:, first + lo:first + hi].transpose(0, 1), w3[lo:hi]):
                    acc.add_(prod)
        return acc


#: Segments whose ``[rows, H]`` products one batched GEMM forms before they are folded into d_hidden.
FOLD_GROUP = 64
