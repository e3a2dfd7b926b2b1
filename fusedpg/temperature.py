"""``Temperature``: the one form a temperature takes past the public boundary.

The public ops accept a float or a tensor of the leading shape. ``checks.temperature`` validates that once and
everything below works with this class, so no launcher, plan or loss driver branches on the two forms.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


@dataclass(frozen=True)
class Temperature:
    """One value for every row (``rows is None``) or a detached ``[N]`` tensor of per-row values."""

    value: float = 1.0
    rows: Optional[torch.Tensor] = None

    @staticmethod
    def of(temp_rows: Optional[torch.Tensor], temp_value: float) -> "Temperature":
        """From the two custom-op arguments (a tensor wins when given)."""
        return Temperature(float(temp_value), None if temp_rows is None else temp_rows.detach())

    def op_args(self) -> Tuple[Optional[torch.Tensor], float]:
        return self.rows, self.value

    def take(self, idx: Optional[torch.Tensor]) -> "Temperature":
        """Rows ``idx`` of a per-row temperature (``None``: all rows)."""
        if self.rows is None or idx is None:
            return self
        return Temperature(self.value, self.rows.index_select(0, idx))

    def slice(self, lo: int, hi: int) -> "Temperature":
        return self if self.rows is None else Temperature(self.value, self.rows[lo:hi])

    def padded(self, n: int) -> "Temperature":
        """Per-row values extended with 1.0 to ``n`` rows (padding rows of the deterministic mode)."""
        if self.rows is None or self.rows.shape[0] >= n:
            return self
        return Temperature(self.value, torch.cat([self.rows, self.rows.new_ones(n - self.rows.shape[0])]))

    def divide_(self, z: torch.Tensor) -> torch.Tensor:
        """``z / T`` in place on a ``[rows, V]`` chunk (a correctly rounded division, skipped at T = 1)."""
        if self.rows is not None:
            return z.div_(self.rows.to(z.dtype).unsqueeze(1))
        return z if self.value == 1.0 else z.div_(self.value)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """``x / T`` for per-row coefficients ``[rows]`` (or ``[rows, K]``)."""
        if self.rows is not None:
            inv = 1.0 / self.rows.to(x.dtype)
            return x * (inv if x.dim() == 1 else inv.reshape(-1, *([1] * (x.dim() - 1))))
        return x if self.value == 1.0 else x / self.value

    def kernel_arg(self, device: torch.device) -> Tuple[torch.Tensor, int]:
        """(fp32 pointer, row stride) for a Triton kernel: a single value is read with stride 0."""
        if self.rows is not None:
            t = self.rows.float().contiguous()
            return t, 1
        return torch.full((1,), self.value, dtype=torch.float32, device=device), 0
