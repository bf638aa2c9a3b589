"""Running the server: bind checks, key files, the lock note, uvicorn with one worker.

Start-up order: check the options (a non-loopback address needs a key), bind the port (so /health answers
at once), then the engine loop opens the bank — taking its writer lock — loads the model and fills the
routing index; `/ready` says 200 only after that. While it serves, `serve.json` in the bank directory
names the server (pid, host, port) so a local writer that finds the lock taken can say who has it; it is
written once the lock is held and removed on a clean exit (a killed server leaves it; the next server
replaces it, and a note whose pid is not the lock holder's is ignored).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Optional

from msabank.errors import BankLockedError, BankNotFoundError, ConfigError, MsabankError
from msabank.serve.app import Limits, ServeConfig, create_app
from msabank.serve import parallel
from msabank.serve.loop import EngineLoop

log = logging.getLogger("msabank.serve")

NOTE_FILE = "serve.json"
DEFAULT_PORT = 8471


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def load_key(path: Optional[Path], option: str) -> list[str]:
    """The key in `path` (surrounding whitespace dropped); ConfigError for an unreadable or empty file."""
    if path is None:
        return []
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{option} {path}: cannot read the key ({getattr(err, 'strerror', None) or err})",
                          hint="point it at a file holding one key on one line") from None
    if not key or any(c.isspace() for c in key):
        raise ConfigError(f"{option} {path}: the file must hold one key (no spaces), it holds "
                          f"{'nothing' if not key else 'whitespace inside the key'}",
                          hint="generate one, e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return [key]


def check_bind(host: str, api_keys: list[str], read_keys: list[str]) -> None:
    """Without any key only a loopback address may be bound: an open bank on a network is refused."""
    if not is_loopback(host) and not (api_keys or read_keys):
        raise ConfigError(f"--host {host} is not a loopback address and no key is configured: anyone who can "
                          "reach it could read and change the bank",
                          hint="pass --api-key-file FILE (and optionally --read-key-file FILE), or bind 127.0.0.1")
    if set(api_keys) & set(read_keys):
        raise ConfigError("--api-key-file and --read-key-file hold the same key",
                          hint="use a different key for read-only clients")


# ---- the lock note ---------------------------------------------------------------------------------


def write_note(bank: Path, info: dict[str, Any]) -> None:
    tmp = bank / f".{NOTE_FILE}.tmp"
    tmp.write_text(json.dumps(info, indent=1), encoding="utf-8")
    os.replace(tmp, bank / NOTE_FILE)


def remove_note(bank: Path) -> None:
    note = read_note(bank)
    if note is not None and note.get("pid") == os.getpid():
        (bank / NOTE_FILE).unlink(missing_ok=True)


def read_note(bank: Path) -> dict[str, Any] | None:
    try:
        note = json.loads((Path(bank) / NOTE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) else None


def served_by(bank: Path, err: BankLockedError) -> MsabankError:
    """`err` reworded when the lock holder is an `msabank serve` process (its note names the same pid)."""
    note = read_note(bank)
    pid = _lock_pid(bank)
    if note is None or pid is None or note.get("pid") != pid:
        return err
    url = note.get("url", "?")
    return BankLockedError(f"bank {bank} is served by `msabank serve` at {url} (pid {pid}), which holds its "
                           "writer lock", hint=f"send the change through the server: --server {url} (or set "
                           f"MSABANK_SERVER={url}); or stop the server first")


def _lock_pid(bank: Path) -> int | None:
    try:
        return int((Path(bank) / "LOCK").read_text().strip())
    except (OSError, ValueError):
        return None


# ---- running ---------------------------------------------------------------------------------------


def serve(bank: Path, *, model: Optional[str] = None, device: Optional[str] = None, host: str = "127.0.0.1",
          port: int = DEFAULT_PORT, api_key_file: Optional[Path] = None, read_key_file: Optional[Path] = None,
          limits: Limits | None = None, batch_size: int = 16, batch_wait_ms: float = 5.0, queue_size: int = 256,
          log_level: str = "warning", out: Any = None) -> None:
    """Serve `bank` until SIGINT/SIGTERM. Raises MsabankError when the options are refused or the engine
    cannot start (the bank is locked, missing, or bound to another model)."""
    import uvicorn

    out = out or sys.stdout
    api_keys = load_key(api_key_file, "--api-key-file")
    read_keys = load_key(read_key_file, "--read-key-file")
    check_bind(host, api_keys, read_keys)
    bank = Path(bank)
    if not (bank / "engine.json").exists():
        raise BankNotFoundError(f"{bank}: no msabank bank here", hint=f"create one with `msabank init {bank}`")
    failure: list[BaseException] = []
    bound: dict[str, Any] = {}
    server: uvicorn.Server | None = None

    def on_ready(err: BaseException | None) -> None:  # on the engine thread
        if err is not None:
            failure.append(err)
            if server is not None:
                server.should_exit = True
            return
        write_note(bank, {"pid": os.getpid(), "host": host, "port": bound.get("port"), "url": bound.get("url"),
                          "started_at": time.time(), "hostname": socket.gethostname()})
        _say(out, f"ready: bank {bank} at version {loop.state.version}, {loop.state.index_rows} index rows, "
                  f"loaded in {loop.state.load_seconds:.2f} s")

    def on_fatal(err: BaseException) -> None:  # on the engine thread: a memory-parallel rank is gone
        failure.append(err)
        if server is not None:
            server.should_exit = True

    loop_options: dict[str, Any] = dict(model=model, batch_size=batch_size, batch_wait_s=batch_wait_ms / 1000,
                                        queue_size=queue_size, on_ready=on_ready, on_fatal=on_fatal)
    group: Any = None
    if parallel.world_size() > 1:  # torchrun: rank 0 serves, the other ranks hold their shards and join
        import torch.distributed as dist

        from msabank.kernels.memory_parallel import init_from_env

        rank, _ = init_from_env()
        control = parallel.Control()
        group = dist.group.WORLD
        device = parallel.device_for_rank(device)
        if rank != 0:
            for sig in (signal.SIGINT, signal.SIGTERM):  # rank 0 says when to stop (torchrun signals every rank)
                signal.signal(sig, signal.SIG_IGN)
            try:
                parallel.worker(bank, model=model, device=device, control=control, group=group)
            finally:
                dist.destroy_process_group()
            return
        loop: EngineLoop = parallel.ParallelEngineLoop(bank, control, group=group, device=device, **loop_options)
    else:
        loop = EngineLoop(bank, device=device, **loop_options)
    config = ServeConfig(api_keys=api_keys, read_keys=read_keys, limits=limits or Limits(), bank=str(bank))
    app = create_app(loop, config)

    class _Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.should_exit:  # the port could not be bound
                return
            sock = self.servers[0].sockets[0].getsockname()
            bound["port"] = sock[1]
            shown = f"[{host}]" if ":" in host else host
            bound["url"] = f"http://{shown}:{sock[1]}"
            _say(out, f"listening on {bound['url']} (loading {bank})")
            loop.start()  # after the bind: /health answers while the model and index load

    ucfg = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="off",
                          http="h11", ws="none", timeout_graceful_shutdown=10, server_header=False)
    server = _Server(ucfg)
    # uvicorn re-raises the signal that stopped it once it has shut down; with these handlers in place
    # that re-raise only asks for the exit again, so the engine loop closes the bank and the note goes.
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    try:
        server.run()
    finally:
        loop.stop()
        remove_note(bank)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if group is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    _say(out, "stopped")
    if failure:
        err = failure[0]
        if isinstance(err, BankLockedError):
            raise served_by(bank, err)
        if isinstance(err, MsabankError):
            raise err
        raise MsabankError(f"the engine failed to start: {type(err).__name__}: {err}") from err
    if "port" not in bound:
        raise ConfigError(f"cannot listen on {host}:{port} (in use, or not an address of this machine)",
                          hint="pick another --port, or --port 0 for a free one")


def _say(out: Any, line: str) -> None:
    out.write(f"msabank serve: {line}\n")
    out.flush()

