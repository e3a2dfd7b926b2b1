"""Process groups and shard offsets of vocabulary-parallel heads.

A custom op takes strings, not process groups, so a group is registered once under a name and looked up by the op.
Each rank's shard offset comes from one small all-gather of the shard sizes, cached per (group, local size).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

_GROUPS: Dict[str, object] = {}
_SIZES: Dict[Tuple[str, int, str], Tuple[int, ...]] = {}


def name_of(group) -> str:
    """Register ``group`` (a ``ProcessGroup``) and return the name the custom ops carry."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("vocab_parallel_group needs an initialised torch.distributed process group, got none "
                         "initialised (torch.distributed.init_process_group)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"vocab_parallel_group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    name = f"pg{id(group)}"
    _GROUPS[name] = group  # a strong reference: the id stays this group's while the name is in use
    return name


def group_of(name: str):
    return _GROUPS[name]


def shard_sizes(name: str, local: int, device: torch.device) -> Tuple[int, ...]:
    """Every rank's shard size, in rank order (one all-gather per new (group, local size, device))."""
    key = (name, local, str(device))
    if key not in _SIZES:
        group = group_of(name)
        mine = torch.tensor([local], dtype=torch.int64, device=device)
        sizes = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(sizes, mine, group=group)
        _SIZES[key] = tuple(int(s) for s in sizes)
    return _SIZES[key]


def local_shard(weight: torch.Tensor, bias: Optional[torch.Tensor], group):
    """(weight, bias, group) with a ``Shard(0)`` DTensor weight (``ColwiseParallel(use_local_output=False)``)
    replaced by its local shard and its mesh dimension's group; other weights pass through."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch without DTensor
        return weight, bias, group
    if not isinstance(weight, DTensor):
        return weight, bias, group
    dims = [i for i, p in enumerate(weight.placements) if isinstance(p, Shard) and p.dim == 0]
    if len(dims) != 1 or any(not p.is_replicate() for i, p in enumerate(weight.placements) if i != dims[0]):
        raise ValueError(f"weight must be a DTensor sharded Shard(0) on one mesh dimension (vocabulary-parallel), got "
                         f"placements {weight.placements}")
    mesh_group = weight.device_mesh.get_group(dims[0])
    if group is not None and group is not mesh_group:
        raise ValueError("vocab_parallel_group must be the group of weight's Shard(0) mesh dimension, got another")
    if isinstance(bias, DTensor):
        bias = bias.to_local()
    return weight.to_local(), bias, mesh_group
