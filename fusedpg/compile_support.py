"""What the public functions need from ``torch.compile``, without importing it at ``import fusedpg`` time.

``constant_result`` marks a host-side helper (the impl choice, the resolved loss config, the metric keys) as a
constant of a traced graph, exactly as ``torch.compiler.assume_constant_result`` does, but without importing
``torch._dynamo`` (which takes seconds and imports triton) for users who never compile.
``tests/test_architecture.py`` checks that the marker is still the one torch's own decorator sets.
"""
from __future__ import annotations

from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def constant_result(fn: F) -> F:
    fn._dynamo_marked_constant = True  # the attribute torch.compiler.assume_constant_result sets
    return fn
