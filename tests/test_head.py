"""FusedLMHead in one process: an nn.Linear for every caller, the fused ops through its own forward, installed into
and removed from transformers models; the wrappers themselves are tested in test_distributed.py."""
from __future__ import annotations

import copy

import pytest
import torch

import fusedpg
from fusedpg import FusedLMHead, install_lm_head, uninstall_lm_head

transformers = pytest.importorskip("transformers")

H, V = 16, 40


def _tiny(arch="llama", **overrides):
    common = dict(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=32)
    common.update(overrides)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**common) if arch == "llama" else transformers.Gemma2Config(head_dim=8, **common)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def _inputs(b=2, t=5):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, t, H, generator=g), torch.randint(0, V, (b, t), generator=g),
            torch.randn(b, generator=g), (torch.rand(b, t, generator=g) > 0.3).float(),
            -3.0 + 0.1 * torch.randn(b, t, generator=g))


def test_plain_call_is_nn_linear_and_fused_calls_are_the_ops():
    linear = torch.nn.Linear(H, V)
    head = FusedLMHead.from_linear(linear, impl="torch")
    assert head.weight is linear.weight and head.bias is linear.bias and isinstance(head, torch.nn.Linear)
    assert [n for n, _ in head.named_parameters()] == ["weight", "bias"]  # the replaced module is not a child
    hidden, y, adv, mask, old = _inputs()
    assert torch.equal(head(hidden), linear(hidden))
    for got, want in zip(head(hidden, y), fusedpg.linear_logprob_entropy(hidden, linear.weight, y, bias=linear.bias,
                                                                          impl="torch")):
        assert torch.equal(got, want)
    cfg = fusedpg.PGLossConfig(loss_type="grpo", beta=0.0)
    head.config = cfg
    loss, metrics = head(hidden, y, advantages=adv, mask=mask, old_logp=old)
    want, want_metrics = fusedpg.fused_linear_pg_loss(hidden, linear.weight, y, adv, mask, old_logp=old,
                                                      bias=linear.bias, config=cfg, impl="torch")
    assert torch.equal(loss, want) and metrics.keys() == want_metrics.keys()
    loss.backward()
    assert linear.weight.grad is not None and linear.bias.grad is not None
    assert "loss_type='grpo'" in repr(head) and "impl='torch'" in repr(head)


def test_bad_calls_name_what_is_missing():
    head = FusedLMHead(H, V)
    hidden, y, adv, mask, _ = _inputs()
    with pytest.raises(TypeError, match="need targets"):
        head(hidden, advantages=adv)
    with pytest.raises(TypeError, match="both advantages and mask, got only advantages"):
        head(hidden, y, advantages=adv)
    with pytest.raises(TypeError, match="torch.nn.Linear"):
        FusedLMHead.from_linear(torch.nn.Embedding(V, H))
    hooked = torch.nn.Linear(H, V)
    hooked.register_forward_pre_hook(lambda *a: None)
    with pytest.raises(ValueError, match="before wrapping"):
        FusedLMHead.from_linear(hooked)


def test_install_keeps_tied_embeddings_generation_and_can_be_undone():
    model = _tiny(tie_word_embeddings=True)
    ids = torch.randint(0, V, (1, 4), generator=torch.Generator().manual_seed(3))
    before = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    original = model.get_output_embeddings()
    head = install_lm_head(model, impl="torch")
    assert model.get_output_embeddings() is head and install_lm_head(model) is head
    assert head.weight is model.get_input_embeddings().weight  # still tied
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0), before)
    hidden = model.model(ids).last_hidden_state
    logp, _ = head(hidden, ids)
    ref = torch.log_softmax(model(ids).logits.float(), -1).gather(-1, ids[..., None])[..., 0]
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-5)
    uninstall_lm_head(model)
    assert model.get_output_embeddings() is original


def test_unsupported_heads_raise():
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        install_lm_head(_tiny("gemma2", final_logit_softcapping=30.0))
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_tiny(), peft.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(ValueError, match="LoRA on lm_head"):
        install_lm_head(model.get_base_model())


def test_call_through_runs_fn_as_the_forward_and_restores_it():
    model = torch.nn.Linear(3, 3)
    seen = []
    model.register_forward_pre_hook(lambda mod, args: seen.append("hook"))
    own = model.__dict__.get("forward")
    assert fusedpg.call_through(model, lambda a, b=0: a + b, 1, b=2) == 3 and seen == ["hook"]
    assert model.__dict__.get("forward") is own
    wrapped = copy.deepcopy(model)
    wrapped.forward = lambda x: x  # an instance-level forward (e.g. a hidden-state forward) survives
    marker = wrapped.forward
    outer = torch.nn.Module()
    outer.module = wrapped
    outer.forward = lambda *a, **k: wrapped(*a, **k)
    with pytest.raises(RuntimeError, match="boom"):
        fusedpg.call_through(outer, lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert wrapped.forward is marker
