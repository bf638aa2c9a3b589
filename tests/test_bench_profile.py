"""`python -m msabank.bench.profile` (issue 12's profiling tool) on the CPU, tiny shapes."""

from __future__ import annotations

import json
from pathlib import Path

from msabank.bench import profile


def test_profile_writes_every_phase(tmp_path: Path) -> None:
    res = profile.run("tiny", tmp_path, bank_tokens="4K", real_tokens="1K", ask_docs=0, device="cpu")
    assert res["prompt_tokens"][1] > res["prompt_tokens"][0]  # the round-2 prompt appends documents
    for phase in ("r1_prefill", "r2_prefill", "r1_decode16"):
        assert res[phase]["wall_ms"] > 0
        for kind in ("cpu", "device", "cprofile"):
            text = (tmp_path / f"{phase}.{kind}.txt").read_text()
            assert ("_prefill" in text) if kind == "cprofile" else ("Self CPU" in text)
    assert json.loads((tmp_path / "profile.json").read_text())["geometry"] == "tiny"


def test_profile_ingest_on_the_embedded_model(tmp_path: Path) -> None:
    res = profile.run("embedded", tmp_path, bank_tokens="4K", real_tokens="1K", ask_docs=0, device="cpu",
                      ingest_docs=20)
    assert res["ingest"]["documents"] == 20 and res["ingest"]["wall_ms"] > 0
    assert "ingest" in (tmp_path / "ingest.cprofile.txt").read_text()
