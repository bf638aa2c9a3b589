"""Row gather in Triton, used to move content K/V from pinned host memory straight into device memory.

`_gather_rows_kernel` copies whole rows dst[i] = src[index[i]]. When `src` is pinned host memory the GPU
reads it over PCIe through the unified address space (zero-copy), so the selected documents of one
question arrive in ONE launch instead of one DMA per document (16 docs × 18 layers × ~4.5 chunks ×
73,728 B ≈ 5.3 MB; at ~330 KB per DMA the per-copy submission cost, ~10 µs, would halve the bandwidth).

Rows are moved as int64 words: a content row at the MSA-4B geometry is 73,728 B = 9,216 words = 9
blocks of 1,024. Only this module (and triton_routing.py) imports triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(src, index, dst, E: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)  # destination row
    j = tl.program_id(1)  # block of words inside the row
    r = tl.load(index + i)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    m = offs < E
    x = tl.load(src + r * E + offs, mask=m)
    tl.store(dst + i.to(tl.int64) * E + offs, x, mask=m)


def gather_rows_triton(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """out[i] = src[index[i]] for 2-D src/out of equal row size; src may be pinned host memory."""
    if src.shape[1:] != out.shape[1:] or not (src.is_contiguous() and out.is_contiguous()):
        raise ValueError("gather_rows needs contiguous src and out with equal row shapes")
    m = index.shape[0]
    if m == 0:
        return
    row_bytes = src[0].numel() * src.element_size()
    word = torch.int64 if row_bytes % 8 == 0 else torch.int32 if row_bytes % 4 == 0 else torch.uint8
    s = src.view(src.shape[0], -1).view(word)
    d = out.view(out.shape[0], -1).view(word)
    e = s.shape[1]
    block = min(1024, triton.next_power_of_2(e))
    _gather_rows_kernel[(m, triton.cdiv(e, block))](s, index, d, E=e, BLOCK=block, num_warps=4)
