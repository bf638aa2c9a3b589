"""Bank API: lifecycle errors, plan/write/sync semantics, read paths, corruption, locking, map growth."""

from __future__ import annotations

import json
from pathlib import Path

import _helpers as H
import numpy as np
import pytest
import torch
import zarr

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
from msabank.storage import Bank, DocumentWrite, content_hash
from msabank.storage.lmdb_index import enc


def test_create_open_errors(tmp_path: Path) -> None:
    path = tmp_path / "bank"
    with pytest.raises(BankNotFoundError):
        Bank.open(path)
    H.create(path).close()
    with pytest.raises(BankExistsError):
        H.create(path)
    with pytest.raises(BankModelMismatchError, match="built with model") as ei:
        Bank.open(path, fingerprint="0" * 64)
    assert "new bank" in ei.value.hint
    (tmp_path / "other").mkdir()
    with pytest.raises(BankFormatError):
        Bank.open(tmp_path / "other")
    with Bank.open(path, fingerprint=H.FINGERPRINT) as b:  # format version 2 written by a future release
        b._index.write(lambda txn: txn.put(b"manifest", enc(dict(b._manifest, format_version=2)), db=b._index.db("meta")))
    with pytest.raises(BankFormatError, match="format version 2") as ei:
        Bank.open(path)
    assert ei.value.hint


def test_plan_numbers_and_sync_counts(tmp_path: Path) -> None:
    with H.create(tmp_path / "b") as bank:
        plan = bank.plan([("x", "one"), ("y", "two")])
        assert [(p.number, p.action) for p in plan] == [(0, "add"), (1, "add")]
        assert H.put(bank, [("x", "one"), ("y", "two")]).added == 2
        plan = bank.plan([("x", "one"), ("y", "two!"), ("z", "three")])
        assert [(p.number, p.action) for p in plan] == [(0, "unchanged"), (1, "update"), (2, "add")]
        r = H.put(bank, [("x", "one"), ("y", "two!"), ("z", "three")])
        assert (r.added, r.updated, r.unchanged, r.deleted, r.version) == (1, 1, 1, 0, 2)
        # re-putting unchanged content is a no-op: no new version
        r = H.put(bank, [("x", "one")])
        assert (r.unchanged, r.version) == (1, 2)
        assert bank.get("y").version == 2 and bank.get("y").number == 1
        # sync: the source now has x and z only
        sp = bank.plan_sync([("x", "one"), ("z", "three")])
        assert sp.delete == ("y",)
        r = H.put(bank, [("x", "one"), ("z", "three")], delete=sp.delete)
        assert (r.added, r.updated, r.unchanged, r.deleted) == (0, 0, 2, 1)
        with pytest.raises(DocumentNotFoundError):
            bank.get("y")
        assert [v.kind for v in bank.versions("y")] == ["upsert", "upsert", "delete"]
        # numbers are never reused; a re-added id keeps its number
        assert bank.plan([("w", "new")])[0].number == 3
        assert bank.plan([("y", "back")])[0] .number == 1
        H.put(bank, [("y", "back")])
        assert bank.get("y").number == 1 and bank.get("y").version == 4
        ch = bank.changes_since(2)
        assert ch.upserted_numbers == (1,) and ch.deleted_numbers == () and ch.version == bank.version
        assert bank.changes_since(3).upserted_numbers == (1,)
        assert bank.verify().ok


def test_write_validation_commits_nothing(tmp_path: Path) -> None:
    with H.create(tmp_path / "b") as bank:
        H.put(bank, [("a", "alpha")])
        v = bank.version
        m = H.make_memory(bank.geometry, "beta")
        with pytest.raises(InputError, match="number 0 is taken"):
            bank.write([DocumentWrite("b", 0, "beta", content_hash("beta"), m)])
        with pytest.raises(InputError, match="content_hash"):
            bank.write([DocumentWrite("b", 1, "beta", content_hash("other"), m)])
        bad = H.make_memory(H.Geometry(3, 5, 4, 8, 4, 3), "beta")
        with pytest.raises(InputError, match="bank wants"):
            bank.write([DocumentWrite("b", 1, "beta", content_hash("beta"), bad)])
        with pytest.raises(InputError, match="duplicate"):
            bank.plan([("q", "1"), ("q", "2")])
        with pytest.raises(DocumentNotFoundError):
            bank.write([DocumentWrite("b", 1, "beta", content_hash("beta"), m)], delete=["nope"])
        assert bank.version == v and [r.user_id for r in bank.list()] == ["a"]
        assert bank.verify().ok


def test_real_shapes_roundtrip_and_zarr_compat(tmp_path: Path) -> None:
    g = H.REAL
    texts = [("d0", "a" * 600), ("d1", "b" * 100), ("d2", "c" * 3100)]
    with H.create(tmp_path / "b", g) as bank:
        H.put(bank, texts)
        for uid, text in texts:
            H.check_doc(bank, uid, text)
        kv = bank.content_kv([2, 0])
        for n, (uid, text) in enumerate(texts):
            if n == 1:
                continue
            m = H.make_memory(g, text)
            assert kv[n].shape == (m.num_chunks, 18, 2, 8, 128)
            assert H.same_bits(kv[n][:, :, 0], m.content_k.permute(1, 0, 2, 3))
            assert H.same_bits(kv[n][:, :, 1], m.content_v.permute(1, 0, 2, 3))
        keys, rows = bank.routing_keys(17)
        want = torch.cat([H.make_memory(g, t).routing_keys[17].reshape(-1, 1024) for _, t in texts])
        assert H.same_bits(keys, want)
        assert rows.tolist() == sum(([n] * H.make_memory(g, t).num_chunks for n, (_, t) in enumerate(texts)), [])
        tk, tv = bank.template_prefix()
        ek, ev = H.template(g)
        assert H.same_bits(tk, ek) and H.same_bits(tv, ev)
        gen = bank.path / "tensors" / "gen-000001"
        # any zarr 3 reader sees the same bits
        z = zarr.open_array(str(gen / "content"), mode="r")
        n0 = H.make_memory(g, texts[0][1]).num_chunks
        got = torch.from_numpy(np.asarray(z[:n0]).view(np.int16)).view(torch.bfloat16)
        assert H.same_bits(got, kv[0])
        assert json.loads((gen / "content" / "zarr.json").read_text())["codecs"][1]["configuration"]["cname"] == "zstd"


def test_update_and_delete_keep_routing_map(tmp_path: Path) -> None:
    with H.create(tmp_path / "b", content_chunk_rows=4, routing_chunk_rows=8) as bank:
        H.put(bank, [(f"d{i}", f"doc {i} " * (i + 1)) for i in range(6)])
        H.put(bank, [("d2", "changed " * 9)], delete=("d4",))
        keys, rows = bank.routing_keys(0)
        live = {r.number: r for r in bank.list()}
        assert sorted(set(rows.tolist())) == sorted(live)
        for n, rec in live.items():
            want = H.make_memory(bank.geometry, rec.text).routing_keys[0].reshape(-1, 16)
            assert H.same_bits(keys[rows == n], want)
        before = bank.stats()
        rep = bank.compact()
        assert rep.rows_after == before.live_chunks < rep.rows_before
        keys2, rows2 = bank.routing_keys(0)
        for n in live:
            assert H.same_bits(keys2[rows2 == n], keys[rows == n])
        assert bank.verify().ok
        assert not (bank.path / "tensors" / "gen-000001").exists()


def _flip_byte_in(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("array", ["content", "routing/1"])
def test_flipped_byte_is_detected(tmp_path: Path, array: str) -> None:
    # one row per content chunk and per routing chunk: each chunk file belongs to one document
    with H.create(tmp_path / "b", content_chunk_rows=1, routing_chunk_rows=1) as bank:
        H.put(bank, [("a", "first doc"), ("victim", "second doc, to be damaged"), ("c", "third doc")])
        start = bank.get("victim").row_start
        _flip_byte_in(bank.path / "tensors" / "gen-000001" / array / f"c.{start}{'.0' * (4 if array == 'content' else 1)}")
        rep = bank.verify()
        assert not rep.ok and rep.corrupted == ("victim",)
        assert any("victim" in p for p in rep.problems)
        with pytest.raises(BankCorruptedError, match="victim") as ei:
            bank.tensors("victim")
        assert ei.value.doc_id == "victim"
        if array == "content":
            with pytest.raises(BankCorruptedError, match="victim"):
                bank.content_kv([1])
        H.check_doc(bank, "a", "first doc")  # others still read fine
        with pytest.raises(BankCorruptedError, match="victim"):
            H.put(bank, [("a", "first doc, updated")])
            bank.compact()


def test_append_after_a_damaged_tail_chunk_names_the_documents(tmp_path: Path) -> None:
    """An append rewrites the committed tail chunk; if that cannot be read back, the write is refused cleanly."""
    with H.create(tmp_path / "b", content_chunk_rows=64, routing_chunk_rows=64) as bank:
        H.put(bank, [("a", "first doc"), ("b", "second doc")])  # both in content chunk 0, not yet full
        (chunk,) = (bank.path / "tensors" / "gen-000001" / "content").glob("c.0*")
        chunk.write_bytes(b"not a blosc frame")
        with pytest.raises(BankCorruptedError, match="cannot append after a damaged chunk") as ei:
            H.put(bank, [("c", "third doc")])
        assert ei.value.doc_id in ("a", "b") and "compact" in ei.value.hint
        assert sorted(r.user_id for r in bank.list()) == ["a", "b"]  # nothing committed
    with Bank.open(tmp_path / "b", fingerprint=H.FINGERPRINT) as bank:  # reopens; the repair the hint names works
        bank.delete(["a", "b"])
        bank.compact()
        H.put(bank, [("a", "first doc"), ("c", "third doc")])
        assert bank.verify().ok
        H.check_doc(bank, "c", "third doc")


def test_second_writer_is_locked_out(tmp_path: Path) -> None:
    path = tmp_path / "b"
    with H.create(path) as bank:
        ctx = H.worker_context()
        q = ctx.Queue()
        p = ctx.Process(target=H.try_open_writer, args=(str(path), q))
        p.start()
        msg = q.get(timeout=120)
        p.join()
        assert msg.startswith(f"bank {path} is locked by pid {__import__('os').getpid()}")
        with Bank.open(path, readonly=True) as ro:  # readers are never locked out
            assert ro.version == bank.version
            with pytest.raises(BankReadOnlyError):
                ro.delete(["x"])
    Bank.open(path).close()  # released on close


def test_map_growth(tmp_path: Path) -> None:
    with H.create(tmp_path / "b", map_size=1 << 20) as bank:  # 1 MiB map: must grow
        big = "z" * 200_000
        for i in range(12):
            H.put(bank, [(f"big{i}", big + str(i))])
        assert bank._index.env.info()["map_size"] > 1 << 20
    with Bank.open(tmp_path / "b", map_size=1 << 20) as bank:
        assert bank.get("big11").text.endswith("11") and bank.verify().ok


def test_closed_bank_raises_a_clear_error(tmp_path: Path) -> None:
    from msabank.errors import BankClosedError

    bank = H.create(tmp_path / "b")
    H.put(bank, [("a", "text a")])
    bank.close()
    bank.close()  # idempotent
    for call in (lambda: bank.get("a"), bank.list, bank.stats, bank.verify, lambda: bank.delete(["a"])):
        with pytest.raises(BankClosedError, match="is closed: it was closed") as ei:
            call()
        assert "open_bank" in ei.value.hint


def test_reopening_in_the_same_process_closes_the_earlier_handle(tmp_path: Path) -> None:
    from msabank.errors import BankClosedError

    path = tmp_path / "b"
    first = H.create(path)
    H.put(first, [("a", "text a")])
    with pytest.warns(UserWarning, match="closing the earlier handle"):
        second = Bank.open(path)  # a notebook cell run again: not "locked by pid <our own pid>"
    with pytest.raises(BankClosedError, match="opened for writing again in this process"):
        first.get("a")
    assert second.get("a").text == "text a"
    ro = Bank.open(path, readonly=True)  # readers never close a writer
    assert ro.get("a").text == "text a" and second.get("a").text == "text a"
    ro.close()
    del first  # collecting the closed handle must not unregister or unlock the live one
    import gc

    gc.collect()
    ctx = H.worker_context()
    q = ctx.Queue()
    p = ctx.Process(target=H.try_open_writer, args=(str(path), q))
    p.start()
    assert q.get(timeout=120).startswith(f"bank {path} is locked by pid")
    p.join()
    second.close()


def test_dropping_a_handle_releases_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "b"
    H.create(path).close()
    bank = Bank.open(path)
    H.put(bank, [("a", "text a")])
    del bank  # never closed
    ctx = H.worker_context()
    q = ctx.Queue()
    p = ctx.Process(target=H.try_open_writer, args=(str(path), q))
    p.start()
    assert q.get(timeout=120) == "opened"
    p.join()
