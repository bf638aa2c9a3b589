"""Every command `msabank --help` lists, run once with its minimal arguments on one small shared bank.

A new command without an entry here fails `test_every_listed_command_has_a_smoke_run`. The commands that
train or run the whole demo cost 15-30 s each on 2 cores and are marked slow; `serve` blocks, so here it
only shows its help (tests/serve runs it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from msabank.cli.main import app

runner = CliRunner()

# command -> (arguments with {bank} {tmp} {corpus} {model} placeholders, accepted exit codes)
SMOKE: dict[str, tuple[tuple[str, ...], tuple[int, ...]]] = {
    "init": (("{tmp}/new", "--model", "{model}"), (0,)),
    "ingest": (("{bank}", "{corpus}"), (0,)),
    "update": (("{bank}", "d1", "--text", "Doc one, rewritten."), (0,)),
    "delete": (("{bank}", "d2"), (0,)),
    "ls": (("{bank}",), (0,)),
    "show": (("{bank}", "d3"), (0,)),
    "stats": (("{bank}",), (0,)),
    "verify": (("{bank}",), (0,)),
    "compact": (("{bank}",), (0,)),
    "ask": (("{bank}", "Who sailed?", "--max-rounds", "1", "--max-new-tokens", "4"), (0, 3)),  # 3: no answer
    "retrieve": (("{bank}", "Who sailed?"), (0,)),
    "gen-corpus": (("{tmp}/gc", "--seed", "1", "--tokens", "1000", "--questions", "3"), (0,)),
    "eval": (("--model", "{model}", "--tokens", "1000", "--questions", "3", "--device", "cpu"), (0,)),
    "bench": (("routing", "--sizes", "1000", "--reps", "1", "--device", "cpu", "--no-sweep", "--out", "{tmp}/bo"), (0,)),
    "serve": (("--help",), (0,)),
    "demo": (("--docs", "20", "--seed", "1", "--model", "{model}", "--device", "cpu"), (0,)),
    "train": (("{tmp}/tr", "--steps", "1", "--questions", "1", "--memory", "2", "--device", "cpu", "--workers", "0"),
              (0,)),
}
SLOW = {"demo", "train"}


def test_every_listed_command_has_a_smoke_run() -> None:
    listed = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert listed == set(SMOKE), f"commands without a smoke run: {listed - set(SMOKE)}; gone: {set(SMOKE) - listed}"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, golden: Path) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("smoke")
    corpus = d / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"Document {i}: captain {i} sailed the ship."}) + "\n"
                              for i in range(6)))
    res = runner.invoke(app, ["init", str(d / "bank"), "--model", str(golden / "tiny-msa")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["ingest", str(d / "bank"), str(corpus)])
    assert res.exit_code == 0, res.output
    return d / "bank", corpus


@pytest.mark.parametrize("command", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in SMOKE])
def test_command_runs(command: str, shared: tuple[Path, Path], tmp_path: Path, golden: Path) -> None:
    bank = tmp_path / "bank"
    shutil.copytree(shared[0], bank)
    args, codes = SMOKE[command]
    argv = [command, *(a.format(bank=bank, tmp=tmp_path, corpus=shared[1], model=golden / "tiny-msa") for a in args)]
    res = runner.invoke(app, argv)
    assert res.exit_code in codes, f"{argv}: exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output and "error:" not in res.stderr, res.stderr
    assert res.stdout.strip(), f"{command} printed nothing"
