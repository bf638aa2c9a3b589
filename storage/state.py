"""The bank's dynamic state record and where its tensor generations live (docs/storage-format.md).

`State` is the LMDB `meta` key `state`: the committed pointer (bank version, rows, current generation)
plus the live counters. Every commit rewrites it in the same transaction as the records it publishes, so
readers see the rows and the pointer to them change together. `gen_dir` names a generation's directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class State:
    """The dynamic part of the manifest, rewritten by every commit (LMDB meta key `state`)."""

    version: int = 0
    next_number: int = 0
    rows: int = 0
    capacity: int = 0
    generation: int = 1
    live_docs: int = 0
    deleted_docs: int = 0
    live_chunks: int = 0
    live_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def gen_dir(root: Path, generation: int) -> Path:
    return root / "tensors" / f"gen-{generation:06d}"
