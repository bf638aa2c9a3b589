"""Test helpers shared by the storage tests and the crash-test worker (imported as `_helpers`).

Tensors are a pure function of (geometry, text), so any process can recompute what a document's stored
bytes must be.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from msabank.storage import Bank, DocumentWrite, Geometry
from msabank.types import EncodedMemory

SMALL = Geometry(num_router_layers=3, num_layers=5, num_kv_heads=2, head_dim=8, chunk_size=4, template_len=3)
REAL = Geometry(num_router_layers=18, num_layers=36, num_kv_heads=8, head_dim=128, chunk_size=64, template_len=3)
FINGERPRINT = "f" * 64


def n_tokens_of(text: str) -> int:
    """A stand-in tokenizer: one token per 3 UTF-8 bytes, plus 5 marker tokens."""
    return len(text.encode("utf-8")) // 3 + 5


def make_memory(g: Geometry, text: str) -> EncodedMemory:
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
    gen = torch.Generator().manual_seed(seed)
    n = n_tokens_of(text)
    c = -(-n // g.chunk_size)
    dt = getattr(torch, g.dtype)
    shape = (g.num_router_layers, c, g.num_kv_heads, g.head_dim)
    rk, k, v = (torch.randn(shape, generator=gen).to(dt) for _ in range(3))
    return EncodedMemory(n_tokens=n, routing_keys=rk, content_k=k, content_v=v)


def template(g: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    shape = (g.num_layers, g.num_kv_heads, g.template_len, g.head_dim)
    dt = getattr(torch, g.dtype)
    return torch.randn(shape, generator=gen).to(dt), torch.randn(shape, generator=gen).to(dt)


def create(path: Path, g: Geometry = SMALL, **kw: int) -> Bank:
    k, v = template(g)
    return Bank.create(path, g, FINGERPRINT, k, v, **kw)  # type: ignore[arg-type]


def put(bank: Bank, items: list[tuple[str, str]], delete: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    """plan + encode what changed + write, the way the engine does it."""
    planned = bank.plan(items)
    docs = [
        DocumentWrite(p.user_id, p.number, p.text, p.content_hash, make_memory(bank.geometry, p.text))
        for p in planned
        if p.action != "unchanged"
    ]
    report = bank.write(docs, delete=delete)
    skipped = sum(p.action == "unchanged" for p in planned)
    return dataclasses.replace(report, unchanged=report.unchanged + skipped)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.view(torch.int16), b.view(torch.int16)))


def check_doc(bank_or_snap, user_id: str, text: str) -> None:  # type: ignore[no-untyped-def]
    rec = bank_or_snap.get(user_id)
    assert rec.text == text, (user_id, rec.text, text)
    m = bank_or_snap.tensors(user_id)
    e = make_memory(bank_or_snap._bank.geometry if hasattr(bank_or_snap, "_bank") else bank_or_snap.geometry, text)
    assert m.n_tokens == e.n_tokens
    for name in ("routing_keys", "content_k", "content_v"):
        assert same_bits(getattr(m, name), getattr(e, name)), (user_id, name)


# ---------------------------------------------------------------------------------------------- crash runs
Op = tuple  # ("put", [(id, text), ...]) | ("delete", [id, ...]) | ("compact",)


def gen_ops(seed: int, n: int, focus: str | None = None) -> tuple[list[Op], list[dict[str, str]]]:
    """A deterministic op sequence and the model state (id -> text) after each op.

    states[i] is the state after ops[i]; the state before ops[0] is empty. `focus` makes one kind of op
    (add/update/delete/compact) most likely, so kills land in every kind.
    """
    import random

    rng = random.Random(seed)
    state: dict[str, str] = {}
    ops: list[Op] = []
    states: list[dict[str, str]] = []
    next_id = 0
    weights = {"add": 3, "update": 2, "delete": 1, "compact": 1}
    if focus:
        weights[focus] += 30 if focus == "delete" else 6  # deletes are short: make them most of the run
    for _ in range(n):
        kind = rng.choices(list(weights), list(weights.values()))[0]
        if kind in ("update", "delete", "compact") and not state:
            kind = "add"
        if kind == "add":
            items = []
            for _ in range(rng.randint(1, 4)):
                items.append((f"doc-{next_id}", f"text {next_id} " + "x" * rng.randint(0, 60)))
                next_id += 1
            ops.append(("put", items))
            state.update(items)
        elif kind == "update":
            ids = rng.sample(sorted(state), min(len(state), rng.randint(1, 3)))
            items = [(i, f"{i} v{rng.randint(0, 10**6)} " + "y" * rng.randint(0, 80)) for i in ids]
            ops.append(("put", items))
            state.update(items)
        elif kind == "delete":
            ids = rng.sample(sorted(state), 1 if focus == "delete" else min(len(state), rng.randint(1, 2)))
            ops.append(("delete", ids))
            for i in ids:
                del state[i]
        else:
            ops.append(("compact",))
        states.append(dict(state))
    return ops, states


def apply_op(bank: Bank, op: Op) -> None:
    if op[0] == "put":
        put(bank, list(op[1]))
    elif op[0] == "delete":
        bank.delete(list(op[1]))
    else:
        bank.compact()


def crash_worker(
    path: str, journal: str, seed: int, n: int, focus: str | None, start: int, kill: tuple[int, int, str] | None = None
) -> None:
    """Run ops[start:] on the bank, journaling `b <i> <kind>` before and `d <i>` after each op.

    kill=(op, call, when) makes the worker SIGKILL itself inside op `op`, at its `call`-th LMDB write
    transaction (1-based): "mid" after the transaction's puts/deletes ran but before it commits, "after" once
    the commit returned. An op with fewer transactions dies after its last one, before `d` is journaled.
    Timed kills from the parent land where the time goes (tensor writes, fsync); these land where the time
    does not — a delete is one ~1 ms transaction that a random instant almost never hits.
    """
    import os
    import signal

    from msabank.storage import lmdb_index as index_mod

    ops, _ = gen_ops(seed, n, focus)
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    bank = Bank.open(path, fingerprint=FINGERPRINT)
    armed = {"op": False, "calls": 0}

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if kill is not None:
        kill_op, kill_call, when = kill
        original = index_mod.Index.write

        def write(self, fn):  # type: ignore[no-untyped-def]
            if not armed["op"]:
                return original(self, fn)
            armed["calls"] += 1
            if armed["calls"] != kill_call:
                return original(self, fn)
            if when == "mid":

                def fn_then_die(txn):  # type: ignore[no-untyped-def]
                    fn(txn)
                    die()  # the transaction is open and uncommitted: LMDB must discard it

                return original(self, fn_then_die)
            out = original(self, fn)
            die()
            return out

        index_mod.Index.write = write  # type: ignore[method-assign]
    for i in range(start, n):
        os.write(fd, f"b {i} {ops[i][0]}\n".encode())
        armed["op"] = kill is not None and i == kill[0]
        apply_op(bank, ops[i])
        if armed["op"]:
            die()  # fewer transactions than kill_call: die between the last commit and the journal line
        os.write(fd, f"d {i}\n".encode())
    bank.close()
    os.write(fd, b"end\n")


def worker_context():  # type: ignore[no-untyped-def]
    """Worker processes from a forkserver that preloads msabank (fast starts; it never opens a bank)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["_helpers", "msabank.storage"])
    return ctx


def try_open_writer(path: str, q) -> None:  # type: ignore[no-untyped-def]
    from msabank.errors import BankLockedError

    try:
        Bank.open(path).close()
        q.put("opened")
    except BankLockedError as err:
        q.put(str(err))


def consistent_reader(path: str, seconds: float, q) -> None:  # type: ignore[no-untyped-def]
    """Read snapshots for `seconds`; every doc in one snapshot must be at the same round, bytes intact."""
    import time

    bank = Bank.open(path, readonly=True)
    deadline = time.monotonic() + seconds
    checked, rounds = 0, set()
    try:
        while time.monotonic() < deadline:
            with bank.snapshot() as s:
                docs = s.list()
                seen = {d.text.split(" round ")[1] for d in docs}
                assert len(seen) == 1, f"snapshot {s.version} mixes rounds {seen}"
                for d in docs:
                    check_doc(s, d.user_id, d.text)
                keys, rows = s.routing_keys(0)
                assert keys.shape[0] == sum(d.num_chunks for d in docs)
                kv = s.content_kv([d.number for d in docs])
                for d in docs:
                    assert same_bits(kv[d.number][:, 0, 0], make_memory(bank.geometry, d.text).content_k[0])
                rounds |= seen
                checked += 1
        q.put(("ok", checked, len(rounds)))
    except BaseException as err:  # report any failure to the parent
        q.put(("error", repr(err), 0))
    finally:
        bank.close()
