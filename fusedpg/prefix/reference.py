"""Dense masked attention with the shared-prefix mask: the definition every implementation must match.

Run in float64 it is the ground truth of the tests; run at the input dtype it is the ``torch_D`` term of the
tolerance model (scores and ``P @ V`` at the input dtype, softmax in fp32, as transformers' eager attention does).
It materialises ``[n_rows, heads, seq_len, seq_len]`` and is meant for small shapes only.
"""
from __future__ import annotations

from typing import Optional

import torch

from .layout import PrefixLayout


def visibility(layout: PrefixLayout, device="cpu") -> torch.Tensor:
    """bool ``[n_rows, seq_len, seq_len]``: ``[r, i, j]`` is True when query ``i`` sees key ``j``."""
    seg, pre = layout.labels(device)
    n = layout.seq_len
    causal = torch.ones(n, n, dtype=torch.bool, device=seg.device).tril()
    same = seg[:, None, :] == seg[:, :, None]
    prompt = seg[:, None, :] == pre[:, :, None]
    real = (seg[:, :, None] >= 0) & (seg[:, None, :] >= 0)
    return causal & real & (same | prompt)


def shared_prefix_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PrefixLayout, scale: Optional[float] = None,
    dtype: Optional[torch.dtype] = torch.float64,
) -> torch.Tensor:
    """q ``[B, Hq, S, D]``, k, v ``[B, Hkv, S, D]`` -> ``[B, Hq, S, D]``; padding query rows are 0.

    Equivalent to ``softmax(q @ k.T * scale + mask) @ v`` per head with K/V head ``h // (Hq // Hkv)``. The result
    has dtype ``dtype``; ``dtype=None`` computes at the input dtype (eager semantics).
    """
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    r = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(r, dim=1)
    v = v.repeat_interleave(r, dim=1)
    vis = visibility(layout, q.device)[:, None]  # [B, 1, S, S]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.float() if s.dtype in (torch.float16, torch.bfloat16) else s
    s = s.masked_fill(~vis, float("-inf"))
    # padding rows see nothing: give them a finite row so softmax stays finite, then zero their weights
    empty = ~vis.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    out = torch.matmul(p.to(v.dtype), v)
    return out
