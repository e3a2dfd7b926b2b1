"""Advantage-side parts of COPO and HPT (docs/losses.md#copo, #hpt): computed under no-grad from rewards, before
the loss. Re-exported by ``fusedpg.advantages``.

* ``copo_advantages``: COPO's global consistency reward, standardised over the prompts of the batch, blended with
  the local (GRPO) advantage by the entropy of each group's answers.
* ``hpt_gate``: HPT's performance gate, per prompt: SFT on the demonstration or RL on the rollouts.
"""
from __future__ import annotations

import math

import torch

from . import checks
from .advantages import _groups, _rewards, _Stats, group_normalized_advantages

__all__ = ["copo_advantages", "answer_entropy", "hpt_gate"]


@torch.no_grad()
def answer_entropy(labels: torch.Tensor, g: torch.Tensor, num: int) -> torch.Tensor:
    """Entropy in bits of the answer labels within each of ``num`` groups (``g`` the dense group index)."""
    _, lab = torch.unique(labels, return_inverse=True)
    width = int(lab.max()) + 1 if lab.numel() else 1
    keys, counts = torch.unique(g * width + lab, return_counts=True)
    grp = keys // width
    zero = torch.zeros(num, dtype=torch.float64, device=g.device)
    p = counts.to(torch.float64) / zero.index_add(0, g, torch.ones_like(g, dtype=torch.float64))[grp]
    return zero.index_add(0, grp, -p * torch.log2(p))


@torch.no_grad()
def copo_advantages(rewards, group_ids=None, *, group_sizes=None, answer_ids=None, consistency: bool = True,
                    blend_k: float = 1.0, blend_b: float = 0.5, mode: str = "soft", eps: float = 1e-6,
                    return_parts: bool = False):
    """COPO (Consistency-Aware Policy Optimization, arXiv 2508.04138; docs/losses.md#copo):
    ``A = w A_local + (1 - w) A_global`` per sequence.

    * ``A_local``: the group-normalised GRPO advantage (``eps``, a group of one keeps its reward).
    * Global reward of a prompt: its mean reward times ``1 - lam H`` (``consistency=True``; else the mean reward),
      with ``H`` the entropy in bits of the group's answers (``answer_ids``, one integer per sequence, equal ids for
      equivalent answers; default: the rewards themselves) and ``lam = (1 - 1/n)/log2(n)``, so that n distinct
      answers give ``1/n``. ``A_global`` standardises it over the prompts of the batch (unbiased std, ``eps``; one
      prompt: 0).
    * ``w = sigmoid(blend_k (H - blend_b))``: diverse answers lean on the local advantage, consistent ones on the
      global one. ``mode="soft_forced"`` also sets ``w = 0`` where ``A_local = 0`` (the code's "soft with forced").

    The authors' code blends the two clipped losses, ``(1 - w) PPO(A_global) + w PPO(A_local)``; that equals PPO on
    the blended advantage wherever the ratio is inside the clip range or both advantages have one sign. For the
    exact code form pass ``A_global`` and ``A_local`` to two loss calls with ``token_weights`` ``1 - w`` and ``w``
    (``return_parts=True`` gives ``(A, A_local, A_global, w)``).
    """
    r = _rewards(rewards)
    if mode not in ("soft", "soft_forced"):
        raise ValueError(f"mode must be 'soft' or 'soft_forced', got {mode!r}")
    if not bool(torch.isfinite(r).all()):
        bad = int(torch.nonzero(~torch.isfinite(r))[0])
        raise ValueError(f"rewards must be finite for copo_advantages, got {r[bad].item()} at index {bad}")
    n = r.numel()
    g, num = _groups(n, group_ids, group_sizes, r.device)
    if answer_ids is None:
        labels = r
    else:
        checks.integer("answer_ids", answer_ids)
        if tuple(answer_ids.shape) != (n,):
            raise ValueError(f"answer_ids must have shape ({n},) like rewards, got {checks._describe(answer_ids)}")
        labels = answer_ids.to(r.device)
    h = answer_entropy(labels, g, num)
    st = _Stats(r.to(torch.float64), g, num)
    size = st.count
    lam = torch.where(size > 1, (1 - 1 / size.clamp(min=1)) / torch.log2(size.clamp(min=2)), torch.zeros_like(size))
    glob = st.mean * (1 - lam * h) if consistency else st.mean
    sd = glob.std() if num > 1 else torch.zeros((), dtype=glob.dtype)
    a_glob = ((glob - glob.mean()) / (sd + eps))[g]
    a_loc = group_normalized_advantages(r, g, eps=eps).to(torch.float64)
    w = torch.sigmoid(blend_k * (h - blend_b))[g]
    if mode == "soft_forced":
        w = w * (a_loc != 0)
    out = (w * a_loc + (1 - w) * a_glob).to(r.dtype)
    return (out, a_loc.to(r.dtype), a_glob.to(r.dtype), w.to(r.dtype)) if return_parts else out


@torch.no_grad()
def hpt_gate(rewards, group_ids=None, *, group_sizes=None, threshold: int = 0, success: float = 1.0) -> torch.Tensor:
    """HPT's switch (Hybrid Post-Training, arXiv 2509.04419; docs/losses.md#hpt): a bool per rollout, True where its
    prompt's rollouts are correct (``reward == success``) at most ``threshold`` times (the code's ``switch_gate``,
    default 0: only unsolved prompts). For those prompts the trainer drops the rollouts and puts the prompt's
    demonstration in the batch, flagged in ``truncated`` for ``loss_type="hpt"``; the others train by RL."""
    r = _rewards(rewards)
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
        raise ValueError(f"threshold must be an int >= 0 (correct rollouts), got {threshold!r}")
    if not math.isfinite(success):
        raise ValueError(f"success must be a finite reward value, got {success!r}")
    g, num = _groups(r.numel(), group_ids, group_sizes, r.device)
    solved = torch.zeros(num, dtype=torch.float64, device=r.device).index_add(0, g, (r == success).to(torch.float64))
    return (solved <= threshold)[g]
