"""Launchers of the one-pass PG epilogue kernels (kernels/pg_onepass.py) for the variants that declare an
``EpilogueSpec``. When a config may use them is decided by ``fusedpg.objective.epilogue_spec``, beside the loss
composition it must match; everything else takes the generic chunk path (per-token coefficients from the loss
layer by autograd on the chunk's ``[n]`` scalars).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton

from ..backend import triton_interpreting
from ..objective import EpilogueSpec, PGBatch, PGLossConfig, resolve
from ..options import LogProbOptions

_SURROGATE = {"clip": 0, "cispo_trl": 1, "cispo_verl": 2, "sapo": 3}
_GMPO = 3  # SEQ code: GMPO's geometric mean of log-space-clipped token ratios
_SEQ = {"token": 0, "sequence": 1, "sequence_token": 2}
_KL = {"k1": 1, "kl": 1, "abs": 2, "k2": 3, "mse": 3, "k3": 4, "low_var_kl": 4}


class Epilogue:
    """The fused epilogue for one call: kernel codes and runtime scalars from the variant's ``EpilogueSpec``."""

    def __init__(self, spec: EpilogueSpec, cfg: PGLossConfig, batch: PGBatch):
        self.params = _params(spec, resolve(cfg), batch)

    def run(self, x, y, temp, part: PGBatch, rows):
        """Over logits ``x [n, V]`` (overwritten by dL/du): (logp, entropy, per-token loss), each fp32 ``[n]``."""
        if self.params["SEQ"]:
            return _sequence_epilogue(x, y, temp, part, rows, self.params)
        return run_epilogue(x, y, temp, part, rows, self.params)


def _params(spec: EpilogueSpec, cfg: PGLossConfig, batch: PGBatch) -> dict:
    seq = _GMPO if spec.geo_mean else _SEQ[cfg.importance_sampling_level]
    name = spec.surrogate if spec.surrogate != "cispo" else f"cispo_{cfg.cispo_mode}"
    surrogate = _SURROGATE[name]
    kl = _KL[cfg.kl_estimator.rstrip("+")] if (batch.ref_logp is not None and cfg.beta != 0.0) else 0
    inf = math.inf
    common = dict(SEQ=seq, KL=kl, KL_STRAIGHT=_straight(cfg), beta=float(cfg.beta), ent_coef=float(cfg.entropy_coef),
                  ratio_clamp=inf if cfg.log_ratio_clamp is None else float(cfg.log_ratio_clamp),
                  kl_clamp=inf if cfg.kl_value_clamp is None else float(cfg.kl_value_clamp))
    if spec.geo_mean:  # -A_bar * rho: the clip surrogate with bounds that never bind, at the sequence log-ratio
        return dict(common, SURROGATE=0, GRAD_PRESERVING=False, delta=inf, dual_c=inf, tau_pos=1.0, tau_neg=1.0,
                    lo=0.0, hi=inf, log_lo=-float(cfg.epsilon_low), log_hi=float(cfg.epsilon_high))
    token_bounds = spec.bounds == "token"
    return dict(
        common, SURROGATE=surrogate, GRAD_PRESERVING=spec.gradient_preserving,
        KL_BIAS=0 if not (cfg.kl_bias_correction and kl) else (2 if cfg.kl_bias_correction_detach else 1),
        delta=inf if cfg.delta is None else float(cfg.delta), dual_c=float(cfg.dual_clip_c),
        tau_pos=float(cfg.sapo_tau_pos), tau_neg=float(cfg.sapo_tau_neg),
        lo=None if token_bounds else 1.0 - cfg.epsilon_low,
        hi=None if token_bounds else (cfg.epsilon_high if surrogate == 1 else 1.0 + cfg.epsilon_high),
    )


def _straight(cfg) -> bool:
    return cfg.kl_estimator.endswith("+") and cfg.kl_estimator.rstrip("+") not in ("k2", "mse")


def _sequence_epilogue(x, y, temp, part, rows, spec):
    """GSPO family and GMPO: statistics kernel, the sequence terms (two segment sums around one kernel), then the
    gradient kernel over the same logits buffer."""
    from ..logits import launch_triton as logits_kernels

    opts = LogProbOptions(compute_entropy=True, inplace=True)
    valid = torch.ones_like(y, dtype=torch.bool)
    lp, ent, m, log_s = logits_kernels.forward(x, y, valid, temp, opts)
    loss, c, d = run_sequence_terms(lp, ent, part, rows, spec)
    logits_kernels.backward(x, y, valid, temp, m, log_s, ent, c, d if spec["ent_coef"] != 0.0 else None, opts)
    return lp, ent, loss


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
    (lo, s_lo), (hi, s_hi) = _bounds(spec, part, tok, f32)
    t, stride_t = temp.kernel_arg(x.device)
    logp, ent, loss = (torch.empty(n, **f32) for _ in range(3))
    bt, bv = (4, 32) if triton_interpreting() else (1, min(4096, triton.next_power_of_2(vocab)))
    from ..kernels.pg_onepass import _pg_onepass_kernel

    consts = {k: spec[k] for k in ("SURROGATE", "GRAD_PRESERVING", "KL", "KL_STRAIGHT", "KL_BIAS")}  # SEQ: host
    _pg_onepass_kernel[(triton.cdiv(n, bt),)](
        x, y.contiguous(), t, tok(part.old_logp), tok(part.ref_logp), tok(part.advantages), tok(w),
        tok(part.weights), tok(part.entropy_weights), lo, hi, logp, ent, loss,
        n, vocab, x.stride(0), stride_t, s_lo, s_hi,
        spec["ratio_clamp"], spec["delta"], spec["dual_c"], spec["beta"], spec["kl_clamp"], spec["ent_coef"],
        spec["tau_pos"], spec["tau_neg"],
        HAS_D=spec["ent_coef"] != 0.0, BT=bt, BV=bv, num_warps=1 if triton_interpreting() else 8, **consts,
    )
    return logp, ent, loss


def run_sequence_terms(lp, ent, part: PGBatch, rows: torch.Tensor, spec: dict):
    """Sequence-level ratio (GSPO family) for one chunk of whole sequences, after its statistics: returns
    (per-token loss, c, d), each fp32 ``[n]``. The sequence reductions are two segment sums over ``[n]``."""
    n = lp.shape[0]
    f32 = dict(dtype=torch.float32, device=lp.device)

    def tok(t: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.zeros(n, **f32) if t is None else t.index_select(0, rows).float().contiguous()

    seg = part.seq_local.index_select(0, rows)
    mask, old, adv = tok(part.mask), tok(part.old_logp), tok(part.advantages)
    nseq = part.num_seqs
    length = torch.zeros(nseq, **f32).index_add_(0, seg, mask).clamp_(min=1.0)

    def seq_mean(x):
        return (torch.zeros(nseq, **f32).index_add_(0, seg, mask * x) / length).index_select(0, seg)

    lr = lp - old
    dlr = None
    if spec["SEQ"] == _GMPO:  # token clip in log space on the side where it binds for the sign of A
        lr, dlr = _gmpo_clip(lr, adv, spec["log_lo"], spec["log_hi"])
        adv = seq_mean(adv)
    lrs = seq_mean(lr)
    w = part.weights
    for extra in (part.token_weights, part.is_weights):
        if extra is not None:
            w = w * extra
    (lo, s_lo), (hi, s_hi) = _bounds(spec, part, tok, f32)
    loss, cpol, cloc, d = (torch.empty(n, **f32) for _ in range(4))
    from ..kernels.pg_onepass import _pg_seq_terms_kernel

    bt = 16 if triton_interpreting() else 256
    _pg_seq_terms_kernel[(triton.cdiv(n, bt),)](
        lp.contiguous(), ent.contiguous(), lrs, old, tok(part.ref_logp), adv, tok(w),
        tok(part.weights), tok(part.entropy_weights), lo, hi, loss, cpol, cloc, d, n, s_lo, s_hi,
        spec["ratio_clamp"], spec["delta"], spec["dual_c"], spec["beta"], spec["kl_clamp"], spec["ent_coef"],
        spec["tau_pos"], spec["tau_neg"], BT=bt,
        **{k: spec[k] for k in ("SURROGATE", "GRAD_PRESERVING", "KL", "KL_STRAIGHT")},
    )
    if spec["SEQ"] in (1, _GMPO):  # d lrs / d lp_t = m_t / |o_i| (times d lr_c / d lp for GMPO)
        total = torch.zeros(nseq, **f32).index_add_(0, seg, cpol)
        cpol = (total / length).index_select(0, seg) * mask
        if dlr is not None:
            cpol = cpol * dlr
    return loss, cpol + cloc, d


def _gmpo_clip(lr, adv, lo, hi):
    """GMPO's ``sign(A) min(sign(A) lr, sign(A) clip(lr, lo, hi))`` and its derivative in ``lr`` (torch's
    conventions: clamp passes the gradient at its bounds, min splits it on ties)."""
    sgn = torch.sign(adv)
    clipped = lr.clamp(lo, hi)
    a, b = sgn * lr, sgn * clipped
    value = sgn * torch.minimum(a, b)
    inside = ((lr >= lo) & (lr <= hi)).to(lr.dtype)
    grad = torch.where(a < b, torch.ones_like(lr), torch.where(b < a, inside, 0.5 * (1.0 + inside)))
    return value, grad * sgn * sgn


def _bounds(spec, part, tok, f32):
    out = []
    for key in ("lo", "hi"):
        if spec[key] is None:
            out.append((tok(part.extra[key]), 1))
        else:
            out.append((torch.full((1,), spec[key], **f32), 0))
    return out
