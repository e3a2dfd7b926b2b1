"""Trainer integrations. Each submodule is imported on demand, so optional frameworks are never required:

* ``fusedpg.integrations.liger``   drop-in ``LigerFusedLinearGRPOLoss`` (same constructor, forward, return value).
* ``fusedpg.integrations.verl``    verl policy-loss functions for the variants verl lacks, and ``linear_cross_entropy``.
* ``fusedpg.integrations.trl``     TRL ``GRPOTrainer`` loss path on hidden states (``trl`` extra).
* ``fusedpg.integrations.megatron`` log-probs and the loss of Megatron's vocabulary-parallel output layer.
* ``fusedpg.integrations.trl_support`` TRL's GRPO loss facts and option mapping, shared by ``trl`` and ``liger``
  (imports neither TRL nor transformers).

See README.md in this folder.
"""
import importlib

__all__ = ["liger", "verl", "trl", "trl_support", "megatron"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
