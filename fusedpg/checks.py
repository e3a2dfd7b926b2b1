"""Input validation shared by the public ops. Every error names the argument, the expectation and the value."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .temperature import Temperature

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(t: torch.Tensor) -> str:
    return f"tensor of shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def floating(name: str, value) -> torch.Tensor:
    tensor(name, value)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (bf16, fp16, fp32 or fp64), got {_describe(value)}")
    return value


def integer(name: str, value) -> torch.Tensor:
    tensor(name, value)
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64 or int32), got {_describe(value)}")
    return value


def same_device(name: str, value: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if value.device != other.device:
        raise ValueError(f"{name} must be on the same device as {other_name} ({other.device}), got {value.device}")


def same_dtype(name: str, value: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if value.dtype != other.dtype:
        raise TypeError(f"{name} must have the dtype of {other_name} ({other.dtype}), got {value.dtype}")


def temperature(value, lead_shape: torch.Size, device: torch.device) -> Temperature:
    """A positive finite float, or a floating tensor of ``lead_shape`` (or one element). Returns the one form used
    past the boundary: a ``Temperature`` holding the float or a detached fp32 ``[N]`` tensor. Only metadata is
    checked here; the values of a tensor are checked inside the op (``temperature_values``), where a host read
    does not break a compiled graph."""
    if isinstance(value, torch.Tensor):
        floating("temperature", value)
        if value.device != torch.device(device):
            raise ValueError(f"temperature must be on the same device as hidden ({device}), got {value.device}")
        n = math.prod(lead_shape)
        if value.numel() == 1:
            flat = value.detach().float().reshape(1).expand(n)
        elif tuple(value.shape) == tuple(lead_shape) or (value.dim() == 1 and value.numel() == n):
            flat = value.detach().float().reshape(n)
        else:
            raise ValueError(
                f"temperature must be a float or a tensor of the leading shape {tuple(lead_shape)}, "
                f"got {_describe(value)}"
            )
        return Temperature(1.0, flat)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"temperature must be a float or a tensor, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"temperature must be positive and finite, got {value}")
    return Temperature(value)


def _raise_now_or_queue(bad: torch.Tensor, fail, reads) -> None:
    """``fail()`` (which raises) if ``bad`` has a True entry: read now (on CUDA a host synchronisation), or queued
    on ``reads`` (a ``fusedpg.host.HostReads``) to raise after the caller's one read."""
    if reads is not None:
        reads.check(bad, fail)
    elif bool(bad.any()):
        fail()


def temperature_values(temp: Temperature, reads=None) -> None:
    """Per-row temperatures must be positive and finite (one reduction; read now, or queued on ``reads``)."""
    flat = temp.rows
    if flat is None or not flat.numel():
        return
    bad = ~((flat > 0) & torch.isfinite(flat))

    def fail():
        raise ValueError(f"temperature must be positive and finite, got a tensor containing {flat[bad][0].item()}")

    _raise_now_or_queue(bad, fail, reads)


def targets_in_range(targets: torch.Tensor, vocab: int, ignore_index: Optional[int], reads=None,
                     where: Optional[torch.Tensor] = None) -> None:
    """One reduction over the targets (those equal to ``ignore_index`` pass; with ``where``, a bool mask of the
    targets' shape, only those it marks are checked); read now, or queued on ``reads``."""
    if targets.numel() == 0:
        return
    bad = (targets < 0) | (targets >= vocab)
    if ignore_index is not None:
        bad &= targets != ignore_index
    if where is not None:
        bad &= where

    def fail():
        first = targets[bad][0].item()
        if where is not None:
            raise ValueError(f"targets must lie in [0, {vocab}) on every token of the loss mask, got {first}")
        raise ValueError(
            f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}, got {first} "
            f"(pass check_targets=False or set FUSEDPG_CHECK_TARGETS=0 to skip this check)"
        )

    _raise_now_or_queue(bad, fail, reads)


def optional_bias(bias: Optional[torch.Tensor], weight: torch.Tensor) -> None:
    if bias is None:
        return
    floating("bias", bias)
    if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight's vocabulary, got {_describe(bias)}")
    same_device("bias", bias, "weight", weight)
    same_dtype("bias", bias, "weight", weight)


def _targets_shape(targets, lead, what: str, multi: bool) -> None:
    """targets of the leading shape ``lead``; with ``multi`` also ``lead + (K,)``: K targets per position."""
    if tuple(targets.shape) == tuple(lead):
        return
    if multi and targets.dim() == len(lead) + 1 and tuple(targets.shape[:-1]) == tuple(lead) and targets.shape[-1]:
        return
    also = f" or {tuple(lead) + ('K',)} (K targets per position)" if multi else ""
    raise ValueError(f"targets must have {what}'s leading shape {tuple(lead)}{also}, got {_describe(targets)}")


def linear_inputs(hidden, weight, targets, bias, multi: bool = False) -> None:
    floating("hidden", hidden)
    floating("weight", weight)
    integer("targets", targets)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, H] or [B, T, H], got {_describe(hidden)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got {_describe(weight)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have a non-empty vocabulary (V >= 1), got {_describe(weight)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, got {_describe(weight)}"
        )
    same_device("weight", weight, "hidden", hidden)
    same_dtype("weight", weight, "hidden", hidden)
    same_device("targets", targets, "hidden", hidden)
    _targets_shape(targets, hidden.shape[:-1], "hidden", multi)
    optional_bias(bias, weight)


def logits_inputs(logits, targets, multi: bool = False) -> None:
    floating("logits", logits)
    integer("targets", targets)
    if logits.dim() < 2:
        raise ValueError(f"logits must be [N, V] or [B, T, V], got {_describe(logits)}")
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary (V >= 1), got {_describe(logits)}")
    same_device("targets", targets, "logits", logits)
    _targets_shape(targets, logits.shape[:-1], "logits", multi)


def chunk_bytes(value) -> int:
    """``None`` (the plan's default, passed to the ops as 0) or a positive int of bytes."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"chunk_bytes must be a positive int or None, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"chunk_bytes must be a positive number of bytes, got {value}")
    return value


def finite_enabled(flag: Optional[bool]) -> bool:
    """``check_finite``: the keyword if given, else ``FUSEDPG_CHECK_FINITE`` (default off: no work, no sync)."""
    if flag is not None:
        return bool(flag)
    from .options import _env_flag

    return _env_flag("FUSEDPG_CHECK_FINITE", False)


def finite(name: str, value: Optional[torch.Tensor], used: Optional[torch.Tensor] = None) -> None:
    """Raise ``ValueError`` naming ``name`` and its first NaN/inf entry; ``used`` (bool, ``value``'s leading shape)
    exempts the entries the loss never reads, such as masked tokens. One reduction and one host sync."""
    if value is None or not value.is_floating_point():
        return
    bad = ~torch.isfinite(value)
    if used is not None:
        bad &= used.reshape(tuple(used.shape) + (1,) * (value.dim() - used.dim())).to(bad.device)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} must be finite (check_finite), got {value[index].item()} at index {index}")


def truncation(top_k, top_p, min_p, lead, device):
    """``Truncation`` of per-row ``[N]`` tensors from numbers or tensors of the leading shape (None: off)."""
    from .truncation import Truncation

    def per_row(name, value, is_int, ok, want):
        if value is None:
            return None
        dtype = torch.int64 if is_int else torch.float32
        if isinstance(value, torch.Tensor):
            (integer if is_int else floating)(name, value)
            if tuple(value.shape) != tuple(lead):
                raise ValueError(f"{name} must be a number or a tensor of shape {tuple(lead)}, got {_describe(value)}")
            bad = ~ok(value)
            if value.numel() and bool(bad.any()):
                raise ValueError(f"{name} must be {want}, got a tensor containing {value[bad][0].item()}")
            return value.reshape(-1).to(device=device, dtype=dtype)
        if isinstance(value, bool) or not isinstance(value, int if is_int else (int, float)):
            raise TypeError(f"{name} must be {'an int' if is_int else 'a float'} or a tensor, got "
                            f"{type(value).__name__}")
        if not bool(ok(torch.tensor(value))):
            raise ValueError(f"{name} must be {want}, got {value}")
        return torch.full((math.prod(lead),), value, dtype=dtype, device=device)

    return Truncation(per_row("top_k", top_k, True, lambda v: v >= 0, ">= 0 (0: off)"),
                      per_row("top_p", top_p, False, lambda v: (v > 0) & (v <= 1), "in (0, 1] (1: off)"),
                      per_row("min_p", min_p, False, lambda v: (v >= 0) & (v <= 1), "in [0, 1] (0: off)"))


def memory_mode(memory) -> bool:
    """``memory=``: ``"default"`` or ``"low"`` (True)."""
    if memory not in ("default", "low"):
        raise ValueError(f"memory must be 'default' or 'low', got {memory!r}")
    return memory == "low"
