"""Stored bit patterns of bank tensors: torch <-> numpy rows, the row layout, and checksums.

Zarr 3.1 has no bfloat16, so every tensor is stored bit-exact as its integer bit pattern (bf16/f16 as
uint16, f32 as uint32; records.DTYPE_STORED). A document's content rows are (C, R, 2, Hkv, D) (one row
per chunk, K and V of every router layer side by side); its routing keys are R blocks of (C, Hkv·D), one
per router layer. Checksums are crc32c of the raw little-endian bytes (docs/storage-format.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import google_crc32c
import numpy as np
import torch

from msabank.errors import InputError
from msabank.storage.records import DTYPE_STORED, DocumentWrite, Geometry
from msabank.types import EncodedMemory

TORCH_DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_VIEW_DTYPE = {"bfloat16": (torch.int16, np.int16), "float16": (torch.int16, np.int16), "float32": (torch.int32, np.int32)}


def crc32c(a: np.ndarray) -> int:
    """crc32c of an array's raw bytes (google_crc32c, hardware-accelerated; wants a read-only buffer)."""
    b = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    b.flags.writeable = False
    return int(google_crc32c.value(b))


def to_stored(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A CPU tensor of the bank dtype as its stored bit pattern (uint16 for bf16/f16, uint32 for f32)."""
    tview, _ = _VIEW_DTYPE[dtype]
    return t.contiguous().view(tview).numpy().view(DTYPE_STORED[dtype])


def from_stored(a: np.ndarray, dtype: str) -> torch.Tensor:
    _, nview = _VIEW_DTYPE[dtype]
    return torch.from_numpy(np.ascontiguousarray(a).view(nview)).view(TORCH_DTYPE[dtype])


def memory_from_rows(content: np.ndarray, routing: Sequence[np.ndarray], g: Geometry, n_tokens: int) -> EncodedMemory:
    c = from_stored(content, g.dtype)  # (C, R, 2, Hkv, D)
    rk = torch.stack([from_stored(r, g.dtype).view(-1, g.num_kv_heads, g.head_dim) for r in routing])
    return EncodedMemory(
        n_tokens=n_tokens,
        routing_keys=rk,  # (R, C, Hkv, D)
        content_k=c[:, :, 0].permute(1, 0, 2, 3).contiguous(),
        content_v=c[:, :, 1].permute(1, 0, 2, 3).contiguous(),
    )


def stored_rows(dw: DocumentWrite, g: Geometry) -> tuple[np.ndarray, list[np.ndarray]]:
    """(C, R, 2, Hkv, D) content rows and R routing blocks (C, Hkv·D), as stored bit patterns."""
    m = dw.memory
    want_dtype = TORCH_DTYPE[g.dtype]
    shapes = {t.shape for t in (m.routing_keys, m.content_k, m.content_v)}
    if len(shapes) != 1:
        raise InputError(f"document {dw.user_id!r}: routing_keys/content_k/content_v shapes differ: {shapes}")
    r, c, h, d = next(iter(shapes)) if len(next(iter(shapes))) == 4 else (0, 0, 0, 0)
    if (r, h, d) != (g.num_router_layers, g.num_kv_heads, g.head_dim) or c < 1:
        raise InputError(
            f"document {dw.user_id!r}: tensors are {tuple(m.routing_keys.shape)}, the bank wants "
            f"(R={g.num_router_layers}, C>=1, Hkv={g.num_kv_heads}, D={g.head_dim})"
        )
    if m.n_tokens < 1 or -(-m.n_tokens // g.chunk_size) != c:
        raise InputError(f"document {dw.user_id!r}: {m.n_tokens} tokens need {-(-m.n_tokens // g.chunk_size)} chunks, got {c}")
    for t in (m.routing_keys, m.content_k, m.content_v):
        if t.dtype != want_dtype or t.device.type != "cpu":
            raise InputError(f"document {dw.user_id!r}: tensors must be {g.dtype} on CPU, got {t.dtype} on {t.device}")
    content = np.empty((c, r, 2, h, d), dtype=DTYPE_STORED[g.dtype])  # (C, R, 2, Hkv, D)
    content[:, :, 0] = to_stored(m.content_k, g.dtype).transpose(1, 0, 2, 3)
    content[:, :, 1] = to_stored(m.content_v, g.dtype).transpose(1, 0, 2, 3)
    rk = to_stored(m.routing_keys, g.dtype).reshape(r, c, h * d)
    return content, list(rk)  # rk[i] is a contiguous (C, Hkv·D) view
