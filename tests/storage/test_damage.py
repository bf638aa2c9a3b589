"""Damage inside a committed bank (a byte changed in the LMDB file or in one Zarr chunk): `verify` names it,
reads refuse or skip exactly the damaged documents, and re-ingesting the source repairs what it can."""

from __future__ import annotations

from pathlib import Path

import _helpers as H
import pytest

from msabank.errors import BankCorruptedError
from msabank.storage import Bank

DOCS = [(f"doc{i}", f"Document number {i} tells of the lighthouse on cape {i}. " * (1 + i % 3)) for i in range(8)]


def _bank(tmp_path: Path) -> Path:
    path = tmp_path / "bank"
    with H.create(path, content_chunk_rows=4, routing_chunk_rows=4) as b:
        H.put(b, DOCS)
    return path


def _patch_mdb(path: Path, old: bytes, new: bytes) -> None:
    """Overwrite the one occurrence of `old` in the closed bank's LMDB file (same length)."""
    assert len(old) == len(new)
    f = path / "index" / "data.mdb"
    raw = f.read_bytes()
    assert raw.count(old) == 1, (old, raw.count(old))
    f.write_bytes(raw.replace(old, new))


def test_text_changed_in_the_lmdb_file_fails_verify_and_is_repaired_by_reingest(tmp_path: Path) -> None:
    path = _bank(tmp_path)
    uid, text = DOCS[3]
    _patch_mdb(path, text[:30].encode(), text[:30].upper().encode())
    with Bank.open(path) as b:
        rep = b.verify()
        assert not rep.ok and rep.corrupted == ("doc3",), rep.problems
        assert any("doc3" in p and "content hash" in p for p in rep.problems)
        with pytest.raises(BankCorruptedError, match="'doc3': stored text does not match its content hash"):
            b.get("doc3")
        assert {p.user_id: p.action for p in b.plan(DOCS)}["doc3"] == "update"  # not "unchanged": repaired
        r = H.put(b, DOCS)
        assert (r.updated, r.unchanged) == (1, 7)
        assert b.verify().ok
        H.check_doc(b, uid, text)


@pytest.mark.parametrize("record", ["docs", "versions"])
def test_undecodable_record_is_a_named_problem(tmp_path: Path, record: str) -> None:
    path = _bank(tmp_path)
    if record == "docs":  # a flipped byte in the id inside the document record: not UTF-8 any more
        _patch_mdb(path, b'"user_id":"doc5"', b'"user_id":"doc\xb5"')
    else:
        _patch_mdb(path, b'"text":"Document number 5', b'"text":"\xffocument number 5')
    with Bank.open(path) as b:
        rep = b.verify()
        assert not rep.ok and rep.corrupted == ("doc5",), rep.problems
        assert any("damaged" in p and "UTF-8" in p for p in rep.problems), rep.problems
        with pytest.raises(BankCorruptedError, match="doc5|#5"):
            b.list()
        damaged: list[str] = []
        assert [r.user_id for r in b.list(damaged=damaged)] == [u for u, _ in DOCS if u != "doc5"]
        assert len(damaged) == 1 and "doc5" in damaged[0], damaged
        with pytest.raises(BankCorruptedError, match="doc5"):
            b.get("doc5")
        H.check_doc(b, "doc4", DOCS[4][1])


def test_damaged_content_chunk_skips_only_its_documents(tmp_path: Path) -> None:
    path = _bank(tmp_path)
    with Bank.open(path) as b, b.snapshot() as s:
        numbers, starts, counts = s.row_map()
        chunk = s.gen.content.chunk_file(1)  # rows 4..7
        hit = {int(n) for n, a, c in zip(numbers, starts, counts) if a < 8 and a + c > 4}
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    chunk.write_bytes(raw)
    with Bank.open(path, readonly=True) as b, b.snapshot() as s:
        all_numbers = [int(n) for n in s.row_map()[0]]
        with pytest.raises(BankCorruptedError):
            s.content_kv(all_numbers)
        damaged: dict[int, str] = {}
        kv = s.content_kv(all_numbers, damaged=damaged)
        # the flip garbles the rows of one Blosc block: at least one document of that chunk, never another
        assert damaged and set(damaged) <= hit and set(kv) == set(all_numbers) - set(damaged)
        assert all(s.user_id(n) in damaged[n] for n in damaged)
        assert set(b.verify().corrupted) == {s.user_id(n) for n in damaged}


def test_undecodable_routing_chunk_marks_its_documents(tmp_path: Path) -> None:
    path = _bank(tmp_path)
    with Bank.open(path) as b, b.snapshot() as s:
        numbers, starts, counts = s.row_map()
        chunk = s.gen.routing[2].chunk_file(0)  # rows 0..3
        hit = {int(n) for n, a, c in zip(numbers, starts, counts) if a < 4}
    chunk.write_bytes(chunk.read_bytes()[:-7])  # truncated: cannot be decoded
    with Bank.open(path, readonly=True) as b, b.snapshot() as s:
        with pytest.raises(BankCorruptedError, match=r"routing/2 chunk 0 \(rows 0..3\).*'doc0'"):
            s.routing_keys(2)
        damaged: dict[int, str] = {}
        keys, rows = s.routing_keys(2, damaged=damaged)
        assert set(damaged) == hit and keys.shape[0] == rows.shape[0] == int(counts.sum())
        s.routing_keys(1, damaged=damaged)  # other layers read normally
        assert set(damaged) == hit
