"""Trainer-side state of the regularisers: the adaptive entropy coefficient (Skywork-OR1,
docs/losses.md#adaptive-entropy-coefficient)."""
from __future__ import annotations

from typing import Dict


class AdaptiveEntropyCoef:
    """``alpha <- min(alpha + step, max)`` if the window entropy <= target, else ``max(alpha - step, min)``.

    Feed ``observe(sum_H, count)`` every micro-step (``metrics["entropy_sum"]``, ``metrics["tokens"]``, reduced
    over ranks by the trainer), call ``step()`` at each optimizer step; ``coef`` is the alpha to apply, which is
    0 while the previous window's entropy exceeded the target (TRL's gating).
    """

    def __init__(self, init: float = 0.0, target: float = 0.2, step: float = 0.005, min_coef: float = 0.0,
                 max_coef: float = 1.0):
        self.alpha, self.target, self.delta, self.min, self.max = float(init), target, step, min_coef, max_coef
        self.last_entropy = float("inf")  # TRL: no bonus before the first measured window
        self._sum = self._count = 0.0

    @property
    def coef(self) -> float:
        return self.alpha if self.last_entropy <= self.target else 0.0

    def observe(self, entropy_sum, count) -> None:
        self._sum += float(entropy_sum)
        self._count += float(count)

    def step(self) -> float:
        h = self._sum / max(self._count, 1.0)
        if h <= self.target:
            self.alpha = min(self.alpha + self.delta, self.max)
        else:
            self.alpha = max(self.alpha - self.delta, self.min)
        self.last_entropy, self._sum, self._count = h, 0.0, 0.0
        return self.alpha

    def state_dict(self) -> Dict[str, float]:
        return {"alpha": self.alpha, "last_entropy": self.last_entropy, "sum": self._sum, "count": self._count}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.alpha, self.last_entropy = float(state["alpha"]), float(state["last_entropy"])
        self._sum, self._count = float(state["sum"]), float(state["count"])
