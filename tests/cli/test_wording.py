"""Messages a new user tripped over (issue 13): corpus errors name file:line and what to do; hints never
suggest something that then fails or name an internal class; `compact` says why the index grew."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from _cli import run



@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory, golden: Path) -> Path:
    b = tmp_path_factory.mktemp("wording") / "bank"
    run("init", b, "--model", golden / "tiny-msa")
    c = b.parent / "c.jsonl"
    c.write_text("".join(json.dumps({"id": f"d{i}", "text": f"Document {i} about the harbour. " * (4 + 3 * i)}) + "\n"
                         for i in range(4)))
    run("ingest", b, c)
    return b


def _lines(*records: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


CORPORA = {
    "mixed.jsonl": (_lines(*({"id": f"a{i}", "text": "t"} for i in range(5)), {"id": 7, "text": "t"}),
                    "mixed.jsonl:6: field 'id' is a number here but a string on line 1"),
    "mixed2.jsonl": (_lines({"id": 1, "text": "t"}, {"id": "b", "text": "t"}),
                     "mixed2.jsonl:2: field 'id' is a string here but a number on line 1"),
    "dup.jsonl": (_lines(*({"id": "x1" if i in (1, 90) else f"a{i}", "text": "t"} for i in range(100))),
                  "dup.jsonl:91: duplicate id 'x1' (first at line 2)"),
    "badjson.jsonl": ('{"id": "a", "text": "b"}\n{"id": "b" "text": "c"}\n',
                      "badjson.jsonl:2: bad JSON: Expecting ',' delimiter (column 12)"),
    "quote.csv": ('id,text\n1,"hello\n2,world\n3,"again"\n', "quote.csv:2: malformed quoting in the record that starts"),
    "eof.csv": ('id,text\n1,fine\n2,"never closed\n3,more\n4,and more\n', "eof.csv:3: malformed quoting"),
}


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_corpus_errors_name_file_and_line(bank: Path, tmp_path: Path, name: str) -> None:
    text, message = CORPORA[name]
    (tmp_path / name).write_text(text)
    res = run("ingest", bank, tmp_path / name, "--sync", ok=False)
    assert res.exit_code == 1 and message in res.stderr, res.stderr
    assert "at at" not in res.stderr
    assert len(json.loads(run("ls", bank, "--json").stdout)) == 4  # the --sync deleted nothing


def test_quoted_multiline_csv_values_are_still_fine(bank: Path, tmp_path: Path) -> None:
    from msabank.storage.readers import read_corpus

    (tmp_path / "ok.csv").write_text('id,text\n1,"two\nlines, and ""quotes"""\n2,plain\n')
    assert [d for b in read_corpus(tmp_path / "ok.csv") for d in b] == [("1", 'two\nlines, and "quotes"'),
                                                                         ("2", "plain")]


def test_a_folder_that_is_not_a_bank_does_not_suggest_init(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    res = run("stats", tmp_path / "notes", ok=False)
    assert "not an msabank bank" in res.stderr and "create one with" not in res.stderr
    assert "create one with `msabank init" in run("stats", tmp_path / "new", ok=False).stderr


def test_lock_hint_names_the_public_api(bank: Path) -> None:
    fd = os.open(bank / "LOCK", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = run("delete", bank, "d0", ok=False)
    finally:
        os.close(fd)
    assert "is locked by pid" in res.stderr and "msabank.open_bank(path, readonly=True)" in res.stderr
    assert "Bank.open" not in res.stderr


def test_help_describes_every_bench(tmp_path: Path) -> None:
    out = " ".join(run("--help").stdout.split())
    assert "routing and content fetch" in out and "storage" in out and "lifecycle" in out


def test_compact_says_why_the_index_grew(bank: Path, tmp_path: Path) -> None:
    import shutil

    b = tmp_path / "bank"
    shutil.copytree(bank, b)
    run("delete", b, "d0")
    res = run("compact", b)
    assert "tensor bytes" in res.stdout
    rep = json.loads(run("compact", b, "--json").stdout)  # nothing left to compact
    assert rep["rows_before"] == rep["rows_after"] and rep["index_bytes_after"] == rep["index_bytes_before"]
    if "index " in res.stdout:
        assert "LMDB keeps the freed pages" in res.stdout
