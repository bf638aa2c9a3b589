"""The serving benchmark runs end to end on a tiny bank (the figures themselves belong in docs/benchmarks.md).

Marked slow (two more server processes, ~13 s on 2 cores): `pytest -m slow tests/serve`."""

from __future__ import annotations

from pathlib import Path

import pytest

from msabank.serve.bench import run_serve_bench


@pytest.mark.slow
def test_serve_bench_smoke(tmp_path: Path) -> None:
    res = run_serve_bench(docs=6, device="cpu", clients=(1, 2), questions_per_client=1, max_new_tokens=2,
                          max_rounds=0, workdir=tmp_path)
    assert res["bank"]["documents"] == 6 and res["disk_read"]["documents"] == 6 and res["disk_read"]["bytes"] > 0
    for start in res["start"].values():
        assert start["spawn_to_ready_s"] >= start["load_s"] >= start["index_s"] > 0
        assert set(start) >= {"spawn_to_listening_s", "import_s", "open_s"}
    assert [r["clients"] for r in res["throughput"]] == [1, 2]
    assert [r["questions"] for r in res["throughput"]] == [1, 2]
    assert res["commit_to_visible"]["write_to_retrieve_reply_s"] >= res["commit_to_visible"]["write_reply_s"] > 0
    assert not list(tmp_path.iterdir())  # the bank went with the temporary directory
