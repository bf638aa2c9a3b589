"""The engine: a bank on disk joined to its model — ingest, update, delete, sync, retrieve, ask.

Scope: the request lifecycle (plan → encode only what changed → commit; refresh the routing index → route
→ fetch content K/V → prefill → decode → memory interleave). Model math lives in `msabank.stages`, bytes on
disk in `msabank.storage`, routing/fetch in `msabank.index`. This module never prints; progress is a
callback.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from msabank import interleave, pipeline
from msabank import prompt as P
from msabank import stages
from msabank.errors import (BankAccessError, BankError, BankExistsError, BankFormatError,
                            BankNotFoundError, ConfigError, DocumentNotFoundError, InputError)
from msabank.index import BankIndex, BankMemory, SnapshotDocuments
from msabank.interleave import Answer, Hit, Round
from msabank.checkpoint import fingerprint
from msabank.model import MSAModel, load_model
from msabank.storage.bank import Bank, Snapshot
from msabank.storage.records import (BankStats, CompactReport, DocumentRecord, DocumentWrite, Geometry, Planned,
                                     VerifyReport, WriteReport)
from msabank.types import EncodedMemory

__all__ = ["Engine", "open_bank", "Answer", "Hit", "Round", "SnapshotDocuments", "BankMemory"]

log = logging.getLogger("msabank.engine")

ENGINE_FILE = "engine.json"  # which model serves the bank (a hint; the fingerprint is what binds)
DEFAULT_MODEL = "default"
IN_MEMORY = "(a model built in memory, no checkpoint directory)"  # engine.json of `Engine.create(loaded=)`

Progress = Callable[[int, int], None]
"""progress(documents_done, tokens_encoded), called after each committed batch (unchanged documents are
counted as done but encode no tokens)."""


def default_model_path() -> Path:
    """The small MSA model shipped inside the package (msabank/default_model)."""
    return Path(__file__).resolve().parent / "default_model"


def resolve_model_path(model: str | Path | None) -> Path:
    if model is None or str(model) == DEFAULT_MODEL:
        p = default_model_path()
        if not (p / "config.json").exists():
            raise ConfigError("the embedded default model is missing from this installation",
                              hint="pass --model /path/to/checkpoint")
        return p
    p = Path(model).expanduser()
    if not (p / "config.json").exists():
        raise ConfigError(f"{p}: not a checkpoint directory (no config.json)",
                          hint="point --model at a directory with config.json, model.safetensors, tokenizer.json")
    return p


def pick_device(device: str | None) -> torch.device:
    """The torch device named by `device` (None: cuda when present, else cpu); ConfigError for a device
    torch does not know or this machine does not have."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"unknown device {device!r}", hint="use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {device!r}: no CUDA device on this machine (or torch built without CUDA)",
                              hint="use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"device {device!r}: this machine has {count} CUDA device(s)",
                              hint=f"use cuda:0 .. cuda:{count - 1}")
    return dev


# ---------------------------------------------------------------------------------------------------


class Engine:
    """A bank joined to its model. Open with `Engine.open` / `Engine.create` or `msabank.open_bank`."""

    def __init__(self, bank: Bank, model: MSAModel, path: Path, *, index_device: torch.device | None = None,
                 group: Any = None) -> None:
        self.bank = bank
        self.model = model
        self.path = path
        self.tokenizer: P.Tokenizer = _tokenizer(model)
        self._template = stages.template_prefix(model)
        # Memory parallel (kernels/memory_parallel.py): with a process group this rank holds one shard of the
        # routing index; every rank runs the same questions and routing is collective.
        self._index = BankIndex(bank.geometry, dtype=model.dtype, index_device=index_device or model.device,
                                content_device=model.device, group=group)

    # ---- opening --------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, model: str | Path | None = None, *, dtype: str | None = None,
               device: str | None = None, loaded: MSAModel | None = None) -> Engine:
        """Create a new bank at `path` bound to `model` (a checkpoint directory; None: the default).

        `loaded`: bind this already-loaded model instead (with `model` None), e.g. the e2e benchmark's
        random-weight MSA-4B geometry, which has no weight files: the fingerprint then covers its config,
        tokenizer and storage dtype but no weights, and engine.json names no checkpoint, so `Engine.open`
        refuses the bank unless given a model (`--model`) with the same fingerprint."""
        path = Path(path)
        if path.exists():
            raise BankExistsError(f"{path} already exists",
                                  hint="ingest into or ask the bank that is there, or pick another path")
        if dtype is not None and dtype not in STORAGE_DTYPES:
            raise ConfigError(f"unknown storage dtype {dtype!r}", hint=f"use one of {', '.join(STORAGE_DTYPES)}")
        if loaded is not None and model is not None:
            raise ConfigError("pass a checkpoint directory (model) or a loaded model (loaded), not both")
        mpath = resolve_model_path(model) if loaded is None else None
        m = load_model(mpath, device=pick_device(device)) if mpath is not None else loaded
        assert m is not None
        cfg = m.config
        storage_dtype = dtype or _dtype_name(cfg.torch_dtype)
        geometry = Geometry(
            num_router_layers=len(cfg.router_layers), num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim, chunk_size=cfg.chunk_size, template_len=len(P.template_parts(_tokenizer(m)).head),
            dtype=storage_dtype,  # type: ignore[arg-type]
        )
        tk, tv = stages.template_prefix(m)
        sdt = _torch_dtype(storage_dtype)
        cache: dict[str, Any] = {}
        fp = fingerprint(mpath, m, storage_dtype, cache)
        with _bank_io(path, "create"):
            bank = Bank.create(path, geometry, fp, tk.to("cpu", sdt), tv.to("cpu", sdt))
        name = IN_MEMORY if mpath is None else DEFAULT_MODEL if model is None else str(mpath.resolve())
        meta = {"model": name, "dtype": storage_dtype,
                "weights_sha256": cache}
        try:
            with _bank_io(path, "create"):
                _write_atomic(path / ENGINE_FILE, json.dumps(meta, indent=1))
        except BaseException:
            bank.close()
            raise
        return cls(bank, m, path)

    @classmethod
    def open(cls, path: str | Path, model: str | Path | None = None, *, readonly: bool = False,
             device: str | None = None, group: Any = None) -> Engine:
        """Open an existing bank. `model` defaults to the one the bank was created with.

        `group`: a torch.distributed process group for memory parallel; every rank opens the bank and asks
        the same questions, each holding one shard of the routing index (launch with torchrun).
        """
        path = Path(path)
        meta_file = path / ENGINE_FILE
        if not meta_file.exists():
            if (path / "index" / "data.mdb").exists():  # Bank.create finished, writing engine.json did not
                raise BankFormatError(f"{path}: {ENGINE_FILE} is missing, so the model that serves this bank is "
                                      "unknown (was `msabank init` interrupted?)",
                                      hint=f"if it holds nothing you need, remove {path} and run `msabank init` again")
            raise BankNotFoundError(f"{path}: no msabank bank here", hint=f"create one with `msabank init {path}`")
        meta = _read_engine_file(path)
        mpath = resolve_model_path(model if model is not None else meta.get("model"))
        m = load_model(mpath, device=pick_device(device))
        cache = dict(meta.get("weights_sha256", {}))
        fp = fingerprint(mpath, m, meta.get("dtype", "bfloat16"), cache)
        with _bank_io(path, "open"):
            bank = Bank.open(path, fingerprint=fp, readonly=readonly)
        return cls(bank, m, path, group=group)

    def close(self) -> None:
        self.bank.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writing --------------------------------------------------------------------------------

    @property
    def storage_dtype(self) -> torch.dtype:
        return _torch_dtype(self.bank.geometry.dtype)

    def encode(self, planned: Sequence[Planned]) -> list[DocumentWrite]:
        """Stage 1 for the planned add/update items (documents are independent: any batch, any order)."""
        todo = [p for p in planned if p.action != "unchanged"]
        if not todo:
            return []
        ids = stages.document_token_ids(self.model, [(p.number, p.text) for p in todo], [p.user_id for p in todo])
        return [self._document_write(p, m) for p, m in zip(todo, self._encode_token_ids(todo, ids), strict=True)]

    def _encode_token_ids(self, todo: Sequence[Planned], token_ids: Sequence[Sequence[int]]) -> list[EncodedMemory]:
        """Stage 1 of tokenized documents, cast to the bank dtype on the model's device."""
        if not todo:
            return []
        # CPU: 4 Ki-token groups stay in cache: stage 1 of 800 synthetic documents in one window took 11.4 s
        # with them and 15.1 s with 16 Ki (best of 2, same process); a GPU wants the largest groups (launches)
        cap = CPU_TOKENS_PER_GROUP if self.model.device.type == "cpu" else stages.MAX_TOKENS_PER_BATCH
        return stages.encode_documents(self.model, [(p.number, p.text) for p in todo], names=[p.user_id for p in todo],
                                       token_ids=token_ids, dtype=self.storage_dtype, max_tokens_per_batch=cap)

    @staticmethod
    def _document_write(p: Planned, mem: EncodedMemory) -> DocumentWrite:
        return DocumentWrite(user_id=p.user_id, number=p.number, text=p.text, content_hash=p.content_hash, memory=mem)

    def _commit_batch(self, batch: pipeline.Batch) -> WriteReport:
        """The pipeline's commit step (its worker thread): one batch, one atomic Bank.write."""
        return self.bank.write(batch.writes)

    def put(self, items: Sequence[tuple[str, str]]) -> WriteReport:
        """Add or update a batch of (id, text) atomically; unchanged texts are skipped, not re-encoded."""
        return self._put(items)[0]

    def _put(self, items: Sequence[tuple[str, str]]) -> tuple[WriteReport, int]:
        _validate_items(items)
        return self._write(self.bank.plan(items))

    def _write(self, planned: Sequence[Planned]) -> tuple[WriteReport, int]:
        writes = self.encode(planned)
        report = self.bank.write(writes)
        unchanged = sum(p.action == "unchanged" for p in planned)
        return _with_unchanged(report, unchanged), sum(w.memory.n_tokens for w in writes)

    def ingest(self, records: Iterable[Sequence[tuple[str, str]]] | Iterable[tuple[str, str]], *,
               batch_size: int = 32, progress: Progress | None = None, pipelined: bool = True) -> WriteReport:
        """Ingest documents, committing one batch at a time (resumable: re-running skips what is committed).

        `records` is an iterable of (id, text) pairs or of batches of them (the corpus readers yield batches).
        Batches commit in order, each atomically; stage 1 runs over windows of batches and the commit of one
        window overlaps stage 1 of the next (`msabank.pipeline`). An error commits exactly the batches before
        the one that failed and raises the original exception. `pipelined=False` commits on this thread,
        one stage at a time (the same bytes).
        """
        return pipeline.ingest(self, _batches(records, batch_size), progress=progress, threaded=pipelined)

    def sync(self, records: Iterable[Sequence[tuple[str, str]]] | Iterable[tuple[str, str]], *,
             batch_size: int = 32, progress: Progress | None = None) -> WriteReport:
        """Make the bank equal to `records`: upsert each, then delete every live id absent from them."""
        seen: set[str] = set()

        def tap() -> Iterator[Sequence[tuple[str, str]]]:
            for batch in _batches(records, batch_size):
                seen.update(i for i, _ in batch)
                yield batch

        r = self.ingest(tap(), batch_size=batch_size, progress=progress)
        absent = self.bank.absent_ids(seen)
        d = self.delete(absent) if absent else WriteReport(0, 0, 0, 0, r.version)
        return WriteReport(r.added, r.updated, r.unchanged, d.deleted, d.version)

    def update(self, doc_id: str, text: str) -> WriteReport:
        """Re-encode one existing document under its number (new version). Two bank reads: the plan (which
        also says whether the id is live) and the write's own check under the writer lock."""
        _validate_items([(doc_id, text)])
        planned = self.bank.plan([(doc_id, text)])
        if planned[0].action == "add":  # unknown, or deleted
            raise DocumentNotFoundError(doc_id)
        return self._write(planned)[0]

    def delete(self, doc_ids: Sequence[str]) -> WriteReport:
        """Tombstone documents; an id that is not live raises DocumentNotFoundError and nothing is committed.

        A single string is one id (not its characters); an id named twice is deleted once."""
        ids = [doc_ids] if isinstance(doc_ids, str) else list(doc_ids)
        return self.bank.write([], delete=list(dict.fromkeys(ids)))

    # ---- reading --------------------------------------------------------------------------------

    def get(self, doc_id: str) -> DocumentRecord:
        return self.bank.get(doc_id)

    def list(self) -> Iterator[DocumentRecord]:
        return iter(self.bank.list())

    def stats(self) -> BankStats:
        return self.bank.stats()

    def verify(self) -> VerifyReport:
        return self.bank.verify()

    def compact(self) -> CompactReport:
        return self.bank.compact()

    # ---- routing index --------------------------------------------------------------------------

    def refresh(self, snap: Snapshot | None = None) -> float:
        """Bring the routing index and content store up to `snap` (default: the bank's latest version);
        returns seconds. See `msabank.index.BankIndex.refresh`: the first call loads every live document,
        later calls apply only the changes since, so an update costs the document, not the bank; damaged
        documents are left out of routing and named in `damaged`."""
        t = time.perf_counter()
        if snap is not None:
            self._index.refresh(snap)
        else:
            with self.bank.snapshot() as own:
                self._index.refresh(own)
        return time.perf_counter() - t

    @property
    def damaged(self) -> dict[int, str]:
        """Documents left out of routing because their stored bytes are damaged (number -> the problem,
        naming the document); `msabank verify --repair CORPUS` repairs them."""
        return self._index.damaged

    def memory(self, snap: Snapshot | None = None) -> BankMemory:
        """Refresh the index to `snap` (default: the latest version) and return the view a generation uses."""
        self.refresh(snap)
        return self._index.view(snap, self.model.config.top_k)

    def retrieve(self, question: str) -> builtins.list[Hit]:
        """Route the question alone (round 1) and return the documents the router layers selected."""
        q = _check_question(question)
        with self.bank.snapshot() as snap:
            mem = self.memory(snap)
            pr = P.question_prompt(self.tokenizer, q, span=self.model.config.routing_span)
            gen = stages.generate(self.model, pr.ids, mem, routing_mask=pr.routing_mask, max_new_tokens=1,
                                  template=self._template)
            return interleave.hits(gen.routed[0], self.model.config.router_layers, SnapshotDocuments(snap, self.damaged))

    # ---- asking ---------------------------------------------------------------------------------

    def ask(self, question: str, *, max_rounds: int = 4, max_new_tokens: int = 128, token_budget: int = 8192,
            temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Answer:
        """Route, fetch, generate; follow memory interleave (spec §6, `msabank.interleave`) until the model
        answers or a limit ends the loop (then `Answer.outcome` is "no_answer", with the reason).

        Each round: the model names documents `[n]…<|object_ref_end|>`; their original text is appended as
        `[n]. text\\n…<|object_ref_end|>`; routing runs again on the question plus the latest documents.
        `<End-of-Retrieve>` hands off to the answer: the question is restated and the model answers with
        the same memory selection. `max_rounds` bounds retrieval rounds (the official loop has no bound);
        `token_budget` bounds the transcript. Document text is tokenized as plain text, and the routing
        regions come from where msabank put things, not from searching the text, so a document cannot
        inject control tokens or move the routing regions.
        """
        return self.ask_batch([question], max_rounds=max_rounds, max_new_tokens=max_new_tokens,
                              token_budget=token_budget, temperature=temperature, top_p=top_p, seed=seed)[0]

    def ask_batch(self, questions: Sequence[str], *, max_rounds: int = 4, max_new_tokens: int = 128,
                  token_budget: int = 8192, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int | None = None) -> builtins.list[Answer]:
        """`ask` for several questions at once, answers in order: one bank snapshot for the whole batch, one
        batched generation per interleave round (a question that finishes leaves the batch). Timings are
        the batch's. Greedy answers equal those of `ask` one question at a time up to float rounding."""
        if isinstance(questions, str):
            raise InputError("ask_batch takes a list of questions, got one string", hint="use ask(question)")
        qs = [_check_question(q) for q in questions]
        _check_generation_options(max_rounds=max_rounds, max_new_tokens=max_new_tokens, token_budget=token_budget,
                                  temperature=temperature, top_p=top_p)
        for q in qs:
            n_prompt = len(P.question_prompt(self.tokenizer, q).ids)
            if n_prompt >= token_budget:
                raise InputError(f"the question is {n_prompt} tokens with the prompt; the transcript budget is "
                                 f"{token_budget} tokens, which leaves no room to answer",
                                 hint="shorten the question")
        if not qs:
            return []
        with self.bank.snapshot() as snap:  # one consistent bank version for the whole batch
            t_start = time.perf_counter()
            t_refresh = self.refresh(snap)
            mem = self._index.view(snap, self.model.config.top_k)
            gen_t: dict[str, float] = {}
            answers = interleave.run(self.model, mem, SnapshotDocuments(snap, self.damaged), qs,
                                     limits=interleave.Limits(max_rounds, max_new_tokens, token_budget),
                                     sampling=interleave.Sampling(temperature, top_p, seed),
                                     template=self._template, timings=gen_t)
        prefill = gen_t.get("prefill_s", 0.0)
        timings = {"refresh": t_refresh, "route": mem.route_s, "fetch": mem.fetch_s,
                   "prefill": prefill - mem.route_s - mem.fetch_s, "decode": gen_t.get("decode_s", 0.0),
                   "total": time.perf_counter() - t_start}
        damaged = [self.damaged[n] for n in sorted(self.damaged)]
        return [dataclasses.replace(a, timings=dict(timings), damaged=list(damaged)) for a in answers]


# ---------------------------------------------------------------------------------------------------
# helpers


def open_bank(path: str | Path, model: str | Path | None = None, *, create: bool = False, readonly: bool = False,
              device: str | None = None) -> Engine:
    """Open (or with create=True, create if absent) the bank at `path`."""
    p = Path(path)
    if create and not (p / ENGINE_FILE).exists():
        return Engine.create(p, model, device=device)
    return Engine.open(p, model, readonly=readonly, device=device)


def _tokenizer(model: MSAModel) -> P.Tokenizer:
    if model.tokenizer is None:
        raise ConfigError("the model has no tokenizer", hint="load it with msabank.model.load_model(path)")
    return model.tokenizer


STORAGE_DTYPES = ("bfloat16", "float16", "float32")
CPU_TOKENS_PER_GROUP = 4096
"""Padded tokens per stage-1 forward on a CPU (see Engine._encode_token_ids)."""


def _read_engine_file(path: Path) -> dict[str, Any]:
    f = path / ENGINE_FILE
    try:
        meta = json.loads(f.read_text(encoding="utf-8"))
    except OSError as err:
        raise BankAccessError(f"{f}: cannot read ({err.strerror})",
                              hint="check the owner and permissions of the bank directory") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BankFormatError(f"{f}: not valid JSON ({err}); it records which model serves the bank",
                              hint="restore it from a backup, or re-ingest the corpus into a new bank") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model", ""), str):
        raise BankFormatError(f"{f}: not an msabank engine file (expected a JSON object with \"model\")",
                              hint="restore it from a backup, or re-ingest the corpus into a new bank")
    return meta


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def _bank_io(path: Path, action: str) -> Iterator[None]:
    """Turns OS / LMDB failures while opening or creating a bank into BankError naming the bank."""
    import lmdb

    try:
        yield
    except PermissionError as err:
        raise BankAccessError(f"cannot {action} bank {path}: permission denied ({err.filename or path})",
                              hint=_CREATE_HINT if action == "create" else _ACCESS_HINT) from None
    except lmdb.Error as err:
        if "ermission denied" in str(err) or isinstance(err, lmdb.ReadonlyError):
            raise BankAccessError(f"cannot {action} bank {path}: {err}", hint=_ACCESS_HINT) from None
        raise BankError(f"cannot {action} bank {path}: {err}", hint="check the path and the disk") from None
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        raise BankError(f"cannot {action} bank {path}: {err.strerror or err}{where}",
                        hint="check the path: every folder above the bank must be a directory you can write") from None


_CREATE_HINT = "pick a path in a folder you can write to"
_ACCESS_HINT = ("msabank needs write access to the bank directory, even to read it (LMDB keeps its reader table in "
                "index/lock.mdb); check its owner and permissions")


def _dtype_name(dt: Any) -> str:
    s = str(dt).replace("torch.", "")
    return s if s in ("bfloat16", "float16", "float32") else "bfloat16"


def _torch_dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def _with_unchanged(r: WriteReport, unchanged: int) -> WriteReport:
    # Bank.write counts `unchanged` only among the documents it is given; the planned-unchanged ones are
    # never given to it (they are not re-encoded), so the two counts add up.
    return WriteReport(r.added, r.updated, r.unchanged + unchanged, r.deleted, r.version)


def _check_question(question: str) -> str:
    if not isinstance(question, str) or not question.strip():
        raise InputError("the question is empty", hint="ask something, e.g. msabank ask BANK \"Who …?\"")
    return question.strip()


def _check_generation_options(*, max_rounds: int, max_new_tokens: int, token_budget: int, temperature: float,
                              top_p: float) -> None:
    import math

    for name, value, low in (("max_rounds", max_rounds, 0), ("max_new_tokens", max_new_tokens, 1),
                             ("token_budget", token_budget, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 <= top_p <= 1:
        raise InputError(f"top_p must be in [0, 1], got {top_p!r}")


def _validate_items(items: Sequence[tuple[str, str]]) -> None:
    seen: set[str] = set()
    for i, (doc_id, text) in enumerate(items):
        if not isinstance(doc_id, str) or not doc_id:
            raise InputError(f"item {i}: empty document id")
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"document {doc_id!r}: empty text")
        if doc_id in seen:
            raise InputError(f"document {doc_id!r} appears twice in one batch")
        seen.add(doc_id)


def _batches(records: Iterable[Any], size: int) -> Iterator[list[tuple[str, str]]]:
    if isinstance(records, (str, bytes, Mapping)):
        raise InputError(f"records must be an iterable of (id, text) pairs, {{'id', 'text'}} mappings or batches "
                         f"of them, got a {type(records).__name__}")
    buf: list[tuple[str, str]] = []
    for i, rec in enumerate(records):
        if isinstance(rec, tuple) and len(rec) == 2 and isinstance(rec[0], str) and isinstance(rec[1], str):
            buf.append(rec)
        elif (isinstance(rec, (list, tuple)) and len(rec) == 2
              and not any(isinstance(x, (list, tuple, Mapping)) for x in rec)):  # one pair, not a batch
            buf.append(_record_pair(rec, f"record {i}"))
        elif isinstance(rec, Mapping):
            buf.append(_record_pair(rec, f"record {i}"))
        elif isinstance(rec, (list, tuple)) and not isinstance(rec, (str, bytes)):  # a batch from a corpus reader
            if buf:
                yield buf
                buf = []
            yield [_record_pair(item, f"record {i} item {j}") for j, item in enumerate(rec)]
            continue
        else:
            raise InputError(f"record {i}: expected an (id, text) pair, an {{'id', 'text'}} mapping or a batch of "
                             f"them, got {type(rec).__name__} {rec!r:.60}")
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


def _record_pair(item: Any, where: str) -> tuple[str, str]:
    """(id, text) of one record: a mapping with "id"/"text", an object with .id/.text, or a pair. Ids may be
    ints (stringified); anything else is an InputError naming the record."""
    if isinstance(item, Mapping):
        missing = [k for k in ("id", "text") if k not in item]
        if missing:
            raise InputError(f"{where}: no {missing[0]!r} key (keys: {sorted(map(str, item))[:10]})")
        uid, text = item["id"], item["text"]
    elif hasattr(item, "id") and hasattr(item, "text"):
        uid, text = item.id, item.text
    elif isinstance(item, (list, tuple)) and len(item) == 2:
        uid, text = item
    else:
        raise InputError(f"{where}: expected an (id, text) pair or an {{'id', 'text'}} mapping, "
                         f"got {type(item).__name__} {item!r:.60}")
    if isinstance(uid, int) and not isinstance(uid, bool):
        uid = str(uid)
    if not isinstance(uid, str):
        raise InputError(f"{where}: the id must be a string or an integer, got {type(uid).__name__} {uid!r:.60}")
    if not isinstance(text, str):
        raise InputError(f"document {uid!r} ({where}): the text must be a string, got {type(text).__name__}")
    return uid, text
