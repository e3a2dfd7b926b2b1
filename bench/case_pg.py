"""Case ``pg``: the policy-gradient loss from hidden states, forward and backward (gradients to hidden and weight).

Shapes are ``NxHxV:loss_type`` with N = B x T tokens (T = 256 where N allows), for three loss types that cover the
plans of ``fused_linear_pg_loss``:

* ``dapo``: one pass, clip-higher (epsilon_high 0.28), token-sum / token-count aggregation, no KL;
* ``grpo``: one pass, with the k3 KL to a reference policy (beta = 0.04, ``ref_logp``);
* ``clip_cov``: two phase (statistics, a batch-wide covariance selection, a recompute backward).

Inputs are a realistic batch: per sequence a masked prompt head (5-15 % of T) and a masked padding tail (0-20 %),
about 20 % masked in all; one advantage per sequence; ``old_logp`` and ``ref_logp`` within ~0.05 nats of the current
policy (so ratios sit near 1 and some tokens clip).

Impls: ``ours`` (fusedpg.fused_linear_pg_loss), ``eager`` (fused_linear_pg_loss_reference with dtype=None:
materialised logits at the input dtype, upcast, log_softmax, gather, pg_loss: the baseline), ``compile``
(torch.compile of eager's materialised head, the loss on [N] eager; CUDA, CPU opt-in), ``liger`` (LigerFusedLinearGRPOLoss with the same settings, compiled as
its users run it on CUDA; CPU opt-in with compiled=False; dapo and grpo only) and ``floor`` (the three GEMMs of the
LM head; CUDA, CPU opt-in).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

import fusedpg
from fusedpg.linear_pg.reference import fused_linear_pg_loss_reference

from .case_linear import LOGIT_STD, _eager_fn as _linear_eager_fn, compiled, flops as linear_flops
from .registry import GPU_SHAPES, JUDGED_CPU, SMALL_CPU, Case, Impl, Inputs, Shape, register_case

LOSS_TYPES = ("dapo", "grpo", "clip_cov")
#: Seed methods measured on request (``--shape NxHxV:drpo``): pairs / groups of two sequences, binary rewards for
#: DRPO, every other sequence a demonstration for HPT. ``copo`` and ``knapsack`` are GRPO with COPO's blended
#: advantages (groups of 4, answer ids) or group-normalised advantages over Knapsack-sized ragged groups, the
#: estimator timed with the loss; ``otr`` samples 4 candidates per token (the eager impl: materialised logits and
#: ``torch.multinomial``), the batch's targets as ground truth.
EXTRA_LOSS_TYPES = ("drpo", "copg", "p3o", "hpt", "otr", "copo", "knapsack")
OTR_SAMPLES = 4
#: fusedpg options of each benchmarked loss type (the library's defaults of that type otherwise).
OURS_KW: Dict[str, dict] = {
    "dapo": {},
    "grpo": {"beta": 0.04},
    "clip_cov": {"seed": 0},  # Clip-Cov's random pick from a fixed seed: every impl and rep does the same work
}
#: LigerFusedLinearGRPOLoss settings with the same semantics (loss type, clip bounds, KL).
LIGER_KW: Dict[str, dict] = {
    "dapo": dict(loss_type="dapo", beta=0.0, use_ref_model=False, epsilon_low=0.2, epsilon_high=0.28),
    "grpo": dict(loss_type="grpo", beta=0.04, use_ref_model=True, epsilon_low=0.2, epsilon_high=0.2),
}
SEQ_LEN = 256
PROMPT_FRACTION = (0.05, 0.15)
PAD_FRACTION = (0.0, 0.2)
POLICY_NOISE = 0.05


@dataclass(frozen=True)
class PGShape:
    n: int
    h: int
    v: int
    loss: str

    @property
    def label(self) -> str:
        return f"{self.n}x{self.h}x{self.v}:{self.loss}"

    @property
    def series(self) -> str:
        return f"H={self.h} V={self.v} {self.loss}"

    @property
    def base(self) -> Shape:
        return Shape(self.n, self.h, self.v)

    def fields(self) -> Dict[str, object]:
        return {"loss_type": self.loss, "seq_len": seq_len(self.n)}


def seq_len(n: int, cap: int = SEQ_LEN) -> int:
    """T of the [B, T] batch: the largest divisor of n not above cap."""
    return max(t for t in range(1, min(n, cap) + 1) if n % t == 0)


def parse_shape(text: str):
    m = re.fullmatch(r"\s*([0-9x, ]+?)\s*(?::\s*([a-z0-9_]+)\s*)?", text)
    if not m:
        raise ValueError(f"pg shapes look like NxHxV or NxHxV:loss_type, got {text!r}")
    base = Shape.parse(m.group(1))
    if m.group(2) and m.group(2) not in LOSS_TYPES + EXTRA_LOSS_TYPES:
        raise ValueError(f"pg loss_type must be one of {LOSS_TYPES + EXTRA_LOSS_TYPES}, got {m.group(2)!r}")
    return adapt(base) if not m.group(2) else [PGShape(base.n, base.h, base.v, m.group(2))]


def adapt(shape):
    if isinstance(shape, PGShape):
        return [shape]
    if isinstance(shape, Shape):
        return [PGShape(shape.n, shape.h, shape.v, loss) for loss in LOSS_TYPES]
    return []


def make_inputs(shape: PGShape, dtype: torch.dtype, device: torch.device, seed: int) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)
    t = seq_len(shape.n)
    b = shape.n // t
    hidden = torch.randn(b, t, shape.h, generator=gen, device=device, dtype=dtype)
    weight = torch.randn(shape.v, shape.h, generator=gen, device=device, dtype=dtype).mul_(LOGIT_STD / shape.h ** 0.5)
    targets = torch.randint(0, shape.v, (b, t), generator=gen, device=device)
    u = torch.rand(b, 2, generator=gen, device=device)
    head = (t * (PROMPT_FRACTION[0] + u[:, 0] * (PROMPT_FRACTION[1] - PROMPT_FRACTION[0]))).long()
    tail = (t * (PAD_FRACTION[0] + u[:, 1] * (PAD_FRACTION[1] - PAD_FRACTION[0]))).long()
    pos = torch.arange(t, device=device)
    mask = ((pos >= head[:, None]) & (pos < (t - tail)[:, None])).float()
    mask[:, min(t - 1, int(head.max()))] = 1.0  # every sequence keeps at least one token
    advantages = torch.randn(b, generator=gen, device=device)
    with torch.no_grad():  # the current policy's log-probs, chunked: no [N, V] logits while building inputs
        logp, _ = fusedpg.linear_logprob_entropy(hidden, weight, targets)
    logp = logp.float()
    old = logp + POLICY_NOISE * torch.randn(b, t, generator=gen, device=device)
    ref = logp + POLICY_NOISE * torch.randn(b, t, generator=gen, device=device)
    return Inputs(leaves={"hidden": hidden.requires_grad_(), "weight": weight.requires_grad_()},
                  extra={"targets": targets, "mask": mask, "advantages": advantages, "old_logp": old, "ref_logp": ref,
                         "one": torch.ones((), device=device),
                         "pairs": torch.arange(b, device=device) // 2, "demos": torch.arange(b, device=device) % 2 == 0,
                         "success": torch.rand(max(1, b // 4), generator=gen, device=device).double()})


def flops(shape: PGShape, mode: str) -> Optional[float]:
    """Useful FLOPs of the LM head (6NHV for fwd+bwd over all N rows; the two-phase plan executes 8NHV, and ours
    skips masked rows: the useful count is the same for every impl)."""
    return linear_flops(shape.base, mode)


def _advantages(inp: Inputs, loss: str):
    """The advantages the loss sees; for copo / knapsack computed here, so the estimator is timed with the loss."""
    rewards = (inp["advantages"] > 0).float()  # binary rewards for the estimators that read them
    if loss == "drpo":
        return rewards
    if loss == "copo":
        b = rewards.shape[0]
        return fusedpg.advantages.copo_advantages(rewards, inp["pairs"] // 2, answer_ids=torch.arange(b, device=rewards.device) % 3)
    if loss == "knapsack":
        sizes = fusedpg.advantages.knapsack_group_sizes(inp["success"], rewards.shape[0], min_size=2)
        return fusedpg.advantages.group_normalized_advantages(rewards, group_sizes=sizes.tolist())
    return inp["advantages"]


def _args(inp: Inputs, loss: str = "dapo"):
    adv = None if loss == "otr" else _advantages(inp, loss)
    return (inp["hidden"], inp["weight"], inp["targets"], adv, inp["mask"])


def _kwargs(inp: Inputs, loss: str) -> dict:
    if loss == "otr":
        return dict(loss_type="otr", num_samples=OTR_SAMPLES, seed=0)
    loss = "grpo" if loss in ("copo", "knapsack") else loss
    kw = dict(old_logp=inp["old_logp"], ref_logp=inp["ref_logp"], loss_type=loss, **OURS_KW.get(loss, {}))
    if loss in ("drpo", "copg", "p3o"):
        kw["group_ids"] = inp["pairs"]
    if loss == "hpt":
        kw["truncated"] = inp["demos"]
    return kw


def _ours(inp: Inputs, shape: PGShape):
    kw, one = _kwargs(inp, shape.loss), inp["one"]
    return lambda: ((fusedpg.fused_linear_pg_loss(*_args(inp, shape.loss), **kw)[0],), (one,))


def _ours_low(inp: Inputs, shape: PGShape):
    kw, one = _kwargs(inp, shape.loss), inp["one"]
    return lambda: ((fusedpg.fused_linear_pg_loss(*_args(inp, shape.loss), memory="low", **kw)[0],), (one,))


def _eager_fn(h, w, y, adv, mask, old, ref, loss, **extra):
    return fused_linear_pg_loss_reference(h, w, y, adv, mask, dtype=None, old_logp=old, ref_logp=ref,
                                          loss_type=loss, **OURS_KW.get(loss, {}), **extra)[0]


def _eager_otr(h, w, labels, mask):
    """OTR as a trainer would write it: materialised logits, torch.multinomial, log_softmax, gather."""
    logp_all = torch.log_softmax((h @ w.T).float(), -1)
    tokens = torch.multinomial(logp_all.detach().exp().reshape(-1, logp_all.shape[-1]), OTR_SAMPLES,
                               replacement=True).reshape(*labels.shape, OTR_SAMPLES)
    r = torch.where(tokens == labels[..., None], 1.0, -0.1)
    valid = mask != 0
    return -((r * logp_all.gather(-1, tokens)).mean(-1) * valid).sum() / valid.sum().clamp(min=1)


def _eager(inp: Inputs, shape: PGShape):
    if shape.loss == "otr":
        h, w, y, _, mask = _args(inp, "otr")
        return lambda: ((_eager_otr(h, w, y, mask),), (inp["one"],))
    one, old, ref = inp["one"], inp["old_logp"], inp["ref_logp"]
    extra = {k: v for k, v in _kwargs(inp, shape.loss).items() if k in ("group_ids", "truncated")}
    loss = "grpo" if shape.loss in ("copo", "knapsack") else shape.loss
    return lambda: ((_eager_fn(*_args(inp, shape.loss), old, ref, loss, **extra),), (one,))


def _compile(inp: Inputs, shape: PGShape):
    """torch.compile of the eager head (logits, upcast, log_softmax, gather, entropy: all of the N x V work); the
    loss on the [N] results runs eagerly. Compiling the whole function trips an Inductor CPU codegen assertion on
    the loss's per-sequence scatter-add sums (torch 2.13), and the [N] loss is a negligible share of the time."""
    h, w, y, adv, mask = _args(inp, shape.loss)
    kw, one = _kwargs(inp, shape.loss), inp["one"]
    head = compiled(_linear_eager_fn)

    def fn():
        logp, ent = head(h, w, torch.where(mask.bool(), y, torch.zeros_like(y)))
        return (fusedpg.pg_loss(logp, adv, mask, entropy=ent, **kw)[0],), (one,)

    return fn


def _floor(inp: Inputs, shape: PGShape):
    h, w = inp["hidden"], inp["weight"]
    g = torch.empty(shape.n, shape.v, dtype=h.dtype, device=h.device).normal_()
    return lambda: ((F.linear(h.view(shape.n, shape.h), w),), (g,))


def _compile_applies(shape: PGShape, device: str) -> Optional[str]:
    return "OTR samples inside the head: no compiled eager form" if shape.loss == "otr" else None


def _liger_applies(shape: PGShape, device: str) -> Optional[str]:
    return None if shape.loss in LIGER_KW else f"LigerFusedLinearGRPOLoss has no {shape.loss}"


def _liger(inp: Inputs, shape: PGShape):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    h, w, y, adv, mask = _args(inp)
    kw = LIGER_KW[shape.loss]
    # compiled=True is how Liger's users run it (torch.compile of each chunk); the CPU opt-in runs it eagerly.
    loss_fn = LigerFusedLinearGRPOLoss(compiled=h.is_cuda, **kw)
    ref = inp["ref_logp"] if kw["use_ref_model"] else None
    old, one = inp["old_logp"], inp["one"]
    mask_l = mask.long()

    def fn():
        out = loss_fn(h, w, y, mask_l, adv, ref_per_token_logps=ref, old_per_token_logps=old)
        loss = out[0] if isinstance(out, (tuple, list)) else out
        return (loss,), (one.to(loss.dtype),)

    return fn


CASE = register_case(Case(
    name="pg",
    description="hidden [B,T,H], weight [V,H] -> PG loss (dapo / grpo+KL / two-phase clip_cov) and its gradients "
                "(fusedpg.fused_linear_pg_loss)",
    make_inputs=make_inputs,
    flops=flops,
    parse_shape=parse_shape,
    adapt=adapt,
    shape_form="NxHxV[:dapo|grpo|clip_cov; on request :drpo|copg|p3o|hpt|otr|copo|knapsack]",
    modes=("fwd+bwd",),
    presets={
        ("cpu", False): (PGShape(JUDGED_CPU.n, JUDGED_CPU.h, JUDGED_CPU.v, "dapo"),
                         *adapt(SMALL_CPU)),
        ("cpu", True): tuple(adapt(SMALL_CPU)),
        ("cuda", False): (*adapt(GPU_SHAPES[0]), PGShape(*(GPU_SHAPES[1].n, GPU_SHAPES[1].h, GPU_SHAPES[1].v), "dapo"),
                          PGShape(*(GPU_SHAPES[2].n, GPU_SHAPES[2].h, GPU_SHAPES[2].v), "dapo")),
        ("cuda", True): tuple(adapt(Shape(4096, 1024, 32000))),
    },
    impls=(
        Impl("ours", _ours, role="ours"),
        Impl("ours-low", _ours_low, note='memory="low": vocabulary-blocked backward'),
        Impl("eager", _eager, role="baseline", note="materialised logits, upcast, log_softmax, pg_loss"),
        Impl("floor", _floor, role="floor", devices=("cuda",), opt_in=("cpu",),
             note="3 GEMMs of the LM head (logits, d_hidden, d_weight); no softmax, no loss"),
        Impl("liger", _liger, devices=("cuda",), opt_in=("cpu",), requires=("liger_kernel",), grads_in_forward=True,
             compiles=True,
             applies=_liger_applies, note="LigerFusedLinearGRPOLoss, same loss settings; compiled on CUDA"),
        Impl("compile", _compile, devices=("cuda",), opt_in=("cpu",), compiles=True, applies=_compile_applies,
             note="torch.compile(eager head) + pg_loss on [N]"),
    ),
))
