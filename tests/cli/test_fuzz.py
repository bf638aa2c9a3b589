"""Fuzz: one byte flipped in one file of a small bank; every reading command then either works and serves
exactly what was committed, or fails with one named error (exit 1, `error: …`, no traceback).

Deterministic (derandomize=True, no example database) and bounded: MSABANK_FUZZ_EXAMPLES (default 3)
examples of ~2 s each. Flips land anywhere in a tensor chunk file, a zarr.json or engine.json, and in the
LMDB file inside record values (the JSON of document, version and state records: LMDB itself keeps no
checksums, and a flipped byte in its B-tree page headers is outside what msabank can check)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from msabank.cli.main import app

runner = CliRunner()
EXAMPLES = int(os.environ.get("MSABANK_FUZZ_EXAMPLES", "3"))
QUESTION = "Which captain sailed the northern route?"
# JSON fields of the records msabank writes: a flip lands in the value that follows
_FIELDS = re.compile(rb'"(user_id|text|content_hash|crc_content|crc_routing|row_start|num_chunks|n_tokens|version|'
                     rb'state|kind|live_docs|live_chunks|rows|next_number|generation)":')


def _run(*args: object):  # noqa: ANN202
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, golden: Path) -> dict:
    d = tmp_path_factory.mktemp("fuzz")
    docs = {f"d{i}": f"Captain {i} sailed the {'northern' if i % 2 else 'southern'} route in {1900 + 7 * i}. " * (1 + i % 3)
            for i in range(6)}
    corpus = d / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in docs.items()))
    bank = d / "bank"
    assert _run("init", bank, "--model", golden / "tiny-msa").exit_code == 0
    assert _run("ingest", bank, corpus, "--batch-size", "2").exit_code == 0
    assert _run("update", bank, "d1", "--text", docs["d1"] + " Later rewritten.").exit_code == 0  # garbage rows too
    docs["d1"] += " Later rewritten."
    out = {"bank": bank, "docs": docs}
    for name, args in (("ls", ("ls", bank, "--json")), ("stats", ("stats", bank)),
                       ("retrieve", ("retrieve", bank, QUESTION, "--json"))):
        res = _run(*args)
        assert res.exit_code == 0, res.output
        out[name] = res.stdout
    files = [p for p in sorted(bank.rglob("*")) if p.is_file() and p.stat().st_size
             and (p.parent.name in ("content", "k", "v") or p.parent.parent.name == "routing" or p.name in
                  ("zarr.json", "engine.json")) and not p.name.startswith(".")]
    mdb = (bank / "index" / "data.mdb").read_bytes()
    spans = [m.end() for m in _FIELDS.finditer(mdb)]
    assert len(spans) > 50 and len(files) > 10
    out["targets"] = [(str(p.relative_to(bank)), None) for p in files] + [("index/data.mdb", s) for s in spans]
    return out


def _records(ls_json: str) -> dict[str, tuple]:
    return {r["id"]: (r["number"], r["version"], r["tokens"], r["chunks"]) for r in json.loads(ls_json)}


def _check_failure(res, what: str) -> None:  # noqa: ANN001
    assert res.exit_code == 1, f"{what}: exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    assert res.exception is None or isinstance(res.exception, SystemExit), f"{what}: {res.exception!r}"
    assert "Traceback" not in res.output, res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and len(errors[0]) > len("error: ") + 10, f"{what}: {res.stderr}"


@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_a_flipped_byte_is_served_never_and_named_always(clean: dict, tmp_path_factory: pytest.TempPathFactory,
                                                         data: st.DataObject) -> None:
    bank = tmp_path_factory.mktemp("flip") / "bank"
    shutil.copytree(clean["bank"], bank)
    rel, at = data.draw(st.sampled_from(clean["targets"]), label="target")
    f = bank / rel
    raw = bytearray(f.read_bytes())
    pos = data.draw(st.integers(0, len(raw) - 1), label="offset") if at is None else \
        min(len(raw) - 1, at + data.draw(st.integers(0, 24), label="offset"))
    raw[pos] ^= data.draw(st.integers(1, 255), label="mask")
    f.write_bytes(bytes(raw))

    verify = _run("verify", bank, "--json")
    intact = verify.exit_code == 0
    if not intact:
        _check_failure(verify, f"verify after flipping {rel}@{pos}")
    clean_records = _records(clean["ls"])
    ls = _run("ls", bank, "--json")
    if ls.exit_code == 0:
        listed = _records(ls.stdout)
        assert all(clean_records.get(k) == v for k, v in listed.items()), "ls served a changed record"
        assert listed == clean_records or not intact
    else:
        _check_failure(ls, "ls")
        assert not intact
    docs = sorted(clean["docs"])
    for uid in ("d1", data.draw(st.sampled_from(docs), label="show")):  # d1 has two versions
        text = clean["docs"][uid]
        show = _run("show", bank, uid, "--json")
        if show.exit_code == 0:
            assert json.loads(show.stdout)["document"]["text"] == text, f"show {uid} served a changed text"
        else:
            _check_failure(show, f"show {uid}")
            assert not intact
    retrieve = _run("retrieve", bank, QUESTION, "--json")
    if retrieve.exit_code == 0:
        got = json.loads(retrieve.stdout)
        assert {h["id"] for h in got} <= set(clean["docs"])
        if intact:
            assert retrieve.stdout == clean["retrieve"], "retrieve differs on a bank that verifies"
    else:
        _check_failure(retrieve, "retrieve")
        assert not intact
    stats = _run("stats", bank)
    if stats.exit_code == 0:
        assert stats.stdout.split(",")[0] == clean["stats"].split(",")[0] or not intact
    else:
        _check_failure(stats, "stats")
