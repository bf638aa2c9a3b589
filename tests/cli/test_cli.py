"""Every command through the typer app, on the golden tiny checkpoint: output, --json, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from msabank.cli.main import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def run(*args: str, ok: bool = True):  # noqa: ANN201
    res = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, f"{args}: {res.output}\n{res.exception!r}"
    return res


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, golden: Path) -> Path:
    docs = json.loads((golden / "cases" / "p4" / "memory_docs.json").read_text())
    p = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    p.write_text("".join(json.dumps({"id": f"doc{i}", "text": t}) + "\n" for i, t in enumerate(docs)))
    return p


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory, golden: Path, corpus: Path) -> Path:
    b = tmp_path_factory.mktemp("bank") / "bank"
    run("init", b, "--model", golden / "tiny-msa")
    res = run("ingest", b, corpus, "--json")
    rep = json.loads(res.stdout)["report"]
    assert (rep["added"], rep["unchanged"]) == (6, 0)
    return b


def test_ingest_again_is_a_no_op_and_ls_show(bank: Path, corpus: Path) -> None:
    rep = json.loads(run("ingest", bank, corpus, "--json").stdout)["report"]
    assert (rep["added"], rep["updated"], rep["unchanged"]) == (0, 0, 6)
    rows = json.loads(run("ls", bank, "--json").stdout)
    assert [r["id"] for r in rows] == [f"doc{i}" for i in range(6)] and [r["number"] for r in rows] == list(range(6))
    shown = json.loads(run("show", bank, "doc1", "--json").stdout)
    assert shown["document"]["text"].startswith("The lighthouse keeper") and shown["versions"][0]["kind"] == "upsert"
    assert "lighthouse" in run("show", bank, "doc1").stdout


def test_ask_reproduces_golden_tokens_and_shows_evidence(bank: Path, golden: Path) -> None:
    req = json.loads((golden / "cases" / "p4" / "manifest.json").read_text())["requests"]["q0"]
    gold = req["generated_token_ids"][0]
    # The random golden checkpoint never answers within these budgets: "no answer" (exit 3), evidence kept.
    res = run("ask", bank, req["prompts"][0], "--max-new-tokens", len(gold), "--max-rounds", 1, "--json", ok=False)
    assert res.exit_code == 3
    out = json.loads(res.stdout)
    assert out["outcome"] == "no_answer" and out["answer"] == "" and out["no_answer_reason"]
    first = out["rounds"][0]
    assert first["tokens"] == gold
    for layer, (sel,) in req["selected_global_doc_ids"].items():
        assert sorted(d["number"] for d in first["documents"] if layer in d["layers"]) == sorted(sel)
    res = run("ask", bank, req["prompts"][0], "--max-new-tokens", 3, ok=False)
    text = res.stdout
    assert res.exit_code == 3 and "no answer: the model ran out of tokens" in res.output
    assert re.search(r"round 0: routed doc\d\[\d\]", text) and "finish:" in text and "route" in text
    hits = json.loads(run("retrieve", bank, req["prompts"][0], "--json").stdout)
    assert {h["number"] for h in hits} == {n for (sel,) in req["selected_global_doc_ids"].values() for n in sel}


def test_update_delete_stats_verify_compact(bank: Path, tmp_path: Path) -> None:
    new = tmp_path / "new.txt"
    new.write_text("The lighthouse keeper on Gull Point retired in 1931 after forty years.")
    res = json.loads(run("update", bank, "doc1", "--file", new, "--json").stdout)
    assert res["version"] == 2 and res["number"] == 1
    assert json.loads(run("delete", bank, "doc5", "--json").stdout)["report"]["deleted"] == 1
    st = json.loads(run("stats", bank, "--json").stdout)
    assert st["documents"] == 5 and st["deleted"] == 1 and st["total_rows"] > st["live_chunks"]
    assert json.loads(run("verify", bank, "--json").stdout)["ok"] is True
    comp = json.loads(run("compact", bank, "--json").stdout)
    assert comp["rows_after"] == st["live_chunks"] < comp["rows_before"]
    assert "ok" in run("verify", bank).stdout
    assert "doc5" not in run("ls", bank).stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("ls", "{tmp}/missing"), "no msabank bank here"),
        (("ask", "{bank}", "   "), "the question is empty"),
        (("update", "{bank}", "nope", "--text", "x"), "'nope' is not in the bank"),
        (("delete", "{bank}", "nope"), "'nope' is not in the bank"),
        (("ingest", "{bank}", "{tmp}/absent.jsonl"), "absent.jsonl: no such file"),
        (("ingest", "{bank}", "{tmp}/bad.jsonl"), "bad.jsonl:2"),
        (("ingest", "{bank}", "{tmp}/dup.jsonl"), "duplicate id 'a'"),
        (("ls", "{bank}", "--model", "{golden}/tiny-msa-p64"), "model"),
    ],
)
def test_errors_are_clear_and_change_nothing(bank: Path, golden: Path, tmp_path: Path, args: tuple[str, ...],
                                             message: str) -> None:
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": \n')
    (tmp_path / "dup.jsonl").write_text('{"id": "a", "text": "one"}\n{"id": "a", "text": "two"}\n')
    before = run("ls", bank, "--json").stdout
    version = json.loads(run("stats", bank, "--json").stdout)["version"]
    res = run(*(a.format(tmp=tmp_path, bank=bank, golden=golden) for a in args), ok=False)
    assert res.exit_code == 1, res.output
    assert res.stderr.startswith("error: ") and message in res.stderr
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert run("ls", bank, "--json").stdout == before
    assert json.loads(run("stats", bank, "--json").stdout)["version"] == version


def _commands() -> list[str]:
    import typer.main

    return sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def test_every_command_has_help_and_is_documented() -> None:
    doc = (REPO / "docs" / "cli.md").read_text()
    cmds = _commands()
    assert {"init", "ingest", "update", "delete", "ask", "ls", "show", "stats", "verify", "compact", "demo"} <= set(cmds)
    for c in cmds:
        res = run(c, "--help")
        assert "Usage" in res.stdout and len(res.stdout) > 200, c
        assert f"msabank {c}" in doc, f"docs/cli.md does not document `msabank {c}`"
