"""shared_prefix_attention against the float64 dense reference, on the torch (CPU) plan and the Triton kernels.

The Triton kernels run on CUDA when present, else on CPU through Triton's interpreter (tiny shapes, 16-token tiles
so several tiles, partial tiles and several programs are exercised).
"""
from dataclasses import replace

import pytest
import torch

from fusedpg.prefix import PrefixLayout, pack, shared_prefix_attention, shared_prefix_attention_reference
from fusedpg.verification.cases_prefix import (CASES, AttentionCase, case_layout, check_attention, make_inputs,
                                               run_attention)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture
def triton_impl():
    """'triton': the real kernels on CUDA; on CPU the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
    any kernel is defined)."""
    return "triton"


def _assert_ok(results):
    bad = [r.report() for r in results if not r.ok]
    assert not bad, "\n".join(bad)


# G in {1, 2, 5}; unequal completion lengths; prompt length 1; several groups per batch and per row; GQA/MQA/MHA;
# head dims 16, 64, 80, 96, 128; lengths straddling the 16-token tiles.
TORCH_CASES = CASES + (
    AttentionCase(prompt_lens=(17,), completion_lens=((16, 1, 15),), hq=8, hkv=2, d=64),
    AttentionCase(prompt_lens=(1,), completion_lens=((5, 1, 3, 2, 9),), hq=2, hkv=1, d=96),
    AttentionCase(prompt_lens=(2, 1, 3), completion_lens=((1, 4), (2,), (3, 3, 3, 3, 1)), hq=4, hkv=4, d=128),
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", TORCH_CASES, ids=lambda c: c.label)
def test_torch_plan_matches_reference(case, dtype):
    _assert_ok(check_attention(replace(case, dtype=dtype), impl="torch"))


TRITON_CASES = CASES + (
    AttentionCase(prompt_lens=(1,), completion_lens=((3, 1, 2, 1, 4),), hq=2, hkv=1, d=64, pad=0),
    AttentionCase(prompt_lens=(2,), completion_lens=((5, 9),), hq=2, hkv=2, d=96),
    AttentionCase(prompt_lens=(3,), completion_lens=((4, 1),), hq=2, hkv=1, d=128),
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.label)
def test_triton_matches_reference(case, dtype, triton_impl):
    _assert_ok(check_attention(replace(case, dtype=dtype), impl=triton_impl, device=DEVICE))


def test_fp64_torch_plan_is_exact_and_passes_gradcheck():
    case = AttentionCase(prompt_lens=(3, 1), completion_lens=((2, 4), (1, 3, 2)), hq=4, hkv=2, d=8, pad=1)
    layout = case_layout(case)
    inputs = make_inputs(case, layout)
    ours = run_attention(lambda q, k, v: shared_prefix_attention(q, k, v, layout, impl="torch"), inputs,
                         torch.float64)
    truth = run_attention(lambda q, k, v: shared_prefix_attention_reference(q, k, v, layout), inputs, torch.float64)
    for a, b in zip(ours, truth):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    small = AttentionCase(prompt_lens=(2, 1), completion_lens=((1, 3), (2,)), hq=2, hkv=1, d=4, pad=1)
    layout = case_layout(small)
    q, k, v = (make_inputs(small, layout)[n].detach().clone().requires_grad_(True) for n in ("q", "k", "v"))
    assert torch.autograd.gradcheck(lambda q, k, v: shared_prefix_attention(q, k, v, layout, impl="torch"),
                                    (q, k, v), eps=1e-6, atol=1e-8, fast_mode=True)


def _causal(q, k, v, scale):
    """Plain causal attention of one row (the repeated-batch computation), GQA by repetition."""
    r = q.shape[0] // k.shape[0]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(r, 0), v.repeat_interleave(r, 0), is_causal=True, scale=scale)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_equals_repeated_batch_causal_attention(impl, request):
    """An oracle independent of the mask builder: every completion's output equals causal SDPA over the repeated
    row [prompt | completion], and dk/dv of the prompt equal the sum of the G copies' gradients."""
    if impl == "triton":
        impl = request.getfixturevalue("triton_impl")
    case = AttentionCase(prompt_lens=(4, 1), completion_lens=((3, 6), (2, 1, 5, 3, 2)), hq=4, hkv=2, d=16)
    layout = case_layout(case)
    inputs = make_inputs(case, layout)
    ours = run_attention(lambda q, k, v: shared_prefix_attention(q, k, v, layout, impl=impl), inputs,
                         torch.float32, DEVICE)
    q, k, v, do = (inputs[n].float() for n in ("q", "k", "v", "do"))
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    for b, a, p, comps in layout.segments():
        for c, n in comps:
            idx = torch.cat([torch.arange(a, a + p), torch.arange(c, c + n)])
            qq, kk, vv = (x[b][:, idx].detach().requires_grad_(True) for x in (q, k, v))
            o = _causal(qq, kk, vv, case.d ** -0.5)
            torch.testing.assert_close(ours[0][b][:, c:c + n].cpu(), o[:, p:].detach(), rtol=1e-5, atol=1e-5)
            # the completion's own upstream gradient only; the prompt rows' gradient is counted once below
            gk, gv = torch.autograd.grad(o[:, p:], (kk, vv), do[b][:, c:c + n])
            dk[b][:, idx] += gk
            dv[b][:, idx] += gv
        qq, kk, vv = (x[b][:, a:a + p].detach().requires_grad_(True) for x in (q, k, v))
        o = _causal(qq, kk, vv, case.d ** -0.5)
        torch.testing.assert_close(ours[0][b][:, a:a + p].cpu(), o.detach(), rtol=1e-5, atol=1e-5)
        gk, gv = torch.autograd.grad(o, (kk, vv), do[b][:, a:a + p])
        dk[b][:, a:a + p] += gk
        dv[b][:, a:a + p] += gv
    torch.testing.assert_close(ours[2].cpu(), dk, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[3].cpu(), dv, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_isolation_padding_and_determinism(impl, request):
    """Changing completion j leaves every other completion's output bit-identical; padding rows give 0 output and
    exactly zero gradients; two runs are bitwise identical."""
    if impl == "triton":
        impl = request.getfixturevalue("triton_impl")
    dtype = torch.float32
    case = AttentionCase(prompt_lens=(3,), completion_lens=((4, 2, 5),), hq=2, hkv=1, d=16, pad=3)
    layout = case_layout(case)
    inputs = make_inputs(case, layout)
    run = lambda x: run_attention(lambda q, k, v: shared_prefix_attention(q, k, v, layout, impl=impl),  # noqa
                                  x, dtype, DEVICE)
    first, again = run(inputs), run(inputs)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    (_, _, _, comps), = list(layout.segments())
    c, n = comps[1]
    changed = {name: t.clone() for name, t in inputs.items()}
    for name in ("q", "k", "v"):
        changed[name][:, :, c:c + n] += 1.0
    other = run(changed)
    for c2, n2 in (comps[0], comps[2]):
        assert torch.equal(other[0][:, :, c2:c2 + n2], first[0][:, :, c2:c2 + n2])
    assert not torch.equal(other[0][:, :, c:c + n], first[0][:, :, c:c + n])
    pad = slice(layout.group_lens[0], layout.seq_len)
    for t in first:
        assert bool((t[:, :, pad] == 0).all()) and bool(torch.isfinite(t).all())


def test_reference_impl_and_default_scale():
    case = AttentionCase(prompt_lens=(2,), completion_lens=((3, 1),), d=16)
    layout = case_layout(case)
    q, k, v = (make_inputs(case, layout)[n].float() for n in ("q", "k", "v"))
    ref = shared_prefix_attention(q, k, v, layout, impl="reference")
    torch.testing.assert_close(shared_prefix_attention(q, k, v, layout, impl="torch"), ref)
    torch.testing.assert_close(shared_prefix_attention(q, k, v, layout, scale=0.5, impl="torch"),
                               shared_prefix_attention(q, k, v, layout, scale=0.5, impl="reference"))


def _qkv(layout, hq=4, hkv=2, d=8):
    b, s = layout.n_rows, layout.seq_len
    return torch.randn(b, hq, s, d), torch.randn(b, hkv, s, d), torch.randn(b, hkv, s, d)


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda q, k, v, lay: (q[:, :, :-1], k, v, lay), ValueError, "q must have layout.seq_len"),   # lengths
    (lambda q, k, v, lay: (q[:1], k[:1], v[:1], lay), ValueError, "q must have layout.n_rows"),
    (lambda q, k, v, lay: (q[..., 0], k, v, lay), ValueError, "q must be 4-D"),
    (lambda q, k, v, lay: (q, k[:, :, :-1], v, lay), ValueError, "k must be"),
    (lambda q, k, v, lay: (q, k[..., :4], v, lay), ValueError, "k must be"),                      # head dim
    (lambda q, k, v, lay: (q[:, :3], k, v, lay), ValueError, "k must have a number of heads"),    # head count
    (lambda q, k, v, lay: (q, k, v[:, :1], lay), ValueError, "v must have k's shape"),
    (lambda q, k, v, lay: (q, k.double(), v, lay), TypeError, "k must have the dtype"),
    (lambda q, k, v, lay: (q, k, v, "layout"), TypeError, "layout must be"),
    (lambda q, k, v, lay: (q, k, v, PrefixLayout([3], [[2, 1]], seq_len=lay.seq_len)), ValueError,
     "q must have layout.n_rows"),                                                                # other layout
])
def test_bad_inputs_raise_naming_the_argument(mutate, exc, match):
    _, _, layout = pack([[1, 2, 3], [4]], [[[5, 6], [7]], [[8, 9, 10]]])
    q, k, v = _qkv(layout)
    with pytest.raises(exc, match=match):
        shared_prefix_attention(*mutate(q, k, v, layout), impl="torch")


def test_bad_scale_and_impl():
    _, _, layout = pack([[1, 2]], [[[3], [4, 5]]])
    q, k, v = _qkv(layout)
    with pytest.raises(ValueError, match="scale"):
        shared_prefix_attention(q, k, v, layout, scale=-1.0)
    with pytest.raises(ValueError, match="impl"):
        shared_prefix_attention(q, k, v, layout, impl="cuda")


def test_verify_cases_smoke():
    from fusedpg.verification.cases_prefix import verify_cases

    results = verify_cases(dtypes=(torch.float32,), cases=CASES[:2])
    assert len(results) == 8 and all(r.ok for r in results)
    assert results[0].name.startswith("shared_prefix_attention.o ")
