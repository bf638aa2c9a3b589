"""Memory-parallel serving: `torchrun --nproc-per-node N -m msabank.serve BANK [serve options]`.

Every rank opens the bank with one shard of the routing index (`Engine.open(..., group=)`, documents with
number % N == rank); routing is one collective per router layer, so the answers are those of one process
holding the whole index. Rank 0 serves HTTP and holds the writer lock; its engine loop tells the other
ranks what to run before each batch (and each retrieve) on a separate CPU (gloo) control group, so the
ranks waiting for work sit in a gloo receive, not in an NCCL collective the NCCL watchdog would kill.
Writes run on rank 0 alone: each rank's next batch opens the latest snapshot and refreshes its shard to
it. While idle, rank 0 pings every `PING_S` seconds; a rank that is gone makes the ping (or a question's
collective, which times out) fail, and then rank 0 reports not ready and exits, never hangs.
"""

from __future__ import annotations

import logging
import os
import queue
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

from msabank.errors import DistributedError
from msabank.serve.loop import EngineLoop, Job

log = logging.getLogger("msabank.serve")

PING_S = 2.0


def world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


class Control:
    """Rank 0 → all ranks messages on a gloo group (any picklable tuple)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        # A long timeout: a rank waits here for as long as the server is idle; a dead peer still fails at once
        # (its sockets close), and a stuck one is caught by the routing collectives' own timeout.
        self.group = dist.new_group(backend="gloo", timeout=timedelta(days=1))
        self.rank = dist.get_rank()

    def send(self, msg: tuple[Any, ...]) -> None:
        try:
            self.dist.broadcast_object_list([msg], src=0, group=self.group)
        except (RuntimeError, ValueError) as err:
            raise DistributedError(f"a memory-parallel rank did not take the control message: {err}",
                                   hint="check the other ranks' logs; restart the server with torchrun") from err

    def recv(self) -> tuple[Any, ...]:
        box: list[Any] = [None]
        try:
            self.dist.broadcast_object_list(box, src=0, group=self.group)
        except (RuntimeError, ValueError) as err:
            raise DistributedError(f"rank 0 went away: {err}") from err
        return box[0]


class ParallelEngineLoop(EngineLoop):
    """Rank 0's engine loop: each batch and retrieve is announced to the other ranks first."""

    def __init__(self, bank: Path, control: Control, *, group: Any, **kwargs: Any) -> None:
        self.control = control
        self.group = group
        super().__init__(bank, open_engine=self._open, **kwargs)

    def _open(self) -> Any:
        from msabank.engine import Engine

        return Engine.open(self.bank_path, self.model, device=self.device, group=self.group)

    def _next(self) -> Job:
        while True:
            try:
                return self.queue.get(timeout=PING_S)
            except queue.Empty:
                self.control.send(("ping",))  # DistributedError when a rank is gone

    def _ask(self, questions: list[str], options: dict[str, Any]) -> list[Any]:
        self.control.send(("ask", questions, options))
        return super()._ask(questions, options)

    def _do_retrieve(self, question: str) -> Any:
        self.control.send(("retrieve", question))
        return super()._do_retrieve(question)

    def _run(self) -> None:
        try:
            super()._run()
        finally:
            try:
                self.control.send(("stop",))
            except DistributedError:
                pass


def worker(bank: Path, *, model: Optional[str], device: Optional[str], control: Control, group: Any) -> None:
    """Ranks 1..N-1: open this rank's shard, then run what rank 0 announces until it says stop."""
    from msabank.engine import Engine
    from msabank.errors import MsabankError
    from msabank.serve.loop import ask_batch

    with Engine.open(bank, model, readonly=True, device=device, group=group) as eng:
        eng.refresh()
        while True:
            msg = control.recv()
            kind = msg[0]
            if kind == "stop":
                return
            try:
                if kind == "ask":
                    ask_batch(eng, msg[1], **msg[2])
                elif kind == "retrieve":
                    eng.retrieve(msg[1])
            except DistributedError:
                raise
            except MsabankError as err:  # rank 0 got the same error from the same input and reports it
                log.debug("rank %d: %s", control.rank, err)


def device_for_rank(device: Optional[str]) -> Optional[str]:
    import torch

    if device:
        return device
    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
