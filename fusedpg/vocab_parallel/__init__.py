"""Vocabulary-parallel (tensor-parallel) LM head: each rank holds a contiguous shard of the vocabulary; log-probs,
entropy and gradients equal one process on the whole head. Reached through ``vocab_parallel_group=`` on
:func:`fusedpg.linear_logprob_entropy` and :func:`fusedpg.fused_linear_pg_loss`; who reduces what: README.md here.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import checks
from ..backend import resolve_impl
from .groups import local_shard, name_of, shard_sizes
from .op import IGNORE, vocab_parallel_op

__all__ = ["vocab_parallel_logprob_entropy"]


def vocab_parallel_logprob_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, group=None, bias=None, temperature=1.0,
    ignore_index: int = -100, compute_entropy: bool = True, check_targets: Optional[bool] = None,
    impl: Optional[str] = None, chunk_bytes: Optional[int] = None, vocab_size: Optional[int] = None,
    reduce_hidden_grad: bool = True, deterministic: bool = False, top_k=None, top_p=None, min_p=None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``linear_logprob_entropy`` with ``weight`` this rank's shard ``[V_r, H]`` of the head (rows in rank order,
    uneven sizes allowed) and ``targets`` global token ids; see :func:`fusedpg.linear_logprob_entropy` for the rest.

    vocab_size: the real vocabulary when the shards are padded past it: columns from ``vocab_size`` on are masked.
    reduce_hidden_grad: sum d_hidden over the group inside the op (default); off where the caller reduces it, as
        Megatron's sequence-parallel layouts do with a reduce-scatter.
    deterministic: merge the all-gathered per-segment statistics of every rank in global segment order instead of
        two all-reduces: every rank holds bitwise the same result, and with whole-segment shards the log-probs and
        entropy, and every gradient (d_hidden's running sum handed rank after rank), are bitwise the one-process
        ones (README.md#deterministic-mode).
    top_k, top_p, min_p: the truncated sampling distribution, its thresholds found over the whole vocabulary (the
        row max, the sums and the select's histograms all-reduced over the group).

    Equivalent PyTorch: ``linear_logprob_entropy(hidden, cat(all shards), targets)``.
    """
    weight, bias, group = local_shard(weight, bias, group)
    if type(hidden).__name__ == "DTensor":
        hidden = hidden.full_tensor()
    checks.linear_inputs(hidden, weight, targets, bias)
    name = name_of(group)
    sizes = shard_sizes(name, weight.shape[0], weight.device)
    rank = torch.distributed.get_rank(group)
    offset, total = sum(sizes[:rank]), sum(sizes)
    real = total if vocab_size is None else int(vocab_size)
    if not 0 < real <= total:
        raise ValueError(f"vocab_size must lie in [1, {total}] (the shards' total), got {vocab_size}")
    lead = hidden.shape[:-1]
    temp = checks.temperature(temperature, lead, hidden.device)
    ignored = targets == ignore_index
    if check_targets is None or check_targets:
        checks.targets_in_range(targets, real, ignore_index)
    here = (targets >= offset) & (targets < offset + weight.shape[0])
    local = torch.where(ignored, IGNORE, torch.where(here, targets - offset, -1)).reshape(-1)
    if real < offset + weight.shape[0]:  # padded columns of this shard: -inf logits, no probability, no gradient
        pad = (torch.arange(offset, offset + weight.shape[0], device=weight.device) >= real).to(weight.dtype)
        pad = pad.masked_fill(pad > 0, float("-inf"))
        bias = pad if bias is None else bias + pad
    impl = resolve_impl(impl, hidden.device)
    if impl == "reference":
        raise ValueError("impl='reference' runs in one process; vocab_parallel_group needs 'torch' or 'triton'")
    trunc = checks.truncation(top_k, top_p, min_p, lead, hidden.device)
    logp, ent, _, _, _ = vocab_parallel_op(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, local, *temp.op_args(), bool(compute_entropy), impl,
        checks.chunk_bytes(chunk_bytes), name, bool(deterministic), bool(reduce_hidden_grad), *trunc.op_args())
    if not compute_entropy:
        ent = ent.detach()
    return logp.reshape(lead), ent.reshape(lead)
