"""Bank commands: init, ingest, update, delete, ls, show, stats, verify, compact."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from msabank.cli._render import emit_json, err_console, out_console, report_line
from msabank.errors import BankCorruptedError, BankLockedError, InputError
from msabank.serve.client import connect, server_option

MAX_ID_BYTES = 500  # LMDB's key limit, enforced by the bank at commit time
BankArg = typer.Argument(..., help="Path of the bank directory.")
ModelOpt = typer.Option(None, "--model", "-m", help="Checkpoint directory (default: the one the bank was made with).")
DeviceOpt = typer.Option(None, "--device", help="torch device, e.g. cpu or cuda:0 (default: cuda if available).")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output on stdout.")


ServerOpt = server_option()


def _open(bank: Path, model: Optional[str], device: Optional[str], readonly: bool = False,  # noqa: ANN202
          server: Optional[str] = None):
    """The engine on `bank`, or a client of the server given by --server / MSABANK_SERVER (same methods)."""
    from msabank.engine import Engine

    client = connect(server, bank)
    if client is not None:
        return client
    try:
        return Engine.open(bank, model, readonly=readonly, device=device)
    except BankLockedError as err:  # name the server when `msabank serve` holds the lock
        from msabank.serve.server import served_by

        raise served_by(bank, err) from None


def init(bank: Path = BankArg, model: Optional[str] = typer.Option(None, "--model", "-m",
         help="Checkpoint directory (default: the embedded default model)."),
         dtype: Optional[str] = typer.Option(None, "--dtype", help="Storage dtype: bfloat16, float16 or float32 "
                                             "(default: the checkpoint's torch_dtype)."),
         device: Optional[str] = DeviceOpt, json_out: bool = JsonOpt) -> None:
    """Create an empty bank bound to a model."""
    from msabank.engine import Engine

    with Engine.create(bank, model, dtype=dtype, device=device) as eng:
        g = eng.bank.geometry
        if json_out:
            emit_json({"path": str(bank), "geometry": g, "version": eng.bank.version})
        else:
            out_console.print(f"created bank {bank} ({g.num_router_layers} router layers, {g.num_kv_heads}x"
                              f"{g.head_dim} KV, chunk {g.chunk_size}, {g.dtype})", markup=False)


def ingest(bank: Path = BankArg,
           corpus: Path = typer.Argument(..., help="JSONL, Parquet or CSV file, or a folder of .txt/.md files."),
           id_field: str = typer.Option("id", "--id-field", help="Field holding the document id."),
           text_field: str = typer.Option("text", "--text-field", help="Field holding the document text."),
           fmt: Optional[str] = typer.Option(None, "--format", help="jsonl, parquet, csv or folder (default: by suffix)."),
           sync: bool = typer.Option(False, "--sync", help="Also delete bank documents absent from the corpus."),
           batch_size: int = typer.Option(32, "--batch-size", min=1, help="Documents per committed batch."),
           model: Optional[str] = ModelOpt, device: Optional[str] = DeviceOpt, json_out: bool = JsonOpt,
           server: Optional[str] = ServerOpt) -> None:
    """Encode a corpus into the bank (resumable: committed, unchanged documents are skipped)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from msabank.storage.readers import read_corpus

    # A full validating pass first (streaming, ~1 GB/s): a malformed corpus changes nothing in the bank.
    total = validate_corpus(corpus, id_field=id_field, text_field=text_field, fmt=fmt)
    batches = read_corpus(corpus, id_field=id_field, text_field=text_field, fmt=fmt, batch_size=batch_size)
    t0 = time.perf_counter()
    with _open(bank, model, device, server=server) as eng, Progress(
        TextColumn("[bold]ingest"), BarColumn(), TextColumn("{task.completed}/{task.total} docs"),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=err_console, transient=not sys.stderr.isatty(), disable=not sys.stderr.isatty(),
    ) as bar:
        task = bar.add_task("ingest", total=total, rate="")

        def progress(docs: int, tokens: int) -> None:
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.update(task, completed=docs, rate=f"{tokens / dt:,.0f} tok/s")

        run = eng.sync if sync else eng.ingest
        report = run(batches, batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - t0
    if json_out:
        emit_json({"report": report, "seconds": seconds})
    else:
        out_console.print(f"{report_line(report)} in {seconds:.1f}s")


def validate_corpus(corpus: Path, *, id_field: str, text_field: str, fmt: Optional[str]) -> int:
    """Read the whole corpus once; InputError (file and line) on the first bad record or repeated id."""
    from msabank.storage.readers import read_corpus

    if not corpus.exists():
        raise InputError("no such file or folder", path=str(corpus))
    seen: set[str] = set()
    n = 0
    for batch in read_corpus(corpus, id_field=id_field, text_field=text_field, fmt=fmt):
        for doc_id, _ in batch:
            n += 1
            if doc_id in seen:
                raise InputError(f"record {n}: duplicate id {doc_id!r} (it appears earlier in the corpus)",
                                 path=str(corpus))
            if len(doc_id.encode("utf-8")) > MAX_ID_BYTES:  # the bank refuses it at commit, after earlier batches
                raise InputError(f"record {n}: id {doc_id[:40]!r}… is {len(doc_id.encode('utf-8'))} bytes; ids are "
                                 f"at most {MAX_ID_BYTES} bytes (UTF-8)", path=str(corpus),
                                 hint="shorten the ids, e.g. use a hash or a path relative to the corpus")
            seen.add(doc_id)
    if n == 0:  # an empty folder or a wrong path would otherwise ingest nothing, or with --sync delete everything
        raise InputError("the corpus has no documents", path=str(corpus),
                         hint="a folder corpus takes .txt and .md files; check the path and --format")
    return n


def update(bank: Path = BankArg, doc_id: str = typer.Argument(..., help="The document's id."),
           text: Optional[str] = typer.Option(None, "--text", help="New text."),
           text_file: Optional[Path] = typer.Option(None, "--file", help="Read the new text from this file."),
           model: Optional[str] = ModelOpt, device: Optional[str] = DeviceOpt, json_out: bool = JsonOpt,
           server: Optional[str] = ServerOpt) -> None:
    """Re-encode one document with new text (new version, same number)."""
    if (text is None) == (text_file is None):
        raise InputError("give exactly one of --text or --file")
    if text_file is not None:
        try:
            text = text_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read text: {e}", path=str(text_file)) from None
    with _open(bank, model, device, server=server) as eng:
        report = eng.update(doc_id, text or "")
        rec = eng.get(doc_id)
    if json_out:
        emit_json({"report": report, "id": doc_id, "number": rec.number, "version": rec.version})
    else:
        out_console.print(f"{doc_id} [{rec.number}] is now version {rec.version}: {report_line(report)}", markup=False)


def delete(bank: Path = BankArg, doc_ids: list[str] = typer.Argument(..., help="Document ids to delete."),
           model: Optional[str] = ModelOpt, json_out: bool = JsonOpt, server: Optional[str] = ServerOpt) -> None:
    """Delete documents (tombstones; `compact` reclaims their space)."""
    with _open(bank, model, "cpu", server=server) as eng:
        report = eng.delete(doc_ids)
    emit_json({"report": report}) if json_out else out_console.print(report_line(report))


def ls(bank: Path = BankArg, limit: int = typer.Option(0, "--limit", min=0, help="Show at most this many (0: all)."),
       model: Optional[str] = ModelOpt, json_out: bool = JsonOpt, server: Optional[str] = ServerOpt) -> None:
    """List live documents."""
    from rich.table import Table
    from rich.text import Text

    with _open(bank, model, "cpu", readonly=True, server=server) as eng:
        recs = list(eng.list())
    recs = recs[:limit] if limit else recs
    if json_out:
        emit_json([{"id": r.user_id, "number": r.number, "version": r.version, "tokens": r.n_tokens,
                    "chunks": r.num_chunks, "updated_at": r.updated_at} for r in recs])
        return
    table = Table("id", "number", "version", "tokens", "chunks", "text")
    for r in recs:
        # Ids and text are user data: Text cells, so `[bold]` or `[/]` in them is shown, never parsed as markup.
        table.add_row(Text(r.user_id), str(r.number), str(r.version), str(r.n_tokens), str(r.num_chunks),
                      Text(_preview(r.text)))
    out_console.print(table)


def _preview(text: str, width: int = 60) -> str:
    flat = " ".join(text.split())
    return flat[:width] + "…" if len(flat) > width else flat


def show(bank: Path = BankArg, doc_id: str = typer.Argument(..., help="The document's id."),
         model: Optional[str] = ModelOpt, json_out: bool = JsonOpt, server: Optional[str] = ServerOpt) -> None:
    """Show one document: text, number, versions."""
    from rich.text import Text

    with _open(bank, model, "cpu", readonly=True, server=server) as eng:
        rec = eng.get(doc_id)
        versions = eng.bank.versions(doc_id)
    if json_out:
        emit_json({"document": rec, "versions": versions})
        return
    out_console.print(Text.assemble((rec.user_id, "bold"), f" [{rec.number}] version {rec.version}, {rec.n_tokens} "
                                    f"tokens, {rec.num_chunks} chunks"))
    for v in versions:
        out_console.print(f"  v{v.version} {v.kind} at bank version {v.bank_version} "
                          f"({time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(v.committed_at))})")
    out_console.print(rec.text, markup=False)


def stats(bank: Path = BankArg, model: Optional[str] = ModelOpt, json_out: bool = JsonOpt,
          server: Optional[str] = ServerOpt) -> None:
    """Counts and sizes: documents, chunks, tokens, bytes on disk."""
    with _open(bank, model, "cpu", readonly=True, server=server) as eng:
        s = eng.stats()
    if json_out:
        emit_json(s)
        return
    per_tok = s.tensor_bytes_on_disk / s.tokens if s.tokens else 0.0
    out_console.print(f"version {s.version}: {s.documents} documents ({s.deleted} deleted), {s.tokens} tokens, "
                      f"{s.live_chunks} chunks ({s.total_rows} rows stored), {s.bytes_on_disk / 1e6:.2f} MB on "
                      f"disk ({per_tok:.0f} B/token of tensors)")


def verify(bank: Path = BankArg, model: Optional[str] = ModelOpt, json_out: bool = JsonOpt) -> None:
    """Check every checksum and structure; exit 1 when anything is wrong."""
    with _open(bank, model, "cpu", readonly=True) as eng:
        rep = eng.verify()
    if json_out:
        emit_json({"ok": rep.ok, "report": rep})
    else:
        out_console.print(f"checked {rep.documents} documents, {rep.rows_checked} rows: "
                          f"{'ok' if rep.ok else 'PROBLEMS'}")
        for p in rep.problems:
            err_console.print(f"  {p}", markup=False)
    if not rep.ok:
        raise BankCorruptedError(f"{len(rep.problems)} problem(s) in {bank}",
                                 doc_id=rep.corrupted[0] if rep.corrupted else None,
                                 hint=f"`msabank delete {bank} ID…` the named documents, `msabank compact {bank}`, then "
                                      "ingest them again (a plain re-ingest skips them: their text is unchanged)")


def compact(bank: Path = BankArg, model: Optional[str] = ModelOpt, json_out: bool = JsonOpt) -> None:
    """Reclaim the rows of superseded and deleted versions (crash-safe)."""
    with _open(bank, model, "cpu") as eng:
        rep = eng.compact()
    if json_out:
        emit_json(rep)
    else:
        out_console.print(f"rows {rep.rows_before} -> {rep.rows_after}, tensor bytes {rep.bytes_before / 1e6:.2f} MB "
                          f"-> {rep.bytes_after / 1e6:.2f} MB (bank version {rep.version})")


def register(app: typer.Typer) -> None:
    for fn in (init, ingest, update, delete, ls, show, stats, verify, compact):
        app.command(fn.__name__)(fn)
