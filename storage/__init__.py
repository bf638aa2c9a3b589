"""The bank on disk: LMDB document records + Zarr tensors. No torch modules, no tokenizer.

Public API (docs/design/interfaces.md): `Bank`, `Snapshot`, `Geometry`, `DocumentWrite`, `Planned`,
`WriteReport`, `DocumentRecord`, `VersionRecord`, `BankStats`, `VerifyReport`, `CompactReport`, `Changes`,
`SyncPlan`, `content_hash`, `FORMAT_VERSION`. The on-disk format is specified in docs/storage-format.md.
"""

from __future__ import annotations

from msabank.storage.bank import FORMAT_VERSION, Bank
from msabank.storage.records import (
    BankStats,
    Changes,
    CompactReport,
    DocumentRecord,
    DocumentWrite,
    Geometry,
    Planned,
    SyncPlan,
    VerifyReport,
    VersionRecord,
    WriteReport,
    content_hash,
)
from msabank.storage.snapshot import Snapshot

__all__ = [
    "FORMAT_VERSION",
    "Bank",
    "BankStats",
    "Changes",
    "CompactReport",
    "DocumentRecord",
    "DocumentWrite",
    "Geometry",
    "Planned",
    "Snapshot",
    "SyncPlan",
    "VerifyReport",
    "VersionRecord",
    "WriteReport",
    "content_hash",
]
