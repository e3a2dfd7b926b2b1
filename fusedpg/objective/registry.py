"""The variant registry: one entry per ``loss_type`` with the metadata the engine plans from.

A variant is a function ``fn(ctx) -> Surrogate`` of per-token scalars (see ``core.TokenContext``), registered
once and possibly under several names that differ only in their default hyper-parameters (``grpo``, ``dapo`` and
``dr_grpo`` are one clipped surrogate with three recipes). Metadata:

* ``needs``: inputs the variant cannot run without: ``"old_logp"``, ``"ref_logp"``, ``"entropy"`` (current).
* ``plan``: the plan the variant's own policy term needs: ``"one_pass"`` (token-local), ``"sequence"`` (reductions
  over the token's own sequence: one pass when chunks hold whole sequences) or ``"two_phase"`` (current-policy
  reductions over the batch). Options can raise it (a sequence-level ratio, OPSM, the top-entropy mask...);
  ``plan_of(config)`` gives the effective plan. The same three words are used everywhere.
* ``defaults``: hyper-parameters the variant's recipe uses when the config leaves them ``None``; a callable
  receives the (unresolved) config, for defaults that depend on another option.
* ``ratio``: whether the variant has an importance ratio (so ``importance_sampling_level`` applies).
* ``clipped``: whether it is a PPO-clip surrogate (so ``delta`` and the dual clip apply).
* ``entropy_shaped``: shaped by an entropy: the current one (detached; its ``plan``) or, with
  ``shaping_entropy="old"``, the caller's ``old_entropy`` (then mask-only, one-pass).
* ``prep``: optional mask-only precompute run by ``prepare`` (DCPO bounds, PSR/NSR advantage maps...).
* ``coef``: optional two-phase hook run by ``batch_coefficients`` on detached current values (Clip-Cov pick...).
* ``epilogue``: an ``EpilogueSpec`` when the fused Triton epilogue (``kernels/pg_onepass.py``) implements the
  variant's surrogate, else ``None`` (the generic path: ``token_loss`` plus autograd between the kernels). Whether
  a given config may use it is decided in one place, ``fusedpg.objective.engine.epilogue_spec``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

PLAN_CLASSES = ("one_pass", "sequence", "two_phase")


@dataclass(frozen=True)
class EpilogueSpec:
    """How the fused Triton epilogue implements a variant's per-token surrogate.

    surrogate: ``"clip"`` (PPO clip with dual clip and delta), ``"cispo"`` (the ``cispo_mode`` weight) or
        ``"sapo"`` (the soft gate).
    gradient_preserving: GPPO's clip that keeps ``-A * bound`` as the gradient outside the range.
    bounds: ``"range"`` (``[1 - eps_low, 1 + eps_high]`` from the config) or ``"token"`` (per-token ``lo``/``hi``
        precomputed by ``prepare``, as DCPO's).
    sequence_ratio: the kernel also takes the sequence-level ratio (``importance_sampling_level`` "sequence" or
        "sequence_token"), between two segment sums.
    geo_mean: GMPO's geometric mean of log-space-clipped token ratios.
    """

    surrogate: str
    gradient_preserving: bool = False
    bounds: str = "range"
    sequence_ratio: bool = False
    geo_mean: bool = False


@dataclass(frozen=True)
class Variant:
    name: str
    fn: Callable
    plan: str
    needs: Tuple[str, ...] = ()
    defaults: Union[Mapping, Callable] = field(default_factory=dict)
    ratio: bool = True
    clipped: bool = False
    doc: str = ""
    entropy_shaped: bool = False  # shaped by entropy: current (its plan) or old_entropy (then one-pass)
    prep: Optional[Callable] = None  # prep(batch, cfg) -> dict: class-1 precompute, merged by prepare()
    coef: Optional[Callable] = None  # coef(batch, logp, entropy, cfg) -> dict: the two-phase coefficients
    epilogue: Optional[EpilogueSpec] = None  # the fused Triton epilogue's implementation, if any

    def default_values(self, cfg) -> Dict[str, object]:
        return dict(self.defaults(cfg) if callable(self.defaults) else self.defaults)


_REGISTRY: Dict[str, Variant] = {}


def register(name: str, *, plan: str, needs=(), defaults=None, ratio=True, clipped=False, doc="", prep=None,
             coef=None, entropy_shaped=False, epilogue: Optional[EpilogueSpec] = None):
    """Decorator: register ``fn`` under ``name``. Call it again on the same function for another recipe."""
    if plan not in PLAN_CLASSES:
        raise ValueError(f"plan must be one of {PLAN_CLASSES}, got {plan!r}")

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"loss_type {name!r} is already registered")
        _REGISTRY[name] = Variant(name, fn, plan, tuple(needs), defaults or {}, ratio, clipped,
                                  doc or fn.__doc__ or "", entropy_shaped, prep, coef, epilogue)
        return fn

    return deco


def _ensure_loaded() -> None:
    from . import groupwise, pairwise, variants  # importing them registers the built-in variants
    del groupwise, pairwise, variants


def variant_names() -> Tuple[str, ...]:
    _ensure_loaded()
    return tuple(sorted(_REGISTRY))


def get_variant(name) -> Variant:
    _ensure_loaded()
    if not isinstance(name, str):
        raise TypeError(f"loss_type must be a str, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"loss_type must be one of {', '.join(sorted(_REGISTRY))}; got {name!r}") from None
