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

from .reference import normalize_per_head, routing_topk_ref

__all__ = ["routing_topk", "routing_topk_ref", "normalize_per_head", "resolve_impl", "triton_available"]

log = logging.getLogger(__name__)

_IMPLS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_triton_module: ModuleType | None = None
_triton_error: str | None = None
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
