"""Fused routing top-k in Triton: one router layer's MaxSim scan over the bank (DESIGN.md §6).

Three launches per router layer, none of which materialises the T×rows score matrix:

1. `_routing_scan_kernel`, grid (row blocks × T blocks). A program owns BLOCK_R key rows and BLOCK_T
   query tokens; it streams the keys through shared memory in BLOCK_D slices, accumulates
   keys·Qᵀ (BLOCK_R, BLOCK_T) on the tensor cores in fp32, takes the max over its tokens and folds
   each row's max into its document's slot with an fp32 atomic max. Max is associative, so row blocks
   and token blocks land in any order and the result is exact. HBM traffic: every key once
   (rows·Hkv·D·2 B in bf16) + row_doc (4 B/row) + the query from L2; T-blocks of one row block run on
   neighbouring program ids so a key tile re-read for the second token block hits L2.
2. `_block_topk_kernel`: each program takes BLOCK_N document scores and emits its k best
   (score descending, lower index first) by k rounds of argmax; 4 B/document read.
3. Two stable sorts over the (num_docs / BLOCK_N)·k candidates in torch (`topk_ordered`).

Floors at 100M tokens × 18 layers on one H100 (57.6 GB of bf16 keys, 3.0 TB/s copy bandwidth, ~790
TFLOP/s bf16): reading the keys once is 19.2 ms; the GEMM is 2·T·1024·28.1M rows = 3.7 TFLOP (T=64,
4.7 ms: read-bound) or 29.5 TFLOP (T=512, 37 ms: tensor-core-bound).

Only this module imports triton (STYLE.md §2). Under TRITON_INTERPRET=1 the loads are upcast to fp32
(bf16 arithmetic is broken in the interpreter) and a fixed config replaces autotuning.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import pad_topk, topk_ordered

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# MSABANK_TRITON_AUTOTUNE=0 uses one fixed config per token bucket (tests: no tuning compile storm).
AUTOTUNE = os.environ.get("MSABANK_TRITON_AUTOTUNE", "1") == "1" and not INTERPRET

# Document scores per program of the candidate pass: 4,096 fp32 = 16 KiB in registers across 4 warps.
BLOCK_N = 4096


@triton.jit
def _routing_scan_kernel(
    keys,  # (rows, DIM), row stride stride_k
    q_t,  # (DIM, T) contiguous: the query transposed, so a (BLOCK_D, BLOCK_T) tile is row-major
    row_doc,  # (rows,) int32/int64 document index; < 0 = dead row
    doc_scores,  # (num_docs,) fp32, pre-filled with -inf; receives the per-document max
    rows,
    T,
    stride_k,
    T_BUCKET,  # T rounded up to 64: only the autotuning key (one tuning per bucket, not per T)
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
    q_ptr = q_t + offs_d[:, None] * T + offs_t[None, :]

    acc = tl.zeros((BLOCK_R, BLOCK_T), dtype=tl.float32)
    for d0 in range(0, DIM, BLOCK_D):
        if DIM % BLOCK_D == 0:
            kt = tl.load(k_ptr, mask=mask_r[:, None], other=0.0)
            qt = tl.load(q_ptr, mask=mask_t[None, :], other=0.0)
        else:
            mask_d = (d0 + offs_d) < DIM
            kt = tl.load(k_ptr, mask=mask_r[:, None] & mask_d[None, :], other=0.0)
            qt = tl.load(q_ptr, mask=mask_d[:, None] & mask_t[None, :], other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            qt = qt.to(tl.float32)
        if IEEE:
            acc = tl.dot(kt, qt, acc, input_precision="ieee")
        else:
            acc = tl.dot(kt, qt, acc)
        k_ptr += BLOCK_D
        q_ptr += BLOCK_D * T

    acc = tl.where(mask_t[None, :], acc, float("-inf"))
    row_max = tl.max(acc, axis=1)  # (BLOCK_R,) max over this program's query tokens
    doc = tl.load(row_doc + offs_r, mask=mask_r, other=-1)
    tl.atomic_max(doc_scores + doc, row_max, mask=mask_r & (doc >= 0), sem="relaxed")


@triton.jit
def _block_topk_kernel(
    doc_scores,  # (num_docs,) fp32
    out_scores,  # (blocks, K) fp32
    out_index,  # (blocks, K) int32
    num_docs,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    i_n = tl.program_id(0)
    offs = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x = tl.load(doc_scores + offs, mask=offs < num_docs, other=float("-inf"))
    for j in tl.static_range(K):
        m = tl.max(x, axis=0)
        a = tl.argmax(x, axis=0, tie_break_left=True)  # lowest index among equal scores
        tl.store(out_scores + i_n * K + j, m)
        tl.store(out_index + i_n * K + j, i_n * BLOCK_N + a)
        x = tl.where(tl.arange(0, BLOCK_N) == a, float("-inf"), x)


def _configs() -> list[triton.Config]:
    # BLOCK_D is 64 in every config so the fp32 summation order over the 1,024 dims, hence every score
    # bit, does not depend on which config the autotuner picks (identical results across ranks).
    out = []
    for br, bt, w, s in [
        (128, 64, 4, 4),
        (128, 64, 8, 4),
        (256, 64, 8, 3),
        (256, 64, 8, 4),
        (64, 64, 4, 6),
        (128, 128, 8, 3),
        (128, 128, 8, 4),
        (128, 256, 8, 3),
        (256, 128, 8, 3),
    ]:
        out.append(triton.Config({"BLOCK_R": br, "BLOCK_T": bt, "BLOCK_D": 64}, num_warps=w, num_stages=s))
    return out


def _prune(configs, named_args, **kwargs):  # type: ignore[no-untyped-def]
    # Keep token blocks no wider than the query (padded to 64): a 256-wide block for T = 64 computes
    # 4x the FLOPs for nothing.
    t = max(64, triton.next_power_of_2(int(named_args["T"])))
    kept = [c for c in configs if c.kwargs["BLOCK_T"] <= t]
    return kept or configs[:1]


_scan_tuned = triton.autotune(
    configs=_configs(),
    key=["T_BUCKET", "DIM", "IEEE"],
    prune_configs_by={"early_config_prune": _prune},
)(_routing_scan_kernel) if AUTOTUNE else None


def routing_scan(query: torch.Tensor, keys: torch.Tensor, row_doc: torch.Tensor, num_docs: int) -> torch.Tensor:
    """Per-document max score (num_docs,) fp32 (-inf where a document has no live row)."""
    rows, dim = keys.shape
    T = query.shape[0]
    doc_scores = torch.full((num_docs,), float("-inf"), dtype=torch.float32, device=keys.device)
    if rows == 0 or T == 0 or num_docs == 0:
        return doc_scores
    if keys.stride(1) != 1:
        keys = keys.contiguous()
    q_t = query.to(keys.dtype).t().contiguous()  # (DIM, T): T·DIM·2 B, L2-resident
    ieee = keys.dtype == torch.float32
    if not AUTOTUNE:
        if INTERPRET:  # small blocks: the interpreter runs every program in numpy
            br, bt, w, st = 64, max(16, min(64, triton.next_power_of_2(T))), 4, 1
        elif T <= 64:
            br, bt, w, st = 128, 64, 4, 4
        else:
            br, bt, w, st = 128, 128, 8, 3
        grid = (triton.cdiv(rows, br) * triton.cdiv(T, bt),)
        _routing_scan_kernel[grid](
            keys, q_t, row_doc, doc_scores, rows, T, keys.stride(0), _t_bucket(T),
            DIM=dim, BLOCK_R=br, BLOCK_T=bt, BLOCK_D=64, UPCAST=INTERPRET, IEEE=ieee,
            num_warps=w, num_stages=st,
        )
    else:
        def grid(meta):  # type: ignore[no-untyped-def]
            return (triton.cdiv(rows, meta["BLOCK_R"]) * triton.cdiv(T, meta["BLOCK_T"]),)

        assert _scan_tuned is not None
        _scan_tuned[grid](
            keys, q_t, row_doc, doc_scores, rows, T, keys.stride(0), _t_bucket(T), DIM=dim, UPCAST=False, IEEE=ieee
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
    kk = min(k, num_docs)
    blocks = triton.cdiv(num_docs, BLOCK_N)
    cand_s = torch.empty((blocks, kk), dtype=torch.float32, device=device)
    cand_i = torch.empty((blocks, kk), dtype=torch.int32, device=device)
    _block_topk_kernel[(blocks,)](doc_scores, cand_s, cand_i, num_docs, K=kk, BLOCK_N=BLOCK_N, num_warps=4)
    # Candidates are in block order and, inside a block, best-first with lower index first among
    # equal scores; the stable sorts in topk_ordered finish the total order.
    s, i = topk_ordered(cand_s.reshape(-1), cand_i.reshape(-1).long(), k)
    return pad_topk(s, i, k) if pad else (s, i)
