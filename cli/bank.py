"""Bank commands: init, ingest, update, delete, ls, show, stats, verify, compact."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

import typer

from msabank.cli._render import emit_json, err_console, out_console, report_line, to_jsonable
from msabank.errors import BankCorruptedError, BankLockedError, BankNotFoundError, InputError
from msabank.serve.client import connect, server_option, server_url

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
    check_bank_path(bank)
    try:
        return Engine.open(bank, model, readonly=readonly, device=device)
    except BankLockedError as err:  # name the server when `msabank serve` holds the lock
        from msabank.serve.server import served_by

        raise served_by(bank, err) from None


def _is_local(eng: object) -> bool:
    from msabank.engine import Engine

    return isinstance(eng, Engine)


def check_bank_path(bank: Path) -> None:
    """A path that is not a bank: say so, and suggest `init` only where `init` would work."""
    if (bank / "engine.json").exists() or (bank / "index" / "data.mdb").exists():
        return
    if bank.is_dir() and any(bank.iterdir()):
        raise BankNotFoundError(f"{bank}: not an msabank bank (a folder with other files in it)",
                                hint="check the path; `msabank init` needs a new or empty folder")
    if bank.exists() and not bank.is_dir():
        raise BankNotFoundError(f"{bank}: not an msabank bank (a file)", hint="check the path")


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


SYNC_DELETE_SHARE = 0.10
"""A sync that would delete more than this share of the bank's documents needs --yes."""


def ingest(bank: Path = BankArg,
           corpus: Path = typer.Argument(..., help="JSONL, Parquet or CSV file, or a folder of .txt/.md files."),
           id_field: str = typer.Option("id", "--id-field", help="Field holding the document id."),
           text_field: str = typer.Option("text", "--text-field", help="Field holding the document text."),
           fmt: Optional[str] = typer.Option(None, "--format", help="jsonl, parquet, csv or folder (default: by suffix)."),
           sync: bool = typer.Option(False, "--sync", help="Also delete bank documents absent from the corpus."),
           dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be added, updated and deleted; "
                                                                  "change nothing."),
           yes: bool = typer.Option(False, "--yes", help=f"Let --sync delete more than "
                                                          f"{SYNC_DELETE_SHARE:.0%} of the bank's documents."),
           batch_size: int = typer.Option(32, "--batch-size", min=1, help="Documents per committed batch."),
           model: Optional[str] = ModelOpt, device: Optional[str] = DeviceOpt, json_out: bool = JsonOpt,
           server: Optional[str] = ServerOpt) -> None:
    """Encode a corpus into the bank (resumable: committed, unchanged documents are skipped)."""
    from msabank.storage.readers import read_corpus

    # A full validating pass first (streaming, ~1 GB/s): a malformed corpus changes nothing in the bank.
    source: set[str] = set()
    total = validate_corpus(corpus, id_field=id_field, text_field=text_field, fmt=fmt, ids=source)
    batches = read_corpus(corpus, id_field=id_field, text_field=text_field, fmt=fmt, batch_size=batch_size)
    if dry_run:
        if server_url(server):
            raise InputError("--dry-run plans against the bank's files; it does not go through --server",
                             hint="run it on the machine that holds the bank, without --server / MSABANK_SERVER")
        with _open(bank, model, "cpu", readonly=True) as eng:
            _dry_run(eng.bank, batches, source if sync else None, json_out)
        return
    t0 = time.perf_counter()
    with _open(bank, model, device, server=server) as eng:
        if sync:  # through the engine's own list/stats, so a --server sync is guarded the same way
            absent = [r.user_id for r in eng.list() if r.user_id not in source]
            live = eng.stats().documents
            if len(absent) > SYNC_DELETE_SHARE * live and not yes:
                raise InputError(
                    f"--sync would delete {len(absent)} of the bank's {live} documents ({len(absent) / live:.0%}; "
                    f"more than {SYNC_DELETE_SHARE:.0%} needs --yes), e.g. {', '.join(map(repr, absent[:3]))}",
                    path=str(corpus),
                    hint="check the corpus and --id-field; `--dry-run` lists what would change; add --yes to go ahead")
        with _progress("ingest", total) as progress:
            run = eng.sync if sync else eng.ingest
            report = run(batches, batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - t0
    if json_out:
        emit_json({"report": report, "seconds": seconds})
    else:
        out_console.print(f"{report_line(report)} in {seconds:.1f}s")


def _dry_run(bank, batches: Iterator[list[tuple[str, str]]], source: Optional[set[str]], json_out: bool) -> None:  # noqa: ANN001
    """`ingest --dry-run`: the bank's plan for each batch (nothing encoded, nothing written)."""
    actions: dict[str, list[str]] = {"add": [], "update": [], "unchanged": []}
    for batch in batches:
        for p in bank.plan(batch):
            actions[p.action].append(p.user_id)
    delete = bank.absent_ids(source) if source is not None else []
    if json_out:
        emit_json({"dry_run": True, "add": actions["add"], "update": actions["update"],
                   "unchanged": len(actions["unchanged"]), "delete": delete})
        return
    for verb, ids in (("add", actions["add"]), ("update", actions["update"]), ("delete", delete)):
        for uid in ids:
            out_console.print(f"{verb} {uid}", markup=False)
    out_console.print(f"dry run: would add {len(actions['add'])}, update {len(actions['update'])}, leave "
                      f"{len(actions['unchanged'])} unchanged, delete {len(delete)}; nothing was changed")


PROGRESS_INTERVAL_ENV = "MSABANK_PROGRESS_SECONDS"


@contextlib.contextmanager
def _progress(label: str, total: int) -> Iterator[Callable[[int, int], None]]:
    """A progress callback (documents done, tokens encoded): a live bar on a terminal; otherwise plain lines
    on stderr every MSABANK_PROGRESS_SECONDS (default 10; 0: after every batch), so a log shows progress."""
    if not sys.stderr.isatty():
        yield _progress_lines(label, total)
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    t0 = time.perf_counter()
    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), TextColumn("{task.completed}/{task.total} docs"),
                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=err_console, transient=False) as bar:
        task = bar.add_task(label, total=total, rate="")

        def progress(docs: int, tokens: int) -> None:
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.update(task, completed=docs, rate=f"{tokens / dt:,.0f} tok/s")

        yield progress


def _progress_lines(label: str, total: int) -> Callable[[int, int], None]:
    try:
        every = float(os.environ.get(PROGRESS_INTERVAL_ENV, "10"))
    except ValueError:
        raise InputError(f"{PROGRESS_INTERVAL_ENV}={os.environ[PROGRESS_INTERVAL_ENV]!r} is not a number of "
                         "seconds") from None
    t0 = time.perf_counter()
    last = [t0]

    def progress(docs: int, tokens: int) -> None:
        now = time.perf_counter()
        if now - last[0] < every and docs < total:
            return
        last[0] = now
        dt = max(now - t0, 1e-9)
        eta = f", ETA {(total - docs) * dt / docs:.0f}s" if 0 < docs < total else ""
        sys.stderr.write(f"{label}: {docs}/{total} docs ({100 * docs / max(total, 1):.0f}%), {tokens:,} tokens "
                         f"encoded, {tokens / dt:,.0f} tok/s, {dt:.0f}s elapsed{eta}\n")
        sys.stderr.flush()

    return progress


def validate_corpus(corpus: Path, *, id_field: str, text_field: str, fmt: Optional[str],
                    ids: Optional[set[str]] = None) -> int:
    """Read the whole corpus once; InputError (file and line) on the first bad record or repeated id.
    Returns the number of documents; their ids are added to `ids` if given."""
    from msabank.storage.readers import read_corpus

    if not corpus.exists():
        raise InputError("no such file or folder", path=str(corpus))
    seen: set[str] = set() if ids is None else ids
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

    damaged: list[str] = []
    with _open(bank, model, "cpu", readonly=True, server=server) as eng:
        # a local bank lists what it can read and names the damaged records; a server lists its own way
        recs = eng.bank.list(damaged=damaged) if _is_local(eng) else list(eng.list())
    recs = recs[:limit] if limit else recs
    for d in damaged:  # plain writes: one unwrapped line per document, for logs and grep
        sys.stderr.write(f"warning: skipped damaged {d}\n")
    if damaged:
        sys.stderr.write(f"warning: {len(damaged)} damaged document(s) not listed; run `msabank verify {bank}`\n")
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


def verify(bank: Path = BankArg,
           repair: Optional[Path] = typer.Option(None, "--repair", metavar="CORPUS",
                                                 help="Repair from the source corpus: delete the damaged documents "
                                                      "it holds, compact, then ingest it (see docs/cli.md)."),
           id_field: str = typer.Option("id", "--id-field", help="With --repair: the corpus id field."),
           text_field: str = typer.Option("text", "--text-field", help="With --repair: the corpus text field."),
           fmt: Optional[str] = typer.Option(None, "--format", help="With --repair: jsonl, parquet, csv or folder."),
           batch_size: int = typer.Option(32, "--batch-size", min=1, help="With --repair: documents per batch."),
           model: Optional[str] = ModelOpt, device: Optional[str] = DeviceOpt, json_out: bool = JsonOpt) -> None:
    """Check every record, text hash, checksum and structure; exit 1 when anything is wrong."""
    if repair is not None:
        total = validate_corpus(repair, id_field=id_field, text_field=text_field, fmt=fmt)  # before any change
    with _open(bank, model, "cpu" if repair is None else device, readonly=repair is None) as eng:
        rep = eng.verify()
        repaired = None
        if repair is not None:  # also on a clean bank: a repair cut short deleted documents it had not re-added
            repaired = _repair(eng, rep, repair, total, id_field=id_field, text_field=text_field, fmt=fmt,
                               batch_size=batch_size)
            rep = eng.verify()
    if json_out:
        emit_json({"ok": rep.ok, "report": rep, **({"repair": repaired} if repaired is not None else {})})
    else:
        if repaired is not None:
            out_console.print(f"repair: deleted {len(repaired['deleted'])} damaged documents, then "
                              + (report_line(repaired["ingest"]) if repaired["ingest"] else "could not ingest "
                                 "the corpus"), markup=False)
            if repaired["failed"]:
                sys.stderr.write(f"warning: repair: {repaired['failed']}\n")
            for uid in repaired["not_in_corpus"]:
                sys.stderr.write(f"warning: damaged document {uid!r} is not in {repair}: left as it is\n")
        out_console.print(f"checked {rep.documents} documents, {rep.rows_checked} rows: "
                          f"{'ok' if rep.ok else 'PROBLEMS'}")
        for p in rep.problems:
            sys.stderr.write(f"  {p}\n")
    if not rep.ok:
        raise BankCorruptedError(f"{len(rep.problems)} problem(s) in {bank}",
                                 doc_id=rep.corrupted[0] if rep.corrupted else None,
                                 hint=f"repair from the source corpus: `msabank verify {bank} --repair CORPUS` "
                                      "(deletes the damaged documents CORPUS holds, compacts, ingests CORPUS); if "
                                      f"that cannot fix it, rebuild: `msabank init NEW` and `msabank ingest NEW CORPUS`")


def _repair(eng, rep, corpus: Path, total: int, *, id_field: str, text_field: str, fmt: Optional[str],  # noqa: ANN001
            batch_size: int) -> dict:
    """`verify --repair`: delete the damaged documents the corpus holds (their rows go with `compact`, so
    the damaged chunks are never read again), then a plain ingest of the corpus re-encodes them, rewrites
    damaged texts and adds what is missing. Each step commits on its own: re-running resumes."""
    from msabank.storage.readers import read_corpus

    source = {i for batch in read_corpus(corpus, id_field=id_field, text_field=text_field, fmt=fmt) for i, _ in batch}
    bad = [u for u in rep.corrupted if u in source]
    deletable = []
    for uid in bad:
        try:
            eng.bank.get(uid)
            deletable.append(uid)
        except BankCorruptedError as err:
            if "content hash" not in str(err):  # a damaged text is rewritten by the ingest below
                deletable.append(uid)
    deleted: list[str] = []
    for uid in deletable:
        try:
            eng.delete([uid])
            deleted.append(uid)
        except BankCorruptedError:
            pass  # its record cannot be read: left to the final verify (rebuild)
    failed = None
    if deleted:
        try:
            eng.compact()
        except BankCorruptedError as err:  # a damaged document the corpus does not hold shares the rows
            failed = f"compaction: {err}"
    batches = read_corpus(corpus, id_field=id_field, text_field=text_field, fmt=fmt, batch_size=batch_size)
    report = None
    try:
        report = eng.ingest(batches, batch_size=batch_size, progress=_progress_lines("repair", total))
    except BankCorruptedError as err:  # a record that cannot be read cannot be rewritten in place
        failed = str(err)
    return {"deleted": deleted, "not_in_corpus": [u for u in rep.corrupted if u not in source], "ingest": report,
            "failed": failed}


def compact(bank: Path = BankArg, model: Optional[str] = ModelOpt, json_out: bool = JsonOpt) -> None:
    """Reclaim the rows of superseded and deleted versions (crash-safe)."""
    from msabank.storage.tensors import dir_bytes

    with _open(bank, model, "cpu") as eng:
        index_before = dir_bytes(bank / "index")
        rep = eng.compact()
        index_after = dir_bytes(bank / "index")
    if json_out:
        emit_json({**to_jsonable(rep), "index_bytes_before": index_before, "index_bytes_after": index_after})
        return
    out_console.print(f"rows {rep.rows_before} -> {rep.rows_after}, tensor bytes {rep.bytes_before / 1e6:.2f} MB "
                      f"-> {rep.bytes_after / 1e6:.2f} MB (bank version {rep.version})")
    if index_after > index_before:
        # The records of moved rows are rewritten; LMDB keeps the old pages for later writes, never shrinks.
        out_console.print(f"index {index_before / 1e6:.2f} MB -> {index_after / 1e6:.2f} MB: the records of moved "
                          "documents were rewritten, and LMDB keeps the freed pages in its file for later writes "
                          "(it does not shrink the file)")


def register(app: typer.Typer) -> None:
    for fn in (init, ingest, update, delete, ls, show, stats, verify, compact):
        app.command(fn.__name__)(fn)
