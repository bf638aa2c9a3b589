"""Memory parallel routing over torch.distributed (DESIGN.md §7, MSA_SPEC.md §7).

Each rank holds the routing keys of a disjoint set of whole documents (`shard_of`) in a local
`msabank.index.RoutingIndex`. One search, on every rank in lockstep:

1. broadcast a 4-integer header (T, dim, k, layer) and the routing query (T, dim) from `src`;
2. local top-k on the shard, padded to exactly k entries (-inf, -1) so the exchange has a fixed size;
3. all_gather of the (k, 2) float64 (score, number) candidates: world·k·16 B;
4. every rank orders the world·k candidates by score descending, lower number first: the same total
   order as the single-device kernel, so the result is identical to one device holding every shard
   (a document's rows never span ranks, and the global top-k is contained in the union of the local
   ones under that order).

Three collectives per router layer (the official engine runs nine). NCCL on CUDA, gloo on CPU. Every
search waits on its last collective with a timeout, so a dead or stuck rank raises `DistributedError`
instead of hanging; after that the process group should be destroyed.

Launch with torchrun (`torchrun --nproc-per-node 2 -m msabank.kernels.memory_parallel`: a self-check on
a synthetic bank) or with `spawn_workers`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from msabank.errors import DistributedError
from msabank.types import Routed

from . import routing_topk
from .reference import topk_ordered_padded


def shard_of(number: int, world_size: int) -> int:
    """The rank that owns document `number`: round robin, stable under appends and updates."""
    return number % world_size


@dataclass(frozen=True, slots=True)
class Shard:
    """This rank's part of the bank: the documents `shard_of` gives it (rank 0 of 1: all of them)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def of(cls, group: Any = None) -> Shard:
        """The shard of this process in `group` (None: no memory parallel, one shard)."""
        if group is None:
            return cls()
        return cls(dist.get_rank(group), dist.get_world_size(group))

    def owns(self, number: int) -> bool:
        return shard_of(int(number), self.world) == self.rank

    def owns_each(self, numbers: np.ndarray) -> np.ndarray:
        """(N,) bool: which of `numbers` this shard holds."""
        return numbers % self.world == self.rank


def init_from_env(*, backend: str | None = None, timeout_s: float = 60.0) -> tuple[int, int]:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_*).

    Returns (rank, world_size). NCCL when CUDA is available (one GPU per LOCAL_RANK), else gloo.
    """
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as err:
        raise DistributedError(f"could not join the process group: {err}", hint="launch with torchrun") from err
    return dist.get_rank(), dist.get_world_size()


class ShardedRoutingIndex:
    """A routing index spread over the ranks of a process group; `search` is collective.

    local: this rank's shard (documents with shard_of(number) == rank, or any disjoint split).
    src: the rank whose query is used (the others may pass None).
    timeout_s: how long a search waits for the slowest rank before raising DistributedError.
    """

    def __init__(self, local: Any, *, group: Any = None, src: int = 0, timeout_s: float = 60.0) -> None:
        self.local = local
        self.group = group
        self.src = src
        self.timeout = timedelta(seconds=timeout_s)
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = dist.get_backend(group)
        # NCCL moves device tensors; gloo host tensors.
        self.comm_device = local.device if self.backend == "nccl" else torch.device("cpu")

    def _fail(self, what: str, err: object) -> DistributedError:
        return DistributedError(
            f"memory-parallel {what} failed on rank {self.rank} of {self.world_size}: {err}",
            hint="a rank died or fell out of lockstep; restart the process group",
        )

    def _wait(self, work: Any, what: str, *, timed: bool) -> None:
        """Wait for a collective. NCCL: the stream waits, and a timed wait also brings the host along by
        spinning on a CUDA event (Work.wait(timeout) polls at millisecond granularity: measured 1-2 ms
        per call on H200, which is more than a whole layer's scan). gloo: Work.wait(timeout)."""
        try:
            if self.backend != "nccl":
                if work.wait(timeout=self.timeout) is False:
                    raise RuntimeError(f"timed out after {self.timeout}")
                return
            work.wait()
        except RuntimeError as err:
            raise self._fail(what, err) from err
        if timed:
            self._spin(torch.cuda.current_stream(self.comm_device), what)

    def _spin(self, stream: Any, what: str) -> None:
        ev = torch.cuda.Event()
        ev.record(stream)
        deadline = time.monotonic() + self.timeout.total_seconds()
        while not ev.query():
            if time.monotonic() > deadline:
                raise self._fail(what, f"timed out after {self.timeout}")

    def search_padded(
        self, layer_index: int, query: torch.Tensor | None, k: int, *, replicated: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Global top-k as exactly k (score, number) pairs padded with (-inf, -1), on the comm device.

        replicated=True: every rank passes the same query (e.g. each computed it with its own model
        replica), so the header and query broadcasts are skipped: one collective per layer.
        """
        gloo = self.backend != "nccl"
        is_src = self.rank == self.src
        if replicated:
            if query is None:
                raise ValueError("replicated=True needs the query on every rank")
            q = query.to(self.comm_device, self.local.dtype)
        else:
            q = self._broadcast_query(layer_index, query, k, is_src, gloo)
        keys, row_doc, num_docs = self.local.layer(layer_index)
        s, i = routing_topk(q.to(self.local.device), keys, row_doc, num_docs, k, impl=self.local.impl, pad=True)
        mine = torch.stack([s.double(), i.double()], dim=1).to(self.comm_device)  # (k, 2); numbers < 2^53 exact
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        work = dist.all_gather(parts, mine, group=self.group, async_op=True)
        if gloo:
            self._wait(work, "candidate all_gather", timed=True)
            cand = torch.cat(parts)
            return topk_ordered_padded(cand[:, 0].float(), cand[:, 1].long(), k)
        self._wait(work, "candidate all_gather", timed=False)
        cand = torch.cat(parts)  # (world·k, 2), rank order
        out = topk_ordered_padded(cand[:, 0].float(), cand[:, 1].long(), k)
        # The host waits once per layer, after the merge is queued, so the GPU is idle only while the
        # next layer's launches are issued; a dead rank surfaces here as DistributedError.
        self._spin(torch.cuda.current_stream(self.comm_device), "candidate all_gather")
        return out

    def _broadcast_query(self, layer_index: int, query: torch.Tensor | None, k: int, is_src: bool, gloo: bool) -> torch.Tensor:
        header = torch.zeros(4, dtype=torch.int64, device=self.comm_device)
        if is_src:
            if query is None:
                raise ValueError("the source rank must pass the routing query")
            header.copy_(torch.tensor([query.shape[0], query.shape[1], k, layer_index]))
        # A non-source rank must read the header on the host (to size the query), so it waits with the
        # timeout here; the source never waits on the host before the final all_gather.
        self._wait(dist.broadcast(header, self.src, group=self.group, async_op=True), "header broadcast", timed=not is_src)
        if is_src:
            T, dim, hk, hl = query.shape[0], query.shape[1], k, layer_index  # type: ignore[union-attr]
        else:
            T, dim, hk, hl = header.tolist()
        if (hk, hl) != (k, layer_index):
            raise DistributedError(f"rank {self.rank} searched layer {layer_index} k={k}, source layer {hl} k={hk}")
        q = torch.empty(T, dim, dtype=self.local.dtype, device=self.comm_device)
        if is_src:
            q.copy_(query)  # type: ignore[arg-type]
        self._wait(dist.broadcast(q, self.src, group=self.group, async_op=True), "query broadcast", timed=False)
        return q

    def search(self, layer_index: int, query: torch.Tensor | None, k: int) -> Routed:
        """Collective top-k over all shards; the same `Routed` (on the CPU) on every rank."""
        s, i = self.search_padded(layer_index, query, k)
        s, i = s.cpu(), i.cpu()
        keep = i >= 0
        return Routed(numbers=i[keep], scores=s[keep])


# -- launching ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_workers(fn: Callable[..., None], world_size: int, args: Sequence[Any] = (), *, timeout_s: float = 300.0) -> list[int]:
    """Run fn(rank, world_size, port, *args) in `world_size` spawned processes; returns exit codes.

    Processes still alive after timeout_s are killed (exit code None becomes -9).
    """
    ctx = torch.multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=fn, args=(r, world_size, port, *args)) for r in range(world_size)]
    for p in procs:
        p.start()
    codes = []
    for p in procs:
        p.join(timeout_s)
        if p.is_alive():
            p.kill()
            p.join()
        codes.append(p.exitcode if p.exitcode is not None else -9)
    return codes


def init_tcp(rank: int, world_size: int, port: int, *, backend: str, timeout_s: float) -> None:
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )


def synthetic_bank(num_docs: int, layers: int, dim: int, *, seed: int, integer: bool = False):
    """Seeded documents: numbers 0..num_docs-1 with 0..5 chunks each, per-layer keys (rows, dim) fp32."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 6, (num_docs,), generator=g).tolist()
    rows = sum(counts)
    if integer:  # exact in every dtype: exact ties, so identity is bit-for-bit
        keys = [torch.randint(-2, 3, (rows, dim), generator=g).float() for _ in range(layers)]
    else:
        keys = [torch.randn(rows, dim, generator=g) for _ in range(layers)]
    return list(range(num_docs)), counts, keys


def shard(numbers: list[int], counts: list[int], keys: list[torch.Tensor], rank: int, world_size: int):
    """This rank's documents of a bank given as (numbers, counts, keys_per_layer)."""
    starts = torch.tensor([0, *counts]).cumsum(0).tolist()
    mine = [j for j, n in enumerate(numbers) if shard_of(n, world_size) == rank]
    rows = [r for j in mine for r in range(starts[j], starts[j + 1])]
    idx = torch.tensor(rows, dtype=torch.int64)
    return [numbers[j] for j in mine], [counts[j] for j in mine], [kl[idx] for kl in keys]


def _selftest_worker(rank: int, world_size: int, port: int, cfg: dict[str, Any], out_path: str) -> None:
    """Spawned (tests) or torchrun'd body: sharded search vs one index holding everything."""
    from msabank.index import RoutingIndex

    torch.set_num_threads(1)
    backend = cfg.get("backend", "gloo")
    if port:
        init_tcp(rank, world_size, port, backend=backend, timeout_s=cfg.get("timeout_s", 30.0))
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if backend == "nccl" else torch.device("cpu")
    result: dict[str, Any] = {"rank": rank}
    try:
        numbers, counts, keys = synthetic_bank(cfg["docs"], cfg["layers"], cfg["dim"], seed=cfg["seed"], integer=cfg.get("integer", True))
        full = RoutingIndex(cfg["layers"], cfg["dim"], device=device, dtype=torch.float32)
        full.add(numbers, counts, keys)
        g = torch.Generator().manual_seed(cfg["seed"] + 1)
        checks = []
        # "round_robin": shard_of; "all_on_0": rank 0 holds every document, the others none
        for layout in cfg.get("layouts", ["round_robin"]):
            local = RoutingIndex(cfg["layers"], cfg["dim"], device=device, dtype=torch.float32)
            if layout == "round_robin":
                local.add(*shard(numbers, counts, keys, rank, world_size))
            elif rank == 0:
                local.add(numbers, counts, keys)
            sharded = ShardedRoutingIndex(local, timeout_s=cfg.get("timeout_s", 30.0))
            for layer in range(cfg["layers"]):
                for k in cfg["ks"]:
                    T = int(torch.randint(1, 9, (1,), generator=g))
                    q = torch.randint(-2, 3, (T, cfg["dim"]), generator=g).float()
                    got = sharded.search(layer, q if rank == 0 else None, k)
                    want = full.search(layer, q, k)
                    same = got.numbers.tolist() == want.numbers.tolist() and got.scores.tolist() == want.scores.tolist()
                    rs, ri = sharded.search_padded(layer, q, k, replicated=True)  # every rank has q
                    same = same and ri[ri >= 0].tolist() == want.numbers.tolist()
                    checks.append(same)
        result["ok"] = all(checks)
        result["checks"] = len(checks)
        if cfg.get("die_rank") is not None:
            with open(out_path + f".{rank}", "w") as f:
                json.dump(result, f)
            wait_s = cfg.get("dead_timeout_s", 3.0)
            if cfg["die_rank"] == rank:
                if cfg.get("die_mode") == "hang":  # alive but never joins the collective
                    time.sleep(wait_s + 2.0)
                os._exit(0)  # a rank that vanishes without a word: the others must not hang
            impatient = ShardedRoutingIndex(local, timeout_s=wait_s)
            t0 = time.monotonic()
            try:
                impatient.search(0, torch.ones(2, cfg["dim"]) if rank == 0 else None, 4)
                result["dead_rank"] = "no error"
            finally:
                result["dead_rank_s"] = time.monotonic() - t0
    except DistributedError as err:
        result["dead_rank"] = "DistributedError"
        result["message"] = str(err)
    with open(out_path + f".{rank}", "w") as f:
        json.dump(result, f)
    if dist.is_initialized() and "dead_rank" not in result:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    """torchrun entry point: a sharded-vs-single self-check on a synthetic bank."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--out", default="/tmp/msabank-memory-parallel")
    a = ap.parse_args(argv)
    rank, world = init_from_env()
    backend = dist.get_backend()
    cfg = {"docs": a.docs, "layers": a.layers, "dim": a.dim, "seed": 0, "ks": [1, 16], "backend": backend}
    _selftest_worker(rank, world, 0, cfg, a.out)
    with open(a.out + f".{rank}") as f:
        print(f.read())


if __name__ == "__main__":
    main()
