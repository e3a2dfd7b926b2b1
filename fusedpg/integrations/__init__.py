"""Trainer integrations. Each submodule is imported on demand, so optional frameworks are never required:

* ``fusedpg.integrations.liger``   drop-in ``LigerFusedLinearGRPOLoss`` (same constructor, forward, return value).
* ``fusedpg.integrations.compile`` the public ops as ``torch.library`` custom ops (``torch.compile(fullgraph=True)``).
* ``fusedpg.integrations.verl``    verl policy-loss functions for the variants verl lacks, and ``linear_cross_entropy``.
* ``fusedpg.integrations.trl``     TRL ``GRPOTrainer`` loss path on hidden states (``trl`` extra).

See README.md in this folder.
"""
import importlib

__all__ = ["liger", "compile", "verl", "trl"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
