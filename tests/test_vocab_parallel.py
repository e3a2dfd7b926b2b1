"""Vocabulary-parallel heads on real gloo ranks (2 and 3: uneven shards), against one process under the tolerance
model: log-probs, entropy, the loss, d_hidden and every rank's d_weight, through the torch plan and the Triton
interpreter. Each world size is one spawned group; the ranks save their results and the checks run here."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedpg
from fusedpg.linear.reference import linear_logprob_entropy_reference
from fusedpg.linear_pg.reference import fused_linear_pg_loss_reference
from fusedpg.verification.tolerance import assert_close_to_truth

B, T, H, V, V_REAL = 3, 4, 8, 19, 17
LOSSES = {"grpo": dict(loss_type="grpo", beta=0.05, entropy_coef=0.01), "gspo": dict(loss_type="gspo"),
          "clip_cov": dict(loss_type="clip_cov", seed=0, clip_cov_ratio=0.2)}


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5
    bias = 0.1 * torch.randn(V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V_REAL, (B, T), generator=g)
    targets[0, 0] = -100
    temp = 0.5 + torch.rand(B, T, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    mask[:, 0] = 1
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    old = -2.5 + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    up = (torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64))
    cast = (lambda x: x.to(dtype))
    return dict(hidden=cast(hidden), weight=cast(weight), bias=cast(bias), targets=targets, temp=temp.float(),
                mask=mask, adv=adv.float(), old=old.float(), ref=(old + 0.05).float(), up=up)


def _whole_segments(world, n=B * T):
    """A head of two whole 128-column segments per rank (the CPU deterministic segment), its last 5 rows padding;
    ``n`` rows (a multiple of B)."""
    g = torch.Generator().manual_seed(9)
    vocab = 256 * world  # two segments a rank: a fold over them is not a sum of per-rank sums
    d = dict(hidden=torch.randn(n, H, generator=g), weight=torch.randn(vocab, H, generator=g) / H ** 0.5,
             bias=0.1 * torch.randn(vocab, generator=g), targets=torch.randint(0, vocab - 5, (n,), generator=g),
             temp=0.5 + torch.rand(n, generator=g), up=(torch.randn(n, generator=g), torch.randn(n, generator=g)))
    d["targets"][3] = -100
    d["mask"], d["adv"] = (torch.rand(n, generator=g) > 0.2).float(), torch.randn(n, generator=g)
    d["old"] = -5.0 + 0.1 * torch.randn(n, generator=g)
    return d, vocab - 5


#: Many rows in narrow chunks, d_hidden's running sum handed on in 32-row messages: the Triton plan's chunks (48 rows
#: of a rank's 256 columns, 16 of one process's) straddle the messages, and differ between the two.
WIDE_ROWS, NARROW_BYTES, SMALL_MESSAGES = 99, 48 * 256 * 4, 32


def _bitwise_steps(d, real, weight, bias, **kw):
    """The deterministic results that must equal one process bitwise (``weight``: a shard or the real head)."""
    out = {}
    for impl in ("torch", "triton"):
        out[impl] = _logprob_step(d, weight, bias, impl=impl, deterministic=True, **kw)
    h, w = d["hidden"].view(B, -1, H).clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss, _ = fusedpg.fused_linear_pg_loss(h, w, d["targets"].clamp(min=0).view(B, -1), d["adv"][:B],
                                           d["mask"].view(B, -1), bias=bias, old_logp=d["old"].view(B, -1),
                                           temperature=d["temp"].view(B, -1), loss_type="grpo", beta=0.0,
                                           deterministic=True, **kw)
    loss.backward()
    out["loss"] = dict(loss=loss.detach(), d_weight=w.grad, d_hidden=h.grad)
    return out


def _truncation(d):
    """min-p, top-k and per-row top-p together; several targets fall outside the kept set."""
    top_p = torch.full((B, T), 0.9)
    top_p[1] = 0.5
    return dict(top_k=6, top_p=top_p, min_p=0.01)


def _shard(x, world, rank):
    return torch.tensor_split(x, world)[rank]


def _logprob_step(d, weight, bias, **kw):
    h = d["hidden"].clone().requires_grad_()
    w, b = weight.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    logp, ent = fusedpg.linear_logprob_entropy(h, w, d["targets"], bias=b, temperature=d["temp"], **kw)
    ((logp.double() * d["up"][0]).sum() + (ent.double() * d["up"][1]).sum()).backward()
    return dict(logp=logp.detach(), entropy=ent.detach(), d_hidden=h.grad, d_weight=w.grad, d_bias=b.grad)


def _loss_step(d, weight, name, **kw):
    h, w = d["hidden"].clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss, metrics = fusedpg.fused_linear_pg_loss(h, w, d["targets"].clamp(min=0), d["adv"], d["mask"],
                                                 old_logp=d["old"], ref_logp=d["ref"], **LOSSES[name], **kw)
    loss.backward()
    return dict(loss=loss.detach(), d_hidden=h.grad, d_weight=w.grad, kl=metrics.get("kl"))


def _colwise_vs_loss_parallel(d, mesh):
    """A real ``ColwiseParallel(use_local_output=False)`` head (uneven: 17 rows on 2 ranks) through fusedpg, and
    torch's own ``loss_parallel()`` cross-entropy on the module's sharded logits as a second reference."""
    from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

    out = {}
    for who in ("fusedpg", "loss_parallel"):
        head = torch.nn.Linear(H, V_REAL, bias=False)
        with torch.no_grad():
            head.weight.copy_(d["weight"][:V_REAL])
        parallelize_module(head, mesh, ColwiseParallel(use_local_output=False))
        h = d["hidden"].reshape(B * T, H).clone().requires_grad_()
        y = d["targets"].reshape(-1)
        if who == "fusedpg":
            logp, _ = fusedpg.linear_logprob_entropy(h, head.weight, y, impl="torch")
        else:
            with loss_parallel():
                logp = -torch.nn.functional.cross_entropy(head(h), y, reduction="none")
            logp = logp.full_tensor() if hasattr(logp, "full_tensor") else logp  # a replicated DTensor
        with loss_parallel():
            (logp * d["up"][0].reshape(-1).float()).sum().backward()
        out[who] = dict(logp=logp.detach(), d_hidden=h.grad, d_weight=head.weight.grad.full_tensor())
    return out


def _worker(rank, world, out_dir):
    os.environ["TRITON_INTERPRET"] = "1"  # the ranks hold CPU tensors: Triton interpreted, on a GPU machine too
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank, world_size=world)
    group = dist.group.WORLD
    d = _data(torch.float32)
    w, b = _shard(d["weight"], world, rank), _shard(d["bias"], world, rank)
    out = {}
    for impl in ("torch", "triton"):
        out[f"logprob.{impl}"] = _logprob_step(d, w, b, impl=impl, vocab_parallel_group=group, vocab_size=V_REAL)
    out["logprob.deterministic"] = _logprob_step(d, w, b, impl="torch", vocab_parallel_group=group,
                                                 vocab_size=V_REAL, deterministic=True)
    out["logprob.local_dh"] = _logprob_step(d, w, b, impl="torch", vocab_parallel_group=group, vocab_size=V_REAL,
                                            reduce_hidden_grad=False)
    for name in LOSSES:
        out[f"loss.{name}"] = _loss_step(d, w, name, impl="torch", vocab_parallel_group=group, vocab_size=V_REAL)
    out["loss.grpo.triton"] = _loss_step(d, w, "grpo", impl="triton", vocab_parallel_group=group,
                                         vocab_size=V_REAL)
    from fusedpg.integrations.verl import linear_cross_entropy

    h = d["hidden"].reshape(B * T, H).clone().requires_grad_()
    logp, ent = linear_cross_entropy(h, w, d["targets"].reshape(-1).clamp(min=0), 1.0, "none", dist_process_group=group)
    (logp - 0.1 * ent).sum().backward()
    out["verl"] = dict(logp=logp.detach(), entropy=ent.detach(), d_hidden=h.grad)
    trunc = _truncation(d)
    narrow = 4 * max(t.shape[0] for t in torch.tensor_split(d["weight"], world)) * 4  # 4 rows a chunk, 3 chunks
    for det in (False, True):
        out[f"truncated.{det}"] = _logprob_step(d, w, b, impl="torch", vocab_parallel_group=group,
                                                vocab_size=V_REAL, deterministic=det, chunk_bytes=narrow, **trunc)
    d64 = _data(torch.float64)  # fp64 keys: the bisection select, its bounds and masses reduced over the group
    out["truncated.fp64"] = _logprob_step(d64, _shard(d64["weight"], world, rank), _shard(d64["bias"], world, rank),
                                          impl="torch", vocab_parallel_group=group, vocab_size=V_REAL,
                                          chunk_bytes=narrow * 2, **trunc)
    out["truncated.loss"] = _loss_step(d, w, "grpo", impl="torch", vocab_parallel_group=group, vocab_size=V_REAL,
                                       **trunc)
    bits, real = _whole_segments(world)
    out["bitwise"] = _bitwise_steps(bits, real, bits["weight"][256 * rank:256 * (rank + 1)],
                                    bits["bias"][256 * rank:256 * (rank + 1)], vocab_parallel_group=group,
                                    vocab_size=real)
    from fusedpg.vocab_parallel.op import _RankFold

    _RankFold.CHUNK = SMALL_MESSAGES
    wide, real = _whole_segments(world, WIDE_ROWS)
    out["bitwise.wide"] = _bitwise_steps(wide, real, wide["weight"][256 * rank:256 * (rank + 1)],
                                         wide["bias"][256 * rank:256 * (rank + 1)], vocab_parallel_group=group,
                                         vocab_size=real, chunk_bytes=NARROW_BYTES)
    if world == 2:  # ColwiseParallel's weight: a Shard(0) DTensor picks its mesh group by itself
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        dw = distribute_tensor(d["weight"], mesh, [Shard(0)]).requires_grad_()
        h = d["hidden"].clone().requires_grad_()
        logp, ent = fusedpg.linear_logprob_entropy(h, dw, d["targets"], temperature=d["temp"], vocab_size=V_REAL)
        ((logp.double() * d["up"][0]).sum() + (ent.double() * d["up"][1]).sum()).backward()
        out["dtensor"] = dict(logp=logp.detach(), entropy=ent.detach(), d_hidden=h.grad,
                              d_weight=dw.grad.to_local(), placements=str(dw.grad.placements))
        out["colwise"] = _colwise_vs_loss_parallel(d, mesh)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
    os._exit(0)


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks (uneven)"])
def ranks(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"tp{request.param}")
    mp.spawn(_worker, args=(request.param, str(out)), nprocs=request.param, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(request.param)]


def _logprob_reference(d, dtype, bias=True, truncation=None):
    h = d["hidden"].clone().requires_grad_()
    w = d["weight"][:V_REAL].clone().requires_grad_()
    b = d["bias"][:V_REAL].clone().requires_grad_() if bias else None
    logp, ent = linear_logprob_entropy_reference(h, w, d["targets"], b, d["temp"].to(h.dtype),
                                                 dtype=None if dtype != torch.float64 else torch.float64,
                                                 truncation=truncation)
    ((logp.double() * d["up"][0]).sum() + (ent.double() * d["up"][1]).sum()).backward()
    out = dict(logp=logp.detach(), entropy=ent.detach(), d_hidden=h.grad, d_weight=w.grad)
    return dict(out, d_bias=b.grad) if bias else out


def _references(dtype):
    """One process on the whole (unpadded) head: eager at ``dtype`` (float64 is the truth)."""
    d = _data(dtype if dtype == torch.float64 else torch.float32)
    out = {"logprob": _logprob_reference(d, dtype), "dtensor": _logprob_reference(d, dtype, bias=False)}
    trunc = _truncation(d)
    out["truncated"] = _logprob_reference(d, dtype, truncation=(trunc["top_k"], trunc["top_p"], trunc["min_p"]))
    for name in LOSSES:
        h, w = d["hidden"].clone().requires_grad_(), d["weight"][:V_REAL].clone().requires_grad_()
        loss, _ = fused_linear_pg_loss_reference(
            h, w, d["targets"].clamp(min=0), d["adv"], d["mask"], old_logp=d["old"], ref_logp=d["ref"],
            dtype=None if dtype != torch.float64 else torch.float64, **LOSSES[name])
        loss.backward()
        out[f"loss.{name}"] = dict(loss=loss.detach(), d_hidden=h.grad, d_weight=w.grad)
    return out


@pytest.fixture(scope="module")
def refs():
    return _references(torch.float32), _references(torch.float64)


def _check(ranks, key, ref_key, refs, names):
    eager, truth = refs[0][ref_key], refs[1][ref_key]
    for name in names:
        for r, res in enumerate(ranks):
            got = res[key][name]
            if name in ("d_weight", "d_bias"):  # each rank holds its shard's rows; padded rows get no gradient
                got = torch.cat([x[key][name] for x in ranks])
                assert not got[V_REAL:].any(), f"{key}: padded columns got a gradient"
                got = got[:V_REAL]
            assert_close_to_truth(f"{key}.{name}[rank {r}]", got, eager[name], truth[name], torch.float32)


@pytest.mark.parametrize("key", ["logprob.torch", "logprob.triton", "logprob.deterministic"])
def test_logprob_entropy_and_gradients_equal_one_process(ranks, refs, key):
    _check(ranks, key, "logprob", refs, ("logp", "entropy", "d_hidden", "d_weight", "d_bias"))


@pytest.mark.parametrize("key", ["loss.grpo", "loss.gspo", "loss.clip_cov", "loss.grpo.triton"])
def test_fused_loss_equals_one_process_on_every_rank(ranks, refs, key):
    """The normalisers are the data-parallel ones: every TP rank holds the same tokens and the same loss, which is
    the one-process loss (not divided by the TP size)."""
    _check(ranks, key, key.replace(".triton", ""), refs, ("loss", "d_hidden", "d_weight"))


@pytest.mark.parametrize("det", [False, True], ids=["all-reduce", "deterministic"])
def test_truncated_distribution_over_a_sharded_vocabulary(ranks, refs, det):
    """top-k, top-p (per row) and min-p found over the whole vocabulary (all-reduced maxima, sums and select
    histograms; chunks in lockstep on uneven shards): the one-process truncated log-probs, entropy and gradients,
    targets outside the kept set included (their finite floor, and no c from any rank)."""
    outside = refs[1]["truncated"]["logp"] <= -1e4
    assert outside.any() and not outside.all()
    _check(ranks, f"truncated.{det}", "truncated", refs, ("logp", "entropy", "d_hidden", "d_weight", "d_bias"))


def test_truncated_fp64_over_a_sharded_vocabulary(ranks, refs):
    truth = refs[1]["truncated"]
    for name in ("logp", "entropy", "d_hidden", "d_weight", "d_bias"):
        for r, res in enumerate(ranks):
            got = res["truncated.fp64"][name]
            if name in ("d_weight", "d_bias"):
                got = torch.cat([x["truncated.fp64"][name] for x in ranks])[:V_REAL]
            assert_close_to_truth(f"fp64.{name}[rank {r}]", got, None, truth[name], torch.float64)


def test_truncated_fused_loss_over_a_sharded_vocabulary(ranks):
    d = _data(torch.float32)
    h, w = d["hidden"].clone().requires_grad_(), d["weight"][:V_REAL].clone().requires_grad_()
    loss, metrics = fusedpg.fused_linear_pg_loss(h, w, d["targets"].clamp(min=0), d["adv"], d["mask"],
                                                 old_logp=d["old"], ref_logp=d["ref"], impl="torch",
                                                 **LOSSES["grpo"], **_truncation(d))
    loss.backward()
    for r in ranks:
        torch.testing.assert_close(r["truncated.loss"]["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["truncated.loss"]["d_hidden"], h.grad, rtol=1e-5, atol=1e-6)
    got = torch.cat([r["truncated.loss"]["d_weight"] for r in ranks])[:V_REAL]
    torch.testing.assert_close(got, w.grad, rtol=1e-5, atol=1e-6)


def test_verl_linear_cross_entropy_with_dist_process_group(ranks):
    d = _data(torch.float32)
    h = d["hidden"].reshape(B * T, H).clone().requires_grad_()
    logp, ent = fusedpg.linear_logprob_entropy(h, d["weight"], d["targets"].reshape(-1).clamp(min=0), impl="torch")
    (logp - 0.1 * ent).sum().backward()
    for r in ranks:  # the padded shards of the 19-row head hold real rows here: no vocab_size, the whole head
        for name, want in (("logp", logp), ("entropy", ent), ("d_hidden", h.grad)):
            torch.testing.assert_close(r["verl"][name], want.detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_deterministic_merge_is_bitwise_equal_on_every_rank(ranks):
    for name in ("logp", "entropy", "d_hidden"):
        for res in ranks[1:]:
            assert torch.equal(res["logprob.deterministic"][name], ranks[0]["logprob.deterministic"][name]), name


@pytest.mark.parametrize("wide", [False, True], ids=["few rows", "many rows, narrow chunks"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_deterministic_shards_of_whole_segments_equal_one_process_bitwise(ranks, impl, wide):
    """Whole 128-column segments per rank (the last shard padded past vocab_size): the gathered per-segment states,
    folded in global order, give one process's log-probs and entropy bit for bit. Every gradient too: on the torch
    plan each segment's weight and bias gradient comes from its own product and d_hidden is one fold over the
    segments; on the Triton plan every gradient GEMM is the fixed-tile kernel, d_weight and d_bias one running sum
    over the rows, d_hidden one running sum over the vocabulary; d_hidden's sums are handed from rank to rank."""
    key, kw = ("bitwise.wide", dict(chunk_bytes=NARROW_BYTES)) if wide else ("bitwise", {})
    d, real = _whole_segments(len(ranks), WIDE_ROWS if wide else B * T)
    one = _bitwise_steps(d, real, d["weight"][:real], d["bias"][:real], **kw)
    for name in ("logp", "entropy", "d_weight", "d_bias", "d_hidden"):
        for r, res in enumerate(ranks):
            got = res[key][impl][name]
            if name in ("d_weight", "d_bias"):
                got = torch.cat([x[key][impl][name] for x in ranks])[:real]
            assert torch.equal(got, one[impl][name]), f"{impl}.{name} on rank {r}"
    if impl == "torch":
        for res in ranks:
            for name in ("loss", "d_hidden"):
                assert torch.equal(res[key]["loss"][name], one["loss"][name]), name
            assert torch.equal(torch.cat([x[key]["loss"]["d_weight"] for x in ranks])[:real],
                               one["loss"]["d_weight"])


def test_hidden_gradient_left_local_sums_to_the_reduced_one(ranks):
    total = sum(r["logprob.local_dh"]["d_hidden"].double() for r in ranks)
    torch.testing.assert_close(total.float(), ranks[0]["logprob.torch"]["d_hidden"], rtol=1e-5, atol=1e-6)
    assert not torch.equal(ranks[0]["logprob.local_dh"]["d_hidden"], ranks[0]["logprob.torch"]["d_hidden"])


def test_colwise_parallel_head_matches_torch_loss_parallel(ranks):
    if len(ranks) != 2:
        pytest.skip("run on the 2-rank mesh")
    for r in ranks:
        ours, theirs = r["colwise"]["fusedpg"], r["colwise"]["loss_parallel"]
        for name in ("logp", "d_hidden", "d_weight"):
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)


def test_shard0_dtensor_weight(ranks, refs):
    if len(ranks) != 2:
        pytest.skip("run on the 2-rank mesh")
    assert all(r["dtensor"]["placements"] == "(Shard(dim=0),)" for r in ranks)  # the gradient stays sharded
    _check(ranks, "dtensor", "dtensor", refs, ("logp", "entropy", "d_hidden", "d_weight"))
