"""Frozen option bundles: non-tensor settings travel as one hashable object through autograd."""
from __future__ import annotations

import os
from dataclasses import dataclass

#: Default row-chunk budget of the torch (CPU) plan: one fp32 [rows, V] buffer of at most this many bytes.
DEFAULT_CHUNK_BYTES = 64 << 20
#: Default budget of the Triton plan's backward gradient chunk (input dtype, [rows, V]).
DEFAULT_DEVICE_CHUNK_BYTES = 1 << 30
#: Deterministic mode: rows per matmul / reduction call (the BLAS and the reductions always see this many rows,
#: padded, so a row's result cannot depend on N), and the fixed vocabulary segment of the Triton forward's splits.
DETERMINISTIC_ROWS = {"cpu": 16, "cuda": 128}
DETERMINISTIC_SEGMENT = {"cpu": 128, "cuda": 8192}


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class LogProbOptions:
    """Options of the log-prob + entropy primitives.

    ignore_index:    target value marking rows that produce ``logp = entropy = 0`` and no gradient.
    compute_entropy: when False the entropy output is all zeros and carries no gradient.
    check_targets:   verify ``0 <= target < V`` for non-ignored rows. The check is one reduction over
                     ``targets`` and, on CUDA, one host synchronisation (shared with the row compaction
                     that skips ignored rows). Switch it off per call or with ``FUSEDPG_CHECK_TARGETS=0``.
    chunk_bytes:     torch plan only: rows per chunk are chosen so that one fp32 ``[rows, V]`` buffer fits.
    inplace:         logits path only: write the logits gradient into the logits buffer.
    device_chunk_bytes: Triton plan only: the backward's reused ``[rows, V]`` gradient buffer fits this.
    deterministic:   batch-invariant, run-to-run reproducible results (fusedpg/linear/README.md#deterministic-mode):
                     fixed-size padded row blocks for every matmul and reduction, fixed vocabulary segments.
    low_memory:      ``memory="low"``: the backward is blocked over the vocabulary (``plan_low.backward_vocab_blocked``).
    """

    ignore_index: int = -100
    compute_entropy: bool = True
    check_targets: bool = True
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    inplace: bool = False
    device_chunk_bytes: int = DEFAULT_DEVICE_CHUNK_BYTES
    deterministic: bool = False
    low_memory: bool = False

    @staticmethod
    def budgeted(chunk_bytes: int, **fields) -> "LogProbOptions":
        """Options whose row-chunk budget is ``chunk_bytes`` on both plans (the ops' convention: 0 keeps the
        defaults)."""
        if chunk_bytes > 0:
            fields.update(chunk_bytes=chunk_bytes, device_chunk_bytes=chunk_bytes)
        return LogProbOptions(**fields)

    @staticmethod
    def default_check_targets() -> bool:
        return _env_flag("FUSEDPG_CHECK_TARGETS", True)

    @staticmethod
    def default_deterministic(flag=None) -> bool:
        """``deterministic=``: the keyword if given, else ``FUSEDPG_DETERMINISTIC`` (default off)."""
        return bool(flag) if flag is not None else _env_flag("FUSEDPG_DETERMINISTIC", False)
