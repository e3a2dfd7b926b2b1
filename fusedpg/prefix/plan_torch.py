"""Shared-prefix attention in plain torch (the CPU backend): the two-part LSE merge, with no prefix copies.

Per group with prompt ``[a, a+P)`` and completions ``c_g``: (A) causal self-attention of the prompt; (B1) one
rectangular attention of all completion queries against the single prompt K/V; (B2) causal self-attention of each
completion. B1 and B2 are merged with their log-sum-exp. The backward recomputes every part's probabilities from
the merged ``(o, lse)`` (see README.md here). Scores of one part are the only ``[heads, n, m]`` buffers; GQA query
heads are folded into the rows of a batched product, so K/V are never repeated either.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .layout import PrefixLayout


def _work(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rows(x: torch.Tensor, b: int, lo: int, hi: int, hkv: int, work) -> torch.Tensor:
    """``x[b, :, lo:hi]`` ``[H, n, D]`` as ``[Hkv, r * n, D]`` in ``work`` (query head ``h`` = ``hk * r + j``)."""
    part = x[b, :, lo:hi].to(work)
    return part.reshape(hkv, -1, part.shape[-1])


def _scores(q, k, scale, n: int, causal: bool):
    """q ``[Hkv, r*n, D]``, k ``[Hkv, m, D]`` -> scaled scores ``[Hkv, r*n, m]``, masked (bottom-right) if causal."""
    s = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
    if causal:
        m = k.shape[1]
        i = torch.arange(n, device=q.device).repeat(q.shape[1] // n)[:, None] + (m - n)
        s.masked_fill_(torch.arange(m, device=q.device)[None, :] > i, float("-inf"))
    return s


def _part_fwd(q, k, v, scale, n, causal):
    s = _scores(q, k, scale, n, causal)
    lse = torch.logsumexp(s, dim=-1)  # [Hkv, r*n]; every row sees at least one key
    o = torch.bmm(torch.exp(s - lse[..., None]), v)
    return o, lse


def _merge(o_a, lse_a, o_b, lse_b):
    lse = torch.logaddexp(lse_a, lse_b)
    return torch.exp(lse_a - lse)[..., None] * o_a + torch.exp(lse_b - lse)[..., None] * o_b, lse


def _store(out: torch.Tensor, b: int, lo: int, hi: int, x: torch.Tensor) -> None:
    """Write ``[Hkv, r*n, ...]`` rows back into ``out[b, :, lo:hi]`` ``[H, n, ...]``."""
    view = out[b, :, lo:hi]
    view.copy_(x.reshape(view.shape))


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PrefixLayout, scale: float
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """q ``[B, Hq, S, D]``, k, v ``[B, Hkv, S, D]`` -> (o ``[B, Hq, S, D]`` at q's dtype, a view of a ``[B, S, Hq, D]``
    buffer; lse ``[B, Hq, S]`` natural log, in the work dtype; padding rows have o = 0, lse = -inf)."""
    work, hkv = _work(q), k.shape[1]
    bsz, hq, s, d = q.shape
    o = torch.zeros((bsz, s, hq, d), dtype=work, device=q.device).transpose(1, 2)  # transformers' output layout
    lse = torch.full(q.shape[:3], float("-inf"), dtype=work, device=q.device)
    for b, a, p, comps in layout.segments():
        kp, vp = _rows(k, b, a, a + p, hkv, work), _rows(v, b, a, a + p, hkv, work)
        o_a, l_a = _part_fwd(_rows(q, b, a, a + p, hkv, work), kp, vp, scale, p, True)
        _store(o, b, a, a + p, o_a)
        _store(lse, b, a, a + p, l_a)
        lo, hi = a + p, comps[-1][0] + comps[-1][1]
        o_b1, l_b1 = _part_fwd(_rows(q, b, lo, hi, hkv, work), kp, vp, scale, hi - lo, False)
        o_b1 = o_b1.reshape(hkv, -1, hi - lo, q.shape[-1])
        l_b1 = l_b1.reshape(hkv, -1, hi - lo)
        for c, n in comps:
            kc, vc = _rows(k, b, c, c + n, hkv, work), _rows(v, b, c, c + n, hkv, work)
            o_b2, l_b2 = _part_fwd(_rows(q, b, c, c + n, hkv, work), kc, vc, scale, n, True)
            sl = slice(c - lo, c - lo + n)
            o_c, l_c = _merge(o_b1[:, :, sl].reshape(o_b2.shape), l_b1[:, :, sl].reshape(l_b2.shape), o_b2, l_b2)
            _store(o, b, c, c + n, o_c)
            _store(lse, b, c, c + n, l_c)
    return o.to(q.dtype), lse


def _part_bwd(q, k, v, do, lse, delta, scale, n, causal):
    """Gradients of one part from the merged lse and ``delta = rowsum(dO * O)``: (dq, dk, dv) of the part."""
    p = torch.exp(_scores(q, k, scale, n, causal) - lse[..., None])  # [Hkv, r*n, m]
    dv = torch.bmm(p.transpose(1, 2), do)
    ds = p.mul_(torch.bmm(do, v.transpose(1, 2)).sub_(delta[..., None]))
    return torch.bmm(ds, k).mul_(scale), torch.bmm(ds.transpose(1, 2), q).mul_(scale), dv


def backward(q, k, v, o, lse, do, layout: PrefixLayout, scale: float,
             needs: Tuple[bool, bool, bool]) -> Tuple[Optional[torch.Tensor], ...]:
    """(dq, dk, dv) at the input dtypes. Prompt K/V receive the prompt's own part plus, in one product, the part
    of every completion of the group: the sum over the group that the repeated batch forms over G copies."""
    work, hkv = _work(q), k.shape[1]
    dq = torch.zeros(q.shape, dtype=work, device=q.device)
    dk = torch.zeros(k.shape, dtype=work, device=q.device)
    dv = torch.zeros(v.shape, dtype=work, device=q.device)
    delta = (do.to(work) * o.to(work)).sum(-1)  # [B, Hq, S]

    def add(out, b, lo, hi, x):
        view = out[b, :, lo:hi]
        view.add_(x.reshape(view.shape))

    for b, a, p, comps in layout.segments():
        kp, vp = _rows(k, b, a, a + p, hkv, work), _rows(v, b, a, a + p, hkv, work)
        lo, hi = a + p, comps[-1][0] + comps[-1][1]
        for qlo, qhi, klo, khi, causal in [(a, a + p, a, a + p, True), (lo, hi, a, a + p, False)] + \
                [(c, c + n, c, c + n, True) for c, n in comps]:
            kx = kp if klo == a else _rows(k, b, klo, khi, hkv, work)
            vx = vp if klo == a else _rows(v, b, klo, khi, hkv, work)
            gq, gk, gv = _part_bwd(_rows(q, b, qlo, qhi, hkv, work), kx, vx, _rows(do, b, qlo, qhi, hkv, work),
                                   lse[b, :, qlo:qhi].reshape(hkv, -1), delta[b, :, qlo:qhi].reshape(hkv, -1),
                                   scale, qhi - qlo, causal)
            add(dq, b, qlo, qhi, gq)
            add(dk, b, klo, khi, gk)
            add(dv, b, klo, khi, gv)
    return (dq.to(q.dtype) if needs[0] else None, dk.to(k.dtype) if needs[1] else None,
            dv.to(v.dtype) if needs[2] else None)
