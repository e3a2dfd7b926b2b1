"""memory="low": the head's passes blocked over the vocabulary. Every output and gradient against the float64
reference under the tolerance model (fp32 and bf16, small vocabulary blocks, row tiles of several sizes), the fused
loss on both plan classes, deterministic and truncated forms, a bad memory= value, less peak memory than the default backward on CPU, and the
bench's plot of peak memory against N and V."""
from __future__ import annotations

import os

import pytest
import torch

import fusedpg
from fusedpg.verification.cases_logprob import LinearCase, check_linear

from conftest import assert_all_ok


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [LinearCase(n=13, h=24, v=50), LinearCase(n=9, h=32, v=700, peaked=True,
                                                                            temperature="per-token"),
                                  LinearCase(n=7, h=40, v=600, neg_inf_cols=3, bias=True, shift=-30.0)],
                         ids=["plain", "peaked-per-token", "neg-inf-cols"])
# chunk_bytes of 256-column blocks (the fewest) tiled by 1 row, by 3 rows (a short last tile), or in one tile
@pytest.mark.parametrize("chunk_bytes", [1 << 10, 6 << 10, 32 << 10], ids=["rows-1", "rows-3", "rows-all"])
def test_low_memory_backward_under_the_tolerance_model(backend, dtype, case, chunk_bytes):
    if backend.interpreted and dtype != torch.float32:
        pytest.skip("interpreter: fp32 is enough; memory=\"low\" runs torch GEMMs whatever the impl")

    def low(*args, **kwargs):
        return fusedpg.linear_logprob_entropy(*args, memory="low", chunk_bytes=chunk_bytes, **kwargs)

    assert_all_ok(check_linear(LinearCase(**{**case.__dict__, "dtype": dtype}), impl=backend.impl,
                               device=backend.device, op=low))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [LinearCase(n=13, h=24, v=50), LinearCase(n=9, h=32, v=700, peaked=True,
                                                                            temperature="per-token"),
                                  LinearCase(n=7, h=40, v=600, neg_inf_cols=3, bias=True, shift=-30.0)],
                         ids=["plain", "peaked-per-token", "neg-inf-cols"])
def test_deterministic_low_memory_under_the_tolerance_model(dtype, case):
    """deterministic=True: fixed tiles (16 rows, padded; 256 columns on CPU), the same accuracy."""
    def low(*args, **kwargs):
        return fusedpg.linear_logprob_entropy(*args, memory="low", deterministic=True, **kwargs)

    assert_all_ok(check_linear(LinearCase(**{**case.__dict__, "dtype": dtype}), impl="torch", op=low))


def test_weight_gradient_is_written_in_the_weight_dtype():
    h = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.bfloat16, requires_grad=True)
    logp, _ = fusedpg.linear_logprob_entropy(h, w, torch.randint(0, 40, (8,)), memory="low", impl="torch")
    logp.sum().backward()
    assert w.grad.dtype == torch.bfloat16 and h.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("loss_type,extra", [("grpo", {}), ("gspo", {}), ("clip_cov", {}),
                                              ("grpo", dict(top_k=5, top_p=0.8))],
                         ids=["grpo", "gspo", "clip_cov", "grpo-top-k-top-p"])
def test_fused_loss_low_memory_equals_the_default(loss_type, extra):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 6, 16, generator=g), torch.randn(300, 16, generator=g) / 4
    y, adv = torch.randint(0, 300, (2, 6), generator=g), torch.randn(2, generator=g)
    out = {}
    for memory in ("default", "low"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, metrics = fusedpg.fused_linear_pg_loss(hh, ww, y, adv, torch.ones(2, 6),
                                                     old_logp=torch.full((2, 6), -5.0), loss_type=loss_type, seed=0,
                                                     memory=memory, impl="torch", chunk_bytes=12 * 4 * 64, **extra)
        loss.backward()
        out[memory] = (loss.detach(), hh.grad, ww.grad) + ((metrics["outside_kept"],) if extra else ())
    for a, b in zip(out["default"], out["low"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


TRUNCATION = {"top_k": 20, "top_p": 0.9, "min_p": 0.01}


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", [LinearCase(n=13, h=24, v=50), LinearCase(n=9, h=32, v=700, peaked=True,
                                                                            temperature="per-token"),
                                  LinearCase(n=7, h=40, v=600, neg_inf_cols=3, bias=True, shift=-30.0),
                                  LinearCase(n=9, h=24, v=300, k=3)],
                         ids=["plain", "peaked-per-token", "neg-inf-cols", "3-targets"])
@pytest.mark.parametrize("chunk_bytes", [1 << 10, 6 << 10, 64 << 10], ids=["rows-1", "rows-few", "rows-all"])
def test_truncated_low_memory_under_the_tolerance_model(deterministic, dtype, case, chunk_bytes):
    """top-k, top-p and min-p at low memory: a row tile's logits assembled from the backward's own (tile, block)
    products, so the backward keeps exactly the forward's kept set (with the chunked forward it dropped threshold
    tokens whose logit rounded lower in the backward's tiles)."""
    def low(*args, **kwargs):
        return fusedpg.linear_logprob_entropy(*args, memory="low", chunk_bytes=chunk_bytes,
                                              deterministic=deterministic, **kwargs)

    assert_all_ok(check_linear(LinearCase(**{**case.__dict__, "dtype": dtype}), impl="torch", op=low,
                               truncation=TRUNCATION))


def test_bad_memory_value_names_the_option():
    h, w, y = torch.randn(4, 8), torch.randn(20, 8), torch.randint(0, 20, (4,))
    with pytest.raises(ValueError, match="memory must be 'default' or 'low', got 'tiny'"):
        fusedpg.linear_logprob_entropy(h, w, y, memory="tiny")


def test_low_memory_backward_peaks_lower_on_cpu():
    """Peak resident memory of the backward alone (the bench's probe): no [V, H] fp32 accumulator."""
    measure = pytest.importorskip("fusedpg.bench.measure")
    if not measure.clear_refs_writable():
        pytest.skip("needs /proc/self/clear_refs")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(256, 256, generator=g, dtype=torch.bfloat16)
    w = torch.randn(16384, 256, generator=g, dtype=torch.bfloat16)
    y = torch.randint(0, 16384, (256,), generator=g)
    peaks = {}
    for memory in ("default", "low"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        state = {}

        def setup():
            state["out"] = fusedpg.linear_logprob_entropy(hh, ww, y, memory=memory, impl="torch", chunk_bytes=1 << 20)

        def call():
            logp, ent = state.pop("out")
            (logp.sum() + ent.sum()).backward()

        def reset():
            hh.grad = ww.grad = None

        peaks[memory] = min(measure.cpu_sample(call, reset, setup)[1] for _ in range(2))
    # default: an fp32 copy of the head and a [V, H] fp32 accumulator (16 MiB each) besides the bf16 d_weight
    # (8 MiB): about 45 MiB; low: d_weight and four 1 MiB tile buffers, about 15 MiB
    assert peaks["low"] < 0.5 * peaks["default"], peaks


def _scaling_rows():
    """fwd+bwd rows of a sweep over N (H, V fixed) and over V (N, H fixed); CCE skipped as on CPU."""
    rows = []
    for n, v in [(1024, 8192), (2048, 8192), (4096, 8192), (4096, 4096), (4096, 16384)]:
        for k, impl in enumerate(("ours", "ours-low", "eager", "cce")):
            ok = impl != "cce"
            rows.append({"case": "linear", "shape": f"{n}x256x{v}", "n": n, "h": 256, "v": v, "dtype": "bf16",
                         "mode": "fwd+bwd", "impl": impl, "status": "ok" if ok else "skipped", "median_ms": 1.0,
                         "q20_ms": 0.9, "q80_ms": 1.1, "peak_mem_bytes": (k + 1) * n * v if ok else None,
                         "role": {"ours": "ours", "eager": "baseline"}.get(impl, "peer"), "device_type": "cpu",
                         "device_name": "test cpu", "git_commit": "abc123"})
    return rows


def test_memory_scaling_plot_draws_the_sweeps_and_skips_absent_impls(tmp_path, capsys):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fusedpg.bench import plots, report

    rows = _scaling_rows()
    sweeps = dict(plots._sweeps(rows))
    assert sorted(sweeps) == ["n", "v"]
    assert sorted({r["n"] for r in sweeps["n"]}) == [1024, 2048, 4096] and {r["v"] for r in sweeps["n"]} == {8192}
    assert sorted({r["v"] for r in sweeps["v"]}) == [4096, 8192, 16384] and {r["n"] for r in sweeps["v"]} == {4096}
    assert plots._sweeps([r for r in rows if r["n"] != 1024 and r["v"] != 4096]) == []  # two sizes: no sweep
    ok = [r for r in rows if r["status"] == "ok"]
    fig = plots._scaling_figure(plt, "linear", ok, ["fwd+bwd"], plots._sweeps(ok), "stamp")
    labels = {label for ax in fig.axes for label in ax.get_legend_handles_labels()[1]}
    plt.close(fig)
    assert {"ours", "ours-low", "eager", "bytes of d_weight"} <= labels and "cce" not in labels
    # from a results file: only the kind asked for, next to the file, named after it
    path = tmp_path / "cpu-x-lowmem-scaling.json"
    report.write_json(str(path), rows)
    assert plots.main([str(path), "--kind", "memory_scaling"]) == 0
    png = "cpu-x-lowmem-scaling-linear_memory_scaling.png"
    assert sorted(os.listdir(tmp_path)) == sorted([path.name, png]) and (tmp_path / png).stat().st_size > 10_000
    assert png in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_bytes", [1 << 10, 32 << 10], ids=["rows-1", "rows-all"])
def test_ignored_rows_are_gathered_per_tile(dtype, chunk_bytes):
    """Ignored rows: the low plan reads the active rows of hidden tile by tile and writes d_hidden at full size;
    it equals the default plan's compaction (inactive rows 0) to rounding."""
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(11, 16, generator=g).to(dtype), (torch.randn(300, 16, generator=g) / 4).to(dtype)
    y = torch.randint(0, 300, (11,), generator=g)
    y[[0, 4, 5, 10]] = -100
    out = {}
    for memory in ("default", "low"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        logp, ent = fusedpg.linear_logprob_entropy(hh, ww, y, memory=memory, impl="torch",
                                                   chunk_bytes=chunk_bytes if memory == "low" else None)
        (logp.sum() + 0.3 * ent.sum()).backward()
        out[memory] = (logp.detach(), ent.detach(), hh.grad, ww.grad)
    assert not out["low"][2][[0, 4, 5, 10]].any()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for a, b in zip(out["default"], out["low"]):
        torch.testing.assert_close(a.float(), b.float(), **tol)
