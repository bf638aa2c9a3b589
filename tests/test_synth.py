"""The synthetic corpus: deterministic, answerable from its gold documents, any size."""

from __future__ import annotations

import json

from msabank.synth import World, read_jsonl, write_corpus


def test_same_seed_same_corpus_and_unique_names():
    a, b = World(seed=5, num_docs=300), World(seed=5, num_docs=300)
    assert [a.document(n) for n in range(300)] == [b.document(n) for n in range(300)]
    assert a.document(7) != World(seed=6, num_docs=300).document(7)
    names = [a.name(n) for n in range(300)]
    assert len(set(names)) == len(names)


def test_questions_are_answerable_from_gold_documents_in_hop_order():
    w = World(seed=11, num_docs=400)
    qs = w.questions(90)
    assert {q.type.split(":")[0] for q in qs} == {"single", "twohop", "needle"}
    for q in qs:
        texts = [w.document(g).text for g in q.gold]
        assert q.answer in texts[-1], q
        if q.hops == 2:
            assert w.name(q.gold[1]) in texts[0]  # hop 1 names the entity of hop 2
            assert q.gold[0] != q.gold[1]
        if q.type == "needle":
            assert "special magic number" in texts[0] and w.is_needle(q.gold[0])


def test_write_corpus_jsonl_and_parquet(tmp_path):
    s = write_corpus(tmp_path / "j", seed=2, tokens=16_000, num_questions=12)
    docs = list(read_jsonl(tmp_path / "j" / "documents.jsonl"))
    assert len(docs) == s["documents"] and docs[3]["number"] == 3 and docs[3]["id"] == "doc-0000003"
    assert 12_000 < s["tokens"] < 20_000  # estimated count lands near the target
    qs = list(read_jsonl(tmp_path / "j" / "questions.jsonl"))
    assert len(qs) == 12 and all(max(q["gold"]) < len(docs) for q in qs)
    assert json.loads((tmp_path / "j" / "corpus.json").read_text())["seed"] == 2
    import pyarrow.parquet as pq

    write_corpus(tmp_path / "p", seed=2, num_docs=50, num_questions=5, fmt="parquet")
    assert pq.read_table(tmp_path / "p" / "documents.parquet").num_rows == 50
