"""Case ``attention``: shared-prefix attention of one GRPO group, forward and backward (gradients to q, k, v).

Shape ``P+LxG:HQ/HKVxD``: one prompt of P tokens, G completions of L tokens, HQ query and HKV key/value heads (GQA)
of dimension D. Every impl computes the same per-token outputs; they differ in what they attend over:

* ``ours``: ``fusedpg.shared_prefix_attention`` on the packed row ``[prompt | completion_1 | ... | completion_G]``
  (P + G·L tokens; the prompt's keys and values exist once);
* ``sdpa`` (the baseline): ``torch.nn.functional.scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` on
  the repeated batch ``[prompt | completion_g]`` x G (G·(P+L) tokens), what a trainer without prefix sharing runs;
* ``flex``: FlexAttention (compiled) on the packed row with a shared-prefix block mask (CUDA only; missing where
  ``torch.nn.attention.flex_attention`` is not importable).

The inputs of both layouts are generated up front and count as inputs (in a model they are the projections'
outputs, G times larger on the prompt for the repeated batch); peak memory above them is scratch plus dq, dk, dv.
Useful FLOPs are those of the grouped pairs (4·pairs·D·HQ forward, 2.5x that backward, FlashAttention's
convention); every row carries the ideal FLOP ratio repeated/grouped next to the measured one.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

import fusedpg
from fusedpg.prefix import PrefixLayout

from .registry import Case, Impl, Inputs, register_case

FLEX_MODULE = "torch.nn.attention.flex_attention"


@dataclass(frozen=True)
class AttnShape:
    prompt: int
    completion: int
    g: int
    hq: int = 4
    hkv: int = 2
    d: int = 64

    @property
    def label(self) -> str:
        return f"{self.prompt}+{self.completion}x{self.g}:{self.hq}/{self.hkv}x{self.d}"

    # n, h, v: the common row columns (tokens of the repeated batch, model width, no vocabulary).
    @property
    def n(self) -> int:
        return self.g * (self.prompt + self.completion)

    @property
    def h(self) -> int:
        return self.hq * self.d

    v = 0

    @property
    def series(self) -> str:
        return f"P={self.prompt} G={self.g} heads {self.hq}/{self.hkv} d{self.d}"

    @property
    def grouped_tokens(self) -> int:
        return self.prompt + self.g * self.completion

    def pairs(self, repeated: bool) -> int:
        """Causal (query, key) pairs that are computed (diagonal included)."""
        p, l, g = self.prompt, self.completion, self.g
        prompt = p * (p + 1) // 2
        completion = p * l + l * (l + 1) // 2
        return g * (prompt + completion) if repeated else prompt + g * completion

    @property
    def ideal_ratio(self) -> float:
        return self.pairs(True) / self.pairs(False)

    def fields(self) -> Dict[str, object]:
        return {"prompt_len": self.prompt, "completion_len": self.completion, "group_size": self.g,
                "heads_q": self.hq, "heads_kv": self.hkv, "head_dim": self.d,
                "ideal_flop_ratio": self.ideal_ratio,
                "analytic": f"ideal FLOP ratio repeated/grouped = {self.ideal_ratio:.2f}x "
                            f"(attention pairs; tokens {self.n} -> {self.grouped_tokens})"}


_FORM = re.compile(r"\s*(\d+)\s*\+\s*(\d+)\s*x\s*(\d+)\s*(?::\s*(\d+)\s*/\s*(\d+)\s*x\s*(\d+)\s*)?")


def parse_shape(text: str):
    m = _FORM.fullmatch(text)
    if not m:
        raise ValueError(f"attention shapes look like P+LxG or P+LxG:HQ/HKVxD (e.g. 2048+256x16:32/8x128), "
                         f"got {text!r}")
    p, l, g = (int(x) for x in m.groups()[:3])
    heads = tuple(int(x) for x in m.groups()[3:]) if m.group(4) else ()
    shape = AttnShape(p, l, g, *heads)
    if min(p, l, g, shape.hq, shape.hkv, shape.d) < 1 or shape.hq % shape.hkv:
        raise ValueError(f"attention shape {text!r}: every size >= 1 and HQ a multiple of HKV")
    return [shape]


def adapt(shape):
    return [shape] if isinstance(shape, AttnShape) else []


def flops(shape: AttnShape, mode: str) -> Optional[float]:
    fwd = 4.0 * shape.pairs(False) * shape.d * shape.hq
    return {"fwd": fwd, "fwd-nograd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}.get(mode)


def layout_of(shape: AttnShape) -> PrefixLayout:
    return PrefixLayout([shape.prompt], [[shape.completion] * shape.g])


def make_inputs(shape: AttnShape, dtype: torch.dtype, device: torch.device, seed: int) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    s, t, g, d = shape.grouped_tokens, shape.prompt + shape.completion, shape.g, shape.d

    def rnd(*size):
        return torch.randn(*size, generator=gen, device=device, dtype=dtype)

    # Packed [1, H, S, D] and repeated [G, H, P+L, D]: the repeated rows hold the same prompt in every copy.
    q, k, v = rnd(1, shape.hq, s, d), rnd(1, shape.hkv, s, d), rnd(1, shape.hkv, s, d)

    def repeat(x):
        prompt = x[:, :, :shape.prompt].expand(g, -1, -1, -1)
        comps = x[0, :, shape.prompt:].unflatten(1, (g, shape.completion)).transpose(0, 1)
        return torch.cat([prompt, comps], dim=2).contiguous()

    qr, kr, vr = repeat(q), repeat(k), repeat(v)
    return Inputs(
        leaves={"q": q.requires_grad_(), "k": k.requires_grad_(), "v": v.requires_grad_(),
                "q_rep": qr.requires_grad_(), "k_rep": kr.requires_grad_(), "v_rep": vr.requires_grad_()},
        extra={"g_out": rnd(1, shape.hq, s, d), "g_out_rep": rnd(g, shape.hq, t, d)},
    )


def _ours(inp: Inputs, shape: AttnShape):
    layout = layout_of(shape)
    q, k, v, g = inp["q"], inp["k"], inp["v"], inp["g_out"]
    return lambda: ((fusedpg.shared_prefix_attention(q, k, v, layout),), (g,))


def _sdpa(inp: Inputs, shape: AttnShape):
    q, k, v, g = inp["q_rep"], inp["k_rep"], inp["v_rep"], inp["g_out_rep"]
    gqa = shape.hq != shape.hkv
    return lambda: ((F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa),), (g,))


@functools.lru_cache(maxsize=None)
def _flex_compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex(inp: Inputs, shape: AttnShape):
    from torch.nn.attention.flex_attention import create_block_mask

    q, k, v, g = inp["q"], inp["k"], inp["v"], inp["g_out"]
    seg, pre = layout_of(shape).labels(q.device)
    seg, pre = seg[0], pre[0]

    def shared_prefix(b, h, qi, kj):
        return (kj <= qi) & (seg[kj] >= 0) & ((seg[kj] == seg[qi]) | (seg[kj] == pre[qi]))

    s = q.shape[2]
    block_mask = create_block_mask(shared_prefix, None, None, s, s, device=q.device)
    fn = _flex_compiled()
    gqa = shape.hq != shape.hkv
    return lambda: ((fn(q, k, v, block_mask=block_mask, enable_gqa=gqa),), (g,))


GPU_HEADS = dict(hq=32, hkv=8, d=128)
CASE = register_case(Case(
    name="attention",
    description="shared-prefix attention of one group (fusedpg.shared_prefix_attention) vs SDPA on the repeated batch",
    make_inputs=make_inputs,
    flops=flops,
    parse_shape=parse_shape,
    adapt=adapt,
    shape_form="P+LxG[:HQ/HKVxD] (default heads 4/2x64)",
    modes=("fwd+bwd", "fwd"),
    presets={
        ("cpu", False): (AttnShape(256, 32, 4), AttnShape(512, 64, 8)),
        ("cpu", True): (AttnShape(256, 32, 4),),
        ("cuda", False): tuple(AttnShape(2048, l, g, **GPU_HEADS) for g in (8, 16) for l in (256, 512)),
        ("cuda", True): (AttnShape(1024, 128, 8, **GPU_HEADS),),
    },
    impls=(
        Impl("ours", _ours, role="ours", note="packed row, prompt K/V once"),
        Impl("sdpa", _sdpa, role="baseline", note="SDPA causal on the repeated batch (prompt x G)"),
        Impl("flex", _flex, devices=("cuda",), requires=(FLEX_MODULE,), compiles=True,
             note="compiled FlexAttention, shared-prefix block mask on the packed row"),
    ),
))
