"""Corpus readers: JSONL, Parquet, CSV and folders of .txt/.md files, streamed in batches of (id, text).

Built on pyarrow's streaming readers, so memory stays bounded by the block/batch size, not the corpus.
Each batch is validated completely before it is yielded (ids present and non-empty, text present,
non-empty and valid UTF-8, no duplicate id within the batch); a problem raises `InputError` with the
file and line (JSONL/CSV) or row (Parquet), so a caller that commits one batch at a time never commits a
partial batch. Error positions are found by a slow rescan of the file, only on the error path.
This module does not tokenize and does not touch a bank.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from msabank.errors import InputError

Batch = list[tuple[str, str]]
_BLOCK = 4 << 20  # pyarrow block size: 1-4 MiB streams at >1 GB/s in ~200 MB (ENVIRONMENT.md)
FORMATS = ("jsonl", "parquet", "csv", "folder")


def detect_format(path: str | os.PathLike[str]) -> str:
    p = Path(path)
    if p.is_dir():
        return "folder"
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix in (".csv", ".tsv"):
        return "csv"
    raise InputError(f"cannot tell the corpus format from {p.name!r}", path=str(p), hint=f"pass one of {FORMATS}")


def read_corpus(
    path: str | os.PathLike[str],
    *,
    fmt: str | None = None,
    id_field: str = "id",
    text_field: str = "text",
    batch_size: int = 1024,
    extensions: Sequence[str] = (".txt", ".md"),
) -> Iterator[Batch]:
    """Stream a corpus as validated batches of (id, text); the format is detected from the path if None."""
    fmt = fmt or detect_format(path)
    if fmt == "jsonl":
        return read_jsonl(path, id_field=id_field, text_field=text_field, batch_size=batch_size)
    if fmt == "parquet":
        return read_parquet(path, id_field=id_field, text_field=text_field, batch_size=batch_size)
    if fmt == "csv":
        return read_csv(path, id_field=id_field, text_field=text_field, batch_size=batch_size)
    if fmt == "folder":
        return read_folder(path, batch_size=batch_size, extensions=extensions)
    raise InputError(f"unknown corpus format {fmt!r}", hint=f"use one of {FORMATS}")


def count_records(path: str | os.PathLike[str], *, fmt: str | None = None, extensions: Sequence[str] = (".txt", ".md")) -> int:
    """Records in a corpus, cheaply (for progress bars): non-blank lines, Parquet metadata, or files."""
    fmt = fmt or detect_format(path)
    p = Path(path)
    if fmt == "parquet":
        return int(pq.ParquetFile(p).metadata.num_rows)
    if fmt == "folder":
        exts = tuple(e.lower() for e in extensions)
        return sum(1 for _d, _s, files in os.walk(p) for f in files if f.lower().endswith(exts))
    with open(p, "rb") as f:
        n = sum(1 for line in f if line.strip())
    return max(0, n - 1) if fmt == "csv" else n


# ---------------------------------------------------------------------------------------------- validation
def _validate(
    ids: list[object], texts: list[object], path: str, first_row: int, id_field: str, text_field: str, where: _Where
) -> Batch:
    """Check one batch fully; `where(k)` maps the k-th record of the file to its line/row number."""
    out: Batch = []
    seen: dict[str, int] = {}
    for j, (uid, text) in enumerate(zip(ids, texts, strict=True)):
        k = first_row + j
        if uid is None or (isinstance(uid, str) and not uid):
            raise InputError(f"missing or empty id field {id_field!r}", path=path, line=where(k))
        if isinstance(uid, bool) or not isinstance(uid, (str, int)):
            # str() of an object, list or float would store a Python repr ("{'a': 1}", "1e+20") as the id
            raise InputError(
                f"id field {id_field!r} must be a string or an integer, not {type(uid).__name__} {uid!r:.60}",
                path=path, line=where(k),
            )
        uid = str(uid)
        if text is None:
            raise InputError(f"missing text field {text_field!r}", path=path, line=where(k))
        if not isinstance(text, str):
            raise InputError(f"text field {text_field!r} is not a string", path=path, line=where(k))
        if not text.strip():
            raise InputError(f"document {uid!r} has empty text", path=path, line=where(k))
        if uid in seen:
            raise InputError(
                f"duplicate id {uid!r} (first at line {where(seen[uid])})", path=path, line=where(k)
            )
        seen[uid] = k
        out.append((uid, text))
    return out


class _Where:
    """Maps a record index to a 1-based line (text formats: rescans the file) or row (Parquet)."""

    def __init__(self, path: str, kind: str) -> None:
        self.path = path
        self.kind = kind

    def __call__(self, k: int) -> int:
        if self.kind == "row":
            return k + 1
        skip_header = self.kind == "csv"
        n = -1
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if skip_header and lineno == 1:
                    continue
                if raw.strip():
                    n += 1
                    if n == k:
                        return lineno
        return n + 2


def _first_bad_line(path: str, fields: Sequence[str] = ()) -> tuple[int, str] | None:
    """The first line that is not UTF-8 or (for JSONL) not a JSON object, or whose value of one of `fields`
    has another JSON type than on the first line that has it (pyarrow infers one type per column and
    names only a 0-based row of its block), with the reason."""
    jsonl = not path.lower().endswith((".csv", ".tsv"))
    first_type: dict[str, tuple[str, int]] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return lineno, f"not valid UTF-8 ({err.reason} at byte {err.start})"
            if jsonl and line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    return lineno, f"bad JSON: {err.msg} (column {err.colno})"
                if not isinstance(obj, dict):
                    return lineno, "a JSON line must be an object"
                for field in fields:
                    if obj.get(field) is None:
                        continue
                    kind = _json_kind(obj[field])
                    seen = first_type.setdefault(field, (kind, lineno))
                    if seen[0] != kind:
                        return lineno, (f"field {field!r} is {kind} here but {seen[0]} on line {seen[1]}: every "
                                        f"line must give {field!r} the same type (write integer ids as strings, "
                                        'e.g. "7")')
    return None


def _json_kind(v: object) -> str:
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    return "an array" if isinstance(v, list) else "an object"


def _arrow_error(path: str, err: Exception, fields: Sequence[str] = ()) -> InputError:
    bad = _first_bad_line(path, fields)
    if bad is not None:
        return InputError(bad[1], path=path, line=bad[0])
    return InputError(f"cannot read: {err}", path=path)


def check_csv_quotes(path: str, delimiter: str = ",") -> None:
    """A full scan with Python's csv module in strict mode: an unterminated or stray quote is an InputError
    naming the line its record starts on. (pyarrow takes an unterminated quote as one value that runs to
    the next quote or the end of the file: a whole corpus silently became one document.)"""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        start = 1
        try:
            for _row in reader:
                start = reader.line_num + 1
        except csv.Error as err:
            where = f" (found at line {reader.line_num})" if reader.line_num != start else ""
            raise InputError(f"malformed quoting in the record that starts here: {err}{where}", path=path,
                             line=start, hint='a field that starts with " must end with " (write " inside a quoted '
                                              'field as "")') from None


def _columns(table: pa.RecordBatch | pa.Table, path: str, id_field: str, text_field: str, first: int, where: _Where) -> Batch:
    names = table.schema.names
    n = table.num_rows
    for f in (id_field, text_field):
        if f not in names:
            raise InputError(f"missing field {f!r} (fields: {names[:10]})", path=path, line=where(first) if n else None)
    try:
        ids, texts = table.column(id_field).to_pylist(), table.column(text_field).to_pylist()
    except UnicodeDecodeError as err:  # pyarrow passes invalid UTF-8 through until conversion
        raise _arrow_error(path, err) from None
    return _validate(ids, texts, path, first, id_field, text_field, where)


# ---------------------------------------------------------------------------------------------- formats
def read_jsonl(path: str | os.PathLike[str], *, id_field: str = "id", text_field: str = "text", batch_size: int = 1024) -> Iterator[Batch]:
    """One JSON object per line; ids may be strings or integers."""
    p = str(path)
    where = _Where(p, "line")
    try:
        reader = pajson.open_json(p, read_options=pajson.ReadOptions(block_size=_BLOCK))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise _arrow_error(p, err, (id_field, text_field)) from None
    yield from _rebatch(reader, p, id_field, text_field, batch_size, where)


def read_csv(path: str | os.PathLike[str], *, id_field: str = "id", text_field: str = "text", batch_size: int = 1024) -> Iterator[Batch]:
    """A CSV (or TSV) file with a header row."""
    p = str(path)
    where = _Where(p, "csv")
    delimiter = "\t" if p.lower().endswith(".tsv") else ","
    check_csv_quotes(p, delimiter)
    try:
        reader = pacsv.open_csv(
            p,
            read_options=pacsv.ReadOptions(block_size=_BLOCK),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=False),
            convert_options=pacsv.ConvertOptions(
                column_types={id_field: pa.string(), text_field: pa.string()}, strings_can_be_null=False
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise _arrow_error(p, err) from None
    yield from _rebatch(reader, p, id_field, text_field, batch_size, where)


def read_parquet(path: str | os.PathLike[str], *, id_field: str = "id", text_field: str = "text", batch_size: int = 1024) -> Iterator[Batch]:
    """A Parquet file; errors name the 1-based row."""
    p = str(path)
    where = _Where(p, "row")
    try:
        pf = pq.ParquetFile(p, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as err:
        raise InputError(f"not a readable Parquet file: {err}", path=p) from None
    names = pf.schema_arrow.names
    for f in (id_field, text_field):
        if f not in names:
            raise InputError(f"missing field {f!r} (fields: {names[:10]})", path=p)
    first = 0
    try:
        for rb in pf.iter_batches(batch_size=batch_size, columns=[id_field, text_field]):
            batch = _columns(rb, p, id_field, text_field, first, where)
            first += rb.num_rows
            yield batch
    except (pa.ArrowInvalid, UnicodeDecodeError) as err:
        raise InputError(f"cannot decode rows after row {first}: {err}", path=p, line=first + 1) from None


def _rebatch(reader: pa.RecordBatchReader, path: str, id_field: str, text_field: str, batch_size: int, where: _Where) -> Iterator[Batch]:
    pending: Batch = []
    first = 0  # record index of pending[0]
    while True:
        try:
            rb = reader.read_next_batch()
        except StopIteration:
            break
        except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError) as err:
            raise _arrow_error(path, err, (id_field, text_field)) from None
        pending_first = first + len(pending)
        pending += _columns(rb, path, id_field, text_field, pending_first, where)
        while len(pending) >= batch_size:
            batch, pending = pending[:batch_size], pending[batch_size:]
            _validate([u for u, _ in batch], [t for _, t in batch], path, first, id_field, text_field, where)
            yield batch
            first += batch_size
    if pending:
        _validate([u for u, _ in pending], [t for _, t in pending], path, first, id_field, text_field, where)
        yield pending


def read_folder(path: str | os.PathLike[str], *, batch_size: int = 256, extensions: Sequence[str] = (".txt", ".md")) -> Iterator[Batch]:
    """Every .txt/.md file under `path` (sorted); id = the path relative to `path`, with `/`."""
    root = Path(path)
    if not root.is_dir():
        raise InputError("not a directory", path=str(root))
    exts = tuple(e.lower() for e in extensions)
    batch: Batch = []
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if not name.lower().endswith(exts):
                continue
            f = Path(dirpath) / name
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                line = raw[: err.start].count(b"\n") + 1
                raise InputError(f"not valid UTF-8 ({err.reason} at byte {err.start})", path=str(f), line=line) from None
            if not text.strip():
                raise InputError("empty document", path=str(f))
            batch.append((f.relative_to(root).as_posix(), text))
            if len(batch) >= batch_size:
                yield batch
                batch = []
    if batch:
        yield batch
