"""The pipelined ingest (msabank.pipeline) against the same ingest one stage at a time (pipelined=False).

Same batches, so the same stage-1 windows and groups: the banks must be byte-identical (records, tensor
rows, versions). Errors injected in stage 1 of a later batch, in its planning, and in its commit leave
exactly the earlier batches committed, raise the original exception, and a re-run resumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from msabank import pipeline, stages
from msabank.engine import Engine
from msabank.errors import InputError
from msabank.synth import World

BATCH = 4


class Boom(RuntimeError):
    pass


def _corpus() -> list[tuple[str, str]]:
    docs = [(d.id, d.text) for d in World(seed=3, num_docs=18).documents()]
    # a later batch rewrites an id of an earlier one (an update while that batch may be in flight) and
    # repeats one unchanged: both must be planned against the committed bank
    return docs[:10] + [(docs[1][0], docs[1][1] + " It was rebuilt."), docs[2]] + docs[10:]


WINDOW = 900
"""~3 batches (of ~80-token documents) per stage-1 window, so windows span batches and there are several."""


@pytest.fixture(autouse=True)
def small_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "WINDOW_TOKENS", WINDOW)


def _ingest(path: Path, docs: list[tuple[str, str]], **kw: Any) -> tuple[Engine, list[tuple[int, int]]]:
    eng = Engine.open(path) if path.exists() else Engine.create(path)
    seen: list[tuple[int, int]] = []
    try:
        eng.ingest(docs, batch_size=BATCH, progress=lambda d, t: seen.append((d, t)), **kw)
    except BaseException:
        eng.close()
        raise
    return eng, seen


def _content(eng: Engine) -> dict[str, Any]:
    """Everything a reader sees, minus wall-clock times: records, versions and the tensors' bytes."""
    out: dict[str, Any] = {"stats": (eng.stats().version, eng.stats().next_number)}
    for r in eng.bank.list():
        m = eng.bank.tensors(r.user_id)
        out[r.user_id] = (r.number, r.version, r.text, r.n_tokens, r.num_chunks, r.row_start,
                          [v.bank_version for v in eng.bank.versions(r.user_id)],
                          [t.view(torch.int16).clone() for t in (m.routing_keys, m.content_k, m.content_v)])
    return out


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k == "stats":
            assert a[k] == b[k]
            continue
        assert a[k][:7] == b[k][:7], k
        assert all(torch.equal(x, y) for x, y in zip(a[k][7], b[k][7], strict=True)), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "WINDOW_TOKENS", WINDOW)
        eng, seen = _ingest(tmp_path_factory.mktemp("ref") / "bank", _corpus(), pipelined=False)
    with eng:
        return _content(eng), seen


def test_pipelined_bank_is_byte_identical_to_sequential(tmp_path: Path, reference: Any) -> None:
    want, want_progress = reference
    eng, seen = _ingest(tmp_path / "bank", _corpus())
    with eng:
        _same(_content(eng), want)
        assert seen == want_progress  # one call per committed batch, in order
        assert eng.verify().ok
        assert len(seen) == -(-len(_corpus()) // BATCH)
        rep = eng.ingest(_corpus(), batch_size=BATCH)  # nothing new; the corpus's own rewrite of one id twice
        assert (rep.added, rep.updated, rep.unchanged) == (0, 2, len(_corpus()) - 2)


def _fail_stage1_on(monkeypatch: pytest.MonkeyPatch, doc_id: str) -> None:
    real = stages.encode_documents

    def encode(model: Any, docs: Any, *, names: Any = None, **kw: Any) -> Any:
        if names is not None and doc_id in names:
            raise Boom(f"stage 1 of {doc_id}")
        return real(model, docs, names=names, **kw)

    monkeypatch.setattr(stages, "encode_documents", encode)


def _committed(eng: Engine) -> list[str]:
    return sorted(r.user_id for r in eng.bank.list())


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "sequential"])
def test_stage1_error_in_a_later_batch_commits_the_earlier_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              reference: Any, pipelined: bool) -> None:
    docs = _corpus()
    # batch 4 (items 16-19): batch 2 drains the pipeline (it updates an id of batch 0), so the window that
    # fails is batches 2, 3, 4, and its first two batches must still commit
    bad = docs[17][0]
    _fail_stage1_on(monkeypatch, bad)
    with pytest.raises(Boom, match=f"stage 1 of {bad}"):
        _ingest(tmp_path / "bank", docs, pipelined=pipelined)
    with Engine.open(tmp_path / "bank") as eng:
        assert _committed(eng) == sorted({uid for uid, _ in docs[:16]})
        assert eng.verify().ok and eng.verify().orphan_rows == 0
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "WINDOW_TOKENS", WINDOW)
    eng, _ = _ingest(tmp_path / "bank", docs, pipelined=pipelined)  # resumes: the rest is added
    with eng:
        got = _content(eng)
        want = reference[0]
        assert got.keys() == want.keys()
        assert {k: v[2] for k, v in got.items() if k != "stats"} == {k: v[2] for k, v in want.items() if k != "stats"}
        assert eng.verify().ok


def test_commit_error_stops_the_pipeline_with_the_original_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = _corpus()
    err = Boom("disk on fire")
    real = Engine._commit_batch
    commits: list[int] = []

    def commit(self: Engine, batch: pipeline.Batch) -> Any:
        commits.append(batch.index)
        if batch.index == 3:
            raise err
        return real(self, batch)

    monkeypatch.setattr(Engine, "_commit_batch", commit)
    with pytest.raises(Boom) as info:
        _ingest(tmp_path / "bank", docs)
    assert info.value is err
    assert commits == [0, 1, 2, 3]  # nothing after the failed batch is committed, even if it was encoded
    with Engine.open(tmp_path / "bank") as eng:
        ids = sorted({uid for uid, _ in docs[:12]})
        assert _committed(eng) == ids
        assert eng.bank.get(docs[1][0]).text.endswith("It was rebuilt.")  # batch 2 (the update) committed
        assert eng.verify().ok and eng.verify().orphan_rows == 0


def test_bad_record_in_a_later_batch_commits_the_earlier_ones(tmp_path: Path) -> None:
    docs = _corpus()[:9] + [("empty", "  ")] + _corpus()[9:]
    with pytest.raises(InputError, match="empty"):
        _ingest(tmp_path / "bank", docs)
    with Engine.open(tmp_path / "bank") as eng:
        assert _committed(eng) == sorted(uid for uid, _ in docs[:8])


def test_first_number_continues_past_the_batches_in_flight(tmp_path: Path) -> None:
    with Engine.create(tmp_path / "bank") as eng:
        eng.ingest([("a", "alpha one"), ("b", "beta two")])
        plan = eng.bank.plan([("c", "gamma"), ("a", "alpha one"), ("d", "delta")], first_number=7)
        assert [(p.number, p.action) for p in plan] == [(7, "add"), (0, "unchanged"), (8, "add")]
        assert [p.number for p in eng.bank.plan([("c", "gamma")], first_number=1)] == [2]
