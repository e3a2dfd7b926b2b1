"""Per-token coefficients ``c = dL/dlogp`` and ``d = dL/dH`` of the loss layer, by autograd on ``[n]`` scalars.

The fused loss runs inside a ``torch.library`` custom op, and a custom op's implementation runs below the autograd
dispatch keys (and, on a compiled graph's first call, under AOTAutograd's checking dispatch mode), where
``torch.autograd.grad`` cannot see a graph. The loss layer is written once, as differentiable torch code on
``[n]`` scalars, so its derivatives are taken on one worker thread, whose dispatch state is a fresh thread's:
autograd on, no modes. The chunk's heavy ``[rows, V]`` work stays on the caller's thread; only the small loss math
crosses, one call per chunk, on the caller's CUDA stream.
"""
from __future__ import annotations

import concurrent.futures
import threading
from typing import Callable, Dict, Optional, Tuple

import torch

_lock = threading.Lock()
_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusedpg-autograd")
        return _pool


def _run(fn, lp, en, want_grads, stream):
    ctx = torch.cuda.stream(stream) if stream is not None else _nullcontext()
    with ctx, torch.enable_grad():
        lp = lp.detach().requires_grad_(want_grads)
        en = None if en is None else en.detach().requires_grad_(want_grads)
        total, sums = fn(lp, en)
        sums = {k: v.detach() for k, v in sums.items()}
        if not (want_grads and total.requires_grad):
            return total.detach(), sums, None, None
        wrt = [lp] if en is None else [lp, en]
        grads = torch.autograd.grad(total, wrt, allow_unused=True)
        c = torch.zeros_like(lp) if grads[0] is None else grads[0]
        d = None if en is None or grads[1] is None else grads[1]
        return total.detach(), sums, c, d


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def loss_and_coefficients(
    fn: Callable[[torch.Tensor, Optional[torch.Tensor]], Tuple[torch.Tensor, Dict[str, torch.Tensor]]],
    logp: torch.Tensor, entropy: Optional[torch.Tensor], want_grads: bool,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``fn(logp, entropy) -> (total, metric sums)``; returns the detached total and sums, and ``(c, d)`` (``None``
    when not wanted; ``d`` is ``None`` when the loss does not depend on the entropy)."""
    stream = torch.cuda.current_stream(logp.device) if logp.is_cuda else None
    return _executor().submit(_run, fn, logp, entropy, want_grads, stream).result()
