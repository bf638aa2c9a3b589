"""Documents longer than the model's window are refused by name before anything is encoded (issue 13.2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from msabank import stages
from msabank.cli.main import app
from msabank.engine import Engine
from msabank.errors import InputError


def test_too_long_document_is_named_before_encoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Engine.create(tmp_path / "bank", None, device="cpu") as eng:  # the embedded model: 4,096 positions
        limit = stages.max_document_tokens(eng.model)
        long_text = "lighthouse keeper " * limit
        n_tokens = len(eng.tokenizer.encode(f"[0]. {long_text}[0]")) + 2

        def no_forward(*args: object, **kwargs: object) -> None:
            raise AssertionError("stage 1 ran on a batch holding a too-long document")

        monkeypatch.setattr(stages, "stage1_forward", no_forward)
        with pytest.raises(InputError) as err:
            eng.put([("short", "A short document."), ("huge", long_text)])
        msg = str(err.value)
        assert "'huge'" in msg and f"{n_tokens:,} tokens" in msg and f"{limit:,}" in msg and err.value.hint
        assert list(eng.list()) == []  # nothing of the batch was committed


def test_stage1_batches_are_bounded_by_tokens_and_mask_cells() -> None:
    groups = stages._stage1_groups([4000, 10, 4000, 10, 2000], max_tokens=16384, max_cells=1 << 25)
    assert sorted(i for g in groups for i in g) == [0, 1, 2, 3, 4]
    for g in groups:
        t = max([4000, 10, 4000, 10, 2000][i] for i in g)
        assert len(g) == 1 or (len(g) * t <= 16384 and len(g) * t * t <= 1 << 25)
    assert [4000, 10, 4000, 10, 2000][groups[-1][0]] == 4000 and len(groups[-1]) <= 2  # 2·4000² < 2^25 < 3·4000²


def test_cli_ingest_of_a_too_long_document_is_an_error_with_a_hint(tmp_path: Path) -> None:
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(json.dumps({"id": "huge", "text": "word " * 5000}) + "\n")
    runner = CliRunner()
    assert runner.invoke(app, ["init", str(tmp_path / "bank")]).exit_code == 0
    res = runner.invoke(app, ["ingest", str(tmp_path / "bank"), str(corpus)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "error: document 'huge' is" in res.stderr and "4,096 tokens" in res.stderr and "hint: split" in res.stderr
