"""Pipelined ingest: plan + tokenize → stage 1 → commit, the commit of one window in a worker thread while
stage 1 of the next runs (issue 12, item 4).

Batches (the caller's commit batches) keep the meaning they have in a sequential ingest: each commits as
one `Bank.write` (data first, pointer last), in input order, so a crash or an error leaves a prefix of
the batches committed and re-running skips them (resumable). What the pipeline changes is when the work
happens:

- The main thread plans each batch (`Bank.plan`, numbering new ids after those of the batches still in
  flight) and tokenizes it (which also rejects over-long documents, per batch), collecting batches into a
  *window* of at least `WINDOW_TOKENS` real tokens (whole batches). Stage 1 runs once per window, so its
  length-sorted groups are drawn from the whole window: on the 2,000-document synthetic corpus, padded
  tokens are 1.43x the real ones with 64-document groups and 1.08x with 1,024-document windows.
- The commit worker (one thread) writes the window's batches one after the other while the main thread
  plans, tokenizes and encodes the next window. Compression, file writes, fsync and LMDB release the GIL.
- Queue depth: one window waits for the worker while it commits another and the main thread encodes a
  third, so at most three windows of encoded tensors are in host memory (~3 × 64 Ki tokens: 0.26 GB at the
  MSA-4B geometry's 1,315 B/token, 19 MB for the embedded model).

Errors stop the pipeline with the original exception, after the worker has committed exactly the batches
before the failing one: a planning/tokenizing error in batch j first encodes and commits the window's
batches before j; a stage-1 error in a window re-runs the window one batch at a time, so the batches
before the failing one commit and the error surfaces from its own batch; a commit error (the worker's)
discards every later batch. A batch naming an id that an uncommitted batch writes waits for the pipeline
to drain first, so it is planned against the committed bank exactly as in a sequential ingest.

This module does no model math (msabank.stages) and writes nothing itself (msabank.storage).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

from msabank import stages
from msabank.storage.records import DocumentWrite, Planned, WriteReport

if TYPE_CHECKING:
    from msabank.engine import Engine

WINDOW_TOKENS = 1 << 16
"""Real tokens per stage-1 window (whole batches; a batch larger than this is its own window): 4 full
groups of `stages.MAX_TOKENS_PER_BATCH` padded tokens, so the length sort has documents to choose from."""


@dataclass(slots=True)
class Batch:
    """One commit batch on its way through the pipeline."""

    index: int
    """Position in the input (commits happen in this order)."""
    size: int
    """Documents in the batch, unchanged ones included (what progress counts)."""
    planned: list[Planned]
    """The bank's plan for the batch (numbers, actions)."""
    todo: list[Planned]
    """The add/update items, to encode."""
    token_ids: list[list[int]]
    """Composed-document token ids of `todo`."""
    writes: list[DocumentWrite] = field(default_factory=list)
    """Filled by stage 1."""

    @property
    def tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


@dataclass(frozen=True, slots=True)
class Done:
    """What became of one handed batch."""

    batch: Batch
    report: WriteReport | None
    """The commit's report; None when it failed or was skipped."""
    error: BaseException | None
    """The commit's exception, raised again on the main thread."""


class Committer:
    """The commit worker: writes handed windows batch by batch, in order; after a failure it skips the rest.

    One window may wait while the worker commits another (`hand` blocks beyond that). With `threaded=False`
    a handed window is committed at once on the caller's thread (the sequential ingest the tests compare
    the pipeline with)."""

    def __init__(self, commit: Callable[[Batch], WriteReport], *, threaded: bool = True) -> None:
        self._commit = commit
        self._todo: queue.Queue[list[Batch] | None] = queue.Queue(maxsize=1)
        self._done: queue.Queue[Done] = queue.Queue()
        self._failed = False
        self._handed = self._reported = 0
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="msabank-commit", daemon=True)
            self._thread.start()

    def hand(self, window: list[Batch]) -> None:
        self._handed += len(window)
        if self._thread is None:
            self._commit_window(window)
        else:
            self._todo.put(window)

    def close(self) -> None:
        """Let the worker finish what it was handed, then stop it."""
        if self._thread is not None:
            self._todo.put(None)
            self._thread.join()
            self._thread = None

    def results(self, *, wait: bool = False) -> list[Done]:
        """Batches committed (or failed, or skipped) since the last call, in order; wait=True: every batch
        handed so far."""
        out: list[Done] = []
        while self._reported < self._handed:
            try:
                out.append(self._done.get(block=wait))
            except queue.Empty:
                break
            self._reported += 1
        return out

    def _run(self) -> None:
        while True:
            window = self._todo.get()
            if window is None:
                return
            self._commit_window(window)

    def _commit_window(self, window: list[Batch]) -> None:
        for b in window:
            if self._failed:  # a batch after a failed one is never committed
                self._done.put(Done(b, None, None))
                continue
            try:
                report = self._commit(b)
            except BaseException as err:  # handed to the main thread, which raises it
                self._failed = True
                self._done.put(Done(b, None, err))
                continue
            self._done.put(Done(b, report, None))


def ingest(engine: Engine, batches: Iterable[list[tuple[str, str]]], *, progress: Callable[[int, int], None] | None,
           window_tokens: int | None = None, threaded: bool = True) -> WriteReport:
    """`Engine.ingest`'s pipeline over cut batches (see the module docstring). `threaded=False` commits
    each window on this thread as soon as it is encoded (the same batches, windows and bytes, one stage
    at a time)."""
    run = _Run(engine, progress, WINDOW_TOKENS if window_tokens is None else window_tokens, threaded)
    try:
        try:
            for items in batches:
                run.add(items)
        except Exception:
            if run.error is None:
                run.flush()  # an error reading or planning batch j: the batches before j commit
            raise
        run.flush()
    finally:
        run.committer.close()  # the worker commits what it was handed (whole batches before any error)
        run.collect(wait=True)
        if run.error is not None:  # a commit error is an earlier batch's, so it comes first
            raise run.error
    return run.report()


class _Run:
    """The state of one pipelined ingest on the main thread."""

    def __init__(self, engine: Engine, progress: Callable[[int, int], None] | None, window_tokens: int,
                 threaded: bool) -> None:
        self.engine = engine
        self.progress = progress
        self.window_tokens = window_tokens
        self.committer = Committer(engine._commit_batch, threaded=threaded)
        self.window: list[Batch] = []
        self.in_flight: dict[str, int] = {}
        """id -> index of the last batch writing it that is planned but not committed."""
        self.next_number = 0
        """New ids are numbered from here on: past every number planned so far in this ingest."""
        self.index = 0
        self.totals = [0, 0, 0, 0]
        self.version = engine.bank.version
        self.docs = self.tokens = 0
        self.error: BaseException | None = None
        """The first commit error."""

    def add(self, items: list[tuple[str, str]]) -> None:
        self.collect()
        if self.error is not None:
            raise self.error
        if any(uid in self.in_flight for uid, _ in items):
            self.drain()  # plan it against the committed bank, as a sequential ingest would
        b = self._plan(items)
        self.window.append(b)
        for p in b.todo:
            self.in_flight[p.user_id] = b.index
        if sum(x.tokens for x in self.window) >= self.window_tokens:
            self.flush()

    def _plan(self, items: list[tuple[str, str]]) -> Batch:
        from msabank.engine import _validate_items

        _validate_items(items)
        planned = self.engine.bank.plan(items, first_number=self.next_number)
        self.next_number = max([self.next_number, *(p.number + 1 for p in planned)])
        todo = [p for p in planned if p.action != "unchanged"]
        ids = stages.document_token_ids(self.engine.model, [(p.number, p.text) for p in todo],
                                        [p.user_id for p in todo])
        b = Batch(self.index, len(items), planned, todo, ids)
        self.index += 1
        return b

    def flush(self) -> None:
        """Stage 1 for the window, then hand it to the worker."""
        window, self.window = self.window, []
        if not window:
            return
        try:
            self._encode(window)
        except Exception:
            if len(window) == 1:
                raise
            # which batch failed? one at a time, so the batches before it commit and it raises its own error
            for b in window:
                self._encode([b])
                self.committer.hand([b])
            raise
        self.committer.hand(window)

    def _encode(self, window: list[Batch]) -> None:
        todo = [p for b in window for p in b.todo]
        mems = iter(self.engine._encode_token_ids(todo, [t for b in window for t in b.token_ids]))
        for b in window:
            b.writes = [self.engine._document_write(p, next(mems)) for p in b.todo]

    def drain(self) -> None:
        """Commit everything planned so far before going on."""
        self.flush()
        self.collect(wait=True)
        if self.error is not None:
            raise self.error

    def collect(self, *, wait: bool = False) -> None:
        """Take the worker's results: totals, progress, the first error."""
        for d in self.committer.results(wait=wait):
            for p in d.batch.todo:
                if self.in_flight.get(p.user_id) == d.batch.index:
                    del self.in_flight[p.user_id]
            d.batch.writes = []  # the encoded tensors are on disk now (or never will be)
            if d.error is not None and self.error is None:
                self.error = d.error
            if d.report is None:
                continue
            r = d.report
            unchanged = sum(p.action == "unchanged" for p in d.batch.planned)
            self.totals = [self.totals[0] + r.added, self.totals[1] + r.updated,
                           self.totals[2] + r.unchanged + unchanged, self.totals[3] + r.deleted]
            self.version = r.version
            self.docs += d.batch.size
            self.tokens += d.batch.tokens
            if self.progress:
                self.progress(self.docs, self.tokens)

    def report(self) -> WriteReport:
        t = self.totals
        return WriteReport(added=t[0], updated=t[1], unchanged=t[2], deleted=t[3], version=self.version)
