"""Device-to-host reads, queued and done as one copy (``HostReads``), through one function (``host_read``).

On CUDA every value the host reads from the device (``.item()``, ``.tolist()``, ``bool(t)``, ``nonzero``) waits for
all queued work: a synchronisation. The fused loss needs a few small values per call (validation flags, the
sequence layout, the active-token counts); it queues them on one ``HostReads`` and reads them together, so a call
synchronises once (fusedpg/linear_pg/README.md#host-synchronisation). Tests count the calls of ``host_read``.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch


def host_read(t: torch.Tensor) -> List[int]:
    """The copy itself: a flat int64 tensor as a list of Python ints (on CUDA, one synchronisation)."""
    return t.tolist()


class HostReads:
    """Small integer / bool tensors the host needs, queued by ``add`` and ``check``, copied by one ``read``."""

    def __init__(self):
        self._parts: List[torch.Tensor] = []
        self._checks: List[tuple] = []
        self._values: Optional[List[List[int]]] = None

    def add(self, t: torch.Tensor) -> int:
        """Queue ``t`` (any shape; read flattened as ints); returns the slot that ``get`` takes after ``read``."""
        if self._values is not None:
            raise RuntimeError("HostReads.add after read: queue every value before the one read")
        self._parts.append(t.reshape(-1))
        return len(self._parts) - 1

    def check(self, bad: torch.Tensor, fail: Callable[[], None]) -> None:
        """Queue a validation: after the read, ``fail()`` (which raises) runs if ``bad`` (bool) has a True entry.
        ``fail`` may read the device again to name the bad value: an error path, not a call's normal work."""
        self._checks.append((self.add(bad.any()), fail))

    def read(self) -> None:
        """The one copy of everything queued (none when nothing is), then the checks in the order they were queued."""
        if self._values is not None:
            raise RuntimeError("HostReads.read twice: one read per call")
        flat = host_read(torch.cat([p.to(torch.int64) for p in self._parts])) if self._parts else []
        self._values, at = [], 0
        for p in self._parts:
            self._values.append(flat[at:at + p.numel()])
            at += p.numel()
        for slot, fail in self._checks:
            if self._values[slot][0]:
                fail()

    def get(self, slot: int) -> List[int]:
        """The values queued at ``slot``, as Python ints, after ``read``."""
        if self._values is None:
            raise RuntimeError("HostReads.get before read")
        return self._values[slot]
