"""Case ``trl``: one GRPO loss step of TRL's trainer — ``GRPOTrainer._compute_loss`` forward and backward to every
parameter on a hand-built batch of TRL ``inputs`` — through TRL's own path and through
``fusedpg.integrations.trl.FusedPGGRPOTrainer`` (with and without Prefix Grouper). Randomly initialised
transformers Qwen2 built from a config (nothing is downloaded).

Shape ``MODEL:P+LxGxK``: K prompts of up to P tokens, each with G completions of up to L tokens (B = K·G rows, TRL's
layout: the G completions of a prompt are consecutive rows). Models as in the ``model`` case (``tiny-qwen2``: the
CPU shape; ``qwen2-0.5b``: Qwen2-0.5B's shape, hidden 896, 24 layers, 14/2 heads, vocabulary 151936: the GPU shape).
The trailing ``xK`` is what tells this form from the ``model`` case's ``P+LxG``.

The batch is what ``_generate_and_score_completions`` hands the loss: prompts left-padded (prompt k is P − k·P/8
tokens long, at least one), completions right-padded with lengths spread over [L/2, L], one advantage per row,
``old_per_token_logps`` near the current policy (so ratios sit near 1 and some tokens clip), ``num_items_in_batch``.
Loss settings are GRPOConfig's defaults (``loss_type="dapo"``, ``beta=0``, epsilon 0.2, temperature 1) with
``gradient_checkpointing=False`` (as the ``model`` case; TRL's default turns it on).

Impls, all three trainers on the same model object (built with ``attn_implementation=register_transformers()``,
which without a layout computes exactly what ``sdpa`` does):

* ``trl`` (the baseline): ``trl.GRPOTrainer._compute_loss`` — TRL 1.16's chunked fused LM head for log-probs and
  entropy (its ``fused_lm_head`` forward), then its loss on ``[B, L]`` per-token tensors;
* ``ours``: ``FusedPGGRPOTrainer._compute_loss`` — backbone hidden states, ``fusedpg.fused_linear_pg_loss``;
* ``ours-prefix``: the same with ``prefix_grouper=True`` — each prompt encoded once for its G completions
  (``fusedpg.prefix``).

``--mode fwd-nograd`` times the old/reference-policy log-prob pass instead (``_get_per_token_logps_and_entropies``
under ``torch.no_grad``, as ``_generate_and_score_completions`` runs it): TRL's fused head against fusedpg's
(``linear_logprob_entropy``, grouped for ``ours-prefix``).

Without trl (``pip install fusedpg[trl]``) every impl is a "missing" row.
"""
from __future__ import annotations

import copy
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .case_model import MODELS, ModelShape
from .registry import Case, Impl, Inputs, register_case

POLICY_NOISE = 0.05
#: The tiny tokenizer's words (the trainer needs a processing class; only its pad/eos ids matter to the loss).
_WORDS = ("<pad>", "<eos>", "<unk>")


@dataclass(frozen=True)
class TRLShape:
    model: str
    prompt: int
    completion: int
    g: int
    k: int

    @property
    def label(self) -> str:
        return f"{self.model}:{self.prompt}+{self.completion}x{self.g}x{self.k}"

    @property
    def rows(self) -> int:
        return self.g * self.k

    @property
    def n(self) -> int:  # token positions of the padded [B, P + L] batch
        return self.rows * (self.prompt + self.completion)

    @property
    def h(self) -> int:
        return MODELS[self.model]["hidden_size"]

    @property
    def v(self) -> int:
        return MODELS[self.model]["vocab_size"]

    @property
    def series(self) -> str:
        return f"{self.model} P={self.prompt} G={self.g} K={self.k}"

    @property
    def group(self) -> ModelShape:
        return ModelShape(self.model, self.prompt, self.completion, self.g)

    def fields(self) -> Dict[str, object]:
        return {**self.group.fields(), "n_prompts": self.k, "batch_rows": self.rows}


_FORM = re.compile(r"\s*(?:([a-z0-9.\-]+)\s*:\s*)?(\d+)\s*\+\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*")


def parse_shape(text: str):
    m = _FORM.fullmatch(text)
    if not m:
        raise ValueError(f"trl shapes look like [MODEL:]P+LxGxK (MODEL in {sorted(MODELS)}), got {text!r}")
    name = m.group(1) or "tiny-qwen2"
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    p, l, g, k = (int(x) for x in m.groups()[1:])
    if min(p, l, g, k) < 1:
        raise ValueError(f"trl shape {text!r}: P, L, G and K must be >= 1")
    return [TRLShape(name, p, l, g, k)]


def adapt(shape):
    return [shape] if isinstance(shape, TRLShape) else []


def flops(shape: TRLShape, mode: str) -> Optional[float]:
    """Useful FLOPs at the nominal (unpadded, longest) lengths: K grouped steps of the ``model`` case."""
    fwd = shape.k * shape.group.step_flops(False)
    return {"fwd": fwd, "fwd-nograd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}.get(mode)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(_WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.padding_side = "left"
    return tok


def _build_model(shape: TRLShape, dtype: torch.dtype, device: torch.device):
    import transformers

    from fusedpg.prefix import register_transformers

    name = register_transformers()
    config = transformers.Qwen2Config(max_position_embeddings=max(4096, shape.prompt + shape.completion),
                                      attention_dropout=0.0, use_sliding_window=False, pad_token_id=0,
                                      eos_token_id=1, bos_token_id=1, **copy.deepcopy(MODELS[shape.model]))
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=name)
    return model.to(dtype).train()


def _trainers(model, shape: TRLShape, dtype: torch.dtype, device: torch.device) -> dict:
    import trl
    from datasets import Dataset

    from fusedpg.integrations.trl import FusedPGGRPOTrainer

    tok = _tokenizer()
    data = Dataset.from_dict({"prompt": ["<unk>"] * shape.rows})
    out = os.path.join(tempfile.gettempdir(), "fusedpg-bench-trl")
    made = {}
    for name, cls, kw in (("trl", trl.GRPOTrainer, {}), ("ours", FusedPGGRPOTrainer, {}),
                          ("ours-prefix", FusedPGGRPOTrainer, dict(prefix_grouper=True))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            args = trl.GRPOConfig(output_dir=out, report_to="none", save_strategy="no",
                                  use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16,
                                  fp16=dtype == torch.float16, per_device_train_batch_size=shape.rows,
                                  num_generations=shape.g, max_completion_length=shape.completion,
                                  gradient_checkpointing=False, dataloader_num_workers=0, logging_steps=1)
            trainer = cls(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                          train_dataset=data, processing_class=tok, **kw)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop; one micro-step here
        made[name] = trainer
    return made


def _batch(shape: TRLShape, device: torch.device, gen: torch.Generator) -> dict:
    """TRL's ``inputs`` for the loss (without the old log-probs): K prompts x G completions, padded as TRL pads."""
    p, l, g, k, v = shape.prompt, shape.completion, shape.g, shape.k, shape.v
    prompt_ids = torch.zeros(shape.rows, p, dtype=torch.long, device=device)
    prompt_mask = torch.zeros_like(prompt_ids)
    for i in range(k):
        length = max(1, p - (i * p) // 8)
        ids = torch.randint(3, v, (length,), generator=gen, device=device)
        prompt_ids[i * g:(i + 1) * g, p - length:] = ids
        prompt_mask[i * g:(i + 1) * g, p - length:] = 1
    lengths = l // 2 + torch.randint(0, l - l // 2 + 1, (shape.rows,), generator=gen, device=device)
    lengths = lengths.clamp(1, l)
    lengths[0] = l
    completion_mask = (torch.arange(l, device=device)[None] < lengths[:, None]).long()
    completion_ids = torch.randint(3, v, (shape.rows, l), generator=gen, device=device) * completion_mask
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, advantages=torch.randn(shape.rows, generator=gen, device=device),
                num_items_in_batch=completion_mask.sum())


def make_inputs(shape: TRLShape, dtype: torch.dtype, device: torch.device, seed: int) -> Inputs:
    model = _build_model(shape, dtype, device)
    trainers = _trainers(model, shape, dtype, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    batch = _batch(shape, device, gen)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    am = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():  # the current policy's log-probs (fusedpg's no-grad pass), then old near them
        logp, _, _ = trainers["ours"]._get_per_token_logps_and_entropies(model, ids, am, shape.completion)
    noise = POLICY_NOISE * torch.randn(logp.shape, generator=gen, device=device)
    batch["old_per_token_logps"] = (logp.float() + noise) * batch["completion_mask"]
    params = {n: prm for n, prm in model.named_parameters() if prm.requires_grad}
    return Inputs(leaves=params, extra={"model": model, "trainers": trainers, "batch": batch, "ids": ids,
                                        "attention_mask": am, "one": torch.ones((), device=device)})


def _make(name: str):
    def prepare(inp: Inputs, shape: TRLShape):
        trainer, model, batch, one = inp["trainers"][name], inp["model"], inp["batch"], inp["one"]
        ids, am = inp["ids"], inp["attention_mask"]

        def fn():
            if not torch.is_grad_enabled():  # fwd-nograd: the old/ref log-prob pass of _generate_and_score_completions
                logp, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, am, shape.completion)
                return (logp,), (one,)
            for metrics in trainer._metrics.values():  # the logged lists would grow with every call
                metrics.clear()
            loss = trainer._compute_loss(model, dict(batch))
            return (loss,), (one.to(loss.dtype),)

        return fn

    return prepare


_REQUIRES = ("trl", "datasets", "transformers")

CASE = register_case(Case(
    name="trl",
    description="one GRPO loss step (the trainer's loss, forward and backward) of a random Qwen2 through TRL's "
                "GRPOTrainer vs fusedpg's FusedPGGRPOTrainer (fused loss from hidden states; + Prefix Grouper)",
    make_inputs=make_inputs,
    flops=flops,
    parse_shape=parse_shape,
    adapt=adapt,
    shape_form=f"[MODEL:]P+LxGxK (MODEL {'/'.join(MODELS)}, default tiny-qwen2; K prompts of G completions)",
    modes=("fwd+bwd",),
    presets={
        ("cpu", False): (TRLShape("tiny-qwen2", 128, 32, 4, 2),),
        ("cpu", True): (TRLShape("tiny-qwen2", 64, 16, 4, 2),),
        # B = 16 rows of 1536 tokens (~25k positions) and B = 8 of 2304: both fit TRL's path on an 80 GB card
        # without gradient checkpointing.
        ("cuda", False): (TRLShape("qwen2-0.5b", 1024, 512, 8, 2), TRLShape("qwen2-0.5b", 2048, 256, 8, 1)),
        ("cuda", True): (TRLShape("qwen2-0.5b", 512, 128, 4, 2),),
    },
    impls=(
        Impl("ours", _make("ours"), role="ours", requires=_REQUIRES,
             note="FusedPGGRPOTrainer._compute_loss: hidden states + fused_linear_pg_loss"),
        Impl("trl", _make("trl"), role="baseline", requires=_REQUIRES,
             note="trl.GRPOTrainer._compute_loss: TRL's chunked fused LM head, then its loss"),
        Impl("ours-prefix", _make("ours-prefix"), role="ours", requires=_REQUIRES,
             note="FusedPGGRPOTrainer(prefix_grouper=True): each prompt once, shared-prefix attention, fused loss"),
    ),
))
