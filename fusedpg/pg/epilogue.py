"""Launcher of the one-pass PG epilogue kernel (kernels/pg_onepass.py) and the rule for when it applies.

It applies to the token-local PPO-clip family (every normaliser, dual clip, delta, GPPO, DCPO bounds), CISPO and
SAPO, with any KL estimator (without bias correction) and the entropy bonus; other one-pass variants take the
generic chunk path (per-token coefficients from the loss layer by autograd on the chunk's ``[n]`` scalars).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton

from ..backend import triton_interpreting
from ..kernel_config import temperature_arg
from ..losses import PGBatch, PGLossConfig, get_variant, plan_of, resolve

_SURROGATES = {"clipped": 0, "gppo": 0, "clipped_absolute": 0, "cispo": None, "sapo": 3}
_KL = {"k1": 1, "kl": 1, "abs": 2, "k2": 3, "mse": 3, "k3": 4, "low_var_kl": 4}


def epilogue_spec(cfg: PGLossConfig, batch: PGBatch) -> Optional[dict]:
    """Compile-time codes and runtime scalars of the kernel for this config, or None if it does not apply."""
    cfg = resolve(cfg)
    fn = get_variant(cfg.loss_type).fn.__name__
    if (fn not in _SURROGATES or plan_of(cfg) != "one_pass" or cfg.importance_sampling_level != "token"
            or cfg.off_policy_mask_threshold is not None or cfg.kl_bias_correction or "entropy_mask" in batch.extra
            or cfg.loss_type == "vespo" or (fn == "clipped_absolute" and "lo" not in batch.extra)):
        return None
    surrogate = _SURROGATES[fn]
    if fn == "cispo":
        surrogate = 1 if cfg.cispo_mode == "trl" else 2
    kl = 0
    if batch.ref_logp is not None and cfg.beta != 0.0:
        kl = _KL[cfg.kl_estimator.rstrip("+")]
    inf = math.inf
    return dict(
        SURROGATE=surrogate, GRAD_PRESERVING=fn == "gppo", KL=kl,
        KL_STRAIGHT=cfg.kl_estimator.endswith("+") and cfg.kl_estimator.rstrip("+") not in ("k2", "mse"),
        ratio_clamp=inf if cfg.log_ratio_clamp is None else float(cfg.log_ratio_clamp),
        delta=inf if cfg.delta is None else float(cfg.delta),
        dual_c=float(cfg.dual_clip_c), beta=float(cfg.beta),
        kl_clamp=inf if cfg.kl_value_clamp is None else float(cfg.kl_value_clamp),
        ent_coef=float(cfg.entropy_coef), tau_pos=float(cfg.sapo_tau_pos), tau_neg=float(cfg.sapo_tau_neg),
        lo=None if fn == "clipped_absolute" else 1.0 - cfg.epsilon_low,
        hi=None if fn == "clipped_absolute" else (cfg.epsilon_high if surrogate == 1 else 1.0 + cfg.epsilon_high),
    )


def run_epilogue(x: torch.Tensor, y: torch.Tensor, temp, part: PGBatch, rows: torch.Tensor, spec: dict):
    """Over logits ``x [n, V]`` (overwritten by dL/du) of the active ``rows`` of the batch slice ``part``:
    returns (logp, entropy, per-token loss), each fp32 ``[n]``."""
    n, vocab = x.shape
    f32 = dict(dtype=torch.float32, device=x.device)

    def tok(t: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.zeros(n, **f32) if t is None else t.index_select(0, rows).float().contiguous()

    w = part.weights
    for extra in (part.token_weights, part.is_weights):
        if extra is not None:
            w = w * extra
    bounds = []
    for key in ("lo", "hi"):
        if spec[key] is None:
            bounds.append((tok(part.extra[key]), 1))
        else:
            bounds.append((torch.full((1,), spec[key], **f32), 0))
    (lo, s_lo), (hi, s_hi) = bounds
    t, stride_t = temperature_arg(temp, n, x.device)
    logp, ent, loss = (torch.empty(n, **f32) for _ in range(3))
    bt, bv = (4, 32) if triton_interpreting() else (1, min(4096, triton.next_power_of_2(vocab)))
    from ..kernels.pg_onepass import _pg_onepass_kernel

    consts = {k: spec[k] for k in ("SURROGATE", "GRAD_PRESERVING", "KL", "KL_STRAIGHT")}
    _pg_onepass_kernel[(triton.cdiv(n, bt),)](
        x, y.contiguous(), t, tok(part.old_logp), tok(part.ref_logp), tok(part.advantages), tok(w),
        tok(part.weights), tok(part.entropy_weights), lo, hi, logp, ent, loss,
        n, vocab, x.stride(0), stride_t, s_lo, s_hi,
        spec["ratio_clamp"], spec["delta"], spec["dual_c"], spec["beta"], spec["kl_clamp"], spec["ent_coef"],
        spec["tau_pos"], spec["tau_neg"],
        HAS_D=spec["ent_coef"] != 0.0, BT=bt, BV=bv, num_warps=1 if triton_interpreting() else 8, **consts,
    )
    return logp, ent, loss
