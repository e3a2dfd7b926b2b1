"""verl adapters: ``compute_policy_loss_<name>`` for the variants verl's registry lacks (registered with verl on
import when it is installed) and a fused ``linear_cross_entropy`` with verl's kernel contract. Signatures, config
mapping and limits: docs/integrations.md#verl-policy-losses-and-linear_cross_entropy.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Dict, Optional

import torch

from ..linear import linear_logprob_entropy
from ..objective import PGLossConfig, pg_loss

__all__ = ["POLICY_LOSSES", "make_policy_loss", "verl_options", "as_tuple_loss", "register", "linear_cross_entropy",
           "VERL_LOSS_NAMES"] + [f"compute_policy_loss_{n}" for n in
                                 ("gppo", "dcpo", "bapo", "ngrpo", "nsr", "w_reinforce", "empg", "gtpo", "d3s")]

#: the seed variants verl's policy-loss registry lacks (verl name -> fusedpg loss_type)
VERL_LOSS_NAMES = ("gppo", "dcpo", "bapo", "ngrpo", "nsr", "w_reinforce", "empg", "gtpo", "d3s")
_FIELDS = set(PGLossConfig.__dataclass_fields__)


def _get(obj, key, default=None):
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(key, default)
    getter = getattr(obj, "get", None)
    if callable(getter) and not isinstance(obj, type):
        try:
            return getter(key, default)
        except Exception:  # noqa: BLE001 - dataclass-like object with an unrelated get()
            pass
    return getattr(obj, key, default)


def _as_dict(obj) -> dict:
    if obj is None:
        return {}
    if isinstance(obj, dict):
        return dict(obj)
    try:  # omegaconf DictConfig
        from omegaconf import OmegaConf  # type: ignore

        if OmegaConf.is_config(obj):
            return dict(OmegaConf.to_container(obj, resolve=True))
    except ImportError:
        pass
    return dict(vars(obj)) if hasattr(obj, "__dict__") else dict(obj)


def verl_options(loss_type: str, loss_agg_mode: str = "token-mean", config=None) -> dict:
    """The :func:`fusedpg.pg_loss` keywords for this verl call (see the module docstring for the mapping)."""
    opts: Dict[str, object] = dict(loss_type=loss_type, aggregation=loss_agg_mode, log_ratio_clamp=20.0)
    if config is not None:
        clip = _get(config, "clip_ratio", None)
        low = _get(config, "clip_ratio_low", None)
        high = _get(config, "clip_ratio_high", None)
        low = clip if low is None else low
        high = clip if high is None else high
        if low is not None:
            opts["epsilon_low"] = float(low)
        if high is not None:
            opts["epsilon_high"] = float(high)
        c = _get(config, "clip_ratio_c", None)
        if c is not None:
            opts["dual_clip_c"] = float(c)
        info = _as_dict(_get(config, "global_batch_info", None))
        for src, dst in (("dp_size", "world_size"), ("batch_num_tokens", "num_items_in_batch"),
                         ("global_batch_size", "num_sequences"), ("loss_scale_factor", "loss_scale_factor")):
            if info.get(src) is not None:
                opts[dst] = int(info[src]) if dst == "world_size" else float(info[src])
        lsf = _get(config, "loss_scale_factor", None)
        if lsf is not None and "loss_scale_factor" not in opts:
            opts["loss_scale_factor"] = float(lsf)
        extra = _as_dict(_get(config, "fusedpg", None)) or _as_dict(_get(_get(config, "policy_loss", None), "fusedpg"))
        unknown = sorted(set(extra) - _FIELDS)
        if unknown:
            raise TypeError(f"config.fusedpg has unknown PGLossConfig field(s): {', '.join(unknown)}")
        opts.update(extra)
    return opts


def make_policy_loss(loss_type: str) -> Callable:
    """A verl policy-loss function for any fusedpg ``loss_type`` (the registered ones are built this way)."""
    def policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                    response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                    rollout_is_weights: Optional[torch.Tensor] = None, *, entropy: Optional[torch.Tensor] = None,
                    old_entropy: Optional[torch.Tensor] = None, group_ids: Optional[torch.Tensor] = None,
                    step_ids: Optional[torch.Tensor] = None, token_weights: Optional[torch.Tensor] = None,
                    rollout_log_probs: Optional[torch.Tensor] = None):
        opts = verl_options(loss_type, loss_agg_mode, config)
        if old_entropy is not None and entropy is None:
            opts.setdefault("shaping_entropy", "old")
        mask = response_mask.to(log_prob.dtype) if response_mask.dtype == torch.bool else response_mask
        loss, met = pg_loss(log_prob, advantages, mask, entropy=None if entropy is None else entropy.detach(),
                            old_logp=old_log_prob, is_weights=rollout_is_weights, old_entropy=old_entropy,
                            group_ids=group_ids, step_ids=step_ids, token_weights=token_weights, **opts)
        zero = torch.zeros(())
        return loss, {
            "actor/pg_clipfrac": float(met.get("clip_region", zero).item()),
            "actor/ppo_kl": float(met.get("ppo_kl", zero).item()),
            "actor/pg_clipfrac_lower": float(met.get("dual_clip", zero).item()),
        }

    policy_loss.__name__ = policy_loss.__qualname__ = f"compute_policy_loss_{loss_type}"
    policy_loss.__doc__ = (f"verl policy loss ``{loss_type}`` backed by fusedpg.pg_loss (see fusedpg.integrations."
                           "verl). Returns (pg_loss, metrics dict).")
    return policy_loss


POLICY_LOSSES: Dict[str, Callable] = {name: make_policy_loss(name) for name in VERL_LOSS_NAMES}
compute_policy_loss_gppo = POLICY_LOSSES["gppo"]
compute_policy_loss_dcpo = POLICY_LOSSES["dcpo"]
compute_policy_loss_bapo = POLICY_LOSSES["bapo"]
compute_policy_loss_ngrpo = POLICY_LOSSES["ngrpo"]
compute_policy_loss_nsr = POLICY_LOSSES["nsr"]
compute_policy_loss_w_reinforce = POLICY_LOSSES["w_reinforce"]
compute_policy_loss_empg = POLICY_LOSSES["empg"]
compute_policy_loss_gtpo = POLICY_LOSSES["gtpo"]
compute_policy_loss_d3s = POLICY_LOSSES["d3s"]


def as_tuple_loss(fn: Callable) -> Callable:
    """The older verl form: ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)`` as tensors."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        loss, met = fn(*args, **kwargs)
        t = functools.partial(torch.tensor, device=loss.device)
        return loss, t(met["actor/pg_clipfrac"]), t(met["actor/ppo_kl"]), t(met["actor/pg_clipfrac_lower"])

    return wrapped


def _verl_wants_tuple(core_algos) -> bool:
    vanilla = getattr(core_algos, "compute_policy_loss_vanilla", None)
    if vanilla is None:
        return False
    ann = str(inspect.signature(vanilla).return_annotation)
    return "dict" not in ann


def register(core_algos=None, tuple_output: Optional[bool] = None) -> Dict[str, Callable]:
    """Register the policy losses with verl (``core_algos`` defaults to ``verl.trainer.ppo.core_algos``).

    ``tuple_output=None`` follows the installed verl (the return annotation of its vanilla loss). Returns the
    names registered. Raises ``ImportError`` if verl is not importable."""
    if core_algos is None:
        from verl.trainer.ppo import core_algos  # type: ignore
    if tuple_output is None:
        tuple_output = _verl_wants_tuple(core_algos)
    registry = getattr(core_algos, "POLICY_LOSS_REGISTRY", {})
    done = {}
    for name, fn in POLICY_LOSSES.items():
        f = as_tuple_loss(fn) if tuple_output else fn
        names = [f"fusedpg_{name}"] + ([name] if name not in registry else [])
        for n in names:
            core_algos.register_policy_loss(n)(f)
            done[n] = f
    return done


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         temperature: Optional[float] = 1.0, reduction: Optional[str] = "none",
                         dist_process_group=None, *, impl_backend: Optional[str] = None):
    """verl's ``linear_cross_entropy`` contract on fusedpg's primitive: ``(logprobs, entropy)`` fp32. With
    ``dist_process_group``, ``weight`` is this rank's vocabulary shard and ``labels`` are global ids (uneven shards
    are fine); d_hidden is summed over the group."""
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    impl = None if impl_backend in (None, "auto") else impl_backend.lower()
    lead = hidden.shape[:-1]
    labels = labels.reshape(lead) if labels.numel() == hidden[..., 0].numel() else labels
    logp, ent = linear_logprob_entropy(hidden, weight, labels, temperature=1.0 if temperature is None else temperature,
                                       impl=impl, vocab_parallel_group=dist_process_group)
    if reduction == "sum":
        return logp.sum(), ent.sum()
    if reduction == "mean":
        return logp.mean(), ent.mean()
    return logp, ent


def _auto_register():
    try:
        from verl.trainer.ppo import core_algos  # type: ignore  # noqa: F401
    except Exception:  # noqa: BLE001 - verl absent or broken: nothing to register
        return {}
    return register(core_algos)


REGISTERED = _auto_register()
