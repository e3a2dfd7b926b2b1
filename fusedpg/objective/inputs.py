"""``LossInputs``: the optional tensors of the loss, bundled once at the public boundary.

``pg_loss`` and ``fused_linear_pg_loss`` take them as keywords; everything below them (``prepare``, the custom op,
the chunk driver) passes this one object, and the custom op carries it as one ``Tensor?[]`` argument.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch


@dataclass(frozen=True)
class LossInputs:
    """Each ``None`` unless the variant or an option uses it; shapes as in ``fusedpg.objective.prepare``.

    old_logp, ref_logp, rollout_logp: old-policy, reference and inference-engine log-probs (mask's shape).
    is_weights: precomputed rollout IS weights, per sequence or per token. old_entropy: entropy of the old policy.
    seq_ids: packed input's sequence ids ``[N]``. group_ids, truncated: per sequence. step_ids, token_weights: per
    token (EMPG turns; a multiplier of the policy term such as GTPO's conflict weights).
    """

    old_logp: Optional[torch.Tensor] = None
    ref_logp: Optional[torch.Tensor] = None
    rollout_logp: Optional[torch.Tensor] = None
    is_weights: Optional[torch.Tensor] = None
    old_entropy: Optional[torch.Tensor] = None
    seq_ids: Optional[torch.Tensor] = None
    group_ids: Optional[torch.Tensor] = None
    step_ids: Optional[torch.Tensor] = None
    token_weights: Optional[torch.Tensor] = None
    truncated: Optional[torch.Tensor] = None

    @staticmethod
    def names() -> Tuple[str, ...]:
        return _NAMES

    @staticmethod
    def split(kwargs: Dict[str, object]) -> Tuple["LossInputs", Dict[str, object]]:
        """Separate the bundle's tensors from the other keywords (the config options)."""
        names = set(LossInputs.names())
        return (LossInputs(**{k: v for k, v in kwargs.items() if k in names}),
                {k: v for k, v in kwargs.items() if k not in names})

    def as_list(self) -> List[Optional[torch.Tensor]]:
        return [getattr(self, n) for n in self.names()]

    @staticmethod
    def from_list(values: List[Optional[torch.Tensor]]) -> "LossInputs":
        return LossInputs(*values)

    def floats(self) -> Dict[str, torch.Tensor]:
        """The floating tensors given, by name (what ``check_finite`` reads)."""
        return {n: t for n in self.names() if (t := getattr(self, n)) is not None and t.is_floating_point()}

    def present(self) -> Tuple[str, ...]:
        return tuple(n for n in self.names() if getattr(self, n) is not None)


_NAMES = tuple(f.name for f in dataclasses.fields(LossInputs))  # computed once: traced code reads a constant
