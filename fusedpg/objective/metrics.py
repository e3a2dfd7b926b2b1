"""Mergeable metric sums (docs/losses.md#metrics) and their finalisation into means.

``token_loss`` returns a dict of 0-dim detached tensors. Keys ending in ``_min``/``_max`` merge by min/max,
everything else adds, so chunks (and, by the trainer, ranks) combine with ``merge_metrics``. ``finalize_metrics``
divides each ``X_sum`` by ``X_count`` (else ``COUNT_OF[X]``, else ``tokens``; a count of 0 gives 0) and maps the
identity element of an empty min/max to 0, so nothing is NaN.

Names: ``clip_low``/``clip_high``/``clip_region`` (TRL semantics: a clip counts only where it binds in the
direction of A; sequences are counted when the ratio and the advantages are per sequence), ``clip_low_min_seq``
/``clip_high_max_seq`` (min/max over sequences of the per-sequence means), ``dual_clip`` (verl
``pg_clipfrac_lower``), ``ppo_kl`` (mean ``old - logp``), ``kl`` (mean KL term, bias-corrected if enabled),
``entropy``, ``ratio_mean``/``ratio_min``/``ratio_max``, ``is_weight_*``, with ``rollout_logp`` the sampler/trainer
mismatch ``rollout_abs_diff`` (mean ``|logp - rollout_logp|``), ``rollout_abs_diff_max`` and ``rollout_kl`` (mean k3
of KL(sampler || trainer)), ``tokens``, ``seqs``, and the loss split
``loss_policy``/``loss_kl``/``loss_entropy`` (sums of each term's share of the loss).
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

COUNT_OF = {"clip_low": "clip_count", "clip_high": "clip_count", "clip_region": "clip_count"}
_MEAN_NAME = {"ratio": "ratio_mean", "is_weight": "is_weight_mean"}
_ALIASES = {"clip_low_min_seq": "clip_low_seq_min", "clip_high_max_seq": "clip_high_seq_max"}
_ADDITIVE_RESULTS = ("tokens", "seqs", "loss_policy", "loss_kl", "loss_entropy")


def merge_metrics(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = dict(a)
    for k, v in b.items():
        if k not in out:
            out[k] = v
        elif k.endswith("_min"):
            out[k] = torch.minimum(out[k], v)
        elif k.endswith("_max"):
            out[k] = torch.maximum(out[k], v)
        else:
            out[k] = out[k] + v
    return out


def finalize_metrics(sums: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Means from sums; the raw sums are kept alongside (for cross-rank reduction by the trainer)."""
    out = {}
    for k, v in sums.items():
        if k.endswith("_sum"):
            base = k[:-4]
            count = sums.get(base + "_count", sums.get(COUNT_OF.get(base, "tokens")))
            out[_MEAN_NAME.get(base, base)] = v / count.clamp(min=1.0) if count is not None else v
        elif k.endswith("_min") or k.endswith("_max"):
            out[k] = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
        elif k in _ADDITIVE_RESULTS:
            out[k] = v
    for alias, key in _ALIASES.items():
        if key in out:
            out[alias] = out[key]
    out.update({k: v for k, v in sums.items() if k not in out})
    return out


def metric_vector(sums: Dict[str, torch.Tensor], keys, dtype, device) -> torch.Tensor:
    """``sums`` as one vector in the order of ``keys``; a key without a value (an empty batch) holds the identity
    of its merge (0, or +inf / -inf for ``_min`` / ``_max``, which ``finalize_metrics`` reports as 0)."""
    identity = {"_min": math.inf, "_max": -math.inf}
    return torch.stack([sums[k].to(dtype) if k in sums else torch.full((), identity.get(k[-4:], 0.0), dtype=dtype,
                                                                         device=device) for k in keys]) \
        if keys else torch.zeros(0, dtype=dtype, device=device)


class MetricSums:
    """Builder used by ``token_loss``: ``add(name, tensor)`` sums, ``low(name, x)``/``high`` keep min/max."""

    def __init__(self, dtype, device):
        self.d: Dict[str, torch.Tensor] = {}
        self.dtype, self.device = dtype, device

    def add(self, name: str, value) -> None:
        if not isinstance(value, torch.Tensor):  # a host number: filled on the device (a copy there syncs on CUDA)
            value = torch.full((), value, dtype=self.dtype, device=self.device)
        value = value.detach().to(device=self.device, dtype=self.dtype).sum()
        self.d[name] = self.d[name] + value if name in self.d else value

    def min(self, name: str, values: torch.Tensor, where: Optional[torch.Tensor] = None) -> None:
        """Min of ``values`` (over ``where``, without boolean indexing: no host synchronisation)."""
        self.d[name] = self._extreme(values, where, math.inf, torch.amin)

    def max(self, name: str, values: torch.Tensor, where: Optional[torch.Tensor] = None) -> None:
        self.d[name] = self._extreme(values, where, -math.inf, torch.amax)

    def _extreme(self, values, where, identity, reduce):
        v = values.detach().to(device=self.device, dtype=self.dtype)
        if where is not None:
            v = torch.where(where, v, torch.full_like(v, identity))
        if v.numel() == 0:
            return torch.full((), identity, dtype=self.dtype, device=self.device)
        return reduce(v)
