"""The serving-side memory: routing keys resident on the device, content K/V in host memory.

`RoutingIndex` holds one (rows, Hkv·D) key matrix per router layer on the device, all layers sharing
one row → document-number map, and answers `search(layer, query, k)` through `msabank.kernels`.
`ContentStore` holds each document's content K/V (C, R, 2, Hkv, D) in one host arena (pinned when CUDA
is available) and copies the documents a question selects to the device on a side stream.

Both grow by appends with capacity doubling, mask rows on delete or update (a document number whose
rows are superseded keeps its number, DESIGN.md §1) and compact themselves once half their rows are
dead, so refreshing after a bank change costs time proportional to the change. Neither knows about
disk. `BankIndex` keeps the pair at one bank version (this rank's shard under memory parallel), filling
it from a `msabank.storage` snapshot (`routing_keys`, `content_kv`, `changes_since`), and `BankMemory` is
the `MemoryView` a generation reads it through.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from msabank.errors import BankCorruptedError, DocumentNotFoundError, InputError
from msabank.kernels import routing_topk, routing_topk_batched
from msabank.kernels.reference import selected_rows, span_index
from msabank.types import Routed

if TYPE_CHECKING:
    from msabank.storage.records import Geometry
    from msabank.storage.snapshot import Snapshot

log = logging.getLogger(__name__)

_MIN_CAPACITY = 1024  # rows; below this, growing from 1 costs more in reallocations than it saves


def _grow(capacity: int, need: int) -> int:
    """Capacity for `need` rows: by a quarter at least, so appends stay amortised O(1) (each row is copied
    ~4 times over a lifetime) while the slack stays small. Doubling would waste up to half: the routing
    keys of a 100M-token bank at the MSA-4B geometry are 57.6 GB, and 2x that does not fit an 80 GB card.
    A bulk load calls `reserve` first and gets exactly what it needs."""
    if capacity >= need:
        return capacity
    return max(_MIN_CAPACITY, need, capacity + capacity // 4)


class _Segments:
    """number → list of (start, count) row ranges (usually one); host-side bookkeeping for both stores."""

    def __init__(self) -> None:
        self.ranges: dict[int, list[tuple[int, int]]] = {}

    def rows_of(self, number: int) -> int:
        return sum(c for _, c in self.ranges.get(number, ()))

    def remap(self, live_before: np.ndarray) -> None:
        """After compaction: a row's new position is the number of live rows before it."""
        self.ranges = {n: [(int(live_before[s]), c) for s, c in rs] for n, rs in self.ranges.items()}


class RoutingIndex:
    """Per-layer routing keys on one device with a shared row → document-number map.

    Keys of layer l: (capacity, dim) in `dtype`; row_doc (capacity,) int32 document number of each
    row, -1 for a dead (deleted or superseded) row. The kernels take the number itself as the dense
    document index, so num_docs = max number + 1 and ties go to the lower number for free. Memory per
    row: num_router_layers · dim · itemsize + 4 B (18 · 1024 · 2 + 4 = 36,868 B at the MSA-4B geometry).
    """

    def __init__(
        self,
        num_router_layers: int,
        dim: int,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        impl: str | None = None,
    ) -> None:
        if num_router_layers <= 0 or dim <= 0:
            raise InputError(f"a routing index needs layers > 0 and dim > 0, got {num_router_layers}, {dim}")
        self.num_router_layers = num_router_layers
        self.dim = dim
        self.device = torch.device(device)
        self.dtype = dtype
        self.impl = impl
        self._capacity = 0
        self._size = 0  # rows in use, live or dead
        self._dead = 0
        self._num_docs = 0  # max number ever added + 1
        self._keys = [torch.empty(0, dim, dtype=dtype, device=self.device) for _ in range(num_router_layers)]
        self._row_doc = torch.empty(0, dtype=torch.int32, device=self.device)
        self._segs = _Segments()

    # -- introspection -------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Documents with at least one live row."""
        return len(self._segs.ranges)

    def __contains__(self, number: object) -> bool:
        return number in self._segs.ranges

    @property
    def num_rows(self) -> int:
        """Live rows (chunks) per layer."""
        return self._size - self._dead

    @property
    def num_docs(self) -> int:
        """Size of the dense document-index space handed to the kernels (max number + 1)."""
        return self._num_docs

    def numbers(self) -> list[int]:
        return sorted(self._segs.ranges)

    def memory_bytes(self) -> int:
        item = torch.empty(0, dtype=self.dtype).element_size()
        return self._capacity * (self.num_router_layers * self.dim * item + 4)

    def layer(self, layer_index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(keys (rows, dim), row_doc (rows,) int32 with -1 for dead rows, num_docs) for the kernels."""
        return self._keys[layer_index][: self._size], self._row_doc[: self._size], self._num_docs

    def reserve(self, rows: int) -> None:
        """Make room for `rows` rows in all, exactly: a bulk load sizes the index once instead of growing."""
        if rows > self._capacity:
            self._realloc(max(rows, _MIN_CAPACITY))

    # -- updates -------------------------------------------------------------------------------------
    def add(self, numbers: Sequence[int], chunk_counts: Sequence[int], keys_per_layer: Sequence[torch.Tensor]) -> None:
        """Append documents; a number already present is superseded (its old rows die).

        numbers and chunk_counts are parallel; keys_per_layer holds one (sum(chunk_counts), dim) tensor
        per router layer, the documents' rows in the order of `numbers`.
        """
        numbers = [int(n) for n in numbers]
        counts = [int(c) for c in chunk_counts]
        if len(numbers) != len(counts):
            raise InputError(f"{len(numbers)} numbers but {len(counts)} chunk counts")
        if len(set(numbers)) != len(numbers):
            raise InputError("a document number appears twice in one add()")
        if any(n < 0 or n >= 2**31 - 1 for n in numbers) or any(c < 0 for c in counts):
            raise InputError("document numbers must be in 0..2^31-2 and chunk counts >= 0")
        self._append(numbers, counts, keys_per_layer)

    def add_rows(self, row_numbers: torch.Tensor, keys_per_layer: Iterable[torch.Tensor]) -> None:
        """Bulk load in the storage read path's shape: (rows,) number per row plus per-layer keys.

        A document's rows need not be contiguous; each number present before the call is superseded.
        `keys_per_layer` may be a generator: layers are consumed (and can be freed) one at a time, so a
        load holds one layer in host memory (3.2 GB at 100M tokens), not all 18 (57.6 GB).
        """
        rn = row_numbers.detach().cpu().to(torch.int64)
        if rn.numel() and int(rn.min()) < 0:
            raise InputError("row numbers must be >= 0")
        if rn.numel() == 0:
            return self._append([], [], keys_per_layer)
        change = torch.ones(rn.numel(), dtype=torch.bool)
        change[1:] = rn[1:] != rn[:-1]
        starts = torch.nonzero(change).squeeze(1)
        run_numbers = rn[starts].tolist()
        run_counts = torch.diff(starts, append=torch.tensor([rn.numel()])).tolist()
        self._append(run_numbers, run_counts, keys_per_layer)

    def _append(self, numbers: list[int], counts: list[int], keys_per_layer: Iterable[torch.Tensor]) -> None:
        total = sum(counts)
        if isinstance(keys_per_layer, Sequence):
            if len(keys_per_layer) != self.num_router_layers:
                raise InputError(f"expected keys for {self.num_router_layers} router layers, got {len(keys_per_layer)}")
            for kl in keys_per_layer:
                self._check_keys(kl, total)
        self._reserve(self._size + total)
        s0 = self._size
        # New rows are written past _size, so nothing is visible (and nothing is superseded) until every
        # layer has arrived: a bad layer from a generator leaves the index as it was.
        got = 0
        for src in keys_per_layer:
            if got == self.num_router_layers:
                raise InputError(f"keys for more than {self.num_router_layers} router layers")
            self._check_keys(src, total)
            self._keys[got][s0 : s0 + total].copy_(src)
            got += 1
            del src  # a generator's layer can be freed before the next one is produced
        if got != self.num_router_layers:
            raise InputError(f"expected keys for {self.num_router_layers} router layers, got {got}")
        self._kill(set(numbers) & self._segs.ranges.keys())
        if total:
            rd = torch.repeat_interleave(torch.tensor(numbers, dtype=torch.int32), torch.tensor(counts))
            self._row_doc[s0 : s0 + total].copy_(rd)
        pos = s0
        for n, c in zip(numbers, counts):
            if c:
                self._segs.ranges.setdefault(n, []).append((pos, c))
            pos += c
        self._size += total
        if numbers:
            self._num_docs = max(self._num_docs, max(numbers) + 1)
        self._maybe_compact()

    def _check_keys(self, kl: torch.Tensor, total: int) -> None:
        if tuple(kl.shape) != (total, self.dim):
            raise InputError(f"routing keys of shape {tuple(kl.shape)}, expected ({total}, {self.dim})")

    def remove(self, numbers: Sequence[int]) -> None:
        """Mask the rows of these documents (unknown numbers are ignored); compacts when half is dead."""
        self._kill({int(n) for n in numbers} & self._segs.ranges.keys())
        self._maybe_compact()

    def _kill(self, numbers: set[int]) -> None:
        ranges = [r for n in numbers for r in self._segs.ranges.pop(n)]
        if not ranges:
            return
        rows = np.concatenate([np.arange(s, s + c) for s, c in ranges])
        self._row_doc.index_fill_(0, torch.from_numpy(rows).to(self.device), -1)  # one launch, not one per doc
        self._dead += int(rows.size)

    def _reserve(self, need: int) -> None:
        if need > self._capacity:
            self._realloc(_grow(self._capacity, need))

    def _realloc(self, cap: int) -> None:
        for i, old in enumerate(self._keys):
            new = torch.empty(cap, self.dim, dtype=self.dtype, device=self.device)
            new[: self._size].copy_(old[: self._size])
            self._keys[i] = new  # one layer at a time: peak memory is one extra layer, not a second index
        rd = torch.full((cap,), -1, dtype=torch.int32, device=self.device)
        rd[: self._size].copy_(self._row_doc[: self._size])
        self._row_doc = rd
        self._capacity = cap

    def _maybe_compact(self) -> None:
        # Compact once dead rows are at least half: the copy (live rows) is paid for by the deletes that
        # made the dead rows, so updates stay amortised O(change).
        if self._dead and 2 * self._dead >= self._size:
            self.compact()

    def compact(self) -> None:
        """Drop dead rows in place, keeping the order of the live ones."""
        n = self._size
        keep = self._row_doc[:n] >= 0
        live = int(keep.sum())
        for kl in self._keys:
            kl[:live] = kl[:n][keep]
        self._row_doc[:live] = self._row_doc[:n][keep].clone()
        self._row_doc[live:n] = -1
        keep_np = keep.cpu().numpy()
        self._segs.remap(np.cumsum(keep_np) - keep_np)
        self._size, self._dead = live, 0

    # -- search --------------------------------------------------------------------------------------
    def search(self, layer_index: int, query: torch.Tensor, k: int) -> Routed:
        """Top-k documents of one router layer. query: (T, dim) group-summed, scaled routing query.

        Returns `Routed` on the CPU (numbers int64 best-first, ties to the lower number; scores fp32).
        """
        keys, row_doc, num_docs = self.layer(layer_index)
        scores, idx = routing_topk(query.to(self.device), keys, row_doc, num_docs, k, impl=self.impl)
        return Routed(numbers=idx.cpu(), scores=scores.cpu())

    def search_batch(self, layer_index: int, queries: Sequence[torch.Tensor], k: int) -> list[Routed]:
        """`search` for several questions with one scan of the layer's keys (`kernels.routing_topk_batched`).

        queries: per question (T_s, dim). One host wait for all of them: the (S, k) result comes back at once.
        """
        if not queries:
            return []
        keys, row_doc, num_docs = self.layer(layer_index)
        lens = np.array([q.shape[0] for q in queries], dtype=np.int64)
        seq = torch.from_numpy(np.repeat(np.arange(len(queries)), lens)).to(self.device)  # numpy: see span_index
        query = torch.cat([q.to(self.device) for q in queries])
        scores, idx = routing_topk_batched(query, seq, len(queries), keys, row_doc, num_docs, k, impl=self.impl)
        scores, idx = scores.cpu(), idx.cpu()
        keep = idx >= 0
        return [Routed(numbers=idx[s][keep[s]], scores=scores[s][keep[s]]) for s in range(len(queries))]


class ContentStore:
    """Content K/V per document in one host arena, fetched to the device per question.

    The arena is (capacity, R, 2, Hkv, D) in `dtype`: each document's chunks are contiguous rows with
    all router layers, K and V together (DESIGN.md §4), C · 73,728 B per document at the MSA-4B
    geometry. On CUDA the arena is pinned and `prefetch` moves whole documents into a device pool with
    one gather launch on a side stream (the GPU reads the pinned rows directly); a document chosen by
    several layers, or again in the next interleave round, crosses the bus once. The pool holds
    `cache_bytes`; when full it is emptied and refilled (after the work that reads it).
    """

    def __init__(
        self,
        num_router_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        pin: bool | None = None,
        cache_bytes: int = 1 << 30,
    ) -> None:
        self.row_shape = (num_router_layers, 2, num_kv_heads, head_dim)
        self.device = torch.device(device)
        self.dtype = dtype
        self._cuda = self.device.type == "cuda"
        self.pin = (torch.cuda.is_available() if pin is None else pin) and torch.cuda.is_available()
        self.cache_bytes = cache_bytes
        self._row_bytes = int(np.prod(self.row_shape)) * torch.empty(0, dtype=dtype).element_size()
        self._arena = self._alloc(0)
        self._size = 0
        self._dead = 0
        self._segs = _Segments()
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._pool: torch.Tensor | None = None  # (pool_rows, R, 2, Hkv, D) on the device
        self._pool_top = 0
        self._slot: dict[int, int] = {}  # number → first pool row
        self._ready: torch.cuda.Event | None = None  # recorded after the latest transfer
        self.bytes_copied = 0  # host → device bytes of `prefetch` since creation (benchmarks, tests); `gather_rows`
        # is not counted: its byte count (the selection's lengths) is on the device
        self.last_path = ""  # how the latest transfer ran: zero-copy | dma | torch
        self._inflight: list[tuple[torch.cuda.Event, torch.Tensor]] = []  # span tables in use on the GPU
        self.timing = False  # record (start, end) events around each transfer in `last_transfer`
        self.last_transfer: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._table: tuple[torch.Tensor, torch.Tensor, np.ndarray] | None = None  # see `document_table`
        self._table_ok = True  # False: a document with several row ranges (no single-span table)
        self._reads: torch.cuda.Event | None = None  # after the latest device-side read of the arena

    def __len__(self) -> int:
        return len(self._segs.ranges)

    def __contains__(self, number: object) -> bool:
        return number in self._segs.ranges

    def memory_bytes(self) -> int:
        return self._arena.shape[0] * self._row_bytes

    def _alloc(self, rows: int) -> torch.Tensor:
        # The pinned allocator rounds every block up to a power of two: ask for exactly that many bytes
        # and use all of them, rather than wasting up to half of a 100+ GB arena.
        nbytes = 1 << max(0, (rows * self._row_bytes - 1).bit_length()) if rows else 0
        raw = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin and nbytes > 0)
        usable = nbytes // self._row_bytes
        return raw[: usable * self._row_bytes].view(self.dtype).view(usable, *self.row_shape)

    # -- updates -------------------------------------------------------------------------------------
    def reserve(self, rows: int) -> None:
        """Make room for `rows` rows in all before a bulk load, so the arena is allocated once: growing it
        batch by batch would hold the old and the new arena together (3x the data at the last step, ~170 GB
        for one 57.6 GB shard of a 100M-token bank)."""
        if rows > self._arena.shape[0]:
            self._sync_copies()  # in-flight transfers read the old arena
            new = self._alloc(rows)
            new[: self._size].copy_(self._arena[: self._size])
            self._arena = new

    def add(self, numbers: Sequence[int], contents: Sequence[torch.Tensor]) -> None:
        """Append documents' content K/V, each (C, R, 2, Hkv, D); a number already present is replaced."""
        numbers = [int(n) for n in numbers]
        if len(numbers) != len(contents) or len(set(numbers)) != len(numbers):
            raise InputError("numbers and contents must be parallel, with no number twice")
        for t in contents:
            if tuple(t.shape[1:]) != self.row_shape:
                raise InputError(f"content K/V of shape {tuple(t.shape)}, expected (C, {', '.join(map(str, self.row_shape))})")
        self._kill(set(numbers) & self._segs.ranges.keys())
        total = sum(int(t.shape[0]) for t in contents)
        if self._size + total > self._arena.shape[0]:
            self.reserve(_grow(self._arena.shape[0], self._size + total))
        self.changed()
        pos = self._size
        for n, t in zip(numbers, contents):
            c = int(t.shape[0])
            self._arena[pos : pos + c].copy_(t)
            if c:
                self._segs.ranges[n] = [(pos, c)]
            pos += c
        self._size = pos
        if 2 * self._dead >= max(1, self._size):
            self.compact()

    def remove(self, numbers: Sequence[int]) -> None:
        self._kill({int(n) for n in numbers} & self._segs.ranges.keys())
        if self._dead and 2 * self._dead >= self._size:
            self.compact()

    def _kill(self, numbers: set[int]) -> None:
        self.changed()
        for n in numbers:
            self._dead += self._segs.rows_of(n)
            del self._segs.ranges[n]
            self._slot.pop(n, None)  # its pool rows are simply never read again

    def compact(self) -> None:
        self._sync_copies()
        keep = np.zeros(self._size, dtype=bool)
        for rs in self._segs.ranges.values():
            for s, c in rs:
                keep[s : s + c] = True
        idx = torch.from_numpy(np.nonzero(keep)[0])
        live = int(idx.numel())
        self._arena[:live] = self._arena[: self._size][idx]
        self._segs.remap(np.cumsum(keep) - keep)
        self._size, self._dead = live, 0
        self.changed()

    def _sync_copies(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        if self._reads is not None:  # a prefill's zero-copy gather may still be reading the arena
            self._reads.synchronize()

    # -- device-side document table (the prefill's select-and-fetch) -----------------------------------
    def changed(self) -> None:
        """Forget the device document table: call after changing which rows hold which document."""
        self._table = None

    def document_table(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(doc_start, doc_count) (N,) int64 on the device, document number -> first arena row and chunk
        count (0: not here), N = max number + 1; None when a document's rows are not one range (never
        after `add`, which writes each document contiguously). Built on the host once per bank change
        (numpy, one upload per tensor), so a prefill turns selected numbers into rows on the device."""
        if self._table is None:
            ranges = self._segs.ranges
            self._table_ok = all(len(rs) == 1 for rs in ranges.values())
            if not self._table_ok:
                return None
            n = max(ranges, default=-1) + 1
            start = np.zeros(n, dtype=np.int64)
            count = np.zeros(n, dtype=np.int64)
            if ranges:
                nums = np.fromiter(ranges, dtype=np.int64, count=len(ranges))
                sc = np.array([rs[0] for rs in ranges.values()], dtype=np.int64).reshape(-1, 2)
                start[nums], count[nums] = sc[:, 0], sc[:, 1]
            largest = np.sort(count)[::-1].copy()  # chunk counts, descending: the column bound's sums
            self._table = (torch.from_numpy(start).to(self.device), torch.from_numpy(count).to(self.device), largest)
        elif not self._table_ok:
            return None
        return self._table[0], self._table[1]

    def column_bound(self, k: int) -> int:
        """Most chunks k distinct documents of this store can hold: the sum of the k largest chunk counts
        (a static bound on a selection's columns, known on the host without reading the selection)."""
        if self.document_table() is None:
            raise InputError("no document table: a document's rows are not one range")
        assert self._table is not None
        return int(self._table[2][:k].sum())

    def gather_rows(self, layer_index: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Content K and V of one router layer at arena `rows` (S, C) (-1: zero padding), each (S, Hkv, C, D)
        on rows' device, in the store's dtype (`kernels.gather_rows`: zero-copy from the pinned arena on
        CUDA, no host sync; the reference on CPU). Only this layer's slice of the selected rows is read."""
        from msabank.kernels import gather_rows

        k, v, self.last_path = gather_rows(self._arena, layer_index, rows, impl=None if self.pin else "torch")
        if self._cuda:
            if self._reads is None:
                self._reads = torch.cuda.Event()
            self._reads.record()  # the arena may not move or change under the kernel: see `_sync_copies`
        return k, v

    # -- device pool ---------------------------------------------------------------------------------
    def clear_cache(self) -> None:
        """Forget every document on the device (the next prefetch copies again)."""
        self._slot.clear()
        self._pool_top = 0

    def _check(self, numbers: Sequence[int]) -> list[int]:
        wanted = sorted({int(n) for n in numbers})
        for n in wanted:
            if n not in self._segs.ranges:
                raise DocumentNotFoundError(f"#{n}", hint="the routing index and the content store disagree")
        return wanted

    def prefetch(self, numbers: Sequence[int]) -> None:
        """Start copying these documents (all layers) to the device; returns at once.

        No-op on CPU. A later `fetch` waits for the copy on the device only (the current stream waits on
        an event), never on the host.
        """
        if self._cuda:
            self._prefetch(self._check(numbers))

    def _prefetch(self, wanted: list[int]) -> None:
        from msabank.kernels import gather_spans

        ranges = self._segs.ranges
        missing = [n for n in wanted if n not in self._slot]
        if not missing:
            return
        assert self._stream is not None
        need = sum(c for n in missing for _, c in ranges[n])
        pool_rows = 0 if self._pool is None else self._pool.shape[0]
        if self._pool_top + need > pool_rows:
            # Empty the pool: the side stream overwrites it only after the work already queued on the
            # current stream (earlier fetches' copies out of it) has read it.
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            self.clear_cache()
            missing = wanted
            need = sum(c for n in missing for _, c in ranges[n])
            if need > pool_rows:
                rows = max(need, self.cache_bytes // self._row_bytes)
                self._pool = torch.empty((rows, *self.row_shape), dtype=self.dtype, device=self.device)
                self._pool.record_stream(self._stream)
        assert self._pool is not None
        top = self._pool_top
        table = []
        for n in missing:
            self._slot[n] = top
            for s, c in ranges[n]:
                table.append((s, top, c))
                top += c
        # The span table goes up on the side stream as a plain (staged) copy: pin_memory() of a table this
        # small is a cudaHostAlloc per call (issue 12). The device copy must outlive the launch: kept until
        # its event.
        spans = torch.from_numpy(np.array(table, dtype=np.int64).reshape(-1, 3))
        if not self.pin:
            spans = spans.to(self.device)
        self._inflight = [(e, t) for e, t in self._inflight if not e.query()]
        with torch.cuda.stream(self._stream):
            if self.pin:
                spans = spans.to(self.device, non_blocking=True)
            if self.timing:
                t0 = torch.cuda.Event(enable_timing=True)
                t0.record(self._stream)
            # pageable (pin=False) host memory is not device-addressable: one DMA per document instead
            self.last_path = gather_spans(self._arena, spans, self._pool, impl=None if self.pin else "torch",
                                          max_rows=max(c for _, _, c in table))
            ev = torch.cuda.Event(enable_timing=self.timing)
            ev.record(self._stream)
        if self.timing:
            self.last_transfer = (t0, ev)
        self._inflight.append((ev, spans))
        self._ready = ev
        self._pool_top = top
        self.bytes_copied += need * self._row_bytes

    def fetch(self, layer_index: int, numbers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Content K and V of one router layer for these documents: each (C_sel, Hkv, D) on the device.

        Documents are deduplicated and their chunks concatenated in ascending number order (the official
        context order). On CUDA the results are ordered after the transfer on the current stream.
        """
        wanted = self._check(numbers)
        hkv, d = self.row_shape[2], self.row_shape[3]
        if not wanted:
            e = torch.empty(0, hkv, d, dtype=self.dtype, device=self.device)
            return e, e.clone()
        if not self._cuda:
            parts = [self._arena[s : s + c, layer_index] for n in wanted for s, c in self._segs.ranges[n]]
            kv = torch.cat(parts).to(self.device)  # (C_sel, 2, Hkv, D)
            return kv[:, 0].contiguous(), kv[:, 1].contiguous()
        self._prefetch(wanted)
        assert self._pool is not None and self._ready is not None
        torch.cuda.current_stream(self.device).wait_event(self._ready)
        slot, ranges = self._slot, self._segs.ranges
        layer = self._pool[:, layer_index]  # (pool_rows, 2, Hkv, D), strided
        first = slot[wanted[0]]
        end = first
        for n in wanted:  # the usual case: this layer's documents were prefetched together, in order
            if slot[n] != end:
                break
            end += sum(c for _, c in ranges[n])
        else:
            sl = layer[first:end]
            return sl[:, 0].contiguous(), sl[:, 1].contiguous()
        rows = np.concatenate([np.arange(slot[n], slot[n] + sum(c for _, c in ranges[n])) for n in wanted])
        idx = torch.from_numpy(rows)
        idx = idx.to(self.device, non_blocking=True)  # staged: no cudaHostAlloc for a small index (issue 12)
        return layer[:, 0].index_select(0, idx), layer[:, 1].index_select(0, idx)


    def fetch_batch(self, layer_index: int, numbers: Sequence[Sequence[int]]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Content K and V of one router layer for every sample, in the layout attention reads.

        numbers[s]: sample s's documents (deduplicated, ascending: the official context order). Returns k, v
        (S, Hkv, C_max, D) on the device, sample s's chunks in columns 0..lengths[s]-1 and zeros after, and
        lengths (S,) int64 on the device. On CUDA the documents of all samples missing from the device pool
        cross the bus in one gather (`prefetch`), then one index_select per layer cuts every sample's chunks
        out of the pool; on CPU one index_select reads the arena. No per-sample or per-document device work.
        """
        per = [self._check(ns) for ns in numbers]
        hkv, d = self.row_shape[2], self.row_shape[3]
        if self._cuda:
            self._prefetch(sorted({n for ns in per for n in ns}))
            src = self._pool[:, layer_index] if self._pool is not None else None  # (pool_rows, 2, Hkv, D)
            spans = [(s, self._slot[n], self._segs.rows_of(n)) for s, ns in enumerate(per) for n in ns]
        else:
            src = self._arena[:, layer_index]
            spans = [(s, a, c) for s, ns in enumerate(per) for n in ns for a, c in self._segs.ranges[n]]
        t = torch.from_numpy(np.array(spans, dtype=np.int64).reshape(-1, 3))
        index, lengths = span_index(t[:, 1], t[:, 2], t[:, 0], len(per))
        b, c_max = index.shape
        if c_max == 0 or src is None:
            e = torch.zeros(b, hkv, 0, d, dtype=self.dtype, device=self.device)
            return e, e.clone(), lengths.to(self.device)
        if self._cuda:
            assert self._ready is not None
            torch.cuda.current_stream(self.device).wait_event(self._ready)
            # A plain (staged) copy: pin_memory() of a tensor this small is a cudaHostAlloc each call (issue 12)
            index = index.to(self.device, non_blocking=True)
            lengths = lengths.to(self.device, non_blocking=True)
        flat = index.view(-1)
        kv = src.index_select(0, flat.clamp_min(0)).masked_fill_((flat < 0).view(-1, 1, 1, 1), 0)  # (S·C_max, 2, Hkv, D)
        kv = kv.to(self.device).view(b, c_max, 2, hkv, d)
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2), lengths


# ---------------------------------------------------------------------------------------------------
# A bank's index, kept at one version


class BankIndex:
    """The routing index and content store of one bank at one bank version (this rank's shard).

    `group`: a torch.distributed process group for memory parallel; this rank then holds the documents
    `Shard.of(group)` owns and searches through `ShardedRoutingIndex` (collective).
    """

    def __init__(self, geometry: Geometry, *, dtype: torch.dtype, index_device: torch.device,
                 content_device: torch.device, group: Any = None) -> None:
        from msabank.kernels.memory_parallel import Shard

        self.geometry = geometry
        self.dtype = dtype
        self.index_device = index_device
        self.content_device = content_device
        self.group = group
        self.shard = Shard.of(group)
        self.routing: RoutingIndex | None = None
        self.content: ContentStore | None = None
        self.router: Any = None  # RoutingIndex, or ShardedRoutingIndex under memory parallel
        self.version = -1
        self.damaged: dict[int, str] = {}
        """Documents left out of routing because their stored bytes are damaged (number -> the problem)."""

    def refresh(self, snap: Snapshot) -> None:
        """Bring both stores to `snap`'s version: the first call loads every live document (bulk routing-key
        reads, one per router layer); later calls apply only the changes since (new rows appended,
        superseded rows masked)."""
        if self.routing is None:
            self._load(snap)
        elif snap.version != self.version:
            self._apply_changes(snap)

    @property
    def num_rows(self) -> int:
        """Live routing rows (chunks) held by this rank; 0 before the first refresh."""
        return self.routing.num_rows if self.routing is not None else 0

    @property
    def num_docs(self) -> int:
        """Documents with live rows held by this rank; 0 before the first refresh."""
        return len(self.routing) if self.routing is not None else 0

    def view(self, snap: Snapshot | None, top_k: int) -> BankMemory:
        """The `MemoryView` over the stores (refresh first); `snap` serves other ranks' documents."""
        assert self.router is not None and self.content is not None, "refresh() first"
        return BankMemory(self.router, self.content, top_k, snap)

    def _load(self, snap: Snapshot) -> None:
        g, cdt = self.geometry, self.dtype
        damaged: dict[int, str] = {}
        index = RoutingIndex(g.num_router_layers, g.row_width, device=self.index_device, dtype=cdt)
        content = ContentStore(g.num_router_layers, g.num_kv_heads, g.head_dim, device=self.content_device, dtype=cdt)
        numbers, _, counts = snap.row_map()  # live spans in row order, as routing_keys returns its rows
        mine = self.shard.owns_each(numbers)
        rows = torch.from_numpy(numbers[mine].repeat(counts[mine]))
        # Sized once and filled one router layer at a time: host memory peaks at one layer of keys (3.2 GB
        # at 100M tokens and the MSA-4B geometry, not 57.6 GB), the index holds exactly this rank's rows and
        # the content arena is allocated once (docs/engine.md, "Sizing").
        index.reserve(rows.numel())
        content.reserve(rows.numel())  # one content row per routing row (chunk)
        if rows.numel():
            row_mine = torch.from_numpy(mine.repeat(counts)) if self.shard.world > 1 else None

            def layer_keys() -> Iterator[torch.Tensor]:
                for r in range(g.num_router_layers):
                    keys = snap.routing_keys(r, damaged=damaged)[0]
                    if row_mine is not None:
                        keys = keys[row_mine]
                    yield keys
                    del keys  # before the next layer is read

            index.add_rows(rows, layer_keys())
        my_numbers = [int(n) for n in numbers[mine]]
        for i in range(0, len(my_numbers), 1024):
            kv = snap.content_kv([n for n in my_numbers[i : i + 1024] if n not in damaged], damaged=damaged)
            content.add(list(kv), [t.to(cdt) for t in kv.values()])
        if damaged:  # one damaged document must not stop the bank: it is left out of routing, and named
            index.remove(list(damaged))
            content.remove([n for n in damaged if n in content])
            for reason in damaged.values():
                log.info("skipping a damaged document: %s", reason)
        self.damaged = damaged
        self.routing, self.content, self.version = index, content, snap.version
        if self.group is not None:
            from msabank.kernels.memory_parallel import ShardedRoutingIndex

            self.router = ShardedRoutingIndex(index, group=self.group)
        else:
            self.router = index

    def _apply_changes(self, snap: Snapshot) -> None:
        assert self.routing is not None and self.content is not None
        ch = snap.changes_since(self.version)
        if ch.deleted_numbers:
            self.routing.remove(ch.deleted_numbers)
            self.content.remove(ch.deleted_numbers)
        for n in (*ch.deleted_numbers, *ch.upserted_numbers):
            self.damaged.pop(n, None)  # a new version (or a delete) replaces the damaged one
        mems, ups = [], []
        for n in ch.upserted_numbers:
            if not self.shard.owns(n):
                continue
            try:
                mems.append(snap.tensors(snap.user_id(n)))
                ups.append(n)
            except BankCorruptedError as err:
                self.damaged[n] = str(err)
                log.info("skipping a damaged document: %s", err)
                if n in self.routing:
                    self.routing.remove([n])
                    self.content.remove([n])
        if ups:
            r, cdt = self.geometry.num_router_layers, self.dtype
            self.routing.add(ups, [m.num_chunks for m in mems],
                             [torch.cat([m.routing_keys[layer].flatten(1) for m in mems]).to(cdt) for layer in range(r)])
            self.content.add(ups, [torch.stack([m.content_k, m.content_v], dim=2).transpose(0, 1).to(cdt)
                                   for m in mems])  # (C, R, 2, Hkv, D)
        self.version = ch.version


MAX_STATIC_COLUMNS = 4096
"""Largest static column bound (top_k × the largest documents' chunks) the device prefill path takes; past
it (e.g. 16 documents of 4,096 tokens at chunk size 16: 4,096 columns per layer of mostly padding) a prefill
takes the synced path, which sizes the columns by the selection."""
COLUMN_BUCKET = 64
"""The static bound is rounded up to a multiple of this, so a bank change rarely changes cache widths."""


class _Timer:
    """Accumulated seconds of host-timed (CPU) or event-timed (CUDA) spans; CUDA spans are read only when
    the total is asked for (after the generation's own sync), so timing never waits on the device."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.host_s = 0.0
        self.pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self) -> Any:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, mark: Any) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.pending.append((mark, ev))
        else:
            self.host_s += time.perf_counter() - mark

    @property
    def seconds(self) -> float:
        for a, b in self.pending:
            b.synchronize()
            self.host_s += a.elapsed_time(b) / 1e3
        self.pending.clear()
        return self.host_s


class BankMemory:
    """`MemoryView` over the routing index and the content store (one consistent bank version).

    `router` is a `RoutingIndex`, or a `ShardedRoutingIndex` when several ranks each hold a shard (memory
    parallel): then documents another rank owns are read from the bank snapshot on demand (once per
    question). Accumulates the time of routing (`route_s`) and of content fetches (`fetch_s`) so `ask` can
    report time by stage: host wall time on CPU; on CUDA the device time between CUDA events recorded
    around each routing and each fetch (read after the generation has synced; never a synchronize of its
    own), which on the device prefill path is the routing kernels' and the row gather's time on the stream.

    `prefill_selection` is the device prefill path (`stages._prefill` uses it when it returns one): routing
    top-k and the content fetch of every router layer stay on the device, and the host learns the selections
    once, after the last layer. `device_prefill = False` (on the instance or the class) forces the synced
    path: per layer `route_batch` (the numbers come to the host), then `content_kv_batch`.
    """

    device_prefill = True

    def __init__(self, router: Any, content: ContentStore, top_k: int, snap: Snapshot | None = None) -> None:
        self.router = router
        self.content = content
        self.top_k = top_k
        self.snap = snap
        self._cuda = content.device.type == "cuda"
        self._route_t = _Timer(self._cuda)
        self._fetch_t = _Timer(self._cuda)
        self._remote: dict[int, torch.Tensor] = {}  # number -> (C, R, 2, Hkv, D) on the device

    @property
    def route_s(self) -> float:
        return self._route_t.seconds

    @property
    def fetch_s(self) -> float:
        return self._fetch_t.seconds

    def prefill_selection(self, num_seqs: int, given: Sequence[Sequence[Routed] | None] | None = None,
                          *, static_columns: bool | None = None) -> PrefillSelection | None:
        """A device-side select-and-fetch for one prefill of `num_seqs` samples, or None where the synced path
        must serve: memory parallel (other ranks' documents come from the snapshot), routing index and
        content on different devices, a pageable arena on CUDA (not device-addressable), or a static column
        bound past MAX_STATIC_COLUMNS. `given[s]`: sample s's replayed selection (one `Routed` per router
        layer), uploaded once. `static_columns` (default: on CUDA) sizes the columns by top_k × the largest
        documents' chunks instead of the selection (reading the selection's size is a sync on CUDA; on CPU
        it is free, and the exact size keeps the caches those of the synced path, byte for byte)."""
        if not self.device_prefill or not isinstance(self.router, RoutingIndex):
            return None
        content = self.content
        if self.router.device != content.device or (self._cuda and not content.pin):
            return None
        table = content.document_table()
        if table is None:
            return None
        k = self.top_k
        given = list(given) if given is not None else [None] * num_seqs
        if len(given) != num_seqs:
            raise InputError(f"{len(given)} given selections for {num_seqs} samples")
        k = max([k] + [int(r.numbers.numel()) for g in given if g is not None for r in g])
        static = self._cuda if static_columns is None else static_columns
        columns = None
        if static:
            columns = -(-max(1, content.column_bound(k)) // COLUMN_BUCKET) * COLUMN_BUCKET
            if columns > MAX_STATIC_COLUMNS:
                return None
        return PrefillSelection(self, num_seqs, k, columns, table, given)

    def route(self, layer_index: int, query: torch.Tensor) -> Routed:
        t = self._route_t.start()
        out = self.router.search(layer_index, query, self.top_k)  # returns CPU tensors: already synced
        self._route_t.stop(t)
        return out

    def content_kv(self, layer_index: int, numbers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        t = self._fetch_t.start()
        nums = sorted(int(n) for n in numbers)
        if all(n in self.content for n in nums):
            out = self.content.fetch(layer_index, nums)
        else:  # memory parallel: some documents live in another rank's shard
            parts = [self.content.fetch(layer_index, [n]) if n in self.content else self._remote_kv(layer_index, n)
                     for n in nums]
            out = (torch.cat([k for k, _ in parts]), torch.cat([v for _, v in parts]))
        self._fetch_t.stop(t)
        return out

    def route_batch(self, layer_index: int, queries: Sequence[torch.Tensor]) -> list[Routed]:
        """`route` for every question of a batch: one scan of the layer (a `RoutingIndex`); under memory
        parallel one collective search per question, in order, as every rank expects."""
        t = self._route_t.start()
        if hasattr(self.router, "search_batch"):
            out = self.router.search_batch(layer_index, queries, self.top_k)  # CPU tensors: synced
        else:
            out = [self.router.search(layer_index, q, self.top_k) for q in queries]
        self._route_t.stop(t)
        return out

    def content_kv_batch(self, layer_index: int, numbers: Sequence[Sequence[int]]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v (B, Hkv, C_max, D) and lengths (B,) on the device (`ContentStore.fetch_batch`)."""
        t = self._fetch_t.start()
        nums = [sorted({int(n) for n in ns}) for ns in numbers]
        if all(n in self.content for ns in nums for n in ns):
            out = self.content.fetch_batch(layer_index, nums)
        else:  # memory parallel: some documents live in another rank's shard; assembled per sample
            out = self._assemble(layer_index, nums)
        self._fetch_t.stop(t)
        return out

    def _assemble(self, layer_index: int, nums: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        parts = []
        for ns in nums:
            kv = [self.content.fetch(layer_index, [n]) if n in self.content else self._remote_kv(layer_index, n)
                  for n in ns]
            parts.append((torch.cat([k for k, _ in kv]), torch.cat([v for _, v in kv])) if kv else None)
        lengths = [p[0].shape[0] if p is not None else 0 for p in parts]
        _, _, hkv, d = self.content.row_shape
        k = torch.zeros(len(nums), hkv, max(lengths, default=0), d, dtype=self.content.dtype, device=self.content.device)
        v = torch.zeros_like(k)
        for s, p in enumerate(parts):
            if p is not None:
                k[s, :, : lengths[s]] = p[0].transpose(0, 1)
                v[s, :, : lengths[s]] = p[1].transpose(0, 1)
        return k, v, torch.tensor(lengths, dtype=torch.int64, device=self.content.device)

    def _remote_kv(self, layer_index: int, number: int) -> tuple[torch.Tensor, torch.Tensor]:
        if number not in self._remote:
            if self.snap is None:
                raise DocumentNotFoundError(f"#{number}")
            kv = self.snap.content_kv([number])[number]
            self._remote[number] = kv.to(self.content.device, self.content.dtype)
        kv = self._remote[number]
        return kv[:, layer_index, 0], kv[:, layer_index, 1]


class PrefillSelection:
    """One prefill's routing and content fetch on the device (`BankMemory.prefill_selection`).

    `layer(r, query, seq)` per router layer, in order: top-k of the samples' routing-query rows
    (`kernels.routing_topk_batched`, device tensors), replayed selections swapped in (`torch.where`), the
    selected documents' arena rows from the device document table (`kernels.selected_rows`) and this
    layer's K/V gathered into the (S, Hkv, C, D) layout (`kernels.gather_rows`): no host sync, no Python per
    document. `finish()` brings every layer's numbers and scores to the host in one copy and returns the
    `Routed` lists the synced path builds, bit for bit.
    """

    def __init__(self, memory: BankMemory, num_seqs: int, k: int, columns: int | None,
                 table: tuple[torch.Tensor, torch.Tensor], given: list[Sequence[Routed] | None]) -> None:
        self.memory = memory
        self.num_seqs = num_seqs
        self.k = k
        self.columns = columns
        """Static column count of every layer's fetch, or None: the selection's size (a host read)."""
        self.doc_start, self.doc_count = table
        self.given = given
        dev = memory.content.device
        self._given_any = any(g is not None for g in given)
        if self._given_any:  # every given layer's numbers in one upload: (R, S, k), -1 padding
            r_layers = memory.router.num_router_layers
            nums = np.full((r_layers, num_seqs, k), -1, dtype=np.int64)
            scores = np.full((r_layers, num_seqs, k), -np.inf, dtype=np.float32)
            mask = np.zeros(num_seqs, dtype=bool)
            for s, g in enumerate(given):
                if g is None:
                    continue
                if len(g) != r_layers:
                    raise InputError(f"a given selection has {len(g)} layers; the bank has {r_layers} router layers")
                mask[s] = True
                for r, sel in enumerate(g):
                    n = int(sel.numbers.numel())
                    nums[r, s, :n] = sel.numbers.numpy()
                    scores[r, s, :n] = sel.scores.numpy()
            self._given = (torch.from_numpy(nums).to(dev), torch.from_numpy(scores).to(dev),
                           torch.from_numpy(mask).to(dev)[:, None])
        self._numbers: list[torch.Tensor] = []
        self._scores: list[torch.Tensor] = []

    def layer(self, layer_index: int, query: torch.Tensor, seq: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router layer `layer_index` (called for 0, 1, ... in order). query (T_all, dim): the routing rows
        of the samples that route (not given ones), seq (T_all,) int64 their sample ids, both on the device.
        Returns k, v (S, Hkv, C, D) in the store's dtype and lengths (S,) int64, on the device."""
        if layer_index != len(self._numbers):
            raise InputError(f"router layer {layer_index} out of order (expected {len(self._numbers)})")
        mem, index, dev = self.memory, self.memory.router, self.memory.content.device
        t = mem._route_t.start()
        s, k = self.num_seqs, self.k
        if query.shape[0]:
            keys, row_doc, num_docs = index.layer(layer_index)
            scores, idx = routing_topk_batched(query.to(index.device), seq.to(index.device), s, keys, row_doc,
                                               num_docs, mem.top_k, impl=index.impl)
            if k > mem.top_k:  # a replayed selection is wider than top_k
                scores = torch.nn.functional.pad(scores, (0, k - mem.top_k), value=float("-inf"))
                idx = torch.nn.functional.pad(idx, (0, k - mem.top_k), value=-1)
        else:
            scores = torch.full((s, k), float("-inf"), dtype=torch.float32, device=dev)
            idx = torch.full((s, k), -1, dtype=torch.int64, device=dev)
        if self._given_any:
            g_nums, g_scores, g_mask = self._given
            idx = torch.where(g_mask, g_nums[layer_index], idx)
            scores = torch.where(g_mask, g_scores[layer_index], scores)
        self._numbers.append(idx)
        self._scores.append(scores)
        mem._route_t.stop(t)
        t = mem._fetch_t.start()
        rows, lengths = selected_rows(idx, self.doc_start, self.doc_count, self.columns)
        ck, cv = mem.content.gather_rows(layer_index, rows)
        mem._fetch_t.stop(t)
        return ck, cv, lengths

    def finish(self) -> list[list[Routed]]:
        """[layer][sample] `Routed` of every layer so far: one device-to-host copy of all numbers and scores
        (the prefill's one wait for them). A given sample gets its given `Routed` objects back. Raises
        DocumentNotFoundError when a selected document has no content (index and store disagree)."""
        if not self._numbers:
            return []
        nums = torch.stack(self._numbers)  # (R, S, k)
        scores = torch.stack(self._scores).to(torch.float64).view(torch.int64)  # exact: fp32 ⊂ fp64
        host = torch.stack([nums, scores]).cpu().numpy()
        nums_np, scores_np = host[0], host[1].view(np.float64).astype(np.float32)
        content = self.memory.content
        out: list[list[Routed]] = []
        for r in range(nums_np.shape[0]):
            layer = []
            for s in range(self.num_seqs):
                g = self.given[s]
                if g is not None:
                    layer.append(g[r])
                    continue
                keep = nums_np[r, s] >= 0
                n = nums_np[r, s][keep]
                for x in n.tolist():
                    if x not in content:
                        raise DocumentNotFoundError(f"#{x}", hint="the routing index and the content store disagree")
                layer.append(Routed(numbers=torch.from_numpy(n), scores=torch.from_numpy(scores_np[r, s][keep])))
            out.append(layer)
        return out


class SnapshotDocuments:
    """`interleave.Documents` over one bank snapshot: names and texts by document number."""

    def __init__(self, snap: Snapshot, damaged: dict[int, str] | None = None) -> None:
        self.snap = snap
        self.damaged = damaged if damaged is not None else {}
        """Documents skipped as damaged (number -> reason); a damaged text found here is added."""

    def __len__(self) -> int:
        return int(self.snap.state.live_docs)

    def user_ids(self, numbers: Sequence[int]) -> dict[int, str]:
        return {n: self.snap.user_id(n) for n in numbers}

    def texts(self, numbers: Sequence[int]) -> dict[int, tuple[str, str]]:
        out: dict[int, tuple[str, str]] = {}
        for n in numbers:
            try:
                rec = self.snap.get(self.snap.user_id(n))
            except DocumentNotFoundError:  # never existed, or deleted
                continue
            except BankCorruptedError as err:  # its text fails its hash: never injected
                self.damaged.setdefault(n, str(err))
                continue
            out[n] = (rec.user_id, rec.text)
        return out
