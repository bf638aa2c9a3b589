"""SIGKILL a server in the middle of a batch upsert, restart it on the same bank: what was committed is
there, the killed batch is all-or-nothing, verify passes, and the new server holds the lock again."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from msabank.cli.main import app
from msabank.errors import BankLockedError
from msabank.serve.server import NOTE_FILE, check_bind, read_note, served_by
from msabank.storage.bank import Bank
from tests.serve.conftest import CORPUS, make_bank, start_server


def test_non_loopback_without_a_key_is_refused_before_anything_loads(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["serve", str(tmp_path / "nobank"), "--host", "0.0.0.0"])
    assert res.exit_code == 1 and "not a loopback address and no key is configured" in res.stderr
    check_bind("127.0.0.1", [], [])
    check_bind("::1", [], [])
    check_bind("localhost", [], [])
    check_bind("0.0.0.0", ["k"], [])
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    res = CliRunner().invoke(app, ["serve", str(tmp_path), "--api-key-file", str(empty)])
    assert res.exit_code == 1 and "must hold one key" in res.stderr


def _metric(c: httpx.Client, name: str) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def test_sigkill_during_batch_upsert_then_restart(tmp_path: Path) -> None:
    bank = make_bank(tmp_path / "bank", CORPUS)
    s = start_server(bank, tmp_path / "first.log")
    big = [{"id": f"big-{i}", "text": f"Harbour record {i}: " + "the tide rose over the quay wall. " * 12}
           for i in range(48)]
    with httpx.Client(base_url=s.url, timeout=120) as c:
        committed = c.post("/v1/documents", json={"documents": [{"id": "kept", "text": "a committed document"}]})
        assert committed.json()["version"] == 2
        note = read_note(bank)
        assert note is not None and note["pid"] == s.proc.pid and note["url"] == s.url
        with pytest.raises(BankLockedError, match="served by `msabank serve` at " + s.url):
            try:
                Bank.open(bank)
            except BankLockedError as err:
                raise served_by(bank, err) from None

        replies: list[httpx.Response | BaseException] = []

        def upload() -> None:
            try:
                with httpx.Client(base_url=s.url, timeout=120) as u:
                    replies.append(u.post("/v1/documents", json={"documents": big}))
            except httpx.HTTPError as err:
                replies.append(err)

        t = threading.Thread(target=upload)
        t.start()
        for _ in range(100_000):  # until the engine is inside the write (encoding 48 documents takes a while)
            if replies or _metric(c, "msabank_write_in_progress") == 1:
                break
        s.stop(signal.SIGKILL)
        t.join()
    reply = replies[0]
    acknowledged = isinstance(reply, httpx.Response) and reply.status_code == 200

    with Bank.open(bank, readonly=True) as b:  # storage alone, no model: what survived the kill
        ids = {r.user_id for r in b.list(text=False)}
        assert b.verify().ok
        version = b.version
    assert "kept" in ids and set(dict(CORPUS)) <= ids
    present = {d["id"] for d in big} & ids
    assert present in (set(), {d["id"] for d in big})  # one atomic commit: all or nothing
    if acknowledged:
        assert present  # a write the client saw acknowledged is durable

    s2 = start_server(bank, tmp_path / "second.log")  # the killed server's stale note and lock are no obstacle
    try:
        with httpx.Client(base_url=s2.url, timeout=120) as c:
            ready = c.get("/ready").json()  # the fixture returned on `ready:`, printed after the index loaded
            assert ready["ready"] and ready["version"] == version and ready["documents"] == len(ids)
            assert ready["index_rows"] == ready["chunks"] > 0
            assert read_note(bank)["pid"] == s2.proc.pid
            assert c.get("/v1/documents/kept").json()["text"] == "a committed document"
            r = c.post("/v1/documents", json={"documents": [{"id": "after", "text": "written after the restart"}]})
            assert r.json()["version"] == version + 1
    finally:
        assert s2.stop() == 0
    assert not (bank / NOTE_FILE).exists()  # a clean exit removes the note and releases the lock
    with Bank.open(bank) as b:
        assert b.get("after").text == "written after the restart"
