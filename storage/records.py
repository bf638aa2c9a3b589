"""Value objects of the storage API (see docs/design/interfaces.md and docs/storage-format.md).

Frozen, slotted dataclasses; no I/O here. `Geometry` fixes every stored shape of a bank.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from msabank.types import EncodedMemory

StorageDtype = Literal["bfloat16", "float16", "float32"]
Action = Literal["add", "update", "unchanged"]

# bytes per element and the numpy dtype of the stored bit pattern (zarr 3.1 has no bfloat16)
DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}
DTYPE_STORED: dict[str, str] = {"bfloat16": "uint16", "float16": "uint16", "float32": "uint32"}


def content_hash(text: str) -> str:
    """The content hash that decides `unchanged`: sha256 of the UTF-8 text, hex."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Geometry:
    """Every shape a bank stores; fixed at create time and recorded in the manifest."""

    num_router_layers: int
    """R: router layers (routing keys and content K/V are stored for these only)."""
    num_layers: int
    """L: all layers (the template prefix K/V covers these)."""
    num_kv_heads: int
    """Hkv."""
    head_dim: int
    """D."""
    chunk_size: int
    """Tokens per pooled chunk (the paper's P = 64)."""
    template_len: int
    """T0: tokens of the template prefix."""
    dtype: StorageDtype = "bfloat16"
    """Dtype of every stored tensor; kept bit-exact (bf16/f16 as uint16, f32 as uint32)."""

    @property
    def row_width(self) -> int:
        """Hkv·D: columns of one routing-key row."""
        return self.num_kv_heads * self.head_dim

    @property
    def elem_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def content_row_bytes(self) -> int:
        """Bytes of one content row (R, 2, Hkv, D)."""
        return self.num_router_layers * 2 * self.row_width * self.elem_bytes

    @property
    def routing_row_bytes(self) -> int:
        """Bytes of one routing row, all router layers together."""
        return self.num_router_layers * self.row_width * self.elem_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        return cls(**d)


@dataclass(frozen=True, slots=True)
class Planned:
    """What `Bank.plan` decided for one (user_id, text) item."""

    user_id: str
    """The caller's id."""
    number: int
    """The document number `[n]` to encode with: existing, or the next free one."""
    content_hash: str
    """sha256 of the text (see `content_hash`)."""
    action: Action
    """`add` (new or previously deleted id), `update` (text changed) or `unchanged`."""
    text: str
    """The item's text, carried along so callers can encode and write without a second pass."""


@dataclass(frozen=True, slots=True)
class DocumentWrite:
    """One document of a `Bank.write` commit."""

    user_id: str
    """The caller's id."""
    number: int
    """The number from `Bank.plan` (must match the bank's mapping for an existing id)."""
    text: str
    """The document text as encoded."""
    content_hash: str
    """sha256 of `text` (from `plan`); equal to the stored hash means `unchanged`."""
    memory: EncodedMemory
    """Stage-1 tensors, each (R, C, Hkv, D) in the bank's dtype, on CPU."""
    meta: dict[str, Any] | None = None
    """Free-form JSON-serialisable metadata kept with this version."""


@dataclass(frozen=True, slots=True)
class WriteReport:
    """Counts of one commit (or of a sync)."""

    added: int
    """Documents new to the bank (or re-added after a delete)."""
    updated: int
    """Documents given a new version."""
    unchanged: int
    """Documents whose content hash matched the current version: nothing written."""
    deleted: int
    """Documents tombstoned."""
    version: int
    """The bank version after the commit (unchanged when nothing was written)."""


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """One version of one document (an upsert or a tombstone)."""

    version: int
    """Per-document version, 1 for the first upsert; a tombstone takes the next number."""
    kind: Literal["upsert", "delete"]
    """What this version did."""
    bank_version: int
    """The bank version that committed it."""
    committed_at: float
    """Unix time of the commit."""
    content_hash: str = ""
    """sha256 of the text (upserts)."""
    n_tokens: int = 0
    """Tokens of the composed document (upserts)."""
    num_chunks: int = 0
    """C (upserts)."""
    row_start: int | None = None
    """First tensor row, or None when the rows were reclaimed by compaction (or for a tombstone)."""
    text: str = ""
    """The text of this version (upserts)."""
    crc_content: int = 0
    """crc32c of the stored content rows (C, R, 2, Hkv, D), raw little-endian bytes."""
    crc_routing: tuple[int, ...] = ()
    """crc32c of the stored routing rows (C, Hkv·D), one per router layer."""
    meta: dict[str, Any] | None = None
    """Caller metadata of this version."""

    def to_dict(self) -> dict[str, Any]:
        # by hand: dataclasses.asdict deep-copies and cost ~270 us per record in bulk writes
        return {
            "version": self.version,
            "kind": self.kind,
            "bank_version": self.bank_version,
            "committed_at": self.committed_at,
            "content_hash": self.content_hash,
            "n_tokens": self.n_tokens,
            "num_chunks": self.num_chunks,
            "row_start": self.row_start,
            "text": self.text,
            "crc_content": self.crc_content,
            "crc_routing": list(self.crc_routing),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VersionRecord:
        d = dict(d)
        d["crc_routing"] = tuple(d.get("crc_routing", ()))
        return cls(**d)


@dataclass(frozen=True, slots=True)
class DocumentRecord:
    """A live document as of one bank version."""

    user_id: str
    """The caller's id."""
    number: int
    """The permanent document number `[n]`."""
    version: int
    """Current per-document version."""
    text: str
    """Current text."""
    content_hash: str
    """sha256 of `text`."""
    n_tokens: int
    """Tokens of the composed document."""
    num_chunks: int
    """C."""
    row_start: int
    """First tensor row of the current version."""
    created_at: float
    """Unix time the id was first added."""
    updated_at: float
    """Unix time of the current version."""
    meta: dict[str, Any] | None = None
    """Caller metadata of the current version."""


@dataclass(frozen=True, slots=True)
class BankStats:
    """Counts and sizes of a bank (one consistent version)."""

    version: int
    """Bank version."""
    documents: int
    """Live documents."""
    deleted: int
    """Tombstoned ids."""
    next_number: int
    """The number the next new document gets."""
    live_chunks: int
    """Rows of current versions of live documents."""
    total_rows: int
    """Committed rows (live + garbage awaiting compaction)."""
    tokens: int
    """Tokens of live documents."""
    bytes_on_disk: int
    """LMDB + Zarr files, as stored (compressed)."""
    tensor_bytes_on_disk: int
    """Zarr files only."""
    generation: int
    """Tensor generation (bumped by compaction)."""
    geometry: Geometry
    """The bank's geometry."""
    fingerprint: str
    """The model fingerprint the bank is bound to."""


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What `Bank.verify` found; `ok` is True when `problems` is empty."""

    version: int
    """The bank version checked."""
    documents: int
    """Live documents checked."""
    rows_checked: int
    """Tensor rows read and checksummed."""
    problems: tuple[str, ...] = ()
    """Human-readable problems, each naming the document or structure at fault."""
    corrupted: tuple[str, ...] = ()
    """User ids whose stored bytes fail their checksum or cannot be decoded."""
    orphan_rows: int = 0
    """Committed rows that belong to no version (should be 0)."""
    garbage_rows: int = 0
    """Rows of superseded/deleted versions awaiting compaction (not a problem)."""

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True, slots=True)
class CompactReport:
    """What `Bank.compact` did."""

    rows_before: int
    """Committed rows before."""
    rows_after: int
    """Committed rows after (= live chunks)."""
    bytes_before: int
    """Zarr bytes on disk before."""
    bytes_after: int
    """Zarr bytes on disk after (old generation removed unless a reader still held it)."""
    version: int
    """Bank version after."""
    generation: int
    """Tensor generation after."""


@dataclass(frozen=True, slots=True)
class Changes:
    """Documents changed after a given bank version (for refreshing a routing index)."""

    upserted_numbers: tuple[int, ...]
    """Numbers added or updated (and still live) since the version, ascending."""
    deleted_numbers: tuple[int, ...]
    """Numbers deleted (and not re-added) since the version, ascending."""
    version: int
    """The bank version these changes lead to."""


@dataclass(frozen=True, slots=True)
class SyncPlan:
    """The result of `Bank.plan_sync`: what to encode and what to delete for a full-source sync."""

    planned: tuple[Planned, ...]
    """Every source item with its number and action."""
    delete: tuple[str, ...] = field(default=())
    """Live ids absent from the source."""
