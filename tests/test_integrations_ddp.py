"""DDP (docs/losses.md#aggregation-modes; docs/peers.md#known-bugs-turned-into-tests row 11): two gloo ranks on CPU, each with half of the global batch, produce the
single-process gradients of the whole batch when the loss is normalised globally (num_items_in_batch, world_size),
and every rank ends with identical gradients. No collective is issued by fusedpg itself."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedpg
from fusedpg.integrations.liger import LigerFusedLinearGRPOLoss

WORLD, B, T, H, V = 2, 4, 6, 8, 17
CASES = {  # name -> fusedpg options (per rank); num_items_in_batch / world_size filled in below
    "dapo": dict(loss_type="dapo", beta=0.04, entropy_coef=0.01),
    "grpo": dict(loss_type="grpo", beta=0.04),
    "dr_grpo": dict(loss_type="dr_grpo", max_completion_length=T),
}


class Policy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(H, H)
        self.head = torch.nn.Linear(H, V, bias=False)

    def forward(self, x):
        return torch.tanh(self.body(x))


def _global_batch():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(B, T, H, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[0, 4:] = 0
    mask[1, 2:] = 0
    mask[3, 5:] = 0
    adv = torch.randn(B, generator=g)
    old = -2.8 + 0.2 * torch.randn(B, T, generator=g)
    ref = -2.8 + 0.2 * torch.randn(B, T, generator=g)
    return x, y, mask, adv, old, ref


def _model():
    torch.manual_seed(7)
    return Policy()


def _loss(model_out, head_w, sl, case, world):
    x, y, mask, adv, old, ref = (t[sl] for t in _global_batch())
    n_glob = float(_global_batch()[2].sum())
    if case == "liger":
        fn = LigerFusedLinearGRPOLoss(loss_type="dapo", beta=0.04, impl="torch")
        return fn(model_out, head_w, y, mask, adv, ref_per_token_logps=ref, old_per_token_logps=old,
                  num_items_in_batch=n_glob)[0]
    opts = dict(CASES[case], num_items_in_batch=n_glob, world_size=world)
    return fusedpg.fused_linear_pg_loss(model_out, head_w, y, adv, mask, old_logp=old, ref_logp=ref, impl="torch",
                                        **opts)[0]


def _grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        results = {}
        per = B // WORLD
        sl = slice(rank * per, (rank + 1) * per)
        for case in list(CASES) + ["liger"]:
            ddp = torch.nn.parallel.DistributedDataParallel(_model())
            hidden = ddp(_global_batch()[0][sl])  # forward through the wrapper arms the reducer
            loss = _loss(hidden, ddp.module.head.weight, sl, case, WORLD)
            loss.backward()
            results[case] = (loss.detach(), _grads(ddp.module))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # gloo's threads sometimes abort the interpreter's teardown after a clean run ("terminate called without an
    # active exception"); the results are on disk, so leave without running it.
    os._exit(0)


def test_ddp_gradients_equal_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for case in list(CASES) + ["liger"]:
        model = _model()
        loss = _loss(model(_global_batch()[0]), model.head.weight, slice(None), case, 1)
        loss.backward()
        want = _grads(model)
        # as in TRL, the mean of the per-rank losses is the global loss (DDP averages the gradients the same way)
        total = sum(r[case][0] for r in ranks) / WORLD
        torch.testing.assert_close(total, loss.detach(), rtol=1e-5, atol=1e-6)
        for name, g in want.items():
            for r in ranks:  # identical on every rank (reducer armed) and equal to the single-process gradient
                torch.testing.assert_close(r[case][1][name], g, rtol=1e-5, atol=1e-6, msg=f"{case} {name}")
