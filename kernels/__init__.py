"""Kernels: plain-PyTorch references (the CPU path and the test oracle) and Triton versions.

The facade decides once per call which implementation runs (STYLE.md §7):
`impl="auto"|"triton"|"torch"`, default from the environment variable MSABANK_KERNELS (else "auto").
"auto" takes Triton when triton imports, the tensors are on CUDA and the dtype is bf16/fp16/fp32, and
otherwise falls back to the reference, logging the reason once. An explicit "triton" that cannot run
raises `KernelUnavailableError`. Only `kernels/triton_*.py` import triton, so `import msabank` works on
a CPU-only machine.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

import torch

from msabank.errors import ConfigError, KernelUnavailableError

from .reference import (attention_ref, chunk_pool_ref, doc_scores_dense_ref, gather_rows_ref, normalize_heads, normalize_per_head,
                        routing_query_ref, routing_topk_batched_ref, routing_topk_ref, selected_rows, sparse_attention_ref)

__all__ = ["routing_topk", "routing_topk_ref", "routing_topk_batched", "routing_topk_batched_ref", "routing_query_ref", "doc_scores_dense_ref", "sparse_attention",
           "sparse_attention_ref", "attention", "chunk_pool", "chunk_pool_ref", "gather_spans", "gather_rows", "gather_rows_ref", "selected_rows", "normalize_heads", "normalize_per_head",
           "resolve_impl", "triton_available"]

attention = attention_ref
"""Dense GQA attention (stage 1, the template): the PyTorch reference on every device (SDPA dispatches)."""
sparse_attention = sparse_attention_ref
chunk_pool = chunk_pool_ref
"""Stage 1's chunk means (`reference.chunk_pool_ref`); no Triton kernel (it is a reduction SDPA-sized work dwarfs)."""
"""MSA sparse attention over [memory ; sequence] (`reference.sparse_attention_ref`): no Triton kernel yet;
SDPA picks the fused backend on CUDA."""

log = logging.getLogger(__name__)

_IMPLS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_triton_module: ModuleType | None = None
_triton_error: str | None = None
_gather_module: ModuleType | None = None
_gather_zero_copy_ok: bool | None = None  # None: not tried yet
_logged: set[str] = set()


def _load_triton() -> ModuleType | None:
    """Import kernels/triton_routing.py once; remember why it failed."""
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            from . import triton_routing

            _triton_module = triton_routing
        except ImportError as err:  # triton missing or broken: the reference still serves
            _triton_error = f"triton does not import ({err})"
    return _triton_module


def triton_available() -> bool:
    return _load_triton() is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str | None, tensor: torch.Tensor) -> str:
    """'triton' or 'torch' for this call; `impl` None reads MSABANK_KERNELS (default 'auto')."""
    want = impl if impl is not None else os.environ.get("MSABANK_KERNELS", "auto")
    if want not in _IMPLS:
        raise ConfigError(f"unknown kernel implementation {want!r}", hint="use one of auto, triton, torch")
    if want == "torch":
        return "torch"
    reason = None
    if _load_triton() is None:
        reason = _triton_error
    elif not (tensor.is_cuda or _interpreting()):
        reason = f"tensors are on {tensor.device.type}, not CUDA"
    elif tensor.dtype not in _TRITON_DTYPES:
        reason = f"dtype {tensor.dtype} has no Triton kernel"
    if reason is None:
        # "auto" on CPU tensors under the interpreter still takes torch: the interpreter is a test tool.
        if want == "auto" and not tensor.is_cuda:
            return "torch"
        return "triton"
    if want == "triton":
        raise KernelUnavailableError(
            f"the Triton routing kernel cannot run: {reason}",
            hint="install triton and put the bank on a CUDA device, or set MSABANK_KERNELS=torch",
        )
    if reason not in _logged:
        _logged.add(reason)
        log.info("routing kernels: using the PyTorch reference because %s", reason)
    return "torch"


def routing_topk(
    query: torch.Tensor,
    keys: torch.Tensor,
    row_doc: torch.Tensor,
    num_docs: int,
    k: int,
    *,
    impl: str | None = None,
    pad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k documents of one router layer (MSA_SPEC.md §4.2; see `reference.routing_topk_ref`).

    query (T, Hkv·D), keys (rows, Hkv·D), row_doc (rows,) int document index (< 0: dead row).
    Returns scores (k',) fp32 descending and doc_index (k',) int64 (ties: lower index), on keys' device;
    k' = min(k, documents with a live row). pad=True returns exactly k entries padded with (-inf, -1)
    and never waits on the device.
    """
    if resolve_impl(impl, keys) == "triton":
        mod = _load_triton()
        assert mod is not None
        return mod.routing_topk_triton(query, keys, row_doc, num_docs, k, pad=pad)  # type: ignore[no-any-return]
    return routing_topk_ref(query, keys, row_doc, num_docs, k, pad=pad)


def routing_topk_batched(
    query: torch.Tensor,
    query_seq: torch.Tensor,
    num_seqs: int,
    keys: torch.Tensor,
    row_doc: torch.Tensor,
    num_docs: int,
    k: int,
    *,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k documents of one router layer for several questions in one scan (`reference.routing_topk_batched_ref`).

    query (T_all, Hkv·D): every question's routing-query rows concatenated; query_seq (T_all,) the question
    id (0..num_seqs-1) of each row. Returns scores (S, k) fp32 and doc_index (S, k) int64 on keys' device,
    padded with (-inf, -1); row s equals `routing_topk(rows of s, ..., pad=True)`. Never waits on the device.
    The Triton path also takes every router layer of the questions at once: query (L, T_all, Hkv·D) and keys
    (L, rows, Hkv·D) give (L, S, k) from one scan launch and one set of top-k launches.
    """
    if resolve_impl(impl, keys) == "triton":
        mod = _load_triton()
        assert mod is not None
        return mod.routing_topk_batched_triton(query, query_seq, num_seqs, keys, row_doc, num_docs, k)  # type: ignore[no-any-return]
    if keys.dim() == 3:  # every layer: the reference loops over them
        outs = [routing_topk_batched_ref(q, query_seq, num_seqs, kl, row_doc, num_docs, k) for q, kl in zip(query, keys)]
        return torch.stack([s for s, _ in outs]), torch.stack([i for _, i in outs])
    return routing_topk_batched_ref(query, query_seq, num_seqs, keys, row_doc, num_docs, k)


def gather_spans(
    src: torch.Tensor, spans: torch.Tensor, out: torch.Tensor, *, impl: str | None = None, max_rows: int | None = None
) -> str:
    """out[d:d+n] = src[s:s+n] for each (s, d, n) row of spans (k, 3) int64: whole documents' rows.

    src may be pinned host memory and out a device tensor; spans must then be pinned host memory or on
    out's device, and both must stay untouched until the current stream passes this point. On CUDA the
    Triton kernel reads the pinned rows directly (zero-copy, one launch); where that cannot run, each
    span is one DMA. Returns the path taken ("zero-copy", "device", "dma", "torch").
    """
    global _gather_module, _gather_zero_copy_ok
    if out.is_cuda and _gather_zero_copy_ok is not False and resolve_impl(impl, out) == "triton":
        if _gather_module is None:
            from . import triton_gather

            _gather_module = triton_gather
        if max_rows is None:
            max_rows = int(spans[:, 2].max()) if spans.shape[0] and not spans.is_cuda else out.shape[0]
        try:
            _gather_module.gather_spans_triton(src, spans, out, max_rows)
            _gather_zero_copy_ok = True
            return "device" if src.is_cuda else "zero-copy"
        except (RuntimeError, ValueError) as err:  # e.g. the driver refuses a host pointer
            if src.is_cuda:
                raise
            _gather_zero_copy_ok = False
            log.info("zero-copy gather unavailable (%s): one DMA per document", err)
    for s0, d0, n in spans.tolist():
        out[d0 : d0 + n].copy_(src[s0 : s0 + n], non_blocking=True)
    return "dma" if out.is_cuda and not src.is_cuda else "torch"


_gather_rows_ok: bool | None = None  # None: not tried yet


def gather_rows(src: torch.Tensor, layer: int, rows: torch.Tensor, *, impl: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Content K and V of one router layer at `rows` (S, C) int64 (-1: zero padding), each (S, Hkv, C, D) on
    rows' device (`reference.gather_rows_ref`). src: the arena (arena_rows, R, 2, Hkv, D).

    rows on CUDA with src pinned host memory (or on that GPU): the Triton kernel reads the rows in place
    (zero-copy), one launch, no host sync. Where it cannot run (no Triton, impl="torch", the driver refuses
    the host pointer), src on rows' device takes the reference; a host src with CUDA rows then costs one
    sync (the rows come to the host, the reference gathers there, the result goes up). Returns (k, v, path)
    with path "zero-copy", "device", "torch" or "synced".
    """
    global _gather_module, _gather_rows_ok
    dev = rows.device
    # Ask about the arena's dtype on rows' device: probing `rows` itself (int64) would always say "no
    # Triton kernel" and send a pinned-host arena down the synced path (one sync per router layer).
    probe = src if src.is_cuda else torch.empty(0, dtype=src.dtype, device=dev)
    if rows.is_cuda and _gather_rows_ok is not False and resolve_impl(impl, probe) == "triton":
        if _gather_module is None:
            from . import triton_gather

            _gather_module = triton_gather
        _, _, _, hkv, d = src.shape
        out = torch.empty(2, rows.shape[0], hkv, rows.shape[1], d, dtype=src.dtype, device=dev)
        try:
            _gather_module.gather_rows_triton(src, layer, rows.contiguous(), out)
            _gather_rows_ok = True
            return out[0], out[1], "device" if src.is_cuda else "zero-copy"
        except (RuntimeError, ValueError) as err:  # e.g. the driver refuses a host pointer
            if src.is_cuda:
                raise
            _gather_rows_ok = False
            log.info("zero-copy row gather unavailable (%s): the prefill fetch syncs once per layer", err)
    if src.device == dev:
        k, v = gather_rows_ref(src, layer, rows)
        return k, v, "torch"
    k, v = gather_rows_ref(src, layer, rows.cpu())
    return k.to(dev, non_blocking=True), v.to(dev, non_blocking=True), "synced"
