"""Shared per-token math: ratios, the clipped surrogate, KL estimators, sequence (segment) reductions.

Every variant is built from these helpers; none re-implements a clip, a ratio, a KL or a reduction.
All functions work on flat ``[n]`` tensors of one slice of whole sequences.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch


def clamp_log(x: torch.Tensor, bound: Optional[float]) -> torch.Tensor:
    """Clamp a log-ratio to ``[-bound, bound]`` before ``exp`` (no-op when bound is None). Zero gradient beyond."""
    return x if bound is None else x.clamp(-bound, bound)


def exp_clamped(x: torch.Tensor, bound: Optional[float]) -> torch.Tensor:
    return torch.exp(clamp_log(x, bound))


class Segments:
    """Reductions over the sequences of a slice. ``seq`` holds slice-local ids 0..S-1, non-decreasing."""

    def __init__(self, seq: torch.Tensor, num: int, mask: torch.Tensor):
        self.seq, self.num, self.mask = seq, num, mask
        self.length = self.sum(mask)  # [S] valid tokens |o_i|

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.num, dtype=x.dtype, device=x.device)
        return out.index_add(0, self.seq, x)

    def amax(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.full((self.num,), -math.inf, dtype=x.dtype, device=x.device)
        return out.scatter_reduce(0, self.seq, x, reduce="amax", include_self=True)

    def masked_mean(self, x: torch.Tensor) -> torch.Tensor:
        """``sum_t m x / max(|o_i|, 1)`` per sequence, ``[S]``."""
        return self.sum(self.mask * x) / self.length.clamp(min=1.0)

    def bcast(self, v: torch.Tensor) -> torch.Tensor:
        return v[self.seq]


class Surrogate(NamedTuple):
    """A variant's policy term: per-token loss (sequence values broadcast) and the metric indicators."""

    loss: torch.Tensor
    ratio: Optional[torch.Tensor] = None  # detached ratio for the ratio metrics (delta-clamped, as TRL logs it)
    low: Optional[torch.Tensor] = None  # clip binds on the low side with A < 0
    high: Optional[torch.Tensor] = None  # clip binds on the high side with A > 0
    dual: Optional[torch.Tensor] = None  # dual clip active (A < 0 and max(r, clip(r)) > c)
    extra: Optional[dict] = None  # variant-specific metric sums


class TokenContext:
    """Per-token inputs of one slice, sanitised so that inactive tokens are finite and carry no gradient.

    ``lp``/``H`` are the current log-prob and entropy (differentiable), ``old``/``ref`` the fixed log-probs,
    ``A`` the advantage, ``m`` the float mask, ``seg`` the sequence reductions, ``batch`` the PGBatch slice and
    ``cfg`` the resolved config.
    """

    def __init__(self, batch, logp: torch.Tensor, entropy: Optional[torch.Tensor], cfg):
        self.batch, self.cfg = batch, cfg
        act = batch.active
        self.m = batch.mask
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        self.lp = torch.where(act, logp, zero)
        self.H = None if entropy is None else torch.where(act, entropy, zero)
        self.old, self.ref, self.A = batch.old_logp, batch.ref_logp, batch.advantages
        self.seg = Segments(batch.seq_local, batch.num_seqs, self.m)
        self._lr = None

    @property
    def lr(self) -> torch.Tensor:
        """Token log-ratio ``logp - old`` (unclamped)."""
        if self._lr is None:
            self._lr = self.lp - self.old
        return self._lr

    def on_policy(self, where: torch.Tensor) -> None:
        """Treat the tokens where ``where`` holds as sampled from the current policy (``lr = 0``, ratio 1 and no
        gradient through it): HPT's demonstrations."""
        self._lr = torch.where(where, torch.zeros_like(self.lp), self.lp - self.old)

    def seq_log_ratio(self) -> torch.Tensor:
        """GSPO's length-normalised sequence log-ratio ``sum_t m lr / max(|o_i|, 1)``, broadcast ``[n]``."""
        return self.seg.bcast(self.seg.masked_mean(self.lr))

    def log_ratio(self, level: str) -> torch.Tensor:
        """Log of the importance ratio at ``level`` (token / sequence / sequence_token), unclamped."""
        if level == "token":
            return self.lr
        ls = self.seq_log_ratio()
        if level == "sequence":
            return ls
        return ls.detach() + self.lp - self.lp.detach()  # sequence_token: value ls, gradient of logp

    def ratio(self, level: Optional[str] = None) -> torch.Tensor:
        return exp_clamped(self.log_ratio(level or self.cfg.importance_sampling_level), self.cfg.log_ratio_clamp)


def clip_gp(r: torch.Tensor, lo, hi) -> torch.Tensor:
    """GPPO's gradient-preserving clip: value ``clip(r, lo, hi)``, gradient ``bound * r / sg(r)`` outside."""
    unit = torch.exp(torch.log(r) - torch.log(r).detach()) if r.requires_grad else torch.ones_like(r)
    return torch.where(r < lo, lo * unit, torch.where(r > hi, hi * unit, r))


def clipped_surrogate(r: torch.Tensor, A: torch.Tensor, lo, hi, *, dual_c: float = math.inf,
                      delta: Optional[float] = None, gradient_preserving: bool = False) -> Surrogate:
    """``max(-A min(r, delta), -A clip(r, lo, hi))``, then ``min(., -A c)`` where ``A < 0``.

    ``lo``/``hi`` are floats or per-token tensors. The clip uses the unclamped ``r`` (TRL's ``delta`` order).
    Indicators follow TRL: low = ``r' < lo and A < 0``, high = ``r' > hi and A > 0`` with ``r'`` the
    delta-clamped ratio; dual = ``A < 0 and max(r, clip(r)) > c`` (verl's ``pg_clipfrac_lower``).
    """
    r2 = clip_gp(r, lo, hi) if gradient_preserving else torch.clamp(r, lo, hi)
    r1 = r if delta is None else torch.clamp(r, max=delta)
    loss = -torch.min(r1 * A, r2 * A)
    dual = None
    if math.isfinite(dual_c):
        neg = A < 0
        loss = torch.where(neg, torch.min(loss, -A * dual_c), loss)
        dual = neg & (torch.max(r, r2).detach() > dual_c)
    rd = r1.detach()
    return Surrogate(loss, rd, (rd < lo) & (A < 0), (rd > hi) & (A > 0), dual)


def kl_estimate(lp: torch.Tensor, ref: torch.Tensor, name: str, exp_bound: Optional[float],
                value_bound: Optional[float]) -> torch.Tensor:
    """KL(pi || ref) per token, ``delta = lp - ref`` (docs/losses.md#kl-to-the-reference). ``X+``: value of X,
    gradient of k2."""
    d = lp - ref
    base = name.rstrip("+")
    if base in ("k1", "kl"):
        kl = d
    elif base == "abs":
        kl = d.abs()
    elif base in ("k2", "mse"):
        kl = 0.5 * d * d
    else:  # k3 / low_var_kl: exp(-d) + d - 1, exponent clamped like every log-ratio
        nd = clamp_log(-d, exp_bound)
        kl = torch.exp(nd) - nd - 1.0
    if value_bound is not None:
        kl = kl.clamp(-value_bound, value_bound)
    if name.endswith("+") and base not in ("k2", "mse"):
        k2 = 0.5 * d * d
        kl = k2 - k2.detach() + kl.detach()
    return kl
