"""Case ``model``: one GRPO loss step (forward and backward to every parameter) of a randomly initialised
transformers model built from a config (nothing is downloaded).

Shape ``MODEL:P+LxG``: one prompt of P tokens and G completions of L tokens. Models: ``tiny-qwen2`` (hidden 64,
2 layers, 4/2 heads, vocabulary 1024: the CPU shape) and ``qwen2-0.5b`` (Qwen2-0.5B's shape: hidden 896, 24 layers,
14/2 heads, intermediate 4864, vocabulary 151936, tied embeddings: the GPU shape).

The loss is GRPO with the k3 KL to a reference policy (beta 0.04), advantages per completion, ``old_logp`` and
``ref_logp`` near the current policy. Impls, all on the same model object (built with
``attn_implementation=register_transformers()``, which without a layout computes exactly what ``sdpa`` does):

* ``eager`` (the baseline): the repeated batch ``[prompt | completion_g]`` x G with standard (SDPA) attention, the
  model's ordinary logits for the completion positions (``logits_to_keep=L+1``, as TRL does), upcast, log_softmax,
  gather, entropy, ``fusedpg.pg_loss``;
* ``fused-loss``: the same repeated batch, but the loss straight from the hidden states
  (``fusedpg.fused_linear_pg_loss``): isolates what the loss kernel saves;
* ``ours``: the packed group (``fusedpg.prefix.pack``, shared-prefix attention) and the fused loss from the hidden
  states: the prompt is encoded once for its G completions.

The analytic figure next to the measured ratio: the repeated batch runs every per-token op (projections, MLP,
norms) on G·P prompt tokens, the grouped one on P, saving (G-1)/G of the prompt's per-token FLOPs; the row also
gives the whole step's ideal FLOP ratio (per-token ops + attention pairs + LM head over the completion tokens).
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Dict, Optional

import torch

import fusedpg
from fusedpg.logits.reference import logprob_entropy_reference

from .registry import Case, Impl, Inputs, register_case

#: Architecture of each named model (transformers Qwen2Config keywords).
MODELS: Dict[str, dict] = {
    "tiny-qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=False),
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                       rms_norm_eps=1e-6),
}
LOSS = dict(loss_type="grpo", beta=0.04)
POLICY_NOISE = 0.05


@dataclass(frozen=True)
class ModelShape:
    model: str
    prompt: int
    completion: int
    g: int

    @property
    def label(self) -> str:
        return f"{self.model}:{self.prompt}+{self.completion}x{self.g}"

    @property
    def arch(self) -> dict:
        return MODELS[self.model]

    @property
    def n(self) -> int:  # tokens of the repeated batch
        return self.g * (self.prompt + self.completion)

    @property
    def h(self) -> int:
        return self.arch["hidden_size"]

    @property
    def v(self) -> int:
        return self.arch["vocab_size"]

    @property
    def series(self) -> str:
        return f"{self.model} P={self.prompt} G={self.g}"

    def step_flops(self, repeated: bool) -> float:
        """Forward FLOPs of the step: per-token matmuls, attention pairs, LM head on the completion tokens."""
        a = self.arch
        hid, inter, layers = a["hidden_size"], a["intermediate_size"], a["num_hidden_layers"]
        hq, hkv = a["num_attention_heads"], a["num_key_value_heads"]
        d = hid // hq
        per_token = 2.0 * layers * (hid * d * (hq + 2 * hkv) + hq * d * hid + 3 * hid * inter)
        p, l, g = self.prompt, self.completion, self.g
        prompt_pairs, comp_pairs = p * (p + 1) // 2, p * l + l * (l + 1) // 2
        pairs = g * (prompt_pairs + comp_pairs) if repeated else prompt_pairs + g * comp_pairs
        tokens = g * (p + l) if repeated else p + g * l
        return per_token * tokens + 4.0 * layers * pairs * d * hq + 2.0 * g * l * hid * a["vocab_size"]

    def fields(self) -> Dict[str, object]:
        saved = (self.g - 1) / self.g
        ratio = self.step_flops(True) / self.step_flops(False)
        return {"model": self.model, "prompt_len": self.prompt, "completion_len": self.completion,
                "group_size": self.g, "prompt_flops_saved": saved, "ideal_flop_ratio": ratio,
                "analytic": f"prompt FLOPs saved = (G-1)/G = {100 * saved:.1f}% of the prompt's per-token FLOPs "
                            f"(prompt tokens {self.g * self.prompt} -> {self.prompt}); ideal step FLOP ratio "
                            f"repeated/grouped = {ratio:.2f}x"}


_FORM = re.compile(r"\s*(?:([a-z0-9.\-]+)\s*:\s*)?(\d+)\s*\+\s*(\d+)\s*x\s*(\d+)\s*")


def parse_shape(text: str):
    m = _FORM.fullmatch(text)
    if not m:
        raise ValueError(f"model shapes look like [MODEL:]P+LxG (MODEL in {sorted(MODELS)}), got {text!r}")
    name = m.group(1) or "tiny-qwen2"
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    p, l, g = (int(x) for x in m.groups()[1:])
    if min(p, l, g) < 1:
        raise ValueError(f"model shape {text!r}: P, L and G must be >= 1")
    return [ModelShape(name, p, l, g)]


def adapt(shape):
    return [shape] if isinstance(shape, ModelShape) else []


def flops(shape: ModelShape, mode: str) -> Optional[float]:
    fwd = shape.step_flops(False)  # useful work: the grouped step
    return {"fwd": fwd, "fwd-nograd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}.get(mode)


def _build_model(shape: ModelShape, dtype: torch.dtype, device: torch.device):
    import transformers

    from fusedpg.prefix import register_transformers

    name = register_transformers()
    config = transformers.Qwen2Config(max_position_embeddings=max(4096, shape.prompt + shape.completion),
                                      attention_dropout=0.0, use_sliding_window=False, **copy.deepcopy(shape.arch))
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=name)
    return model.to(dtype).train()


def make_inputs(shape: ModelShape, dtype: torch.dtype, device: torch.device, seed: int) -> Inputs:
    from fusedpg.prefix import pack

    model = _build_model(shape, dtype, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    p, l, g = shape.prompt, shape.completion, shape.g
    prompt = torch.randint(0, shape.v, (p,), generator=gen, device=device)
    comps = torch.randint(0, shape.v, (g, l), generator=gen, device=device)
    packed = pack([prompt], [list(comps.unbind(0))], device=device)
    repeated = torch.cat([prompt.expand(g, p), comps], dim=1)
    positions = torch.arange(p + l, device=device).expand(g, -1)
    mask = torch.ones(g, l, device=device)
    advantages = torch.randn(g, generator=gen, device=device)
    with torch.no_grad():  # the current policy's log-probs (grouped forward), then old/ref policies near them
        rows = packed.layout.unpack(model.model(**packed.model_kwargs()).last_hidden_state, padded=True)
        logp, _ = fusedpg.linear_logprob_entropy(rows, model.lm_head.weight, comps)
    logp = logp.float()
    old = logp + POLICY_NOISE * torch.randn(g, l, generator=gen, device=device)
    ref = logp + POLICY_NOISE * torch.randn(g, l, generator=gen, device=device)
    params = {n: prm for n, prm in model.named_parameters() if prm.requires_grad}
    return Inputs(leaves=params, extra={
        "model": model, "packed": packed, "repeated": repeated, "positions": positions, "targets": comps,
        "mask": mask, "advantages": advantages, "old_logp": old, "ref_logp": ref,
        "one": torch.ones((), device=device)})


def _loss_kwargs(inp: Inputs) -> dict:
    return dict(old_logp=inp["old_logp"], ref_logp=inp["ref_logp"], **LOSS)


def _repeated_hidden(inp: Inputs, shape: ModelShape):
    out = inp["model"].model(input_ids=inp["repeated"], position_ids=inp["positions"], use_cache=False)
    return out.last_hidden_state[:, shape.prompt - 1:-1]  # the rows that predict the completion tokens


def _eager(inp: Inputs, shape: ModelShape):
    model, y, mask, adv, kw, one = (inp["model"], inp["targets"], inp["mask"], inp["advantages"], _loss_kwargs(inp),
                                    inp["one"])
    keep = shape.completion + 1

    def fn():
        logits = model(input_ids=inp["repeated"], position_ids=inp["positions"], use_cache=False,
                       logits_to_keep=keep).logits[:, :-1]
        logp, ent = logprob_entropy_reference(logits, y, dtype=None)
        return (fusedpg.pg_loss(logp, adv, mask, entropy=ent, **kw)[0],), (one,)

    return fn


def _fused_loss(inp: Inputs, shape: ModelShape):
    model, y, mask, adv, kw, one = (inp["model"], inp["targets"], inp["mask"], inp["advantages"], _loss_kwargs(inp),
                                    inp["one"])

    def fn():
        rows = _repeated_hidden(inp, shape)
        return (fusedpg.fused_linear_pg_loss(rows, model.lm_head.weight, y, adv, mask, **kw)[0],), (one,)

    return fn


def _ours(inp: Inputs, shape: ModelShape):
    model, packed, y, mask, adv, kw, one = (inp["model"], inp["packed"], inp["targets"], inp["mask"],
                                            inp["advantages"], _loss_kwargs(inp), inp["one"])

    def fn():
        hidden = model.model(**packed.model_kwargs()).last_hidden_state
        rows = packed.layout.unpack(hidden, padded=True)  # [G, L, H]
        return (fusedpg.fused_linear_pg_loss(rows, model.lm_head.weight, y, adv, mask, **kw)[0],), (one,)

    return fn


CASE = register_case(Case(
    name="model",
    description="one GRPO loss step of a random transformers Qwen2: repeated batch + logits vs grouped prompt "
                "(fusedpg.prefix) + fused loss",
    make_inputs=make_inputs,
    flops=flops,
    parse_shape=parse_shape,
    adapt=adapt,
    shape_form=f"[MODEL:]P+LxG (MODEL {'/'.join(MODELS)}, default tiny-qwen2)",
    modes=("fwd+bwd",),
    presets={
        ("cpu", False): (ModelShape("tiny-qwen2", 128, 32, 4),),
        ("cpu", True): (ModelShape("tiny-qwen2", 128, 32, 4),),
        # G=16 is the shape; its repeated baseline needs ~70 GB of activations without checkpointing and
        # may report oom on an 80 GB card, so G=8 comes first (both rows are kept).
        ("cuda", False): (ModelShape("qwen2-0.5b", 2048, 256, 8), ModelShape("qwen2-0.5b", 2048, 256, 16)),
        ("cuda", True): (ModelShape("qwen2-0.5b", 512, 128, 4),),
    },
    impls=(
        Impl("ours", _ours, role="ours", requires=("transformers",),
             note="packed group, shared-prefix attention, fused loss from hidden states"),
        Impl("eager", _eager, role="baseline", requires=("transformers",),
             note="repeated batch, SDPA, logits (logits_to_keep=L+1), log_softmax, pg_loss"),
        Impl("fused-loss", _fused_loss, requires=("transformers",),
             note="repeated batch, SDPA, fused loss from hidden states"),
    ),
))
