"""The measurement loop: for each case, shape and mode, build the inputs once and measure every impl on them.

On CPU the impls of a group are interleaved call by call (warm-up rounds first), so a slow drift of the shared
machine (other processes, thermal state) falls on all of them alike. On CUDA each impl is measured in turn, and
impls that compile on their first call run after all the others (``Plan.defer_compiles``).
Every selected impl yields a row: measured, or with a status saying why not (missing, skipped, oom, error).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import measure
from .registry import DTYPES, Case, Impl, Shape, availability, cases


@dataclass
class Plan:
    device: str
    dtype: str
    cases: Sequence[str]
    shapes: Sequence[Shape]  # offered to every case (its ``adapt`` keeps what it understands); unused with items
    modes: Optional[Sequence[str]]  # None: each case's default modes
    impls: Optional[Sequence[str]]  # None: every impl that runs on this device by default
    reps: int
    warmup: int
    seed: int = 0
    max_seconds: Optional[float] = None
    memory: str = "clear_refs"  # CPU only: "clear_refs" or "subprocess"
    items: Optional[Sequence[Tuple[str, object]]] = None  # explicit (case, shape) work list, in order
    #: CPU: after the warm-up, stop adding reps to a measurement once its timed calls took this long (at least
    #: ``min_reps`` reps). Keeps big shapes to a few reps and small shapes at ``reps``.
    rep_seconds: Optional[float] = None
    min_reps: int = 2
    #: Run impls marked ``compiles`` after all others (the CUDA default: compilation is slow and a budget should
    #: cut it first). On CPU impls of a group are interleaved, so this stays off there.
    defer_compiles: bool = False


def mode_call(mode: str, fn: Callable) -> Tuple[Optional[Callable[[], None]], Callable[[], None]]:
    """(setup, call) of one mode: ``setup`` (or None) runs untimed before every timed ``call``.

    ``bwd`` builds a fresh graph in ``setup`` and runs the backward without ``retain_graph``, so saved tensors are
    freed as in training and impls that donate their buffers (torch.compile) can be timed like the others.
    """
    if mode == "fwd":
        return None, lambda: fn()  # outputs and saved tensors are dropped when the call returns
    if mode == "fwd-nograd":
        def nograd():
            with torch.no_grad():
                fn()
        return None, nograd
    if mode == "fwd+bwd":
        def full():
            outs, grads = fn()
            torch.autograd.backward(outs, grads)
        return None, full
    if mode == "bwd":
        state: Dict = {}

        def setup():
            state["graph"] = fn()

        def backward():
            outs, grads = state.pop("graph")  # dropped on return: the graph lives exactly as long as in training
            torch.autograd.backward(outs, grads)
        return setup, backward
    raise ValueError(f"unknown mode {mode!r}")


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in text \
        or "can't allocate memory" in text


def _failure(err: BaseException) -> Tuple[str, str]:
    first = str(err).splitlines()[0][:200] if str(err) else ""
    return ("oom" if _is_oom(err) else "error"), f"{type(err).__name__}: {first}"


def _cleanup(device: str) -> None:
    measure.settle()
    if device == "cuda":
        torch.cuda.empty_cache()


def _row(case: Case, shape: Shape, plan: Plan, mode: str, impl: Impl, status: str, detail: str = "",
         times: Optional[List[float]] = None, peak: Optional[int] = None, mem_method: str = "",
         reps: Optional[int] = None) -> Dict:
    flops = case.flops(shape, mode)
    med = times[0] if times else None
    return {
        "case": case.name, "shape": shape.label, "n": shape.n, "h": shape.h, "v": shape.v,
        "series": getattr(shape, "series", ""), **(shape.fields() if hasattr(shape, "fields") else {}),
        "dtype": plan.dtype,
        "mode": mode, "impl": impl.name, "role": impl.role, "status": status, "detail": detail or impl.note,
        "median_ms": med, "q20_ms": times[1] if times else None, "q80_ms": times[2] if times else None,
        "peak_mem_bytes": peak, "mem_method": mem_method if status == "ok" else "",
        "reps": reps if reps is not None else plan.reps,
        "tflops": (flops / med / 1e9) if (flops and med) else None,
    }


class Runner:
    """Runs a Plan; ``on_row(row)`` sees each row as soon as it exists (so a killed run keeps what it measured)."""

    def __init__(self, plan: Plan, on_row: Callable[[Dict], None], progress=None):
        self.plan, self.on_row, self.progress = plan, on_row, progress
        self.deadline = None if plan.max_seconds is None else time.monotonic() + plan.max_seconds
        self.rows: List[Dict] = []
        self.registry = cases()

    def work(self) -> List[Tuple[str, object]]:
        """(case, shape) in run order. Shape-major: the first shapes of a preset are the ones with stated targets,
        so a time budget that runs out cuts the extra sweep points, not a whole case."""
        if self.plan.items is not None:
            return list(self.plan.items)
        return [(name, s) for shape in self.plan.shapes for name in self.plan.cases
                for s in self.registry[name].adapt(shape)]

    def groups(self):
        for name, shape in self.work():
            case = self.registry[name]
            for mode in (self.plan.modes or case.modes):
                yield case, shape, mode

    def selected(self, case: Case, mode: str, shape=None) -> List[Tuple[Impl, str, str]]:
        out = []
        for impl in case.impls:
            status, detail = availability(impl, self.plan.device, self.plan.impls, shape)
            if status == "filtered":
                continue
            if status == "run" and mode == "bwd" and impl.grads_in_forward:
                status, detail = "skipped", "computes gradients in forward: compare on fwd+bwd"
            out.append((impl, status, detail))
        return out

    def count(self) -> int:
        return sum(sum(s == "run" for _, s, _ in self.selected(c, m, sh)) for c, sh, m in self.groups())

    def emit(self, row: Dict) -> None:
        self.rows.append(row)
        self.on_row(row)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def run(self) -> List[Dict]:
        deferred = []
        for case, shape, mode in self.groups():
            chosen = self.selected(case, mode, shape)
            runnable = [impl for impl, status, _ in chosen if status == "run"]
            for impl, status, detail in chosen:
                if status != "run":
                    self.emit(_row(case, shape, self.plan, mode, impl, status, detail))
            if self.plan.defer_compiles:
                later = [impl for impl in runnable if impl.compiles]
                runnable = [impl for impl in runnable if not impl.compiles]
                if later:
                    deferred.append((case, shape, mode, later))
            self._run_group(case, shape, mode, runnable)
        for case, shape, mode, impls in deferred:
            self._run_group(case, shape, mode, impls)
        return self.rows

    def _run_group(self, case: Case, shape, mode: str, runnable: List[Impl]) -> None:
        if not runnable:
            return
        if self.out_of_time():
            for impl in runnable:
                self.emit(_row(case, shape, self.plan, mode, impl, "skipped", "time budget (--max-minutes) spent"))
                self._tick(None)
            return
        try:
            self._group(case, shape, mode, runnable)
        finally:
            if case.teardown is not None:  # e.g. the tp case's helper rank and process group
                case.teardown()

    def _tick(self, label: Optional[str], result: str = "") -> None:
        if self.progress is not None:
            self.progress.step(label, result)

    def _group(self, case: Case, shape: Shape, mode: str, impls: List[Impl]) -> None:
        plan, dev = self.plan, torch.device(self.plan.device)
        try:
            inputs = case.make_inputs(shape, DTYPES[plan.dtype], dev, plan.seed)
        except Exception as err:  # inputs that do not fit: every impl of the group says so
            status, detail = _failure(err)
            for impl in impls:
                self.emit(_row(case, shape, plan, mode, impl, status, "inputs: " + detail))
                self._tick(None)
            _cleanup(plan.device)
            return
        leaves = list(inputs.leaves.values())

        def reset():
            for leaf in leaves:
                leaf.grad = None

        label = f"{case.name} {shape.label} {mode}"
        results: Dict[str, Dict] = {}
        if plan.device == "cuda":
            for impl in impls:
                results[impl.name] = self._cuda_one(case, shape, mode, impl, inputs, leaves, reset)
                self._tick(f"{label} {impl.name}", _short(results[impl.name]))
        else:
            results = self._cpu_group(case, shape, mode, impls, inputs, reset, label)
        inputs = None
        leaves.clear()  # the group's tensors go before the next group allocates its own
        _cleanup(plan.device)
        for impl in impls:
            r = results[impl.name]
            self.emit(_row(case, shape, plan, mode, impl, r["status"], r.get("detail", ""), r.get("times"),
                           r.get("peak"), r.get("mem_method", ""), r.get("reps")))

    def _cuda_one(self, case, shape, mode, impl, inputs, leaves, reset) -> Dict:
        if self.out_of_time():
            return {"status": "skipped", "detail": "time budget (--max-minutes) spent"}
        call = None
        try:
            setup, call = mode_call(mode, impl.prepare(inputs, shape))
            times, peak = measure.cuda_measure(call, reset, leaves, self.plan.reps, setup)
            return {"status": "ok", "times": times, "peak": peak, "mem_method": "cuda max_memory_allocated"}
        except Exception as err:
            status, detail = _failure(err)
            return {"status": status, "detail": detail}
        finally:
            del call
            reset()
            _cleanup("cuda")

    def _cpu_group(self, case, shape, mode, impls, inputs, reset, label) -> Dict[str, Dict]:
        plan = self.plan
        track = plan.memory == "clear_refs"
        res = {impl.name: {"status": "ok", "ms": [], "peaks": []} for impl in impls}
        rounds = plan.warmup + plan.reps

        def sample(impl, i):
            setup, call = calls[impl.name]
            try:
                ms, peak = measure.cpu_sample(call, reset, setup, track)
            except Exception as err:
                res[impl.name].update(zip(("status", "detail"), _failure(err)))
                reset()
                return
            if i >= plan.warmup:
                res[impl.name]["ms"].append(ms)
                res[impl.name]["peaks"].append(peak)

        calls = {}
        for impl in impls:
            try:
                calls[impl.name] = mode_call(mode, impl.prepare(inputs, shape))
            except Exception as err:
                res[impl.name].update(zip(("status", "detail"), _failure(err)))

        def enough(i):  # a big shape stops at min_reps once a round of timed calls has spent rep_seconds
            if plan.rep_seconds is None or i - plan.warmup + 1 < max(1, plan.min_reps):
                return False
            spent = max((sum(r["ms"]) for r in res.values() if r["status"] == "ok"), default=0.0)
            return spent / 1e3 >= plan.rep_seconds

        for i in range(rounds):
            for impl in impls:
                if res[impl.name]["status"] == "ok":
                    sample(impl, i)
            if i == rounds - 1 or (i >= plan.warmup and enough(i)):
                break
        for impl in impls:
            self._tick(f"{label} {impl.name}", _short(res[impl.name]))
            res[impl.name]["reps"] = len(res[impl.name]["ms"])
        calls.clear()
        for impl in impls:
            r = res[impl.name]
            if r["status"] != "ok":
                continue
            r["times"] = measure.quantiles(r["ms"])
            if track:
                r["peak"], r["mem_method"] = int(measure.quantiles(r["peaks"], (0.5,))[0]), "VmHWM via clear_refs"
            else:
                r["peak"], r["mem_method"] = self._child_peak(case, shape, mode, impl), "VmHWM in a fresh process"
        return res

    def _child_peak(self, case: Case, shape: Shape, mode: str, impl: Impl) -> Optional[int]:
        spec = {"case": case.name, "shape": shape.label, "mode": mode, "impl": impl.name,
                "dtype": self.plan.dtype, "seed": self.plan.seed}
        proc = subprocess.run([sys.executable, "-m", __package__, "--_child", json.dumps(spec)],
                              capture_output=True, text=True, timeout=3600)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            print(f"fusedpg bench: memory subprocess failed for {spec}: {proc.stderr[-500:]}", file=sys.stderr)
            return None
        return int(json.loads(lines[-1])["peak_mem_bytes"])


def _short(r: Dict) -> str:
    if r.get("status") != "ok":
        return r.get("status", "")
    ms = r.get("times", [None])[0] if r.get("times") else (sorted(r["ms"])[len(r["ms"]) // 2] if r.get("ms") else None)
    return "" if ms is None else f"{ms:.1f} ms"


def child_main(spec_json: str) -> int:
    """Entry of the memory subprocess: one call of one impl in a fresh process; prints {"peak_mem_bytes": ...}."""
    spec = json.loads(spec_json)
    case = cases()[spec["case"]]
    shape = next(s for s in case.parse_shape(spec["shape"]) if s.label == spec["shape"])
    inputs = case.make_inputs(shape, DTYPES[spec["dtype"]], torch.device("cpu"), spec["seed"])
    leaves = list(inputs.leaves.values())

    def reset():
        for leaf in leaves:
            leaf.grad = None

    setup, call = mode_call(spec["mode"], case.impl(spec["impl"]).prepare(inputs, shape))
    print(json.dumps({"peak_mem_bytes": measure.fresh_process_peak(call, reset, setup)}))
    return 0

