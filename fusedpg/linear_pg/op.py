"""The custom op of ``fused_linear_pg_loss``: the one implementation that eager calls and ``torch.compile`` run.

``fusedpg::fused_linear_pg_loss`` returns ``[loss, metric sums, dh, dW, db, logp, entropy]``: the gradients are
formed inside the op (one pass, or the two-phase plan's recompute), the autograd formula only scales them by the
incoming gradient. The metric sums travel as one vector whose keys, ``metric_keys``, are derived from the loss layer
itself (``token_loss`` on a one-token probe with the same options and inputs), so eager and compiled calls return
the same dictionary.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import List, Optional, Tuple

import torch

from .. import checks
from ..compile_support import constant_result
from ..host import HostReads
from ..objective import (LossInputs, PGLossConfig, batch_coefficients, make_config, metric_vector, plan_of, prepare,
                         token_loss)
from ..objective.batch import prepare_pending
from ..softmax_math import compute_dtype
from ..temperature import Temperature
from .driver import one_pass, two_phase


@constant_result
def config_key(config: Optional[PGLossConfig], loss_type: Optional[str], options: Tuple) -> str:
    """The JSON text naming the resolved ``PGLossConfig``: the op's one non-tensor loss argument."""
    return _key_of(make_config(config, loss_type, **dict(options)))


@functools.lru_cache(maxsize=256)
def _key_of(cfg: PGLossConfig) -> str:
    return json.dumps({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, sort_keys=True)


@constant_result
def plan_for(key: str, requested: Optional[str]) -> str:
    """``"one_pass"``, ``"sequence"`` or ``"two_phase"``: the config's plan, or the requested one where allowed
    (any config may run two-phase; a two-phase config cannot run in one pass)."""
    auto = plan_of(config_of(key))
    if requested not in (None, "one_pass", "sequence", "two_phase"):
        raise ValueError(f"plan must be None, 'one_pass', 'sequence' or 'two_phase', got {requested!r}")
    if requested in ("one_pass", "sequence") and auto == "two_phase":
        raise ValueError(f"plan={requested!r} is impossible for loss_type={config_of(key).loss_type!r} with these "
                         "options: it needs current-policy reductions over the batch (two_phase)")
    return "two_phase" if requested == "two_phase" else auto


@functools.lru_cache(maxsize=256)
def config_of(key: str) -> PGLossConfig:
    return PGLossConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(key).items()})


@constant_result
def metric_keys(key: str, present: Tuple[str, ...]) -> Tuple[str, ...]:
    """The metric-sum keys ``token_loss`` produces for these options and present inputs, in a fixed order."""
    return _metric_keys(key, present)


@functools.lru_cache(maxsize=1024)
def _metric_keys(key: str, present: Tuple[str, ...]) -> Tuple[str, ...]:
    cfg = config_of(key)
    shape = (1,) if "seq_ids" in present else (1, 1)
    per_seq = {"group_ids": torch.zeros(1, dtype=torch.long), "truncated": torch.zeros(1, dtype=torch.bool),
               "seq_ids": torch.zeros(1, dtype=torch.long), "step_ids": torch.zeros(shape, dtype=torch.long)}
    probe = LossInputs(**{n: per_seq.get(n, torch.full(shape, -1.0 if n.endswith("logp") else 1.0))
                          for n in present})
    adv = torch.zeros(1)
    batch = prepare(adv, torch.ones(shape), probe, config=cfg)
    lp, ent = torch.full((1,), -1.0), torch.ones(1)
    if plan_of(cfg) == "two_phase":
        batch = batch.updated(batch_coefficients(batch, lp, ent, cfg))
    return tuple(sorted(token_loss(batch, lp, ent, cfg)[1]))


def _loss_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The working precision of the loss math: fp64 for an fp64 head, else fp32. Loss inputs in fp64 (advantages
    built from numpy rewards) are cast to it, so they give the fp32-input result instead of a dtype clash."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


@torch.library.custom_op("fusedpg::fused_linear_pg_loss", mutates_args=())
def fused_linear_pg_loss_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
    advantages: torch.Tensor, mask: torch.Tensor, inputs: List[Optional[torch.Tensor]],
    temp_rows: Optional[torch.Tensor], temp_value: float, config: str, impl: str, chunk_bytes: int, plan: str,
    need_hidden: bool, need_weight: bool, need_bias: bool, token_stats: bool,
) -> List[torch.Tensor]:
    """hidden ``[N, H]``, targets ``[N]``, mask (and the loss inputs) in the caller's shapes ->
    [loss (0-dim), metric sums (``len(metric_keys)``), dh, dW, db, logp ``[N]``, entropy ``[N]``]; entries that
    are not needed are empty."""
    cfg = config_of(config)
    bundle = LossInputs.from_list(inputs)
    dtype = _loss_dtype(hidden)
    # The call's one host read (README.md#host-synchronisation): prepare's flags and packed sequence starts, the
    # active tokens per sequence (chunk planning), the targets and temperature checks, all queued, then read once.
    reads = HostReads()
    pending = prepare_pending(advantages, mask, bundle, reads, dtype=dtype, config=cfg, count_active=True)
    y = targets.reshape(-1)
    checks.targets_in_range(y, weight.shape[0], None, reads=reads, where=pending.active)
    temp = Temperature.of(temp_rows, temp_value)
    checks.temperature_values(temp, reads=reads)
    reads.read()
    batch = pending.finish()
    needs = (need_hidden, need_weight, need_bias and bias is not None)
    run = two_phase if plan == "two_phase" else one_pass
    res = run(hidden, weight, bias, y, temp, batch, cfg, impl, chunk_bytes, needs)
    sums = metric_vector(res.sums, _metric_keys(config, bundle.present()), dtype, hidden.device)
    grads = [hidden.new_empty(0) if not need else (torch.zeros_like(x) if g is None else g.to(x.dtype))
             for g, x, need in zip((res.dh, res.dw, res.db), (hidden, weight, bias), needs)]
    stats = [res.logp.to(dtype), res.entropy.to(dtype)] if token_stats else [hidden.new_empty(0)] * 2
    return [res.loss.to(dtype).clone(), sums] + grads + [s.clone() for s in stats]


@fused_linear_pg_loss_op.register_fake
def _(hidden, weight, bias, targets, advantages, mask, inputs, temp_rows, temp_value, config, impl, chunk_bytes, plan,
      need_hidden, need_weight, need_bias, token_stats):
    dtype = _loss_dtype(hidden)
    n_keys = len(_metric_keys(config, LossInputs.from_list(inputs).present()))
    need_bias = need_bias and bias is not None
    grads = [torch.empty_like(x) if need else hidden.new_empty(0)
             for x, need in ((hidden, need_hidden), (weight, need_weight), (bias, need_bias))]
    stats = [hidden.new_empty(hidden.shape[0], dtype=dtype) for _ in range(2)] if token_stats else \
        [hidden.new_empty(0)] * 2
    return [hidden.new_empty((), dtype=dtype), hidden.new_empty(n_keys, dtype=dtype)] + grads + stats


def _setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # the gradient outputs are never differentiated: no [V, H] zeros for them
    ctx.save_for_backward(*output[2:5])
    ctx.has_bias = inputs[2] is not None


def _backward(ctx, grads):
    grad_loss = grads[0]  # the op returns a list: its gradients arrive as one list
    need = ctx.needs_input_grad

    def scale(g, i):
        return g * grad_loss.to(g.dtype) if need[i] and g.numel() and grad_loss is not None else None

    dh, dw, db = ctx.saved_tensors
    return (scale(dh, 0), scale(dw, 1), scale(db, 2) if ctx.has_bias else None) + (None,) * 14


fused_linear_pg_loss_op.register_autograd(_backward, setup_context=_setup)
