"""Aggregation weights against plain statements of verl ``agg_loss`` and TRL's normalisers (docs/losses.md#aggregation-modes)."""
import pytest
import torch

from fusedpg.objective import make_config, prepare, resolve
from fusedpg.objective.aggregation import entropy_weights


def setup(seed=0, B=5, T=6):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.4).double()
    mask[2] = 0
    loss = torch.randn(B, T, generator=g, dtype=torch.float64)
    return mask, loss


def weights(mask, **opts):
    b = prepare(torch.zeros(mask.shape[0], dtype=torch.float64), mask, old_logp=torch.zeros_like(mask), **opts)
    return b.weights.reshape(mask.shape), b


def verl_agg_loss(loss_mat, mask, mode, dp=1, batch_num_tokens=None, global_batch_size=None, scale=None):
    if mode == "token-mean":
        n = mask.sum() if batch_num_tokens is None else batch_num_tokens
        return (loss_mat * mask).sum() / n * dp
    seq_n = mask.sum(-1)
    seq_mask = (seq_n > 0).double()
    if mode == "seq-mean-token-sum":
        seq = (loss_mat * mask).sum(-1)
    elif mode == "seq-mean-token-mean":
        seq = (loss_mat * mask).sum(-1) / (seq_n + 1e-8)
    else:
        return (loss_mat * mask).sum() / (mask.shape[-1] if scale is None else scale)
    s = seq_mask.sum() if global_batch_size is None else global_batch_size
    return (seq * seq_mask).sum() / s * dp


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_verl_modes(mode):
    mask, lm = setup()
    w, _ = weights(mask, loss_type="ppo", aggregation=mode)
    torch.testing.assert_close((w * lm).sum(), verl_agg_loss(lm, mask, mode))
    w, _ = weights(mask, loss_type="ppo", aggregation=mode, gradient_accumulation_steps=4)
    torch.testing.assert_close((w * lm).sum(), verl_agg_loss(lm, mask, mode) / 4)  # legacy actor: 1/GA
    if mode != "seq-mean-token-sum-norm":  # global info: no GA division, times dp
        w, _ = weights(mask, loss_type="ppo", aggregation=mode, gradient_accumulation_steps=4, world_size=2,
                       num_items_in_batch=40.0, num_sequences=9.0)
        torch.testing.assert_close((w * lm).sum(), verl_agg_loss(lm, mask, mode, 2, 40.0, 9.0))
    else:
        w, _ = weights(mask, loss_type="ppo", aggregation=mode, loss_scale_factor=11.0)
        torch.testing.assert_close((w * lm).sum(), verl_agg_loss(lm, mask, mode, scale=11.0))


def test_trl_modes():
    mask, lm = setup(1)
    B = mask.shape[0]
    ga, p = 3, 2
    L = lm * mask
    expect = {
        "grpo": (L.sum(-1) / mask.sum(-1).clamp(min=1)).mean() / ga,
        "bnpo": L.sum() / mask.sum().clamp(min=1) / ga,
        "dr_grpo": L.sum() / (B * 9) / ga,
        "dapo": L.sum() / (50.0 / p),
        "luspo": (L.sum(-1) / mask.sum(-1).clamp(min=1) * mask.sum(-1)).mean() / ga,
    }
    for agg, value in expect.items():
        w, _ = weights(mask, loss_type="ppo", aggregation=agg, gradient_accumulation_steps=ga, world_size=p,
                       num_items_in_batch=50.0, max_completion_length=9)
        torch.testing.assert_close((w * lm).sum(), value, msg=agg)


def test_group_token_mean_and_entropy_weights():
    mask, lm = setup(2)
    groups = torch.tensor([0, 0, 1, 1, 2])
    w, b = weights(mask, loss_type="dcpo", group_ids=groups)
    per_group = [(lm[groups == g] * mask[groups == g]).sum() / mask[groups == g].sum().clamp(min=1) for g in range(3)]
    torch.testing.assert_close((w * lm).sum(), torch.stack(per_group).mean())
    em = (torch.rand(mask.shape, generator=torch.Generator().manual_seed(3)) > 0.5).double().reshape(-1)
    m = b.mask
    for agg in ("grpo", "dapo", "seq-mean-token-mean"):
        cfg = resolve(make_config(loss_type="ppo", aggregation=agg, gradient_accumulation_steps=2))
        wp = prepare(torch.zeros(5, dtype=torch.float64), mask, old_logp=torch.zeros_like(mask), config=cfg).weights
        we = entropy_weights(m, m * em, wp, cfg)
        if agg == "grpo":  # TRL: local mean over the effective mask, / GA
            torch.testing.assert_close(we, m * em / ((m * em).sum() * 2))
        else:  # policy normaliser restricted to the mask (TRL dapo divides by all valid tokens)
            torch.testing.assert_close(we, wp * em)
