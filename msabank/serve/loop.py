"""The engine loop: one thread owns the `Engine` (model, routing index, writer lock) for the server's life.

HTTP handlers never touch the engine. They submit a `Job` to one bounded FIFO queue and await its
future. The loop takes a question, collects more for up to `batch_wait_s` or until `batch_size` are
waiting (whichever comes first) and runs them together through `ask_batch`; any other job (a write, a
document read, a retrieve) ends the collection and runs after the batch, alone. A write is encoded,
committed and the routing index refreshed in place before the next batch, so every answer after a write's
reply sees it. Because this thread is the bank's only writer, the bank version at the start of a batch is
the snapshot every question in it reads (`Engine.ask` pins the latest version): that is the `version`
reported with each answer.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from msabank.errors import DistributedError, MsabankError
from msabank.serve.metrics import Metrics

log = logging.getLogger("msabank.serve")


def ask_batch(engine: Any, questions: Sequence[str], **options: Any) -> list[Any]:
    """`Engine.ask_batch` (one snapshot, one batched generation per interleave round); an engine without
    it (a stand-in in a test, an older engine) is asked one question at a time."""
    batched = getattr(engine, "ask_batch", None)
    if batched is not None:
        return list(batched(list(questions), **options))
    return [engine.ask(q, **options) for q in questions]


class QueueFull(MsabankError):
    """The server's bounded queue is full (HTTP 429)."""


class NotReady(MsabankError):
    """The engine is not loaded yet, or failed to load (HTTP 503)."""


@dataclass(eq=False)
class Job:
    """One unit of work for the loop. `kind` "ask" jobs batch together (same options); others run alone."""

    kind: str
    payload: Any
    options: tuple[tuple[str, Any], ...] = ()
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)
    enqueued: float = field(default_factory=time.perf_counter)

    def cancel(self) -> bool:
        """Drop the job if the loop has not started it (a client that went away)."""
        return self.future.cancel()


@dataclass
class ServedState:
    """What the HTTP side may read without the engine: published by the loop after each change."""

    ready: bool = False
    failed: str | None = None
    version: int = -1
    stats: dict[str, Any] = field(default_factory=dict)
    index_rows: int = 0
    index_docs: int = 0
    load_seconds: float = 0.0
    load: dict[str, float] = field(default_factory=dict)
    """load_seconds by part: import_s (torch, model code), open_s (model weights, bank, writer lock),
    index_s (routing keys and content K/V onto the device)."""
    model: str = ""
    device: str = ""


class EngineLoop:
    """Owns the engine on a dedicated thread. `start()` opens the bank (taking its writer lock) and loads
    the index; `submit(job)` queues work; `stop()` finishes the current job, closes the bank."""

    def __init__(self, bank: Path, *, model: str | None = None, device: str | None = None, batch_size: int = 16,
                 batch_wait_s: float = 0.005, queue_size: int = 256, metrics: Metrics | None = None,
                 on_version: Callable[[int], None] | None = None, on_ready: Callable[[Any], None] | None = None,
                 open_engine: Callable[[], Any] | None = None,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.bank_path = bank
        self.model = model
        self.device = device
        self.batch_size = max(1, batch_size)
        self.batch_wait_s = max(0.0, batch_wait_s)
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=max(1, queue_size))
        self.metrics = metrics or Metrics()
        self.state = ServedState()
        self.on_version = on_version
        self.on_ready = on_ready
        self._open_engine = open_engine
        self.on_fatal = on_fatal
        self._thread = threading.Thread(target=self._run, name="msabank-engine", daemon=True)
        self._carry: Job | None = None  # a non-ask job that ended a batch's collection
        self.engine: Any = None
        self.tokenizer: Any = None

    # ---- control (any thread) -----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the jobs queued so far, then close the bank (releasing the writer lock)."""
        if self._thread.is_alive():
            try:
                self.queue.put(Job("stop", None), timeout=timeout)
            except queue.Full:
                pass
            self._thread.join(timeout)

    def submit(self, job: Job) -> Job:
        if self.state.failed:
            raise NotReady(f"the engine failed to start: {self.state.failed}")
        if not self.state.ready:
            raise NotReady("the server is still loading the model and the routing index",
                           hint="wait until GET /ready answers 200")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            self.metrics.inc("msabank_rejected_total", reason="queue_full")
            raise QueueFull(f"the server's queue is full ({self.queue.maxsize} jobs waiting)",
                            hint="retry after a short wait, or raise --queue-size") from None
        self.metrics.set("msabank_queue_depth", self.queue.qsize())
        return job

    # ---- the loop thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._load()
        except BaseException as err:  # reported by /ready and the serve command; the process exits
            self.state.failed = str(err) or type(err).__name__
            log.error("engine failed to start: %s", self.state.failed)
            if self.on_ready:
                self.on_ready(err)
            return
        if self.on_ready:
            self.on_ready(None)
        try:
            while True:
                job = self._carry or self._next()
                self._carry = None
                if job.kind == "stop":
                    break
                if job.kind == "ask":
                    self._run_batch(self._collect(job))
                else:
                    self._run_one(job)
                self.metrics.set("msabank_queue_depth", self.queue.qsize())
        except DistributedError as err:  # a dead or stuck rank: not ready any more, and the process exits
            self.state.ready = False
            self.state.failed = str(err)
            log.error("memory parallel failed: %s", err)
            if self.on_fatal:
                self.on_fatal(err)
        finally:
            self._drain()
            self.engine.close()

    def _next(self) -> Job:
        """The next job (blocking). Memory parallel overrides it to keep the other ranks posted while idle."""
        return self.queue.get()

    def _ask(self, questions: list[str], options: dict[str, Any]) -> list[Any]:
        """Run one batch on the engine (memory parallel first tells the other ranks to join it)."""
        return ask_batch(self.engine, questions, **options)

    def _load(self) -> None:
        t = time.perf_counter()
        if self._open_engine is not None:
            eng = self._open_engine()
            t_import = t
        else:
            from msabank.engine import Engine  # torch and the model code: the first import costs seconds

            t_import = time.perf_counter()
            eng = Engine.open(self.bank_path, self.model, device=self.device)
        t_open = time.perf_counter()
        self.engine = eng
        self.tokenizer = eng.tokenizer
        eng.refresh()  # the whole index onto the device before /ready says so
        t_index = time.perf_counter()
        self.state.load_seconds = t_index - t
        self.state.load = {"import_s": t_import - t, "open_s": t_open - t_import, "index_s": t_index - t_open}
        self.state.model = str(getattr(eng.model, "path", "") or self.model or "default")
        self.state.device = str(eng.model.device)
        self._publish()
        self.state.ready = True
        log.info("ready: bank %s version %d, %d rows, loaded in %.2f s", self.bank_path, self.state.version,
                 self.state.index_rows, self.state.load_seconds)

    def _publish(self) -> None:
        """Refresh the snapshot of facts the HTTP side serves (version, stats, index size)."""
        import dataclasses

        s = self.engine.stats()
        self.state.stats = dataclasses.asdict(s)
        index = getattr(self.engine, "_index", None)  # the engine's RoutingIndex (this rank's shard)
        self.state.index_rows = int(index.num_rows) if index is not None else 0
        self.state.index_docs = int(index.num_docs) if index is not None else 0
        self.metrics.set("msabank_index_rows", self.state.index_rows)
        self.metrics.set("msabank_index_documents", self.state.index_docs)
        self.metrics.set("msabank_bank_version", s.version)
        if s.version != self.state.version:
            self.state.version = s.version
            if self.on_version:
                self.on_version(s.version)

    def _collect(self, first: Job) -> list[Job]:
        """`first` plus the asks with the same options that arrive within the batch window."""
        batch = [first]
        deadline = time.perf_counter() + self.batch_wait_s
        while len(batch) < self.batch_size:
            left = deadline - time.perf_counter()
            try:
                job = self.queue.get_nowait() if left <= 0 else self.queue.get(timeout=left)
            except queue.Empty:
                break
            if job.kind != "ask" or job.options != first.options:
                self._carry = job  # runs next, in arrival order (a stop job too)
                break
            batch.append(job)
        return batch

    def _run_batch(self, batch: list[Job]) -> None:
        live = [j for j in batch if j.future.set_running_or_notify_cancel()]
        self.metrics.inc("msabank_questions_cancelled_total", len(batch) - len(live))
        if not live:
            return
        opts = dict(live[0].options)
        version = self.state.version
        t0 = time.perf_counter()
        self.metrics.observe("msabank_batch_size", len(live))
        try:
            answers = self._ask([j.payload for j in live], opts)
        except DistributedError:
            raise  # a rank is gone: the server stops (_run), it does not retry
        except Exception:  # isolate the question at fault: ask them one at a time
            answers = []
            for j in live:
                try:
                    answers.append(self._ask([j.payload], opts)[0])
                except DistributedError:
                    raise
                except Exception as err:  # noqa: BLE001 - handed to that question's caller
                    answers.append(err)
        seconds = time.perf_counter() - t0
        for j, a in zip(live, answers, strict=True):
            if isinstance(a, BaseException):
                self.metrics.inc("msabank_errors_total", type=type(a).__name__)
                j.future.set_exception(a)
                continue
            self.metrics.inc("msabank_questions_total")
            self.metrics.inc("msabank_rounds_total", len(a.rounds))
            for stage, s in a.timings.items():
                self.metrics.observe("msabank_stage_seconds", s, stage=stage)
            self.metrics.observe("msabank_stage_seconds", t0 - j.enqueued, stage="queue")
            j.future.set_result({"answer": a, "version": version, "batch_size": len(live),
                                 "queue_s": t0 - j.enqueued, "batch_s": seconds})

    def _run_one(self, job: Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        fn = getattr(self, f"_do_{job.kind}")
        try:
            result = fn(job.payload)
        except DistributedError:
            job.future.set_exception(NotReady("a memory-parallel rank failed; the server is stopping"))
            raise
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            self.metrics.inc("msabank_errors_total", type=type(err).__name__)
            job.future.set_exception(err)
            return
        job.future.set_result(result)

    def _drain(self) -> None:
        """Fail what is still queued at shutdown (the caller gets 503, nothing is half-done)."""
        while True:
            try:
                job = self._carry or self.queue.get_nowait()
            except queue.Empty:
                return
            self._carry = None
            if job.kind != "stop" and job.future.set_running_or_notify_cancel():
                job.future.set_exception(NotReady("the server is shutting down"))

    # ---- jobs other than ask -------------------------------------------------------------------

    def _write(self, fn: Callable[[], Any]) -> Any:
        self.metrics.set("msabank_write_in_progress", 1)
        try:
            report = fn()
            self.engine.refresh()  # in place: the next batch routes over the new version
            self._publish()
        finally:
            self.metrics.set("msabank_write_in_progress", 0)
        self.metrics.inc("msabank_writes_total")
        return report

    def _do_put(self, items: list[tuple[str, str]]) -> Any:
        return self._write(lambda: self.engine.put(items))

    def _do_update(self, payload: tuple[str, str]) -> Any:
        return self._write(lambda: self.engine.update(*payload))

    def _do_delete(self, ids: list[str]) -> Any:
        return self._write(lambda: self.engine.delete(ids))

    def _do_get(self, doc_id: str) -> Any:
        return self.engine.get(doc_id), self.engine.bank.versions(doc_id)

    def _do_list(self, limit: int) -> Any:
        recs = []
        for r in self.engine.bank.list(text=True):
            recs.append(r)
            if limit and len(recs) >= limit:
                break
        return recs, self.state.version

    def _do_retrieve(self, question: str) -> Any:
        return self.engine.retrieve(question), self.state.version

    def _do_verify(self, _: Any) -> Any:
        return self.engine.verify()
