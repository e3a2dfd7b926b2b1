"""Grouped training through unmodified transformers models equals the repeated batch, completion by completion.

Tiny random Llama / Qwen2 / Qwen3 / Mistral (no downloads). Baseline: one row ``[prompt | completion]`` per
completion, right-padded, explicit position ids, ``attn_implementation="sdpa"`` (its CPU math path keeps float64;
transformers' eager path runs the softmax in float32). Grouped: packed rows, ``attn_implementation="fusedpg_prefix"``
with ``prefix_layout``. Loss: a policy-gradient-style ``sum w * logp + sum u * entropy`` over every completion token
(random non-uniform weights, so a leaked or swapped completion changes it) through ``fusedpg.linear_logprob_entropy``.
"""
import copy
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fusedpg  # noqa: E402
from fusedpg.prefix import pack, plan_torch, register_transformers  # noqa: E402
from fusedpg.verification.tolerance import assert_close_to_truth  # noqa: E402

NAME = register_transformers()
ARCHS = ("llama", "qwen2", "qwen3", "mistral")
PROMPT_LENS = (5, 1)
COMPLETION_LENS = ((3, 7), (2, 1, 4, 6, 3))  # G = 2 and 5, unequal lengths, a prompt of one token


def _config(arch: str, **overrides):
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, attention_dropout=0.0,
                  tie_word_embeddings=False)
    common.update(overrides)
    if arch == "llama":
        return transformers.LlamaConfig(**common)
    if arch == "qwen2":
        return transformers.Qwen2Config(use_sliding_window=False, **common)
    if arch == "qwen3":
        return transformers.Qwen3Config(head_dim=common["hidden_size"] // common["num_attention_heads"], **common)
    return transformers.MistralConfig(**common)  # default sliding_window 4096: longer than any row here


def _rms_norm_in_input_dtype(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _model(arch, attn, state=None, dtype=torch.float32, **overrides):
    # a config copy per model: transformers 5 stores the attention implementation on the (shared) config object
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(_config(arch, **overrides)),
                                                          attn_implementation=attn)
    if state is not None:
        model.load_state_dict(state)
    if dtype == torch.float64:
        # transformers' RMSNorm computes in fp32 whatever the input dtype; in float64 runs that rounding would hide
        # a 1e-10 mismatch under 1e-7 noise (and make G summed gradients differ from G rounded ones). Keep fp64.
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
                module.forward = types.MethodType(_rms_norm_in_input_dtype, module)
    return model.to(dtype)


def _data(seed=0, vocab=96):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (p,), generator=g) for p in PROMPT_LENS]
    comps = [[torch.randint(0, vocab, (n,), generator=g) for n in lens] for lens in COMPLETION_LENS]
    n = sum(sum(c) for c in COMPLETION_LENS)
    weights = (torch.randn(n, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64))
    return prompts, comps, weights


def _repeated_rows(model, prompts, comps):
    """Hidden rows that predict every completion token, from the repeated batch [prompt | completion] per row."""
    pairs = [(p, c) for p, cs in zip(prompts, comps) for c in cs]
    width = max(p.numel() + c.numel() for p, c in pairs)
    ids = torch.zeros(len(pairs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(pairs):
        ids[i, :p.numel() + c.numel()] = torch.cat([p, c])
        mask[i, :p.numel() + c.numel()] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    ids, mask, pos = (t.to(model.device) for t in (ids, mask, pos))
    h = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    return torch.cat([h[i, p.numel() - 1:p.numel() + c.numel() - 1] for i, (p, c) in enumerate(pairs)])


def _grouped_rows(model, packed):
    dev = model.device
    kwargs = dict(packed.model_kwargs(), input_ids=packed.input_ids.to(dev),
                  position_ids=packed.position_ids.to(dev), attention_mask=packed.layout.mask_placeholder(dev))
    return packed.layout.unpack(model.model(**kwargs).last_hidden_state)


def _step(model, rows, targets, weights):
    """Per-token logits, and the gradient of every parameter of a policy-gradient-style loss."""
    model.zero_grad(set_to_none=True)
    logp, ent = fusedpg.linear_logprob_entropy(rows, model.lm_head.weight, targets)
    w, u = weights
    loss = (logp.double() * w).sum() + (ent.double() * u).sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return model.lm_head(rows).detach(), loss.detach(), grads


def _run_both(arch, dtype, grouped_attn=NAME, device="cpu"):
    """(repeated-batch step, grouped step, layout), each step's tensors back on CPU."""
    prompts, comps, weights = _data()
    base = _model(arch, "sdpa", dtype=dtype).to(device)
    grouped = _model(arch, grouped_attn, state=base.state_dict(), dtype=dtype).to(device)
    packed = pack(prompts, comps)
    targets = packed.layout.unpack(packed.input_ids, predict=False).to(device)
    weights = tuple(w.to(device) for w in weights)
    want = _step(base, _repeated_rows(base, prompts, comps), targets, weights)
    got = _step(grouped, _grouped_rows(grouped, packed), targets, weights)
    return _on_cpu(want), _on_cpu(got), packed.layout


def _on_cpu(step):
    logits, loss, grads = step
    return logits.cpu(), loss.cpu(), {name: g.cpu() for name, g in grads.items()}


def _split(logits, layout):
    return logits.split([n for c in layout.completion_lens for n in c])


@pytest.mark.parametrize("arch", ARCHS)
def test_fp64_grouped_equals_repeated_batch(arch):
    (lw, loss_w, gw), (lg, loss_g, gg), layout = _run_both(arch, torch.float64)
    for i, (a, b) in enumerate(zip(_split(lg, layout), _split(lw, layout))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"completion {i}: {m}")
    torch.testing.assert_close(loss_g, loss_w, rtol=1e-10, atol=1e-10)
    assert gg.keys() == gw.keys()
    for name in gw:
        torch.testing.assert_close(gg[name], gw[name], rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fp32_grouped_matches_under_tolerance_model(arch):
    truth, _, _ = _run_both(arch, torch.float64)
    eager, ours, layout = _run_both(arch, torch.float32)
    for i, (o, e, t) in enumerate(zip(_split(ours[0], layout), _split(eager[0], layout), _split(truth[0], layout))):
        assert_close_to_truth(f"{arch}.logits[completion {i}]", o, e, t, torch.float32)
    for name in truth[2]:
        assert_close_to_truth(f"{arch}.grad[{name}]", ours[2][name], eager[2][name], truth[2][name], torch.float32)


def test_triton_kernels_inside_the_model(monkeypatch):
    """The same equivalence with the Triton kernels (on CUDA where there is one, else the interpreter on CPU, set
    up by tests/conftest.py)."""
    truth, _, _ = _run_both("llama", torch.float64)
    eager, _, layout = _run_both("llama", torch.float32)
    monkeypatch.setenv("FUSEDPG_IMPL", "triton")
    _, ours, _ = _run_both("llama", torch.float32, device="cuda" if torch.cuda.is_available() else "cpu")
    for i, (o, e, t) in enumerate(zip(_split(ours[0], layout), _split(eager[0], layout), _split(truth[0], layout))):
        assert_close_to_truth(f"logits[completion {i}]", o, e, t, torch.float32)
    for name in truth[2]:
        assert_close_to_truth(f"grad[{name}]", ours[2][name], eager[2][name], truth[2][name], torch.float32)


def test_causal_lm_forward_and_unpack():
    """The CausalLM wrapper passes prefix_layout through too; its logits unpack to the per-completion rows."""
    prompts, comps, _ = _data()
    packed = pack(prompts, comps)
    model = _model("qwen2", NAME, dtype=torch.float64)
    logits = model(**packed.model_kwargs()).logits
    rows = _grouped_rows(model, packed)
    torch.testing.assert_close(fusedpg.prefix.unpack(logits, packed.layout), model.lm_head(rows))
    padded = packed.layout.unpack(logits, padded=True)
    assert torch.equal(padded[packed.layout.completion_mask()], fusedpg.prefix.unpack(logits, packed.layout))


def test_gradient_checkpointing_replays_the_layout(monkeypatch):
    prompts, comps, weights = _data()
    packed = pack(prompts, comps)
    targets = packed.layout.unpack(packed.input_ids, predict=False)
    plain = _model("llama", NAME, dtype=torch.float64)
    ckpt = _model("llama", NAME, state=plain.state_dict(), dtype=torch.float64)
    if hasattr(ckpt, "activation_checkpointing_enable"):  # the 5.x name
        ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ckpt.train()
    _, _, want = _step(plain, _grouped_rows(plain, packed), targets, weights)
    calls = []
    forward = plan_torch.forward
    monkeypatch.setattr(plan_torch, "forward", lambda *a: calls.append(1) or forward(*a))
    _, _, got = _step(ckpt, _grouped_rows(ckpt, packed), targets, weights)
    assert len(calls) == 2 * ckpt.config.num_hidden_layers  # every layer's attention ran again in the backward
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_without_a_layout_the_model_is_unchanged(arch):
    """Registered but not given a layout, the implementation is its fallback (sdpa): same logits, same generation."""
    sdpa = _model(arch, "sdpa")
    ours = _model(arch, NAME, state=sdpa.state_dict())
    ids = torch.randint(0, 96, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as in batched generation
    assert torch.equal(ours(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits)
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    a, b = ours.generate(ids, **kw), sdpa.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.scores, b.scores))


def test_eager_fallback_is_eager():
    name = register_transformers("fusedpg_prefix_eager", fallback="eager")
    eager = _model("qwen2", "eager")
    ours = _model("qwen2", name, state=eager.state_dict())
    ids = torch.randint(0, 96, (2, 7))
    assert torch.equal(ours(ids).logits, eager(ids).logits)


def test_without_the_layout_shared_prefix_positions_leak_between_completions():
    """Documents the pitfall the layout exists for: stock attention over packed rows is wrong for G >= 2."""
    prompts, comps, weights = _data()
    packed = pack(prompts, comps)
    model = _model("llama", NAME, dtype=torch.float64)
    good = _grouped_rows(model, packed)
    bad = packed.layout.unpack(model.model(input_ids=packed.input_ids, position_ids=packed.position_ids)
                               .last_hidden_state)
    assert not torch.allclose(good, bad)


def test_bad_calls_raise_clear_errors():
    prompts, comps, _ = _data()
    packed = pack(prompts, comps)
    kwargs = packed.model_kwargs()
    model = _model("llama", NAME)
    with pytest.raises(ValueError, match="position_ids"):  # HF's default arange positions: RoPE would be wrong
        model.model(**{**kwargs, "position_ids": None})
    with pytest.raises(ValueError, match="position_ids"):
        model.model(**{**kwargs, "position_ids": packed.position_ids.flip(-1)})
    with pytest.raises(ValueError, match="prefix_layout is missing"):
        model.model(**{k: v for k, v in kwargs.items() if k != "prefix_layout"})
    other = pack(prompts[:1], comps[:1]).layout
    with pytest.raises(ValueError, match="q must have"):
        model.model(**{**kwargs, "prefix_layout": other, "attention_mask": None})
    with pytest.raises(ValueError, match="dropout"):
        _model("llama", NAME, attention_dropout=0.1).train().model(**kwargs)
    with pytest.raises(ValueError, match="sliding_window"):
        _model("mistral", NAME, sliding_window=4).model(**kwargs)
    with pytest.raises(ValueError, match="fallback"):
        register_transformers("fusedpg_prefix_bad", fallback="no_such_attention")


def test_packed_rows_on_a_model_without_the_fusedpg_attention_raise_clearly():
    prompts, comps, _ = _data()
    kwargs = pack(prompts, comps).model_kwargs()
    for attn in ("sdpa", "eager"):
        with pytest.raises(ValueError, match=r"register_transformers\(\).*attn_implementation|attn_implementation"):
            _model("llama", attn).model(**kwargs)
    # transformers stores the implementation on the config: a second model from the same config object switches
    # the first one to sdpa. Without a layout nothing changes (sdpa is the fallback); with one it raises.
    torch.manual_seed(0)
    cfg = _config("llama")
    first = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=NAME)
    ok = first.model(**kwargs).last_hidden_state
    transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    if first.config._attn_implementation != NAME:
        with pytest.raises(ValueError, match="copy.deepcopy"):
            first.model(**kwargs)
    else:  # a transformers release that copies the config: the first model keeps its attention
        assert torch.equal(first.model(**kwargs).last_hidden_state, ok)


def test_bf16_autocast_runs_like_sdpa():
    """Under autocast (TRL's bf16=True on CPU), q, k and v reach the attention in different dtypes; like sdpa, the
    fusedpg attention computes in the autocast dtype instead of rejecting them."""
    prompts, comps, _ = _data()
    ours, sdpa = _model("llama", NAME), _model("llama", "sdpa")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _grouped_rows(ours, pack(prompts, comps))
        want = _repeated_rows(sdpa, prompts, comps)
    assert got.dtype == want.dtype
    # two bf16 roundings of the largest hidden value apart: the order of the sums differs, the math does not
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2 * 2 ** -8 * float(want.abs().max()))
