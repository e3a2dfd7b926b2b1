"""The public ops as ``torch.library`` custom ops, so they run inside ``torch.compile(fullgraph=True)``.

Importing this module registers (namespace ``fusedpg``):

* ``fusedpg::linear_lpe`` / ``fusedpg::linear_lpe_backward`` — :func:`fusedpg.linear_logprob_entropy`;
* ``fusedpg::logits_lpe`` / ``fusedpg::logits_lpe_backward`` — :func:`fusedpg.logprob_entropy`;
* ``fusedpg::fused_pg_loss`` — :func:`fusedpg.fused_linear_pg_loss` (one-pass: the op returns the loss, the
  gradients it formed, and the metric vector; backward scales the gradients).

The public functions route here by themselves when ``torch.compiler.is_compiling()`` (eager calls are unchanged), so
``torch.compile(fn, fullgraph=True)`` over code that calls ``fusedpg.linear_logprob_entropy``,
``fusedpg.logprob_entropy`` or ``fusedpg.fused_linear_pg_loss`` traces without a graph break. Every
data-dependent check (target range, temperature values, the loss's input validation) runs inside the op, eagerly.

Compiled-path specifics (documented differences from eager):

* ``logprob_entropy(inplace_backward=True)`` is honoured as ``False`` (a custom op may not alias its input).
* ``fused_linear_pg_loss`` returns the metrics as a dict over the fixed key list :data:`METRIC_KEYS`; keys that
  the eager call would not produce for these options are ``NaN``. ``return_token_stats`` adds ``logp`` and
  ``entropy`` as in eager. The loss options must be Python constants (keywords or a ``PGLossConfig``).
* Gradients of ``fused_linear_pg_loss`` are formed in the forward for both plans (two-phase included).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import List, Optional, Sequence, Tuple

import torch

from .. import checks
from ..backend import resolve_impl
from ..options import LogProbOptions
from ..rows import Rows

__all__ = ["METRIC_KEYS", "linear_logprob_entropy_op", "logprob_entropy_op", "fused_linear_pg_loss_op",
           "config_key"]

#: Metric keys the compiled fused loss returns (in this order); those the eager call would not produce are NaN.
METRIC_KEYS = (
    "tokens", "seqs", "loss_policy", "loss_kl", "loss_entropy", "clip_low", "clip_high", "clip_region",
    "clip_low_min_seq", "clip_high_max_seq", "dual_clip", "ppo_kl", "kl", "entropy", "ratio_mean", "ratio_min",
    "ratio_max", "is_weight_mean", "is_weight_min", "is_weight_max", "opsm_kept", "entropy_mask", "vespo_phi",
    "cispo_clip",
)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _temp(temp_t: Optional[torch.Tensor], temp_s: float, lead, device):
    return checks.temperature(temp_t if temp_t is not None else temp_s, lead, device)


def _impl(impl: str, device) -> str:
    return resolve_impl(impl or None, device)


# ---------------------------------------------------------------------------------------------------------------
# linear_logprob_entropy


@torch.library.custom_op("fusedpg::linear_lpe", mutates_args=())
def _linear_lpe(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                temp_t: Optional[torch.Tensor], temp_s: float, ignore_index: int, compute_entropy: bool,
                check_targets: bool, impl: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden ``[N, H]`` -> (logp, entropy, m, log_s), each ``[N]`` (m, log_s: softmax statistics for backward)."""
    from ..linear.function import _plan

    n = hidden.shape[0]
    if check_targets:
        checks.targets_in_range(targets, weight.shape[0], ignore_index)
    temp = _temp(temp_t, temp_s, (n,), hidden.device)
    impl = _impl(impl, hidden.device)
    out = _out_dtype(hidden)
    opts = LogProbOptions(ignore_index=int(ignore_index), compute_entropy=bool(compute_entropy))
    rows = Rows(targets, opts.ignore_index)
    if rows.count == 0:
        z = torch.zeros(n, dtype=out, device=hidden.device)
        return z, z.clone(), z.clone(), z.clone()
    plan = _plan(impl)
    logp, ent, m, log_s = plan.forward(rows.take(hidden), weight, bias, rows.take(targets), rows.take(temp), opts)
    return tuple(rows.scatter(x.to(out)) for x in (logp, ent, m, log_s))


@_linear_lpe.register_fake
def _(hidden, weight, bias, targets, temp_t, temp_s, ignore_index, compute_entropy, check_targets, impl):
    n = hidden.shape[0]
    return tuple(hidden.new_empty(n, dtype=_out_dtype(hidden)) for _ in range(4))


@torch.library.custom_op("fusedpg::linear_lpe_backward", mutates_args=())
def _linear_lpe_backward(grad_logp: torch.Tensor, grad_entropy: Optional[torch.Tensor], hidden: torch.Tensor,
                         weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                         temp_t: Optional[torch.Tensor], temp_s: float, m: torch.Tensor, log_s: torch.Tensor,
                         entropy: torch.Tensor, ignore_index: int, compute_entropy: bool, impl: str,
                         need_h: bool, need_w: bool, need_b: bool) -> List[torch.Tensor]:
    """(dh, dW, db); a gradient that is not needed is returned as an empty tensor."""
    from ..linear.function import _plan

    n = hidden.shape[0]
    temp = _temp(temp_t, temp_s, (n,), hidden.device)
    impl = _impl(impl, hidden.device)
    opts = LogProbOptions(ignore_index=int(ignore_index), compute_entropy=bool(compute_entropy))
    rows = Rows(targets, opts.ignore_index)
    needs = (need_h, need_w, need_b and bias is not None)
    if rows.count == 0 or not any(needs):
        return [torch.zeros_like(x) if need else hidden.new_empty(0) for x, need in zip((hidden, weight, bias), needs)]
    d = rows.take(grad_entropy) if (compute_entropy and grad_entropy is not None) else None
    dh, dw, db = _plan(impl).backward(rows.take(hidden), weight, bias, rows.take(targets), rows.take(temp),
                                      rows.take(m), rows.take(log_s), rows.take(entropy), rows.take(grad_logp), d,
                                      opts, needs)
    out = []
    for g, x, need, scatter in ((dh, hidden, needs[0], True), (dw, weight, needs[1], False),
                                (db, bias, needs[2], False)):
        if not need:
            out.append(hidden.new_empty(0))
        elif g is None:
            out.append(torch.zeros_like(x))
        else:
            out.append((rows.scatter(g) if scatter else g).to(x.dtype))
    return out


@_linear_lpe_backward.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, targets, temp_t, temp_s, m, log_s, entropy, ignore_index,
      compute_entropy, impl, need_h, need_w, need_b):
    need_b = need_b and bias is not None
    return [torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else hidden.new_empty(0),
            torch.empty_like(bias) if need_b else hidden.new_empty(0)]


def _linear_setup(ctx, inputs, output):
    hidden, weight, bias, targets, temp_t, temp_s, ignore_index, compute_entropy, _check, impl = inputs
    _, entropy, m, log_s = output
    ctx.save_for_backward(hidden, weight, bias, targets, temp_t, m, log_s, entropy)
    ctx.args = (temp_s, ignore_index, compute_entropy, impl)


def _linear_backward(ctx, grad_logp, grad_entropy, _gm, _gl):
    hidden, weight, bias, targets, temp_t, m, log_s, entropy = ctx.saved_tensors
    temp_s, ignore_index, compute_entropy, impl = ctx.args
    need = ctx.needs_input_grad
    dh, dw, db = torch.ops.fusedpg.linear_lpe_backward(
        grad_logp, grad_entropy, hidden, weight, bias, targets, temp_t, temp_s, m, log_s, entropy, ignore_index,
        compute_entropy, impl, need[0], need[1], bias is not None and need[2])
    return (dh if need[0] else None, dw if need[1] else None, db if (bias is not None and need[2]) else None,
            None, None, None, None, None, None, None)


_linear_lpe.register_autograd(_linear_backward, setup_context=_linear_setup)


def linear_logprob_entropy_op(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                              compute_entropy=True, check_targets=True, impl=None):
    """:func:`fusedpg.linear_logprob_entropy` through the custom op (what the public op calls under compile)."""
    lead = hidden.shape[:-1]
    temp_t, temp_s = (temperature, 1.0) if isinstance(temperature, torch.Tensor) else (None, float(temperature))
    if temp_t is not None:
        temp_t = temp_t.detach().float().reshape(-1).expand(hidden.reshape(-1, hidden.shape[-1]).shape[0]) \
            if temp_t.numel() == 1 else temp_t.detach().float().reshape(-1)
    logp, ent, _, _ = torch.ops.fusedpg.linear_lpe(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, targets.reshape(-1), temp_t, temp_s, int(ignore_index),
        bool(compute_entropy), bool(check_targets), impl or "")
    if not compute_entropy:
        ent = ent.detach()
    return logp.reshape(lead), ent.reshape(lead)


# ---------------------------------------------------------------------------------------------------------------
# logprob_entropy (materialised logits)


@torch.library.custom_op("fusedpg::logits_lpe", mutates_args=())
def _logits_lpe(logits: torch.Tensor, targets: torch.Tensor, temp_t: Optional[torch.Tensor], temp_s: float,
                ignore_index: int, compute_entropy: bool, check_targets: bool,
                impl: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..logits.function import _plan

    n = logits.shape[0]
    if check_targets:
        checks.targets_in_range(targets, logits.shape[1], ignore_index)
    temp = _temp(temp_t, temp_s, (n,), logits.device)
    impl = _impl(impl, logits.device)
    opts = LogProbOptions(ignore_index=int(ignore_index), compute_entropy=bool(compute_entropy))
    valid = targets != opts.ignore_index
    y = torch.where(valid, targets, torch.zeros_like(targets))
    out = _out_dtype(logits)
    return tuple(x.to(out).clone() for x in _plan(impl).forward(logits, y, valid, temp, opts))


@_logits_lpe.register_fake
def _(logits, targets, temp_t, temp_s, ignore_index, compute_entropy, check_targets, impl):
    return tuple(logits.new_empty(logits.shape[0], dtype=_out_dtype(logits)) for _ in range(4))


@torch.library.custom_op("fusedpg::logits_lpe_backward", mutates_args=())
def _logits_lpe_backward(grad_logp: torch.Tensor, grad_entropy: Optional[torch.Tensor], logits: torch.Tensor,
                         targets: torch.Tensor, temp_t: Optional[torch.Tensor], temp_s: float, m: torch.Tensor,
                         log_s: torch.Tensor, entropy: torch.Tensor, ignore_index: int, compute_entropy: bool,
                         impl: str) -> torch.Tensor:
    from ..logits.function import _plan

    temp = _temp(temp_t, temp_s, (logits.shape[0],), logits.device)
    impl = _impl(impl, logits.device)
    opts = LogProbOptions(ignore_index=int(ignore_index), compute_entropy=bool(compute_entropy))
    valid = targets != opts.ignore_index
    y = torch.where(valid, targets, torch.zeros_like(targets))
    d = grad_entropy if compute_entropy else None
    g = _plan(impl).backward(logits, y, valid, temp, m, log_s, entropy, grad_logp, d, opts)
    return g.to(logits.dtype).clone() if g.data_ptr() == logits.data_ptr() else g.to(logits.dtype)


@_logits_lpe_backward.register_fake
def _(grad_logp, grad_entropy, logits, targets, temp_t, temp_s, m, log_s, entropy, ignore_index, compute_entropy,
      impl):
    return torch.empty_like(logits)


def _logits_setup(ctx, inputs, output):
    logits, targets, temp_t, temp_s, ignore_index, compute_entropy, _check, impl = inputs
    _, entropy, m, log_s = output
    ctx.save_for_backward(logits, targets, temp_t, m, log_s, entropy)
    ctx.args = (temp_s, ignore_index, compute_entropy, impl)


def _logits_backward(ctx, grad_logp, grad_entropy, _gm, _gl):
    logits, targets, temp_t, m, log_s, entropy = ctx.saved_tensors
    temp_s, ignore_index, compute_entropy, impl = ctx.args
    g = torch.ops.fusedpg.logits_lpe_backward(grad_logp, grad_entropy, logits, targets, temp_t, temp_s, m, log_s,
                                              entropy, ignore_index, compute_entropy, impl)
    return g, None, None, None, None, None, None, None


_logits_lpe.register_autograd(_logits_backward, setup_context=_logits_setup)


def logprob_entropy_op(logits, targets, *, temperature=1.0, ignore_index=-100, compute_entropy=True,
                       check_targets=True, impl=None):
    """:func:`fusedpg.logprob_entropy` through the custom op (``inplace_backward`` is not available here)."""
    lead, vocab = logits.shape[:-1], logits.shape[-1]
    temp_t, temp_s = (temperature, 1.0) if isinstance(temperature, torch.Tensor) else (None, float(temperature))
    n = logits.reshape(-1, vocab).shape[0]
    if temp_t is not None:
        temp_t = temp_t.detach().float().reshape(-1)
        temp_t = temp_t.expand(n) if temp_t.numel() == 1 else temp_t
    logp, ent, _, _ = torch.ops.fusedpg.logits_lpe(logits.reshape(-1, vocab), targets.reshape(-1), temp_t, temp_s,
                                                   int(ignore_index), bool(compute_entropy), bool(check_targets),
                                                   impl or "")
    if not compute_entropy:
        ent = ent.detach()
    return logp.reshape(lead), ent.reshape(lead)


# ---------------------------------------------------------------------------------------------------------------
# fused_linear_pg_loss

_AUTOGRAD_KEYS = [getattr(torch._C.DispatchKey, n) for n in dir(torch._C.DispatchKey) if n.startswith("Autograd")]


def _autograd_enabled():
    """A guard that lifts the exclusion of the autograd dispatch keys a custom op's implementation runs under."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)

#: Optional tensor inputs of fused_linear_pg_loss, in the op's argument order.
_OPTIONAL = ("old_logp", "ref_logp", "bias", "seq_ids", "rollout_logp", "is_weights", "old_entropy", "group_ids",
             "step_ids", "token_weights", "truncated", "temperature")


@torch._dynamo.assume_constant_result
def config_key(config=None, loss_type=None, **options) -> str:
    """A JSON string naming the resolved :class:`fusedpg.PGLossConfig` (the op's only non-tensor loss argument)."""
    from ..objective import make_config

    cfg = make_config(config, loss_type, **options)
    return json.dumps({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, sort_keys=True)


@functools.lru_cache(maxsize=256)
def _config_of(key: str):
    from ..objective import PGLossConfig

    return PGLossConfig(**json.loads(key))


def _loss_dtype(hidden, floats: Sequence[Optional[torch.Tensor]]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in (hidden, *floats)) \
        else torch.float32


@torch.library.custom_op("fusedpg::fused_pg_loss", mutates_args=())
def _fused_pg_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, advantages: torch.Tensor,
                   mask: torch.Tensor, old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor], seq_ids: Optional[torch.Tensor], rollout_logp: Optional[torch.Tensor],
                   is_weights: Optional[torch.Tensor], old_entropy: Optional[torch.Tensor],
                   group_ids: Optional[torch.Tensor], step_ids: Optional[torch.Tensor],
                   token_weights: Optional[torch.Tensor], truncated: Optional[torch.Tensor],
                   temp_t: Optional[torch.Tensor], temp_s: float, config: str, impl: str, chunk_bytes: int,
                   plan: str, need_h: bool, need_w: bool, need_b: bool,
                   token_stats: bool) -> List[torch.Tensor]:
    """-> [loss (0-dim), metrics (len(METRIC_KEYS)), dh, dW, db, logp, entropy] (unneeded entries empty)."""
    from ..linear_pg import fused_linear_pg_loss

    cfg = _config_of(config)
    floats = (advantages, old_logp, ref_logp, rollout_logp, is_weights, old_entropy, token_weights)
    dtype = _loss_dtype(hidden, floats)
    needs = (need_h, need_w, need_b and bias is not None)
    # A custom op's implementation runs below the autograd dispatch keys; the loss layer differentiates small [n]
    # tensors with autograd, so restore the ordinary dispatch state for the duration of the call.
    with _autograd_enabled(), torch.enable_grad():
        h = hidden.detach().requires_grad_(needs[0])
        w = weight.detach().requires_grad_(needs[1])
        b = None if bias is None else bias.detach().requires_grad_(needs[2])
        loss, met = fused_linear_pg_loss(
            h, w, targets, advantages, mask, old_logp=old_logp, ref_logp=ref_logp, bias=b, config=cfg,
            temperature=temp_t if temp_t is not None else temp_s, seq_ids=seq_ids, return_token_stats=token_stats,
            impl=impl or None, chunk_bytes=chunk_bytes if chunk_bytes > 0 else None, plan=plan or None,
            rollout_logp=rollout_logp, is_weights=is_weights, old_entropy=old_entropy, group_ids=group_ids,
            step_ids=step_ids, token_weights=token_weights, truncated=truncated)
        wrt = [x for x, need in zip((h, w, b), needs) if need]
        grads = list(torch.autograd.grad(loss, wrt, allow_unused=True)) if wrt and loss.requires_grad else []
    out_grads = []
    for x, need in zip((h, w, b), needs):
        if not need:
            out_grads.append(hidden.new_empty(0))
            continue
        g = grads.pop(0) if grads else None
        out_grads.append(torch.zeros_like(x) if g is None else g.to(x.dtype))
    vec = torch.full((len(METRIC_KEYS),), math.nan, dtype=dtype, device=hidden.device)
    for i, k in enumerate(METRIC_KEYS):
        v = met.get(k)
        if isinstance(v, torch.Tensor) and v.dim() == 0:
            vec[i] = v.detach().to(dtype)
    lead = mask.shape
    if token_stats:
        stats = [met["logp"].detach().to(dtype).reshape(lead).clone(), met["entropy"].detach().to(dtype).reshape(lead)
                 .clone()]
    else:
        stats = [hidden.new_empty(0), hidden.new_empty(0)]
    return [loss.detach().to(dtype).clone(), vec] + out_grads + stats


@_fused_pg_loss.register_fake
def _(hidden, weight, targets, advantages, mask, old_logp, ref_logp, bias, seq_ids, rollout_logp, is_weights,
      old_entropy, group_ids, step_ids, token_weights, truncated, temp_t, temp_s, config, impl, chunk_bytes, plan,
      need_h, need_w, need_b, token_stats):
    dtype = _loss_dtype(hidden, (advantages, old_logp, ref_logp, rollout_logp, is_weights, old_entropy, token_weights))
    need_b = need_b and bias is not None
    shape = tuple(mask.shape) if token_stats else (0,)
    return [hidden.new_empty((), dtype=dtype), hidden.new_empty(len(METRIC_KEYS), dtype=dtype),
            torch.empty_like(hidden) if need_h else hidden.new_empty(0),
            torch.empty_like(weight) if need_w else hidden.new_empty(0),
            torch.empty_like(bias) if need_b else hidden.new_empty(0),
            hidden.new_empty(shape, dtype=dtype if token_stats else hidden.dtype),
            hidden.new_empty(shape, dtype=dtype if token_stats else hidden.dtype)]


def _pg_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2], output[3], output[4])
    ctx.has_bias = inputs[7] is not None


def _pg_backward(ctx, grads):
    grad_loss = grads[0]  # the op returns a list: its gradients arrive as one list
    dh, dw, db = ctx.saved_tensors
    need = ctx.needs_input_grad

    def scale(g, i):
        return (g * grad_loss.to(g.dtype)) if need[i] and g.numel() and grad_loss is not None else None

    return (scale(dh, 0), scale(dw, 1)) + (None,) * 5 + (scale(db, 7) if ctx.has_bias else None,) + (None,) * 18


_fused_pg_loss.register_autograd(_pg_backward, setup_context=_pg_setup)


def fused_linear_pg_loss_op(hidden, weight, targets, advantages, mask, *, config_json: str, old_logp=None,
                            ref_logp=None, bias=None, temperature=1.0, seq_ids=None, return_token_stats=False,
                            impl=None, chunk_bytes=None, plan=None, rollout_logp=None, is_weights=None,
                            old_entropy=None, group_ids=None, step_ids=None, token_weights=None, truncated=None):
    """:func:`fusedpg.fused_linear_pg_loss` through the custom op; ``config_json`` from :func:`config_key`."""
    temp_t, temp_s = (temperature, 1.0) if isinstance(temperature, torch.Tensor) else (None, float(temperature))
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and hidden.requires_grad
    need_w = grad_on and weight.requires_grad
    need_b = grad_on and bias is not None and bias.requires_grad
    out = torch.ops.fusedpg.fused_pg_loss(
        hidden, weight, targets, advantages, mask, old_logp, ref_logp, bias, seq_ids, rollout_logp, is_weights,
        old_entropy, group_ids, step_ids, token_weights, truncated, temp_t, temp_s, config_json, impl or "",
        int(chunk_bytes or 0), plan or "", need_h, need_w, need_b, bool(return_token_stats))
    loss, vec = out[0], out[1]
    vec = vec.detach()
    metrics = {k: vec[i] for i, k in enumerate(METRIC_KEYS)}
    if return_token_stats:
        metrics["logp"], metrics["entropy"] = out[5].detach(), out[6].detach()
    return loss, metrics
