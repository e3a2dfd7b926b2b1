"""Packing of GRPO groups into shared-prefix rows, and the layout that describes them.

A group is one prompt of ``P`` tokens and ``G`` completions of lengths ``L_1 … L_G``. Packed, it is the compact run
``[prompt | completion_1 | … | completion_G]`` inside a right-padded row of ``seq_len`` tokens. By default every group
has a row of its own; ``pack(..., max_row_len=n)`` places several groups in one row (first fit, in order).

The layout holds host-side Python ints only; device tensors (segment labels, position ids, gather indices, tile
lists) are built from them once per device and cached, so the attention call never synchronises. It is a plain
class on purpose: FSDP2 mixed precision runs ``dataclasses.replace`` on dataclass keyword arguments.
"""
from __future__ import annotations

import functools
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch


def _ints(name: str, values) -> Tuple[int, ...]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    try:
        out = tuple(int(v) for v in values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {type(values).__name__}") from None
    return out


class PrefixLayout:
    """Where every prompt and completion sits in the packed ``[n_rows, seq_len]`` tensors.

    Args:
        prompt_lens: ``P_i`` per group, each >= 1.
        completion_lens: per group, the list ``[L_i1, …, L_iG]`` (G >= 1, each L >= 1).
        seq_len: packed row length; default the longest row.
        group_rows, group_starts: row and first token of each group; default one group per row, at token 0.

    Completions are numbered group by group (``n_completions = sum G_i``): that is the row order of ``unpack``.
    """

    def __init__(self, prompt_lens, completion_lens, seq_len: Optional[int] = None,
                 group_rows=None, group_starts=None):
        self.prompt_lens = _ints("prompt_lens", prompt_lens)
        if isinstance(completion_lens, torch.Tensor) or not isinstance(completion_lens, Sequence):
            raise TypeError(f"completion_lens must be a list with one list of lengths per group, "
                            f"got {type(completion_lens).__name__}")
        self.completion_lens = tuple(_ints(f"completion_lens[{i}]", c) for i, c in enumerate(completion_lens))
        n = len(self.prompt_lens)
        if len(self.completion_lens) != n:
            raise ValueError(f"completion_lens must have one list per prompt ({n} prompts in prompt_lens), "
                             f"got {len(self.completion_lens)} lists: every group needs exactly one prompt")
        if n == 0:
            raise ValueError("prompt_lens must name at least one group, got an empty list")
        for i, p in enumerate(self.prompt_lens):
            if p < 1:
                raise ValueError(f"prompt_lens[{i}] must be >= 1 (a group without a prompt has nothing to share), "
                                 f"got {p}")
        for i, lens in enumerate(self.completion_lens):
            if not lens:
                raise ValueError(f"completion_lens[{i}] must list at least one completion, got []")
            if min(lens) < 1:
                raise ValueError(f"completion_lens[{i}] must hold lengths >= 1, got {list(lens)}")
        self.group_lens = tuple(p + sum(c) for p, c in zip(self.prompt_lens, self.completion_lens))
        self.group_rows = tuple(range(n)) if group_rows is None else _ints("group_rows", group_rows)
        self.group_starts = (0,) * n if group_starts is None else _ints("group_starts", group_starts)
        for name, vals in (("group_rows", self.group_rows), ("group_starts", self.group_starts)):
            if len(vals) != n or (vals and min(vals) < 0):
                raise ValueError(f"{name} must hold {n} non-negative ints (one per group), got {list(vals)}")
        self.n_rows = max(self.group_rows) + 1
        ends = [s + t for s, t in zip(self.group_starts, self.group_lens)]
        need = max(ends)
        self.seq_len = need if seq_len is None else int(seq_len)
        if self.seq_len < need:
            g = ends.index(need)
            raise ValueError(f"seq_len must be >= {need}, the end of group {g} (prompt {self.prompt_lens[g]} + "
                             f"completions {list(self.completion_lens[g])}), got {self.seq_len}")
        spans = sorted(zip(self.group_rows, self.group_starts, ends))
        for (r0, _, e0), (r1, s1, _) in zip(spans, spans[1:]):
            if r0 == r1 and s1 < e0:
                raise ValueError(f"group_starts must not overlap groups in row {r0}: a group starts at {s1} "
                                 f"before the previous one ends at {e0}")
        self.n_groups = n
        self.n_completions = sum(len(c) for c in self.completion_lens)
        self.max_completion_len = max(max(c) for c in self.completion_lens)
        self._cache: Dict[tuple, object] = {}
        self._checked_positions = None
        # the layout as plain ints, the form the custom op takes: n_groups, then row, start, P, G, L_1..L_G per group
        self.spec: Tuple[int, ...] = (n, self.seq_len) + tuple(
            v for r, s, p, c in zip(self.group_rows, self.group_starts, self.prompt_lens, self.completion_lens)
            for v in (r, s, p, len(c), *c))

    @staticmethod
    def from_spec(spec: Sequence[int]) -> "PrefixLayout":
        """The inverse of ``layout.spec`` (cached, so the device tensors a layout builds are built once)."""
        return _layout_of(tuple(int(v) for v in spec))

    # ---------------------------------------------------------------- host-side description
    def segments(self):
        """Yield ``(row, start, prompt_len, [(completion_start, length), ...])`` per group."""
        for r, s, p, lens in zip(self.group_rows, self.group_starts, self.prompt_lens, self.completion_lens):
            comps, at = [], s + p
            for length in lens:
                comps.append((at, length))
                at += length
            yield r, s, p, comps

    def __repr__(self) -> str:
        return (f"PrefixLayout(n_rows={self.n_rows}, seq_len={self.seq_len}, prompt_lens={list(self.prompt_lens)}, "
                f"completion_lens={[list(c) for c in self.completion_lens]})")

    def _cached(self, key, device, build):
        device = torch.device(device)
        full = key + (str(device),)
        if full not in self._cache:
            self._cache[full] = build(device)
        return self._cache[full]

    # ---------------------------------------------------------------- device tensors
    def labels(self, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """int32 ``[n_rows, seq_len]`` (seg, pre): a batch-unique segment id per token (-1 for padding) and the
        id of its group's prompt segment. Key ``j`` is visible to query ``i`` of the same row iff ``j <= i``,
        ``seg[i] >= 0``, ``seg[j] >= 0`` and ``seg[j] in (seg[i], pre[i])``."""
        def build(dev):
            seg = torch.full((self.n_rows, self.seq_len), -1, dtype=torch.int32)
            pre = torch.full((self.n_rows, self.seq_len), -1, dtype=torch.int32)
            sid = 0
            for r, s, p, comps in self.segments():
                prompt_id = sid
                for a, length in [(s, p)] + comps:
                    seg[r, a:a + length] = sid
                    pre[r, a:a + length] = prompt_id
                    sid += 1
            return seg.to(dev), pre.to(dev)
        return self._cached(("labels",), device, build)

    def position_ids(self, device="cpu") -> torch.Tensor:
        """int64 ``[n_rows, seq_len]`` (a new tensor): prompt ``0…P-1``; every completion restarts at ``P``;
        padding 0."""
        return self._positions(device).clone()

    def _positions(self, device) -> torch.Tensor:
        def build(dev):
            pos = torch.zeros((self.n_rows, self.seq_len), dtype=torch.int64)
            for r, s, p, comps in self.segments():
                pos[r, s:s + p] = torch.arange(p)
                for a, length in comps:
                    pos[r, a:a + length] = torch.arange(p, p + length)
            return pos.to(dev)
        return self._cached(("pos",), device, build)

    def attention_mask(self, device="cpu") -> torch.Tensor:
        """int64 ``[n_rows, seq_len]``: 1 on tokens, 0 on padding (HF's 2-D padding mask; the shared-prefix
        attention ignores it, but other code such as a loss may use it)."""
        return self._cached(("mask",), device, lambda dev: (self.labels(dev)[0] >= 0).long())

    def mask_placeholder(self, device="cpu") -> torch.Tensor:
        """bool ``[n_rows, 1, seq_len, 0]``, for transformers' ``attention_mask`` beside ``prefix_layout``: a 4-D mask
        is passed through unchanged, so transformers builds no ``S x S`` mask that the shared-prefix attention would
        ignore. Any other attention function that computes with it raises ``MaskPlaceholder``'s error."""
        return self._cached(("placeholder",), device, lambda dev: torch.zeros(
            (self.n_rows, 1, self.seq_len, 0), dtype=torch.bool, device=dev).as_subclass(MaskPlaceholder))

    def check_position_ids(self, position_ids: torch.Tensor, name: str = "position_ids") -> None:
        """Raise ``ValueError`` unless ``position_ids`` (``[n_rows or 1, seq_len]``) equal ``position_ids()`` on
        every non-padding token. One comparison (a host synchronisation on CUDA); a tensor already checked is not
        checked again, so every layer of one forward pays it once."""
        if self._checked_positions is not None:
            ref, version = self._checked_positions
            if ref is position_ids and version == position_ids._version:
                return
        if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or \
                position_ids.shape[-1] != self.seq_len or position_ids.shape[0] not in (1, self.n_rows):
            shape = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids)
            raise ValueError(f"{name} must be [{self.n_rows}, {self.seq_len}] to match the layout, got {shape}")
        want = self._positions(position_ids.device)
        real = self.labels(position_ids.device)[0] >= 0
        bad = real & (position_ids.expand_as(want) != want)
        if bool(bad.any()):
            r, t = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{name} disagree with the layout at row {r}, token {t}: got "
                             f"{int(position_ids.expand_as(want)[r, t])}, the layout says {int(want[r, t])} "
                             f"(prompt 0..P-1, each completion P..P+L-1; use pack()'s position_ids)")
        self._checked_positions = (position_ids, position_ids._version)

    # ---------------------------------------------------------------- unpacking
    def _gather_index(self, predict: bool, padded: bool, device) -> torch.Tensor:
        def build(dev):
            rows: List[List[int]] = []
            for r, s, p, comps in self.segments():
                base = r * self.seq_len
                for a, length in comps:
                    pos = list(range(a, a + length))
                    if predict:  # the last prompt token predicts the first completion token
                        pos = [s + p - 1] + pos[:-1]
                    rows.append([base + t for t in pos])
            if not padded:
                return torch.tensor([t for row in rows for t in row], dtype=torch.int64, device=dev)
            sentinel = self.n_rows * self.seq_len  # a zero row appended by unpack
            out = torch.full((len(rows), self.max_completion_len), sentinel, dtype=torch.int64)
            for i, row in enumerate(rows):
                out[i, :len(row)] = torch.tensor(row, dtype=torch.int64)
            return out.to(dev)
        return self._cached(("gather", predict, padded), device, build)

    def unpack(self, x: torch.Tensor, *, predict: bool = True, padded: bool = False) -> torch.Tensor:
        """Per-completion rows of a packed tensor ``x`` ``[n_rows, seq_len, ...]`` (hidden states, logits, ids).

        predict=True: the rows whose next-token prediction scores each completion's tokens, i.e. for a completion
        ``c`` of prompt ``p``: ``[x[p_last], x[c_0], …, x[c_{L-2}]]`` — exactly ``x_repeated[P-1 : P+L-1]`` of the
        repeated row ``[p | c]``. The last prompt row is read by every completion of its group, so its gradient is
        the sum over the group, as in the repeated batch. predict=False: the completion's own rows
        ``x[c_0 … c_{L-1}]`` (``unpack(input_ids, predict=False)`` gives the targets).

        Returns ``[sum L, ...]`` (completions concatenated in order), or with ``padded=True``
        ``[n_completions, max_completion_len, ...]`` zero-padded (see ``completion_mask``).
        """
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or tuple(x.shape[:2]) != (self.n_rows, self.seq_len):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [n_rows={self.n_rows}, seq_len={self.seq_len}, ...] to match the layout, "
                             f"got {shape}")
        flat = x.reshape((self.n_rows * self.seq_len,) + tuple(x.shape[2:]))
        idx = self._gather_index(bool(predict), bool(padded), x.device)
        if not padded:
            return flat.index_select(0, idx)
        flat = torch.cat([flat, flat.new_zeros((1,) + tuple(flat.shape[1:]))])
        out = flat.index_select(0, idx.reshape(-1))
        return out.reshape(tuple(idx.shape) + tuple(x.shape[2:]))

    def completion_mask(self, device="cpu") -> torch.Tensor:
        """bool ``[n_completions, max_completion_len]``: True on the real tokens of ``unpack(..., padded=True)``."""
        def build(dev):
            lens = torch.tensor([n for c in self.completion_lens for n in c])
            return (torch.arange(self.max_completion_len)[None, :] < lens[:, None]).to(dev)
        return self._cached(("cmask",), device, build)

    def completion_group(self, device="cpu") -> torch.Tensor:
        """int64 ``[n_completions]``: the group index of every completion (for group-relative advantages)."""
        return self._cached(("cgroup",), device, lambda dev: torch.tensor(
            [i for i, c in enumerate(self.completion_lens) for _ in c], dtype=torch.int64, device=dev))


# reading metadata, moving and copying (wrappers such as DDP move inputs); nothing that computes
_PLACEHOLDER_OK = frozenset(("__get__", "dim", "size", "stride", "numel", "is_floating_point", "is_complex", "to",
                             "clone", "detach", "contiguous", "__repr__", "__format__", "__deepcopy__", "__reduce_ex__"))


class MaskPlaceholder(torch.Tensor):
    """The empty mask of a packed forward. Reading its shape is allowed; any computation with it means an attention
    function other than fusedpg's got the packed rows, which would attend across completions, so it raises."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _PLACEHOLDER_OK:
            return super().__torch_function__(func, types, args, kwargs)
        raise ValueError(
            "prefix_layout was passed to a model whose attention is not fusedpg's: build the model with "
            "attn_implementation=fusedpg.prefix.register_transformers(). A model built from the same config object "
            "as another model with a different attn_implementation was switched by transformers; give each model "
            "its own config (copy.deepcopy)")


class Packed(NamedTuple):
    """What ``pack`` returns: ``input_ids`` and ``position_ids`` ``[n_rows, seq_len]`` and the layout."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    layout: PrefixLayout

    def model_kwargs(self) -> dict:
        """Keyword arguments for a transformers causal LM set up by ``register_transformers``."""
        return dict(input_ids=self.input_ids, position_ids=self.position_ids, prefix_layout=self.layout,
                    attention_mask=self.layout.mask_placeholder(self.input_ids.device), use_cache=False)


@functools.lru_cache(maxsize=64)
def _layout_of(spec: Tuple[int, ...]) -> PrefixLayout:
    n, seq_len, at = spec[0], spec[1], 2
    rows, starts, prompts, comps = [], [], [], []
    for _ in range(n):
        r, s, p, g = spec[at:at + 4]
        rows.append(r), starts.append(s), prompts.append(p), comps.append(list(spec[at + 4:at + 4 + g]))
        at += 4 + g
    return PrefixLayout(prompts, comps, seq_len=seq_len, group_rows=rows, group_starts=starts)


def _as_ids(name: str, x) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(list(x), dtype=torch.int64)
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor or list of token ids, got "
                         f"{tuple(t.shape)} {t.dtype}")
    return t.to("cpu", torch.int64)


def place_groups(sizes: Sequence[int], max_row_len: int) -> Tuple[List[int], List[int]]:
    """(row, start) per group: consecutive groups share a row while they fit in ``max_row_len`` tokens."""
    rows: List[int] = []
    starts: List[int] = []
    fill: List[int] = []
    for size in sizes:
        if size > max_row_len:
            raise ValueError(f"max_row_len must fit every group, got {max_row_len} < group length {size}")
        if fill and fill[-1] + size <= max_row_len:
            rows.append(len(fill) - 1)
            starts.append(fill[-1])
            fill[-1] += size
        else:
            rows.append(len(fill))
            starts.append(0)
            fill.append(size)
    return rows, starts


def pack(prompts, completions, *, pad_token_id: int = 0, max_row_len: Optional[int] = None,
         seq_len: Optional[int] = None, device=None) -> Packed:
    """Pack groups ``[prompt | completion_1 | … | completion_G]`` into right-padded rows.

    Args:
        prompts: per group, the prompt's token ids (1-D tensor or list; length >= 1).
        completions: per group, a list of its completions' token ids (G_i >= 1; each length >= 1).
        pad_token_id: id written on padding.
        max_row_len: if given, put several consecutive groups into one row while they fit (first fit in
            order); default one group per row.
        seq_len: pad rows to this length (default the longest row).
        device: device of the returned tensors (default: the prompts' device, else CPU).

    Returns ``Packed(input_ids, position_ids, layout)``; position ids count ``0…P-1`` over the prompt and restart at
    ``P`` for every completion, so each token has the position it has in the repeated row ``[prompt | completion]``.
    """
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of 1-D token id tensors, got {type(prompts).__name__}")
    if not isinstance(completions, Sequence) or len(completions) != len(prompts):
        got = len(completions) if isinstance(completions, Sequence) else type(completions).__name__
        raise ValueError(f"completions must hold one list of completions per prompt ({len(prompts)} prompts), "
                         f"got {got}")
    if device is None:
        device = prompts[0].device if prompts and isinstance(prompts[0], torch.Tensor) else "cpu"
    ps = [_as_ids(f"prompts[{i}]", p) for i, p in enumerate(prompts)]
    cs = []
    for i, group in enumerate(completions):
        if isinstance(group, torch.Tensor) or not isinstance(group, Sequence):
            raise TypeError(f"completions[{i}] must be a list of 1-D token id tensors, got {type(group).__name__}")
        cs.append([_as_ids(f"completions[{i}][{j}]", c) for j, c in enumerate(group)])
    prompt_lens = [p.numel() for p in ps]
    completion_lens = [[c.numel() for c in group] for group in cs]
    rows, starts = (None, None) if max_row_len is None else \
        place_groups([p + sum(c) for p, c in zip(prompt_lens, completion_lens)], max_row_len)
    layout = PrefixLayout(prompt_lens, completion_lens, seq_len=seq_len, group_rows=rows, group_starts=starts)
    ids = torch.full((layout.n_rows, layout.seq_len), int(pad_token_id), dtype=torch.int64)
    for (r, s, p, comps), prompt, group in zip(layout.segments(), ps, cs):
        ids[r, s:s + p] = prompt
        for (a, length), c in zip(comps, group):
            ids[r, a:a + length] = c
    return Packed(ids.to(device), layout.position_ids(device), layout)
