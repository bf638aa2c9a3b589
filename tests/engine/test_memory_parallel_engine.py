"""Memory parallel through the engine: two gloo ranks, each holding half of the routing index, ask the
golden questions and must route and answer exactly like one process holding everything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from msabank.engine import Engine
from msabank.kernels.memory_parallel import spawn_workers
from msabank.parallel import spawned_ask


@pytest.mark.parametrize("case", ["p4", "p64"])
def test_two_ranks_answer_like_one(tmp_path: Path, golden: Path, case: str) -> None:
    m = json.loads((golden / "cases" / case / "manifest.json").read_text())
    docs = json.loads((golden / "cases" / case / "memory_docs.json").read_text())
    req = m["requests"]["q0"]
    n_tokens = len(req["generated_token_ids"][0])
    with Engine.create(tmp_path / "bank", golden / m["model_dir"]) as eng:
        eng.ingest([(f"doc{i}", t) for i, t in enumerate(docs)])
        single = eng.ask(req["prompts"][0], max_rounds=1, max_new_tokens=n_tokens)
    out = str(tmp_path / "rank")
    codes = spawn_workers(spawned_ask, 2, (str(tmp_path / "bank"), req["prompts"][0], n_tokens, out), timeout_s=240)
    assert codes == [0, 0]
    results = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    assert results[0]["local"] == [0, 2, 4] and results[1]["local"] == [1, 3, 5]  # each rank holds its shard
    want = [(h.number, sorted(h.layers)) for h in single.rounds[0].documents]
    for r in results:
        first = r["answer"]["rounds"][0]
        assert first["tokens"] == single.rounds[0].tokens == req["generated_token_ids"][0]
        assert [(d["number"], sorted(int(x) for x in d["layers"])) for d in first["documents"]] == want
