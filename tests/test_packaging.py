"""Packaging and import hygiene (docs/design.md#repository-layout, #backends-and-implementation-choice): no import-time side effects, kernels installed as
``fusedpg.kernels`` only, and every package directory listed in pyproject.toml."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEDPG_IMPL", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


_PROBE = """
    import json, os, sys
    import torch

    calls = []
    def spy(name, real):
        def wrapped(*a, **k):
            calls.append(name)
            return real(*a, **k)
        return wrapped
    for name in ("is_available", "device_count", "init", "_lazy_init", "current_device", "get_device_properties",
                 "set_device", "synchronize"):
        setattr(torch.cuda, name, spy(name, getattr(torch.cuda, name)))
    triton_before = "triton" in sys.modules
    env_before = dict(os.environ)
    import fusedpg
    out = {"triton_before": triton_before, "triton_after_import": "triton" in sys.modules,
           "cuda_calls_import": list(calls), "env_changed": dict(os.environ) != env_before,
           "cuda_initialized": torch.cuda.is_initialized()}
    # a CPU call on the default backend (the torch plan) still needs neither triton nor a CUDA probe
    h = torch.randn(5, 8, requires_grad=True); w = torch.randn(11, 8); y = torch.randint(0, 11, (5,))
    logp, ent = fusedpg.linear_logprob_entropy(h, w, y)
    (logp.sum() + ent.sum()).backward()
    fusedpg.logprob_entropy(h.detach() @ w.T, y)
    ours = [m for m in sys.modules if m.startswith("fusedpg.kernels") or m.endswith(".launch_triton")
            or m == "fusedpg.linear_pg.epilogue"]
    out.update(kernels_after_call=ours, cuda_calls_call=list(calls))
    print(json.dumps(out))
"""


def test_import_has_no_side_effects(tmp_path):
    out = _python(_PROBE, tmp_path)
    assert not out["triton_before"], "torch itself imported triton; the check below would be meaningless"
    assert not out["triton_after_import"], "import fusedpg imported triton"
    assert out["cuda_calls_import"] == [], f"import fusedpg probed CUDA: {out['cuda_calls_import']}"
    assert not out["env_changed"], "import fusedpg changed os.environ"
    assert not out["cuda_initialized"]
    # torch's custom-op dispatch imports torch._dynamo (and with it triton) on an op's first call; what must stay
    # unimported on the torch plan is our Triton code
    assert out["kernels_after_call"] == [], f"a CPU call imported Triton code: {out['kernels_after_call']}"
    assert out["cuda_calls_call"] == [], f"a CPU call probed CUDA: {out['cuda_calls_call']}"


def test_probe_would_see_a_cuda_call(tmp_path):
    """The spy above is live: a deliberate probe after import is recorded."""
    code = _PROBE.replace("import fusedpg\n", "import fusedpg\n    torch.cuda.is_available()\n", 1)
    assert _python(code, tmp_path)["cuda_calls_import"] == ["is_available"]


def test_kernels_install_as_a_subpackage_only(tmp_path):
    out = _python("""
        import importlib.util, json
        import fusedpg.kernels
        from fusedpg.kernels import linear_logprob_entropy, logprob_entropy, softmax_tile
        spec = importlib.util.find_spec("kernels")
        print(json.dumps({"file": fusedpg.kernels.__file__, "top": None if spec is None else spec.origin}))
    """, tmp_path)  # run outside the repository so its root is not on sys.path
    assert Path(out["file"]).resolve() == (ROOT / "kernels" / "__init__.py").resolve() or "site-packages" in out["file"]
    # a top-level `kernels` may exist (Hugging Face's kernel hub), but it must not be ours
    if out["top"] is not None:
        assert Path(out["top"]).resolve() != (ROOT / "kernels" / "__init__.py").resolve()
    dist = importlib.metadata.distribution("fusedpg")
    top_level = (dist.read_text("top_level.txt") or "").split()
    assert "kernels" not in top_level and "bench" not in top_level


def _setuptools_config():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return config.get("package-dir", {}), config["packages"]


def test_every_package_directory_is_listed():
    package_dir, packages = _setuptools_config()
    assert set(package_dir) >= {"fusedpg", "fusedpg.kernels"} and "kernels" not in package_dir
    found = set()
    for top in ("fusedpg", "fusedpg.kernels", "fusedpg.bench"):
        root = ROOT / package_dir.get(top, top.replace(".", "/"))
        if not (root / "__init__.py").exists():
            continue
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            if "__pycache__" in rel.parts:
                continue
            found.add(".".join((top,) + rel.parts))
    assert {"fusedpg", "fusedpg.kernels", "fusedpg.linear", "fusedpg.logits"} <= found
    missing = sorted(found - set(packages))
    assert not missing, f"package directories not listed in pyproject [tool.setuptools] packages: {missing}"


def test_every_listed_package_exists():
    package_dir, packages = _setuptools_config()
    for pkg in packages:
        # the longest mapped prefix decides the directory, as in setuptools
        prefix = max((p for p in package_dir if pkg == p or pkg.startswith(p + ".")), key=len, default="")
        base = ROOT / package_dir[prefix] if prefix else ROOT
        rest = pkg[len(prefix):].lstrip(".") if prefix else pkg
        path = base.joinpath(*rest.split(".")) if rest else base
        assert (path / "__init__.py").is_file(), f"{pkg} is listed but {path}/__init__.py does not exist"
