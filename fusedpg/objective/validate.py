"""Input checks and flattening for ``prepare``. Every error names the argument, the expectation and the value."""
from __future__ import annotations

from typing import Optional

import torch

from .. import checks
from ..host import HostReads
from ..rows import kept_first
from .config import plan_of, requirements
from .inputs import LossInputs

_SEQ_AGGREGATIONS = ("grpo", "dr_grpo", "luspo", "seq-mean-token-mean", "seq-mean-token-sum")


def _binary(name: str, t: torch.Tensor, reads: HostReads) -> None:
    """Queued on ``reads``: the check raises after the caller's one host read."""
    if t.dtype == torch.bool:
        return
    if t.dtype.is_complex:
        raise TypeError(f"{name} must be a bool or 0/1 numeric tensor, got {checks._describe(t)}")

    def fail():
        bad = t[(t != 0) & (t != 1)][0].item()
        raise ValueError(f"{name} must be binary (bool or 0/1), got a tensor containing {bad}")

    if t.numel():
        reads.check((t != 0) & (t != 1), fail)


def _same_shape(name: str, t: Optional[torch.Tensor], ref: torch.Tensor, floating: bool = True):
    if t is None:
        return None
    (checks.floating if floating else checks.integer)(name, t)
    checks.same_device(name, t, "mask", ref)
    if tuple(t.shape) != tuple(ref.shape):
        raise ValueError(f"{name} must have the shape of mask {tuple(ref.shape)}, got {checks._describe(t)}")
    return t.reshape(-1)


def _per_seq_or_token(name: str, t: torch.Tensor, mask: torch.Tensor, nseq: int, seq: torch.Tensor):
    """Returns (per-token [N] values, was_per_sequence)."""
    checks.same_device(name, t, "mask", mask)
    n = mask.numel()
    if mask.dim() == 2:
        b, tt = mask.shape
        if tuple(t.shape) in ((b,), (b, 1)):
            return t.reshape(b)[seq], True
        if tuple(t.shape) == (b, tt):
            return t.reshape(-1), False
        expect = f"({b},), ({b}, 1) or ({b}, {tt})"
    else:
        if tuple(t.shape) == (nseq,):
            return t[seq], True
        if tuple(t.shape) == (n,):
            return t, False
        expect = f"({nseq},) per sequence or ({n},) per token"
    raise ValueError(f"{name} must have shape {expect} to match mask {tuple(mask.shape)}, got {checks._describe(t)}")


def _fail(message: str):
    def fail():
        raise ValueError(message)

    return fail


def _one_per_sequence(name: str, t: torch.Tensor, out: dict, seq: torch.Tensor, reads: HostReads) -> None:
    """``t`` holds one flag per sequence: checked now where the count is known on the host, else (packed seq_ids)
    queued against the count on the device; the error path reads the count to name it."""
    k = t.reshape(-1).shape[0]
    known = len(out["offsets"]) - 1 if "offsets" in out else None if seq.numel() else 0

    def fail():
        nseq = known if known is not None else int(seq[-1]) + 1
        raise ValueError(f"{name} must hold one flag per sequence ({nseq},), got {checks._describe(t)}")

    if known is not None:
        if k != known:
            fail()
    elif k == 0:  # nothing to gather from: raise before the gather would
        fail()
    else:
        reads.check(seq[-1:] + 1 != k, fail)


def _clamped(seq: torch.Tensor, per_seq: torch.Tensor) -> torch.Tensor:
    """``seq`` as indices into ``per_seq``, clamped: a wrong length raises after the host read (queued above),
    not as a device-side index error before it."""
    return seq.clamp(max=max(per_seq.numel() - 1, 0))


def flat_layout(cfg, advantages, mask, inputs: LossInputs, dtype, reads: HostReads) -> dict:
    """The first half of ``prepare``'s flattening, before the host read: the checks, the working dtype ``work``,
    the float mask ``[N]`` and the sequence index ``seq [N]`` on the device. What the host needs from the device
    (validation flags; packed input's sequence starts ``starts`` and count ``num_seqs_slot``) is queued on
    ``reads``; ``seq_slots`` bounds the number of sequences (``seq`` lies in ``[0, seq_slots)``)."""
    old_logp, ref_logp, rollout_logp, is_weights, old_entropy, seq_ids, _, _, _, truncated = inputs.as_list()
    checks.tensor("mask", mask)
    if mask.dim() not in (1, 2):
        raise ValueError(f"mask must be [B, T] or packed [N], got {checks._describe(mask)}")
    _binary("mask", mask, reads)
    checks.floating("advantages", advantages)
    given = {"old_logp": old_logp, "ref_logp": ref_logp, "rollout_logp": rollout_logp, "old_entropy": old_entropy}
    for name in sorted(requirements(cfg) - {"entropy"}):
        if given.get(name) is None:
            raise ValueError(f"{name} is required by loss_type={cfg.loss_type!r} with these options, got None")
    if cfg.off_policy_mask_threshold is not None and old_logp is None and rollout_logp is None:
        raise ValueError("old_logp or rollout_logp is required by off_policy_mask_threshold (OPSM), got neither")
    if is_weights is not None and cfg.rollout_is is not None:
        raise ValueError(f"is_weights (precomputed) and rollout_is={cfg.rollout_is!r} contradict each other; pass one")
    floats = [t.dtype for t in (advantages, old_logp, ref_logp, rollout_logp, old_entropy, is_weights) if t is not None]
    work = dtype or (torch.float64 if torch.float64 in floats else torch.float32)
    out = {"shape": tuple(mask.shape) if mask.dim() == 2 else None, "width": mask.shape[1] if mask.dim() == 2 else None}
    n = mask.numel()
    dev = mask.device
    if mask.dim() == 2:
        b, t = mask.shape
        if seq_ids is not None:
            raise ValueError(f"seq_ids is for packed [N] input only; mask is [B, T] = {tuple(mask.shape)}")
        seq = torch.arange(b, device=dev).repeat_interleave(t)
        out["offsets"] = tuple(range(0, b * t + 1, t)) if t > 0 else (0,) * (b + 1)
        out["seq_slots"] = b
    elif seq_ids is None:
        plan = plan_of(cfg)
        why = (f"the {plan} plan" if plan != "one_pass" else
               f"aggregation={cfg.aggregation!r}" if cfg.aggregation in _SEQ_AGGREGATIONS else
               "mask_truncated_completions" if cfg.mask_truncated_completions else None)
        if why is not None:
            raise ValueError(f"seq_ids is required for packed [N] input with {why} (it needs sequence "
                             "boundaries), got None")
        seq = torch.zeros(n, dtype=torch.long, device=dev)
        out["offsets"] = (0, n) if n else (0,)
        out["seq_slots"] = 1 if n else 0
    else:
        checks.integer("seq_ids", seq_ids)
        checks.same_device("seq_ids", seq_ids, "mask", mask)
        if tuple(seq_ids.shape) != (n,):
            raise ValueError(f"seq_ids must have shape ({n},) like mask, got {checks._describe(seq_ids)}")
        if n:
            reads.check(seq_ids[1:] < seq_ids[:-1], _fail("seq_ids must be non-decreasing (each sequence one "
                                                          "contiguous run), got a decrease"))
        change = torch.ones(n, dtype=torch.bool, device=dev)
        change[1:] = seq_ids[1:] != seq_ids[:-1]
        seq = torch.cumsum(change.long(), 0) - 1
        # the starts, first, without nonzero's synchronisation; the count tells where they end (flat_inputs)
        out.update(starts=reads.add(kept_first(change)), num_seqs_slot=reads.add(seq[-1:] + 1), seq_slots=n)
    if mask.dim() == 1 and cfg.aggregation == "seq-mean-token-sum-norm" and cfg.loss_scale_factor is None:
        raise ValueError("loss_scale_factor is required for aggregation='seq-mean-token-sum-norm' with packed [N] "
                         "input (verl's default C is the padded width T, which packed input does not have)")
    if mask.dim() == 1 and cfg.luspo_unmasked:
        raise ValueError("luspo_unmasked (TRL's padded B*T mean) needs padded [B, T] input, got packed [N]")
    m = mask.reshape(-1).to(work)
    if truncated is not None:
        checks.tensor("truncated", truncated)
        _one_per_sequence("truncated", truncated, out, seq, reads)
        _binary("truncated", truncated, reads)
        flags = truncated.reshape(-1).to(device=dev, dtype=work)
        out["truncated"] = flags[_clamped(seq, flags)]  # per token (HPT's demo flag)
        if cfg.mask_truncated_completions:
            m = m * (1 - out["truncated"])
    out.update(mask=m, seq=seq, work=work)
    return out


def flat_inputs(cfg, f: dict, advantages, mask, inputs: LossInputs, reads: HostReads) -> dict:
    """The second half, after ``reads.read()``: the sequence offsets, and the loss inputs flattened to ``[N]`` in
    the working dtype (per-sequence ones broadcast to their tokens). Adds to and returns ``f``."""
    old_logp, ref_logp, rollout_logp, is_weights, old_entropy, _, group_ids, step_ids, token_weights, _ = \
        inputs.as_list()
    out, seq, work = f, f["seq"], f["work"]
    if "starts" in out:  # packed seq_ids: the first num_seqs entries of the queued starts
        n = mask.numel()
        nseq = reads.get(out["num_seqs_slot"])[0] if n else 0
        out["offsets"] = tuple(reads.get(out["starts"])[:nseq]) + (n,) if n else (0,)
    nseq = len(out["offsets"]) - 1
    adv, per_seq = _per_seq_or_token("advantages", advantages, mask, nseq, seq)
    out.update(num_seqs=nseq, advantages=adv.detach().to(work), adv_per_seq=per_seq)
    for name, value in (("old_logp", old_logp), ("ref_logp", ref_logp), ("rollout_logp", rollout_logp),
                        ("old_entropy", old_entropy), ("token_weights", token_weights)):
        v = _same_shape(name, value, mask)
        out[name] = None if v is None else v.detach().to(work)
    if step_ids is not None:
        out["step"] = _same_shape("step_ids", step_ids, mask, floating=False)
    if is_weights is not None:
        checks.floating("is_weights", is_weights)
        w, out["is_weights_per_seq"] = _per_seq_or_token("is_weights", is_weights, mask, nseq, seq)
        out["is_weights"] = w.detach().to(work)
    if group_ids is not None:
        checks.integer("group_ids", group_ids)
        checks.same_device("group_ids", group_ids, "mask", mask)
        if tuple(group_ids.shape) != (nseq,):
            raise ValueError(f"group_ids must hold one id per sequence ({nseq},), got {checks._describe(group_ids)}")
        out["group"] = group_ids[seq]
    return out


def check_finite(mask: torch.Tensor, **tensors: Optional[torch.Tensor]) -> None:
    """``check_finite`` on the loss inputs: a tensor with mask's (leading) shape is read on unmasked tokens only, a
    per-sequence one on sequences with an unmasked token; anything else (weights, packed per-sequence values)
    everywhere."""
    on = mask != 0
    for name, t in tensors.items():
        if t is None:
            continue
        used = None
        if tuple(t.shape[:mask.dim()]) == tuple(mask.shape):
            used = on
        elif mask.dim() == 2 and t.numel() == mask.shape[0] and t.dim() and t.shape[0] == mask.shape[0]:
            used = on.any(-1).reshape(t.shape)
        checks.finite(name, t, used)
