"""Equivalence cases of shared-prefix attention, shared by the tests and ``fusedpg verify``.

Each case runs the op, the dense reference at the input dtype (``torch_D``) and the float64 reference (truth) on
the same inputs and upstream gradient, and compares o, dq, dk, dv under the tolerance model (docs/design.md#tolerance-model).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..prefix.attention import shared_prefix_attention
from ..prefix.layout import PrefixLayout, place_groups
from ..prefix.reference import shared_prefix_attention_reference
from .tolerance import Comparison, compare


@dataclass(frozen=True)
class AttentionCase:
    """One packed batch: per group a prompt length and completion lengths; heads, head dim, dtype.
    ``max_row_len`` packs several groups per row; ``pad`` adds padding tokens at the end of every row."""

    prompt_lens: Tuple[int, ...] = (5,)
    completion_lens: Tuple[Tuple[int, ...], ...] = ((3, 7),)
    hq: int = 4
    hkv: int = 2
    d: int = 16
    dtype: torch.dtype = torch.float32
    max_row_len: Optional[int] = None
    pad: int = 2
    seed: int = 0

    @property
    def label(self) -> str:
        groups = ",".join(f"{p}|{'+'.join(map(str, c))}" for p, c in zip(self.prompt_lens, self.completion_lens))
        return f"[{groups}] h{self.hq}/{self.hkv} d{self.d}"


def case_layout(case: AttentionCase) -> PrefixLayout:
    rows, starts = (None, None) if case.max_row_len is None else place_groups(
        [p + sum(c) for p, c in zip(case.prompt_lens, case.completion_lens)], case.max_row_len)
    probe = PrefixLayout(case.prompt_lens, case.completion_lens, group_rows=rows, group_starts=starts)
    return PrefixLayout(case.prompt_lens, case.completion_lens, seq_len=probe.seq_len + case.pad,
                        group_rows=rows, group_starts=starts)


def make_inputs(case: AttentionCase, layout: PrefixLayout) -> Dict[str, torch.Tensor]:
    """float64 q, k, v as transformers passes them (transposed views of ``[B, S, H, D]``) and an upstream grad."""
    g = torch.Generator().manual_seed(case.seed)
    b, s = layout.n_rows, layout.seq_len
    q = torch.randn(b, s, case.hq, case.d, generator=g, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(b, s, case.hkv, case.d, generator=g, dtype=torch.float64).transpose(1, 2)
    v = torch.randn(b, s, case.hkv, case.d, generator=g, dtype=torch.float64).transpose(1, 2)
    do = torch.randn(b, case.hq, s, case.d, generator=g, dtype=torch.float64)
    # sharper softmax than plain randn: 2 * q makes masking mistakes visible in the outputs
    return dict(q=2 * q, k=k, v=v, do=do)


def run_attention(fn, inputs, dtype: torch.dtype, device="cpu") -> List[torch.Tensor]:
    """[o, dq, dk, dv] of ``fn(q, k, v)`` at ``dtype``; inputs keep their (non-contiguous) strides."""
    leaves = [inputs[n].to(device=device, dtype=dtype).detach().requires_grad_(True) for n in ("q", "k", "v")]
    o = fn(*leaves)
    grads = torch.autograd.grad((o.double() * inputs["do"].to(device)).sum(), leaves)
    return [o.detach()] + list(grads)


def check_attention(case: AttentionCase, impl: Optional[str] = None, device="cpu") -> List[Comparison]:
    layout = case_layout(case)
    inputs = make_inputs(case, layout)
    ours = run_attention(lambda q, k, v: shared_prefix_attention(q, k, v, layout, impl=impl), inputs,
                         case.dtype, device)
    eager = run_attention(lambda q, k, v: shared_prefix_attention_reference(q, k, v, layout, dtype=None), inputs,
                          case.dtype)
    truth = run_attention(lambda q, k, v: shared_prefix_attention_reference(q, k, v, layout), inputs, torch.float64)
    return [compare(f"shared_prefix_attention.{n} {case.label}", a, e, t, case.dtype)
            for n, a, e, t in zip(("o", "dq", "dk", "dv"), ours, eager, truth)]


#: Small but awkward: G = 1, 2, 5; unequal lengths; prompt length 1; several groups (also in one row); GQA, MQA,
#: MHA; head dims 16 and 80 (not a power of two); lengths straddling 16-token tiles.
CASES: Tuple[AttentionCase, ...] = (
    AttentionCase(prompt_lens=(7,), completion_lens=((9,),), hq=2, hkv=2),
    AttentionCase(prompt_lens=(5,), completion_lens=((3, 12),), hq=4, hkv=2, d=80),
    AttentionCase(prompt_lens=(1, 6), completion_lens=((2, 1, 4, 6, 3), (17, 2)), hq=4, hkv=1),
    AttentionCase(prompt_lens=(3, 2, 4), completion_lens=((2, 5), (1,), (3, 1)), hq=6, hkv=2, max_row_len=24),
)


def verify_cases(device: str = "cpu", impl: Optional[str] = None,
                 dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16, torch.float16),
                 cases: Sequence[AttentionCase] = CASES) -> List[Comparison]:
    """Comparisons of o, dq, dk, dv against the float64 reference for every case and dtype (``fusedpg verify``).

    ``impl=None`` picks by device (Triton on CUDA, torch on CPU); the Triton kernels run on CPU only under
    ``TRITON_INTERPRET=1``.
    """
    return [r for dtype in dtypes for case in cases for r in check_attention(replace(case, dtype=dtype), impl, device)]
