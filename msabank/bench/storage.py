"""Storage benchmark (not a test): put throughput, bulk routing reads, content-KV fetch latency, bytes per
token, and the cost of updating one 1K-token document in banks of growing size.

`run_storage_bench(out_json, ...)` writes a JSON report and returns it as a dict; the CLI
(`msabank bench storage`) and docs/benchmarks.md use it. Tensors are random bf16 at the MSA-4B geometry
(18 router layers, 8 KV heads, head dim 128, 64-token chunks). Filler documents of the large banks are one
chunk of zeros each (so a 1M-document bank fits on a dev disk); the documents whose cost is measured
are random. Nothing here prints; progress goes to the `log` callback if given.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from msabank.storage.bank import Bank
from msabank.storage.records import DocumentWrite, Geometry, content_hash
from msabank.types import EncodedMemory

MSA_4B = Geometry(num_router_layers=18, num_layers=36, num_kv_heads=8, head_dim=128, chunk_size=64, template_len=3)
THEORY_BYTES_PER_TOKEN = 1728  # MSA_SPEC §10: (18 routing + 2 x 18 content) x 8 x 128 x 2 B / 64 tokens


def _memory(g: Geometry, n_tokens: int, gen: torch.Generator | None) -> EncodedMemory:
    c = -(-n_tokens // g.chunk_size)
    shape = (g.num_router_layers, c, g.num_kv_heads, g.head_dim)
    if gen is None:
        z = torch.zeros(shape, dtype=torch.bfloat16)
        return EncodedMemory(n_tokens, z, z, z)
    rk, k, v = (torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(3))
    return EncodedMemory(n_tokens, rk, k, v)


def _io() -> dict[str, int]:
    """This process's I/O counters (wchar: bytes handed to write(); write_bytes: bytes sent to the device)."""
    try:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        return {k: int(v) for k, v in fields.items()}
    except OSError:  # not Linux
        return {}


def _raw_bytes(g: Geometry, chunks: int) -> int:
    return chunks * (g.content_row_bytes + g.routing_row_bytes)


def _template(g: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.zeros((g.num_layers, g.num_kv_heads, g.template_len, g.head_dim), dtype=torch.bfloat16)
    return z, z


def _bench_put_read(root: Path, g: Geometry, docs: int, doc_tokens: int, batch: int, log: Callable[[str], None]) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    pool = [_memory(g, doc_tokens, gen) for _ in range(min(docs, 32))]
    bank = Bank.create(root / "put", g, "bench", *_template(g))
    try:
        t_put = 0.0
        n = 0
        for start in range(0, docs, batch):
            writes = []
            for i in range(start, min(docs, start + batch)):
                text = f"document {i}"
                writes.append(DocumentWrite(f"d{i}", i, text, content_hash(text), pool[i % len(pool)]))
            t0 = time.perf_counter()
            bank.write(writes)
            t_put += time.perf_counter() - t0
            n += len(writes)
        stats = bank.stats()
        raw = _raw_bytes(g, stats.live_chunks)
        log(f"put {n} docs in {t_put:.1f}s")
        t0 = time.perf_counter()
        with bank.snapshot() as s:
            for layer in range(g.num_router_layers):
                keys, _rows = s.routing_keys(layer)
        t_route = time.perf_counter() - t0
        route_bytes = stats.live_chunks * g.routing_row_bytes
        rng = random.Random(0)
        lat = []
        for _ in range(20):
            numbers = rng.sample(range(docs), 16)
            t0 = time.perf_counter()
            kv = bank.content_kv(numbers)
            lat.append(time.perf_counter() - t0)
        assert len(kv) == 16
        lat.sort()
        return {
            "docs": n,
            "tokens_per_doc": doc_tokens,
            "batch_docs": batch,
            "put_seconds": round(t_put, 3),
            "put_MB_per_s": round(raw / t_put / 1e6, 1),
            "put_tokens_per_s": round(stats.tokens / t_put),
            "routing_read_MB_per_s": round(route_bytes / t_route / 1e6, 1),
            "routing_read_seconds_all_layers": round(t_route, 3),
            "content_kv_16_docs_ms_median": round(statistics.median(lat) * 1e3, 2),
            "content_kv_16_docs_ms_p90": round(lat[int(0.9 * len(lat))] * 1e3, 2),
            "content_kv_16_docs_MB": round(16 * (-(-doc_tokens // g.chunk_size)) * g.content_row_bytes / 1e6, 2),
            "bytes_per_token_tensors": round(stats.tensor_bytes_on_disk / stats.tokens, 1),
            "bytes_per_token_total": round(stats.bytes_on_disk / stats.tokens, 1),
            "bytes_per_token_theory": THEORY_BYTES_PER_TOKEN,
            "compression_ratio": round(raw / stats.tensor_bytes_on_disk, 3),
        }
    finally:
        bank.close()


def _bench_update_cost(
    root: Path, g: Geometry, sizes: Sequence[int], filler_batch: int, repeats: int, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(1)
    filler = _memory(g, g.chunk_size, None)
    bank = Bank.create(root / "update", g, "bench", *_template(g))
    out = []
    try:
        n = 0
        for size in sorted(sizes):
            t0 = time.perf_counter()
            while n < size:
                writes = []
                for i in range(n, min(size, n + filler_batch)):
                    text = f"filler {i}"
                    writes.append(DocumentWrite(f"f{i}", i, text, content_hash(text), filler))
                bank.write(writes)
                n += len(writes)
            log(f"bank at {n} docs ({time.perf_counter() - t0:.0f}s to grow)")
            times: list[float] = []
            wchar: list[int] = []
            dev: list[int] = []
            target = "f0"
            for r in range(repeats):
                text = f"updated {size} {r}"
                m = _memory(g, 1024, gen)
                io0 = _io()
                t0 = time.perf_counter()
                bank.write([DocumentWrite(target, 0, text, content_hash(text), m)])
                times.append(time.perf_counter() - t0)
                io1 = _io()
                wchar.append(io1.get("wchar", 0) - io0.get("wchar", 0))
                dev.append(io1.get("write_bytes", 0) - io0.get("write_bytes", 0))
            stats = bank.stats()
            out.append(
                {
                    "bank_docs": size,
                    "bank_rows": stats.total_rows,
                    "update_ms_median": round(statistics.median(times) * 1e3, 1),
                    "update_ms_max": round(max(times) * 1e3, 1),
                    "doc_raw_bytes": _raw_bytes(g, 16),
                    "bytes_written_median": int(statistics.median(wchar)),
                    "device_bytes_written_median": int(statistics.median(dev)),
                    "tensor_bytes_on_disk": stats.tensor_bytes_on_disk,
                }
            )
            log(f"update at {size}: {out[-1]}")
    finally:
        bank.close()
    return out


def run_storage_bench(
    out_json: str | os.PathLike[str] | None = None,
    *,
    workdir: str | os.PathLike[str] | None = None,
    put_docs: int = 512,
    doc_tokens: int = 1024,
    put_batch: int = 64,
    update_sizes: Sequence[int] = (10_000, 100_000, 1_000_000),
    update_repeats: int = 5,
    filler_batch: int = 4096,
    machine: str = "",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the storage benchmark at the MSA-4B geometry; write the report to `out_json` and return it.

    Sizes whose bank would not fit in the free space of `workdir` (checked first, like `df`) are skipped
    and listed under `skipped`. The work directory is removed afterwards.
    """
    say = log or (lambda _msg: None)
    g = MSA_4B
    base = Path(workdir) if workdir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="msabank-bench-", dir=base))
    free = shutil.disk_usage(root).free
    # filler rows are zeros (~2.5 KB/row compressed, measured) + ~0.5 KB of LMDB per document; 3x margin
    need_put = _raw_bytes(g, put_docs * -(-doc_tokens // g.chunk_size))
    fits = [s for s in update_sizes if 3 * s * 3_000 + need_put < free]
    report: dict[str, Any] = {
        "machine": machine,
        "geometry": g.to_dict(),
        "free_bytes_at_start": free,
        "skipped": [s for s in update_sizes if s not in fits],
    }
    t0 = time.perf_counter()
    try:
        report["put_read"] = _bench_put_read(root, g, put_docs, doc_tokens, put_batch, say)
        shutil.rmtree(root / "put", ignore_errors=True)
        report["update_cost"] = _bench_update_cost(root, g, fits, filler_batch, update_repeats, say)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    if out_json is not None:
        Path(out_json).write_text(json.dumps(report, indent=2) + "\n")
    return report
