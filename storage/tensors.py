"""Zarr v3 tensor store of a bank: routing keys, content K/V and the template prefix.

The arrays are created by zarr (so any zarr 3 reader can open them), but the hot paths read and write
chunk files directly: the chunk key, codec (bytes little-endian, then Blosc zstd/3/bitshuffle) and chunk
shape are fixed by this module, and going around zarr's per-call machinery is 2-3x faster for bulk reads
and avoids a metadata round trip per append. Every file is written to `<name>.tmp`, fsynced, then renamed,
so a crash never leaves a torn chunk and a concurrent reader sees the old or the new file, both holding
identical bytes for every committed row. This module knows nothing about documents or LMDB.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numcodecs.blosc as blosc
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from msabank.storage.records import DTYPE_STORED, Geometry

_CNAME = b"zstd"
_CLEVEL = 3
TMP_SUFFIX = ".tmp"
_WRITE_THREADS = max(4, os.cpu_count() or 1)
"""Threads that compress, write and fsync chunk files: every core (Blosc zstd releases the GIL; an append
of 1,024 embedded-model documents writes ~14 chunks), and at least 4 because concurrent fsyncs share
journal commits (~2x on the 2-core box)."""
_pool: tuple[int, ThreadPoolExecutor] | None = None


def _write_pool() -> ThreadPoolExecutor:
    """The process's chunk-writer pool, made once per process (a pool inherited across fork has no threads)."""
    global _pool
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ThreadPoolExecutor(_WRITE_THREADS, thread_name_prefix="msabank-chunk-write"))
    return _pool[1]


class ChunkReadError(Exception):
    """A chunk file is missing or cannot be decoded (internal; the bank maps it to documents)."""

    def __init__(self, array: str, chunk: int, rows: tuple[int, int], reason: str) -> None:
        super().__init__(f"{array} chunk {chunk} (rows {rows[0]}..{rows[1] - 1}): {reason}")
        self.array = array
        self.chunk = chunk
        self.rows = rows


def _codec() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=_CLEVEL, shuffle=BloscShuffle.bitshuffle)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` via `<path>.tmp` + fsync + rename. The caller fsyncs the directory."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under root (used once after creating arrays)."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


class _Array:
    """One zarr v3 array whose first axis is the row axis, accessed chunk by chunk."""

    def __init__(self, path: Path, row_shape: tuple[int, ...], chunk_rows: int, dtype: np.dtype, label: str) -> None:
        self.path = path
        self.label = label
        """How messages name the array: `content` or `routing/<layer>`."""
        self.row_shape = row_shape
        self.chunk_rows = chunk_rows
        self.dtype = dtype
        self.row_elems = int(np.prod(row_shape))
        self._suffix = "".join(".0" for _ in row_shape)

    def chunk_file(self, i: int) -> Path:
        return self.path / f"c.{i}{self._suffix}"

    def chunk_index(self, name: str) -> int | None:
        if not name.startswith("c.") or not name.endswith(self._suffix) or name.endswith(TMP_SUFFIX):
            return None
        head = name[2 : len(name) - len(self._suffix)] if self._suffix else name[2:]
        return int(head) if head.isdigit() else None

    def decode(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Chunk i as (chunk_rows, *row_shape)."""
        lo = i * self.chunk_rows
        try:
            raw = self.chunk_file(i).read_bytes()
        except FileNotFoundError:
            raise ChunkReadError(self.label, i, (lo, lo + self.chunk_rows), "chunk file missing") from None
        if out is None:
            out = np.empty((self.chunk_rows, *self.row_shape), dtype=self.dtype)
        # The Blosc header (bytes 4..16: raw size, block size, compressed size) is checked before decoding:
        # a damaged header must be refused here, not handed to the decompressor.
        if len(raw) < 16:
            raise ChunkReadError(self.label, i, (lo, lo + self.chunk_rows), f"cannot decode: {len(raw)} bytes") from None
        nbytes, _blocksize, cbytes = struct.unpack_from("<III", raw, 4)
        if nbytes != out.nbytes or cbytes != len(raw):
            raise ChunkReadError(self.label, i, (lo, lo + self.chunk_rows),
                                 f"cannot decode: damaged header ({nbytes} raw / {cbytes} stored bytes, want "
                                 f"{out.nbytes} / {len(raw)})") from None
        try:
            blosc.decompress(raw, out)
        except (RuntimeError, ValueError) as err:
            raise ChunkReadError(self.label, i, (lo, lo + self.chunk_rows), f"cannot decode: {err}") from None
        return out

    def encode_write(self, i: int, block: np.ndarray) -> int:
        assert block.shape == (self.chunk_rows, *self.row_shape) and block.flags.c_contiguous, block.shape
        data = blosc.compress(block, _CNAME, _CLEVEL, blosc.BITSHUFFLE, 0)
        atomic_write(self.chunk_file(i), data)
        return len(data)

    def set_shape(self, rows: int) -> None:
        meta_path = self.path / "zarr.json"
        meta = json.loads(meta_path.read_text())
        meta["shape"] = [rows, *self.row_shape]
        atomic_write(meta_path, json.dumps(meta, indent=2).encode())

    def shape_rows(self) -> int:
        return int(json.loads((self.path / "zarr.json").read_text())["shape"][0])


class Generation:
    """One generation of the tensor arrays: `routing/<layer>` and `content`, sharing one row space.

    Row r of every array belongs to the same pooled chunk. Rows are appended only; compaction writes a new
    generation. `capacity` (the zarr shape) may exceed the committed row count: rows past the committed
    count (kept in LMDB) are garbage and are overwritten by the next append.
    """

    def __init__(self, path: Path, geometry: Geometry, content_chunk_rows: int, routing_chunk_rows: int) -> None:
        self.path = path
        self.geometry = geometry
        g = geometry
        dt = np.dtype(DTYPE_STORED[g.dtype])
        self.content = _Array(path / "content", (g.num_router_layers, 2, g.num_kv_heads, g.head_dim), content_chunk_rows, dt,
                              "content")
        self.routing = [
            _Array(path / "routing" / str(i), (g.row_width,), routing_chunk_rows, dt, f"routing/{i}")
            for i in range(g.num_router_layers)
        ]
        self.bytes_written = 0
        self._dirty_dirs: set[Path] = set()

    @property
    def arrays(self) -> list[_Array]:
        return [self.content, *self.routing]

    @classmethod
    def create(cls, path: Path, geometry: Geometry, content_chunk_rows: int, routing_chunk_rows: int) -> Generation:
        g = geometry
        dt = DTYPE_STORED[g.dtype]
        root = zarr.open_group(str(path), mode="w", zarr_format=3)
        root.attrs["msabank"] = {"kind": "generation"}
        routing = root.create_group("routing")
        for i in range(g.num_router_layers):
            routing.create_array(
                str(i),
                shape=(0, g.row_width),
                chunks=(routing_chunk_rows, g.row_width),
                dtype=dt,
                compressors=[_codec()],
                fill_value=0,
                chunk_key_encoding={"name": "default", "separator": "."},
                dimension_names=["row", "hkv_d"],
            )
        root.create_array(
            "content",
            shape=(0, g.num_router_layers, 2, g.num_kv_heads, g.head_dim),
            chunks=(content_chunk_rows, g.num_router_layers, 2, g.num_kv_heads, g.head_dim),
            dtype=dt,
            compressors=[_codec()],
            fill_value=0,
            chunk_key_encoding={"name": "default", "separator": "."},
            dimension_names=["row", "router_layer", "kv", "hkv", "d"],
        )
        (path / ".readers").touch()
        fsync_tree(path)
        fsync_dir(path.parent)
        return cls(path, geometry, content_chunk_rows, routing_chunk_rows)

    # ---------------------------------------------------------------- writes
    def append(self, start: int, capacity: int, content: np.ndarray, routing: Sequence[np.ndarray]) -> int:
        """Write rows [start, start+n) of every array; returns the new capacity (zarr shape).

        content: (n, R, 2, Hkv, D) and routing[i]: (n, Hkv·D), stored dtype. Rows below `start` in a shared
        tail chunk are read back and rewritten unchanged, so an append costs O(n + one chunk per array),
        independent of the bank size. Files are fsynced here; call `sync()` before publishing the rows.
        """
        n = int(content.shape[0])
        if n == 0:
            return capacity
        jobs: list[tuple[_Array, int, np.ndarray]] = []
        for arr, data in zip(self.arrays, [content, *routing], strict=True):
            jobs += self._append_blocks(arr, start, data)
        # compress + write + fsync on all cores: concurrent fsyncs share journal commits (~2x here)
        self.bytes_written += sum(_write_pool().map(lambda j: j[0].encode_write(j[1], j[2]), jobs))
        if start + n > capacity:
            step = max(a.chunk_rows for a in self.arrays)
            new_cap = max(start + n, capacity * 2, step)
            new_cap = -(-new_cap // step) * step
            for arr in self.arrays:
                arr.set_shape(new_cap)
                self._dirty_dirs.add(arr.path)
            capacity = new_cap
        return capacity

    def _append_blocks(self, arr: _Array, start: int, data: np.ndarray) -> list[tuple[_Array, int, np.ndarray]]:
        """The full chunks to write for rows [start, start+n) of one array."""
        cr = arr.chunk_rows
        n = int(data.shape[0])
        stop = start + n
        out = []
        for i in range(start // cr, -(-stop // cr)):
            lo, hi = i * cr, (i + 1) * cr
            if lo < start:  # shared tail chunk: keep the committed rows below `start`
                block = arr.decode(i)
                block[start - lo :] = 0
            else:
                block = np.zeros((cr, *arr.row_shape), dtype=arr.dtype)
            a, b = max(lo, start), min(hi, stop)
            block[a - lo : b - lo] = data[a - start : b - start]
            out.append((arr, i, block))
        self._dirty_dirs.add(arr.path)
        return out

    def sync(self) -> None:
        """fsync the directories of every file written since the last sync (data before pointer)."""
        for d in sorted(self._dirty_dirs):
            fsync_dir(d)
        self._dirty_dirs.clear()

    def reclaim_tail(self, rows: int) -> int:
        """Remove temp files and chunk files wholly past `rows` (garbage of a crashed writer). Returns files removed."""
        removed = 0
        for arr in self.arrays:
            cutoff = -(-rows // arr.chunk_rows)
            with os.scandir(arr.path) as it:
                for entry in it:
                    i = arr.chunk_index(entry.name)
                    if entry.name.endswith(TMP_SUFFIX) or (i is not None and i >= cutoff):
                        os.unlink(entry.path)
                        removed += 1
            if removed:
                fsync_dir(arr.path)
        return removed

    # ---------------------------------------------------------------- reads
    def read_rows(self, arr: _Array, start: int, stop: int, cache: dict[tuple[int, int], np.ndarray] | None = None) -> np.ndarray:
        """Rows [start, stop) of one array as a new array (stop-start, *row_shape)."""
        cr = arr.chunk_rows
        out = np.empty((stop - start, *arr.row_shape), dtype=arr.dtype)
        key_base = id(arr)
        for i in range(start // cr, -(-stop // cr)):
            lo = i * cr
            block = cache.get((key_base, i)) if cache is not None else None
            if block is None:
                block = arr.decode(i)
                if cache is not None:
                    cache[(key_base, i)] = block
            a, b = max(lo, start), min(lo + cr, stop)
            out[a - start : b - start] = block[a - lo : b - lo]
        return out

    def read_all(
        self, arr: _Array, stop: int, pool: ThreadPoolExecutor | None = None, bad: list[ChunkReadError] | None = None
    ) -> np.ndarray:
        """Rows [0, stop) decoded straight into one buffer (the bulk routing path).

        An undecodable chunk raises ChunkReadError, or, when a `bad` list is given, is appended to it and
        its rows are zeros."""
        cr = arr.chunk_rows
        nchunks = -(-stop // cr)
        buf = np.empty((nchunks * cr, *arr.row_shape), dtype=arr.dtype)

        def one(i: int) -> None:
            try:
                arr.decode(i, buf[i * cr : (i + 1) * cr])
            except ChunkReadError as err:
                if bad is None:
                    raise
                buf[i * cr : (i + 1) * cr] = 0
                bad.append(err)

        if pool is None or nchunks < 4:
            for i in range(nchunks):
                one(i)
        else:
            list(pool.map(one, range(nchunks)))
        if bad:
            bad.sort(key=lambda e: e.chunk)
        return buf[:stop]

    def disk_bytes(self) -> int:
        return dir_bytes(self.path)


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except FileNotFoundError:
                pass
    return total


def write_template(root: Path, k: np.ndarray, v: np.ndarray) -> None:
    """The template prefix K/V, each (L, Hkv, T0, D) stored dtype, as two one-chunk arrays."""
    group = zarr.open_group(str(root), mode="w", zarr_format=3)
    group.attrs["msabank"] = {"kind": "template"}
    for name, arr in (("k", k), ("v", v)):
        z = group.create_array(
            name,
            shape=arr.shape,
            chunks=arr.shape if arr.size else tuple(max(1, s) for s in arr.shape),
            dtype=arr.dtype,
            compressors=[_codec()],
            fill_value=0,
            dimension_names=["layer", "hkv", "t", "d"],
        )
        if arr.size:
            z[...] = arr
    fsync_tree(root)


def read_template(root: Path) -> tuple[np.ndarray, np.ndarray]:
    group = zarr.open_group(str(root), mode="r", zarr_format=3)
    k = group["k"]
    v = group["v"]
    assert isinstance(k, zarr.Array) and isinstance(v, zarr.Array)
    return np.asarray(k[...]), np.asarray(v[...])


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
