"""SIGKILL a writer process during put, update, delete and compact: at random instants, and at LMDB transactions.

After every kill: the bank reopens, verify passes, the visible documents are exactly the committed ones
(the state after the last finished op, or after the op in flight if its commit landed) with intact text
and tensor bytes, and a new writer continues from there. Workers come from a forkserver (a clean process
that never opened the bank, so no LMDB environment crosses a fork) to keep 50+ kills within a minute.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import _helpers as H
import pytest

from msabank.storage import Bank

FOCUS = ("add", "update", "delete", "compact")


def _check_state(bank: Bank, want: dict[str, str]) -> None:
    listed = {r.user_id: r.text for r in bank.list()}
    assert listed == want
    for uid, text in want.items():
        H.check_doc(bank, uid, text)


def _run(tmp_path: Path, kills: int, seed: int) -> dict[str, int]:
    ctx = H.worker_context()
    path = tmp_path / "bank"
    H.create(path, content_chunk_rows=4, routing_chunk_rows=8).close()
    rng = random.Random(seed)
    killed_in: dict[str, int] = {}
    done_kills = 0
    cycle = 0
    kinds = ("add", "update", "delete", "compact")
    # go on past `kills` (up to 2x) until a kill has landed inside every kind of op
    while done_kills < kills or (min(killed_in.get(k, 0) for k in kinds) < 1 and done_kills < 2 * kills):
        focus = FOCUS[cycle % len(FOCUS)]
        op_seed = seed * 1000 + cycle
        n_ops = 40
        ops, states = H.gen_ops(op_seed, n_ops, focus)
        # each cycle starts from the bank's current state: replay the first ops of a fresh sequence on top
        journal = tmp_path / f"journal-{cycle}"
        with Bank.open(path) as b:
            base = {r.user_id: r.text for r in b.list()}
            # delete the leftovers so the op sequence's model (which starts empty) applies exactly
            if base:
                b.delete(sorted(base))
        # every other round of the four kinds, the worker kills itself inside one op of the focus kind at an
        # LMDB transaction (mid or after commit); otherwise the parent kills at a random instant, which lands
        # where the time goes (tensor writes, fsync) and almost never inside a ~1 ms delete
        kill = None
        if (cycle // len(FOCUS)) % 2:
            of_kind = [i for i, op in enumerate(ops) if _kind(ops, states, i) == focus]
            if of_kind:
                kill = (rng.choice(of_kind), rng.randint(1, 2), rng.choice(("mid", "after")))
        p = ctx.Process(target=H.crash_worker, args=(str(path), str(journal), op_seed, n_ops, focus, 0, kill))
        p.start()
        if kill is None:
            deadline = time.monotonic() + 30
            while p.is_alive() and time.monotonic() < deadline and not (journal.exists() and journal.stat().st_size):
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.5))  # a random instant inside the op sequence
            if p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:  # it finished its ops between is_alive() and the kill
                    pass
        p.join(timeout=60)
        assert not p.is_alive(), f"crash worker of cycle {cycle} hung"
        lines = journal.read_text().splitlines() if journal.exists() else []
        began = [ln.split() for ln in lines if ln.startswith("b ")]
        finished = [int(ln.split()[1]) for ln in lines if ln.startswith("d ")]
        last_done = finished[-1] if finished else -1
        candidates = [{} if last_done < 0 else states[last_done]]
        if began and int(began[-1][1]) == last_done + 1:
            candidates.append(states[last_done + 1])
            kind = _kind(ops, states, last_done + 1)
            killed_in[kind] = killed_in.get(kind, 0) + 1
        with Bank.open(path, fingerprint=H.FINGERPRINT) as bank:  # writer open reclaims garbage
            report = bank.verify()
            assert report.ok, report.problems
            assert report.orphan_rows == 0
            listed = {r.user_id: r.text for r in bank.list()}
            assert listed in candidates, (cycle, began[-1:] if began else None, last_done)
            _check_state(bank, listed)
            # the writer can go on: one more put after the crash
            H.put(bank, [(f"after-{cycle}", f"written after kill {cycle}")])
            H.check_doc(bank, f"after-{cycle}", f"written after kill {cycle}")
        if "end" not in lines:
            done_kills += 1
            killed_in["total"] = killed_in.get("total", 0) + 1
        cycle += 1
    return killed_in


def _kind(ops: list[H.Op], states: list[dict[str, str]], i: int) -> str:
    """add / update / delete / compact: a put counts as an update when it replaces any existing document."""
    if ops[i][0] != "put":
        return str(ops[i][0])
    before = states[i - 1] if i > 0 else {}
    return "update" if any(uid in before for uid, _ in ops[i][1]) else "add"


def test_crash_kills(tmp_path: Path) -> None:
    killed_in = _run(tmp_path, kills=int(os.environ.get("MSABANK_CRASH_KILLS", "50")), seed=1)
    print("kill points:", killed_in)
    # kills landed inside every kind of op, not only between ops
    for kind in ("add", "update", "delete", "compact"):
        assert killed_in.get(kind, 0) >= 1, killed_in


@pytest.mark.crash
@pytest.mark.slow
def test_crash_kills_long(tmp_path: Path) -> None:
    """500 kills (~5 min): run with `pytest -m crash tests/storage` (deselected otherwise, tests/conftest.py)."""
    killed_in = _run(tmp_path, kills=500, seed=2)
    print("kill points:", killed_in)
