"""`msabank demo` on the embedded model: gold documents marked, the update asked where routing reaches."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from msabank.cli.main import app


def test_demo_marks_gold_documents_and_updates_a_routed_fact(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--docs", "40", "--seed", "3", "--bank", str(tmp_path / "b"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert len(out["questions"]) == 5 and all(q["gold"] for q in out["questions"])
    upd = out["update"]
    assert upd["old"] != upd["new"] and upd["old"].isdigit() and len(upd["old"]) == len(upd["new"])
    # the update's question routes to the updated document (chosen with retrieve), so the change can show
    from msabank.engine import Engine

    with Engine.open(tmp_path / "b") as eng:
        assert upd["document"] in {h.id for h in eng.retrieve(upd["question"])}
        assert upd["new"] in eng.get(upd["document"]).text


def test_round_lines_star_the_gold_documents():
    from types import SimpleNamespace

    from msabank.cli.ask import round_lines

    hit = lambda i, n: SimpleNamespace(id=i, number=n, score=0.5, layers={4: 0.5})  # noqa: E731
    ans = SimpleNamespace(rounds=[SimpleNamespace(index=0, documents=[hit("a", 1), hit("b", 2)], requested=[2],
                                                  injected=["b"])])
    (line,) = round_lines(ans, scores=False, gold=frozenset({"b"}))
    assert "a[1]," in line and "b[2]★" in line and "appended b" in line
