"""Value objects that cross module boundaries (see docs/design/interfaces.md).

Kept tiny and dependency-free (torch only) so that storage, kernels, model and engine can all import it
without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch


@dataclass(frozen=True, slots=True)
class EncodedMemory:
    """The stage-1 output of one document.

    All three tensors are (R, C, Hkv, D): R router layers, C = ceil(n_tokens / chunk_size) chunks.
    """

    n_tokens: int
    """Tokens of the composed document `<|im_start|>[n]. text[n]<|im_end|>`."""
    routing_keys: torch.Tensor
    """K̄ᴿ: chunk means of router_k_proj(x); per-head L2-normalised iff routing is cosine."""
    content_k: torch.Tensor
    """K̄: chunk means of keys after k_norm and document-local RoPE."""
    content_v: torch.Tensor
    """V̄: chunk means of values."""

    @property
    def num_chunks(self) -> int:
        return int(self.routing_keys.shape[1])


@dataclass(frozen=True, slots=True)
class Routed:
    """Top-k documents of one router layer for one question."""

    numbers: torch.Tensor
    """(k',) int64 document numbers, best first (ties: lower number first)."""
    scores: torch.Tensor
    """(k',) float32 document scores, descending."""


class MemoryView(Protocol):
    """What stage 2 needs from a memory: routing and content K/V (see interfaces.md)."""

    def route(self, layer_index: int, query: torch.Tensor) -> Routed:
        """query: (T, Hkv*D) group-summed, scaled routing query of the routing tokens."""
        ...

    def content_kv(self, layer_index: int, numbers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunks of `numbers` in ascending number order: k, v each (C_sel, Hkv, D)."""
        ...

    def route_batch(self, layer_index: int, queries: Sequence[torch.Tensor]) -> list[Routed]:
        """`route` for each question of a batch, in one scan of the layer's routing keys."""
        ...

    def content_kv_batch(self, layer_index: int, numbers: Sequence[Sequence[int]]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every sample's chunks in the layout attention reads, in one gather: k, v (B, Hkv, C_max, D) with
        sample b's chunks (ascending number order, as `content_kv`) in columns 0..lengths[b]-1 and zeros
        after, and lengths (B,) int64, all on the memory's device."""
        ...
