"""``PGBatch`` and ``prepare``: everything mask-only or precomputed, flattened to ``[N]``, computed once.

A ``PGBatch`` holds per-token tensors of one micro-batch (the aggregation weights ``w_t`` and ``w^H_t``, the
advantage broadcast per token, the fixed log-probs, the rollout IS weights, precomputed variant quantities) plus
the sequence layout. ``batch.slice(lo, hi)`` cuts it on sequence boundaries; ``token_loss`` on each slice gives
that slice's exact share of the loss (engine contract, README.md).
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from ..host import HostReads
from . import aggregation
from .config import PGLossConfig, make_config, resolve
from .inputs import LossInputs
from .validate import flat_inputs, flat_layout


@dataclass(frozen=True)
class PGBatch:
    """Flattened ``[N]`` inputs of the loss. Slices hold whole sequences; ``seq_local`` restarts at 0."""

    mask: torch.Tensor  # float 0/1 loss mask
    active: torch.Tensor  # bool: tokens that carry loss (= mask > 0 unless luspo_unmasked parity)
    seq_local: torch.Tensor  # int64 sequence index, 0..num_seqs-1, non-decreasing
    offsets: Tuple[int, ...]  # token offsets of the sequences, len num_seqs + 1, offsets[0] = 0
    advantages: torch.Tensor
    weights: torch.Tensor  # w_t of the policy and KL terms
    entropy_weights: torch.Tensor  # w^H_t of the entropy bonus
    adv_per_seq: bool = True  # advantages were one value per sequence (TRL's sequence-level metric counting)
    old_logp: Optional[torch.Tensor] = None
    ref_logp: Optional[torch.Tensor] = None
    rollout_logp: Optional[torch.Tensor] = None
    is_weights: Optional[torch.Tensor] = None
    token_weights: Optional[torch.Tensor] = None
    old_entropy: Optional[torch.Tensor] = None
    group: Optional[torch.Tensor] = None
    step: Optional[torch.Tensor] = None
    extra: Dict[str, torch.Tensor] = field(default_factory=dict)  # variant tensors: [N] or 0-dim scalars
    shape: Optional[Tuple[int, int]] = None  # (B, T) of a padded input, None for packed input
    # active tokens before each offset (host ints, like offsets), where prepare was asked to count them
    active_offsets: Optional[Tuple[int, ...]] = None

    @property
    def num_tokens(self) -> int:
        return int(self.mask.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.offsets) - 1

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.dtype

    def slice(self, lo: int, hi: int) -> "PGBatch":
        """Tokens ``[lo, hi)``; both must be sequence boundaries (entries of ``offsets``)."""
        a, b = bisect.bisect_left(self.offsets, lo), bisect.bisect_left(self.offsets, hi)
        if a == len(self.offsets) or b == len(self.offsets) or self.offsets[a] != lo or self.offsets[b] != hi:
            raise ValueError(
                f"slice bounds must be sequence boundaries (offsets {list(self.offsets[:8])}"
                f"{'...' if len(self.offsets) > 8 else ''}), got ({lo}, {hi})"
            )
        if b < a:
            raise ValueError(f"slice needs lo <= hi, got ({lo}, {hi})")
        cut = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == self.num_tokens:
                cut[f.name] = v[lo:hi]
        cut["seq_local"] = self.seq_local[lo:hi] - a
        cut["offsets"] = tuple(o - lo for o in self.offsets[a:b + 1])
        if self.active_offsets is not None:
            cut["active_offsets"] = tuple(c - self.active_offsets[a] for c in self.active_offsets[a:b + 1])
        cut["extra"] = {k: (v[lo:hi] if v.dim() == 1 else v) for k, v in self.extra.items()}
        return dataclasses.replace(self, **cut)

    def updated(self, values: Dict[str, torch.Tensor]) -> "PGBatch":
        """Merge ``batch_coefficients`` output: known fields are replaced, other names go to ``extra``."""
        names = {f.name for f in dataclasses.fields(self)}
        known = {k: v for k, v in values.items() if k in names}
        extra = dict(self.extra, **{k: v for k, v in values.items() if k not in names})
        return dataclasses.replace(self, extra=extra, **known)


def prepare(
    advantages: torch.Tensor,
    mask: torch.Tensor,
    inputs: Optional[LossInputs] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    loss_type: Optional[str] = None,
    config: Optional[PGLossConfig] = None,
    **kwargs,
) -> PGBatch:
    """Build the ``PGBatch`` of one micro-batch from mask-shaped (``[B, T]`` or packed ``[N]``) inputs.

    Nothing here depends on the current policy. ``advantages`` is ``[B]`` (or ``[B, 1]``) per sequence or
    ``[B, T]`` per token (packed: ``[S]`` or ``[N]``). ``group_ids`` and ``truncated`` are per sequence;
    ``step_ids`` (EMPG turns) and ``token_weights`` (a precomputed multiplier of the policy term, e.g. GTPO's
    conflict weights) are per token. ``dtype`` is the working precision (default: fp32, or fp64 if an input is).
    The optional tensors come as one ``LossInputs`` or as keywords (``old_logp=...``); other keywords are options.
    At most one host read (validation flags, packed sequence starts), plus what a variant's ``prep`` needs.
    """
    reads = HostReads()
    pending = prepare_pending(advantages, mask, inputs, reads, dtype=dtype, loss_type=loss_type, config=config,
                              **kwargs)
    reads.read()
    return pending.finish()


def prepare_pending(advantages, mask, inputs: Optional[LossInputs], reads: HostReads, *,
                    dtype: Optional[torch.dtype] = None, loss_type: Optional[str] = None,
                    config: Optional[PGLossConfig] = None, count_active: bool = False, **kwargs) -> "PendingBatch":
    """``prepare`` in two halves around the caller's one host read: this half does the device work and queues what
    the host needs on ``reads``; the caller may queue its own values (e.g. checks on ``pending.active``), calls
    ``reads.read()``, then ``pending.finish()``. ``count_active`` also queues the active tokens per sequence, for
    ``PGBatch.active_offsets``."""
    given, options = LossInputs.split(kwargs)
    inputs = given if inputs is None else inputs
    cfg = resolve(make_config(config, loss_type, **options))
    f = flat_layout(cfg, advantages, mask, inputs, dtype, reads)
    m = f["mask"]
    # luspo_unmasked (TRL parity) lets padded cells contribute, so they stay active and unsanitised
    active = torch.ones_like(m, dtype=torch.bool) if cfg.luspo_unmasked else m > 0
    counts = None
    if count_active:
        slots = torch.zeros(f["seq_slots"], dtype=torch.long, device=m.device)
        counts = reads.add(slots.index_add_(0, f["seq"], active.long()))
    return PendingBatch(cfg, f, active, (advantages, mask, inputs), reads, counts)


class PendingBatch:
    """The device half of ``prepare``: ``active`` (bool ``[N]``) is final; ``finish()`` after the read."""

    def __init__(self, cfg, f, active, given, reads: HostReads, counts: Optional[int]):
        self.cfg, self.f, self.active, self.given, self.reads, self.counts = cfg, f, active, given, reads, counts

    def finish(self) -> PGBatch:
        cfg, active, reads = self.cfg, self.active, self.reads
        advantages, mask, inputs = self.given
        f = flat_inputs(cfg, self.f, advantages, mask, inputs, reads)
        m, seq, nseq = f["mask"], f["seq"], f["num_seqs"]
        zero = torch.zeros((), dtype=m.dtype, device=m.device)
        for name in ("old_logp", "ref_logp", "rollout_logp", "old_entropy"):
            if f.get(name) is not None:  # -inf / garbage on masked tokens must not reach exp or autograd
                f[name] = torch.where(active, f[name], zero)
        # a NaN advantage of a fully masked sequence must not reach the loss through 0 * NaN; finite ones stay, since
        # sequence-level quantities (VESPO's phi) read the advantage on every token of the sequence
        f["advantages"] = torch.where(active | torch.isfinite(f["advantages"]), f["advantages"], zero)
        f["extra"] = {} if f.get("truncated") is None else {"truncated": f["truncated"]}  # per token, 0/1
        f["is_weights"] = _rollout_weights(cfg, f, m, seq, nseq)
        token_shaped = (cfg.importance_sampling_level != "sequence" or cfg.beta != 0 or cfg.top_entropy_quantile < 1
                        or not f["adv_per_seq"] or (f["is_weights"] is not None and not f["is_seq_weights"]))
        w = aggregation.policy_weights(m, seq, nseq, cfg, width=f["width"], group=f.get("group"),
                                       token_shaped=token_shaped)
        counted = None
        if self.counts is not None:
            counted = tuple(itertools.accumulate(reads.get(self.counts)[:nseq], initial=0))
        batch = PGBatch(
            mask=m, active=active, seq_local=seq, offsets=f["offsets"], advantages=f["advantages"], weights=w,
            entropy_weights=aggregation.entropy_weights(m, m, w, cfg), adv_per_seq=f["adv_per_seq"],
            old_logp=f.get("old_logp"), ref_logp=f.get("ref_logp"), rollout_logp=f.get("rollout_logp"),
            is_weights=f["is_weights"], token_weights=f.get("token_weights"), old_entropy=f.get("old_entropy"),
            group=f.get("group"), step=f.get("step"), extra=f["extra"], shape=f["shape"], active_offsets=counted,
        )
        var = cfg.variant
        return batch if var.prep is None else batch.updated(var.prep(batch, cfg))


def _rollout_weights(cfg, f, m, seq, nseq) -> Optional[torch.Tensor]:
    """Rollout/trainer mismatch weights (docs/losses.md#rollout-importance-sampling), detached; or the caller's precomputed ones."""
    f["is_seq_weights"] = f.get("is_weights_per_seq", False)
    if cfg.rollout_is is None:
        w = f.get("is_weights")
    else:
        diff = (f["old_logp"] - f["rollout_logp"]) * m
        if cfg.rollout_is.startswith("sequence"):
            diff = torch.zeros(nseq, dtype=m.dtype, device=m.device).index_add(0, seq, diff)[seq]
            f["is_seq_weights"] = True
        bound = cfg.log_ratio_clamp
        w = torch.exp(diff if bound is None else diff.clamp(-bound, bound))
        lo, hi = cfg.rollout_is_min, cfg.rollout_is_max
        if cfg.rollout_is.endswith("truncate"):
            w = w.clamp(min=lo, max=hi) if (lo is not None or hi is not None) else w
        else:
            bad = torch.zeros_like(w, dtype=torch.bool)
            if lo is not None:
                bad |= w < lo
            if hi is not None:
                bad |= w > hi
            w = w.masked_fill(bad, 0.0)
    return None if w is None else w.detach()


__all__ = ["PGBatch", "PendingBatch", "prepare", "prepare_pending"]
