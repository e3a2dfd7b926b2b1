"""Log-probs of the truncated sampling distribution: top-k, top-p and min-p as one per-row logit threshold.

A sampler that draws from a truncated distribution (vLLM's ``top_k``, ``top_p``, ``min_p``) keeps the tokens whose
tempered logit is at least a per-row threshold and renormalises over them. fusedpg finds that threshold on each
chunk's logits buffer: top-k by a selection (``kthvalue``), top-p by a radix select over the logits' ordered integer
keys (4 passes over the chunk for fp32, a bisection for fp64; per-row k counts the same way); no sort, sets the logits below it to ``-inf`` and then runs the ordinary softmax statistics and gradient (the backward's recompute reuses the
forward's thresholds, ``apply_``): the
log-prob, entropy and gradients are exactly those of the renormalised kept distribution, and the thresholds, being
piecewise constant, contribute no gradient. Order and tie rules: fusedpg/linear/README.md#truncated-sampling.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from .softmax_math import target_columns

#: The log-prob returned for a target outside the kept set (sampler and trainer disagree): finite, never NaN.
OUTSIDE_LOGP = -1.0e4


@dataclass(frozen=True)
class Truncation:
    """Per-row ``[N]`` settings, each ``None`` when off everywhere: top_k (int64, 0 = off), top_p (1 = off),
    min_p (0 = off)."""

    top_k: Optional[torch.Tensor] = None
    top_p: Optional[torch.Tensor] = None
    min_p: Optional[torch.Tensor] = None
    #: Host-side facts of the settings, read once per call by ``resolved`` (None: read per chunk): whether some
    #: row's top-k cuts, the one k of every row (0: they differ), whether some row's top-p cuts.
    k_on: Optional[bool] = None
    k_uniform: Optional[int] = None
    p_on: Optional[bool] = None
    #: A vocabulary-parallel head: the ``torch.distributed`` group whose ranks hold the other columns (the row max,
    #: the sums and the select's histograms are all-reduced over it; every rank must run the same chunks), and the
    #: whole vocabulary's size (0: the chunk's width).
    across: Optional[object] = None
    vocab: int = 0
    #: Select with the Triton digit-mass kernel (the Triton backend's fp32 chunks) instead of torch histograms.
    kernel: bool = False

    def resolved(self, vocab: int) -> "Truncation":
        """This truncation with its host-side facts read in one device-to-host copy (one sync per call on CUDA,
        instead of a few per chunk)."""
        if not self.active:
            return self
        if self.k_on is not None:
            return self if self.vocab else replace(self, vocab=vocab)
        probe = []
        if self.top_k is not None:
            k = self.top_k
            same = (k == k[0]).all() if k.numel() else torch.ones((), dtype=torch.bool, device=k.device)
            probe += [((k > 0) & (k < vocab)).any().long(), same.long(), k[:1].sum()]
        if self.top_p is not None:
            probe.append((self.top_p < 1).any().long())
        got = torch.stack(probe).tolist() if probe else []  # min-p alone needs no host fact
        k_on, k_uniform = (bool(got[0]), int(got[2]) if got[1] else 0) if self.top_k is not None else (False, 0)
        return replace(self, k_on=k_on, k_uniform=k_uniform, p_on=bool(got[-1]) if self.top_p is not None else False,
                       vocab=self.vocab or vocab)

    @property
    def active(self) -> bool:
        return self.top_k is not None or self.top_p is not None or self.min_p is not None

    def op_args(self):
        return self.top_k, self.top_p, self.min_p

    def take(self, idx: Optional[torch.Tensor]) -> "Truncation":
        pick = (lambda t: t if t is None or idx is None else t.index_select(0, idx))
        return replace(self, top_k=pick(self.top_k), top_p=pick(self.top_p), min_p=pick(self.min_p))

    def slice(self, lo: int, hi: int, rows: Optional[int] = None) -> "Truncation":
        """Rows ``[lo, hi)``; with ``rows``, padded to that many rows with the neutral settings."""
        def cut(t, neutral):
            if t is None:
                return None
            t = t[lo:hi]
            return t if rows is None or t.shape[0] >= rows else torch.cat([t, t.new_full((rows - t.shape[0],),
                                                                                          neutral)])
        return replace(self, top_k=cut(self.top_k, 0), top_p=cut(self.top_p, 1.0), min_p=cut(self.min_p, 0.0))


def _reduced(x: torch.Tensor, across, op: str) -> torch.Tensor:
    """``x`` reduced over the ranks of ``across`` (``"sum"``, ``"max"``, ``"min"``) in place; as it is without."""
    if across is not None:
        import torch.distributed as dist

        dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op],
                        group=across)
    return x


def _keys(z: torch.Tensor) -> torch.Tensor:
    """Integer keys ordered like the floats of ``z`` (fp32 -> int32 bits, fp64 -> int64)."""
    bits = z.view(torch.int32 if z.dtype == torch.float32 else torch.int64)
    flip = torch.iinfo(bits.dtype).max
    return torch.where(bits < 0, bits ^ flip, bits)


#: Columns of one block of the radix select's histogram pass (bounds its int64 / fp64 temporaries).
RADIX_COLUMNS = 4096


def _select(keys: torch.Tensor, weights: Optional[torch.Tensor], target: torch.Tensor, iters: int,
            across=None) -> torch.Tensor:
    """Per row, the largest key ``t`` with ``sum(weights[keys >= t]) >= target`` (counts when ``weights`` is None):
    a radix select for int32 keys (4 passes of 8 bits), else a bisection whose every step is one pass. The counts
    and masses are summed over the ranks of ``across``."""
    if keys.dtype == torch.int32:
        return _radix_select(keys, weights, target, across)
    lo = _reduced(keys.amin(1).to(torch.int64), across, "min")
    hi = _reduced(keys.amax(1).to(torch.int64), across, "max") + 1
    for _ in range(iters):
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2): hi - lo overflows int64 at -inf keys
        above = keys >= mid.to(keys.dtype)[:, None]  # mid < hi <= max key + 1: fits the keys' dtype but at the top
        mass = _reduced(above.sum(1) if weights is None else (weights * above).sum(1), across, "sum")
        ok = mass >= target
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return lo


def _from_keys(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The floats whose ``_keys`` are ``keys`` (the inverse map)."""
    bits = keys.to(torch.int32 if dtype == torch.float32 else torch.int64)
    flip = torch.iinfo(bits.dtype).max
    return torch.where(bits < 0, bits ^ flip, bits).view(dtype)


def apply_(z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Set ``z`` ``[R, V]`` below the row thresholds ``tau`` ``[R]`` (from ``truncate_``) to ``-inf``; return z. The
    backward's recompute uses the forward's thresholds instead of selecting them again."""
    return z.masked_fill_(z < tau[:, None], float("-inf"))


def _radix_select(keys: torch.Tensor, weights: Optional[torch.Tensor], target: torch.Tensor,
                  across=None) -> torch.Tensor:
    """``_select`` for int32 keys by 8-bit digits in torch: per pass, a 256-bin histogram (weighted, summed in
    float64 so that the mass test does not depend on the order of an fp32 sum) of the keys that share the digits
    chosen so far. Four passes over the chunk instead of the bisection's 33."""
    rows, vocab = keys.shape

    def hist_of(shift: int, prefix: torch.Tensor) -> torch.Tensor:
        hist = torch.zeros(rows, 256, dtype=torch.float64, device=keys.device)
        for lo in range(0, vocab, RADIX_COLUMNS):
            u = keys[:, lo:lo + RADIX_COLUMNS].to(torch.int64) + 2 ** 31  # unsigned order, in [0, 2^32)
            w = (torch.ones_like(u, dtype=torch.float64) if weights is None
                 else weights[:, lo:lo + RADIX_COLUMNS].to(torch.float64))
            if shift < 24:
                w = w.masked_fill_((u >> (shift + 8)) != prefix[:, None], 0.0)
            hist.scatter_add_(1, (u >> shift) & 255, w)
        return hist

    return _digit_select(hist_of, target.to(torch.float64), rows, keys.device, across, 8)


def _kernel_select(z: torch.Tensor, m: torch.Tensor, goal, weighted: bool, across=None) -> torch.Tensor:
    """``_select`` of fp32 logits by the Triton digit-mass kernel (kernels/truncation.py): eight passes of 4-bit
    digits, each one read of the chunk with the weights ``exp(z - m)`` formed in registers, no histogram atomics.
    ``goal``: ``[R]``, or a function of each row's total mass (the first pass's sum: top-p's fraction of it)."""
    import triton  # lazy: only the Triton backend's truncated head gets here

    from .backend import triton_interpreting
    from .kernels.truncation import _digit_mass_kernel

    rows, vocab = z.shape
    m = m.reshape(rows).float().contiguous()
    block = 64 if triton_interpreting() else 256

    def hist_of(shift: int, prefix: torch.Tensor) -> torch.Tensor:
        hist = torch.empty(rows, 16, dtype=torch.float64, device=z.device)
        if rows:
            _digit_mass_kernel[(rows,)](z, m, prefix, hist, vocab, z.stride(0), SHIFT=shift, WEIGHTED=weighted,
                                        BLOCK=block, num_warps=4)
        return hist

    return _digit_select(hist_of, goal, rows, z.device, across, 4)


def _digit_select(hist_of, goal, rows: int, device, across, bits: int) -> torch.Tensor:
    """The radix select's decisions, most significant digit first: ``hist_of(shift, prefix)`` gives each row's
    float64 mass per ``bits``-bit digit among the keys whose higher digits are ``prefix`` (summed over the ranks of
    ``across``); the largest digit whose mass from the top, plus the mass of larger prefixes, reaches the goal is
    chosen. Returns the signed key of the threshold."""
    nb = 1 << bits
    bins = torch.arange(nb, device=device)
    prefix = torch.zeros(rows, dtype=torch.int64, device=device)
    above = torch.zeros(rows, dtype=torch.float64, device=device)
    for shift in range(32 - bits, -1, -bits):
        hist = _reduced(hist_of(shift, prefix), across, "sum")
        if callable(goal):
            goal = goal(hist.sum(1))
        from_top = hist.flip(1).cumsum(1).flip(1)  # mass of the matching keys whose digit is >= d
        ok = (above[:, None] + from_top) >= goal[:, None]
        d = torch.where(ok.any(1), (ok * bins).amax(1), 0)  # none: the whole row is kept (rounding of target)
        above += torch.where(d < nb - 1, from_top.gather(1, (d + 1).clamp(max=nb - 1)[:, None])[:, 0], 0.0)
        prefix = prefix * nb + d
    return prefix - 2 ** 31


def truncate_(z: torch.Tensor, trunc: Truncation) -> torch.Tensor:
    """Set the tempered logits ``z`` ``[R, V]`` outside each row's kept set to ``-inf`` (in place) and return the
    threshold ``tau`` ``[R]``: the kept set is ``{v : z_v >= tau}`` (``-inf``: everything kept).

    vLLM v1's order: min-p on the tempered distribution (``p >= min_p * p_max``), then top-k (every logit at least
    the k-th largest), then top-p on the distribution renormalised over what is left (the smallest set of the most
    likely tokens whose mass reaches ``p``; the most likely token always stays). Ties at a threshold are kept.
    """
    rows, width = z.shape
    trunc = trunc.resolved(width)  # a no-op when the op already resolved it for the whole call
    vocab, across = trunc.vocab, trunc.across
    iters = 33 if z.dtype == torch.float32 else 65
    kernel = trunc.kernel and z.dtype == torch.float32 and z.stride(1) == 1
    m = _reduced(z.amax(1, keepdim=True), across, "max")
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    floor = torch.full((rows, 1), float("-inf"), dtype=z.dtype, device=z.device)
    if trunc.min_p is not None:
        on = (trunc.min_p > 0)[:, None]
        floor = torch.where(on, m + torch.log(trunc.min_p.to(z.dtype).clamp(min=1e-30))[:, None], floor)
    if trunc.top_k is not None and trunc.k_on:
        # the k-th largest logit by a selection (no sort); every logit at least that large stays (ties kept)
        k = trunc.top_k.clamp(min=1, max=vocab)
        off = ((trunc.top_k <= 0) | (trunc.top_k >= vocab))[:, None]
        if rows and trunc.k_uniform and across is None:  # one k for every row (the usual case): one selection
            kth = z.kthvalue(vocab - min(max(trunc.k_uniform, 1), vocab) + 1, dim=1).values[:, None]
        elif rows and kernel:  # per-row k, or a sharded vocabulary: the count select, all rows at once
            kth = _from_keys(_kernel_select(z, m, k.to(torch.float64), False, across), z.dtype)[:, None]
        elif rows:
            kth = _from_keys(_select(_keys(z), None, k, iters, across), z.dtype)[:, None]
        if rows:
            floor = torch.where(off, floor, torch.maximum(floor, kth))
    z.masked_fill_(z < floor, float("-inf"))
    if trunc.top_p is not None and trunc.p_on:
        if kernel:  # the weights exp(z - m) in the kernel's registers; the goal a fraction of the first pass's sum
            p = trunc.top_p.to(torch.float64)
            at = _from_keys(_kernel_select(z, m, lambda total: p * total, True, across), z.dtype)[:, None]
        else:
            w = torch.exp(z - m)  # 0 on the masked logits
            target = trunc.top_p.to(z.dtype) * _reduced(w.sum(1), across, "sum")
            at = _from_keys(_select(_keys(z), w, target, iters, across), z.dtype)[:, None]
        floor = torch.where((trunc.top_p >= 1)[:, None], floor, torch.maximum(floor, at))
        apply_(z, floor[:, 0])
    return floor[:, 0]


def saved_thresholds(trunc: Truncation, tau: Optional[torch.Tensor]) -> bool:
    """Whether a backward runs truncated: it then needs the thresholds its forward saved (``tau``, non-empty)."""
    if not trunc.active:
        return False
    if tau is None or tau.numel() == 0:
        raise ValueError("tau must be the forward's truncation thresholds (the op's fifth output) when top_k / "
                         "top_p / min_p are given, got " + ("None" if tau is None else "an empty tensor"))
    return True


def truncated_coefficient(z: torch.Tensor, targets: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``c = dL/dlogp`` with rows whose target lies outside the kept set zeroed: their log-prob is the constant
    ``OUTSIDE_LOGP``, so it sends no gradient (the entropy's still flows)."""
    wide = targets if targets.dim() == 2 else targets.unsqueeze(1)
    # a negative target lies in another vocabulary shard: the caller zeroes its c (fusedpg/vocab_parallel)
    outside = torch.isneginf(z.gather(1, target_columns(targets))) & (wide >= 0)
    return c.masked_fill(outside if c.dim() == 2 else outside.squeeze(1), 0.0)
