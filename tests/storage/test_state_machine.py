"""Hypothesis state machine: put/update/delete/compact/reopen on a real bank vs a dict model.

After every step each document's text, version and tensor bytes, the routing-key row map and the counts
must match the model.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import _helpers as H
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from msabank.storage import Bank

IDS = st.sampled_from([f"id-{i}" for i in range(8)] + ["ünï/cödé", "a b"])
TEXTS = st.text(alphabet="abcdef é", min_size=0, max_size=60)


class BankMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="msabank-sm-"))
        self.bank = H.create(self.dir / "b", content_chunk_rows=2, routing_chunk_rows=4)
        self.texts: dict[str, str] = {}
        self.versions: dict[str, int] = {}  # per-document version, tombstones included
        self.numbers: dict[str, int] = {}
        self.next_number = 0

    def teardown(self) -> None:
        self.bank.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(items=st.lists(st.tuples(IDS, TEXTS), min_size=1, max_size=4, unique_by=lambda t: t[0]))
    def put(self, items: list[tuple[str, str]]) -> None:
        note(f"put {items}")
        report = H.put(self.bank, items)
        added = updated = unchanged = 0
        for uid, text in items:
            if uid not in self.numbers:
                self.numbers[uid] = self.next_number
                self.next_number += 1
            if uid not in self.texts:
                added += 1
            elif self.texts[uid] == text:
                unchanged += 1
                continue
            else:
                updated += 1
            self.texts[uid] = text
            self.versions[uid] = self.versions.get(uid, 0) + 1
        assert (report.added, report.updated, report.unchanged, report.deleted) == (added, updated, unchanged, 0)

    @precondition(lambda self: self.texts)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(sorted(self.texts)), min_size=1, max_size=2, unique=True))
        note(f"delete {ids}")
        assert self.bank.delete(ids).deleted == len(ids)
        for uid in ids:
            del self.texts[uid]
            self.versions[uid] += 1

    @rule()
    def compact(self) -> None:
        note("compact")
        rep = self.bank.compact()
        assert self.bank.verify().ok
        assert rep.rows_after == sum(H.make_memory(self.bank.geometry, t).num_chunks for t in self.texts.values())

    @rule()
    def reopen(self) -> None:
        note("reopen")
        self.bank.close()
        self.bank = Bank.open(self.dir / "b", fingerprint=H.FINGERPRINT)
        assert self.bank.verify().ok  # verify on reopen only: in every step it would dominate the run

    @invariant()
    def matches_model(self) -> None:
        bank = self.bank
        listed = {r.user_id: r for r in bank.list()}
        assert {u: r.text for u, r in listed.items()} == self.texts
        for uid, text in self.texts.items():
            rec = listed[uid]
            assert rec.number == self.numbers[uid] and rec.version == self.versions[uid]
            H.check_doc(bank, uid, text)
        keys, rows = bank.routing_keys(1)
        by_number = {self.numbers[u]: t for u, t in self.texts.items()}
        assert sorted(set(rows.tolist())) == sorted(by_number)
        for n, text in by_number.items():
            assert H.same_bits(keys[rows == n], H.make_memory(bank.geometry, text).routing_keys[1].reshape(-1, 16))
        kv = bank.content_kv(list(by_number))
        assert set(kv) == set(by_number)
        s = bank.stats()
        assert (s.documents, s.next_number) == (len(self.texts), self.next_number)


BankMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=20, deadline=None, suppress_health_check=list(HealthCheck)
)
TestBankMachine = BankMachine.TestCase
