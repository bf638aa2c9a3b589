"""The bank: a versioned, crash-safe store of encoded documents (LMDB records + Zarr tensors).

`Bank` is the public object (docs/design/interfaces.md); `Snapshot` pins one committed bank version for
a whole query. Writes follow *data first, pointer last*: tensor rows are appended to the current Zarr
generation and fsynced, then one LMDB transaction publishes them. Compaction copies live rows into a new
generation and switches to it in one transaction. One writer per bank (flock on `LOCK`); readers in any
process take a shared flock on the generation they read so compaction never deletes it under them.
This module does not tokenize or encode: callers pass `EncodedMemory` tensors.

This module holds the bank's lifecycle (create/open/close, the writer lock) and its public facade; the
work is done in sibling modules that take the bank as an argument: snapshot.py (every read path),
write.py (plan, write, the LMDB commit), maintenance.py (compact, verify, reclaim), with state.py (the
`state` pointer record, generation paths) and codec.py (stored bit patterns, checksums) under them all.
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import os
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import lmdb
import torch

from msabank.errors import (
    BankClosedError,
    BankCorruptedError,
    BankExistsError,
    BankFormatError,
    BankLockedError,
    BankModelMismatchError,
    BankNotFoundError,
    BankReadOnlyError,
    InputError,
)
from msabank.storage import maintenance
from msabank.storage.codec import TORCH_DTYPE, crc32c, from_stored, to_stored
from msabank.storage.lmdb_index import Index, close_index, dec, enc, open_index
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
)
from msabank.storage.snapshot import Snapshot
from msabank.storage.state import State, gen_dir
from msabank.storage.tensors import Generation, fsync_dir, read_template, remove_tree, write_template
from msabank.storage.write import plan_items, write_docs
from msabank.types import EncodedMemory

# crc32c, to_stored and from_stored live in codec.py now; still importable from here as before
__all__ = ["FORMAT_VERSION", "Bank", "Snapshot", "crc32c", "default_chunk_rows", "from_stored", "to_stored"]

FORMAT_VERSION = 1
"""On-disk format version (docs/storage-format.md). Banks of another version are refused on open."""


def default_chunk_rows(row_bytes: int, target: int) -> int:
    """The largest power of two of rows whose raw bytes stay within `target` (at least 1)."""
    rows = 1
    while rows * 2 * row_bytes <= target:
        rows *= 2
    return rows


class Bank:
    """A memory bank on disk. Open with `Bank.create` / `Bank.open`; use as a context manager.

    A bank opened for writing holds the writer lock until `close()`. All reads go through a `Snapshot`
    (one is made per call unless you hold one via `snapshot()`).
    """

    def __init__(self, path: Path, index: Index, manifest: dict[str, Any], readonly: bool, lock_fd: int | None) -> None:
        self.path = path
        self._index = index
        self.readonly = readonly
        self._lock_fd = lock_fd
        self.geometry = Geometry.from_dict(manifest["geometry"])
        self.fingerprint: str = manifest["fingerprint"]
        self._content_chunk_rows: int = manifest["content_chunk_rows"]
        self._routing_chunk_rows: int = manifest["routing_chunk_rows"]
        self._manifest = manifest
        self._closed = False
        self._closed_why = "it was closed"

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        geometry: Geometry,
        fingerprint: str,
        template_k: torch.Tensor,
        template_v: torch.Tensor,
        *,
        content_chunk_rows: int | None = None,
        routing_chunk_rows: int | None = None,
        map_size: int | None = None,
    ) -> Bank:
        """Create a bank at `path` and open it for writing (BankExistsError if one is there).

        template_k/v: (L, Hkv, T0, D) in the bank dtype. Chunk rows default to ~1 MiB raw per content chunk
        and ~512 KiB per routing chunk (a small append rewrites at most one chunk per array). The bank is
        built in a temporary sibling directory and renamed into place, so a crash never leaves half a bank.
        """
        root = Path(path)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise BankExistsError(f"{root} already exists", hint="open it with Bank.open, or pick another path")
        g = geometry
        want = (g.num_layers, g.num_kv_heads, g.template_len, g.head_dim)
        for name, t in (("template_k", template_k), ("template_v", template_v)):
            if tuple(t.shape) != want or t.dtype != TORCH_DTYPE[g.dtype]:
                raise InputError(f"{name} must be {want} {g.dtype}, got {tuple(t.shape)} {t.dtype}")
        ccr = content_chunk_rows or default_chunk_rows(g.content_row_bytes, 1 << 20)
        rcr = routing_chunk_rows or default_chunk_rows(g.row_width * g.elem_bytes, 1 << 19)
        tk, tv = to_stored(template_k.cpu(), g.dtype), to_stored(template_v.cpu(), g.dtype)
        manifest = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fingerprint,
            "geometry": g.to_dict(),
            "content_chunk_rows": ccr,
            "routing_chunk_rows": rcr,
            "template_crc": [crc32c(tk), crc32c(tv)],
            "created_at": time.time(),
        }
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = root.parent / f".{root.name}.creating-{os.getpid()}"
        remove_tree(tmp)
        (tmp / "tensors").mkdir(parents=True)
        (tmp / "index").mkdir()
        write_template(tmp / "tensors" / "template", tk, tv)
        Generation.create(gen_dir(tmp, 1), g, ccr, rcr)
        (tmp / "LOCK").touch()
        idx = open_index(tmp / "index", create=True, map_size=map_size)
        try:
            state = State()

            def init(txn: lmdb.Transaction) -> None:
                txn.put(b"manifest", enc(manifest), db=idx.db("meta"))
                txn.put(b"state", enc(state.to_dict()), db=idx.db("meta"))

            idx.write(init)
        finally:
            close_index(idx)
        fsync_dir(tmp / "tensors")
        fsync_dir(tmp)
        if root.exists():
            root.rmdir()
        os.rename(tmp, root)
        fsync_dir(root.parent)
        return cls.open(root, fingerprint=fingerprint, map_size=map_size)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        fingerprint: str | None = None,
        readonly: bool = False,
        map_size: int | None = None,
    ) -> Bank:
        """Open a bank. readonly=False takes the writer lock (BankLockedError if another process has it).

        fingerprint: if given, must equal the bank's model fingerprint (BankModelMismatchError otherwise).
        """
        root = Path(path)
        if not root.exists():
            raise BankNotFoundError(f"no bank at {root}", hint="create one with `msabank init`")
        if not (root / "index" / "data.mdb").exists():
            raise BankFormatError(f"{root} is not an msabank bank (no index/data.mdb)", hint="check the path")
        if not readonly:
            _close_earlier_writer(root)
        lock_fd = None if readonly else _acquire_writer_lock(root)
        try:
            idx = open_index(root / "index", map_size=map_size)
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        try:
            txn = idx.begin_read()
            raw = txn.get(b"manifest", db=idx.db("meta"))
            txn.abort()
            if raw is None:
                raise BankFormatError(f"{root} has no manifest: not an msabank bank", hint="check the path")
            try:
                manifest = dec(bytes(raw))
                if not isinstance(manifest, dict):
                    raise ValueError("not an object")
                Geometry.from_dict(manifest["geometry"])
                for key in ("fingerprint", "content_chunk_rows", "routing_chunk_rows", "template_crc"):
                    manifest[key]
            except (ValueError, KeyError, TypeError) as err:
                raise BankCorruptedError(f"bank {root}: the manifest record is damaged ({type(err).__name__})",
                                         hint="the bank cannot be read; rebuild it from the source corpus "
                                              "(`msabank init` a new bank, then `msabank ingest` the corpus)") from None
            if manifest.get("format_version") != FORMAT_VERSION:
                raise BankFormatError(
                    f"bank {root} has format version {manifest.get('format_version')}; this msabank reads version "
                    f"{FORMAT_VERSION}",
                    hint="use the msabank release that wrote it, or re-ingest the corpus into a new bank",
                )
            if fingerprint is not None and fingerprint != manifest["fingerprint"]:
                raise BankModelMismatchError(
                    f"bank {root} was built with model {manifest['fingerprint'][:16]}…, not {fingerprint[:16]}…",
                    hint="open it with the model that built it, or ingest the corpus into a new bank for this model",
                )
            bank = cls(root, idx, manifest, readonly, lock_fd)
        except BaseException:
            close_index(idx)
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        if not readonly:
            try:
                maintenance.reclaim(bank)
            except BaseException:
                bank.close()
                raise
            with _writers_lock:
                _writers[_writer_key(root)] = weakref.ref(bank)
        return bank

    def close(self) -> None:
        """Release the LMDB environment and (for a writer) the writer lock. Idempotent; a later read or
        write raises BankClosedError. A handle that is dropped unclosed is closed when it is collected."""
        if self._closed:
            return
        self._closed = True
        close_index(self._index)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
            with _writers_lock:
                key = _writer_key(self.path)
                ref = _writers.get(key)
                if ref is not None and ref() in (self, None):
                    del _writers[key]

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:  # pragma: no cover - interpreter shutdown
                pass

    def _check_open(self) -> None:
        if self._closed:
            raise BankClosedError(f"bank {self.path} is closed: {self._closed_why}",
                                  hint="open it again, e.g. `msabank.open_bank(path)`")

    def __enter__(self) -> Bank:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Bank({str(self.path)!r}, readonly={self.readonly})"

    # ------------------------------------------------------------------ reads (one snapshot per call)
    def snapshot(self) -> Snapshot:
        """Pin the current committed version for a whole query (close it, or use `with`)."""
        self._check_open()
        return Snapshot(self)

    @property
    def version(self) -> int:
        with self.snapshot() as s:
            return s.version

    def get(self, user_id: str) -> DocumentRecord:
        with self.snapshot() as s:
            return s.get(user_id)

    def versions(self, user_id: str) -> list[VersionRecord]:
        with self.snapshot() as s:
            return s.versions(user_id)

    def tensors(self, user_id: str) -> EncodedMemory:
        with self.snapshot() as s:
            return s.tensors(user_id)

    def list(self, *, text: bool = True, damaged: builtins.list[str] | None = None) -> builtins.list[DocumentRecord]:
        with self.snapshot() as s:
            return s.list(text=text, damaged=damaged)

    def stats(self) -> BankStats:
        with self.snapshot() as s:
            return s.stats()

    def routing_keys(self, layer_index: int, *, damaged: dict[int, str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        with self.snapshot() as s:
            return s.routing_keys(layer_index, damaged=damaged)

    def content_kv(
        self, numbers: Iterable[int], *, pin: bool = False, check: bool = True, damaged: dict[int, str] | None = None
    ) -> dict[int, torch.Tensor]:
        with self.snapshot() as s:
            return s.content_kv(numbers, pin=pin, check=check, damaged=damaged)

    def changes_since(self, version: int) -> Changes:
        with self.snapshot() as s:
            return s.changes_since(version)

    def template_prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Template-prefix K/V, each (L, Hkv, T0, D) in the bank dtype (checksum-checked)."""
        try:
            k, v = read_template(self.path / "tensors" / "template")
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as err:
            raise BankCorruptedError(f"bank {self.path}: the template prefix cannot be read ({type(err).__name__}: "
                                     f"{str(err)[:200]})") from None
        if [crc32c(k), crc32c(v)] != list(self._manifest["template_crc"]):
            raise BankCorruptedError(f"bank {self.path}: template prefix checksum mismatch")
        return from_stored(k, self.geometry.dtype), from_stored(v, self.geometry.dtype)

    # ------------------------------------------------------------------ planning
    # (`list` above shadows the builtin in this class body: annotations below use builtins.list)
    def plan(self, items: Iterable[tuple[str, str]], *, first_number: int = 0) -> builtins.list[Planned]:
        """Give each (user_id, text) its number and action (add/update/unchanged); nothing is written.

        New ids get consecutive numbers from the bank's next free number, in item order. Duplicate ids in
        one call are an InputError. `first_number`: new ids start at least there — a pipelined ingest plans
        batch i + 1 while batch i (whose new numbers end at first_number - 1) is still being committed.
        """
        return plan_items(self, items, first_number)

    def absent_ids(self, source_ids: Iterable[str]) -> builtins.list[str]:
        """Live ids not in `source_ids`: what a full-source `sync` deletes."""
        keep = set(source_ids)
        with self.snapshot() as s:
            return [r.user_id for r in s.list(text=False) if r.user_id not in keep]

    def plan_sync(self, items: Sequence[tuple[str, str]]) -> SyncPlan:
        """`plan` for a whole source plus the live ids absent from it (to pass as `write(..., delete=)`)."""
        planned = self.plan(items)
        return SyncPlan(planned=tuple(planned), delete=tuple(self.absent_ids(p.user_id for p in planned)))

    # ------------------------------------------------------------------ writes
    def _check_writable(self) -> None:
        self._check_open()
        if self.readonly:
            raise BankReadOnlyError(f"bank {self.path} is open read-only", hint="open it with readonly=False to write")

    def write(self, docs: Sequence[DocumentWrite], delete: Sequence[str] = ()) -> WriteReport:
        """Commit upserts and deletes as one atomic change (data first, pointer last).

        Documents whose content hash equals the stored one are counted `unchanged` and not written.
        Deleting an id that is not live raises DocumentNotFoundError; nothing is committed on any error.
        """
        return write_docs(self, docs, delete)

    def delete(self, user_ids: Sequence[str]) -> WriteReport:
        """Tombstone documents (rows stay until `compact`)."""
        return self.write((), delete=user_ids)

    # ------------------------------------------------------------------ maintenance
    def compact(self) -> CompactReport:
        """Reclaim rows of superseded and deleted versions by copying live rows into a new generation.

        Crash-safe: the new generation is invisible until one LMDB transaction switches to it; the old one
        is removed afterwards (or later, if a reader still holds it). Live rows are checksum-checked while
        copied (BankCorruptedError names the document). A bank without garbage rows is left as it is.
        """
        return maintenance.compact(self)

    def verify(self) -> VerifyReport:
        """Check every live document's bytes against its checksums, plus row spans and counters."""
        return maintenance.verify(self)


# The open writer handle of each bank in this process (weakly held: a dropped handle is not kept alive).
_writers: dict[str, weakref.ref[Bank]] = {}
_writers_lock = threading.Lock()


def _writer_key(root: Path) -> str:
    return str(root.resolve())


def _close_earlier_writer(root: Path) -> None:
    """Opening a bank for writing again in the same process (a notebook cell run twice) closes the earlier
    handle instead of refusing with "locked by pid <our own pid>"; using that handle then raises
    BankClosedError saying why."""
    with _writers_lock:
        ref = _writers.pop(_writer_key(root), None)
    old = ref() if ref is not None else None
    if old is not None and not old._closed:
        warnings.warn(f"bank {root} was already open for writing in this process; closing the earlier handle",
                      stacklevel=4)
        old.close()
        old._closed_why = "it was opened for writing again in this process, which closed this handle"


def _acquire_writer_lock(root: Path) -> int:
    fd = os.open(root / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            os.close(fd)
            raise
        try:
            pid = os.pread(fd, 32, 0).decode().strip() or "?"
        finally:
            os.close(fd)
        raise BankLockedError(
            f"bank {root} is locked by pid {pid}",
            hint="another msabank process is writing; wait for it (reading commands such as ask, ls and verify "
            "work meanwhile; in Python, msabank.open_bank(path, readonly=True))",
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd
