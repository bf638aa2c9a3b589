"""Corpus readers: good input in every format, and each malformed input named by file and line/row."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from msabank.errors import InputError
from msabank.storage.readers import count_records, read_corpus

DOCS = [(f"doc-{i}", f"text number {i} é") for i in range(25)]


def _jsonl(path: Path, rows: list[dict[str, object]] | None = None) -> Path:
    rows = rows if rows is not None else [{"id": u, "text": t, "extra": 1} for u, t in DOCS]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _all(path: Path, **kw: object) -> list[tuple[str, str]]:
    return [x for b in read_corpus(path, batch_size=10, **kw) for x in b]  # type: ignore[arg-type]


def test_formats_roundtrip(tmp_path: Path) -> None:
    assert _all(_jsonl(tmp_path / "c.jsonl")) == DOCS
    batches = list(read_corpus(_jsonl(tmp_path / "c.jsonl"), batch_size=10))
    assert [len(b) for b in batches] == [10, 10, 5]
    pq.write_table(pa.table({"key": [u for u, _ in DOCS], "body": [t for _, t in DOCS]}), tmp_path / "c.parquet")
    assert _all(tmp_path / "c.parquet", id_field="key", text_field="body") == DOCS
    (tmp_path / "c.csv").write_text("id,text\n" + "".join(f'{u},"{t}"\n' for u, t in DOCS), encoding="utf-8")
    assert _all(tmp_path / "c.csv") == DOCS
    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha")
    (folder / "sub" / "b.md").write_text("# beta")
    (folder / "skip.bin").write_bytes(b"\0")
    assert _all(folder) == [("a.txt", "alpha"), ("sub/b.md", "# beta")]
    assert [count_records(tmp_path / n) for n in ("c.jsonl", "c.parquet", "c.csv")] == [25, 25, 25]
    assert count_records(folder) == 2 and count_records(tmp_path / "c.jsonl", fmt="jsonl") == 25
    # integer ids in JSONL become strings
    assert _all(_jsonl(tmp_path / "i.jsonl", [{"id": 7, "text": "seven"}])) == [("7", "seven")]


@pytest.mark.parametrize(
    ("content", "line", "match"),
    [
        (b'{"id": "a", "text": "x"}\n{"id": "b", "text": \n{"id": "c", "text": "z"}\n', 2, "bad JSON"),
        (b'{"id": "a", "text": "x"}\n{"id": "b"}\n', 2, "missing text field"),
        (b'{"id": "a", "text": "x"}\n{"id": "b", "text": "caf\xe9"}\n', 2, "UTF-8"),
        (b'{"id": "a", "text": "x"}\n{"id": "b", "text": "  "}\n', 2, "empty text"),
        (b'{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n{"id": "a", "text": "z"}\n', 3, "duplicate id 'a'"),
        (b'{"id": "a", "text": "x"}\n{"text": "y"}\n', 2, "missing or empty id"),
        (b'{"id": {"k": 1}, "text": "x"}\n{"id": {"k": 2}, "text": "y"}\n', 1, "string or an integer, not dict"),
        (b'{"id": 1.5, "text": "x"}\n', 1, "string or an integer, not float"),
        (b'{"id": true, "text": "x"}\n', 1, "string or an integer, not bool"),
    ],
    ids=["bad-json", "missing-text", "non-utf8", "empty-text", "duplicate-id", "missing-id", "dict-id", "float-id",
         "bool-id"],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, content: bytes, line: int, match: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=match) as ei:
        list(read_corpus(path))
    assert (ei.value.path, ei.value.line) == (str(path), line)
    assert str(ei.value).startswith(f"{path}:{line}: ")


def test_no_partial_batch(tmp_path: Path) -> None:
    """Only whole valid batches are yielded; the batch holding the bad line never is (a whole pyarrow block
    is validated at once, so the error may come before earlier batches of that block are yielded)."""
    rows: list[dict[str, object]] = [{"id": u, "text": t} for u, t in DOCS]
    rows[14] = {"id": "doc-14"}
    got: list[list[tuple[str, str]]] = []
    with pytest.raises(InputError) as ei:
        for b in read_corpus(_jsonl(tmp_path / "c.jsonl", rows), batch_size=10):
            got.append(b)
    assert [len(b) for b in got] in ([], [10]) and ei.value.line == 15


def test_csv_parquet_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_bytes(b"id,text\na,ok\nb,\nc,fine\n")
    with pytest.raises(InputError, match="empty text") as ei:
        list(read_corpus(tmp_path / "c.csv"))
    assert ei.value.line == 3
    (tmp_path / "d.csv").write_bytes(b"id,text\na,ok\na,again\n")
    with pytest.raises(InputError, match="duplicate") as ei:
        list(read_corpus(tmp_path / "d.csv"))
    assert ei.value.line == 3
    (tmp_path / "u.csv").write_bytes(b"id,text\na,ok\nb,caf\xe9\n")
    with pytest.raises(InputError, match="UTF-8") as ei:
        list(read_corpus(tmp_path / "u.csv"))
    assert ei.value.line == 3
    pq.write_table(pa.table({"id": ["a", "b", None], "text": ["x", "y", "z"]}), tmp_path / "p.parquet")
    with pytest.raises(InputError, match="missing or empty id") as ei:
        list(read_corpus(tmp_path / "p.parquet"))
    assert ei.value.line == 3
    pq.write_table(pa.table({"id": ["a"], "body": ["x"]}), tmp_path / "q.parquet")
    with pytest.raises(InputError, match="missing field 'text'"):
        list(read_corpus(tmp_path / "q.parquet"))
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.txt").write_text("fine")
    (folder / "b.txt").write_bytes(b"line one\nbad \xff byte")
    with pytest.raises(InputError, match="UTF-8") as ei:
        list(read_corpus(folder))
    assert ei.value.path == str(folder / "b.txt") and ei.value.line == 2
    (folder / "b.txt").write_text("   \n")
    with pytest.raises(InputError, match="empty"):
        list(read_corpus(folder))
