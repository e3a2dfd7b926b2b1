"""The ``trl`` benchmark case (bench/case_trl.py) at a tiny shape on CPU: its shape form, the like-for-like check
(TRL's GRPOTrainer, FusedPGGRPOTrainer and its Prefix Grouper variant give the same loss, gradients and old/ref
log-probs on the case's inputs), a measured row per impl through the runner, and "missing" rows without trl."""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from fusedpg.bench import case_attention, case_linear, case_model, case_pg  # noqa: E402
from fusedpg.bench import case_trl  # noqa: E402  (registers the case)
from fusedpg.bench.registry import availability  # noqa: E402
from fusedpg.bench.runner import Plan, Runner, mode_call  # noqa: E402

TINY = "tiny-qwen2:8+4x2x2"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_shape_form_and_presets():
    shape = case_trl.parse_shape(TINY)[0]
    assert (shape.model, shape.prompt, shape.completion, shape.g, shape.k, shape.rows) == ("tiny-qwen2", 8, 4, 2, 2, 4)
    assert case_trl.parse_shape("8+4x2x2") == [shape] and shape.label == TINY
    assert shape.fields()["n_prompts"] == 2 and shape.fields()["prompt_flops_saved"] == pytest.approx(0.5)
    for bad in ("8+2x2", "32x16x64", "nope:8+4x2x2", "0+4x2x2"):
        with pytest.raises(ValueError):
            case_trl.parse_shape(bad)
    for quick in (False, True):  # presets parse back to themselves; no other case takes this form
        for shape in case_trl.CASE.preset("cpu", quick) + case_trl.CASE.preset("cuda", quick):
            assert case_trl.parse_shape(shape.label) == [shape]
            for other in (case_model, case_attention, case_pg):
                with pytest.raises(ValueError):
                    other.parse_shape(shape.label)
            with pytest.raises(ValueError):
                case_linear.Shape.parse(shape.label)
    assert case_trl.CASE.modes == ("fwd+bwd",)
    assert case_trl.flops(shape, "fwd+bwd") == pytest.approx(3 * case_trl.flops(shape, "fwd"))


def test_impls_compute_the_same_step():
    shape = case_trl.parse_shape(TINY)[0]
    inp = case_trl.make_inputs(shape, torch.float32, torch.device("cpu"), seed=0)
    batch = inp["batch"]
    assert batch["prompt_mask"][shape.g:].sum(-1).lt(shape.prompt).all()  # the second prompt is left-padded
    assert (batch["prompt_ids"][0] == batch["prompt_ids"][1]).all()  # G consecutive rows share a prompt
    got = {}
    for impl in case_trl.CASE.impls:
        fn = impl.prepare(inp, shape)
        for p in inp.leaves.values():
            p.grad = None
        setup, call = mode_call("fwd+bwd", fn)
        call()  # the runner's call: forward and backward of the loss
        loss = fn()[0][0].detach()
        with torch.no_grad():  # fwd-nograd: the old/ref log-prob pass
            logp = fn()[0][0]
        got[impl.name] = (loss, {k: p.grad.clone() for k, p in inp.leaves.items()}, logp)
    want = got["trl"]
    for name in ("ours", "ours-prefix"):
        torch.testing.assert_close(got[name][0], want[0], rtol=1e-5, atol=1e-6)
        for k in want[1]:
            torch.testing.assert_close(got[name][1][k], want[1][k], rtol=1e-4, atol=1e-6, msg=f"{name} {k}")
        torch.testing.assert_close(got[name][2], want[2], rtol=1e-5, atol=1e-5)


def test_runner_rows():
    shape = case_trl.parse_shape(TINY)[0]
    plan = Plan(device="cpu", dtype="fp32", cases=["trl"], shapes=[], modes=None, impls=None, reps=1, warmup=0,
                items=[("trl", shape)])
    rows = Runner(plan, on_row=lambda row: None).run()
    assert {r["impl"] for r in rows} == {"trl", "ours", "ours-prefix"}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["case"] == "trl" and r["shape"] == TINY and r["mode"] == "fwd+bwd" and r["median_ms"] > 0
        assert r["peak_mem_bytes"] is not None and r["batch_rows"] == 4
    assert {r["impl"]: r["role"] for r in rows} == {"trl": "baseline", "ours": "ours", "ours-prefix": "ours"}


def test_missing_without_trl(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    for impl in case_trl.CASE.impls:
        status, detail = availability(impl, "cpu", None)
        assert status == "missing" and "trl" in detail
