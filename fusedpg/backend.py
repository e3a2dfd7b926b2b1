"""Which implementation runs an op: Triton kernels, the chunked torch plan, or the float64 reference.

The choice is explicit: ``impl=`` on every public op, else the ``FUSEDPG_IMPL`` environment variable, else
``"triton"`` for CUDA tensors and ``"torch"`` for everything else. Nothing is probed at import time.
"""
from __future__ import annotations

import logging
import os

import torch

from .compile_support import constant_result

IMPLS = ("triton", "torch", "reference")
_log = logging.getLogger("fusedpg")
_announced: set = set()


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str | None, device: torch.device) -> str:
    """Return the implementation name for tensors on ``device``; raise ``ValueError`` for unusable choices."""
    return _resolve(impl, device.type)


# A constant of the traced graph under torch.compile (its environment read and log line stay out of the graph).
@constant_result
def _resolve(impl: str | None, device_type: str) -> str:
    source = "impl="
    if impl is None or impl == "auto":
        env = os.environ.get("FUSEDPG_IMPL", "").strip().lower()
        if env and env != "auto":
            impl, source = env, "FUSEDPG_IMPL"
        else:
            impl, source = ("triton" if device_type == "cuda" else "torch"), "default"
    if impl not in IMPLS:
        raise ValueError(f"{source} must be one of {IMPLS} or 'auto', got {impl!r}")
    if impl == "triton" and device_type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"{source}='triton' needs CUDA tensors or TRITON_INTERPRET=1 (the CPU interpreter), "
            f"got tensors on {device_type}"
        )
    key = (impl, device_type, source)
    if key not in _announced:
        _announced.add(key)
        _log.info("fusedpg: using impl %r on %s (%s)", impl, device_type, source)
    return impl
