"""The benchmark's vocabulary: shapes, modes, implementations and cases, and where each one runs.

A *case* is one operation measured against its peers on the same inputs (``linear``: hidden states and LM-head
weight in, log-prob and entropy out; ``logits``: materialised logits in; ``pg``: the policy-gradient loss from hidden
states; ``attention``: shared-prefix attention; ``model``: one GRPO loss step of a transformers model). An *impl* is
one way of computing it: ours, the eager reference, ``torch.compile`` of it, a named peer library, or a compute
floor. Adding a case or a peer is adding one entry: see ``case_linear.py`` for the pattern, and list a new case
module in ``CASE_MODULES``.

A case declares its own shape type (anything with ``label``, ``n``, ``h``, ``v``, ``series`` and ``fields()``),
how ``--shape`` text parses into it (``parse_shape``), its preset shapes per device and its default modes.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

#: Modules that register cases when imported (later work appends, e.g. "case_pg_loss", "case_prefix").
CASE_MODULES = ("case_linear", "case_logits", "case_pg", "case_attention", "case_model", "case_trl", "case_tp",
                "case_sampler")

#: Mode name -> what one timed call does. ``fwd`` runs with autograd recording (outputs saved for a backward, then
#: dropped); ``bwd`` is the backward alone, after an untimed forward; ``fwd+bwd`` is both; ``fwd-nograd``
#: is the old/reference-policy pass of RL trainers (not run unless asked for with --mode).
MODES = {
    "fwd+bwd": "forward and backward",
    "fwd": "forward with autograd recording",
    "bwd": "backward alone, after an untimed forward",
    "fwd-nograd": "forward under torch.no_grad()",
}
DEFAULT_MODES = ("fwd+bwd", "fwd", "bwd")


@dataclass(frozen=True)
class Shape:
    """N tokens, H hidden size, V vocabulary size."""

    n: int
    h: int
    v: int

    @property
    def label(self) -> str:
        return f"{self.n}x{self.h}x{self.v}"

    @property
    def series(self) -> str:
        """What the plots keep fixed along one line (everything but N)."""
        return f"H={self.h} V={self.v}"

    def fields(self) -> Dict[str, object]:
        """Columns this shape adds to a row (besides shape/n/h/v)."""
        return {}

    @staticmethod
    def parse(text: str) -> "Shape":
        m = re.fullmatch(r"\s*(\d+)\s*[x,]\s*(\d+)\s*[x,]\s*(\d+)\s*", text)
        if not m:
            raise ValueError(f"--shape must look like NxHxV (e.g. 4096x1024x32000), got {text!r}")
        return Shape(*(int(g) for g in m.groups()))


#: The CPU goal: ours <= 1.2x eager time and <= 1/3 of eager's peak memory above inputs.
JUDGED_CPU = Shape(4096, 1024, 32000)
#: The GPU shapes S1, S2, S3 (docs/peers.md#reference-shapes) and a memory-stress shape that materialised logits
#: cannot hold.
GPU_SHAPES = (Shape(8192, 4096, 151936), Shape(16384, 2048, 151936), Shape(8192, 4096, 128256),
              Shape(32768, 5120, 152064))
#: A small shape every NxHxV case also runs by default on CPU (seconds, not minutes).
SMALL_CPU = Shape(1024, 256, 8192)
# Per (device, quick): the shapes of the ``linear`` case, the judged or S1 shape first (a time budget cuts the
# later ones). The default CPU run is the judged shape and one small shape; --quick a short N sweep at small H, V.
SHAPE_PRESETS: Dict[Tuple[str, bool], Tuple[Shape, ...]] = {
    ("cpu", False): (JUDGED_CPU, SMALL_CPU),
    ("cpu", True): (SMALL_CPU, Shape(256, 256, 8192)),
    ("cuda", False): (GPU_SHAPES[0], GPU_SHAPES[2], GPU_SHAPES[1], Shape(2048, 4096, 151936),
                      Shape(4096, 4096, 151936), GPU_SHAPES[3]),
    ("cuda", True): (Shape(1024, 1024, 32000), Shape(2048, 1024, 32000), Shape(4096, 1024, 32000)),
}
DEFAULT_DTYPE = {"cpu": "fp32", "cuda": "bf16"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Inputs:
    """Tensors of one measurement. ``leaves`` require grad (their ``.grad`` is reset before every call); ``extra``
    holds anything else a case or impl needs (targets, fixed output gradients, peer-specific tensors)."""

    leaves: Dict[str, torch.Tensor]
    extra: Dict[str, torch.Tensor] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.leaves[name] if name in self.leaves else self.extra[name]


def _default_parse(text: str):
    return [Shape.parse(text)]


def _default_adapt(shape) -> list:
    return [shape] if isinstance(shape, Shape) else []


#: ``prepare(inputs, shape) -> fn``; ``fn()`` runs the forward and returns (outputs, grads for those outputs).
#: Whatever ``prepare`` allocates counts as input (it exists before the memory baseline is read).
Prepare = Callable[[Inputs, Shape], Callable[[], Tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]]]


@dataclass(frozen=True)
class Impl:
    """One way of computing a case.

    devices: where it runs by default. opt_in: where it runs only when named with --impl (torch.compile on CPU:
    slow to compile). requires: importable modules; without them the impl is reported as missing, never dropped.
    role: "ours", "baseline" (the eager reference the ratios are judged against), "peer" or "floor".
    grads_in_forward: the impl computes gradients during its forward (Liger's chunked losses), so its ``bwd``
    number is meaningless and it is compared on ``fwd+bwd``.
    """

    name: str
    prepare: Prepare
    role: str = "peer"
    devices: Tuple[str, ...] = ("cpu", "cuda")
    opt_in: Tuple[str, ...] = ()
    requires: Tuple[str, ...] = ()
    grads_in_forward: bool = False
    note: str = ""
    #: The first call per shape compiles (torch.compile, FlexAttention, compiled Liger): on CUDA such impls run
    #: after every other impl of the run, so a time budget cuts compilations, not the core comparison.
    compiles: bool = False
    #: ``applies(shape, device) -> reason or None``: a reason makes a "skipped" row ("not applicable: ...").
    applies: Optional[Callable[[object, str], Optional[str]]] = None


@dataclass(frozen=True)
class Case:
    """An operation and its impls. ``make_inputs(shape, dtype, device, seed) -> Inputs``; ``flops(shape, mode)``
    gives the useful FLOPs of one call (None where FLOPs are not the measure, e.g. logits-input kernels).

    parse_shape(text) -> [shapes]: ``--shape`` text in this case's form (ValueError: not its form). adapt(shape) ->
    [shapes]: the case's shapes for a shape object given programmatically ([]: not for this case). presets:
    (device, quick) -> default shapes, most important first. modes: default modes of this case."""

    name: str
    description: str
    make_inputs: Callable[[Shape, torch.dtype, torch.device, int], Inputs]
    impls: Tuple[Impl, ...]
    flops: Callable[[Shape, str], Optional[float]] = lambda shape, mode: None
    parse_shape: Callable[[str], list] = _default_parse
    adapt: Callable[[object], list] = _default_adapt
    presets: Optional[Dict[Tuple[str, bool], tuple]] = None
    modes: Tuple[str, ...] = DEFAULT_MODES
    #: Shape-form hint for --help / errors.
    shape_form: str = "NxHxV"
    #: Called after each measured group (shape and mode) of the case: releases what ``prepare`` set up for it.
    teardown: Optional[Callable[[], None]] = None

    def preset(self, device: str, quick: bool) -> tuple:
        return tuple((self.presets or SHAPE_PRESETS).get((device, quick), ()))

    def impl(self, name: str) -> Impl:
        for impl in self.impls:
            if impl.name == name:
                return impl
        raise KeyError(name)


_CASES: Dict[str, Case] = {}


def register_case(case: Case) -> Case:
    if case.name in _CASES:
        raise ValueError(f"benchmark case {case.name!r} registered twice")
    _CASES[case.name] = case
    return case


def cases() -> Dict[str, Case]:
    """All registered cases, importing the case modules on first use (a run, ``--list`` or ``--help``)."""
    for module in CASE_MODULES:
        importlib.import_module(f"{__package__}.{module}")
    # CASE_MODULES order, not registration order: tests may import a case module on its own first.
    rank = {module[len("case_"):]: i for i, module in enumerate(CASE_MODULES)}
    return {name: _CASES[name] for name in sorted(_CASES, key=lambda n: rank.get(n, len(rank)))}


def availability(impl: Impl, device: str, requested: Optional[Sequence[str]], shape=None) -> Tuple[str, str]:
    """(status, detail): status is "run", "skipped" or "missing". Missing peers are reported, never dropped."""
    named = requested is not None and impl.name in requested
    if requested is not None and not named:
        return "filtered", "not selected by --impl"
    if shape is not None and impl.applies is not None:
        reason = impl.applies(shape, device)
        if reason:
            return "skipped", f"not applicable: {reason}"
    if device in impl.opt_in and not named:
        return "skipped", f"opt-in on {device}: add --impl {impl.name}"
    if device not in impl.devices and device not in impl.opt_in:
        return "skipped", f"runs on {'/'.join(impl.devices)} only"
    for module in impl.requires:
        if importlib.util.find_spec(module) is None:
            extra = _EXTRA_OF.get(module.split(".")[0], "peers")
            return "missing", f"module {module!r} not importable (pip install fusedpg[{extra}])"
    return "run", impl.note


#: The extra of pyproject.toml that installs each optional module a case needs.
_EXTRA_OF = {"transformers": "transformers", "trl": "trl", "datasets": "trl", "peft": "trl", "matplotlib": "bench"}


def all_impl_names() -> List[str]:
    return sorted({impl.name for case in cases().values() for impl in case.impls})


def default_items(names: Sequence[str], device: str, quick: bool) -> List[Tuple[str, object]]:
    """(case, shape) of a default run, rank-major: every case's first preset shape (the judged ones), then every
    case's second, ... so that a time budget cuts extra sweep points, never a whole case."""
    registry = cases()
    presets = [(name, registry[name].preset(device, quick)) for name in names]
    depth = max((len(p) for _, p in presets), default=0)
    return [(name, p[i]) for i in range(depth) for name, p in presets if i < len(p)]


def items_from_text(names: Sequence[str], texts: Sequence[str]) -> Tuple[List[Tuple[str, object]], List[str]]:
    """(case, shape) for ``--shape`` texts, shape-major, each once; and the texts no selected case understood."""
    registry = cases()
    items, unknown, seen = [], [], set()
    for text in texts:
        hit = False
        for name in names:
            try:
                shapes = registry[name].parse_shape(text)
            except ValueError:
                continue
            hit = True
            items.extend((name, s) for s in shapes if (name, s.label) not in seen)
            seen.update((name, s.label) for s in shapes)
        if not hit:
            unknown.append(text)
    return items, unknown
