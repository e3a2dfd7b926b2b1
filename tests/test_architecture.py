"""The structure the library promises: one op stack (each public op is one custom op), no import cycles, the core
never imports the integrations, and the compile marker is still the one torch's own decorator sets."""
from __future__ import annotations

import ast
from pathlib import Path

import torch

import fusedpg
from fusedpg.compile_support import constant_result

ROOT = Path(fusedpg.__file__).resolve().parent


def _modules():
    """``{module name: file}`` for every module of the fusedpg package directory (not kernels/ or bench/)."""
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["fusedpg"] + parts)] = f
    return out


def _imports(name: str, path: Path, known) -> set:
    """Modules of ``known`` that ``name`` imports at module level (imports inside functions are lazy on purpose)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in tree.body:
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            mod = node.module or ""
            full = (base + "." + mod).strip(".") if node.level else mod
            targets = [full] + [f"{full}.{a.name}" for a in node.names]
        elif isinstance(node, (ast.If, ast.Try)):
            continue
        for t in targets:
            while t and t not in known:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                found.add(t)
    return found


def _graph():
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _parents(name):
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_cycles():
    graph = _graph()
    # a package importing its own submodules is how packages are built; a cycle must go through another module
    edges = {m: {t for t in ts if t not in _parents(m)} for m, ts in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_core_never_imports_integrations():
    for name, targets in _graph().items():
        if name.startswith(("fusedpg.integrations", "fusedpg.verification")):
            continue
        upward = sorted(t for t in targets if t.startswith("fusedpg.integrations"))
        assert not upward, f"{name} imports {upward}: integrations sit on top of the public API"


def test_checks_see_cycles_and_upward_imports(tmp_path, monkeypatch):
    """The two checks above are live: a planted cycle and a planted upward import are found."""
    fake = {"fusedpg.a": {"fusedpg.b"}, "fusedpg.b": {"fusedpg.a"}}
    monkeypatch.setattr(__import__(__name__), "_graph", lambda: fake)
    try:
        test_no_import_cycles()
    except AssertionError as e:
        assert "fusedpg.a -> fusedpg.b -> fusedpg.a" in str(e)
    else:
        raise AssertionError("a planted cycle was not found")
    monkeypatch.setattr(__import__(__name__), "_graph", lambda: {"fusedpg.linear": {"fusedpg.integrations.trl"}})
    try:
        test_the_core_never_imports_integrations()
    except AssertionError as e:
        assert "fusedpg.linear imports" in str(e)
    else:
        raise AssertionError("a planted upward import was not found")


def test_public_ops_are_custom_ops_without_autograd_function_twins():
    for name in ("linear_logprob_entropy", "logprob_entropy", "fused_linear_pg_loss", "shared_prefix_attention"):
        assert hasattr(torch.ops.fusedpg, name), name
    for path in ROOT.rglob("*.py"):
        text = path.read_text()
        assert "autograd.Function" not in text, f"{path}: an autograd.Function beside the custom ops"
        assert "is_compiling" not in text, f"{path}: branches on torch.compiler.is_compiling()"
        assert "torch._C" not in text, f"{path}: uses private dispatcher internals"


def test_constant_marker_matches_torch():
    def a():
        return 1

    def b():
        return 1

    marked = torch.compiler.assume_constant_result(a)
    ours = constant_result(b)
    assert {k: v for k, v in vars(marked).items()} == {k: v for k, v in vars(ours).items()}
