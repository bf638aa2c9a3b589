"""Snapshot: one committed bank version, pinned for a whole query; every read path of the bank.

A snapshot holds an LMDB read transaction (records, spans, the `state` pointer) and a shared flock on the
`.readers` file of the tensor generation that state points to, so compaction never deletes the rows under
it. Reads: records (`get`, `versions`, `list`, `user_id`), tensors (`tensors`, `routing_keys`,
`content_kv`, `row_map`), the change log (`changes_since`) and `stats`. Stored rows are checksum-checked
on read; a mismatch is a BankCorruptedError that names the document.
"""

from __future__ import annotations

import builtins  # Snapshot.list shadows `list` in the class body: annotations there use builtins.list
import fcntl
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import lmdb
import numpy as np
import torch

from msabank.errors import BankCorruptedError, DocumentNotFoundError
from msabank.storage.codec import crc32c, from_stored, memory_from_rows
from msabank.storage.lmdb_index import k_num, k_ver, num_k, unpack_span, ver_k
from msabank.storage.records import BankStats, Changes, DocumentRecord, VersionRecord, content_hash
from msabank.storage.state import State, gen_dir
from msabank.storage.tensors import ChunkReadError, Generation, dir_bytes
from msabank.types import EncodedMemory

if TYPE_CHECKING:
    from msabank.storage.bank import Bank


_NUM = (int, float)
_DOC_FIELDS: dict[str, Any] = {
    "user_id": str, "version": int, "state": str, "created_at": _NUM, "updated_at": _NUM,
    "row_start": (int, type(None)), "num_chunks": int, "n_tokens": int, "content_hash": str,
}
_VERSION_FIELDS: dict[str, Any] = {
    "version": int, "kind": str, "bank_version": int, "committed_at": _NUM, "content_hash": str, "n_tokens": int,
    "num_chunks": int, "row_start": (int, type(None)), "text": str, "crc_content": int, "crc_routing": list,
    "meta": (dict, type(None)),
}
_STATE_FIELDS = ("version", "next_number", "rows", "capacity", "generation", "live_docs", "deleted_docs",
                 "live_chunks", "live_tokens")


def _json(raw: bytes, what: str) -> Any:
    """A record's JSON, or BankCorruptedError naming the record (a flipped byte: bad UTF-8 or bad JSON)."""
    try:
        return json.loads(raw)
    except UnicodeDecodeError as err:
        raise BankCorruptedError(f"{what} is damaged: not valid UTF-8 at byte {err.start}") from None
    except ValueError as err:
        raise BankCorruptedError(f"{what} is damaged: not valid JSON ({err})") from None


def _fields(obj: Any, spec: dict[str, Any], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict) or set(obj) != set(spec):
        raise BankCorruptedError(f"{what} is damaged: fields {sorted(obj) if isinstance(obj, dict) else type(obj).__name__}")
    for k, t in spec.items():
        if not isinstance(obj[k], t) or isinstance(obj[k], bool):
            raise BankCorruptedError(f"{what} is damaged: field {k!r} is {obj[k]!r:.40}")
    return obj


def decode_doc(raw: bytes, number: int) -> dict[str, Any]:
    """The `docs` record of document #number, checked field by field (BankCorruptedError if damaged)."""
    what = f"the record of document #{number}"
    d = _fields(_json(raw, what), _DOC_FIELDS, what)
    if d["state"] not in ("live", "deleted") or d["version"] < 1 or d["num_chunks"] < 0 or d["n_tokens"] < 0:
        raise BankCorruptedError(f"{what} is damaged: state {d['state']!r:.20}, version {d['version']}")
    return d


def decode_version(raw: bytes, number: int, version: int) -> VersionRecord:
    """Version record `version` of document #number, checked field by field (BankCorruptedError if damaged)."""
    what = f"version record {version} of document #{number}"
    d = _fields(_json(raw, what), _VERSION_FIELDS, what)
    if d["kind"] not in ("upsert", "delete") or d["version"] != version or not all(
        isinstance(c, int) for c in d["crc_routing"]
    ):
        raise BankCorruptedError(f"{what} is damaged: kind {d['kind']!r:.20}, version {d['version']}")
    return VersionRecord.from_dict(d)


def decode_state(raw: bytes) -> State:
    what = "the bank's state record"
    d = _json(raw, what)
    if not isinstance(d, dict) or set(d) != set(_STATE_FIELDS) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in d.values()
    ):
        raise BankCorruptedError(f"{what} is damaged: {str(d)[:120]}",
                                 hint="the bank cannot be read; rebuild it from the source corpus "
                                      "(`msabank init` a new bank, then `msabank ingest` the corpus)")
    return State(**d)


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
            raw = txn.get(b"state", db=idx.db("meta"))
            if raw is None:
                txn.abort()
                raise BankCorruptedError(f"bank {bank.path}: the index has no state record")
            try:
                state = decode_state(bytes(raw))
            except BankCorruptedError:
                txn.abort()
                raise
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
            gen_dir(bank.path, state.generation), bank.geometry, bank._content_chunk_rows, bank._routing_chunk_rows
        )

    @staticmethod
    def _lock_generation(root: Path, generation: int) -> int | None:
        """A shared flock on the generation's `.readers` file, or None if that generation is gone."""
        try:
            fd = os.open(gen_dir(root, generation) / ".readers", os.O_RDONLY)
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
        if v is not None and len(v) != 8:
            raise BankCorruptedError(f"the number record of id {user_id!r} is damaged", doc_id=user_id)
        return None if v is None else num_k(v)

    def _doc(self, number: int) -> dict[str, Any] | None:
        v = self._get("docs", k_num(number))
        return None if v is None else decode_doc(v, number)

    def _live(self, user_id: str) -> tuple[int, dict[str, Any]]:
        number = self._number(user_id)
        try:
            d = None if number is None else self._doc(number)
        except BankCorruptedError as err:
            raise BankCorruptedError(f"document {user_id!r}: {err}", doc_id=user_id) from None
        if number is None or d is None or d["state"] != "live":
            raise DocumentNotFoundError(user_id)
        if d["user_id"] != user_id:
            raise BankCorruptedError(f"document {user_id!r}: its record #{number} names {d['user_id']!r:.60}",
                                     doc_id=user_id)
        return number, d

    def _version(self, number: int, version: int) -> VersionRecord:
        v = self._get("versions", k_ver(number, version))
        if v is None:
            raise BankCorruptedError(f"document #{number}: version record {version} is missing")
        return decode_version(v, number, version)

    def _current(self, number: int, d: dict[str, Any]) -> VersionRecord:
        """The current version record of a live document, its text checked against the content hash."""
        uid = str(d["user_id"])
        try:
            vr = self._version(number, d["version"])
        except BankCorruptedError as err:
            raise BankCorruptedError(f"document {uid!r}: {err}", doc_id=uid) from None
        if vr.kind != "upsert" or vr.row_start is None:
            raise BankCorruptedError(f"document {uid!r}: its current version {vr.version} has no rows", doc_id=uid)
        if not (vr.content_hash == d["content_hash"] == content_hash(vr.text)):
            raise BankCorruptedError(f"document {uid!r}: stored text does not match its content hash", doc_id=uid)
        if (vr.num_chunks, vr.n_tokens, vr.row_start) != (d["num_chunks"], d["n_tokens"], d["row_start"]):
            raise BankCorruptedError(f"document {uid!r}: its record and version record disagree", doc_id=uid)
        return vr

    # ------------------------------------------------------------------ records
    def get(self, user_id: str) -> DocumentRecord:
        """The live document `user_id` (DocumentNotFoundError if absent or deleted; BankCorruptedError if
        its records are damaged or its text does not match its content hash)."""
        number, d = self._live(user_id)
        vr = self._current(number, d)
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
                n, ver = ver_k(bytes(k))
                if n != number:
                    break
                try:
                    out.append(decode_version(bytes(v), n, ver))
                except BankCorruptedError as err:
                    raise BankCorruptedError(f"document {user_id!r}: {err}", doc_id=user_id) from None
        return out

    def list(self, *, text: bool = True, damaged: builtins.list[str] | None = None) -> builtins.list[DocumentRecord]:
        """Live documents in number order (with their text unless text=False).

        A damaged record (undecodable, or text=True and the text fails its content hash) raises
        BankCorruptedError, or, when a `damaged` list is given, is skipped and named in it."""
        out = []
        for k, v in self._txn.cursor(db=self._bank._index.db("docs")):
            number = num_k(bytes(k))
            try:
                d = decode_doc(bytes(v), number)
                if d["state"] != "live":
                    continue
                if text:
                    vr = self._current(number, d)
                    out.append(_doc_record(d, number, vr.text, vr.meta))
                else:
                    out.append(_doc_record(d, number, "", None))
            except BankCorruptedError as err:
                if damaged is None:
                    raise
                damaged.append(str(err) if str(err).startswith("document '") else f"document {self._name(number)}: {err}")
        return out

    def user_id(self, number: int) -> str:
        """The id of document #number, cross-checked against the id index (BankCorruptedError if damaged)."""
        d = self._doc(number)
        if d is None:
            raise DocumentNotFoundError(f"#{number}")
        uid = str(d["user_id"])
        if self._get("ids", uid.encode("utf-8")) != k_num(number):
            raise BankCorruptedError(f"the record of document #{number} is damaged: its id {uid!r:.60} is not "
                                     "in the id index under that number", doc_id=uid)
        return uid

    # ------------------------------------------------------------------ tensors
    def tensors(self, user_id: str) -> EncodedMemory:
        """The stored tensors of `user_id`, checksum-checked (BankCorruptedError names the document)."""
        number, d = self._live(user_id)
        vr = self._current(number, d)
        content, routing = self._read_doc(user_id, vr, routing=True, check=True)
        return memory_from_rows(content, routing, self._bank.geometry, vr.n_tokens)

    def _read_doc(
        self,
        user_id: str,
        vr: VersionRecord,
        *,
        routing: bool,
        check: bool,
        cache: dict[tuple[int, int], np.ndarray] | None = None,
    ) -> tuple[np.ndarray, builtins.list[np.ndarray]]:
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
                if len(v) != 16 or len(k) != 8:
                    raise BankCorruptedError(f"bank {self._bank.path}: the row span of document #{num_k(bytes(k))} "
                                             "is damaged")
                s, c = unpack_span(bytes(v))
                spans.append((s, c, num_k(bytes(k))))
            spans.sort()
            arr = np.array(spans, dtype=np.int64).reshape(-1, 3)
            self._row_map = (arr[:, 2].copy(), arr[:, 0].copy(), arr[:, 1].copy())
            self._check_row_map(*self._row_map)
        return self._row_map

    def _check_row_map(self, numbers: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> None:
        """Cheap structural checks of the span table against the state record: a damaged span would
        otherwise give one document another's rows. (verify cross-checks every span with its record.)"""
        st = self.state
        ends = starts + counts
        bad = ""
        if len(numbers) != st.live_docs or int(counts.sum()) != st.live_chunks:
            bad = f"{len(numbers)} spans of {int(counts.sum())} rows, the state says {st.live_docs} documents of " \
                  f"{st.live_chunks} rows"
        elif len(numbers) and (int(starts[0]) < 0 or int(counts.min()) < 1 or int(ends[-1]) > st.rows
                               or bool((ends[:-1] > starts[1:]).any())):
            bad = "spans overlap or lie past the committed rows"
        if bad:
            raise BankCorruptedError(f"bank {self._bank.path}: the row span table is damaged ({bad})",
                                     hint=f"run `msabank verify {self._bank.path}` to name the documents")

    def routing_keys(
        self, layer_index: int, *, damaged: dict[int, str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All live routing keys of router layer `layer_index`: keys (rows, Hkv·D) and row_numbers (rows,) int64.

        Rows are in storage order; `row_numbers[i]` is the document number of row i. Reads the layer's
        chunk files straight into one buffer (two decoding threads). An undecodable chunk raises
        BankCorruptedError naming the documents in it, or, when a `damaged` dict is given, its rows are
        zeros and each of those documents is added to it (number -> reason): the caller must not route to them.
        """
        g = self._bank.geometry
        if not 0 <= layer_index < g.num_router_layers:
            raise IndexError(f"router layer index {layer_index} out of range 0..{g.num_router_layers - 1}")
        numbers, starts, counts = self.row_map()
        total = int(counts.sum())
        arr = self.gen.routing[layer_index]
        bad_chunks: list[ChunkReadError] | None = [] if damaged is not None else None
        try:
            with ThreadPoolExecutor(2) as pool:
                buf = self.gen.read_all(arr, self.state.rows, pool, bad=bad_chunks)
        except ChunkReadError as err:
            bad = [self._name(int(n)) for n in self._numbers_in(err.rows)]
            raise BankCorruptedError(
                f"routing keys: {err} (documents {', '.join(bad[:5])}{', …' if len(bad) > 5 else ''})",
                doc_id=self.user_id(self._numbers_in(err.rows)[0]) if bad and not bad[0].startswith("#") else None,
            ) from None
        for err in bad_chunks or ():
            for n in self._numbers_in(err.rows):
                assert damaged is not None
                damaged.setdefault(int(n), f"document {self._name(int(n))}: routing keys: {err}")
        row_numbers = np.repeat(numbers, counts)
        if total != self.state.rows:  # garbage rows awaiting compaction: gather the live ones
            rows = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(total)
            buf = buf[rows]
        elif len(starts) and not np.array_equal(starts, np.concatenate([[0], np.cumsum(counts)[:-1]])):
            raise BankCorruptedError(f"bank {self._bank.path}: live spans overlap")  # pragma: no cover
        return from_stored(buf, g.dtype), torch.from_numpy(row_numbers)

    def _numbers_in(self, rows: tuple[int, int]) -> builtins.list[int]:
        """Live document numbers with a row in [lo, hi)."""
        lo, hi = rows
        numbers, starts, counts = self.row_map()
        return [int(n) for n, s, c in zip(numbers, starts, counts) if s < hi and s + c > lo]

    def _name(self, number: int) -> str:
        """`'id'` of a document for messages, or `#number` when its record cannot be read."""
        try:
            return repr(self.user_id(number))
        except (BankCorruptedError, DocumentNotFoundError):  # the slow path: the id index, searched
            key = k_num(number)
            for k, v in self._txn.cursor(db=self._bank._index.db("ids")):
                if bytes(v) == key:
                    return repr(bytes(k).decode("utf-8", "replace"))
            return f"#{number}"

    def content_kv(
        self,
        numbers: Iterable[int],
        *,
        pin: bool = False,
        check: bool = True,
        damaged: dict[int, str] | None = None,
    ) -> dict[int, torch.Tensor]:
        """Content K/V of each document number: (C, R, 2, Hkv, D) on CPU (pinned if asked and CUDA exists).

        Each document is one contiguous row range; rows are checksum-checked unless check=False, and the
        document's text against its content hash. A damaged document raises BankCorruptedError naming it,
        or, when a `damaged` dict is given, is left out of the result and added to it (number -> reason).
        """
        out: dict[int, torch.Tensor] = {}
        wanted: list[tuple[int, int, str, VersionRecord]] = []
        for n in sorted(set(int(x) for x in numbers)):
            try:
                d = self._doc(n)
                if d is None or d["state"] != "live":
                    raise DocumentNotFoundError(f"#{n}" if d is None else str(d["user_id"]))
                vr = self._current(n, d)
            except BankCorruptedError as err:
                if damaged is None:
                    raise
                damaged[n] = str(err) if str(err).startswith("document '") else f"document {self._name(n)}: {err}"
                continue
            assert vr.row_start is not None
            wanted.append((vr.row_start, n, str(d["user_id"]), vr))
        wanted.sort()
        cache: dict[tuple[int, int], np.ndarray] = {}
        do_pin = pin and torch.cuda.is_available()
        for _, n, uid, vr in wanted:
            try:
                content, _ = self._read_doc(uid, vr, routing=False, check=check, cache=cache)
            except BankCorruptedError as err:
                if damaged is None:
                    raise
                damaged[n] = str(err)
                continue
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
            for k, v in cur:
                what = f"the change record of bank version {num_k(bytes(k))}"
                ch = _json(bytes(v), what)
                if not isinstance(ch, dict) or not all(
                    isinstance(n, int) for n in [*ch.get("upserted", ()), *ch.get("deleted", ())]
                ):
                    raise BankCorruptedError(f"{what} is damaged")
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
