"""fusedpg.integrations.trl.FusedPGGRPOTrainer against TRL's own GRPOTrainer (an unmodified _compute_loss): with a
tiny random Qwen2 built from a config and a hand-built batch of TRL's `inputs`, the loss, every parameter gradient and
every logged metric agree for each loss_type and option; and a real trainer.train() of two steps with generation."""
import copy

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import fusedpg.head as fusedpg_head  # noqa: E402
from fusedpg.truncation import OUTSIDE_LOGP  # noqa: E402
from fusedpg.integrations.trl import FusedPGGRPOTrainer  # noqa: E402

B, P, C, V = 4, 3, 5, 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread (as tests/test_bench.py): on a loaded 2-core machine two OpenMP threads wait for time slices
    on every tiny op, which made this file take ~30 s instead of ~7 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tokenizer():
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(V - 3)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.padding_side = "left"
    return tok


def _model(tied=True):
    cfg = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=tied, pad_token_id=0,
                      eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).float()


def _reward(completions, **kw):
    return [float(len(c) % 3) for c in completions]


def _args(tmp, **kw):
    base = dict(output_dir=str(tmp), per_device_train_batch_size=4, num_generations=4, max_completion_length=C,
                max_steps=2, report_to="none", use_cpu=True, logging_steps=1, save_strategy="no", beta=0.0,
                temperature=0.9, bf16=False, dataloader_num_workers=0, seed=3)
    base.update(kw)
    return trl.GRPOConfig(**base)


def _dataset():
    return Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"] * 2})


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trl")
    model = _model()
    tok = _tokenizer()
    theirs = trl.GRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=_args(tmp / "a"),
                             train_dataset=_dataset(), processing_class=tok)
    ours = FusedPGGRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=_args(tmp / "b"),
                              train_dataset=_dataset(), processing_class=tok, fusedpg_impl="torch")
    return theirs, ours


def _inputs(trainer, seed, is_shape=None, tool_mask=False, on_policy=False):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[1, 0] = 0
    prompt_mask[3, :2] = 0
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, 0)
    completion_ids = torch.randint(3, V, (B, C), generator=g)
    lengths = torch.tensor([5, 3, 1, 4])
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, 0)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), C)
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=torch.randn(B, generator=g),
                  num_items_in_batch=completion_mask.sum() * 2,
                  ref_per_token_logps=logps + 0.2 * torch.randn(B, C, generator=g))
    if not on_policy:
        inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(B, C, generator=g)
    sampling = logps + 0.2 * torch.randn(B, C, generator=g)
    inputs["sampling_per_token_logps"] = sampling
    if is_shape == "token":
        inputs["importance_sampling_ratio"] = torch.exp((logps - sampling) * completion_mask).clamp(max=3.0)
    elif is_shape == "sequence":
        inputs["importance_sampling_ratio"] = torch.exp(((logps - sampling) * completion_mask).sum(-1, keepdim=True))
    if tool_mask:
        tm = torch.ones(B, C, dtype=torch.long)
        tm[0, 1:3] = 0
        inputs["tool_mask"] = tm
    return inputs


def _set(trainer, attrs, args):
    for k, v in attrs.items():
        setattr(trainer, k, v)
    for k, v in args.items():
        setattr(trainer.args, k, v)


CALLS = {"fused": 0}
_fused = fusedpg_head.fused_linear_pg_loss  # the trainer's loss runs through its FusedLMHead


def _counting(*args, **kwargs):
    CALLS["fused"] += 1
    return _fused(*args, **kwargs)


fusedpg_head.fused_linear_pg_loss = _counting


def _run(trainer, inputs, train=True):
    before = CALLS["fused"]
    trainer.model.train(train)
    trainer.model.zero_grad(set_to_none=True)
    trainer._metrics = {"train": __import__("collections").defaultdict(list),
                        "eval": __import__("collections").defaultdict(list)}
    loss = trainer._compute_loss(trainer.model, copy.copy(inputs))
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in trainer.model.named_parameters() if p.grad is not None}
    mode = "train" if train else "eval"
    assert (CALLS["fused"] == before + 1) == isinstance(trainer, FusedPGGRPOTrainer)  # ours ran the fused path
    return loss.detach(), grads, {k: list(v) for k, v in trainer._metrics[mode].items()}


_DEFAULT_ATTRS = dict(loss_type="dapo", beta=0.04, epsilon_low=0.2, epsilon_high=0.28,
                      importance_sampling_level="token", top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
                      vllm_importance_sampling_correction=False, _entropy_bonus_enabled=False, entropy_coef=0.0,
                      use_adaptive_entropy=False, _last_world_entropy=float("inf"), _entropy_window_stats=None,
                      current_gradient_accumulation_steps=2)
_DEFAULT_ARGS = dict(delta=None, use_bias_correction_kl=False, steps_per_generation=2)

CASES = {f"{lt}": (dict(loss_type=lt), {}, {}) for lt in trl.trainer.grpo_trainer.GRPOTrainer.__dict__.get(
    "_LOSS_TYPES", ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"))}
CASES["cispo_cap"] = (dict(loss_type="cispo", epsilon_high=1.1), {}, {})
CASES["luspo_sequence"] = (dict(loss_type="luspo", importance_sampling_level="sequence"), {}, {})
CASES["grpo_sequence_biaskl"] = (dict(loss_type="grpo", importance_sampling_level="sequence"),
                                 dict(use_bias_correction_kl=True), {})
CASES["dapo_biaskl_delta"] = (dict(loss_type="dapo"), dict(use_bias_correction_kl=True, delta=1.5), {})
CASES["dapo_ga_spg"] = (dict(loss_type="dapo", current_gradient_accumulation_steps=3), dict(steps_per_generation=4), {})
CASES["grpo_top_entropy_bonus"] = (dict(loss_type="grpo", top_entropy_quantile=0.5, _entropy_bonus_enabled=True,
                                        entropy_coef=0.05), {}, {})
CASES["dapo_top_entropy"] = (dict(loss_type="dapo", top_entropy_quantile=0.6), {}, {})
CASES["dapo_entropy_bonus"] = (dict(loss_type="dapo", _entropy_bonus_enabled=True, entropy_coef=0.05), {}, {})
CASES["bnpo_adaptive_entropy"] = (dict(loss_type="bnpo", _entropy_bonus_enabled=True, entropy_coef=0.05,
                                       use_adaptive_entropy=True, _last_world_entropy=0.1), {}, {})
CASES["grpo_is_token_truncate"] = (dict(loss_type="grpo", use_vllm=True, vllm_importance_sampling_correction=True),
                                   {}, dict(is_shape="token"))
CASES["dapo_is_sequence_mask"] = (dict(loss_type="dapo", use_vllm=True, vllm_importance_sampling_correction=True),
                                  {}, dict(is_shape="sequence"))
CASES["vespo_is_token"] = (dict(loss_type="vespo", use_vllm=True, vllm_importance_sampling_correction=True), {},
                           dict(is_shape="token"))
CASES["grpo_opsm_sampling"] = (dict(loss_type="grpo", off_policy_mask_threshold=0.05), {}, {})
CASES["grpo_on_policy_tool_mask"] = (dict(loss_type="grpo", beta=0.0), {}, dict(on_policy=True, tool_mask=True))
CASES["sapo_beta0"] = (dict(loss_type="sapo", beta=0.0), {}, {})


@pytest.mark.parametrize("case", list(CASES))
def test_compute_loss_matches_trl(trainers, case):
    attrs, args, data = CASES[case]
    theirs, ours = trainers
    for t in (theirs, ours):
        _set(t, {**_DEFAULT_ATTRS, **attrs}, {**_DEFAULT_ARGS, **args})
    inputs = _inputs(theirs, seed=hash(case) % 1000, **data)
    want = _run(theirs, inputs)
    got = _run(ours, inputs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert set(got[1]) == set(want[1])
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k], rtol=1e-4, atol=1e-6, msg=f"{case}: grad {k}")
    assert set(got[2]) == set(want[2]), (case, set(got[2]) ^ set(want[2]))
    for k in want[2]:
        assert got[2][k] == pytest.approx(want[2][k], rel=1e-5, abs=1e-6, nan_ok=True), (case, k)
    if attrs.get("use_adaptive_entropy"):
        assert ours.entropy_coef == pytest.approx(theirs.entropy_coef)
        assert ours._last_world_entropy == pytest.approx(theirs._last_world_entropy, rel=1e-6)


def test_eval_mode_matches_trl(trainers):
    theirs, ours = trainers
    for t in (theirs, ours):
        _set(t, {**_DEFAULT_ATTRS, "loss_type": "dapo"}, dict(_DEFAULT_ARGS))
    inputs = _inputs(theirs, seed=11)
    want, got = _run(theirs, inputs, train=False), _run(ours, inputs, train=False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for k in want[2]:
        assert got[2][k] == pytest.approx(want[2][k], rel=1e-5, abs=1e-6), k
    theirs.model.train()
    ours.model.train()


def test_unsupported_combination_raises(trainers):
    _, ours = trainers
    _set(ours, {**_DEFAULT_ATTRS, "loss_type": "dapo", "top_entropy_quantile": 0.5, "_entropy_bonus_enabled": True,
                "entropy_coef": 0.1}, dict(_DEFAULT_ARGS))
    with pytest.raises(NotImplementedError, match="entropy bonus"):
        _run(ours, _inputs(ours, seed=5))


def test_untied_head_matches_trl(tmp_path):
    model, tok = _model(tied=False), _tokenizer()
    theirs = trl.GRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=_args(tmp_path / "a"),
                             train_dataset=_dataset(), processing_class=tok)
    ours = FusedPGGRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=_args(tmp_path / "b"),
                              train_dataset=_dataset(), processing_class=tok, fusedpg_impl="torch")
    for t in (theirs, ours):
        _set(t, {**_DEFAULT_ATTRS, "loss_type": "grpo"}, dict(_DEFAULT_ARGS))
    inputs = _inputs(theirs, seed=21)
    want, got = _run(theirs, inputs), _run(ours, inputs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert "lm_head.weight" in want[1]
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("extra", [{}, dict(mask_truncated_completions=True)], ids=["plain", "mask_truncated"])
def test_train_two_steps_with_generation(tmp_path, extra):
    """mask_truncated_completions acts in TRL's generation step, before the loss: the subclass inherits it."""
    model, tok = _model(), _tokenizer()
    logs = {}
    for name, cls, kw in (("trl", trl.GRPOTrainer, {}), ("ours", FusedPGGRPOTrainer, dict(fusedpg_impl="torch"))):
        trainer = cls(model=copy.deepcopy(model), reward_funcs=_reward, args=_args(tmp_path / name, **extra),
                      train_dataset=_dataset(), processing_class=tok, **kw)
        before = CALLS["fused"]
        trainer.train()
        assert (CALLS["fused"] > before) == (name == "ours")
        logs[name] = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs["ours"]) == 2
    for a, b in zip(logs["ours"], logs["trl"]):  # same seed: same generations, same losses and metrics
        assert set(a) == set(b)
        for k in ("loss", "entropy", "clip_ratio/region_mean", "grad_norm", "reward"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k


def test_peft_lora_matches_trl(tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = _model(), _tokenizer()
    made = []
    for name, cls, kw in (("trl", trl.GRPOTrainer, {}), ("ours", FusedPGGRPOTrainer, dict(fusedpg_impl="torch"))):
        torch.manual_seed(1)  # same LoRA initialisation
        lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        made.append(cls(model=copy.deepcopy(model), reward_funcs=_reward, args=_args(tmp_path / name),
                        train_dataset=_dataset(), processing_class=tok, peft_config=lora, **kw))
    theirs, ours = made
    for t in (theirs, ours):
        _set(t, {**_DEFAULT_ATTRS, "loss_type": "dapo"}, dict(_DEFAULT_ARGS))
    inputs = _inputs(theirs, seed=31)
    want, got = _run(theirs, inputs), _run(ours, inputs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert want[1] and all("lora" in k for k in want[1]) and set(got[1]) == set(want[1])
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k], rtol=1e-4, atol=1e-6, msg=k)


def test_moe_aux_loss_matches_trl(tmp_path):
    """docs/peers.md#known-bugs-turned-into-tests row 14: the router load-balancing loss is not dropped on the fused path."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=V, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                        router_aux_loss_coef=0.02, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                        bos_token_id=1)
    torch.manual_seed(0)
    model, tok = MixtralForCausalLM(cfg).float(), _tokenizer()
    theirs = trl.GRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=_args(tmp_path / "a"),
                             train_dataset=_dataset(), processing_class=tok)
    ours = FusedPGGRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=_args(tmp_path / "b"),
                              train_dataset=_dataset(), processing_class=tok, fusedpg_impl="torch")
    assert theirs.aux_loss_enabled and ours.aux_loss_enabled
    for t in (theirs, ours):
        _set(t, {**_DEFAULT_ATTRS, "loss_type": "grpo"}, dict(_DEFAULT_ARGS))
    inputs = _inputs(theirs, seed=41)
    want, got = _run(theirs, inputs), _run(ours, inputs)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    router = [k for k in want[1] if "gate" in k and "experts" not in k]
    assert router and set(got[1]) == set(want[1])
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k], rtol=1e-4, atol=1e-6, msg=k)
    assert got[2]["aux_loss"] == pytest.approx(want[2]["aux_loss"], rel=1e-5)


def test_prefix_grouper_matches_trl(tmp_path):
    from fusedpg.prefix import register_transformers

    name = register_transformers()
    model, tok = _model(), _tokenizer()
    theirs = trl.GRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=_args(tmp_path / "a"),
                             train_dataset=_dataset(), processing_class=tok)
    grouped = copy.deepcopy(model)
    grouped.config._attn_implementation = name
    grouped.set_attn_implementation(name) if hasattr(grouped, "set_attn_implementation") else None
    ours = FusedPGGRPOTrainer(model=grouped, reward_funcs=_reward, args=_args(tmp_path / "b"),
                              train_dataset=_dataset(), processing_class=tok, fusedpg_impl="torch",
                              prefix_grouper=True)
    for t in (theirs, ours):
        _set(t, {**_DEFAULT_ATTRS, "loss_type": "grpo"}, dict(_DEFAULT_ARGS))
    inputs = _inputs(theirs, seed=51)
    # two groups of two completions sharing a prompt (rows 0-1, rows 2-3), as TRL lays out num_generations
    for a, b in ((0, 1), (2, 3)):
        inputs["prompt_ids"][b] = inputs["prompt_ids"][a]
        inputs["prompt_mask"][b] = inputs["prompt_mask"][a]
    with torch.no_grad():
        logps, _, _ = theirs._get_per_token_logps_and_entropies(
            theirs.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), C)
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(B, C, generator=torch.Generator().manual_seed(2))
    calls = {"pack": 0}
    orig = ours._fusedpg_pack

    def counting(*args):
        packed = orig(*args)
        calls["pack"] += packed is not None and packed.layout.n_rows == 2  # one row per shared prompt
        return packed

    ours._fusedpg_pack = counting
    want, got = _run(theirs, inputs), _run(ours, inputs)
    assert calls["pack"] == 1
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for k in want[1]:
        torch.testing.assert_close(got[1][k], want[1][k], rtol=1e-4, atol=1e-5, msg=k)
    for k in want[2]:
        assert got[2][k] == pytest.approx(want[2][k], rel=1e-4, abs=1e-6), k
    # the old/ref pass (no grad) runs grouped too, and gives TRL's log-probs and entropies
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        want_lp, want_ent, _ = theirs._get_per_token_logps_and_entropies(theirs.model, ids, am, C,
                                                                         compute_entropy=True)
        got_lp, got_ent, _ = ours._get_per_token_logps_and_entropies(ours.model, ids, am, C, compute_entropy=True)
    assert calls["pack"] == 2
    torch.testing.assert_close(got_lp, want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_ent, want_ent, rtol=1e-5, atol=1e-5)


@pytest.fixture
def nograd_calls(monkeypatch):
    """Counts fusedpg.linear_logprob_entropy calls the trainer makes with autograd off (the old/ref passes)."""
    calls = {"nograd": 0}
    orig = fusedpg_head.linear_logprob_entropy

    def counting(*args, **kwargs):
        calls["nograd"] += not torch.is_grad_enabled()
        return orig(*args, **kwargs)

    monkeypatch.setattr(fusedpg_head, "linear_logprob_entropy", counting)
    return calls


@pytest.mark.parametrize("batch_size", [None, 3])
def test_old_ref_pass_matches_trl(trainers, nograd_calls, batch_size):
    """TRL's no-grad log-prob pass (old policy / reference policy) through fusedpg equals TRL's fused head."""
    theirs, ours = trainers
    inputs = _inputs(theirs, seed=61)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    for entropy in (False, True):
        with torch.no_grad():
            want = theirs._get_per_token_logps_and_entropies(theirs.model, ids, am, C, batch_size=batch_size,
                                                             compute_entropy=entropy)
            before = nograd_calls["nograd"]
            got = ours._get_per_token_logps_and_entropies(ours.model, ids, am, C, batch_size=batch_size,
                                                          compute_entropy=entropy)
        assert nograd_calls["nograd"] == before + (1 if batch_size is None else 2)
        assert got[0].dtype == want[0].dtype == torch.float32 and got[2] is None
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        assert (got[0][inputs["completion_mask"] == 0] == 0).all()
        if entropy:
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
        else:
            assert got[1] is None and want[1] is None
    # with autograd on (TRL's own _compute_loss on the fallback path) TRL's pass runs, with its graph
    before = nograd_calls["nograd"]
    lp, _, _ = ours._get_per_token_logps_and_entropies(ours.model, ids, am, C)
    assert lp.requires_grad and nograd_calls["nograd"] == before


def test_sampler_parity_scores_the_truncated_distribution(trainers):
    """fusedpg_sampler_parity=True: the old/ref pass and the loss use GRPOConfig's top_k / top_p / min_p; off (the
    default) keeps TRL's full-softmax numbers."""
    _, ours = trainers
    inputs = _inputs(ours, seed=62)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    saved = (ours.fusedpg_sampler_parity, ours.top_k, ours.top_p, ours.min_p)
    try:
        ours.top_k, ours.top_p, ours.min_p = 7, 0.9, None
        assert ours._fusedpg_sampling() == {}  # the opt-in is off
        with torch.no_grad():
            full = ours._get_per_token_logps_and_entropies(ours.model, ids, am, C)[0]
        ours.fusedpg_sampler_parity = True
        assert ours._fusedpg_sampling() == {"top_k": 7, "top_p": 0.9}
        with torch.no_grad():
            truncated = ours._get_per_token_logps_and_entropies(ours.model, ids, am, C)[0]
        on = inputs["completion_mask"] != 0
        # renormalised over fewer tokens: every kept target's log-prob rises, the others drop to the floor
        assert ((truncated[on] >= full[on] - 1e-6) | (truncated[on] == OUTSIDE_LOGP)).all()
        assert (truncated[on] > full[on] + 1e-4).any()
    finally:
        ours.fusedpg_sampler_parity, ours.top_k, ours.top_p, ours.min_p = saved


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """The tiny model saved to disk: TRL builds the reference model (beta != 0) from the policy's path."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    _model().save_pretrained(path)
    return str(path)


def test_train_with_old_and_ref_passes_matches_trl(tmp_path, saved_model, nograd_calls):
    """trainer.train() with beta != 0 (reference model) and num_iterations=2 (old log-probs computed): TRL's
    old/ref passes go through fusedpg — plain and with Prefix Grouper (grouped old/ref forwards) — and the logged
    losses and metrics equal TRL's."""
    from transformers import AutoModelForCausalLM

    from fusedpg.prefix import register_transformers

    name = register_transformers()
    tok, logs = _tokenizer(), {}
    for run, cls, kw in (("trl", trl.GRPOTrainer, {}), ("ours", FusedPGGRPOTrainer, dict(fusedpg_impl="torch")),
                         ("prefix", FusedPGGRPOTrainer, dict(fusedpg_impl="torch", prefix_grouper=True))):
        model = AutoModelForCausalLM.from_pretrained(saved_model, dtype=torch.float32,
                                                     **({"attn_implementation": name} if run == "prefix" else {}))
        trainer = cls(model=model, reward_funcs=_reward, train_dataset=_dataset(), processing_class=tok,
                      args=_args(tmp_path / run, beta=0.04, num_iterations=2, optim="sgd", learning_rate=0.2,
                                 lr_scheduler_type="constant"), **kw)
        assert trainer.ref_model is not None
        packs = {"nograd": 0}
        if run == "prefix":
            orig = trainer._fusedpg_pack

            def counting(*args, orig=orig):
                packed = orig(*args)
                packs["nograd"] += not torch.is_grad_enabled() and packed is not None and packed.layout.n_rows == 1
                return packed

            trainer._fusedpg_pack = counting
        before = nograd_calls["nograd"]
        trainer.train()
        # step 1 generates: one old pass (policy) and one ref pass (reference model); step 2 reuses the rollout
        assert nograd_calls["nograd"] - before == (0 if run == "trl" else 2), run
        assert packs["nograd"] == (2 if run == "prefix" else 0)
        if run != "trl":
            assert getattr(trainer.ref_model, "_fusedpg_hidden_forward", False)
        logs[run] = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs["ours"]) == 2 and logs["trl"][1]["kl"] > 1e-4  # step 2: the policy has moved off old and ref
    for run in ("ours", "prefix"):
        for a, b in zip(logs[run], logs["trl"]):  # same seed: same generations, same losses and metrics
            assert set(a) == set(b)
            for k in ("loss", "kl", "entropy", "clip_ratio/region_mean", "grad_norm", "reward"):
                if k in b:
                    assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (run, k)
