"""The Megatron adapter against Megatron's own ``vocab_parallel_cross_entropy`` on 2 gloo ranks (equal shards, which is
what Megatron's CPU path supports): log-probs, d_hidden (after Megatron's all-reduce of its input gradient) and each
rank's d_weight, with a real ``ColumnParallelLinear`` output layer. Marked ``megatron``: skipped without
megatron-core (``pip install --no-deps --ignore-requires-python megatron-core``; CI installs it that way)."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.megatron

S, BATCH, H, V, TP = 5, 2, 8, 16, 2


def _data():
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(S, BATCH, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    targets = torch.randint(0, V, (S, BATCH), generator=g)
    up = torch.randn(S, BATCH, generator=g)
    return hidden, weight, targets, up


def _worker(rank, out_dir):
    os.environ.update(OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/init", rank=rank, world_size=TP)
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, vocab_parallel_cross_entropy

    from fusedpg.integrations.megatron import megatron_logprob_entropy, megatron_pg_loss

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)
    hidden, weight, targets, up = _data()
    config = ModelParallelConfig(tensor_model_parallel_size=TP, use_cpu_initialization=True,
                                 params_dtype=torch.float32)
    layer = ColumnParallelLinear(H, V, config=config, init_method=torch.nn.init.zeros_, bias=False,
                                 gather_output=False, skip_bias_add=True)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor_split(weight, TP)[rank])
    out = {}
    # Megatron: logits through its own layer, its vocab-parallel cross entropy; d_hidden all-reduced by the layer
    h = hidden.clone().requires_grad_()
    logits, _ = layer(h)
    loss = vocab_parallel_cross_entropy(logits.float(), targets)
    (-(loss * up)).sum().backward()
    out["megatron"] = dict(logp=-loss.detach(), d_hidden=h.grad, d_weight=layer.weight.grad.clone())
    layer.weight.grad = None
    h = hidden.clone().requires_grad_()
    logp, _ = megatron_logprob_entropy(h, targets, layer, impl="torch")
    (logp * up).sum().backward()
    out["fusedpg"] = dict(logp=logp.detach(), d_hidden=h.grad, d_weight=layer.weight.grad.clone())
    layer.weight.grad = None
    loss, metrics = megatron_pg_loss(hidden, targets, layer, torch.ones(S, BATCH), torch.ones(S, BATCH),
                                     old_logp=out["fusedpg"]["logp"], loss_type="dapo", impl="torch")
    out["pg_loss"] = loss.detach()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    os._exit(0)


def test_adapter_equals_megatron_vocab_parallel_cross_entropy(tmp_path):
    pytest.importorskip("megatron.core")
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=TP, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(TP)]
    for r in ranks:
        for name in ("logp", "d_hidden", "d_weight"):
            torch.testing.assert_close(r["fusedpg"][name], r["megatron"][name], rtol=1e-5, atol=1e-6, msg=name)
        # on-policy dapo (old = current, A = 1 on every token): the loss is -mean(ratio * A) = -1
        torch.testing.assert_close(r["pg_loss"], torch.tensor(-1.0), rtol=1e-6, atol=1e-6)
    assert not torch.equal(ranks[0]["fusedpg"]["d_weight"], ranks[1]["fusedpg"]["d_weight"])  # shards differ
