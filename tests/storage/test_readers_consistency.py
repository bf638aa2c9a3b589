"""Readers in other processes each see one consistent bank version while a writer updates and compacts."""

from __future__ import annotations

import time
from pathlib import Path

import _helpers as H


def test_readers_see_consistent_versions(tmp_path: Path) -> None:
    path = tmp_path / "b"
    ids = [f"d{i}" for i in range(6)]
    with H.create(path, content_chunk_rows=2, routing_chunk_rows=4) as bank:
        H.put(bank, [(u, f"{u} {'x' * i} round 0") for i, u in enumerate(ids)])
        ctx = H.worker_context()
        q = ctx.Queue()
        readers = [ctx.Process(target=H.consistent_reader, args=(str(path), 4.0, q)) for _ in range(2)]
        for p in readers:
            p.start()
        k = 0
        t_end = time.monotonic() + 6.0
        while any(p.is_alive() for p in readers) and time.monotonic() < t_end:
            k += 1
            H.put(bank, [(u, f"{u} {'y' * (k % 7 + i)} round {k}") for i, u in enumerate(ids)])
            if k % 3 == 0:
                bank.compact()  # moves rows into a new generation under the readers
        results = [q.get(timeout=60) for _ in readers]
        for p in readers:
            p.join()
        assert bank.verify().ok
    for status, checked, rounds in results:
        assert status == "ok", checked
        assert checked > 3 and rounds > 1, (checked, rounds)
