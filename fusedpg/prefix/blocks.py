"""The block index of the Triton kernels: which key tiles each query tile must visit, and the transpose.

Tiles are ``BLOCK_M`` queries by ``BLOCK_N`` keys of one packed row. A tile pair is listed when at least one of its
(query, key) pairs is visible; tiles of other completions and other groups are never visited, so a group costs
``P`` prompt rows plus ``sum L_g`` completion rows of work, not ``G (P + L)``. Partially visible tiles are masked
element by element in the kernel from the per-token labels.

Stored as CSR over ``(row, query tile)`` (forward and dq) and over ``(row, key tile)`` (dk/dv), int32, built on the
host from the layout's Python ints and cached on the layout per (tile sizes, device).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .layout import PrefixLayout


class BlockIndex(NamedTuple):
    q_ptr: torch.Tensor   # [n_rows * n_q_tiles + 1]
    q_kv: torch.Tensor    # key tiles, grouped by (row, query tile)
    kv_ptr: torch.Tensor  # [n_rows * n_kv_tiles + 1]
    kv_q: torch.Tensor    # query tiles, grouped by (row, key tile)
    n_q_tiles: int
    n_kv_tiles: int
    q_max: int            # longest list in q_kv
    kv_max: int           # longest list of kv_q


def tile_visibility(layout: PrefixLayout, block_m: int, block_n: int) -> torch.Tensor:
    """bool ``[n_rows, n_q_tiles, n_kv_tiles]``: True where some query of the tile sees some key of the tile."""
    nq = -(-layout.seq_len // block_m)
    nk = -(-layout.seq_len // block_n)
    vis = torch.zeros(layout.n_rows, nq, nk, dtype=torch.bool)
    qt = torch.arange(nq)[:, None]
    kt = torch.arange(nk)[None, :]
    k_first, k_last = kt * block_n, kt * block_n + block_n - 1
    for b, a, p, comps in layout.segments():
        # (query range, key range, causal): the prompt, all completions x prompt keys, each completion
        parts = [(a, a + p, a, a + p, True)]
        parts += [(c, c + n, a, a + p, False) for c, n in comps]
        parts += [(c, c + n, c, c + n, True) for c, n in comps]
        for q0, q1, k0, k1, causal in parts:
            q_lo = torch.clamp(qt * block_m, min=q0)
            q_hi = torch.clamp(qt * block_m + block_m - 1, max=q1 - 1)
            hi = torch.minimum(q_hi, torch.tensor(k1 - 1)) if causal else torch.full_like(q_hi, k1 - 1)
            vis[b] |= (q_lo <= q_hi) & (k_first <= hi) & (k_last >= k0)
    return vis


def _csr(vis: torch.Tensor):
    counts = vis.sum(-1).reshape(-1)
    ptr = torch.zeros(counts.numel() + 1, dtype=torch.int32)
    ptr[1:] = counts.cumsum(0)
    # nonzero is row-major: grouped by the first two indices
    return ptr, vis.nonzero()[:, 2].to(torch.int32), int(counts.max()) if counts.numel() else 0


def block_index(layout: PrefixLayout, block_m: int, block_n: int, device) -> BlockIndex:
    def build(dev):
        vis = tile_visibility(layout, block_m, block_n)
        q_ptr, q_kv, q_max = _csr(vis)
        kv_ptr, kv_q, kv_max = _csr(vis.transpose(1, 2))
        return BlockIndex(q_ptr.to(dev), q_kv.to(dev), kv_ptr.to(dev), kv_q.to(dev), vis.shape[1], vis.shape[2],
                          q_max, kv_max)
    return layout._cached(("blocks", block_m, block_n), device, build)
