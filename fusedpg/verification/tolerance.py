"""The tolerance model (docs/design.md#tolerance-model), shared by the tests and ``fusedpg verify``.

An output of ours at input dtype D passes when, elementwise,
``|ours - truth| <= 2 * |torch_D - truth| + slack_D * scale``, where truth is the float64 reference, torch_D the
eager reference run at dtype D, and scale the largest magnitude of truth (at least 1). The slack covers elements
where the eager result happens to be exact; it is a small multiple of the dtype's epsilon, fixed here once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

#: slack_D per input dtype, in units of max(1, |truth|_max).
SLACK = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


@dataclass(frozen=True)
class Comparison:
    name: str
    dtype: torch.dtype
    max_abs_err: float
    eager_max_abs_err: float
    rel_rms_err: float
    worst_index: tuple
    ok: bool

    @property
    def ratio(self) -> float:
        """Our max error over the eager reference's max error (inf if eager is exact and we are not)."""
        if self.eager_max_abs_err == 0:
            return 0.0 if self.max_abs_err == 0 else float("inf")
        return self.max_abs_err / self.eager_max_abs_err

    def report(self) -> str:
        return (
            f"{self.name} [{str(self.dtype).replace('torch.', '')}]: max abs err {self.max_abs_err:.3e} "
            f"(eager {self.eager_max_abs_err:.3e}, ratio {self.ratio:.2f}), rel RMS {self.rel_rms_err:.3e}, "
            f"worst index {self.worst_index}, {'PASS' if self.ok else 'FAIL'}"
        )


def compare(name: str, ours: torch.Tensor, eager: Optional[torch.Tensor], truth: torch.Tensor,
            dtype: torch.dtype) -> Comparison:
    """Check ``ours`` against ``truth`` with the eager same-dtype result as the yardstick (None: no eager)."""
    if ours.shape != truth.shape:
        raise AssertionError(f"{name}: shape {tuple(ours.shape)} != reference shape {tuple(truth.shape)}")
    truth = truth.detach().double().cpu()
    ours = ours.detach().double().cpu()
    both_inf = torch.isinf(truth) & (ours == truth)  # -inf log-probs of -inf columns are exact answers
    err = torch.where(both_inf, torch.zeros_like(ours), (ours - truth).abs())
    err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    if eager is None:
        eager_err = torch.zeros_like(err)
    else:
        eager = eager.detach().double().cpu()
        eager_err = torch.where(torch.isinf(truth) & (eager == truth), torch.zeros_like(eager), (eager - truth).abs())
        eager_err = torch.nan_to_num(eager_err, nan=0.0, posinf=0.0)
    finite = truth[torch.isfinite(truth)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    bound = 2 * eager_err + SLACK[dtype] * scale
    excess = err - bound
    ok = bool((excess <= 0).all()) if err.numel() else True
    if err.numel():
        flat = int(torch.argmax(excess).item())
        worst = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape)) if err.dim() else ()
        max_err = err.max().item()
        rms_truth = finite.pow(2).mean().sqrt().item() if finite.numel() else 0.0
        fin = torch.isfinite(err)
        rms = err[fin].pow(2).mean().sqrt().item() if fin.any() else float("inf")
        rel_rms = rms / rms_truth if rms_truth > 0 else rms
    else:
        worst, max_err, rel_rms = (), 0.0, 0.0
    eager_max = eager_err.max().item() if eager_err.numel() else 0.0
    return Comparison(name, dtype, max_err, eager_max, rel_rms, worst, ok)


def assert_close_to_truth(name: str, ours: torch.Tensor, eager: Optional[torch.Tensor], truth: torch.Tensor,
                          dtype: torch.dtype) -> Comparison:
    result = compare(name, ours, eager, truth, dtype)
    if not result.ok:
        raise AssertionError(result.report())
    return result
