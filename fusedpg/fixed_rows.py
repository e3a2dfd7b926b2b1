"""The deterministic mode's one rule: every matmul and every row reduction runs on a fixed number of rows.

A BLAS call's result for one row can depend on the call's shape (its blocking, its threading), and so can a
reduction's over a ``[rows, V]`` chunk: measured on CPU, a row's log-prob changes with N. With ``deterministic=True``
the plans cut their rows into blocks of ``DETERMINISTIC_ROWS`` and copy each block, zero-padded, into a fresh buffer
(fresh: BLAS libraries may also round differently at another memory alignment), so the library always sees the
same shapes and a row's result depends on that row alone: not on N, the other rows, its position or
``chunk_bytes``. Padding rows carry zero coefficients, so they add nothing to ``d_weight``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .options import DETERMINISTIC_ROWS, DETERMINISTIC_SEGMENT
from .temperature import Temperature
from .truncation import Truncation


def block_rows(device: torch.device) -> int:
    return DETERMINISTIC_ROWS.get(device.type, DETERMINISTIC_ROWS["cpu"])


def vocab_segment(device: torch.device) -> int:
    return DETERMINISTIC_SEGMENT.get(device.type, DETERMINISTIC_SEGMENT["cpu"])


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
