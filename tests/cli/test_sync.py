"""`ingest --sync` guards: --dry-run prints the plan and changes nothing; deleting more than 10% of the bank
needs --yes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _cli import run



def _corpus(path: Path, docs: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs.items()))
    return path


DOCS = {f"d{i}": f"Document {i} is about the harbour." for i in range(10)}


@pytest.fixture()
def bank(tmp_path: Path, golden: Path) -> Path:
    b = tmp_path / "bank"
    run("init", b, "--model", golden / "tiny-msa")
    run("ingest", b, _corpus(tmp_path / "all.jsonl", DOCS))
    return b


def _ids(bank: Path) -> list[str]:
    return [r["id"] for r in json.loads(run("ls", bank, "--json").stdout)]


def test_dry_run_prints_the_plan_and_changes_nothing(bank: Path, tmp_path: Path) -> None:
    docs = {k: v for k, v in DOCS.items() if k not in ("d3", "d4")} | {"d1": "Changed.", "new": "A new one."}
    c = _corpus(tmp_path / "c.jsonl", docs)
    res = run("ingest", bank, c, "--sync", "--dry-run")
    assert res.stdout.splitlines()[:5] == ["add new", "update d1", "delete d3", "delete d4",
                                           "dry run: would add 1, update 1, leave 7 unchanged, delete 2; nothing was changed"]
    plan = json.loads(run("ingest", bank, c, "--sync", "--dry-run", "--json").stdout)
    assert (plan["add"], plan["update"], plan["unchanged"], plan["delete"]) == (["new"], ["d1"], 7, ["d3", "d4"])
    assert json.loads(run("ingest", bank, c, "--dry-run", "--json").stdout)["delete"] == []  # no --sync
    assert _ids(bank) == list(DOCS)
    assert json.loads(run("show", bank, "d1", "--json").stdout)["document"]["text"] == DOCS["d1"]


def test_sync_deleting_more_than_a_tenth_needs_yes(bank: Path, tmp_path: Path) -> None:
    one_less = _corpus(tmp_path / "nine.jsonl", {k: v for k, v in DOCS.items() if k != "d9"})
    rep = json.loads(run("ingest", bank, one_less, "--sync", "--json").stdout)["report"]
    assert rep["deleted"] == 1  # 1 of 10: within the share
    few = _corpus(tmp_path / "few.jsonl", {"d0": DOCS["d0"]})
    res = run("ingest", bank, few, "--sync", ok=False)
    assert res.exit_code == 1
    assert "--sync would delete 8 of the bank's 9 documents (89%; more than 10% needs --yes)" in res.stderr
    assert "--dry-run" in res.stderr
    assert len(_ids(bank)) == 9
    rep = json.loads(run("ingest", bank, few, "--sync", "--yes", "--json").stdout)["report"]
    assert rep["deleted"] == 8 and _ids(bank) == ["d0"]
