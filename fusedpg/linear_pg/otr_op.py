"""The one-pass OTR custom op: sample, score and differentiate each chunk in the forward (6·N·H·V FLOPs).

OTR's per-candidate coefficients ``c_k = −w_t r_k / K`` depend only on the draws, the labels and the aggregation
weights, all known once a chunk's candidates are drawn, so the chunk's logits serve the draws, the statistics and
the gradient in one pass (the one-pass plan of the fused PG loss, ``steps.TorchStep``); the autograd backward
only scales the saved gradients by the upstream scalar.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import fixed_rows
from ..gemm import accumulate_mm_
from ..linear.plan_torch import compute_head, tempered_logits
from ..options import DEFAULT_CHUNK_BYTES
from ..rows import Rows
from ..sampling import inverse_cdf, uniforms
from ..softmax_math import compute_dtype, rows_per_chunk, softmax_grad_, softmax_stats
from ..temperature import Temperature


def otr_rewards(tokens: torch.Tensor, labels: torch.Tensor, beta: float, baseline: str) -> torch.Tensor:
    """Per-candidate rewards ``[..., K]``: 1 for the ground-truth token, ``-beta`` for any other; with
    ``baseline="mean"`` minus the position's mean reward (the K candidates as a group)."""
    r = torch.where(tokens == labels.unsqueeze(-1), 1.0, -float(beta))
    return r - r.mean(-1, keepdim=True) if baseline == "mean" else r


@torch.library.custom_op("fusedpg::otr_loss", mutates_args=())
def otr_loss_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    w: torch.Tensor, sample_ids: torch.Tensor, temp_rows: Optional[torch.Tensor], temp_value: float,
    num_samples: int, seed: int, beta: float, baseline: str, ignore_index: int, chunk_bytes: int,
    deterministic: bool, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden ``[N, H]``, labels ``[N]``, w ``[N]`` (aggregation weights; 0: not in the loss) -> (loss ``[]``,
    tokens ``[N, K]``, entropy ``[N]``, d_hidden, d_weight, d_bias) with the gradients of the loss (empty where
    not needed); rows with w = 0 are skipped (tokens ``ignore_index``)."""
    n, work = hidden.shape[0], compute_dtype(hidden.dtype)
    temp = Temperature.of(temp_rows, temp_value)
    rows = Rows((w != 0).to(torch.int64), 0)
    tokens = torch.full((n, num_samples), ignore_index, dtype=torch.int64, device=hidden.device)
    entropy = hidden.new_zeros(n, dtype=work)
    loss = hidden.new_zeros((), dtype=work)
    dh = torch.zeros_like(hidden) if need_hidden else hidden.new_empty(0)
    dw = torch.zeros(weight.shape, dtype=work, device=weight.device) if need_weight else weight.new_empty(0)
    db = torch.zeros(weight.shape[0], dtype=work, device=weight.device) if need_bias else weight.new_empty(0)
    if rows.count == 0:
        return loss, tokens, entropy, dh, dw.to(weight.dtype), db
    h, y_true, wt, t = rows.take(hidden), rows.take(labels), rows.take(w).to(work), temp.take(rows.idx)
    u = uniforms(seed, rows.take(sample_ids), num_samples)
    wm, b = compute_head(weight, bias, work)
    budget = chunk_bytes if chunk_bytes > 0 else DEFAULT_CHUNK_BYTES
    step, take = fixed_rows.chunking(deterministic, rows_per_chunk(wm.shape[0], budget, work.itemsize), h.device)
    picked = torch.empty((h.shape[0], num_samples), dtype=torch.int64, device=h.device)
    ent = torch.empty(h.shape[0], dtype=work, device=h.device)
    dh_c = torch.empty(h.shape, dtype=hidden.dtype, device=h.device) if need_hidden else None
    for lo in range(0, h.shape[0], step):
        hi = min(h.shape[0], lo + step)
        hc, tc, wc = take(h, lo, hi), take(t, lo, hi), take(wt, lo, hi)
        z = tempered_logits(hc, wm, b, tc, work)
        y = inverse_cdf(z, take(u, lo, hi, 0.5))
        logp, en, _, log_s = softmax_stats(z, y, True)  # z is now z - max
        r = otr_rewards(y, take(y_true, lo, hi, -1), beta, baseline).to(work)
        loss = loss - (wc * (r * logp).mean(-1)).sum()
        picked[lo:hi], ent[lo:hi] = y[:hi - lo], en[:hi - lo]
        if need_hidden or need_weight or need_bias:
            g = softmax_grad_(z, y, None, log_s, en, -wc[:, None] * r / num_samples, None, tc)
            if need_hidden:
                dh_c[lo:hi] = torch.mm(g, wm)[:hi - lo]
            if need_weight:
                accumulate_mm_(dw, g, hc)
            if need_bias:
                db += g.sum(0)
    tokens.index_copy_(0, rows.idx, picked) if rows.idx is not None else tokens.copy_(picked)
    entropy = rows.scatter(ent)
    if need_hidden:
        dh = rows.scatter(dh_c)
    return (loss, tokens, entropy, dh, dw.to(weight.dtype) if need_weight else dw,
            db.to(bias.dtype) if need_bias else db)


@otr_loss_op.register_fake
def _(hidden, weight, bias, labels, w, sample_ids, temp_rows, temp_value, num_samples, seed, beta, baseline,
      ignore_index, chunk_bytes, deterministic, need_hidden, need_weight, need_bias):
    work, n = compute_dtype(hidden.dtype), hidden.shape[0]
    like = (lambda x, need: torch.empty_like(x) if need else x.new_empty(0))
    return (hidden.new_empty((), dtype=work), hidden.new_empty((n, num_samples), dtype=torch.int64),
            hidden.new_empty(n, dtype=work), like(hidden, need_hidden), like(weight, need_weight),
            like(weight[:, 0], need_bias))


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.has_bias = inputs[2] is not None
    ctx.save_for_backward(*output[3:])


def _backward(ctx, grad_loss, *_unused) -> Tuple[Optional[torch.Tensor], ...]:
    dh, dw, db = ctx.saved_tensors
    scale = (lambda g: None if grad_loss is None or g.numel() == 0 else g * grad_loss.to(g.dtype))
    return (scale(dh), scale(dw), scale(db) if ctx.has_bias else None) + (None,) * 15


otr_loss_op.register_autograd(_backward, setup_context=_setup)
