"""A damaged bank through the CLI: a flipped byte in an LMDB record or in a Zarr chunk gives named problems
(never a traceback), `ls` lists the rest, and `verify --repair CORPUS` restores a clean bank."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from _cli import run



@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, golden: Path) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("damaged")
    docs = json.loads((golden / "cases" / "p4" / "memory_docs.json").read_text())
    corpus = d / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"doc{i}", "text": t}) + "\n" for i, t in enumerate(docs)))
    run("init", d / "bank", "--model", golden / "tiny-msa")
    run("ingest", d / "bank", corpus)
    return d / "bank", corpus


@pytest.fixture()
def bank(clean: tuple[Path, Path], tmp_path: Path) -> Path:
    shutil.copytree(clean[0], tmp_path / "bank")
    return tmp_path / "bank"


def _patch_mdb(bank: Path, old: bytes, new: bytes) -> None:
    f = bank / "index" / "data.mdb"
    raw = f.read_bytes()
    assert raw.count(old) == 1 and len(old) == len(new)
    f.write_bytes(raw.replace(old, new))


def test_flipped_byte_in_a_record_is_named_by_verify_ls_show(bank: Path, clean: tuple[Path, Path]) -> None:
    _patch_mdb(bank, b'"user_id":"doc2"', b'"user_id":"doc\xb2"')  # not UTF-8 any more
    res = run("verify", bank, ok=False)
    assert res.exit_code == 1 and "document 'doc2': the record of document #2 is damaged: not valid UTF-8" in res.stderr
    assert "--repair CORPUS" in res.stderr
    res = run("ls", bank, "--json")
    assert [r["id"] for r in json.loads(res.stdout)] == ["doc0", "doc1", "doc3", "doc4", "doc5"]
    assert "warning: skipped damaged document 'doc2'" in res.stderr
    res = run("show", bank, "doc2", ok=False)
    assert res.exit_code == 1 and "error: document 'doc2': the record of document #2 is damaged" in res.stderr
    assert json.loads(run("show", bank, "doc3", "--json").stdout)["document"]["user_id"] == "doc3"


def test_changed_text_fails_verify_and_repair_rewrites_it(bank: Path, clean: tuple[Path, Path]) -> None:
    text = json.loads(run("show", bank, "doc1", "--json").stdout)["document"]["text"]
    _patch_mdb(bank, text[:24].encode(), text[:24].swapcase().encode())
    res = run("verify", bank, ok=False)
    assert "document 'doc1': stored text does not match its content hash" in res.stderr
    assert "does not match its content hash" in run("show", bank, "doc1", ok=False).stderr
    rep = json.loads(run("verify", bank, "--repair", clean[1], "--json").stdout)
    assert rep["ok"] and rep["repair"]["ingest"]["updated"] == 1 and rep["repair"]["deleted"] == []
    assert json.loads(run("show", bank, "doc1", "--json").stdout)["document"]["text"] == text


def test_repair_restores_a_bank_with_a_damaged_chunk(bank: Path, clean: tuple[Path, Path]) -> None:
    before = run("ls", bank, "--json").stdout
    chunk = sorted((bank / "tensors").glob("gen-*/content/c.*"))[0]
    chunk.write_bytes(chunk.read_bytes()[:-9])  # truncated: cannot be decoded
    bad = json.loads(run("verify", bank, "--json", ok=False).stdout)["report"]["corrupted"]
    assert bad
    res = run("verify", bank, "--repair", clean[1])
    assert f"repair: deleted {len(bad)} damaged documents, then added {len(bad)}" in res.stdout
    assert "checked 6 documents" in res.stdout and ": ok" in res.stdout
    after = json.loads(run("ls", bank, "--json").stdout)
    assert [(r["id"], r["number"]) for r in after] == [(r["id"], r["number"]) for r in json.loads(before)]
    # a second repair of the clean bank changes nothing
    rep = json.loads(run("verify", bank, "--repair", clean[1], "--json").stdout)["repair"]
    assert rep["deleted"] == [] and rep["ingest"]["unchanged"] == 6


def test_progress_lines_when_stderr_is_not_a_terminal(golden: Path, clean: tuple[Path, Path], tmp_path: Path) -> None:
    run("init", tmp_path / "b", "--model", golden / "tiny-msa")
    res = run("ingest", tmp_path / "b", clean[1], "--batch-size", "2", env={"MSABANK_PROGRESS_SECONDS": "0"})
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("ingest: ")]
    assert [ln.split(" docs")[0] for ln in lines] == ["ingest: 2/6", "ingest: 4/6", "ingest: 6/6"], res.stderr
    assert "tok/s" in lines[0] and "ETA" in lines[0] and "ETA" not in lines[-1]
    res = run("ingest", tmp_path / "b", clean[1], "--batch-size", "4")  # default interval: only the last line
    assert [ln.split(" docs")[0] for ln in res.stderr.splitlines() if ln.startswith("ingest: ")] == ["ingest: 6/6"]


def _damage_doc3(bank: Path) -> None:
    """doc3's content checksum no longer matches its rows: what one flipped byte in a content chunk does to
    each document in it (a chunk of this tiny geometry holds every document, so the checksum is changed)."""
    raw = (bank / "index" / "data.mdb").read_bytes()
    text = json.loads(run("show", bank, "doc3", "--json").stdout)["document"]["text"]
    at = raw.index(json.dumps(text, ensure_ascii=False)[:40].encode())  # the version record holds the text...
    m = re.compile(rb'"crc_content":(\d)').search(raw, at)  # ...and its checksum right after it
    assert m is not None
    digit = raw[m.start(1)]
    raw = raw[: m.start(1)] + bytes([digit ^ 1 if digit != 0x39 else 0x38]) + raw[m.start(1) + 1 :]
    (bank / "index" / "data.mdb").write_bytes(raw)


def test_ask_and_retrieve_skip_damaged_documents(bank: Path, clean: tuple[Path, Path]) -> None:
    text1 = json.loads(run("show", bank, "doc1", "--json").stdout)["document"]["text"]
    _damage_doc3(bank)
    _patch_mdb(bank, text1[:24].encode(), text1[:24].swapcase().encode())
    bad = set(json.loads(run("verify", bank, "--json", ok=False).stdout)["report"]["corrupted"])
    assert bad == {"doc1", "doc3"}
    res = run("retrieve", bank, "Who kept the lighthouse?", "--json")  # the bank still serves the rest
    hits = json.loads(res.stdout)
    assert hits and {h["id"] for h in hits} <= {f"doc{i}" for i in range(6)} - bad
    assert "warning: skipped damaged document 'doc1'" in res.stderr
    assert "warning: skipped damaged document 'doc3'" in res.stderr and "2 damaged document(s)" in res.stderr
    res = run("ask", bank, "Who kept the lighthouse?", "--max-rounds", "1", "--max-new-tokens", "4", "--json",
              ok=False)
    assert res.exit_code in (0, 3), res.output
    ans = json.loads(res.stdout)
    assert len(ans["damaged"]) == 2 and all(d["id"] not in bad for r in ans["rounds"] for d in r["documents"])


def test_engine_skips_damaged_documents_until_they_are_rewritten(bank: Path, clean: tuple[Path, Path]) -> None:
    from msabank.engine import Engine

    _damage_doc3(bank)
    with Engine.open(bank, device="cpu") as eng:
        hits = eng.retrieve("Who kept the lighthouse?")
        assert "doc3" not in {h.id for h in hits} and set(eng.damaged) == {3}
        assert "'doc3'" in eng.damaged[3] and "checksum" in eng.damaged[3]
        text = [json.loads(ln)["text"] for ln in clean[1].read_text().splitlines()][3]
        eng.delete(["doc3"])  # a repair: delete, then add again from the source
        eng.ingest([("doc3", text)])
        eng.retrieve("Who kept the lighthouse?")
        assert eng.damaged == {}
        assert eng.ask("Who kept the lighthouse?", max_rounds=1, max_new_tokens=2).damaged == []
