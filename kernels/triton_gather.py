"""Span gather in Triton: move content K/V from pinned host memory straight into device memory.

`_gather_spans_kernel` copies whole row ranges dst[d_i : d_i + n_i] = src[s_i : s_i + n_i], one range
per document. When `src` (and the small span table) are pinned host memory the GPU reads them over PCIe
through the unified address space (zero-copy), so the documents of one question arrive in ONE launch
instead of one DMA per document (16 docs × ~4.5 chunks × 73,728 B ≈ 5.3 MB; a per-document DMA of
~330 KB costs ~10 µs to submit, which caps such a fetch near 40% of the copy bandwidth: measured).

`_gather_rows_kernel` is the prefill's per-layer fetch: the rows of the selected documents, one router
layer's slice each, straight into the (S, Hkv, C, D) layout attention reads, from a row table that lives on
the device (`reference.selected_rows`), so routing and fetch never wait on the host.

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


@triton.jit
def _gather_rows_kernel(src, rows, out, layer, S, C, ROW: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                        BLOCK: tl.constexpr):
    p = tl.program_id(0)  # one (sample, column) of the output
    s = p // C
    c = p % C
    row = tl.load(rows + p)  # int64: arena offsets pass 2^31 elements at ~58K rows of the MSA-4B geometry
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # element of the row's (2, Hkv, D) layer slice
    m = offs < 2 * HKV * D
    x = tl.load(src + row * ROW + layer * (2 * HKV * D) + offs, mask=m & (row >= 0), other=0)
    kv = offs // (HKV * D)
    h = (offs // D) % HKV
    d = offs % D
    dst = kv * (S * HKV * C * D) + ((s * HKV + h) * C + c) * D + d
    tl.store(out + dst, x, mask=m)


def gather_rows_triton(src: torch.Tensor, layer: int, rows: torch.Tensor, out: torch.Tensor) -> None:
    """out[0, s, :, c] = src[rows[s, c], layer, 0] and out[1, s, :, c] = src[rows[s, c], layer, 1]; zeros
    where rows < 0 (`reference.gather_rows_ref`'s contract).

    src: the content arena (arena_rows, R, 2, Hkv, D), contiguous, pinned host memory (read zero-copy
    through UVA: only the selected rows' layer slice, 2·Hkv·D values each, crosses the bus) or on out's
    device; rows (S, C) int64 on out's device; out (2, S, Hkv, C, D) in src's dtype. One launch, no host
    sync: the row table never leaves the device.
    """
    n_rows, r_layers, two, hkv, d = src.shape
    s, c = rows.shape
    if two != 2 or tuple(out.shape) != (2, s, hkv, c, d) or out.dtype != src.dtype:
        raise ValueError(f"gather_rows: out {tuple(out.shape)} {out.dtype} for src {tuple(src.shape)} {src.dtype}")
    if not (src.is_contiguous() and out.is_contiguous() and rows.is_contiguous()):
        raise ValueError("gather_rows needs contiguous src, rows and out")
    if s * c == 0:
        return
    e = 2 * hkv * d
    block = min(1024, triton.next_power_of_2(e))
    _gather_rows_kernel[(s * c, triton.cdiv(e, block))](src, rows, out, layer, s, c, ROW=r_layers * e, HKV=hkv, D=d,
                                                        BLOCK=block, num_warps=4)
