"""``PGLossConfig``: every non-tensor option of the loss layer in one frozen, hashable dataclass.

Fields left ``None`` take the chosen variant's recipe default (``registry.Variant.defaults``) when the config is
resolved (``resolve(cfg)``, done by every entry point and cached). Resolution is lazy so that
``dataclasses.replace(cfg, loss_type=...)`` picks the new variant's defaults. ``math.inf`` switches the dual
clip off explicitly. Temperature is not here: it belongs to the log-prob kernel.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from dataclasses import dataclass
from typing import Optional

from .registry import get_variant

TRL_AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
VERL_AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
AGGREGATIONS = TRL_AGGREGATIONS + VERL_AGGREGATIONS + ("group-token-mean",)
IS_LEVELS = ("token", "sequence", "sequence_token")
KL_ESTIMATORS = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl", "k1+", "kl+", "abs+", "k2+", "mse+", "k3+",
                 "low_var_kl+")
ROLLOUT_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
CHOICES = {
    "aggregation": AGGREGATIONS,
    "importance_sampling_level": IS_LEVELS,
    "kl_estimator": KL_ESTIMATORS,
    "rollout_is": ROLLOUT_IS_MODES,
    "top_entropy_mode": ("trl", "original"),
    "cispo_mode": ("trl", "verl"),
    "shaping_entropy": ("current", "old"),
    "bapo_target_kind": ("share", "ratio"),
    "alol_ratio": ("ref", "none"),
}


@dataclass(frozen=True)
class PGLossConfig:
    """Options of ``pg_loss`` / ``prepare`` / ``token_loss``. See fusedpg/objective/README.md for the formulas, docs/losses.md for their sources.

    Variant and clipping
        loss_type: a registered variant (``fusedpg.objective.variant_names()``).
        epsilon_low, epsilon_high: clip range ``[1 - eps_low, 1 + eps_high]``; GMPO uses them in log space,
            CISPO (``cispo_mode="trl"``) uses ``epsilon_high`` as the absolute cap. ``None``: recipe default.
        dual_clip_c: dual-clip bound ``c > 1`` for ``A < 0``; ``math.inf`` is off; ``None``: recipe default.
        delta: INTELLECT-2 two-sided clip ``min(r, delta)``; must exceed ``1 + epsilon_high``.
        importance_sampling_level: ``"token"``, ``"sequence"`` (GSPO/TRL, length-normalised) or
            ``"sequence_token"`` (GSPO-token). ``None``: recipe default.
        log_ratio_clamp: every log-ratio is clamped to ``[-c, c]`` before ``exp`` (ratios, sequence ratios, k3's
            exponent, rollout IS, the bias-correction weight). verl and OpenRLHF clamp at 20; TRL and Liger never
            clamp, which overflows fp32 past |log-ratio| ~ 88. ``None`` disables it (exact TRL parity).
    KL to the reference (docs/losses.md#kl-to-the-reference)
        beta, kl_estimator (k1/kl, abs, k2/mse, k3/low_var_kl, and ``+`` straight-through forms),
        kl_value_clamp (verl: 10 for low_var_kl; default none), kl_bias_correction (DeepSeek-V3.2 ``coef_1 * k3``),
        kl_bias_correction_detach (detach ``coef_1``; the paper's choice is unconfirmed, TRL does not detach).
    Entropy (docs/losses.md#entropy-bonus, #top-entropy-mask)
        entropy_coef: static bonus coefficient alpha (``L -= alpha * H_hat``); the adaptive controller is trainer
            state (``fusedpg.objective.AdaptiveEntropyCoef``).
        top_entropy_quantile: keep tokens in the top rho fraction of current entropy (1.0 = off);
        top_entropy_mode: ``"trl"`` (global quantile, ties kept, full denominator, policy term only) or
            ``"original"`` (top-k of ceil(rho N), selected-token denominator for every term).
    Rollout correction (docs/losses.md#rollout-importance-sampling, #opsm)
        rollout_is: TRL vLLM IS mode, or None. rollout_is_min / rollout_is_max: its bounds (TRL: None / 3.0).
        off_policy_mask_threshold: OPSM delta (None = off).
    Aggregation (docs/losses.md#aggregation-modes)
        aggregation: a TRL loss_type name, a verl loss_agg_mode, or ``"group-token-mean"`` (DCPO OTM).
        num_items_in_batch: global valid-token count (TRL) / batch_num_tokens (verl). None: local count.
        num_sequences: verl global_batch_size (non-empty sequences over all ranks). None: local count.
        gradient_accumulation_steps, world_size: GA and P (docs/losses.md#notation).
        max_completion_length: Dr.GRPO's L_max (required by ``aggregation="dr_grpo"``).
        loss_scale_factor: verl seq-mean-token-sum-norm's C (default: the padded width T).
        luspo_unmasked: TRL/Liger parity for LUSPO's token-shaped form, which averages over all B*T cells.
        mask_truncated_completions: zero the mask of sequences flagged in ``truncated``.
    Variant hyper-parameters
        cispo_mode ("trl": min(r, eps_high) with eps_high an absolute cap, default 5; "verl": clip to the range),
        sapo_tau_pos / sapo_tau_neg, vespo_k_pos / vespo_lambda_pos / vespo_k_neg / vespo_lambda_neg,
        clip_cov_ratio / clip_cov_lb / clip_cov_ub, seed (Clip-Cov's random pick; None uses torch's global RNG),
        kl_cov_ratio / kl_cov_coef, bapo_low_range / bapo_high_range / bapo_low_step / bapo_high_step /
        bapo_target / bapo_target_kind, gtpo_entropy_threshold / gtpo_entropy_coef, d3s_token_ratio,
        empg_k / empg_k_future / empg_zeta, alol_ratio, w_reinforce_lambda,
        shaping_entropy ("current": GTPO/D3S/EMPG use the current entropy, detached; "old": ``old_entropy``),
        drpo_tau / drpo_lambda (DRPO's negative temperature and length-weight temperature), drpo_beta /
        drpo_delta (its trust-region penalty ``beta max(kl - delta, 0) kl``; ``drpo_beta=0`` is off), copg_beta
        (CoPG's regularisation ``R - beta log(pi/pi_ref)``), hpt_sft_coef (HPT's SFT weight).
    """

    loss_type: str = "dapo"
    epsilon_low: Optional[float] = None
    epsilon_high: Optional[float] = None
    dual_clip_c: Optional[float] = None
    delta: Optional[float] = None
    importance_sampling_level: Optional[str] = None
    log_ratio_clamp: Optional[float] = 20.0
    beta: float = 0.0
    kl_estimator: str = "k3"
    kl_value_clamp: Optional[float] = None
    kl_bias_correction: bool = False
    kl_bias_correction_detach: bool = False
    entropy_coef: float = 0.0
    top_entropy_quantile: Optional[float] = None
    top_entropy_mode: str = "trl"
    rollout_is: Optional[str] = None
    rollout_is_min: Optional[float] = None
    rollout_is_max: Optional[float] = 3.0
    off_policy_mask_threshold: Optional[float] = None
    aggregation: Optional[str] = None
    num_items_in_batch: Optional[float] = None
    num_sequences: Optional[float] = None
    gradient_accumulation_steps: int = 1
    world_size: int = 1
    max_completion_length: Optional[int] = None
    loss_scale_factor: Optional[float] = None
    luspo_unmasked: bool = False
    mask_truncated_completions: bool = False
    cispo_mode: str = "trl"
    sapo_tau_pos: float = 1.0
    sapo_tau_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    clip_cov_ratio: float = 2e-4
    clip_cov_lb: float = 1.0
    clip_cov_ub: float = 5.0
    seed: Optional[int] = None
    kl_cov_ratio: float = 2e-4
    kl_cov_coef: float = 1.0
    bapo_low_range: tuple = (0.6, 0.9)
    bapo_high_range: tuple = (1.2, 3.0)
    bapo_low_step: float = 0.05
    bapo_high_step: float = 0.05
    bapo_target: float = 0.5
    bapo_target_kind: str = "share"
    gtpo_entropy_threshold: float = 0.7
    gtpo_entropy_coef: float = 0.1
    d3s_token_ratio: float = 0.2
    empg_k: float = 1.0
    empg_k_future: float = 1.0
    empg_zeta: float = 0.1
    alol_ratio: str = "ref"
    w_reinforce_lambda: float = 0.1
    shaping_entropy: str = "current"
    drpo_tau: float = 10.0
    drpo_lambda: float = 0.1
    drpo_beta: float = 1000.0
    drpo_delta: float = 1e-4
    copg_beta: float = 0.1
    hpt_sft_coef: float = 1.0

    def __post_init__(self):
        get_variant(self.loss_type)  # TypeError / ValueError listing the valid names
        for name, choices in CHOICES.items():
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and math.isnan(value):
                raise ValueError(f"{f.name} must not be NaN")
        if isinstance(self.bapo_low_range, list) or isinstance(self.bapo_high_range, list):
            object.__setattr__(self, "bapo_low_range", tuple(self.bapo_low_range))
            object.__setattr__(self, "bapo_high_range", tuple(self.bapo_high_range))
        for name in ("gradient_accumulation_steps", "world_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for names, ok, want in _BOUNDS:
            for name in names:
                value = getattr(self, name)
                if value is not None and not ok(value):
                    raise ValueError(f"{name} must be {want}, got {value!r}")
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise ValueError(f"clip_cov_lb must be < clip_cov_ub, got {self.clip_cov_lb} >= {self.clip_cov_ub}")
        for name in ("bapo_low_range", "bapo_high_range"):
            lo_hi = getattr(self, name)
            if not (isinstance(lo_hi, tuple) and len(lo_hi) == 2 and lo_hi[0] <= lo_hi[1]):
                raise ValueError(f"{name} must be a (start, end) pair with start <= end, got {lo_hi!r}")
        lo, hi = self.rollout_is_min, self.rollout_is_max
        if lo is not None and hi is not None and not lo < hi:
            raise ValueError(f"rollout_is_min must be < rollout_is_max, got {lo} >= {hi}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")

    def __repr__(self) -> str:
        """Only the fields that differ from the defaults: what was chosen, in one line."""
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                   if f.name == "loss_type" or getattr(self, f.name) != f.default]
        return f"PGLossConfig({', '.join(changed)})"

    @property
    def variant(self):
        """The registered ``Variant`` of ``loss_type`` (its function, plan, needs, epilogue spec)."""
        return get_variant(self.loss_type)

    def replace(self, **changes) -> "PGLossConfig":
        return dataclasses.replace(self, **changes)


# (fields, predicate, what the message asks for); None always passes (it means "default" or "off")
_BOUNDS = (
    (("log_ratio_clamp", "kl_value_clamp", "max_completion_length", "loss_scale_factor", "sapo_tau_pos",
      "sapo_tau_neg", "clip_cov_ratio", "kl_cov_ratio", "bapo_low_step", "bapo_high_step", "drpo_tau",
      "drpo_lambda"), lambda v: v > 0, "> 0"),
    (("epsilon_low", "epsilon_high", "num_items_in_batch", "num_sequences", "beta", "drpo_beta", "drpo_delta",
      "copg_beta", "hpt_sft_coef"), lambda v: v >= 0, ">= 0"),
    (("top_entropy_quantile", "d3s_token_ratio"), lambda v: 0 < v <= 1, "in (0, 1]"),
)
# other trainers' spellings of an option -> ours (TRL's epsilon is one bound; here the range has two)
_SPELLINGS = {"epsilon": "epsilon_low (and epsilon_high)", "loss_agg_mode": "aggregation",
              "clip_ratio": "epsilon_low / epsilon_high", "clip_ratio_low": "epsilon_low",
              "clip_ratio_high": "epsilon_high", "clip_ratio_c": "dual_clip_c", "kl_coef": "beta",
              "kl_loss_coef": "beta", "kl_loss_type": "kl_estimator",
              "entropy_coeff": "entropy_coef", "use_bias_correction_kl": "kl_bias_correction",
              "vllm_importance_sampling_mode": "rollout_is", "vllm_importance_sampling_cap": "rollout_is_max"}


def _unknown_option(name: str, names) -> str:
    """One short line: the unknown name, then TRL's/verl's spelling or the nearest field names."""
    if name in _SPELLINGS:
        return f"unknown option {name!r}: fusedpg spells it {_SPELLINGS[name]}"
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(map(repr, close))}?" if close else "see fusedpg.PGLossConfig for the options"
    return f"unknown option {name!r}: {hint}"


def make_config(config: Optional[PGLossConfig] = None, loss_type: Optional[str] = None, **options) -> PGLossConfig:
    """The keyword form builds a config. With ``config=`` too, ``loss_type`` and the keywords override its fields
    (``dataclasses.replace``): ``pg_loss(..., config=cfg, beta=0.1)`` runs ``cfg`` with ``beta=0.1``."""
    if config is not None and not isinstance(config, PGLossConfig):
        raise TypeError(f"config must be a PGLossConfig or None, got {type(config).__name__}")
    names = {f.name for f in dataclasses.fields(PGLossConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError("; ".join(_unknown_option(u, sorted(names)) for u in unknown))
    if loss_type is not None:
        options["loss_type"] = loss_type
    return dataclasses.replace(config, **options) if config is not None else PGLossConfig(**options)


@functools.lru_cache(maxsize=256)
def resolve(cfg: PGLossConfig) -> PGLossConfig:
    """Fill ``None`` fields from the variant's recipe and check options that contradict each other."""
    var = cfg.variant
    fill = {k: v for k, v in var.default_values(cfg).items() if getattr(cfg, k) is None}
    base = {"epsilon_low": 0.2, "epsilon_high": 0.2, "dual_clip_c": math.inf, "aggregation": "token-mean",
            "importance_sampling_level": "token", "top_entropy_quantile": 1.0}
    for k, v in base.items():
        if getattr(cfg, k) is None and k not in fill:
            fill[k] = v
    out = dataclasses.replace(cfg, **fill)
    _check_combination(out, var)
    return out


def _check_combination(cfg: PGLossConfig, var) -> None:
    name = cfg.loss_type
    if cfg.dual_clip_c is not None and not cfg.dual_clip_c > 1.0:
        raise ValueError(f"dual_clip_c must be > 1 (math.inf switches it off), got {cfg.dual_clip_c!r}")
    if cfg.delta is not None:
        if not var.clipped:
            raise ValueError(f"delta applies to the PPO-clip variants only, not loss_type={name!r}")
        if not cfg.delta > 1.0 + cfg.epsilon_high:
            raise ValueError(
                f"delta must be > 1 + epsilon_high = {1.0 + cfg.epsilon_high} (below it, positive-advantage tokens "
                f"inside the clip range lose their gradient), got delta={cfg.delta}"
            )
    if name in ("vespo", "geo_mean", "p3o") and cfg.importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level must be 'token' for loss_type={name!r} (it builds its own "
                         f"sequence weight), got {cfg.importance_sampling_level!r}")
    if cfg.importance_sampling_level != "token" and not var.ratio:
        raise ValueError(
            f"importance_sampling_level={cfg.importance_sampling_level!r} needs a variant with an importance ratio; "
            f"loss_type={name!r} has none (use 'token')"
        )
    if name == "hpt" and cfg.mask_truncated_completions:
        raise ValueError("mask_truncated_completions must be False for loss_type='hpt': `truncated` marks the "
                         "demonstration sequences there (mask truncated rollouts in `mask` instead), got True")
    if name == "vespo" and cfg.rollout_is is not None and not cfg.rollout_is.startswith("token"):
        raise ValueError("rollout_is must be 'token_truncate' or 'token_mask' for loss_type='vespo', "
                         f"got {cfg.rollout_is!r}")
    if cfg.aggregation == "dr_grpo" and cfg.max_completion_length is None:
        raise ValueError("max_completion_length must be set for aggregation='dr_grpo' (it divides by B * L_max)")
    if cfg.luspo_unmasked and cfg.aggregation != "luspo":
        raise ValueError(f"luspo_unmasked needs aggregation='luspo', got aggregation={cfg.aggregation!r}")
    if cfg.kl_bias_correction and not var.ratio:
        raise ValueError(f"kl_bias_correction needs an importance ratio; loss_type={name!r} has none")


def plan_of(config: PGLossConfig) -> str:
    """``"one_pass"`` (token-local), ``"sequence"`` (reductions over the token's own sequence: one pass when chunks
    hold whole sequences) or ``"two_phase"`` (current-policy reductions over the batch: run
    ``batch_coefficients`` on phase-1 values first)."""
    if not isinstance(config, PGLossConfig):
        raise TypeError(f"config must be a PGLossConfig, got {type(config).__name__}")
    cfg = resolve(config)
    var = cfg.variant
    plan = "one_pass" if (var.entropy_shaped and cfg.shaping_entropy == "old") else var.plan
    if plan == "one_pass" and (cfg.importance_sampling_level != "token" or cfg.off_policy_mask_threshold is not None):
        plan = "sequence"
    if cfg.top_entropy_quantile < 1.0:
        plan = "two_phase"
    return plan


def requirements(cfg: PGLossConfig) -> frozenset:
    """Inputs the resolved config cannot run without (``"entropy"`` is the current entropy)."""
    var = cfg.variant
    need = set(var.needs)
    if cfg.rollout_is is not None:
        need |= {"old_logp", "rollout_logp"}
    if cfg.beta != 0.0:
        need.add("ref_logp")
    if cfg.kl_bias_correction:
        need.add("old_logp")
    if cfg.entropy_coef != 0.0 or cfg.top_entropy_quantile < 1.0:
        need.add("entropy")
    if var.entropy_shaped:
        need.add("old_entropy" if cfg.shaping_entropy == "old" else "entropy")
    if cfg.loss_type in ("alol", "alol_token") and cfg.alol_ratio == "ref":
        need.add("ref_logp")
    return frozenset(need)
