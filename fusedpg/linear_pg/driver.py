"""The chunk driver of the fused PG loss: sequence-aligned chunks of active tokens, statistics, per-token
coefficients from the loss layer, gradient contributions; and the autograd Function around it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..objective import PGBatch, PGLossConfig, merge_metrics, token_loss
from ..options import LogProbOptions
from ..softmax_math import rows_per_chunk
from .steps import TorchStep, TritonStep


def sequence_chunks(offsets: Tuple[int, ...], active: torch.Tensor, max_rows: int) -> List[Tuple[int, int]]:
    """Token ranges ``[lo, hi)`` on sequence boundaries, each holding at most ``max_rows`` active tokens unless a
    single sequence alone has more (then that sequence is one chunk)."""
    return _sequence_chunks(offsets, _active_prefix_counts(active), max_rows)


def _active_prefix_counts(active: torch.Tensor) -> List[int]:
    """Active tokens before each position, ``[N + 1]`` on the host: the one host read of the chunk planning."""
    return torch.cat([active.new_zeros(1, dtype=torch.long), active.long().cumsum(0)]).tolist()


def _sequence_chunks(offsets, csum: List[int], max_rows: int) -> List[Tuple[int, int]]:
    if len(offsets) < 2:
        return []
    chunks, lo = [], offsets[0]
    for a, b in zip(offsets[:-1], offsets[1:]):
        if b > lo and csum[b] - csum[lo] > max_rows and a > lo:
            chunks.append((lo, a))
            lo = a
    if offsets[-1] > lo or not chunks:
        chunks.append((lo, offsets[-1]))
    return chunks


@dataclass
class FusedRun:
    """Everything that is not a differentiable tensor, for one call; results land in ``loss``/``metrics``."""

    batch: PGBatch
    cfg: PGLossConfig
    targets: torch.Tensor  # [N]
    temp: object  # float or [N] fp32
    impl: str
    opts: LogProbOptions
    want_token_stats: bool = False
    metrics: Optional[Dict[str, torch.Tensor]] = None
    logp: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None

    def execute(self, hidden, weight, bias, needs):
        """Loss and, where ``needs`` asks, (dh, dW, db) — all computed in this one forward pass."""
        batch, cfg = self.batch, self.cfg
        need_h, need_w, need_b = needs
        work = batch.dtype
        n = hidden.shape[0]
        step = (TritonStep if self.impl == "triton" else TorchStep)(weight, bias, self.opts)
        budget = self.opts.device_chunk_bytes if self.impl == "triton" else self.opts.chunk_bytes
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
        grads = any(needs)
        spec = None
        if self.impl == "triton":
            from .epilogue import epilogue_spec

            spec = epilogue_spec(cfg, batch)
        csum = _active_prefix_counts(batch.active)
        active_rows = torch.nonzero(batch.active).squeeze(1)  # once: per-chunk nonzero would sync every chunk
        for lo, hi in _sequence_chunks(batch.offsets, csum, max_rows):
            idx = active_rows[csum[lo]:csum[hi]]
            part = batch.slice(lo, hi)
            h, y = hidden.index_select(0, idx), self.targets.index_select(0, idx)
            t = self.temp.index_select(0, idx) if isinstance(self.temp, torch.Tensor) else self.temp
            grad_out = (torch.empty_like(h) if need_h else None, dw, db)
            if spec is not None:
                total, part_sums, lp, en = self._chunk_epilogue(weight, bias, h, y, t, part, idx - lo, spec, grad_out)
            else:
                total, part_sums, lp, en = self._chunk_generic(step, h, y, t, part, idx - lo, grads, grad_out)
            if need_h and idx.numel():
                dh.index_copy_(0, idx, grad_out[0])
            loss = loss + total
            sums = merge_metrics(sums, part_sums)
            logp_all[lo:hi], ent_all[lo:hi] = lp, en
        self.metrics = sums
        if self.want_token_stats:
            self.logp, self.entropy = logp_all, ent_all
        return loss, dh, dw, db


    def _chunk_generic(self, step, h, y, t, part, rows, grads, grad_out):
        """Statistics from the backend step, (c, d) from the loss layer by autograd on ``[n]`` scalars."""
        work = self.batch.dtype
        n = part.num_tokens
        lp = torch.zeros(n, dtype=work, device=h.device)
        en = torch.zeros(n, dtype=work, device=h.device)
        if rows.numel():
            lp_a, en_a = step.stats(h, y, t)
            lp[rows], en[rows] = lp_a.to(work), en_a.to(work)
        lp.requires_grad_(grads)
        en.requires_grad_(grads)
        with torch.enable_grad():
            contrib, part_sums = token_loss(part, lp, en, self.cfg)
            total = contrib.sum()
        if grads and rows.numel() and total.requires_grad:
            c, d = torch.autograd.grad(total, [lp, en], allow_unused=True)
            c = torch.zeros_like(lp) if c is None else c
            step.grads(h, y, t, c.index_select(0, rows), None if d is None else d.index_select(0, rows), *grad_out)
        return total.detach(), _detached(part_sums), lp.detach(), en.detach()

    def _chunk_epilogue(self, weight, bias, h, y, t, part, rows, spec, grad_out):
        """cuBLAS logits chunk, then one Triton launch for statistics, loss, c, d and dL/du (over the chunk)."""
        from .epilogue import run_epilogue

        work = self.batch.dtype
        n = part.num_tokens
        lp = torch.zeros(n, dtype=work, device=h.device)
        en = torch.zeros(n, dtype=work, device=h.device)
        total = torch.zeros((), dtype=work, device=h.device)
        if rows.numel():
            x = torch.mm(h, weight.T)
            if bias is not None:
                x += bias
            if spec["SEQ"]:
                lp_a, en_a, loss_t = _sequence_epilogue(x, y, t, part, rows, spec)
            else:
                lp_a, en_a, loss_t = run_epilogue(x, y, t, part, rows, spec)
            lp[rows], en[rows] = lp_a.to(work), en_a.to(work)
            total = loss_t.to(work).sum()
            dh_out, dw_acc, db_acc = grad_out
            if dh_out is not None:
                torch.mm(x, weight, out=dh_out)
            if dw_acc is not None:
                dw_acc.add_(torch.mm(x.T, h))
            if db_acc is not None:
                db_acc += x.sum(0, dtype=torch.float32)
        _, part_sums = token_loss(part, lp, en, self.cfg)  # metrics only: detached [n] math
        return total, _detached(part_sums), lp, en


def _sequence_epilogue(x, y, t, part, rows, spec):
    """GSPO family on Triton: statistics kernel, the sequence terms (two segment sums around one kernel), then
    the gradient kernel over the same logits buffer."""
    from ..logits import launch_triton as logits_kernels
    from .epilogue import run_sequence_terms

    opts = LogProbOptions(compute_entropy=True, inplace=True)
    valid = torch.ones_like(y, dtype=torch.bool)
    lp, ent, m, log_s = logits_kernels.forward(x, y, valid, t, opts)
    loss, c, d = run_sequence_terms(lp, ent, part, rows, spec)
    logits_kernels.backward(x, y, valid, t, m, log_s, ent, c, d if spec["ent_coef"] != 0.0 else None, opts)
    return lp, ent, loss


def _detached(sums):
    return {k: v.detach() for k, v in sums.items()}


class FusedLinearPGLossFunction(torch.autograd.Function):
    """hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]`` or None -> scalar loss. The gradients are formed during
    the forward (one pass); backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, run: FusedRun, needs):
        loss, dh, dw, db = run.execute(hidden, weight, bias, needs)
        ctx.save_for_backward(dh, dw, db)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw, db = ctx.saved_tensors
        out = []
        for g, dt in zip((dh, dw, db), ctx.dtypes):
            out.append(None if g is None else (g * grad_loss.to(g.dtype)).to(dt))
        return out[0], out[1], out[2], None, None
