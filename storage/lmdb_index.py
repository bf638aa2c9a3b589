"""LMDB side of a bank: the environment, its named databases and record encodings.

Keys are big-endian integers (LMDB sorts keys bytewise, so big-endian keeps numeric order) or UTF-8 user
ids; values are JSON (records) or packed structs (row spans, read in bulk). One environment per bank
directory per process, shared between `Bank` objects through a small registry: LMDB must not be opened
twice in one process, and an environment must never be used across `fork` (checked by pid).
See docs/storage-format.md for the layout. No tensors here.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from msabank.errors import BankError

T = TypeVar("T")

DB_NAMES = ("meta", "ids", "docs", "versions", "spans", "changes")
DEFAULT_MAP_SIZE = 1 << 30  # 1 GiB to start; doubled on MapFullError (the file is sparse)

_SPAN = struct.Struct(">qq")  # row_start, num_chunks


def k_num(n: int) -> bytes:
    """A document number or bank version as an 8-byte big-endian key."""
    return n.to_bytes(8, "big")


def num_k(b: bytes) -> int:
    return int.from_bytes(b, "big")


def k_ver(number: int, version: int) -> bytes:
    """Key of one document version: number (8 bytes BE) then version (4 bytes BE)."""
    return number.to_bytes(8, "big") + version.to_bytes(4, "big")


def ver_k(b: bytes) -> tuple[int, int]:
    return int.from_bytes(b[:8], "big"), int.from_bytes(b[8:12], "big")


def pack_span(row_start: int, num_chunks: int) -> bytes:
    return _SPAN.pack(row_start, num_chunks)


def unpack_span(b: bytes) -> tuple[int, int]:
    s, c = _SPAN.unpack(b)
    return int(s), int(c)


def enc(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def dec(b: bytes) -> Any:
    return json.loads(b)


class Index:
    """An open LMDB environment of one bank (shared per process) with its named databases."""

    def __init__(self, env: lmdb.Environment, path: Path) -> None:
        self.env = env
        self.path = path
        self.pid = os.getpid()
        self.dbs: dict[str, Any] = {name: env.open_db(name.encode()) for name in DB_NAMES}
        self.refs = 0

    def db(self, name: str) -> Any:
        return self.dbs[name]

    def check_pid(self) -> None:
        if os.getpid() != self.pid:
            raise BankError(
                f"bank {self.path.parent} was opened in process {self.pid} and used after fork in {os.getpid()}",
                hint="open the bank again in the child process (LMDB environments must not cross fork)",
            )

    def begin_read(self) -> lmdb.Transaction:
        """A read transaction; picks up a map grown by another process (MapResizedError)."""
        self.check_pid()
        for _ in range(3):
            try:
                return self.env.begin(buffers=False)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)
        return self.env.begin(buffers=False)

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run fn in one write transaction and commit; on MapFullError grow the map and run fn again.

        fn must only put/delete through the transaction (it may run twice). LMDB commits with fsync, so a
        returned value means the change is durable.
        """
        self.check_pid()
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except lmdb.MapResizedError:
                self.env.set_mapsize(0)


_registry: dict[tuple[int, str], Index] = {}
_registry_lock = threading.Lock()


def open_index(path: Path, *, create: bool = False, map_size: int | None = None) -> Index:
    """Open (or share) the LMDB environment in `path` (a directory)."""
    key = (os.getpid(), str(path.resolve()))
    with _registry_lock:
        idx = _registry.get(key)
        if idx is None:
            if not create and not (path / "data.mdb").exists():
                raise FileNotFoundError(path / "data.mdb")
            env = lmdb.open(
                str(path),
                map_size=map_size or DEFAULT_MAP_SIZE,
                max_dbs=len(DB_NAMES) + 2,
                subdir=True,
                create=create,
                readahead=False,
                max_readers=1024,
            )
            idx = Index(env, path)
            _registry[key] = idx
        idx.refs += 1
        return idx


def close_index(idx: Index) -> None:
    with _registry_lock:
        idx.refs -= 1
        if idx.refs <= 0:
            _registry.pop((idx.pid, str(idx.path.resolve())), None)
            if os.getpid() == idx.pid:
                idx.env.close()
