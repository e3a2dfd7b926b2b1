"""Counter-based sampling from a chunk's logits: K tokens per row by the inverse CDF, never ``[N, V]``.

A row's k-th draw is the token whose cumulative probability interval holds ``u``, a uniform from a counter-based
hash of ``(seed, sample id, k)``: no generator state, so the tokens depend on the row's logits and ids alone (not
on N, the chunking, the other rows or the device). The cumulative sums are two-level, in float64: sums of
256-column blocks pick the block, a cumsum inside the K chosen blocks picks the token, so every token's interval
is its own probability to float64 rounding (a flat fp32 cumsum over 150k columns would smear the tail). The K
draws of a row are independent (with replacement). Derivation and the hash: fusedpg/linear/README.md#sampling.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
#: Columns of one block of the two-level cumulative sum.
BLOCK = 256
#: Columns exponentiated at once while forming the block sums (bounds the temporaries to ``[rows, SCAN]``).
SCAN = 16 * BLOCK


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2^32`` for ``x`` in ``[0, 2^32)`` held in int64, without overflowing int64 (c split in halves)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (two multiply-xorshift rounds; "lowbias32" constants)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix_int(v: int) -> int:
    return int(mix32(torch.tensor([v & MASK32], dtype=torch.int64))[0])


def uniforms(seed: int, sample_ids: torch.Tensor, num_samples: int) -> torch.Tensor:
    """float64 ``[R, K]`` in (0, 1) with 53 random bits, one per (row, draw): hashes of ``(seed, id, k)``."""
    s = _mix_int(seed ^ _mix_int(seed >> 32))
    rows = mix32((sample_ids.to(torch.int64) & MASK32) ^ s)
    ks = torch.tensor([_mix_int(0x9E3779B9 * (k + 1)) for k in range(num_samples)], dtype=torch.int64,
                      device=sample_ids.device)
    hi = mix32(rows[:, None] ^ ks[None, :])
    lo = mix32(hi ^ 0x5BD1E995)
    return (((hi << 21) | (lo >> 11)).to(torch.float64) + 0.5) * 2.0 ** -53


def inverse_cdf(z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Tokens ``[R, K]`` int64 drawn from ``softmax(z)`` for logits z ``[R, V]`` (not modified) and uniforms u
    ``[R, K]``: the first column whose cumulative probability exceeds ``u``."""
    rows, vocab = z.shape
    m = z.amax(1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    nb = -(-vocab // BLOCK)
    sums = torch.empty(rows, nb, dtype=torch.float64, device=z.device)
    for lo in range(0, vocab, SCAN):
        e = (z[:, lo:lo + SCAN] - m).exp_()
        full = e.shape[1] // BLOCK * BLOCK
        b0 = lo // BLOCK
        sums[:, b0:b0 + full // BLOCK] = e[:, :full].reshape(rows, -1, BLOCK).sum(-1, dtype=torch.float64)
        if full < e.shape[1]:
            sums[:, -1] = e[:, full:].sum(-1, dtype=torch.float64)
    cum = sums.cumsum(1)
    target = u * cum[:, -1:]  # [R, K], below the row's total since u < 1
    blk = torch.searchsorted(cum, target.contiguous(), right=True).clamp_(max=nb - 1)
    before = torch.where(blk > 0, cum.gather(1, (blk - 1).clamp(min=0)), torch.zeros_like(target))
    cols = blk[..., None] * BLOCK + torch.arange(BLOCK, device=z.device)  # [R, K, BLOCK]
    zc = z.gather(1, cols.clamp(max=vocab - 1).reshape(rows, -1)).reshape(cols.shape)
    e = torch.where(cols < vocab, torch.exp(zc - m[..., None]), 0.0).to(torch.float64)
    within = e.cumsum(-1)
    idx = torch.searchsorted(within, (target - before)[..., None], right=True)[..., 0]
    # rounding between the block sum and the cumsum: never past the block's last token of positive probability
    last = (within < within[..., -1:]).sum(-1)
    return blk * BLOCK + torch.minimum(idx, last)
