"""Launchers of the fused linear log-prob + entropy kernels: allocate, size the grid, launch. No autograd."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton

from .. import fixed_rows
from ..gemm import accumulate_mm_, row_step, triton_accumulate_mm_
from ..kernel_config import check_triton_dtype, programs_wanted, tile_config
from ..logits.launch_triton import target_layout
from ..options import LogProbOptions
from ..temperature import Temperature
from ..kernels.linear_logprob_entropy import (
    _linear_logits_kernel,
    _linear_logprob_entropy_bwd_kernel,
    _linear_logprob_entropy_fwd_kernel,
    _linear_logprob_entropy_merge_kernel,
)


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    temp: Temperature,
    opts: LogProbOptions,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden ``[N, H]``, weight ``[V, H]``, targets ``[N]`` -> (logp, entropy, m, log_s) fp32 ``[N]``; targets
    ``[N, K]`` (-1: no target) give logp ``[N, K]``."""
    parts, zy = forward_partials(hidden, weight, bias, targets, temp, opts)
    return merge_partials(parts, zy, opts.compute_entropy)


def forward_partials(hidden, weight, bias, targets, temp: Temperature, opts: LogProbOptions):
    """The forward kernel's per-split states before the merge: (parts ``[N, 3, S]``, (m, s, q) of each row in each
    of the S vocabulary splits; zy, the targets' tempered logits in ``targets``' shape, 0 where a target is -1).
    With ``opts.deterministic`` the splits are the fixed vocabulary segments (``fixed_rows.vocab_segment``)."""
    check_triton_dtype("hidden", hidden)
    bias = None if bias is None else bias.contiguous()  # the kernels read bias with unit stride
    n, h_dim = hidden.shape
    vocab = weight.shape[0]
    cfg = tile_config(hidden.dtype)
    row_blocks = triton.cdiv(n, cfg.BT)
    v_blocks = triton.cdiv(vocab, cfg.BV)
    if opts.deterministic:  # fixed vocabulary segments, whatever N and the device: a fixed merge order
        v_per_split = segment_columns(hidden.dtype, hidden.device)
    else:  # split the vocabulary across programs only as far as needed to fill the device
        splits = min(v_blocks, max(1, triton.cdiv(programs_wanted(hidden.device), row_blocks)))
        v_per_split = triton.cdiv(v_blocks, splits) * cfg.BV
    splits = triton.cdiv(vocab, v_per_split)
    states = torch.empty((3, splits, n), dtype=torch.float32, device=hidden.device)
    y, k, kp = target_layout(targets)
    zy = torch.zeros(y.shape, dtype=torch.float32, device=hidden.device)
    t, stride_t = temp.kernel_arg(hidden.device)
    _linear_logprob_entropy_fwd_kernel[(row_blocks, splits)](
        hidden, weight, bias if bias is not None else weight, y, t,
        states[0], states[1], states[2], zy,
        n, vocab, h_dim, v_per_split, k,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), stride_t,
        HAS_BIAS=bias is not None, COMPUTE_ENTROPY=opts.compute_entropy, DOT_PRECISION=cfg.dot_precision, UPCAST_DOT=cfg.upcast_dot,
        BT=cfg.BT, BV=cfg.BV, BK=cfg.BK, KP=kp, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return states.permute(2, 0, 1), zy.view(targets.shape)


def segment_columns(dtype: torch.dtype, device: torch.device) -> int:
    """Columns of a deterministic split: the fixed segment rounded up to whole vocabulary tiles."""
    bv = tile_config(dtype).BV
    return triton.cdiv(fixed_rows.vocab_segment(device), bv) * bv


def merge_partials(parts: torch.Tensor, zy: torch.Tensor, compute_entropy: bool):
    """(logp, entropy, m, log_s) from ``forward_partials``' output: the merge kernel folds the splits in order."""
    states = parts.permute(1, 2, 0).contiguous()  # [3, S, N]: a view of the kernel's buffer, or the gathered parts
    splits, n = states.shape[1:]
    shape = zy.shape
    y, k, kp = target_layout(zy)
    zy = zy.reshape(y.shape).contiguous()
    f32 = dict(dtype=torch.float32, device=parts.device)
    logp = torch.empty(y.shape, **f32)
    entropy, mx, log_s = (torch.empty(n, **f32) for _ in range(3))
    merge_bt = 128
    _linear_logprob_entropy_merge_kernel[(triton.cdiv(n, merge_bt),)](
        states[0], states[1], states[2], zy, logp, entropy, mx, log_s, n, splits, k,
        COMPUTE_ENTROPY=compute_entropy, BT=merge_bt, KP=kp,
    )
    return logp.view(shape), entropy, mx, log_s


def chunk_logits(weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """``logits(h, temp)``: the tempered fp32 logits ``[R, V]`` of rows ``h`` ``[R, H]``, formed by the fused kernels'
    tile code (half-precision products, fp32 accumulation): the truncated head's chunks on this backend."""
    bias = None if bias is None else bias.contiguous()

    def logits(h: torch.Tensor, temp: Temperature) -> torch.Tensor:
        check_triton_dtype("hidden", h)
        (n, h_dim), vocab = h.shape, weight.shape[0]
        cfg = tile_config(h.dtype)
        z = torch.empty((n, vocab), dtype=torch.float32, device=h.device)
        t, stride_t = temp.kernel_arg(h.device)
        _linear_logits_kernel[(triton.cdiv(n, cfg.BT), triton.cdiv(vocab, cfg.BV))](
            h, weight, bias if bias is not None else weight, t, z, n, vocab, h_dim,
            h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), stride_t, z.stride(0),
            HAS_BIAS=bias is not None, DOT_PRECISION=cfg.dot_precision, UPCAST_DOT=cfg.upcast_dot,
            BT=cfg.BT, BV=cfg.BV, BK=cfg.BK, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return z

    return logits


def backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    temp: Temperature,
    m: torch.Tensor,
    log_s: torch.Tensor,
    entropy: torch.Tensor,
    c: torch.Tensor,
    d: Optional[torch.Tensor],
    opts: LogProbOptions,
    needs: Tuple[bool, bool, bool],
    tau: Optional[torch.Tensor] = None,
    fold=None,
):
    """(d_hidden ``[N, H]``, d_weight ``[V, H]``, d_bias ``[V]``), None where not needed.

    Per chunk of rows a kernel writes dL/du ``[rows, V]`` (fp32 for fp32 inputs, else the input dtype) into one
    reused buffer of at most ``opts.device_chunk_bytes``; cuBLAS then forms dhidden rows (deterministic: the
    fixed-tile Triton GEMM of ``kernels/accumulate_mm.py``), and ``accumulate_mm_`` adds each chunk's dweight into
    the fp32 accumulator inside the GEMM (fusedpg/gemm.py).

    ``tau`` ``[N]``: the forward's truncation thresholds (logits below them are out of the kept set); the caller has
    zeroed ``c`` on rows whose target fell outside it.

    Deterministic mode: every GEMM is the fixed-tile Triton kernel (``_deterministic_gemms``); ``fold`` (a vocabulary
    shard's, fusedpg/vocab_parallel) continues d_hidden's sum from the shards before this one, and d_hidden then
    comes back in fp32.
    """
    n, h_dim = hidden.shape
    vocab = weight.shape[0]
    cfg = tile_config(hidden.dtype)
    need_h, need_w, need_b = needs
    bias = None if bias is None else bias.contiguous()  # the kernels read bias with unit stride
    g_dtype = hidden.dtype
    det = opts.deterministic
    # deterministic: chunks start at multiples of the accumulate kernel's row step too, so its sums chain exactly
    step = math.lcm(cfg.BT, row_step(g_dtype)) if det else cfg.BT
    rows = max(step, opts.device_chunk_bytes // (vocab * g_dtype.itemsize) // step * step)
    rows = min(rows, n)
    g = torch.empty((rows, vocab), dtype=g_dtype, device=hidden.device)
    single = rows == n and not det
    dh = None
    if need_h:  # deterministic: an fp32 running sum over V (handed on between shards by ``fold``), rounded at the end
        dh = torch.zeros(hidden.shape, dtype=torch.float32 if det else hidden.dtype, device=hidden.device)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w and not single else None
    db = torch.zeros(vocab, dtype=torch.float32, device=weight.device) if need_b else None
    t, stride_t = temp.kernel_arg(hidden.device)
    y, k, kp = target_layout(targets)
    c = c.float().reshape(y.shape).contiguous()
    d = None if d is None else d.float().contiguous()
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        r = hi - lo
        h = hidden[lo:hi]
        _linear_logprob_entropy_bwd_kernel[(triton.cdiv(r, cfg.BT), triton.cdiv(vocab, cfg.BV))](
            h, weight, bias if bias is not None else weight, y[lo:], t[lo:] if stride_t else t,
            m[lo:], log_s[lo:], entropy[lo:], c[lo:], d[lo:] if d is not None else c, g,
            tau[lo:] if tau is not None else m, r, vocab, h_dim, k,
            h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), stride_t, g.stride(0),
            HAS_BIAS=bias is not None, HAS_D=d is not None, DOT_PRECISION=cfg.dot_precision, UPCAST_DOT=cfg.upcast_dot,
            BT=cfg.BT, BV=cfg.BV, BK=cfg.BK, KP=kp, HAS_TAU=tau is not None, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        gc = g[:r]
        if det:
            _deterministic_gemms(gc, h, weight, lo, n, dh, dw, db, fold)
            continue
        if need_h:
            torch.mm(gc, weight, out=dh[lo:hi])
        if need_w:
            if single:
                dw = torch.mm(gc.T, h)
            else:  # fp32 sum inside the GEMM: no [V, H] temporary, no bf16 rounding of the chunk's partial
                accumulate_mm_(dw, gc, h)
        if need_b:
            db.add_(gc.sum(0, dtype=torch.float32))
    if dh is not None and fold is None:
        dh = dh.to(hidden.dtype)
    return (
        dh,
        None if dw is None else dw.to(weight.dtype),
        None if db is None else db.to(bias.dtype),
    )


def _deterministic_gemms(g, h, weight, lo, n, dh, dw, db, fold) -> None:
    """One chunk's gradient GEMMs in deterministic mode, rows ``[lo, lo + len(g))`` of N, on the fixed-tile Triton
    kernel (kernels/accumulate_mm.py; no split-K, no atomics, tiles independent of N and of the device's size):

    * d_hidden += g @ W: a row's sum over V runs in vocabulary order and depends on that row alone; with ``fold`` it
      starts from the running sums of the shards before this one (received in ``fold.CHUNK``-row messages, the
      chunk's GEMM run once on all of them) and is handed on, so the last shard ends with one process's bits;
    * d_weight += g^T h and d_bias += g^T 1: one running fp32 sum over the rows, whatever the chunks (they start at
      multiples of the kernel's row step), so a shard's rows are one process's rows bit for bit.
    """
    hi = lo + g.shape[0]
    if dh is not None and fold is not None:
        cuts = list(range(lo - lo % fold.CHUNK + fold.CHUNK, hi, fold.CHUNK))  # fold's message boundaries inside
        blocks = list(zip([lo] + cuts, cuts + [hi]))
        dh[lo:hi] = torch.cat([fold.start(a, b, b - a, n) for a, b in blocks])
    if dh is not None:
        triton_accumulate_mm_(dh[lo:hi], g.T, weight)
    if dh is not None and fold is not None:
        for a, b in blocks:
            fold.done(a, b, dh[a:b], n)
    if dw is not None:
        triton_accumulate_mm_(dw, g, h)
    if db is not None:
        triton_accumulate_mm_(db.view(-1, 1), g, g.new_ones(g.shape[0], 1))
