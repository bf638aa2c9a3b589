"""Batched routing and fetch in the engine: ask/ask_batch answers and evidence are those of routing and
fetching one question at a time (the pre-batching path, rebuilt here from route/content_kv), on the device
prefill path (BankMemory.prefill_selection) and on the synced path, which makes one route_batch and one
content_kv_batch call per router layer whatever the batch size."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import pytest
import torch

from msabank.engine import Engine
from msabank.index import BankMemory
from msabank.stages import InMemoryMemory
from msabank.types import EncodedMemory, Routed


def _per_question_route(self: BankMemory, layer_index: int, queries: Sequence[torch.Tensor]) -> list[Routed]:
    return [self.route(layer_index, q) for q in queries]


def _per_sample_fetch(self: BankMemory, layer_index: int, numbers: Sequence[Sequence[int]]):
    parts = [self.content_kv(layer_index, ns) if ns else None for ns in numbers]
    lengths = [p[0].shape[0] if p is not None else 0 for p in parts]
    _, _, hkv, d = self.content.row_shape
    k = torch.zeros(len(numbers), hkv, max(lengths, default=0), d, dtype=self.content.dtype)
    v = torch.zeros_like(k)
    for s, p in enumerate(parts):
        if p is not None:
            k[s, :, : lengths[s]], v[s, :, : lengths[s]] = p[0].transpose(0, 1), p[1].transpose(0, 1)
    return k, v, torch.tensor(lengths)


def _answers(eng: Engine, questions: list[str]) -> list[tuple]:
    out = []
    for a in eng.ask_batch(questions, max_rounds=2, max_new_tokens=6):
        out.append((a.answer, a.finish, a.outcome, a.transcript, [r.tokens for r in a.rounds],
                    [[(h.number, sorted(h.layers)) for h in r.documents] for r in a.rounds]))
    return out


def test_ask_batch_equals_per_question_routing_and_fetch(tmp_path: Path, golden: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    m = json.loads((golden / "cases" / "p4" / "manifest.json").read_text())
    docs = json.loads((golden / "cases" / "p4" / "memory_docs.json").read_text())
    questions = [m["requests"]["q0"]["prompts"][0], m["requests"]["q1"]["prompts"][0], "Who kept the light?"]
    calls: list[tuple[str, int]] = []
    with Engine.create(tmp_path / "bank", golden / m["model_dir"]) as eng:
        eng.ingest([(f"doc{i}", t) for i, t in enumerate(docs)])
        route_batch, fetch_batch = BankMemory.route_batch, BankMemory.content_kv_batch

        def counting_route(self, layer_index, queries):  # noqa: ANN001, ANN202
            calls.append(("route", len(queries)))
            return route_batch(self, layer_index, queries)

        def counting_fetch(self, layer_index, numbers):  # noqa: ANN001, ANN202
            calls.append(("fetch", len(numbers)))
            return fetch_batch(self, layer_index, numbers)

        device = _answers(eng, questions)  # the device prefill path: route_batch/content_kv_batch unused
        single_device = eng.ask(questions[0], max_rounds=2, max_new_tokens=6)
        assert calls == []
        monkeypatch.setattr(BankMemory, "device_prefill", False)
        monkeypatch.setattr(BankMemory, "route_batch", counting_route)
        monkeypatch.setattr(BankMemory, "content_kv_batch", counting_fetch)
        batched = _answers(eng, questions)
        single = eng.ask(questions[0], max_rounds=2, max_new_tokens=6)
        monkeypatch.setattr(BankMemory, "route_batch", _per_question_route)
        monkeypatch.setattr(BankMemory, "content_kv_batch", _per_sample_fetch)
        one_at_a_time = _answers(eng, questions)
        single_old = eng.ask(questions[0], max_rounds=2, max_new_tokens=6)
    assert device == batched == one_at_a_time
    assert (single.answer, [r.tokens for r in single.rounds]) == (single_old.answer, [r.tokens for r in single_old.rounds])
    assert (single_device.answer, [r.tokens for r in single_device.rounds]) == (single.answer, [r.tokens for r in single.rounds])
    layers = len(eng.model.config.router_layers)
    first_round = calls[: 2 * layers]  # round 0 runs all three questions: one call of each kind per layer
    assert first_round == [("route", 3), ("fetch", 3)] * layers


def test_in_memory_route_batch_and_fetch_batch_equal_per_question() -> None:
    g = torch.Generator().manual_seed(0)

    def doc(chunks: int) -> EncodedMemory:
        t = torch.randn(2, chunks, 2, 4, generator=g)
        return EncodedMemory(n_tokens=chunks * 4, routing_keys=t, content_k=t + 1, content_v=t - 1)

    dup = doc(2)
    mem = InMemoryMemory({9: doc(1), 3: doc(3), 5: dup, 7: dup, 11: doc(2)}, 3)  # 5 and 7 tie exactly
    qs = [torch.randn(t, 8, generator=g) for t in (4, 0, 1, 6)]
    for layer in range(2):
        got = mem.route_batch(layer, qs)
        for q, r in zip(qs, got):
            want = mem.route(layer, q)
            assert r.numbers.tolist() == want.numbers.tolist() and torch.equal(r.scores, want.scores)
        picks = [r.numbers.tolist() for r in got]
        k, v, lengths = mem.content_kv_batch(layer, picks)
        for s, p in enumerate(picks):
            wk, wv = mem.content_kv(layer, p)
            n = int(lengths[s])
            assert n == wk.shape[0]
            assert torch.equal(k[s, :, :n].transpose(0, 1), wk) and torch.equal(v[s, :, :n].transpose(0, 1), wv)
            assert not k[s, :, n:].any()
    assert mem.route_batch(0, [torch.ones(1, 8) * torch.tensor([1.0] * 8)])[0].numbers.shape == (3,)
    empty = InMemoryMemory({}, 4)
    assert [r.numbers.tolist() for r in empty.route_batch(0, qs[:2])] == [[], []]
    assert empty.content_kv_batch(0, [[], []])[2].tolist() == [0, 0]
