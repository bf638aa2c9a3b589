"""The bank: a versioned, crash-safe store of encoded documents (LMDB records + Zarr tensors).

`Bank` is the public object (docs/design/interfaces.md); `Snapshot` pins one committed bank version for
a whole query. Writes follow *data first, pointer last*: tensor rows are appended to the current Zarr
generation and fsynced, then one LMDB transaction publishes them. Compaction copies live rows into a new
generation and switches to it in one transaction. One writer per bank (flock on `LOCK`); readers in any
process take a shared flock on the generation they read so compaction never deletes it under them.
This module does not tokenize or encode: callers pass `EncodedMemory` tensors.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import google_crc32c
import lmdb
import numpy as np
import torch

from msabank.errors import (
    BankCorruptedError,
    BankExistsError,
    BankFormatError,
    BankLockedError,
    BankModelMismatchError,
    BankNotFoundError,
    BankReadOnlyError,
    DocumentNotFoundError,
    InputError,
)
from msabank.storage.index import (
    Index,
    close_index,
    dec,
    enc,
    k_num,
    k_ver,
    num_k,
    open_index,
    pack_span,
    unpack_span,
    ver_k,
)
from msabank.storage.records import (
    DTYPE_STORED,
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
from msabank.storage.tensors import (
    ChunkReadError,
    Generation,
    dir_bytes,
    fsync_dir,
    read_template,
    remove_tree,
    write_template,
)
from msabank.types import EncodedMemory

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""On-disk format version (docs/storage-format.md). Banks of another version are refused on open."""

_TORCH_DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_VIEW_DTYPE = {"bfloat16": (torch.int16, np.int16), "float16": (torch.int16, np.int16), "float32": (torch.int32, np.int32)}
_COPY_BUDGET = 64 << 20  # bytes of content rows per batch in compaction and verify


def crc32c(a: np.ndarray) -> int:
    """crc32c of an array's raw bytes (google_crc32c, hardware-accelerated; wants a read-only buffer)."""
    b = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    b.flags.writeable = False
    return int(google_crc32c.value(b))


def default_chunk_rows(row_bytes: int, target: int) -> int:
    """The largest power of two of rows whose raw bytes stay within `target` (at least 1)."""
    rows = 1
    while rows * 2 * row_bytes <= target:
        rows *= 2
    return rows


def to_stored(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A CPU tensor of the bank dtype as its stored bit pattern (uint16 for bf16/f16, uint32 for f32)."""
    tview, _ = _VIEW_DTYPE[dtype]
    return t.contiguous().view(tview).numpy().view(DTYPE_STORED[dtype])


def from_stored(a: np.ndarray, dtype: str) -> torch.Tensor:
    _, nview = _VIEW_DTYPE[dtype]
    return torch.from_numpy(np.ascontiguousarray(a).view(nview)).view(_TORCH_DTYPE[dtype])


@dataclass(frozen=True, slots=True)
class _State:
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


def _gen_dir(root: Path, generation: int) -> Path:
    return root / "tensors" / f"gen-{generation:06d}"


def _doc_record(d: dict[str, Any], number: int, text: str, meta: dict[str, Any] | None) -> DocumentRecord:
    return DocumentRecord(
        user_id=d["user_id"],
        number=number,
        version=d["version"],
        text=text,
        content_hash=d["content_hash"],
        n_tokens=d["n_tokens"],
        num_chunks=d["num_chunks"],
        row_start=d["row_start"],
        created_at=d["created_at"],
        updated_at=d["updated_at"],
        meta=meta,
    )


def _memory_from_rows(content: np.ndarray, routing: Sequence[np.ndarray], g: Geometry, n_tokens: int) -> EncodedMemory:
    c = from_stored(content, g.dtype)  # (C, R, 2, Hkv, D)
    rk = torch.stack([from_stored(r, g.dtype).view(-1, g.num_kv_heads, g.head_dim) for r in routing])
    return EncodedMemory(
        n_tokens=n_tokens,
        routing_keys=rk,  # (R, C, Hkv, D)
        content_k=c[:, :, 0].permute(1, 0, 2, 3).contiguous(),
        content_v=c[:, :, 1].permute(1, 0, 2, 3).contiguous(),
    )


class Snapshot:
    """One committed bank version, held for the lifetime of a query (`with bank.snapshot() as s:`).

    Holds an LMDB read transaction and a shared lock on the tensor generation it reads; every read
    through it sees the same version even while a writer commits or compacts. Close it promptly: an open
    snapshot keeps LMDB from reusing pages and keeps a compacted generation on disk.
    """

    def __init__(self, bank: Bank) -> None:
        self._bank = bank
        self._closed = False
        self._row_map: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        idx = bank._index
        for _ in range(100):
            txn = idx.begin_read()
            state = _State(**dec(txn.get(b"state", db=idx.db("meta"))))
            fd = self._lock_generation(bank.path, state.generation)
            if fd is not None:
                break
            txn.abort()
        else:  # pragma: no cover - needs 100 compactions racing one reader
            raise BankCorruptedError(f"bank {bank.path}: tensor generation {state.generation} is missing")
        self._txn: lmdb.Transaction = txn
        self._fd = fd
        self.state = state
        self.version = state.version
        """The bank version this snapshot reads."""
        self.gen = Generation(
            _gen_dir(bank.path, state.generation), bank.geometry, bank._content_chunk_rows, bank._routing_chunk_rows
        )

    @staticmethod
    def _lock_generation(root: Path, generation: int) -> int | None:
        """A shared flock on the generation's `.readers` file, or None if that generation is gone."""
        try:
            fd = os.open(_gen_dir(root, generation) / ".readers", os.O_RDONLY)
        except FileNotFoundError:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)
        if os.fstat(fd).st_nlink == 0:  # removed by compaction between open and lock
            os.close(fd)
            return None
        return fd

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._txn.abort()
            os.close(self._fd)

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:  # pragma: no cover - interpreter shutdown
                pass

    def _get(self, db: str, key: bytes) -> bytes | None:
        v = self._txn.get(key, db=self._bank._index.db(db))
        return None if v is None else bytes(v)

    def _number(self, user_id: str) -> int | None:
        v = self._get("ids", user_id.encode("utf-8"))
        return None if v is None else num_k(v)

    def _doc(self, number: int) -> dict[str, Any] | None:
        v = self._get("docs", k_num(number))
        return None if v is None else dec(v)

    def _live(self, user_id: str) -> tuple[int, dict[str, Any]]:
        number = self._number(user_id)
        d = None if number is None else self._doc(number)
        if number is None or d is None or d["state"] != "live":
            raise DocumentNotFoundError(user_id)
        return number, d

    def _version(self, number: int, version: int) -> VersionRecord:
        v = self._get("versions", k_ver(number, version))
        if v is None:
            raise BankCorruptedError(f"document #{number}: version record {version} is missing")
        return VersionRecord.from_dict(dec(v))

    # ------------------------------------------------------------------ records
    def get(self, user_id: str) -> DocumentRecord:
        """The live document `user_id` (DocumentNotFoundError if absent or deleted)."""
        number, d = self._live(user_id)
        vr = self._version(number, d["version"])
        return _doc_record(d, number, vr.text, vr.meta)

    def versions(self, user_id: str) -> list[VersionRecord]:
        """Every version of `user_id`, oldest first, tombstones included (also for a deleted id)."""
        number = self._number(user_id)
        if number is None:
            raise DocumentNotFoundError(user_id)
        out = []
        cur = self._txn.cursor(db=self._bank._index.db("versions"))
        if cur.set_range(k_num(number)):
            for k, v in cur:
                n, _ = ver_k(bytes(k))
                if n != number:
                    break
                out.append(VersionRecord.from_dict(dec(bytes(v))))
        return out

    def list(self, *, text: bool = True) -> list[DocumentRecord]:
        """Live documents in number order (with their text unless text=False)."""
        out = []
        for k, v in self._txn.cursor(db=self._bank._index.db("docs")):
            d = dec(bytes(v))
            if d["state"] != "live":
                continue
            number = num_k(bytes(k))
            if text:
                vr = self._version(number, d["version"])
                out.append(_doc_record(d, number, vr.text, vr.meta))
            else:
                out.append(_doc_record(d, number, "", None))
        return out

    def user_id(self, number: int) -> str:
        d = self._doc(number)
        if d is None:
            raise DocumentNotFoundError(f"#{number}")
        return str(d["user_id"])

    # ------------------------------------------------------------------ tensors
    def tensors(self, user_id: str) -> EncodedMemory:
        """The stored tensors of `user_id`, checksum-checked (BankCorruptedError names the document)."""
        number, d = self._live(user_id)
        vr = self._version(number, d["version"])
        assert vr.row_start is not None, "live version without rows"
        content, routing = self._read_doc(user_id, vr, routing=True, check=True)
        return _memory_from_rows(content, routing, self._bank.geometry, vr.n_tokens)

    def _read_doc(
        self,
        user_id: str,
        vr: VersionRecord,
        *,
        routing: bool,
        check: bool,
        cache: dict[tuple[int, int], np.ndarray] | None = None,
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        assert vr.row_start is not None
        lo, hi = vr.row_start, vr.row_start + vr.num_chunks
        if hi > self.state.rows:
            raise BankCorruptedError(f"document {user_id!r}: rows {lo}..{hi - 1} past the committed rows", doc_id=user_id)
        try:
            content = self.gen.read_rows(self.gen.content, lo, hi, cache)
            rk = [self.gen.read_rows(a, lo, hi, cache) for a in self.gen.routing] if routing else []
        except ChunkReadError as err:
            raise BankCorruptedError(f"document {user_id!r}: {err}", doc_id=user_id) from None
        if check:
            if crc32c(content) != vr.crc_content:
                raise BankCorruptedError(f"document {user_id!r}: content K/V checksum mismatch", doc_id=user_id)
            for i, r in enumerate(rk):
                if crc32c(r) != vr.crc_routing[i]:
                    raise BankCorruptedError(
                        f"document {user_id!r}: routing keys of router layer {i} checksum mismatch", doc_id=user_id
                    )
        return content, rk

    def row_map(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Live spans in row order: (numbers, row_starts, num_chunks), int64 each."""
        if self._row_map is None:
            spans = []
            for k, v in self._txn.cursor(db=self._bank._index.db("spans")):
                s, c = unpack_span(bytes(v))
                spans.append((s, c, num_k(bytes(k))))
            spans.sort()
            arr = np.array(spans, dtype=np.int64).reshape(-1, 3)
            self._row_map = (arr[:, 2].copy(), arr[:, 0].copy(), arr[:, 1].copy())
        return self._row_map

    def routing_keys(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All live routing keys of router layer `layer_index`: keys (rows, Hkv·D) and row_numbers (rows,) int64.

        Rows are in storage order; `row_numbers[i]` is the document number of row i. Reads the layer's
        chunk files straight into one buffer (two decoding threads).
        """
        g = self._bank.geometry
        if not 0 <= layer_index < g.num_router_layers:
            raise IndexError(f"router layer index {layer_index} out of range 0..{g.num_router_layers - 1}")
        numbers, starts, counts = self.row_map()
        total = int(counts.sum())
        arr = self.gen.routing[layer_index]
        try:
            with ThreadPoolExecutor(2) as pool:
                buf = self.gen.read_all(arr, self.state.rows, pool)
        except ChunkReadError as err:
            lo, hi = err.rows
            bad = [self.user_id(int(n)) for n, s, c in zip(numbers, starts, counts) if s < hi and s + c > lo]
            raise BankCorruptedError(
                f"routing keys of layer {layer_index}: {err} (documents {bad[:5]})", doc_id=bad[0] if bad else None
            ) from None
        row_numbers = np.repeat(numbers, counts)
        if total != self.state.rows:  # garbage rows awaiting compaction: gather the live ones
            rows = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(total)
            buf = buf[rows]
        elif len(starts) and not np.array_equal(starts, np.concatenate([[0], np.cumsum(counts)[:-1]])):
            raise BankCorruptedError(f"bank {self._bank.path}: live spans overlap")  # pragma: no cover
        return from_stored(buf, g.dtype), torch.from_numpy(row_numbers)

    def content_kv(self, numbers: Iterable[int], *, pin: bool = False, check: bool = True) -> dict[int, torch.Tensor]:
        """Content K/V of each document number: (C, R, 2, Hkv, D) on CPU (pinned if asked and CUDA exists).

        Each document is one contiguous row range; rows are checksum-checked unless check=False.
        """
        out: dict[int, torch.Tensor] = {}
        wanted: list[tuple[int, int, str, VersionRecord]] = []
        for n in sorted(set(int(x) for x in numbers)):
            d = self._doc(n)
            if d is None or d["state"] != "live":
                raise DocumentNotFoundError(f"#{n}" if d is None else str(d["user_id"]))
            vr = self._version(n, d["version"])
            assert vr.row_start is not None
            wanted.append((vr.row_start, n, str(d["user_id"]), vr))
        wanted.sort()
        cache: dict[tuple[int, int], np.ndarray] = {}
        do_pin = pin and torch.cuda.is_available()
        for _, n, uid, vr in wanted:
            content, _ = self._read_doc(uid, vr, routing=False, check=check, cache=cache)
            t = from_stored(content, self._bank.geometry.dtype)
            out[n] = t.pin_memory() if do_pin else t
        return out

    def changes_since(self, version: int) -> Changes:
        """Numbers upserted and deleted after bank version `version`, up to this snapshot's version."""
        if version > self.version:
            raise ValueError(f"version {version} is newer than the bank's {self.version}")
        last: dict[int, str] = {}
        cur = self._txn.cursor(db=self._bank._index.db("changes"))
        if cur.set_range(k_num(version + 1)):
            for _k, v in cur:
                ch = dec(bytes(v))
                for n in ch.get("upserted", ()):
                    last[n] = "u"
                for n in ch.get("deleted", ()):
                    last[n] = "d"
        ups = tuple(sorted(n for n, a in last.items() if a == "u"))
        dels = tuple(sorted(n for n, a in last.items() if a == "d"))
        return Changes(upserted_numbers=ups, deleted_numbers=dels, version=self.version)

    def stats(self) -> BankStats:
        b = self._bank
        s = self.state
        tensor_bytes = dir_bytes(b.path / "tensors")
        return BankStats(
            version=s.version,
            documents=s.live_docs,
            deleted=s.deleted_docs,
            next_number=s.next_number,
            live_chunks=s.live_chunks,
            total_rows=s.rows,
            tokens=s.live_tokens,
            bytes_on_disk=tensor_bytes + dir_bytes(b.path / "index"),
            tensor_bytes_on_disk=tensor_bytes,
            generation=s.generation,
            geometry=b.geometry,
            fingerprint=b.fingerprint,
        )


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
            if tuple(t.shape) != want or t.dtype != _TORCH_DTYPE[g.dtype]:
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
        Generation.create(_gen_dir(tmp, 1), g, ccr, rcr)
        (tmp / "LOCK").touch()
        idx = open_index(tmp / "index", create=True, map_size=map_size)
        try:
            state = _State()

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
            manifest = dec(bytes(raw))
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
            bank._reclaim()
        return bank

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        close_index(self._index)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Bank:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Bank({str(self.path)!r}, readonly={self.readonly})"

    # ------------------------------------------------------------------ reads (one snapshot per call)
    def snapshot(self) -> Snapshot:
        """Pin the current committed version for a whole query (close it, or use `with`)."""
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

    def list(self, *, text: bool = True) -> list[DocumentRecord]:
        with self.snapshot() as s:
            return s.list(text=text)

    def stats(self) -> BankStats:
        with self.snapshot() as s:
            return s.stats()

    def routing_keys(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self.snapshot() as s:
            return s.routing_keys(layer_index)

    def content_kv(self, numbers: Iterable[int], *, pin: bool = False, check: bool = True) -> dict[int, torch.Tensor]:
        with self.snapshot() as s:
            return s.content_kv(numbers, pin=pin, check=check)

    def changes_since(self, version: int) -> Changes:
        with self.snapshot() as s:
            return s.changes_since(version)

    def template_prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Template-prefix K/V, each (L, Hkv, T0, D) in the bank dtype (checksum-checked)."""
        k, v = read_template(self.path / "tensors" / "template")
        if [crc32c(k), crc32c(v)] != list(self._manifest["template_crc"]):
            raise BankCorruptedError(f"bank {self.path}: template prefix checksum mismatch")
        return from_stored(k, self.geometry.dtype), from_stored(v, self.geometry.dtype)

    # ------------------------------------------------------------------ planning
    def plan(self, items: Iterable[tuple[str, str]]) -> list[Planned]:
        """Give each (user_id, text) its number and action (add/update/unchanged); nothing is written.

        New ids get consecutive numbers from the bank's next free number, in item order. Duplicate ids in
        one call are an InputError.
        """
        out: list[Planned] = []
        seen: set[str] = set()
        with self.snapshot() as s:
            nxt = s.state.next_number
            for user_id, text in items:
                _check_id_text(user_id, text)
                if user_id in seen:
                    raise InputError(f"duplicate document id {user_id!r} in one batch")
                seen.add(user_id)
                h = content_hash(text)
                number = s._number(user_id)
                if number is None:
                    out.append(Planned(user_id, nxt, h, "add", text))
                    nxt += 1
                    continue
                d = s._doc(number)
                assert d is not None, f"id {user_id!r} maps to #{number} without a record"
                if d["state"] != "live":
                    action = "add"
                elif d["content_hash"] == h:
                    action = "unchanged"
                else:
                    action = "update"
                out.append(Planned(user_id, number, h, action, text))  # type: ignore[arg-type]
        return out

    def absent_ids(self, source_ids: Iterable[str]) -> list[str]:
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
        if self._closed:
            raise BankReadOnlyError(f"bank {self.path} is closed")
        if self.readonly:
            raise BankReadOnlyError(f"bank {self.path} is open read-only", hint="open it with readonly=False to write")

    def write(self, docs: Sequence[DocumentWrite], delete: Sequence[str] = ()) -> WriteReport:
        """Commit upserts and deletes as one atomic change (data first, pointer last).

        Documents whose content hash equals the stored one are counted `unchanged` and not written.
        Deleting an id that is not live raises DocumentNotFoundError; nothing is committed on any error.
        """
        self._check_writable()
        g = self.geometry
        now = time.time()
        seen: set[str] = set()
        for dw in docs:
            if dw.user_id in seen:
                raise InputError(f"duplicate document id {dw.user_id!r} in one write")
            seen.add(dw.user_id)
        dup = seen.intersection(delete)
        if dup:
            raise InputError(f"document {sorted(dup)[0]!r} is both written and deleted in one write")
        if len(set(delete)) != len(delete):
            raise InputError("duplicate id in delete")
        with self.snapshot() as s:
            st = s.state
            nxt = st.next_number
            used_new: set[int] = set()
            puts: list[tuple[str, bytes, bytes]] = []
            dels: list[tuple[str, bytes]] = []
            contents: list[np.ndarray] = []
            routings: list[list[np.ndarray]] = [[] for _ in range(g.num_router_layers)]
            row = st.rows
            added = updated = unchanged = 0
            live_docs, deleted_docs, live_chunks, live_tokens = st.live_docs, st.deleted_docs, st.live_chunks, st.live_tokens
            upserted: list[int] = []
            version = st.version + 1
            for dw in docs:
                _check_id_text(dw.user_id, dw.text)
                if content_hash(dw.text) != dw.content_hash:
                    raise InputError(f"document {dw.user_id!r}: content_hash does not match its text")
                existing = s._number(dw.user_id)
                d = None if existing is None else s._doc(existing)
                if existing is not None:
                    if dw.number != existing:
                        raise InputError(
                            f"document {dw.user_id!r} has number {existing}, not {dw.number}", hint="use Bank.plan"
                        )
                    assert d is not None
                    if d["state"] == "live" and d["content_hash"] == dw.content_hash:
                        unchanged += 1
                        continue
                else:
                    if dw.number < st.next_number or dw.number in used_new:
                        raise InputError(
                            f"document {dw.user_id!r}: number {dw.number} is taken (numbers are never reused)",
                            hint="get numbers from Bank.plan",
                        )
                    used_new.add(dw.number)
                    nxt = max(nxt, dw.number + 1)
                content, routing = _stored_rows(dw, g)
                c = content.shape[0]
                crc_r = tuple(crc32c(r) for r in routing)
                contents.append(content)
                for i, r in enumerate(routing):
                    routings[i].append(r)
                is_live = d is not None and d["state"] == "live"
                doc_version = 1 if d is None else int(d["version"]) + 1
                vr = VersionRecord(
                    version=doc_version,
                    kind="upsert",
                    bank_version=version,
                    committed_at=now,
                    content_hash=dw.content_hash,
                    n_tokens=dw.memory.n_tokens,
                    num_chunks=c,
                    row_start=row,
                    text=dw.text,
                    crc_content=crc32c(content),
                    crc_routing=crc_r,
                    meta=dw.meta,
                )
                nd = {
                    "user_id": dw.user_id,
                    "version": doc_version,
                    "state": "live",
                    "created_at": now if d is None else d["created_at"],
                    "updated_at": now,
                    "row_start": row,
                    "num_chunks": c,
                    "n_tokens": dw.memory.n_tokens,
                    "content_hash": dw.content_hash,
                }
                key = k_num(dw.number)
                puts += [
                    ("ids", dw.user_id.encode("utf-8"), k_num(dw.number)),
                    ("docs", key, enc(nd)),
                    ("versions", k_ver(dw.number, doc_version), enc(vr.to_dict())),
                    ("spans", key, pack_span(row, c)),
                ]
                if is_live:
                    assert d is not None
                    updated += 1
                    live_chunks -= int(d["num_chunks"])
                    live_tokens -= int(d["n_tokens"])
                else:
                    added += 1
                    live_docs += 1
                    if d is not None:
                        deleted_docs -= 1
                live_chunks += c
                live_tokens += dw.memory.n_tokens
                upserted.append(dw.number)
                row += c
            deleted: list[int] = []
            for uid in delete:
                number, d = s._live(uid)
                doc_version = int(d["version"]) + 1
                vr = VersionRecord(version=doc_version, kind="delete", bank_version=version, committed_at=now)
                nd = dict(d, version=doc_version, state="deleted", updated_at=now)
                puts += [("docs", k_num(number), enc(nd)), ("versions", k_ver(number, doc_version), enc(vr.to_dict()))]
                dels.append(("spans", k_num(number)))
                live_docs -= 1
                deleted_docs += 1
                live_chunks -= int(d["num_chunks"])
                live_tokens -= int(d["n_tokens"])
                deleted.append(number)
            if not upserted and not deleted:
                return WriteReport(0, 0, unchanged, 0, st.version)
            capacity = st.capacity
            if contents:  # data first: rows written and fsynced before the pointer
                capacity = s.gen.append(
                    st.rows, st.capacity, np.concatenate(contents), [np.concatenate(r) for r in routings]
                )
                s.gen.sync()
            new_state = replace(
                st,
                version=version,
                next_number=nxt,
                rows=row,
                capacity=capacity,
                live_docs=live_docs,
                deleted_docs=deleted_docs,
                live_chunks=live_chunks,
                live_tokens=live_tokens,
            )
            puts.append(("changes", k_num(version), enc({"upserted": upserted, "deleted": deleted})))
            puts.append(("meta", b"state", enc(new_state.to_dict())))
        self._commit(puts, dels)  # pointer last
        return WriteReport(added, updated, unchanged, len(deleted), version)

    def delete(self, user_ids: Sequence[str]) -> WriteReport:
        """Tombstone documents (rows stay until `compact`)."""
        return self.write((), delete=user_ids)

    def _commit(self, puts: list[tuple[str, bytes, bytes]], dels: list[tuple[str, bytes]]) -> None:
        idx = self._index

        def apply(txn: lmdb.Transaction) -> None:
            for db, k in dels:
                txn.delete(k, db=idx.db(db))
            for db, k, v in puts:
                txn.put(k, v, db=idx.db(db))

        idx.write(apply)

    # ------------------------------------------------------------------ maintenance
    def _reclaim(self) -> None:
        """Writer open: drop rows past the committed pointer and unreferenced generations."""
        with self.snapshot() as s:
            removed = s.gen.reclaim_tail(s.state.rows)
            current = s.state.generation
        if removed:
            log.info("bank %s: reclaimed %d uncommitted tensor files", self.path, removed)
        self._remove_stale_generations(current)

    def _remove_stale_generations(self, current: int) -> None:
        for p in sorted((self.path / "tensors").glob("gen-*")):
            if p.name == _gen_dir(self.path, current).name:
                continue
            fd: int | None = None
            try:
                fd = os.open(p / ".readers", os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except FileNotFoundError:
                pass  # a crashed create/compaction left no lock file: no reader can hold it
            except BlockingIOError:
                if fd is not None:
                    os.close(fd)
                log.info("bank %s: %s still has readers; removing it later", self.path, p.name)
                continue
            try:
                (p / ".readers").unlink(missing_ok=True)  # first, so a reader that locks late sees nlink == 0
                shutil.rmtree(p, ignore_errors=True)
            finally:
                if fd is not None:
                    os.close(fd)
        fsync_dir(self.path / "tensors")

    def compact(self) -> CompactReport:
        """Reclaim rows of superseded and deleted versions by copying live rows into a new generation.

        Crash-safe: the new generation is invisible until one LMDB transaction switches to it; the old one
        is removed afterwards (or later, if a reader still holds it). Live rows are checksum-checked while
        copied (BankCorruptedError names the document). A bank without garbage rows is left as it is.
        """
        self._check_writable()
        g = self.geometry
        with self.snapshot() as s:
            st = s.state
            bytes_before = s.gen.disk_bytes()
            if st.live_chunks == st.rows:
                s.gen.reclaim_tail(st.rows)
                report = CompactReport(st.rows, st.rows, bytes_before, s.gen.disk_bytes(), st.version, st.generation)
                current = st.generation
            else:
                new_no = st.generation + 1
                new_path = _gen_dir(self.path, new_no)
                remove_tree(new_path)
                new = Generation.create(new_path, g, self._content_chunk_rows, self._routing_chunk_rows)
                numbers, starts, counts = s.row_map()
                cap = 0
                row = 0
                new_start: dict[int, int] = {}
                batch: list[tuple[int, int, int]] = []
                batch_rows = 0
                limit = max(1, _COPY_BUDGET // g.content_row_bytes)
                for n, st0, c in zip(numbers.tolist(), starts.tolist(), counts.tolist()):
                    batch.append((n, st0, c))
                    batch_rows += c
                    if batch_rows >= limit:
                        cap, row = self._copy_batch(s, new, batch, cap, row, new_start)
                        batch, batch_rows = [], 0
                if batch:
                    cap, row = self._copy_batch(s, new, batch, cap, row, new_start)
                new.sync()
                fsync_dir(new_path.parent)
                puts: list[tuple[str, bytes, bytes]] = []
                for k, v in s._txn.cursor(db=self._index.db("versions")):
                    number, ver = ver_k(bytes(k))
                    vr = VersionRecord.from_dict(dec(bytes(v)))
                    if vr.row_start is None:
                        continue
                    d = s._doc(number)
                    assert d is not None
                    live = d["state"] == "live" and d["version"] == ver
                    vr2 = replace(vr, row_start=new_start[number] if live else None)
                    puts.append(("versions", bytes(k), enc(vr2.to_dict())))
                    if live:
                        puts.append(("docs", k_num(number), enc(dict(d, row_start=new_start[number]))))
                        puts.append(("spans", k_num(number), pack_span(new_start[number], vr.num_chunks)))
                version = st.version + 1
                new_state = replace(st, version=version, rows=row, capacity=cap, generation=new_no)
                puts.append(("changes", k_num(version), enc({"upserted": [], "deleted": [], "compacted": True})))
                puts.append(("meta", b"state", enc(new_state.to_dict())))
                self._commit(puts, [])
                report = CompactReport(st.rows, row, bytes_before, 0, version, new_no)
                current = new_no
        self._remove_stale_generations(current)
        return replace(report, bytes_after=dir_bytes(_gen_dir(self.path, current)))

    def _copy_batch(
        self,
        s: Snapshot,
        new: Generation,
        batch: list[tuple[int, int, int]],
        cap: int,
        row: int,
        new_start: dict[int, int],
    ) -> tuple[int, int]:
        lo = min(b[1] for b in batch)
        hi = max(b[1] + b[2] for b in batch)
        idx = np.concatenate([np.arange(st0 - lo, st0 - lo + c) for _, st0, c in batch])
        try:
            content = s.gen.read_rows(s.gen.content, lo, hi)[idx]
            routing = [s.gen.read_rows(a, lo, hi)[idx] for a in s.gen.routing]
        except ChunkReadError as err:
            raise BankCorruptedError(f"compaction: {err}", hint="run verify to name the documents") from None
        off = 0
        for n, _st0, c in batch:
            d = s._doc(n)
            assert d is not None
            vr = s._version(n, d["version"])
            if crc32c(content[off : off + c]) != vr.crc_content or any(
                crc32c(r[off : off + c]) != vr.crc_routing[i] for i, r in enumerate(routing)
            ):
                raise BankCorruptedError(f"compaction: document {d['user_id']!r} fails its checksum", doc_id=d["user_id"])
            new_start[n] = row + off
            off += c
        cap = new.append(row, cap, content, routing)
        return cap, row + off

    def verify(self) -> VerifyReport:
        """Check every live document's bytes against its checksums, plus row spans and counters."""
        g = self.geometry
        problems: list[str] = []
        corrupted: list[str] = []
        with self.snapshot() as s:
            st = s.state
            docs: list[tuple[int, int, str, VersionRecord]] = []
            live = deleted = tokens = chunks = 0
            covered = np.zeros(st.rows, dtype=np.int8)
            ids_count = 0
            for k, v in s._txn.cursor(db=self._index.db("ids")):
                ids_count += 1
                d = s._doc(num_k(bytes(v)))
                if d is None or d["user_id"] != bytes(k).decode("utf-8"):
                    problems.append(f"id {bytes(k).decode('utf-8', 'replace')!r} maps to a missing or foreign record")
            for k, v in s._txn.cursor(db=self._index.db("versions")):
                vr = VersionRecord.from_dict(dec(bytes(v)))
                if vr.row_start is not None:
                    if vr.row_start < 0 or vr.row_start + vr.num_chunks > st.rows:
                        problems.append(f"document #{ver_k(bytes(k))[0]} version {vr.version}: rows past the pointer")
                    else:
                        covered[vr.row_start : vr.row_start + vr.num_chunks] += 1
            spans = {num_k(bytes(k)): unpack_span(bytes(v)) for k, v in s._txn.cursor(db=self._index.db("spans"))}
            n_docs = 0
            for k, v in s._txn.cursor(db=self._index.db("docs")):
                n_docs += 1
                number = num_k(bytes(k))
                d = dec(bytes(v))
                if d["state"] != "live":
                    deleted += 1
                    if number in spans:
                        problems.append(f"deleted document {d['user_id']!r} still has a live span")
                    continue
                live += 1
                vr = s._version(number, d["version"])
                if vr.row_start is None or spans.get(number) != (vr.row_start, vr.num_chunks):
                    problems.append(f"document {d['user_id']!r}: span record disagrees with its version record")
                    continue
                tokens += vr.n_tokens
                chunks += vr.num_chunks
                docs.append((vr.row_start, number, d["user_id"], vr))
            if ids_count != n_docs:
                problems.append(f"{ids_count} ids but {n_docs} document records")
            if (live, deleted, chunks, tokens) != (st.live_docs, st.deleted_docs, st.live_chunks, st.live_tokens):
                problems.append(
                    f"counters say {st.live_docs} live/{st.deleted_docs} deleted/{st.live_chunks} chunks/"
                    f"{st.live_tokens} tokens, records say {live}/{deleted}/{chunks}/{tokens}"
                )
            if st.next_number <= max((n for _, n, _, _ in docs), default=-1):
                problems.append(f"next number {st.next_number} is not past every document number")
            orphan = int((covered == 0).sum())
            if orphan:
                problems.append(f"{orphan} committed rows belong to no version (dangling rows)")
            docs.sort()
            live_cov = np.zeros(st.rows, dtype=np.int8)
            for start, _n, uid, vr in docs:
                live_cov[start : start + vr.num_chunks] += 1
            if (live_cov > 1).any():
                problems.append("live documents share rows")
            rows_checked = 0
            limit = max(1, _COPY_BUDGET // g.content_row_bytes)
            i = 0
            while i < len(docs):
                j, rows = i, 0
                while j < len(docs) and (rows == 0 or rows + docs[j][3].num_chunks <= limit):
                    rows += docs[j][3].num_chunks
                    j += 1
                cache: dict[tuple[int, int], np.ndarray] = {}
                for _start, _n, uid, vr in docs[i:j]:
                    try:
                        s._read_doc(uid, vr, routing=True, check=True, cache=cache)
                    except BankCorruptedError as err:
                        corrupted.append(uid)
                        problems.append(str(err))
                    rows_checked += vr.num_chunks
                i = j
            if s.gen.content.shape_rows() < st.rows:
                problems.append("content array is shorter than the committed rows")
            try:
                self.template_prefix()
            except BankCorruptedError as err:
                problems.append(str(err))
            garbage = int((covered > 0).sum()) - chunks
            return VerifyReport(
                version=st.version,
                documents=live,
                rows_checked=rows_checked,
                problems=tuple(problems),
                corrupted=tuple(corrupted),
                orphan_rows=orphan,
                garbage_rows=max(0, garbage),
            )


def _check_id_text(user_id: str, text: str) -> None:
    if not isinstance(user_id, str) or not user_id:
        raise InputError(f"document id must be a non-empty string, got {user_id!r}")
    if len(user_id.encode("utf-8")) > 500:
        raise InputError(f"document id {user_id[:40]!r}… is longer than 500 bytes (LMDB key limit)")
    if not isinstance(text, str):
        raise InputError(f"document {user_id!r}: text must be a string")


def _stored_rows(dw: DocumentWrite, g: Geometry) -> tuple[np.ndarray, list[np.ndarray]]:
    """(C, R, 2, Hkv, D) content rows and R routing blocks (C, Hkv·D), as stored bit patterns."""
    m = dw.memory
    want_dtype = _TORCH_DTYPE[g.dtype]
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
            hint="another msabank process is writing; wait for it, or open the bank read-only",
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def iter_batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Split an iterable into lists of at most `size` (helper for ingest loops)."""
    batch: list[Any] = []
    for x in items:
        batch.append(x)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
