"""One pass of the truncated head's radix select: per row, the mass of each 4-bit digit among the keys that share
the digits chosen so far.

The keys are the tempered fp32 logits' bits mapped to unsigned integers ordered like the floats. Program ``r`` reads
row ``r`` once in ``BLOCK``-column tiles and writes 16 float64 sums (counts, or the weights ``exp(z - m)`` of top-p),
so a select is eight memory-bound passes and no atomics: the 16 bins are 16 masked row sums of each tile. The host
picks the digit from the sums (``fusedpg/truncation.py``), all-reducing them first on a vocabulary-parallel head.
"""
import triton
import triton.language as tl


@triton.jit
def _digit_mass_kernel(
    z_ptr, m_ptr, prefix_ptr, hist_ptr, V, stride_z,
    SHIFT: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    m = tl.load(m_ptr + row)
    prefix = tl.load(prefix_ptr + row).to(tl.uint32)
    bins = tl.arange(0, 16).to(tl.uint32)
    hist = tl.zeros([16], dtype=tl.float64)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        mask = cols < V
        z = tl.load(z_ptr + row * stride_z + cols, mask=mask, other=float("-inf"))
        bits = z.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed order of the floats
        u = key.to(tl.uint32, bitcast=True) ^ 0x80000000  # unsigned order
        keep = mask
        if SHIFT < 28:  # only the keys whose higher digits are the ones chosen so far
            keep = keep & ((u >> (SHIFT + 4)) == prefix)
        if WEIGHTED:
            w = tl.where(keep, tl.exp(z - m), 0.0).to(tl.float64)
        else:
            w = tl.where(keep, 1.0, 0.0).to(tl.float64)
        digit = (u >> SHIFT) & 15
        hist += tl.sum(tl.where(digit[:, None] == bins[None, :], w[:, None], 0.0), axis=0)
    tl.store(hist_ptr + row * 16 + tl.arange(0, 16), hist)
