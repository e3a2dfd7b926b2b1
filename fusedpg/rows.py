"""Row compaction shared by the ops: ignored rows cost nothing past one index computation."""
from __future__ import annotations

from typing import Optional

import torch


class Rows:
    """The non-ignored rows of a flattened ``[N]`` target vector (or ``[N, K]``: rows with any kept target).

    ``idx`` is None when every row is kept (then no gather or scatter happens). Building it is one
    ``nonzero``, which on CUDA synchronises with the host.
    """

    def __init__(self, targets: torch.Tensor, ignore_index: int):
        self.n = targets.shape[0]
        valid = targets != ignore_index
        if valid.dim() == 2:  # several targets per row: a row is kept while one of them is
            valid = valid.any(1)
        idx = valid.nonzero().squeeze(1)
        self.count = idx.numel()
        self.idx: Optional[torch.Tensor] = None if self.count == self.n else idx

    def take(self, x):
        """Rows of x ``[N, ...]`` (or a float, passed through) kept by the compaction."""
        if self.idx is None or not isinstance(x, torch.Tensor):
            return x
        return x.index_select(0, self.idx)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Place compacted rows ``[count, ...]`` back into zeros ``[N, ...]``."""
        if self.idx is None:
            return x
        out = torch.zeros((self.n,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        return out.index_copy_(0, self.idx, x)


def kept_first(keep: torch.Tensor) -> torch.Tensor:
    """Indices ``[N]`` of a bool ``keep [N]``: the kept positions in order, then the others in order.

    With the number kept known on the host, ``kept_first(keep)[:count]`` is ``keep.nonzero()`` without its host
    synchronisation: every position's slot comes from a cumulative sum, so the scatter is a permutation (no
    duplicate slots, deterministic on every device)."""
    pos = torch.arange(keep.shape[0], device=keep.device)
    upto = keep.long().cumsum(0)  # kept positions up to and including each position
    slot = torch.where(keep, upto - 1, upto[-1:] + pos - upto)
    return torch.empty_like(pos).index_copy_(0, slot, pos)
