"""``memory_budget=``: the plan and chunk sizes of the LM-head ops chosen from a byte budget.

The model counts what a call allocates besides its inputs, gradients included (the weight gradient is the floor:
it must exist, in the weight's dtype). For hidden ``[N, H]``, a head ``[V, H]`` of itemsize ``s`` and a chunk of
``r`` rows:

* ``default`` (rows in chunks, one ``[V, H]`` fp32 accumulator for d_weight):
  ``V·H·s`` (d_weight) ``+ 4·V·H`` (its fp32 accumulator, unless the weight is fp32) ``+ N·H·s`` (d_hidden)
  ``+ 2·r·V·4`` (a chunk's logits and their exponentials);
* ``low`` (blocked over the vocabulary, ``fusedpg/linear/plan_low.py``): ``V·H·s + N·H·s`` (the gradients)
  ``+`` a logits tile (within ``LOW_BUFFER_BYTES`` on CPU, an ``[N, block]`` tile of ``LOW_BLOCK_BYTES`` elsewhere),
  and for a half-precision head the fp32 d_hidden accumulator (``N·H·4``, whose storage the returned d_hidden is
  rounded into, so it replaces the ``N·H·s``) plus fp32 head-block, hidden-tile and d_weight-block buffers.

The choice is the fastest plan that fits: ``default`` with the largest chunk the budget leaves (at most the
default chunk), else ``low``; a budget below the low plan's floor raises ``ValueError``. FLOPs: the fused loss's
one-pass plans run 6·N·H·V, everything that recomputes the logits in its backward (the primitive, two-phase
losses, the low plan) 8·N·H·V. ``python -m fusedpg.memory_plan`` prints the table of fusedpg/linear/README.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .linear.plan_low import low_tiles
from .options import DEFAULT_CHUNK_BYTES, DEFAULT_DEVICE_CHUNK_BYTES, LogProbOptions

#: Fewest rows a default-plan chunk may have before the low plan is preferred (a thinner chunk runs its GEMMs
#: far below the machine's speed).
MIN_CHUNK_ROWS = 16


@dataclass(frozen=True)
class MemoryChoice:
    """plan: ``"default"`` or ``"low"``; chunk_bytes: the ``chunk_bytes=`` the op runs with; extra_bytes: the
    model's estimate of the call's extra peak memory; flops: of the head's GEMMs."""

    plan: str
    chunk_bytes: int
    extra_bytes: int
    flops: int


def _floor(n: int, h: int, v: int, s: int) -> int:
    """The gradients themselves: d_weight and d_hidden in the inputs' dtype."""
    return v * h * s + n * h * s


def default_extra(n: int, h: int, v: int, s: int, rows: int) -> int:
    return _floor(n, h, v, s) + (4 * v * h if s != 4 else 0) + 2 * min(rows, n) * v * 4


def low_extra(n: int, h: int, v: int, s: int, device_type: str = "cpu") -> int:
    """The low plan's buffers as ``plan_low`` sizes them: the logits tile, and for a half-precision head its fp32
    head block, hidden tile, d_weight block sum and d_hidden accumulator."""
    cols, rows = low_tiles(n, h, torch.device(device_type), LogProbOptions(), 4)
    cols, rows = min(cols, v), min(rows, n)
    # half precision: d_hidden is rounded in place into its fp32 accumulator's storage, which it keeps
    half = (cols * h * 4 * 2 + rows * h * 4 + n * h * (4 - s)) if s != 4 else 0
    return _floor(n, h, v, s) + rows * cols * 4 + half


def choose(n: int, h: int, v: int, dtype: torch.dtype, budget: int, *, device_type: str = "cpu",
           one_pass: bool = False) -> MemoryChoice:
    """The fastest plan whose extra memory fits ``budget`` bytes for hidden ``[n, h]``, head ``[v, h]``."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"memory_budget must be a positive int of bytes, got {budget!r}")
    s = torch.empty((), dtype=dtype).element_size()
    work = 8 if dtype == torch.float64 else 4
    cap = (DEFAULT_CHUNK_BYTES if device_type == "cpu" else DEFAULT_DEVICE_CHUNK_BYTES) // (v * work)
    fixed = default_extra(n, h, v, s, 0)
    rows = min(cap, n, max(0, (budget - fixed) // (2 * v * 4)))
    flops = 2 * n * h * v
    if rows >= min(MIN_CHUNK_ROWS, n):
        return MemoryChoice("default", rows * v * work, default_extra(n, h, v, s, rows),
                            (3 if one_pass else 4) * flops)
    low = low_extra(n, h, v, s, device_type)
    if low <= budget:
        return MemoryChoice("low", 0, low, 4 * flops)
    raise ValueError(f"memory_budget must be at least {low} bytes for hidden [{n}, {h}] and a [{v}, {h}] "
                     f"{str(dtype)[6:]} head (the low plan: d_weight, d_hidden and its fp32 accumulator), "
                     f"got {budget}")


def table(shapes=((4096, 1024, 32000), (8192, 4096, 151936), (8192, 8192, 128256)),
          dtypes=(torch.float32, torch.bfloat16), budgets_gib=(None, 4.0, 2.0, 1.0)) -> str:
    """The markdown table of the README: shape, dtype, budget -> plan, chunk, extra bytes, FLOPs of the primitive
    (8·N·H·V; a one-pass fused loss on the default plan runs 6·N·H·V). CUDA model."""
    rows = ["| N x H x V | dtype | budget | plan | chunk | extra | FLOPs |", "|---|---|---:|---|---:|---:|---:|"]
    for n, h, v in shapes:
        for dtype in dtypes:
            for gib in budgets_gib:
                budget = int((gib or 1e6) * 2 ** 30)
                try:
                    c = choose(n, h, v, dtype, budget, device_type="cuda")
                    cells = (c.plan, f"{c.chunk_bytes / 2 ** 20:.0f} MiB" if c.plan == "default" else "-",
                             f"{c.extra_bytes / 2 ** 30:.2f} GiB", f"{c.flops / 1e12:.1f} T")
                except ValueError:
                    cells = ("does not fit", "-", f"> {gib} GiB", "-")
                rows.append(f"| {n}x{h}x{v} | {str(dtype)[6:]} | {'none' if gib is None else f'{gib:g} GiB'} | "
                            + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())


def resolve(memory_budget, memory: str, chunk_bytes, hidden: torch.Tensor, weight: torch.Tensor, *,
            one_pass: bool = False):
    """``(memory, chunk_bytes)`` for the public ops: unchanged without a budget, else the choice for every row of
    ``hidden`` (an upper bound: ignored rows are not counted, which would cost a host read)."""
    if memory_budget is None:
        return memory, chunk_bytes
    if memory != "default" or chunk_bytes is not None:
        given = f"memory={memory!r}" if memory != "default" else f"chunk_bytes={chunk_bytes!r}"
        raise ValueError(f"memory_budget chooses the plan and the chunk size itself; leave memory and chunk_bytes "
                         f"at their defaults, got {given}")
    n = hidden.numel() // max(1, hidden.shape[-1])
    c = choose(n, hidden.shape[-1], weight.shape[0], hidden.dtype, memory_budget, device_type=hidden.device.type,
               one_pass=one_pass)
    return c.plan, (c.chunk_bytes or None)
