"""A real `msabank serve` subprocess on 127.0.0.1 with the embedded model, shared per test module.

The server prints `listening on URL` once the port is bound and `ready: …` once the model and the routing
index are loaded, so a fixture reads its stdout instead of polling with a clock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import pytest

WRITE_KEY = "test-write-key-0123456789"
READ_KEY = "test-read-key-0123456789"

CORPUS = [
    ("lighthouse", "The lighthouse at Bray was built by the Acme Company in 1901."),
    ("acme", "The Acme Company was founded by Jane Roe, a shipwright from Cork."),
    ("river", "The river Liffey flows through Dublin into the Irish Sea."),
    ("bridge", "The Ha'penny Bridge crosses the Liffey; it opened in 1816."),
    ("roe", "Jane Roe was born in 1850 and died in 1931."),
    ("cork", "Cork is a city in the south of Ireland with a large natural harbour."),
]


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str
    bank: Path
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.stdout:
                self.proc.stdout.close()


def _line(out: IO[str], proc: subprocess.Popen[str], want: str, log: Path) -> str:
    for _ in range(200):  # a bounded number of lines, not a clock
        line = out.readline()
        if not line:
            raise AssertionError(f"server exited (rc {proc.wait()}) before {want!r}:\n{log.read_text()}")
        if want in line:
            return line
    raise AssertionError(f"no {want!r} line from the server")


def start_server(bank: Path, log: Path, *args: str) -> Server:
    """`msabank serve BANK --port 0 …` as a subprocess; returns once it printed `ready:`."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    errf = open(log, "w")  # noqa: SIM115 - the child writes it for its whole life
    proc = subprocess.Popen([sys.executable, "-m", "msabank.cli.main", "serve", str(bank), "--port", "0",
                             "--device", "cpu", *args], stdout=subprocess.PIPE, stderr=errf, text=True, env=env)
    errf.close()
    assert proc.stdout is not None
    line = _line(proc.stdout, proc, "listening on ", log)
    url = line.split("listening on ", 1)[1].split()[0]
    _line(proc.stdout, proc, "ready:", log)
    return Server(proc, url, bank, log)


def make_bank(path: Path, docs: list[tuple[str, str]]) -> Path:
    from msabank.engine import Engine

    with Engine.create(path, device="cpu") as eng:
        eng.put(docs)
    return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("keys")
    (d / "write.key").write_text(WRITE_KEY + "\n")
    (d / "read.key").write_text(READ_KEY + "\n")
    return d / "write.key", d / "read.key"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> Iterator[Server]:
    """One server for the module: both keys, small limits so refusals are cheap to provoke."""
    d = tmp_path_factory.mktemp("served")
    bank = make_bank(d / "bank", CORPUS)
    s = start_server(bank, d / "server.log", "--api-key-file", str(keys[0]), "--read-key-file", str(keys[1]),
                     "--max-body-bytes", "65536", "--max-documents", "8", "--max-rounds", "2",
                     "--max-new-tokens", "16", "--max-question-tokens", "64", "--batch-wait-ms", "20",
                     "--min-version-wait", "0")
    yield s
    s.stop()
