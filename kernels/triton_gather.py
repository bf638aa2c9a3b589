"""Span gather in Triton: move content K/V from pinned host memory straight into device memory.

`_gather_spans_kernel` copies whole row ranges dst[d_i : d_i + n_i] = src[s_i : s_i + n_i], one range
per document. When `src` (and the small span table) are pinned host memory the GPU reads them over PCIe
through the unified address space (zero-copy), so the documents of one question arrive in ONE launch
instead of one DMA per document (16 docs × ~4.5 chunks × 73,728 B ≈ 5.3 MB; a per-document DMA of
~330 KB costs ~10 µs to submit, which caps such a fetch near 40% of the copy bandwidth: measured).

Rows move as int64 words: a content row at the MSA-4B geometry is 73,728 B = 9,216 words = 9 blocks of
1,024 words per program. Only this module (and triton_routing.py) imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (words per program, warps): `msabank bench fetch` sweeps these; 1,024 words = 8 KiB per program.
GATHER_CONFIG = (1024, 4)
GATHER_CANDIDATES = [(512, 4), (1024, 4), (1024, 8), (2048, 8), (4096, 8)]


@triton.jit
def _gather_spans_kernel(src, spans, dst, E: tl.constexpr, BLOCKS_PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    i_s = tl.program_id(0)  # span (document)
    j = tl.program_id(1)  # row-of-span × block-of-row
    s0 = tl.load(spans + 3 * i_s)
    d0 = tl.load(spans + 3 * i_s + 1)
    n = tl.load(spans + 3 * i_s + 2)
    row = j // BLOCKS_PER_ROW
    if row < n:
        offs = (j % BLOCKS_PER_ROW) * BLOCK + tl.arange(0, BLOCK)
        m = offs < E
        x = tl.load(src + (s0 + row) * E + offs, mask=m)
        tl.store(dst + (d0 + row) * E + offs, x, mask=m)


def gather_spans_triton(src: torch.Tensor, spans: torch.Tensor, out: torch.Tensor, max_rows: int) -> None:
    """out[d:d+n] = src[s:s+n] for each (s, d, n) row of spans (k, 3) int64; src/spans may be pinned host."""
    if src.shape[1:] != out.shape[1:] or not (src.is_contiguous() and out.is_contiguous()):
        raise ValueError("gather_spans needs contiguous src and out with equal row shapes")
    if spans.shape[0] == 0 or max_rows == 0:
        return
    row_bytes = src[0].numel() * src.element_size()
    word = torch.int64 if row_bytes % 8 == 0 else torch.int32 if row_bytes % 4 == 0 else torch.uint8
    s = src.reshape(src.shape[0], -1).view(word)
    d = out.reshape(out.shape[0], -1).view(word)
    e = s.shape[1]
    block, warps = GATHER_CONFIG
    block = min(block, triton.next_power_of_2(e))
    bpr = triton.cdiv(e, block)
    _gather_spans_kernel[(spans.shape[0], max_rows * bpr)](s, spans, d, E=e, BLOCKS_PER_ROW=bpr, BLOCK=block, num_warps=warps)
