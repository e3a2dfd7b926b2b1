"""One-Token Rollout (OTR; Ming et al., arXiv 2509.26313): supervised data turned into a token-level on-policy
signal. At every position K candidate tokens are sampled from the current policy inside the fused pass, each is
rewarded by the ground-truth token, and the policy gradient runs over the candidates: one pass per chunk draws,
scores and differentiates (``otr_op.py``, 6·N·H·V FLOPs). Formula, gradient and the choices made where the paper
is not explicit: fusedpg/objective/README.md#variants and docs/losses.md#otr.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch

from .. import checks
from ..backend import resolve_impl
from ..linear.reference import linear_logprob_entropy_reference
from ..linear.sample import draw_ids
from ..options import LogProbOptions
from .otr_op import otr_loss_op, otr_rewards

__all__ = ["otr_loss", "otr_sft_loss", "otr_loss_reference", "OTR_AGGREGATIONS"]

OTR_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "sum")


def _weights(valid: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Aggregation weights of the leading shape: the token mean over valid positions, the mean over sequences of
    each sequence's token mean (``[B, T]`` inputs), or a plain sum."""
    m = valid.to(torch.float32)
    if aggregation == "sum":
        return m
    if aggregation == "token-mean" or m.dim() == 1:
        return m / m.sum().clamp(min=1.0)
    lens = m.sum(-1, keepdim=True)
    return m / (lens.clamp(min=1.0) * (lens > 0).sum().clamp(min=1))


def _options(beta, baseline, aggregation) -> None:
    """The loss's own settings (the draws' are checked by ``draw_ids``)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
        raise ValueError(f"otr_beta must be a number >= 0 (the penalty of a wrong candidate), got {beta!r}")
    if baseline not in ("none", "mean"):
        raise ValueError(f"otr_baseline must be 'none' or 'mean', got {baseline!r}")
    if aggregation not in OTR_AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(OTR_AGGREGATIONS)} for OTR, got {aggregation!r}")


def otr_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    num_samples: int = 4,
    otr_beta: float = 0.1,
    otr_baseline: str = "none",
    seed: int = 0,
    sample_ids: Optional[torch.Tensor] = None,
    aggregation: str = "token-mean",
    bias: Optional[torch.Tensor] = None,
    temperature: Union[float, torch.Tensor] = 1.0,
    ignore_index: int = -100,
    impl: Optional[str] = None,
    chunk_bytes: Optional[int] = None,
    deterministic: Optional[bool] = None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The OTR loss from the last hidden states: ``loss = Σ_t w_t ℓ_t``, ``ℓ_t = −(1/K) Σ_k r_tk log π(y_tk)``.

    Args:
        hidden: ``[B, T, H]`` or ``[N, H]``; weight ``[V, H]``; bias optional ``[V]``.
        labels: ground-truth tokens of the leading shape (already shifted: ``labels[t]`` is what position t
            predicts); ``ignore_index`` positions are skipped.
        mask: optional loss mask of the leading shape (non-zero: in the loss), combined with the labels'.
        num_samples: K candidates per position, sampled from ``softmax(logits / temperature)`` (the same
            temperature scores them) with ``seed`` / ``sample_ids`` as in :func:`fusedpg.sample_logprob_entropy`.
        otr_beta: reward of a wrong candidate is ``−otr_beta`` (a right one gets 1).
        otr_baseline: ``"none"``, or ``"mean"`` to subtract each position's mean candidate reward.
        aggregation: ``"token-mean"`` (default), ``"seq-mean-token-mean"`` (``[B, T]`` inputs) or ``"sum"``.

    Returns:
        ``(loss, metrics)``: metrics ``hit_rate`` (fraction of candidates equal to the label), ``label_sampled``
        (fraction of positions where some candidate is the label), ``entropy`` (mean over loss positions) and
        ``tokens`` (the sampled candidates ``[..., K]``, for logging or reuse).

    Equivalent PyTorch (materialising the logits)::

        z = (hidden @ weight.T + bias).float() / temperature
        tokens = torch.multinomial(z.softmax(-1), K, replacement=True)        # no gradient
        r = torch.where(tokens == labels[..., None], 1.0, -otr_beta)
        loss = (w * -(r * z.log_softmax(-1).gather(-1, tokens)).mean(-1)).sum()
    """
    _options(otr_beta, otr_baseline, aggregation)
    checks.integer("labels", labels)
    lead = hidden.shape[:-1]
    if tuple(labels.shape) != tuple(lead):
        raise ValueError(f"labels must have hidden's leading shape {tuple(lead)}, got {checks._describe(labels)}")
    valid = labels != ignore_index
    if mask is not None:
        checks.tensor("mask", mask)
        if tuple(mask.shape) != tuple(lead):
            raise ValueError(f"mask must have hidden's leading shape {tuple(lead)}, got {checks._describe(mask)}")
        valid = valid & (mask != 0)
    checks.linear_inputs(hidden, weight, labels, bias)
    resolve_impl(impl, hidden.device)  # validated; the one-pass op runs the chunked torch plan on any device
    ids = draw_ids(num_samples, seed, sample_ids, lead, hidden.device)
    temp = checks.temperature(temperature, lead, hidden.device)
    work = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    w = _weights(valid, aggregation).to(work).reshape(-1)
    grad = torch.is_grad_enabled()
    loss, tokens, ent, _, _, _ = otr_loss_op(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1), w, ids, *temp.op_args(),
        num_samples, seed, float(otr_beta), otr_baseline, int(ignore_index), checks.chunk_bytes(chunk_bytes),
        LogProbOptions.default_deterministic(deterministic), grad and hidden.requires_grad,
        grad and weight.requires_grad, grad and bias is not None and bias.requires_grad)
    tokens, ent = tokens.reshape(tuple(lead) + (num_samples,)), ent.reshape(lead)
    with torch.no_grad():
        hits = (tokens == labels.unsqueeze(-1)) & valid.unsqueeze(-1)
        count = valid.sum().clamp(min=1)
        metrics = {"hit_rate": hits.sum() / (count * num_samples), "label_sampled": hits.any(-1).sum() / count,
                   "entropy": (ent * valid).sum() / count, "tokens": tokens}
    return loss, metrics


def otr_loss_reference(hidden, weight, labels, tokens, *, mask=None, otr_beta: float = 0.1,
                       otr_baseline: str = "none", aggregation: str = "token-mean", bias=None, temperature=1.0,
                       ignore_index: int = -100, dtype: Optional[torch.dtype] = torch.float64) -> torch.Tensor:
    """The OTR loss of given candidates ``tokens [..., K]`` with the materialised head in ``dtype`` (float64: the
    reference the fused loss is tested against; None: the inputs' dtype, the eager yardstick). The sampler is
    tested on its own against a float64 inverse CDF."""
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & (mask != 0)
    y = torch.where(valid.unsqueeze(-1), tokens, torch.full_like(tokens, ignore_index))
    logp, _ = linear_logprob_entropy_reference(hidden, weight, y, bias, temperature, ignore_index, dtype)
    r = otr_rewards(tokens, labels, otr_beta, otr_baseline).to(logp.dtype)
    return -(_weights(valid, aggregation).to(logp.dtype) * (r * logp).mean(-1)).sum()


def otr_sft_loss(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, *,
                 attention_mask: Optional[torch.Tensor] = None, **otr_options):
    """OTR as a drop-in for a causal LM's SFT loss: ``model`` a Hugging Face ``*ForCausalLM``, ``input_ids`` and
    ``labels`` ``[B, T]`` as for its own loss (labels unshifted, ``-100`` where no loss). Runs the backbone, shifts
    by one and runs :func:`otr_loss` inside the head's forward; ``otr_options`` as there. Returns
    ``(loss, metrics)``.

    The head is made a :class:`fusedpg.FusedLMHead` (:func:`fusedpg.install_lm_head`, sharing its Parameters), so
    under DDP / FSDP2 / ZeRO-3 the step runs through :func:`fusedpg.call_through` like every fused loss
    (README.md, "More than one GPU"); install it before wrapping the model.
    """
    from ..head import install_lm_head  # lazy: the head module sits on top of this package

    head = install_lm_head(model)
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    shifted = labels[:, 1:]
    return head(hidden[:, :-1], shifted, advantages=None, mask=torch.ones_like(shifted), loss_type="otr",
                **otr_options)
