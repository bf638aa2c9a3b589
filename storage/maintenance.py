"""Bank maintenance: compaction, verification, and reclaiming what crashed or superseded writes left.

Compaction copies live rows into a new tensor generation and switches to it in one LMDB transaction; the
old generation is removed once no reader holds its `.readers` flock. `reclaim` runs at every writer open:
it drops rows past the committed pointer (a crashed write's data) and unreferenced generations.
`verify` re-reads every live document against its checksums and cross-checks records, spans and counters.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from msabank.errors import BankCorruptedError
from msabank.storage.codec import crc32c
from msabank.storage.lmdb_index import dec, enc, k_num, num_k, pack_span, unpack_span, ver_k
from msabank.storage.records import CompactReport, VerifyReport, VersionRecord
from msabank.storage.snapshot import Snapshot, decode_doc, decode_version
from msabank.storage.state import gen_dir
from msabank.storage.tensors import ChunkReadError, Generation, dir_bytes, fsync_dir, remove_tree
from msabank.storage.write import commit

if TYPE_CHECKING:
    from msabank.storage.bank import Bank

log = logging.getLogger(__name__)

_COPY_BUDGET = 64 << 20  # bytes of content rows per batch in compaction and verify


def reclaim(bank: Bank) -> None:
    """Writer open: drop rows past the committed pointer and unreferenced generations."""
    with bank.snapshot() as s:
        removed = s.gen.reclaim_tail(s.state.rows)
        current = s.state.generation
    if removed:
        log.info("bank %s: reclaimed %d uncommitted tensor files", bank.path, removed)
    remove_stale_generations(bank.path, current)


def remove_stale_generations(root: Path, current: int) -> None:
    """Remove every tensor generation but `current` that no reader holds (those are left for later)."""
    for p in sorted((root / "tensors").glob("gen-*")):
        if p.name == gen_dir(root, current).name:
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
            log.info("bank %s: %s still has readers; removing it later", root, p.name)
            continue
        try:
            (p / ".readers").unlink(missing_ok=True)  # first, so a reader that locks late sees nlink == 0
            shutil.rmtree(p, ignore_errors=True)
        finally:
            if fd is not None:
                os.close(fd)
    fsync_dir(root / "tensors")


def compact(bank: Bank) -> CompactReport:
    """`Bank.compact`: copy live rows into generation N+1, switch to it in one transaction, drop N."""
    bank._check_writable()
    g = bank.geometry
    with bank.snapshot() as s:
        st = s.state
        bytes_before = s.gen.disk_bytes()
        if st.live_chunks == st.rows:
            s.gen.reclaim_tail(st.rows)
            report = CompactReport(st.rows, st.rows, bytes_before, s.gen.disk_bytes(), st.version, st.generation)
            current = st.generation
        else:
            new_no = st.generation + 1
            new_path = gen_dir(bank.path, new_no)
            remove_tree(new_path)
            new = Generation.create(new_path, g, bank._content_chunk_rows, bank._routing_chunk_rows)
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
                    cap, row = _copy_batch(s, new, batch, cap, row, new_start)
                    batch, batch_rows = [], 0
            if batch:
                cap, row = _copy_batch(s, new, batch, cap, row, new_start)
            new.sync()
            fsync_dir(new_path.parent)
            puts: list[tuple[str, bytes, bytes]] = []
            for k, v in s._txn.cursor(db=bank._index.db("versions")):
                number, ver = ver_k(bytes(k))
                vr = VersionRecord.from_dict(dec(bytes(v)))
                if vr.row_start is None:
                    continue
                d = s._doc(number)
                assert d is not None
                live = d["state"] == "live" and d["version"] == ver
                vr2 = replace(vr, row_start=new_start[number] if live else None)
                if vr2.row_start == vr.row_start:
                    continue  # rows before the first garbage row keep their place: no rewrite (LMDB grows
                    # by every record a transaction rewrites, text included, and never shrinks its file)
                puts.append(("versions", bytes(k), enc(vr2.to_dict())))
                if live:
                    puts.append(("docs", k_num(number), enc(dict(d, row_start=new_start[number]))))
                    puts.append(("spans", k_num(number), pack_span(new_start[number], vr.num_chunks)))
            version = st.version + 1
            new_state = replace(st, version=version, rows=row, capacity=cap, generation=new_no)
            puts.append(("changes", k_num(version), enc({"upserted": [], "deleted": [], "compacted": True})))
            puts.append(("meta", b"state", enc(new_state.to_dict())))
            commit(bank._index, puts, [])
            report = CompactReport(st.rows, row, bytes_before, 0, version, new_no)
            current = new_no
    remove_stale_generations(bank.path, current)
    return replace(report, bytes_after=dir_bytes(gen_dir(bank.path, current)))


def _copy_batch(
    s: Snapshot,
    new: Generation,
    batch: list[tuple[int, int, int]],
    cap: int,
    row: int,
    new_start: dict[int, int],
) -> tuple[int, int]:
    """Copy one batch of live spans into `new`, checksum-checking each document: (capacity, next row)."""
    # Each document's own rows, through a chunk cache: a chunk holding only garbage rows (of deleted or
    # superseded versions) is never read, so compaction drops a damaged chunk once its documents are deleted.
    cache: dict[tuple[int, int], np.ndarray] = {}
    try:
        content = np.concatenate([s.gen.read_rows(s.gen.content, st0, st0 + c, cache) for _, st0, c in batch])
        routing = [np.concatenate([s.gen.read_rows(a, st0, st0 + c, cache) for _, st0, c in batch])
                   for a in s.gen.routing]
    except ChunkReadError as err:
        bad = [s._name(int(n)) for n in s._numbers_in(err.rows)]
        raise BankCorruptedError(f"compaction: {err} (documents {', '.join(bad[:5])})",
                                 hint="run `msabank verify` to name every damaged document") from None
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


def verify(bank: Bank) -> VerifyReport:
    """`Bank.verify`: every record decoded and checked (current texts against their content hashes; a
    superseded version's text is history that a repair cannot rewrite, so it is not checked), every live
    document's bytes against its checksums, plus row spans and counters. Never raises for damage: each
    problem is named in the report (documents at fault in `corrupted`)."""
    g = bank.geometry
    problems: list[str] = []
    corrupted: dict[str, None] = {}  # ordered set of user ids (or `#number` when the id is unknown)

    def damaged(name: str, problem: str) -> None:
        corrupted.setdefault(name, None)
        problems.append(problem)

    with bank.snapshot() as s:
        st = s.state
        docs: list[tuple[int, int, str, VersionRecord]] = []
        live = deleted = tokens = chunks = 0
        covered = np.zeros(st.rows, dtype=np.int8)
        names: dict[int, str] = {}  # number -> user id, from the id index
        ids_count = 0
        for k, v in s._txn.cursor(db=bank._index.db("ids")):
            ids_count += 1
            try:
                uid = bytes(k).decode("utf-8")
            except UnicodeDecodeError:
                problems.append(f"id {bytes(k)!r:.80} in the id index is damaged (not UTF-8)")
                continue
            if len(v) != 8:
                damaged(uid, f"document {uid!r}: its number record in the id index is damaged")
                continue
            names[num_k(bytes(v))] = uid
        records: dict[int, dict[str, Any]] = {}
        unreadable: set[int] = set()
        n_docs = 0
        for k, v in s._txn.cursor(db=bank._index.db("docs")):
            n_docs += 1
            number = num_k(bytes(k))
            name = names.get(number, f"#{number}")
            try:
                d = decode_doc(bytes(v), number)
            except BankCorruptedError as err:
                damaged(name, f"document {name!r}: {err}" if number in names else str(err))
                unreadable.add(number)
                continue
            records[number] = d
            if names.get(number) != d["user_id"]:
                damaged(name, f"document #{number}: its record names {d['user_id']!r:.60}, the id index "
                              f"{'has no id for it' if number not in names else repr(names[number])}")
        for number, uid in names.items():
            if number not in records and number not in unreadable:
                damaged(uid, f"document {uid!r}: the id index points at record #{number}, which is missing")
        for k, v in s._txn.cursor(db=bank._index.db("versions")):
            number, ver = ver_k(bytes(k))
            name = names.get(number, f"#{number}")
            try:
                vr = decode_version(bytes(v), number, ver)
            except BankCorruptedError as err:
                damaged(name, f"document {name!r}: {err}")
                continue
            if vr.row_start is not None:
                if vr.row_start < 0 or vr.num_chunks < 0 or vr.row_start + vr.num_chunks > st.rows:
                    damaged(name, f"document {name!r} version {vr.version}: rows past the pointer")
                else:
                    covered[vr.row_start : vr.row_start + vr.num_chunks] += 1
        spans: dict[int, tuple[int, int]] = {}
        for k, v in s._txn.cursor(db=bank._index.db("spans")):
            number = num_k(bytes(k))
            if len(v) != 16:
                damaged(names.get(number, f"#{number}"), f"document #{number}: its row span record is damaged")
                continue
            spans[number] = unpack_span(bytes(v))
        for number, d in records.items():
            uid = str(d["user_id"])
            if d["state"] != "live":
                deleted += 1
                if number in spans:
                    problems.append(f"deleted document {uid!r} still has a live span")
                continue
            live += 1
            try:
                vr = s._current(number, d)
            except BankCorruptedError as err:
                damaged(uid, str(err))
                continue
            if spans.get(number) != (vr.row_start, vr.num_chunks):
                damaged(uid, f"document {uid!r}: span record disagrees with its version record")
                continue
            assert vr.row_start is not None
            tokens += vr.n_tokens
            chunks += vr.num_chunks
            docs.append((vr.row_start, number, uid, vr))
        for number in spans.keys() - records.keys() - unreadable:
            problems.append(f"row span of document #{number} has no document record")
        if ids_count != n_docs:
            problems.append(f"{ids_count} ids but {n_docs} document records")
        if not corrupted and (live, deleted, chunks, tokens) != (
            st.live_docs, st.deleted_docs, st.live_chunks, st.live_tokens
        ):
            problems.append(
                f"counters say {st.live_docs} live/{st.deleted_docs} deleted/{st.live_chunks} chunks/"
                f"{st.live_tokens} tokens, records say {live}/{deleted}/{chunks}/{tokens}"
            )
        if st.next_number <= max(records, default=-1):
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
                    damaged(uid, str(err))
                rows_checked += vr.num_chunks
            i = j
        try:
            for k, v in s._txn.cursor(db=bank._index.db("changes")):
                json.loads(bytes(v))
        except ValueError:  # UnicodeDecodeError is a ValueError
            problems.append(f"the change record of bank version {num_k(bytes(k))} is damaged")
        try:
            if s.gen.content.shape_rows() < st.rows:
                problems.append("content array is shorter than the committed rows")
        except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
            problems.append(f"the content array's zarr.json is damaged ({type(err).__name__})")
        try:
            bank.template_prefix()
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
