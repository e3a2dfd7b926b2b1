"""The public shared-prefix attention op: validation, defaults, dispatch."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import checks
from ..backend import resolve_impl
from .op import shared_prefix_attention_op
from .layout import PrefixLayout
from .reference import shared_prefix_attention_reference


def _shape(x: torch.Tensor) -> str:
    return f"shape {tuple(x.shape)}"


def check_inputs(q, k, v, layout) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument when q, k, v and the layout disagree."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        checks.floating(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq_len, head_dim] (transformers' layout), "
                             f"got {_shape(x)}")
    if not isinstance(layout, PrefixLayout):
        raise TypeError(f"layout must be a fusedpg.prefix.PrefixLayout (from pack()), got {type(layout).__name__}")
    for name, x in (("k", k), ("v", v)):
        checks.same_dtype(name, x, "q", q)
        checks.same_device(name, x, "q", q)
    b, hq, s, d = q.shape
    if b != layout.n_rows:
        raise ValueError(f"q must have layout.n_rows = {layout.n_rows} rows in dim 0 (one per packed row), "
                         f"got {_shape(q)}")
    if s != layout.seq_len:
        raise ValueError(f"q must have layout.seq_len = {layout.seq_len} tokens in dim 2 (the packed row length), "
                         f"got {_shape(q)}")
    if d == 0:
        raise ValueError(f"q must have a head dim >= 1, got {_shape(q)}")
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(f"k must be [{b}, Hkv, {s}, {d}] to match q ({_shape(q)}), got {_shape(k)}")
    if k.shape[1] == 0 or hq % k.shape[1] != 0:
        raise ValueError(f"k must have a number of heads that divides q's {hq} heads (GQA), got {_shape(k)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {_shape(v)}")


def shared_prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: PrefixLayout,
    *,
    scale: Optional[float] = None,
    impl: Optional[str] = None,
    check_finite: Optional[bool] = None,
) -> torch.Tensor:
    """Causal attention over packed GRPO groups where every completion attends to its group's single prompt copy.

    Query ``i`` sees key ``j`` when both are in the same group, ``j <= i``, and ``j`` is in the prompt or in the
    completion of ``i``: the prompt attends causally to itself, each completion to the whole prompt and causally to
    itself, and never to another completion. The result equals causal attention over the repeated rows
    ``[prompt | completion_g]``, with the prompt's K/V read once; its dk/dv are the sum over the group.

    Args:
        q: ``[B, Hq, S, D]`` with ``B = layout.n_rows``, ``S = layout.seq_len``; any strides (transformers passes
            transposed views). bf16, fp16, fp32; fp64 runs on the torch plan (for gradcheck).
        k, v: ``[B, Hkv, S, D]``, ``Hq % Hkv == 0`` (GQA: query head ``h`` reads K/V head ``h // (Hq // Hkv)``;
            K/V are never repeated).
        layout: from ``fusedpg.prefix.pack`` (or ``PrefixLayout``).
        scale: factor on ``q @ k.T``; default ``D ** -0.5``.
        impl: ``"triton"``, ``"torch"`` or ``"reference"``; default from ``FUSEDPG_IMPL``, else by device.
        check_finite: raise on NaN/inf in q, k or v on a token of the layout (padding is exempt), naming the tensor
            and index; default off unless ``FUSEDPG_CHECK_FINITE=1``.

    Returns:
        ``[B, Hq, S, D]`` at q's dtype (a view of a ``[B, S, Hq, D]`` buffer), zero on padding rows,
        differentiable w.r.t. q, k and v.

    Equivalent PyTorch (dense; ``visibility`` in ``fusedpg.prefix.reference``)::

        r = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
        s = (q @ k.transpose(-1, -2)) * scale
        s = s.masked_fill(~visibility(layout)[:, None], float("-inf"))
        out = torch.softmax(s, -1).nan_to_num(0.0) @ v
    """
    check_inputs(q, k, v, layout)
    if checks.finite_enabled(check_finite):
        tokens = (layout.labels(q.device)[0] >= 0)[:, None]  # [B, 1, S]: every head of a real token
        for name, x in (("q", q), ("k", k), ("v", v)):
            checks.finite(name, x, tokens)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
    impl = resolve_impl(impl, q.device)
    if impl == "reference":
        return shared_prefix_attention_reference(q, k, v, layout, float(scale), dtype=None)
    if impl == "triton" and q.dtype == torch.float64:
        impl = "torch"
    return shared_prefix_attention_op(q, k, v, list(layout.spec), float(scale), impl)[0]
