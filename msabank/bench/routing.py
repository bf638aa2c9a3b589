"""Benchmarks for the serving path: routing latency per question and content-fetch bandwidth.

Synthetic banks at the MSA-4B geometry (18 router layers, 8 KV heads × head dim 128 = 1,024-dim routing
keys, 64-token chunks): 1M, 10M, 100M tokens = 15.6K, 156K, 1.56M chunks per layer; 576 B of bf16 keys
per token, 57.6 GB at 100M tokens. Keys are generated on the device (no host copy) in blocks of
65,536 rows with per-block seeds, so a 2-GPU shard holds bit-identical rows to the 1-GPU bank.

Every figure is printed next to floors measured in the same run on the same card:
- HBM read floor: key bytes / copy bandwidth (a device-to-device copy, bytes read + written);
- tensor-core floor: 2·T·1024·rows·18 FLOPs / the rate of a bf16 8192³ GEMM;
- pinned host→device bandwidth for content fetch.

`python -m msabank.bench routing|fetch|all --out DIR` or `msabank bench ...`; results go to
DIR/bench_*.json plus a PNG plot when matplotlib imports. Runs on CPU with tiny sizes (smoke tests).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from msabank.kernels import routing_topk, routing_topk_batched

log = logging.getLogger(__name__)

LAYERS, KV_HEADS, HEAD_DIM, CHUNK = 18, 8, 128, 64
DIM = KV_HEADS * HEAD_DIM
BLOCK_ROWS = 65_536  # generation block: documents never straddle one, shards take whole blocks
TOP_K = 16


def parse_tokens(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(s[-1:], 1)
    return int(float(s[:-1] if s[-1:] in "KMG" else s) * mult)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, *, reps: int, warmup: int = 1) -> list[float]:
    """Wall times of fn() in ms, device synchronised before and after each call."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# -- ceilings -----------------------------------------------------------------------------------------


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy in bytes/s, counting bytes read + written (the HBM ceiling)."""
    if device.type != "cuda":
        nbytes = 64 << 20
    a = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t = statistics.median(time_ms(lambda: b.copy_(a), device, reps=10, warmup=2))
    del a, b
    return 2 * nbytes / (t / 1e3)


def gemm_flops(device: torch.device, n: int = 8192) -> float:
    """bf16 n³ GEMM on random data in FLOP/s (the tensor-core ceiling)."""
    if device.type != "cuda":
        n = 512
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    t = statistics.median(time_ms(lambda: a @ b, device, reps=10, warmup=3))
    return 2 * n**3 / (t / 1e3)


def h2d_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> dict[str, float]:
    """Pinned (and pageable) host→device copy in bytes/s, one large copy."""
    out = {}
    for pinned in (True, False):
        src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8).pin_memory() if pinned else torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        t = statistics.median(time_ms(lambda: dst.copy_(src, non_blocking=True), device, reps=5, warmup=1))
        out["pinned" if pinned else "pageable"] = nbytes / (t / 1e3)
        del src, dst
    return out


# -- synthetic banks ---------------------------------------------------------------------------------


class SyntheticShard:
    """Routing keys generated on the device, with what `ShardedRoutingIndex` and `routing_topk` need.

    keys[l]: (rows, 1024) bf16; row_doc (rows,) int32 global document numbers; documents have 1..5
    chunks (mean 3), drawn per block from a CPU generator so every rank agrees on the numbering.
    """

    def __init__(self, tokens: int, *, layers: int, device: torch.device, dtype: torch.dtype,
                 rank: int = 0, world_size: int = 1, seed: int = 0, block_rows: int = BLOCK_ROWS) -> None:
        self.device, self.dtype, self.impl = device, dtype, None
        total_rows = -(-tokens // CHUNK)
        blocks = -(-total_rows // block_rows)
        g = torch.Generator().manual_seed(seed)
        doc_base = 0
        mine: list[tuple[int, int, torch.Tensor]] = []  # (block, rows, row_doc)
        for b in range(blocks):
            rows = min(block_rows, total_rows - b * block_rows)
            counts = torch.randint(1, 6, (rows // 2 + 8,), generator=g)  # sums to ~1.5x rows: enough
            cum = counts.cumsum(0)
            n = int(torch.searchsorted(cum, torch.tensor(rows))) + 1
            counts = counts[:n].clone()
            counts[-1] -= int(cum[n - 1]) - rows  # the last document ends at the block boundary
            if b % world_size == rank:
                rd = torch.repeat_interleave(torch.arange(doc_base, doc_base + n, dtype=torch.int32), counts)
                mine.append((b, rows, rd))
            doc_base += n
        self.num_docs = doc_base
        self.total_rows = total_rows
        self.rows = sum(r for _, r, _ in mine)
        self.row_doc = torch.cat([rd for _, _, rd in mine]).to(device) if mine else torch.empty(0, dtype=torch.int32, device=device)
        # One (layers, rows, DIM) allocation, self.keys[l] its layer views: the all-layer kernel reads it
        # in one launch, everything else sees the per-layer matrices the routing index holds.
        self.keys_all = torch.empty(layers, self.rows, DIM, dtype=dtype, device=device)
        self.keys = list(self.keys_all.unbind(0))
        for layer in range(layers):
            kl = self.keys[layer]
            pos = 0
            for b, rows, _ in mine:
                gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + layer * 10_007 + b)
                kl[pos : pos + rows].normal_(generator=gen)  # bf16 written in place: no fp32 temporary
                pos += rows

    def layer(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.keys[layer_index], self.row_doc, self.num_docs

    def key_bytes(self) -> int:
        return sum(k.numel() * k.element_size() for k in self.keys)


def queries(T: int, layers: int, device: torch.device, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(T, DIM, device=device, dtype=torch.float32, generator=g).to(dtype) for _ in range(layers)]


def route_question(bank: Any, qs: Sequence[torch.Tensor], impl: str, *, sync_each: bool = False) -> list[torch.Tensor]:
    """One question: top-k in every router layer. sync_each brings each layer's top-k to the host as
    the engine must (its content fetch needs the numbers); otherwise one wait at the end."""
    out = []
    for layer, q in enumerate(qs):
        keys, row_doc, num_docs = bank.layer(layer)
        s, i = routing_topk(q, keys, row_doc, num_docs, TOP_K, impl=impl, pad=True)
        out.append(i.cpu() if sync_each else i)
    return out


def route_batch(bank: Any, qs: Sequence[torch.Tensor], seq: torch.Tensor, n: int, impl: str, *,
                all_layers: bool = False, sync_each: bool = False) -> list[torch.Tensor]:
    """n questions at once (qs[l]: their rows of layer l, concatenated; seq the question id of each row):
    one scan per layer (`routing_topk_batched`), or with all_layers one scan launch for every layer
    (what a question costs when its layers' queries are known together: the floor of item 6, issue 12).
    Returns per layer (n, k) ids (sync_each: brought to the host per layer, as the engine does)."""
    if all_layers:
        _, i = routing_topk_batched(torch.stack(list(qs)), seq, n, bank.keys_all, bank.row_doc, bank.num_docs, TOP_K,
                                    impl=impl)
        return list(i.cpu() if sync_each else i)
    out = []
    for layer, q in enumerate(qs):
        keys, row_doc, num_docs = bank.layer(layer)
        _, i = routing_topk_batched(q, seq, n, keys, row_doc, num_docs, TOP_K, impl=impl)
        out.append(i.cpu() if sync_each else i)
    return out


def batched_queries(qs: Sequence[torch.Tensor], n: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Question 0 is the single-question query of every layer (so its answers can be compared); n - 1 more
    questions of the same length drawn from `seed`."""
    T = qs[0].shape[0]
    extra = queries(T * (n - 1), len(qs), qs[0].device, qs[0].dtype, seed) if n > 1 else [q[:0] for q in qs]
    seq = torch.repeat_interleave(torch.arange(n, device=qs[0].device), T)
    return [torch.cat([q, e]) for q, e in zip(qs, extra)], seq


# -- routing -------------------------------------------------------------------------------------------


def sweep_configs(bank: Any, q_tokens: Sequence[int], copy_bw: float, flops: float) -> dict[str, Any]:
    """Time the scan kernel alone for every candidate tile config on one bank layer, per query length,
    and install the fastest in `triton_routing.SCAN_CONFIGS` for the rest of the run."""
    from msabank.kernels import triton_routing as tr

    out: dict[str, Any] = {}
    keys = [bank.keys[i % len(bank.keys)] for i in range(2)]  # alternate two layers: no L2 reuse
    layer_bytes = keys[0].numel() * keys[0].element_size()
    for T in q_tokens:
        q = torch.randn(T, DIM, device=bank.device).to(bank.dtype)
        rows = []
        for cfg in tr.candidate_configs(T):
            try:
                t = time_ms(lambda: [tr.routing_scan(q, k, bank.row_doc, bank.num_docs, config=cfg) for k in keys],
                            bank.device, reps=5, warmup=1)
            except Exception as err:  # out of shared memory, unsupported TMA, ...: skip the config
                rows.append({"config": cfg, "error": str(err).splitlines()[0][:200]})
                continue
            ms = statistics.median(t) / 2
            rows.append({"config": cfg, "ms_per_layer": ms, "GBps": layer_bytes / ms / 1e6,
                         "TFLOPs": 2 * T * DIM * bank.rows / ms / 1e9,
                         "x_floor": ms / max(layer_bytes / copy_bw * 1e3, 2 * T * DIM * bank.rows / flops * 1e3)})
        ok = sorted((r for r in rows if "ms_per_layer" in r), key=lambda r: r["ms_per_layer"])
        if ok:
            best = tuple(ok[0]["config"])
            bucket = min((b for b in tr.SCAN_CONFIGS if T <= b), default=max(tr.SCAN_CONFIGS))
            tr.SCAN_CONFIGS[bucket] = best  # type: ignore[assignment]
            log.info("sweep T=%d: best %s %.3f ms/layer (%.2fx floor); default was %s", T, best,
                     ok[0]["ms_per_layer"], ok[0]["x_floor"], tr.config_for(T))
            for r in ok[:6]:
                log.info("   %-36s %.3f ms  %6.0f GB/s  %5.0f TFLOP/s", r["config"], r["ms_per_layer"], r["GBps"], r["TFLOPs"])
        out[str(T)] = {"rows": rows, "best": ok[0]["config"] if ok else None}
    return out


def bench_routing(sizes: Sequence[int], q_tokens: Sequence[int], impls: Sequence[str], *, device: torch.device,
                  layers: int = LAYERS, reps: int = 5, sweep: bool = True, batch: int = 8) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    copy_bw = copy_bandwidth(device)
    flops = gemm_flops(device)
    res: dict[str, Any] = {"card": card_name(device), "copy_bandwidth_Bps": copy_bw, "gemm_flops": flops,
                           "layers": layers, "dim": DIM, "top_k": TOP_K, "dtype": str(dtype), "rows": []}
    log.info("copy %.0f GB/s, bf16 GEMM %.0f TFLOP/s on %s", copy_bw / 1e9, flops / 1e12, res["card"])
    for tokens in sorted(sizes, reverse=True):  # the largest first: autotuning happens on it
        bank = SyntheticShard(tokens, layers=layers, device=device, dtype=dtype)
        read_floor = bank.key_bytes() / copy_bw * 1e3
        if sweep and "triton" in impls and device.type == "cuda" and "sweep" not in res:
            res["sweep"] = sweep_configs(bank, q_tokens, copy_bw, flops)
        for T in q_tokens:
            qs = queries(T, layers, device, dtype, seed=T)
            tensor_floor = 2 * T * DIM * bank.rows * layers / flops * 1e3
            answers = {}
            for impl in impls:
                for sync_each in ((False, True) if impl == "triton" else (False,)):
                    fn = lambda: route_question(bank, qs, impl, sync_each=sync_each)  # noqa: E731
                    row = _time_row(fn, device, tokens, T, impl, sync_each, bank, read_floor, tensor_floor, reps)
                    if row:
                        res["rows"].append(row)
                try:
                    answers[impl] = [i.cpu() for i in route_question(bank, qs, impl)]
                except Exception:  # a benchmark harness: record and go on with the other impls
                    log.exception("%s failed", impl)
            if "triton" in impls and device.type == "cuda":
                # the scan kernel alone (no -inf fill, candidate pass or sort): where the time goes
                from msabank.kernels.triton_routing import routing_scan

                def scan_only() -> None:
                    for layer, q in enumerate(qs):
                        routing_scan(q, bank.keys[layer], bank.row_doc, bank.num_docs)

                row = _time_row(scan_only, device, tokens, T, "triton-scan-only", False, bank, read_floor, tensor_floor, reps)
                if row:
                    res["rows"].append(row)
            for row, ans in _batched_rows(bank, qs, impls, batch, device, tokens, T, read_floor, flops, reps):
                res["rows"].append(row)
                answers.update(ans)
            if len(answers) > 1:
                res.setdefault("agreement", []).append(_agreement(tokens, T, answers, bank, qs))
        del bank
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def _batched_rows(bank: Any, qs: Sequence[torch.Tensor], impls: Sequence[str], batch: int, device: torch.device,
                  tokens: int, T: int, read_floor: float, flops: float, reps: int
                  ) -> list[tuple[dict[str, Any], dict[str, list[torch.Tensor]]]]:
    """The batched paths beside the per-question rows: one question with all its layers in one launch, and
    `batch` questions per scan (per layer, and all layers at once). Each row's floors are the same run's:
    the keys are read once whatever the batch, the tensor-core floor grows with batch·T."""
    out = []
    layers = len(qs)
    for n in sorted({1, batch}):
        if n < 1:
            continue
        bq, seq = batched_queries(qs, n, seed=10_000 + T)
        tensor_floor = 2 * n * T * DIM * bank.rows * layers / flops * 1e3
        for impl in impls:
            if impl == "triton" and device.type != "cuda":
                continue  # the interpreter is a test tool (tests/kernels covers these kernels), not a benchmark
            modes = [(True, False), (True, True)] if impl == "triton" else []
            if n > 1:
                modes = [(False, False), (False, True)] + modes
            if device.type != "cuda":  # everything waits on the host there: a "sync" row would repeat the other
                modes = [m for m in modes if not m[1]]
            for all_layers, sync_each in modes:
                if impl != "triton" and all_layers:
                    continue
                label = f"{impl}-batch{n}" + ("-all-layers" if all_layers else "")
                fn = lambda: route_batch(bank, bq, seq, n, impl, all_layers=all_layers, sync_each=sync_each)  # noqa: E731
                row = _time_row(fn, device, tokens, T, label, sync_each, bank, read_floor, tensor_floor, reps)
                if row is None:
                    continue
                row["questions"] = n
                row["ms_per_question"] = row["ms"] / n
                ans: dict[str, list[torch.Tensor]] = {}
                if not sync_each:  # question 0 is the single-question query: its ids join the agreement check
                    ans[label] = [i[0].cpu() for i in route_batch(bank, bq, seq, n, impl, all_layers=all_layers)]
                out.append((row, ans))
    return out


def _time_row(fn: Callable[[], Any], device: torch.device, tokens: int, T: int, impl: str, sync_each: bool,
              bank: Any, read_floor: float, tensor_floor: float, reps: int) -> dict[str, Any] | None:
    floor = max(read_floor, tensor_floor)
    try:
        t = time_ms(fn, device, reps=reps if tokens >= 10**7 else 4 * reps, warmup=2)
    except Exception:  # a benchmark harness: record and go on with the other impls
        log.exception("%s failed at %d tokens, T=%d", impl, tokens, T)
        return None
    ms = statistics.median(t)
    log.info("%7.2fM tokens T=%-4d %-26s%s %9.2f ms  %.2fx read floor (%.2f ms)  %.2fx max floor (%.2f ms)",
             tokens / 1e6, T, impl, " sync" if sync_each else "     ", ms, ms / read_floor, read_floor, ms / floor, floor)
    return {"tokens": tokens, "chunks_per_layer": bank.rows, "q_tokens": T, "impl": impl,
            "host_sync_per_layer": sync_each, "ms": ms, "ms_all": t, "read_floor_ms": read_floor,
            "tensor_floor_ms": tensor_floor, "x_read_floor": ms / read_floor, "x_floor": ms / floor,
            "key_GBps": bank.key_bytes() / ms / 1e6}


def _agreement(tokens: int, T: int, answers: dict[str, list[torch.Tensor]], bank: Any, qs: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Top-k documents of every impl against the first: identical lists per layer (or near-ties)."""
    base_name, base = next(iter(answers.items()))
    out: dict[str, Any] = {"tokens": tokens, "q_tokens": T, "baseline": base_name}
    for name, ans in answers.items():
        same = sum(a.tolist() == b.tolist() for a, b in zip(ans, base))
        overlap = statistics.mean(len(set(a.tolist()) & set(b.tolist())) / max(1, len(b)) for a, b in zip(ans, base))
        out[name] = {"identical_layers": same, "layers": len(base), "mean_overlap": overlap}
    return out


# -- memory parallel ------------------------------------------------------------------------------------


def _mp_worker(rank: int, world_size: int, port: int, cfg: dict[str, Any], out_path: str) -> None:
    import torch.distributed as dist

    from msabank.kernels.memory_parallel import ShardedRoutingIndex, init_tcp

    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    init_tcp(rank, world_size, port, backend="nccl", timeout_s=120.0)
    dist.barrier(device_ids=[rank])
    bank = SyntheticShard(cfg["tokens"], layers=cfg["layers"], device=device, dtype=torch.bfloat16,
                          rank=rank, world_size=world_size)
    sharded = ShardedRoutingIndex(bank, timeout_s=60.0)
    result: dict[str, Any] = {"world_size": world_size, "rows_per_rank": bank.rows, "card": card_name(device), "by_T": {}}
    for T in cfg["q_tokens"]:
        qs = queries(T, cfg["layers"], device, torch.bfloat16, seed=T)  # the same on every rank
        for mode in ("broadcast", "replicated"):
            rep = mode == "replicated"

            def question() -> list[torch.Tensor]:
                return [sharded.search_padded(layer, q if rank == 0 or rep else None, TOP_K, replicated=rep)[1]
                        for layer, q in enumerate(qs)]

            ans = question()
            for _ in range(2):
                question()
            times = []
            for _ in range(cfg["reps"]):
                dist.barrier(device_ids=[rank])
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                question()
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1e3)
            key = str(T) if mode == "broadcast" else f"{T}-replicated"
            result["by_T"][key] = {"ms": statistics.median(times), "ms_all": times, "topk": [a.cpu().tolist() for a in ans]}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.barrier(device_ids=[rank])
    dist.destroy_process_group()


def bench_memory_parallel(tokens: int, q_tokens: Sequence[int], worlds: Sequence[int], *, layers: int = LAYERS,
                          reps: int = 5, out_dir: Path) -> dict[str, Any]:
    """Routing at one bank size on 1, 2, ... GPUs (NCCL, one spawned process per GPU); per-layer host
    sync in every configuration (the engine needs each layer's numbers). Top-k compared with world 1."""
    from msabank.kernels.memory_parallel import spawn_workers

    res: dict[str, Any] = {"tokens": tokens, "layers": layers, "worlds": {}}
    for w in worlds:
        if w > torch.cuda.device_count():
            log.warning("skipping %d GPUs: %d visible", w, torch.cuda.device_count())
            continue
        path = str(out_dir / f"_mp_{w}.json")
        cfg = {"tokens": tokens, "layers": layers, "q_tokens": list(q_tokens), "reps": reps}
        codes = spawn_workers(_mp_worker, w, (cfg, path), timeout_s=400)
        if any(codes):
            res["worlds"][str(w)] = {"error": f"exit codes {codes}"}
            continue
        with open(path) as f:
            res["worlds"][str(w)] = json.load(f)
        os.remove(path)
    one = res["worlds"].get("1", {})
    for w, r in res["worlds"].items():
        for T, d in r.get("by_T", {}).items():
            if "by_T" in one:
                d["speedup_vs_1"] = one["by_T"][T]["ms"] / d["ms"]
                d["topk_identical_to_1"] = d["topk"] == one["by_T"][T]["topk"]
            log.info("%s GPU(s) T=%s: %.2f ms per question, %.2fx vs 1 GPU, top-k identical: %s",
                     w, T, d["ms"], d.get("speedup_vs_1", float("nan")), d.get("topk_identical_to_1"))
    return res


# -- content fetch -----------------------------------------------------------------------------------


def bench_fetch(*, device: torch.device, docs: int = 2048, per_question: int = TOP_K, layers: int = LAYERS,
                reps: int = 20, seed: int = 0, batch: int = 8) -> dict[str, Any]:
    """16 documents × 18 layers of content K/V from the (pinned) host arena to the device, cold pool.

    transfer: the whole documents (all layers) to the device; layer_assembly: the 18 per-layer (K, V)
    pairs cut from them on the device, one `fetch` per layer (the per-question path); question: both, as
    one question does them. The batched path (`fetch_batch`, one gather per layer into the (B, Hkv, C, D)
    layout attention reads): layer_assembly_batched and question_batched for the same question, and
    question_batch{batch}: `batch` questions' documents in one transfer and 18 gathers.
    """
    from msabank.index import ContentStore

    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16
    store = ContentStore(layers, KV_HEADS, HEAD_DIM, device=device, dtype=dtype)
    pattern = torch.randn(8, layers, 2, KV_HEADS, HEAD_DIM, generator=g).to(dtype)
    counts = torch.randint(1, 9, (docs,), generator=g).tolist()  # 1..8 chunks: 64..512 tokens
    for start in range(0, docs, 256):
        nums = list(range(start, min(docs, start + 256)))
        store.add(nums, [pattern[: counts[n]] for n in nums])
    row_bytes = layers * 2 * KV_HEADS * HEAD_DIM * 2
    h2d = h2d_bandwidth(device) if device.type == "cuda" else {}
    picks = [torch.randperm(docs, generator=g)[:per_question].tolist() for _ in range(reps + 2)]
    state = {"i": 0}

    def nxt() -> list[int]:
        state["i"] += 1
        return picks[state["i"] % len(picks)]

    def transfer() -> None:
        store.clear_cache()
        store.prefetch(nxt())

    def assembly() -> None:
        nums = picks[0]
        for layer in range(layers):
            store.fetch(layer, nums)

    def question() -> None:
        store.clear_cache()
        nums = nxt()
        store.prefetch(nums)
        for layer in range(layers):
            store.fetch(layer, nums)

    def assembly_batched() -> None:
        for layer in range(layers):
            store.fetch_batch(layer, [picks[0]])

    def question_batched() -> None:
        store.clear_cache()
        nums = nxt()
        store.prefetch(nums)
        for layer in range(layers):
            store.fetch_batch(layer, [nums])

    many = [torch.randperm(docs, generator=g)[:per_question].tolist() for _ in range(batch * (reps + 2))]

    def question_batch() -> None:  # `batch` questions: one transfer of every document, one gather per layer
        store.clear_cache()
        state["i"] += 1
        b0 = (state["i"] % (reps + 2)) * batch
        group = many[b0 : b0 + batch]
        store.prefetch(sorted({n for p in group for n in p}))
        for layer in range(layers):
            store.fetch_batch(layer, group)

    res: dict[str, Any] = {"card": card_name(device), "docs_in_store": docs, "docs_per_question": per_question,
                           "layers": layers, "bytes_per_chunk": row_bytes, "pinned": store.pin, "h2d_Bps": h2d,
                           "batch": batch}
    nbytes = statistics.mean(sum(counts[n] for n in p) for p in picks) * row_bytes
    groups = [many[i : i + batch] for i in range(0, len(many), batch)]
    batch_bytes = statistics.mean(sum(counts[n] for n in {n for p in grp for n in p}) for grp in groups) * row_bytes
    for name, fn, nb in (("transfer", transfer, nbytes), ("layer_assembly", assembly, nbytes), ("question", question, nbytes),
                         ("layer_assembly_batched", assembly_batched, nbytes), ("question_batched", question_batched, nbytes),
                         (f"question_batch{batch}", question_batch, batch_bytes)):
        t = time_ms(fn, device, reps=reps, warmup=2)
        ms = statistics.median(t)
        row: dict[str, Any] = {"ms": ms, "ms_all": t, "mean_bytes": nb, "GBps": nb / ms / 1e6}
        if h2d:
            row["x_pinned_h2d"] = nb / (ms / 1e3) / h2d["pinned"]
            row["floor_ms"] = nb / h2d["pinned"] * 1e3  # the bytes at pinned H2D bandwidth, same run
        res[name] = row
        log.info("fetch %-23s %.3f ms for %.2f MB: %.1f GB/s%s", name, ms, nb / 1e6, row["GBps"],
                 f" = {row['x_pinned_h2d']:.0%} of pinned H2D ({h2d['pinned'] / 1e9:.1f} GB/s)" if h2d else "")
    res["path"] = store.last_path
    if device.type == "cuda":  # the transfer as the GPU sees it (host-side bookkeeping excluded)
        store.timing = True

        def device_ms() -> list[float]:
            out = []
            for _ in range(reps):
                transfer()
                torch.cuda.synchronize(device)
                assert store.last_transfer is not None
                out.append(store.last_transfer[0].elapsed_time(store.last_transfer[1]))
            return out

        if store.last_path == "zero-copy":  # tile sweep of the gather kernel; keep the fastest
            from msabank.kernels import triton_gather

            sweep = {}
            for cfg in triton_gather.GATHER_CANDIDATES:
                triton_gather.GATHER_CONFIG = cfg
                sweep[cfg] = statistics.median(device_ms())
                log.info("gather %s: %.3f ms (GPU time), %.1f GB/s", cfg, sweep[cfg], nbytes / sweep[cfg] / 1e6)
            triton_gather.GATHER_CONFIG = min(sweep, key=sweep.__getitem__)
            res["gather_sweep"] = {str(c): {"ms": v, "GBps": nbytes / v / 1e6} for c, v in sweep.items()}
            res["gather_config"] = list(triton_gather.GATHER_CONFIG)
        dev_ms = device_ms()
        store.timing = False
        ms = statistics.median(dev_ms)
        res["transfer_device"] = {"ms": ms, "ms_all": dev_ms, "GBps": nbytes / ms / 1e6,
                                  "x_pinned_h2d": nbytes / (ms / 1e3) / h2d["pinned"]}
        log.info("fetch transfer (GPU time) %.3f ms: %.1f GB/s = %.0f%% of pinned H2D", ms, nbytes / ms / 1e6,
                 100 * res["transfer_device"]["x_pinned_h2d"])
        t = time_ms(transfer, device, reps=reps, warmup=2)  # wall time again, with the chosen gather tiles
        ms = statistics.median(t)
        res["transfer_after_sweep"] = {"ms": ms, "ms_all": t, "GBps": nbytes / ms / 1e6,
                                       "x_pinned_h2d": nbytes / (ms / 1e3) / h2d["pinned"]}
        log.info("fetch transfer (wall, best tiles) %.3f ms: %.1f GB/s = %.0f%% of pinned H2D", ms, nbytes / ms / 1e6,
                 100 * res["transfer_after_sweep"]["x_pinned_h2d"])
    if device.type == "cuda":  # the same bytes as one contiguous pinned copy, for scale
        src = torch.empty(int(nbytes), dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(int(nbytes), dtype=torch.uint8, device=device)
        ms = statistics.median(time_ms(lambda: dst.copy_(src, non_blocking=True), device, reps=reps, warmup=2))
        res["one_contiguous_copy"] = {"ms": ms, "GBps": nbytes / ms / 1e6}
        log.info("fetch one contiguous copy of the same bytes: %.3f ms, %.1f GB/s (path used: %s)", ms, nbytes / ms / 1e6, res["path"])
    return res


# -- output ---------------------------------------------------------------------------------------------


def plot(results: dict[str, Any], path: Path) -> str | None:
    """Routing latency vs bank size, one line per impl × T, floors dashed. None if matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    r = results.get("routing")
    if not r:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [x for x in r["rows"] if not x["host_sync_per_layer"]]
    for T in sorted({x["q_tokens"] for x in rows}):
        for impl in sorted({x["impl"] for x in rows}):
            pts = sorted((x["tokens"], x["ms"]) for x in rows if x["q_tokens"] == T and x["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{impl}, T={T}")
        pts = sorted((x["tokens"], max(x["read_floor_ms"], x["tensor_floor_ms"])) for x in rows if x["q_tokens"] == T)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ls="--", color="gray", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bank size (tokens)")
    ax.set_ylabel(f"ms per question ({r['layers']} router layers)")
    ax.set_title(f"Routing, {r['card']}\ndashed: max(HBM read, tensor-core) floor, same run", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return str(path)


def run(what: str, *, out_dir: Path, sizes: Sequence[int], q_tokens: Sequence[int], impls: Sequence[str],
        gpus: Sequence[int], layers: int = LAYERS, reps: int = 5, device: str | None = None,
        sweep: bool = True, memory_parallel: bool = False, batch: int = 8) -> dict[str, Any]:
    """The `msabank bench` body: runs the groups in `what` (routing|fetch|all), writes JSON (+ PNG)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"torch": torch.__version__, "device": str(dev)}
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:
        pass
    if dev.type != "cuda":
        impls = [i for i in impls if i != "triton" or os.environ.get("TRITON_INTERPRET") == "1"]
    if what in ("routing", "all"):
        results["routing"] = bench_routing(sizes, q_tokens, impls, device=dev, layers=layers, reps=reps, sweep=sweep,
                                           batch=batch)
        worlds = sorted({1, *gpus}) if memory_parallel or any(g > 1 for g in gpus) else []
        if worlds and dev.type == "cuda":
            results["memory_parallel"] = bench_memory_parallel(max(sizes), q_tokens, worlds, layers=layers,
                                                               reps=reps, out_dir=out_dir)
    if what in ("fetch", "all"):
        results["fetch"] = bench_fetch(device=dev, layers=layers, batch=max(1, batch))
    name = f"bench_{what}.json"
    (out_dir / name).write_text(json.dumps(results, indent=1))
    results["plot"] = plot(results, out_dir / f"bench_{what}.png")
    if results["plot"] is None and what != "fetch":
        log.warning("matplotlib is not available: no plot")
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m msabank.bench", description="msabank routing/fetch benchmarks")
    ap.add_argument("what", choices=["routing", "fetch", "all"])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--sizes", default="1M,10M,100M", help="bank sizes in tokens")
    ap.add_argument("--q-tokens", default="64,512")
    ap.add_argument("--impls", default="torch,triton")
    ap.add_argument("--gpus", default="1", help="GPU counts for memory parallel, e.g. 1,2")
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default=None)
    ap.add_argument("--no-sweep", action="store_true", help="keep the built-in scan tile table")
    ap.add_argument("--memory-parallel", action="store_true", help="run the NCCL path even for --gpus 1")
    ap.add_argument("--batch", type=int, default=8, help="questions per batched scan / fetch (1: one question only)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run(a.what, out_dir=Path(a.out), sizes=[parse_tokens(s) for s in a.sizes.split(",")],
        q_tokens=[int(x) for x in a.q_tokens.split(",")], impls=a.impls.split(","),
        gpus=[int(x) for x in a.gpus.split(",")], layers=a.layers, reps=a.reps, device=a.device,
        sweep=not a.no_sweep, memory_parallel=a.memory_parallel, batch=a.batch)


if __name__ == "__main__":
    main()
