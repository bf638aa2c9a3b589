"""Serving benchmark: restart time against the time to read the bank from disk, commit-to-visible through
HTTP, and questions/s with p50/p99 latency at several numbers of concurrent clients.

`python -m msabank.serve.bench [--docs N] [--model DIR] [--device D] [--clients 1,8,32] [--out DIR]`
builds a synthetic bank (msabank.synth) with the real engine, then runs real `msabank serve` processes
against it. Results are one JSON-able dict (saved as bench_serve.json). Restart time is the issue's
bound: a killed server must be ready again in at most 2x the time it takes to read the bank's routing
keys and content from disk (`disk_read_s`, measured here through the same storage reads the index load
uses; the page cache is warm unless the caller drops it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional


def disk_read_seconds(bank: Path) -> dict[str, Any]:
    """Seconds to read every live routing key (per router layer) and all content K/V of `bank` (storage
    only, no model): the floor a restart's index load is held to."""
    from msabank.storage.bank import Bank

    with Bank.open(bank, readonly=True) as b, b.snapshot() as snap:
        t = time.perf_counter()
        nbytes = 0
        for r in range(b.geometry.num_router_layers):
            keys = snap.routing_keys(r)[0]
            nbytes += keys.numel() * keys.element_size()
            del keys
        numbers = [int(n) for n in snap.row_map()[0]]
        for i in range(0, len(numbers), 1024):
            for kv in snap.content_kv(numbers[i:i + 1024]).values():
                nbytes += kv.numel() * kv.element_size()
        return {"seconds": time.perf_counter() - t, "bytes": nbytes, "documents": len(numbers)}


class _Proc:
    def __init__(self, bank: Path, args: list[str], log: Path) -> None:
        self.t0 = time.perf_counter()
        errf = open(log, "a")  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, "-m", "msabank.cli.main", "serve", str(bank), "--port", "0",
                                      *args], stdout=subprocess.PIPE, stderr=errf, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        errf.close()
        self.url = self._wait("listening on ").split("listening on ", 1)[1].split()[0]
        self.listening_s = time.perf_counter() - self.t0
        self._wait("ready:")
        self.ready_s = time.perf_counter() - self.t0

    def _wait(self, want: str) -> str:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited (rc {self.proc.wait()}) before printing {want!r}")
            if want in line:
                return line

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=120)
        if self.proc.stdout:
            self.proc.stdout.close()


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def run_serve_bench(*, docs: int = 2000, model: Optional[str] = None, device: Optional[str] = None,
                    clients: tuple[int, ...] = (1, 8, 32), questions_per_client: int = 4, max_new_tokens: int = 16,
                    max_rounds: int = 1, seed: int = 7, workdir: Optional[Path] = None) -> dict[str, Any]:
    import httpx

    from msabank.engine import Engine
    from msabank.synth import World

    world = World(seed=seed, num_docs=docs)
    out: dict[str, Any] = {"docs": docs, "seed": seed}
    with tempfile.TemporaryDirectory(prefix="msabank-bench-serve-", dir=workdir) as tmp:
        bank = Path(tmp) / "bank"
        with Engine.create(bank, model, device=device) as eng:
            eng.ingest(((d.id, d.text) for d in world.documents()), batch_size=64)
            st = eng.stats()
            out["device"] = str(eng.model.device)
            out["bank"] = {"documents": st.documents, "tokens": st.tokens, "chunks": st.live_chunks,
                           "bytes_on_disk": st.bytes_on_disk}
        out["disk_read"] = disk_read_seconds(bank)
        args = ["--device", device] if device else []
        if model:
            args += ["--model", model]
        log = Path(tmp) / "server.log"

        first = _Proc(bank, args, log)
        with httpx.Client(base_url=first.url, timeout=600) as c:
            ready = c.get("/ready").json()
            load_first = {"load_s": ready["load_seconds"], **ready["load"]}
            # commit-to-visible: a write's reply comes after the commit and the in-place index refresh
            lat = []
            for i in range(5):
                d = world.document(i)
                t = time.perf_counter()
                v = c.put(f"/v1/documents/{d.id}", json={"text": d.text + f" Revision {i}."}).json()["version"]
                acked = time.perf_counter() - t
                c.post("/v1/retrieve", json={"question": d.text[:80], "min_version": v}).raise_for_status()
                lat.append({"write_reply_s": acked, "write_to_retrieve_reply_s": time.perf_counter() - t})
            # the reply comes after commit + index refresh: from then on every question sees the write
            out["commit_to_visible"] = {k: statistics.median(x[k] for x in lat) for k in lat[0]}
            if clients:
                out["throughput"] = _throughput(first.url, world, clients, questions_per_client, max_new_tokens,
                                                max_rounds, seed)
        first.stop(signal.SIGKILL)
        second = _Proc(bank, args, log)  # restart after a kill: stale note, the lock freed by the kernel
        with httpx.Client(base_url=second.url, timeout=600) as c:
            ready = c.get("/ready").json()
            load_second = {"load_s": ready["load_seconds"], **ready["load"]}
        second.stop()
        out["start"] = {"first": {"spawn_to_listening_s": first.listening_s, "spawn_to_ready_s": first.ready_s,
                                  **load_first},
                        "restart_after_kill": {"spawn_to_listening_s": second.listening_s,
                                               "spawn_to_ready_s": second.ready_s, **load_second}}
        disk = max(out["disk_read"]["seconds"], 1e-9)
        out["restart_over_disk_read"] = {"spawn_to_ready": second.ready_s / disk,
                                         "index_load": load_second["index_s"] / disk}
    return out


def _throughput(url: str, world: Any, clients: tuple[int, ...], per_client: int, max_new_tokens: int,
                max_rounds: int, seed: int) -> list[dict[str, Any]]:
    import httpx

    qs = [q.question for q in world.questions(64, seed=seed + 1)]
    rows = []
    for n in clients:
        lat: list[float] = []
        batch: list[int] = []
        lock = threading.Lock()

        def worker(k: int) -> None:
            with httpx.Client(base_url=url, timeout=600) as c:
                for j in range(per_client):
                    q = qs[(k * per_client + j) % len(qs)]
                    t = time.perf_counter()
                    r = c.post("/v1/ask", json={"question": q, "max_new_tokens": max_new_tokens,
                                                "max_rounds": max_rounds})
                    r.raise_for_status()
                    with lock:
                        lat.append(time.perf_counter() - t)
                        batch.append(r.json()["batch_size"])

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rows.append({"clients": n, "questions": len(lat), "questions_per_s": len(lat) / wall,
                     "p50_s": _pct(lat, 50), "p99_s": _pct(lat, 99), "mean_batch": statistics.mean(batch)})
    base = rows[0]["questions_per_s"]
    for r in rows:
        r["speedup_vs_first"] = r["questions_per_s"] / base
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m msabank.serve.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--clients", default="1,8,32", help="comma-separated client counts ('' skips throughput)")
    ap.add_argument("--questions-per-client", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    a = ap.parse_args(argv)
    res = run_serve_bench(docs=a.docs, model=a.model, device=a.device,
                          clients=tuple(int(x) for x in a.clients.split(",") if x.strip()),
                          questions_per_client=a.questions_per_client, max_new_tokens=a.max_new_tokens)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_serve.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
