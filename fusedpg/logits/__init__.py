"""Log-prob + entropy from materialised logits, for trainers that already hold them."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import checks
from ..backend import resolve_impl
from ..options import LogProbOptions
from .reference import logprob_entropy_reference
from .op import logprob_entropy_op

__all__ = ["logprob_entropy"]


def logprob_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: Union[float, torch.Tensor] = 1.0,
    ignore_index: int = -100,
    compute_entropy: bool = True,
    inplace_backward: bool = False,
    check_targets: Optional[bool] = None,
    impl: Optional[str] = None,
    chunk_bytes: Optional[int] = None,
    check_finite: Optional[bool] = None,
    deterministic: Optional[bool] = None,
    top_k: Union[int, torch.Tensor, None] = None,
    top_p: Union[float, torch.Tensor, None] = None,
    min_p: Union[float, torch.Tensor, None] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-prob of ``targets`` and entropy of ``softmax(logits / temperature)``.

    Args:
        logits: ``[N, V]`` or ``[B, T, V]``, bf16 / fp16 / fp32. Read once in the forward.
        targets: integer tensor of the leading shape; ``ignore_index`` rows give 0 and no gradient. Or ``[..., K]``:
            K log-probs per position from one pass, as in :func:`fusedpg.linear_logprob_entropy`.
        temperature: positive float or a tensor of the leading shape (no gradient).
        inplace_backward: write the logits gradient into the logits buffer (saves one N x V tensor; the caller's
            logits are overwritten during backward, so do not reuse them afterwards).
        check_targets, impl, chunk_bytes, check_finite, deterministic, top_k, top_p, min_p: as in
            :func:`fusedpg.linear_logprob_entropy`
            (deterministic: a row's results depend on that row alone; the finite
            check reads logits on rows that are not ignored; ``-inf`` logits are allowed, NaN and ``+inf`` are not).

    Returns:
        ``(logp, entropy)`` fp32 of the leading shape.

    Equivalent PyTorch::

        z = logits.float() / temperature
        logp = z.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    """
    checks.logits_inputs(logits, targets, multi=True)
    multi = targets.dim() == logits.dim()
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    temp = checks.temperature(temperature, lead, logits.device)
    if checks.finite_enabled(check_finite):
        # -inf columns are banned tokens (a sampler's mask), not bugs
        rows = (targets != ignore_index).any(-1) if multi else targets != ignore_index
        checks.finite("logits", logits.masked_fill(logits == float("-inf"), 0), rows)
    if check_targets is None:
        check_targets = LogProbOptions.default_check_targets()
    impl = resolve_impl(impl, logits.device)
    trunc = checks.truncation(top_k, top_p, min_p, lead, logits.device)
    if impl == "reference":
        if check_targets:
            checks.targets_in_range(targets, vocab, ignore_index)
        logp, ent = logprob_entropy_reference(logits, targets, temperature, ignore_index,
                                              truncation=(top_k, top_p, min_p) if trunc.active else None)
        ent = ent if compute_entropy else torch.zeros_like(ent).detach()
        return logp.float(), ent.float()
    if inplace_backward and not logits.is_contiguous():
        raise ValueError("logits must be contiguous when inplace_backward=True, got a non-contiguous tensor")
    logp, ent, _, _, _ = logprob_entropy_op(
        logits.reshape(-1, vocab), targets.reshape(-1, targets.shape[-1]) if multi else targets.reshape(-1),
        *temp.op_args(), int(ignore_index), bool(compute_entropy),
        bool(check_targets), impl, checks.chunk_bytes(chunk_bytes), bool(inplace_backward),
        LogProbOptions.default_deterministic(deterministic), *trunc.op_args())
    if not compute_entropy:
        ent = ent.detach()
    return logp.reshape(targets.shape), ent.reshape(lead)
