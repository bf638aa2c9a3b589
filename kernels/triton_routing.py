"""Fused routing top-k in Triton: one router layer's MaxSim scan over the bank (DESIGN.md §6).

No launch materialises the T×rows score matrix:

1. `_routing_scan_kernel` (or `_routing_scan_tma_kernel`, same maths with TMA tile loads), grid
   (row blocks × T blocks). A program owns BLOCK_R key rows and BLOCK_T query tokens; it streams the
   keys through shared memory in BLOCK_D slices, accumulates keys·Qᵀ (BLOCK_R, BLOCK_T) on the tensor
   cores in fp32, takes the max over its tokens and folds each row's max into its document's slot with
   an fp32 atomic max. Max is associative, so row and token blocks land in any order and the result is
   exact. HBM traffic: every key once (rows·Hkv·D·2 B in bf16) + row_doc (4 B/row) + the query from L2;
   T-blocks of one row block run on neighbouring program ids so a key tile re-read for the second
   token block hits L2.
2. `_topk_pass_kernel`, repeated on its own output until one block is left (3 launches at 100M
   tokens): each program emits its block's k best by k rounds of leftmost-argmax, which keeps the
   exact order (score descending, lower index first). 4 B/document; no sort, no host sync.

Floors at 100M tokens × 18 layers on one H100 (57.6 GB of bf16 keys, 3.0 TB/s copy bandwidth, ~790
TFLOP/s bf16): reading the keys once is 19.2 ms; the GEMM is 2·T·1024·28.1M rows = 3.7 TFLOP (T=64,
4.7 ms: read-bound) or 29.5 TFLOP (T=512, 37 ms: tensor-core-bound).

Only this module imports triton (STYLE.md §2). Under TRITON_INTERPRET=1 the loads are upcast to fp32
(bf16 arithmetic is broken in the interpreter) and small blocks keep it fast.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import pad_topk

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"



@triton.jit
def _routing_scan_kernel(
    keys,  # (rows, DIM), row stride stride_k
    q_t,  # (DIM, T_PAD) the query transposed and zero-padded to 256 columns: unmasked aligned loads
    row_doc,  # (rows,) int32/int64 document index; < 0 = dead row
    doc_scores,  # (num_docs,) fp32, pre-filled with -inf; receives the per-document max
    rows,
    T,
    stride_k,
    T_BUCKET,  # T rounded up to 64: only the autotuning key (one tuning per bucket, not per T)
    T_PAD,  # row stride of q_t, a multiple of 256 >= every BLOCK_T
    DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    # T blocks of one row block are adjacent program ids: they run together and share the key tile
    # through L2, so HBM sees each key once even for T > BLOCK_T.
    t_blocks = tl.cdiv(T, BLOCK_T)
    i_r = pid // t_blocks
    i_t = pid % t_blocks
    offs_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_r = offs_r < rows
    mask_t = offs_t < T
    k_ptr = keys + offs_r.to(tl.int64)[:, None] * stride_k + offs_d[None, :]
    q_ptr = q_t + offs_d[:, None] * T_PAD + offs_t[None, :]

    acc = tl.zeros((BLOCK_R, BLOCK_T), dtype=tl.float32)
    for d0 in range(0, DIM, BLOCK_D):
        if DIM % BLOCK_D == 0:
            kt = tl.load(k_ptr, mask=mask_r[:, None], other=0.0)
            qt = tl.load(q_ptr)
        else:
            mask_d = (d0 + offs_d) < DIM
            kt = tl.load(k_ptr, mask=mask_r[:, None] & mask_d[None, :], other=0.0)
            qt = tl.load(q_ptr, mask=mask_d[:, None], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            qt = qt.to(tl.float32)
        if IEEE:
            acc = tl.dot(kt, qt, acc, input_precision="ieee")
        else:
            acc = tl.dot(kt, qt, acc)
        k_ptr += BLOCK_D
        q_ptr += BLOCK_D * T_PAD

    acc = tl.where(mask_t[None, :], acc, float("-inf"))
    row_max = tl.max(acc, axis=1)  # (BLOCK_R,) max over this program's query tokens
    doc = tl.load(row_doc + offs_r, mask=mask_r, other=-1)
    tl.atomic_max(doc_scores + doc, row_max, mask=mask_r & (doc >= 0), sem="relaxed")


@triton.jit
def _routing_scan_tma_kernel(
    k_desc,  # TMA descriptor of keys (rows, DIM), block [BLOCK_R, BLOCK_D]; out-of-range reads are 0
    q_desc,  # TMA descriptor of q_t (DIM, T_PAD), block [BLOCK_D, BLOCK_T]
    row_doc,
    doc_scores,
    rows,
    T,
    T_BUCKET,
    DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    # Same computation as _routing_scan_kernel with tiles moved by the Hopper bulk-copy engine.
    pid = tl.program_id(0)
    t_blocks = tl.cdiv(T, BLOCK_T)
    i_r = pid // t_blocks
    i_t = pid % t_blocks
    acc = tl.zeros((BLOCK_R, BLOCK_T), dtype=tl.float32)
    for d0 in range(0, DIM, BLOCK_D):
        kt = k_desc.load([i_r * BLOCK_R, d0])
        qt = q_desc.load([d0, i_t * BLOCK_T])
        if UPCAST:
            kt = kt.to(tl.float32)
            qt = qt.to(tl.float32)
        if IEEE:
            acc = tl.dot(kt, qt, acc, input_precision="ieee")
        else:
            acc = tl.dot(kt, qt, acc)
    offs_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_t = i_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_r = offs_r < rows
    acc = tl.where((offs_t < T)[None, :], acc, float("-inf"))
    row_max = tl.max(acc, axis=1)
    doc = tl.load(row_doc + offs_r, mask=mask_r, other=-1)
    tl.atomic_max(doc_scores + doc, row_max, mask=mask_r & (doc >= 0), sem="relaxed")


@triton.jit
def _topk_pass_kernel(
    scores,  # (n,) fp32
    index,  # (n,) int64 original document index (HAS_INDEX) or implied by position
    out_scores,  # (blocks, K) fp32
    out_index,  # (blocks, K) int64; -1 where the score is -inf
    n,
    HAS_INDEX: tl.constexpr,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # K rounds of "leftmost max, then knock it out": the block's K best, best first, and among equal
    # scores the lower position first. Positions are ordered like document indices among equal scores
    # (blocks are in index order and each block emits ties lowest first), so repeating this pass on
    # the candidates until one block remains gives the exact global order.
    i_n = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    base = i_n * BLOCK_N
    x = tl.load(scores + base + offs, mask=base + offs < n, other=float("-inf"))
    for j in range(K):
        m, a = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
        if HAS_INDEX:
            gi = tl.load(index + base + a, mask=base + a < n, other=-1)
        else:
            gi = (base + a).to(tl.int64)
        tl.store(out_scores + i_n * K + j, m)
        tl.store(out_index + i_n * K + j, tl.where(m == float("-inf"), -1, gi))
        x = tl.where(offs == a, float("-inf"), x)


def _topk_tree(doc_scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of (num_docs,) scores, padded with (-inf, -1): log_{BLOCK/k} passes, no host sync.

    At 100M tokens (~520K documents, k=16): 508 programs, then 8, then 1; 4 B/document read once.
    """
    block = max(1024, triton.next_power_of_2(2 * k))
    s, idx, n = doc_scores, doc_scores, doc_scores.shape[0]  # idx unused on the first pass
    first = True
    while True:
        blocks = triton.cdiv(n, block)
        out_s = torch.empty(blocks * k, dtype=torch.float32, device=s.device)
        out_i = torch.empty(blocks * k, dtype=torch.int64, device=s.device)
        _topk_pass_kernel[(blocks,)](s, idx, out_s, out_i, n, HAS_INDEX=not first, K=k, BLOCK_N=block, num_warps=4)
        if blocks == 1:
            return out_s, out_i
        s, idx, n, first = out_s, out_i, blocks * k, False


# Scan configs by token bucket: (variant, BLOCK_R, BLOCK_T, BLOCK_D, num_warps, num_stages). A fixed
# table rather than an autotuner: every rank and every run uses the same tiles, so every score bit is
# the same on one GPU and on several. Winners of `msabank bench`'s sweep on an H100 80GB HBM3
# (docs/benchmarks.md): T=64 at 2.91 TB/s (1.03x the read floor per layer), T=512 at 659 TFLOP/s.
SCAN_CONFIGS: dict[int, tuple[str, int, int, int, int, int]] = {
    64: ("ptr", 64, 64, 64, 4, 6),
    128: ("tma", 256, 128, 64, 8, 3),
    256: ("tma", 256, 128, 64, 8, 3),
}


def config_for(T: int, keys: torch.Tensor | None = None) -> tuple[str, int, int, int, int, int]:
    """The table's config for a T-token query; TMA only where the GPU (sm_90+) and layout allow it."""
    cfg = SCAN_CONFIGS[max(SCAN_CONFIGS)]
    for bucket in sorted(SCAN_CONFIGS):
        if T <= bucket:
            cfg = SCAN_CONFIGS[bucket]
            break
    if cfg[0] == "tma" and keys is not None and not _tma_ok(keys):
        cfg = ("ptr", *cfg[1:])
    return cfg


def _tma_ok(keys: torch.Tensor) -> bool:
    # TMA: Hopper or newer, 16-byte aligned base and row stride.
    if not keys.is_cuda or torch.cuda.get_device_capability(keys.device) < (9, 0):
        return False
    return keys.data_ptr() % 16 == 0 and (keys.stride(0) * keys.element_size()) % 16 == 0


def candidate_configs(T: int) -> list[tuple[str, int, int, int, int, int]]:
    """What `sweep_configs` tries for a query of T tokens (token blocks no wider than T needs)."""
    tmax = max(64, triton.next_power_of_2(T))
    out = []
    for variant in ("ptr", "tma"):
        for br, bt, bd, w, st in [
            (128, 64, 64, 4, 4), (128, 64, 64, 8, 4), (256, 64, 64, 8, 3), (128, 64, 128, 4, 3),
            (64, 64, 64, 4, 6), (256, 64, 128, 8, 3),
            (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 128, 8, 3),
            (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 256, 64, 8, 3), (64, 256, 64, 4, 4),
        ]:
            if bt <= tmax:
                out.append((variant, br, bt, bd, w, st))
    return out


def routing_scan(
    query: torch.Tensor,
    keys: torch.Tensor,
    row_doc: torch.Tensor,
    num_docs: int,
    *,
    config: tuple[str, int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """Per-document max score (num_docs,) fp32 (-inf where a document has no live row)."""
    rows, dim = keys.shape
    T = query.shape[0]
    doc_scores = torch.full((num_docs,), float("-inf"), dtype=torch.float32, device=keys.device)
    if rows == 0 or T == 0 or num_docs == 0:
        return doc_scores
    if keys.stride(1) != 1:
        keys = keys.contiguous()
    t_pad = triton.cdiv(T, 256) * 256
    q_t = torch.zeros(dim, t_pad, dtype=keys.dtype, device=keys.device)  # DIM·T_PAD·2 B, L2-resident
    q_t[:, :T] = query.to(keys.dtype).t()
    ieee = keys.dtype == torch.float32
    if INTERPRET:  # small blocks: the interpreter runs every program in numpy
        config = config or ("ptr", 64, max(16, min(64, triton.next_power_of_2(T))), 64, 4, 1)
    variant, br, bt, bd, w, st = config or config_for(T, keys)
    grid = (triton.cdiv(rows, br) * triton.cdiv(T, bt),)
    if variant == "tma":
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_desc = TensorDescriptor(keys, [rows, dim], [keys.stride(0), 1], [br, bd])
        q_desc = TensorDescriptor(q_t, [dim, t_pad], [t_pad, 1], [bd, bt])
        _routing_scan_tma_kernel[grid](
            k_desc, q_desc, row_doc, doc_scores, rows, T, _t_bucket(T),
            DIM=dim, BLOCK_R=br, BLOCK_T=bt, BLOCK_D=bd, UPCAST=INTERPRET, IEEE=ieee, num_warps=w, num_stages=st,
        )
    else:
        _routing_scan_kernel[grid](
            keys, q_t, row_doc, doc_scores, rows, T, keys.stride(0), _t_bucket(T), t_pad,
            DIM=dim, BLOCK_R=br, BLOCK_T=bt, BLOCK_D=bd, UPCAST=INTERPRET, IEEE=ieee, num_warps=w, num_stages=st,
        )
    return doc_scores


def _t_bucket(T: int) -> int:
    return triton.cdiv(T, 64) * 64


def routing_topk_triton(
    query: torch.Tensor,
    keys: torch.Tensor,
    row_doc: torch.Tensor,
    num_docs: int,
    k: int,
    *,
    pad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `reference.routing_topk_ref`; keys on CUDA (or CPU under TRITON_INTERPRET=1)."""
    if keys.shape[0] != row_doc.shape[0]:
        raise ValueError(f"keys has {keys.shape[0]} rows but row_doc has {row_doc.shape[0]}")
    if query.shape[-1] != keys.shape[-1]:
        raise ValueError(f"query dim {query.shape[-1]} != key dim {keys.shape[-1]}")
    device = keys.device
    if k <= 0 or num_docs == 0 or keys.shape[0] == 0 or query.shape[0] == 0:
        e = torch.empty(0, dtype=torch.float32, device=device)
        ei = torch.empty(0, dtype=torch.int64, device=device)
        return pad_topk(e, ei, k) if pad else (e, ei)
    doc_scores = routing_scan(query.to(device), keys, row_doc.to(device), num_docs)
    s, i = _topk_tree(doc_scores, k)
    if pad:
        return s, i
    keep = i >= 0  # a host sync: the caller asked for exactly k' entries
    return s[keep], i[keep]
