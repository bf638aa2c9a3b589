"""Bank writes: number planning, upserts and deletes as one atomic change, and the LMDB commit.

*Data first, pointer last*: new tensor rows are appended past the committed rows of the current Zarr
generation and fsynced, then one LMDB transaction publishes their records, spans, change-log entry and the
new `state` pointer. A crash before the commit leaves only rows past the pointer, which the next writer
open reclaims (maintenance.reclaim). Document numbers are never reused.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import lmdb
import numpy as np

from msabank.errors import BankCorruptedError, InputError
from msabank.storage.codec import crc32c, stored_rows
from msabank.storage.lmdb_index import Index, enc, k_num, k_ver, pack_span
from msabank.storage.records import Action, DocumentWrite, Planned, VersionRecord, WriteReport, content_hash
from msabank.storage.tensors import ChunkReadError

if TYPE_CHECKING:
    from msabank.storage.bank import Bank
    from msabank.storage.snapshot import Snapshot


def plan_items(bank: Bank, items: Iterable[tuple[str, str]], first_number: int = 0) -> list[Planned]:
    """`Bank.plan`: each (user_id, text) with its number and action; nothing is written. New ids are
    numbered from max(the bank's next free number, `first_number`)."""
    out: list[Planned] = []
    seen: set[str] = set()
    with bank.snapshot() as s:
        nxt = max(s.state.next_number, first_number)
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
            d = _existing(s, user_id, number)
            action: Action
            if d["state"] != "live":
                action = "add"
            elif _unchanged(s, number, d, h):
                action = "unchanged"
            else:
                action = "update"
            out.append(Planned(user_id, number, h, action, text))
    return out


def write_docs(bank: Bank, docs: Sequence[DocumentWrite], delete: Sequence[str] = ()) -> WriteReport:
    """`Bank.write`: commit upserts and deletes as one atomic change (data first, pointer last)."""
    bank._check_writable()
    g = bank.geometry
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
    with bank.snapshot() as s:
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
            d = None if existing is None else _existing(s, dw.user_id, existing)
            if existing is not None:
                if dw.number != existing:
                    raise InputError(
                        f"document {dw.user_id!r} has number {existing}, not {dw.number}", hint="use Bank.plan"
                    )
                assert d is not None
                if d["state"] == "live" and _unchanged(s, existing, d, dw.content_hash):
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
            content, routing = stored_rows(dw, g)
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
            try:
                capacity = s.gen.append(
                    st.rows, st.capacity, np.concatenate(contents), [np.concatenate(r) for r in routings]
                )
            except ChunkReadError as err:  # the committed tail chunk an append rewrites cannot be read back
                lo, hi = err.rows
                numbers, starts, counts = s.row_map()
                bad = [s.user_id(int(n)) for n, a, c in zip(numbers, starts, counts) if a < hi and a + c > lo]
                raise BankCorruptedError(
                    f"bank {bank.path}: cannot append after a damaged chunk: {err} (documents {bad[:5]})",
                    doc_id=bad[0] if bad else None,
                    hint="nothing was written; delete the documents named, run `msabank compact` (it rewrites "
                    "the chunk), then ingest them again",
                ) from None
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
    commit(bank._index, puts, dels)  # pointer last
    return WriteReport(added, updated, unchanged, len(deleted), version)


def _existing(s: Snapshot, user_id: str, number: int) -> dict[str, Any]:
    """The record of an existing id; a damaged one cannot be written over (BankCorruptedError names it)."""
    try:
        d = s._doc(number)
    except BankCorruptedError as err:
        raise BankCorruptedError(
            f"document {user_id!r}: {err}", doc_id=user_id,
            hint="its record cannot be read, so it cannot be rewritten in place; rebuild the bank from the source: "
                 "`msabank init NEW`, then `msabank ingest NEW CORPUS`",
        ) from None
    if d is None or d["user_id"] != user_id:
        raise BankCorruptedError(f"document {user_id!r}: the id index points at record #{number}, which "
                                 f"{'is missing' if d is None else 'names another id'}", doc_id=user_id)
    return d


def _unchanged(s: Snapshot, number: int, d: dict[str, Any], h: str) -> bool:
    """Same content hash *and* a stored text that still matches it: a damaged text is rewritten (repaired)
    by re-ingesting the original, not skipped as unchanged."""
    if d["content_hash"] != h:
        return False
    try:
        s._current(number, d)
    except BankCorruptedError:
        return False
    return True


def commit(idx: Index, puts: list[tuple[str, bytes, bytes]], dels: list[tuple[str, bytes]]) -> None:
    """Apply record deletes, then puts, in one LMDB write transaction (the pointer-last step)."""

    def apply(txn: lmdb.Transaction) -> None:
        for db, k in dels:
            txn.delete(k, db=idx.db(db))
        for db, k, v in puts:
            txn.put(k, v, db=idx.db(db))

    idx.write(apply)


def _check_id_text(user_id: str, text: str) -> None:
    if not isinstance(user_id, str) or not user_id:
        raise InputError(f"document id must be a non-empty string, got {user_id!r}")
    if len(user_id.encode("utf-8")) > 500:
        raise InputError(f"document id {user_id[:40]!r}… is longer than 500 bytes (LMDB key limit)")
    if not isinstance(text, str):
        raise InputError(f"document {user_id!r}: text must be a string")
