"""`msabank gen-corpus` through the CLI: both formats write a corpus that `ingest` can read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from msabank.cli.main import app
from msabank.storage.readers import read_corpus

runner = CliRunner()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_gen_corpus_writes_a_readable_corpus(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "corpus"
    res = runner.invoke(app, ["gen-corpus", str(out), "--seed", "1", "--tokens", "1000", "--questions", "4",
                              "--format", fmt, "--json"])
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    summary = json.loads(res.stdout)
    assert summary["documents"] == 16 and summary["token_count"] == "exact" and summary["format"] == fmt
    docs = [d for batch in read_corpus(out / f"documents.{fmt}") for d in batch]
    assert len(docs) == 16 and len({i for i, _ in docs}) == 16 and all(t.strip() for _, t in docs)
    assert json.loads((out / "corpus.json").read_text()) == summary


def test_gen_corpus_failure_leaves_no_empty_folder(tmp_path: Path) -> None:
    from msabank.synth import write_corpus

    class Broken:
        def encode(self, text: str) -> list[int]:
            raise RuntimeError("tokenizer broke")

    with pytest.raises(RuntimeError):
        write_corpus(tmp_path / "out", seed=1, tokens=1000, tokenizer=Broken())
    assert not (tmp_path / "out").exists()
