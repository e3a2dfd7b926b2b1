"""Fused LM head -> log-prob + entropy, without the N x V logits. See README.md here for the derivation."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import checks
from ..backend import resolve_impl
from ..memory_plan import resolve as resolve_memory
from ..options import LogProbOptions
from .reference import linear_logprob_entropy_reference
from .op import linear_logprob_entropy_op

__all__ = ["linear_logprob_entropy"]


def linear_logprob_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: Union[float, torch.Tensor] = 1.0,
    ignore_index: int = -100,
    compute_entropy: bool = True,
    check_targets: Optional[bool] = None,
    impl: Optional[str] = None,
    chunk_bytes: Optional[int] = None,
    check_finite: Optional[bool] = None,
    vocab_parallel_group=None,
    vocab_size: Optional[int] = None,
    reduce_hidden_grad: bool = True,
    deterministic: Optional[bool] = None,
    top_k: Union[int, torch.Tensor, None] = None,
    top_p: Union[float, torch.Tensor, None] = None,
    min_p: Union[float, torch.Tensor, None] = None,
    memory: str = "default",
    memory_budget: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of ``targets`` and entropy of the tempered softmax of ``hidden @ weight.T + bias``.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]``, bf16 / fp16 / fp32 (fp64 runs on the torch plan, for gradcheck).
        weight: ``[V, H]``, same dtype and device as hidden.
        targets: integer tensor of hidden's leading shape; ``ignore_index`` rows give 0 and no gradient. Or
            ``[..., K]``: K targets per position (a teacher's top-k ids, OTR candidates), logp ``[..., K]`` from one
            pass (the statistics are shared), ``ignore_index`` per target, the entropy once per position.
        bias: optional ``[V]``.
        temperature: positive float, or a tensor of hidden's leading shape (per-token temperature; no gradient).
        compute_entropy: if False, entropy is returned as zeros without gradient and its work is skipped.
        check_targets: verify targets lie in ``[0, V)``; default True unless ``FUSEDPG_CHECK_TARGETS=0``.
        impl: ``"triton"``, ``"torch"`` or ``"reference"``; default from ``FUSEDPG_IMPL``, else by device.
        chunk_bytes: budget of one chunk's ``[rows, V]`` buffer (default: 64 MiB on the torch plan, 1 GiB on Triton).
        check_finite: raise on NaN/inf in hidden (rows not ignored), weight or bias, naming the tensor
            and index; default off unless ``FUSEDPG_CHECK_FINITE=1`` (one host sync per tensor when on).
        vocab_parallel_group: a process group over which the vocabulary is sharded: ``weight`` (and ``bias``) are
            this rank's contiguous rows of the head, ``targets`` global ids. A ``Shard(0)`` DTensor weight selects
            its mesh group by itself. ``vocab_size``, ``reduce_hidden_grad``: see
            :func:`fusedpg.vocab_parallel.vocab_parallel_logprob_entropy` and fusedpg/vocab_parallel/README.md.
        deterministic: bitwise batch-invariant rows (a row's logp, entropy and d_hidden depend on that row alone:
            not on N, other rows, ignored rows, its position or chunk_bytes) and run-to-run reproducible d_weight;
            default ``FUSEDPG_DETERMINISTIC``, else off. Vocabulary-parallel: the ranks' per-segment statistics are
            merged in global order, and d_hidden's running sum is handed from rank to rank. See fusedpg/linear/README.md#deterministic-mode.
        top_k, top_p, min_p: the log-prob and entropy of the truncated sampling distribution (vLLM's sampler: a
            number, or a tensor of hidden's leading shape); exact gradients of the renormalised kept set. A target
            outside the kept set gets ``fusedpg.truncation.OUTSIDE_LOGP`` (finite). Runs the chunked torch plan
            on any device. See fusedpg/linear/README.md#truncated-sampling.
        memory: ``"default"`` or ``"low"``: the backward blocked over the vocabulary, with no ``[V, H]`` fp32
            accumulator (d_weight written once in the weight's dtype); see fusedpg/linear/README.md#low-memory-plan.
        memory_budget: bytes this call may allocate besides its inputs (gradients included): the plan
            (``"default"`` or ``"low"``) and the chunk size are chosen to fit, the fastest that does
            (``fusedpg.memory_plan``; table in fusedpg/linear/README.md#choosing-by-budget). Leave ``memory`` and
            ``chunk_bytes`` unset with it.

    Returns:
        ``(logp, entropy)``, fp32 with hidden's leading shape, differentiable w.r.t. hidden, weight and bias.

    Equivalent PyTorch (materialising the logits)::

        z = (hidden @ weight.T + bias).float() / temperature
        logp = z.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    """
    if vocab_parallel_group is not None or type(weight).__name__ == "DTensor":
        from ..vocab_parallel import vocab_parallel_logprob_entropy  # lazy: the TP layer sits on top of this op

        return vocab_parallel_logprob_entropy(
            hidden, weight, targets, group=vocab_parallel_group, bias=bias, temperature=temperature,
            ignore_index=ignore_index, compute_entropy=compute_entropy, check_targets=check_targets, impl=impl,
            chunk_bytes=chunk_bytes, vocab_size=vocab_size, reduce_hidden_grad=reduce_hidden_grad,
            deterministic=LogProbOptions.default_deterministic(deterministic), top_k=top_k, top_p=top_p, min_p=min_p)
    checks.linear_inputs(hidden, weight, targets, bias, multi=True)
    memory, chunk_bytes = resolve_memory(memory_budget, memory, chunk_bytes, hidden, weight)
    lead = hidden.shape[:-1]
    multi = targets.dim() == hidden.dim()
    temp = checks.temperature(temperature, lead, hidden.device)
    if checks.finite_enabled(check_finite):
        rows = (targets != ignore_index).any(-1) if multi else targets != ignore_index
        for name, x, used in (("hidden", hidden, rows), ("weight", weight, None),
                              ("bias", bias, None)):
            checks.finite(name, x, used)
    if check_targets is None:
        check_targets = LogProbOptions.default_check_targets()
    impl = resolve_impl(impl, hidden.device)
    trunc = checks.truncation(top_k, top_p, min_p, lead, hidden.device)
    deterministic = LogProbOptions.default_deterministic(deterministic)
    low = checks.memory_mode(memory)
    if impl == "reference":
        if check_targets:
            checks.targets_in_range(targets, weight.shape[0], ignore_index)
        logp, ent = linear_logprob_entropy_reference(hidden, weight, targets, bias, temperature, ignore_index,
                                                     truncation=(top_k, top_p, min_p) if trunc.active else None)
        ent = ent if compute_entropy else torch.zeros_like(ent).detach()
        return logp.float(), ent.float()
    logp, ent, _, _, _ = linear_logprob_entropy_op(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias,
        targets.reshape(-1, targets.shape[-1]) if multi else targets.reshape(-1), *temp.op_args(), int(ignore_index),
        bool(compute_entropy), bool(check_targets), impl, checks.chunk_bytes(chunk_bytes),
        deterministic, *trunc.op_args(), low)
    if not compute_entropy:
        ent = ent.detach()
    return logp.reshape(targets.shape), ent.reshape(lead)
