"""Packing, position ids, unpacking and the block index of fusedpg.prefix."""
import pytest
import torch

from fusedpg.prefix import PrefixLayout, pack, visibility
from fusedpg.prefix.blocks import block_index, tile_visibility


def _groups(seed=0, prompt_lens=(4, 1, 6), completion_lens=((3, 1), (2, 5, 1, 4, 2), (7,))):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 50, (p,), generator=g) for p in prompt_lens]
    comps = [[torch.randint(1, 50, (n,), generator=g) for n in lens] for lens in completion_lens]
    return prompts, comps


def _repeated(prompts, comps):
    return [(p, c) for p, cs in zip(prompts, comps) for c in cs]


@pytest.mark.parametrize("max_row_len", [None, 24])
def test_pack_ids_positions_and_unpack(max_row_len):
    prompts, comps = _groups()
    packed = pack(prompts, comps, pad_token_id=-1, max_row_len=max_row_len)
    ids, pos, layout = packed
    assert layout.n_completions == 8 and ids.shape == (layout.n_rows, layout.seq_len)
    if max_row_len is None:
        assert layout.n_rows == 3 and layout.seq_len == 1 + 14
    else:
        assert layout.n_rows == 2 and layout.group_rows == (0, 0, 1)
    targets = layout.unpack(ids, predict=False)
    rows = layout.unpack(ids, predict=True)
    pos_rows = layout.unpack(pos, predict=False)
    at = 0
    for p, c in _repeated(prompts, comps):
        n = c.numel()
        full = torch.cat([p, c])
        assert torch.equal(targets[at:at + n], c)
        assert torch.equal(rows[at:at + n], full[p.numel() - 1:p.numel() + n - 1])  # next-token rows
        assert torch.equal(pos_rows[at:at + n], torch.arange(p.numel(), p.numel() + n))
        at += n
    assert at == targets.numel()
    # padding gets pad_token_id and position 0; every prompt starts at position 0
    mask = layout.attention_mask()
    assert bool((ids[mask == 0] == -1).all()) and bool((pos[mask == 0] == 0).all())
    assert int(mask.sum()) == sum(p.numel() for p in prompts) + sum(c.numel() for cs in comps for c in cs)


def test_unpack_padded_and_mask():
    prompts, comps = _groups()
    ids, _, layout = pack(prompts, comps)
    padded = layout.unpack(ids, predict=False, padded=True)
    cmask = layout.completion_mask()
    assert padded.shape == (8, layout.max_completion_len) == cmask.shape
    assert torch.equal(padded[cmask], layout.unpack(ids, predict=False))
    assert bool((padded[~cmask] == 0).all())
    assert layout.completion_group().tolist() == [0, 0, 1, 1, 1, 1, 1, 2]


def test_unpack_gradient_is_the_sum_over_the_group():
    """The last prompt row feeds every completion's first prediction: its gradient sums the group, exactly like
    the G copies of the repeated batch."""
    prompts, comps = _groups()
    _, _, layout = pack(prompts, comps)
    x = torch.randn(layout.n_rows, layout.seq_len, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(sum(c.numel() for cs in comps for c in cs), 3, dtype=torch.float64)
    (layout.unpack(x) * w).sum().backward()
    want = torch.zeros_like(x)
    at = 0
    for (r, s, p, cs) in layout.segments():
        for a, n in cs:
            want[r, s + p - 1] += w[at]
            want[r, a:a + n - 1] += w[at + 1:at + n]
            at += n
    assert torch.equal(x.grad, want)
    x.grad = None
    (layout.unpack(x, padded=True) * 2).sum().backward()
    assert x.grad[0, layout.prompt_lens[0] - 1, 0].item() == 2 * len(comps[0])


def test_block_index_covers_exactly_the_visible_tiles():
    _, _, layout = pack(*_groups(), max_row_len=26, seq_len=29)
    vis = visibility(layout)
    for bm, bn in [(16, 16), (8, 4), (4, 8)]:
        tiles = tile_visibility(layout, bm, bn)
        n = layout.seq_len
        padded = torch.zeros(layout.n_rows, tiles.shape[1] * bm, tiles.shape[2] * bn, dtype=torch.bool)
        padded[:, :n, :n] = vis
        want = padded.reshape(layout.n_rows, tiles.shape[1], bm, tiles.shape[2], bn).any(4).any(2)
        assert torch.equal(tiles, want)
        idx = block_index(layout, bm, bn, "cpu")
        assert idx.q_ptr[-1].item() == idx.kv_ptr[-1].item() == int(tiles.sum())
        rows = torch.repeat_interleave(torch.arange(layout.n_rows * idx.n_q_tiles), torch.diff(idx.q_ptr).long())
        rebuilt = torch.zeros_like(tiles).reshape(-1, idx.n_kv_tiles)
        rebuilt[rows, idx.q_kv.long()] = True
        assert torch.equal(rebuilt.reshape(tiles.shape), tiles)


def test_other_completions_are_skipped_by_the_block_index():
    # prompt 16, four completions of 32: completion tiles never list another completion's tiles
    layout = PrefixLayout([16], [[32, 32, 32, 32]])
    tiles = tile_visibility(layout, 16, 16)[0]
    # prompt diagonal; per completion (two query tiles): the prompt tile twice + the causal 2x2 triangle
    assert int(tiles.sum()) == 1 + 4 * (2 + 3)


def test_position_ids_check():
    prompts, comps = _groups()
    ids, pos, layout = pack(prompts, comps)
    layout.check_position_ids(pos)
    layout.check_position_ids(pos)  # cached: same tensor, same version
    bad = pos.clone()
    bad[1, 3] += 1
    with pytest.raises(ValueError, match="position_ids"):
        layout.check_position_ids(bad)
    arange = torch.arange(layout.seq_len).expand(layout.n_rows, -1)  # HF's default positions
    with pytest.raises(ValueError, match="position_ids"):
        layout.check_position_ids(arange)
    with pytest.raises(ValueError, match="position_ids"):
        layout.check_position_ids(pos[:, :-1])
    pos[1, 3] += 1  # an in-place change of the checked tensor is seen
    with pytest.raises(ValueError, match="position_ids"):
        layout.check_position_ids(pos)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_lens=[4, 2], completion_lens=[[3]]), "completion_lens"),          # a group without a prompt
    (dict(prompt_lens=[4], completion_lens=[[3], [2]]), "completion_lens"),        # completions without a prompt
    (dict(prompt_lens=[0], completion_lens=[[3]]), r"prompt_lens\[0\]"),           # empty prompt
    (dict(prompt_lens=[2], completion_lens=[[]]), r"completion_lens\[0\]"),        # group without completions
    (dict(prompt_lens=[2], completion_lens=[[3, 0]]), r"completion_lens\[0\]"),    # empty completion
    (dict(prompt_lens=[4], completion_lens=[[3, 5]], seq_len=10), "seq_len"),      # lengths do not fit the row
    (dict(prompt_lens=[2, 2], completion_lens=[[3], [1]], group_rows=[0, 0], group_starts=[0, 3]), "group_starts"),
    (dict(prompt_lens=[2, 2], completion_lens=[[3], [1]], group_rows=[0]), "group_rows"),
])
def test_bad_layouts_raise_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PrefixLayout(**kwargs)


def test_bad_pack_and_unpack_inputs():
    prompts, comps = _groups()
    with pytest.raises(ValueError, match="completions"):
        pack(prompts, comps[:2])
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        pack([prompts[0], torch.zeros(2, 2, dtype=torch.long)], comps[:2])
    with pytest.raises(ValueError, match="max_row_len"):
        pack(prompts, comps, max_row_len=8)
    _, _, layout = pack(prompts, comps)
    with pytest.raises(ValueError, match="x must be"):
        layout.unpack(torch.zeros(layout.n_rows, layout.seq_len + 1))
