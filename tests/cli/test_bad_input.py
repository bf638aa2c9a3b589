"""Bad and edge input from an adversarial user: every case gets `error: …` naming what and where, exit code 1,
no traceback, and the bank keeps everything it had committed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from msabank.cli.main import app
from msabank.errors import InputError

runner = CliRunner()


def run(*args: object, ok: bool = True):  # noqa: ANN201
    res = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, f"{args}: {res.output}\n{res.exception!r}"
    return res


def fails(*args: object, message: str, code: int = 1):  # noqa: ANN201
    res = run(*args, ok=False)
    assert res.exit_code == code, f"{args}: exit {res.exit_code}\n{res.output}\n{res.exception!r}"
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    assert "error: " in res.stderr and message in res.stderr.split("error: ", 1)[1], res.stderr
    return res


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory, golden: Path) -> Path:
    b = tmp_path_factory.mktemp("bank") / "bank"
    run("init", b, "--model", golden / "tiny-msa")
    c = b.parent / "c.jsonl"
    c.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in
                         [("a", "The lighthouse keeper retired."), ("[/]", "Text with [/nope] and [red]x[/red]."),
                          ("[bold]b", "Another document.")]))
    run("ingest", b, c)
    return b


def _ids(bank: Path) -> list[str]:
    return [r["id"] for r in json.loads(run("ls", bank, "--json").stdout)]


def test_ids_and_text_with_markup_are_printed_verbatim(bank: Path) -> None:
    out = run("ls", bank).stdout
    assert "[/]" in out and "[bold]b" in out and "[/nope]" in out
    assert run("show", bank, "[/]").stdout.startswith("[/] [1] version 1")
    assert "[bold]b [2]" in run("show", bank, "[bold]b").stdout
    assert run("update", bank, "[/]", "--text", "New [/] text.").stdout.startswith("[/] [1] is now version 2")
    assert run("show", bank, "[/]").stdout.rstrip().endswith("New [/] text.")


def test_ls_limit_must_not_be_negative(bank: Path) -> None:
    res = run("ls", bank, "--limit", "-1", ok=False)
    assert res.exit_code == 2 and "--limit" in res.stderr
    assert len(json.loads(run("ls", bank, "--limit", "1", "--json").stdout)) == 1


def test_too_long_id_is_found_before_anything_is_committed(bank: Path, tmp_path: Path) -> None:
    before = _ids(bank)
    c = tmp_path / "long.jsonl"
    c.write_text(json.dumps({"id": "ok1", "text": "fine"}) + "\n" + json.dumps({"id": "L" * 501, "text": "x"}) + "\n")
    fails("ingest", bank, c, "--batch-size", "1", message="long.jsonl: record 2: id 'LLLL")
    assert _ids(bank) == before


def test_empty_corpus_is_an_error_and_sync_deletes_nothing(bank: Path, tmp_path: Path) -> None:
    before = _ids(bank)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.pdf").write_text("not a text file")
    fails("ingest", bank, tmp_path / "empty", "--sync", message="the corpus has no documents")
    (tmp_path / "header.csv").write_text("id,text\n")
    fails("ingest", bank, tmp_path / "header.csv", "--sync", message="header.csv: the corpus has no documents")
    assert _ids(bank) == before


@pytest.mark.parametrize("args, message", [
    (("init", "{tmp}/new", "--dtype", "int8"), "unknown storage dtype 'int8'"),
    (("init", "{tmp}/afile/new"), "cannot create bank"),
    (("ls", "{tmp}/garbled"), "engine.json: not valid JSON"),
    (("ls", "{tmp}/noengine"), "engine.json is missing"),
    (("ask", "{bank}", "hi", "--device", "nonsense"), "unknown device 'nonsense'"),
    (("ask", "{bank}", "hi", "--temperature", "inf"), "temperature must be a finite number"),
    (("ask", "{bank}", "why " * 9000), "transcript budget is 8192 tokens"),
    (("gen-corpus", "{tmp}/gc", "--seed", "1", "--format", "xml"), "unknown --format 'xml'"),
    (("gen-corpus", "{tmp}/gc", "--seed", "1", "--model", "{tmp}/nomodel"), "not a checkpoint directory"),
    (("eval", "--tokens", "16k"), "--tokens '16k': '16k' is not an integer"),
    (("bench", "routing", "--sizes", "lots"), "--sizes 'lots'"),
    (("train", "{tmp}/out", "--device", "gpu9"), "unknown device 'gpu9'"),
])
def test_bad_options_and_paths_are_clear_errors(bank: Path, golden: Path, tmp_path: Path, args: tuple[str, ...],
                                                message: str) -> None:
    (tmp_path / "afile").write_text("a file, not a folder")
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "engine.json").write_text("{not json")
    (tmp_path / "noengine" / "index").mkdir(parents=True)
    (tmp_path / "noengine" / "index" / "data.mdb").write_bytes(b"")
    before = _ids(bank)
    argv = [a.format(tmp=tmp_path, bank=bank) for a in args]
    fails(*argv, message=message)
    assert _ids(bank) == before
    assert not (tmp_path / "new").exists() and not (tmp_path / "gc").exists()


def test_engine_api_rejects_bad_arguments_with_input_errors(bank: Path) -> None:
    from msabank.engine import Engine

    with Engine.open(bank, device="cpu") as eng:
        before = [r.user_id for r in eng.list()]
        for kwargs in ({"max_rounds": -1}, {"max_new_tokens": 0}, {"temperature": -1.0}, {"top_p": -1.0},
                       {"top_p": 2.0}, {"token_budget": 0}):
            with pytest.raises(InputError, match=next(iter(kwargs))):
                eng.ask("hi", **kwargs)  # type: ignore[arg-type]
        with pytest.raises(InputError, match="no 'text' key"):
            eng.ingest([{"id": "x"}])
        with pytest.raises(InputError, match="got a str"):
            eng.ingest("abc")  # type: ignore[arg-type]
        with pytest.raises(InputError, match="the id must be a string or an integer"):
            eng.ingest([(1.5, "text")])  # type: ignore[list-item]
        assert [r.user_id for r in eng.list()] == before
        assert eng.ingest([(7, "A document with an integer id.")]).added == 1  # type: ignore[list-item]
        # A single string is one id, not its characters; an id named twice is deleted once.
        assert eng.delete("7").deleted == 1  # type: ignore[arg-type]
        eng.ingest([("d1", "Delete me twice.")])
        assert eng.delete(["d1", "d1"]).deleted == 1
        assert [r.user_id for r in eng.list()] == before


def test_verify_hint_names_a_repair_that_works(bank: Path, tmp_path: Path, golden: Path) -> None:
    import shutil

    b = tmp_path / "bank"
    shutil.copytree(bank, b)
    chunks = sorted((b / "tensors").glob("gen-*/content/c.*"))
    raw = bytearray(chunks[0].read_bytes())
    for at in range(16, len(raw), 97):  # damage rows all over the chunk, live ones included
        raw[at] ^= 0xFF
    chunks[0].write_bytes(raw)
    res = fails("verify", b, message="problem(s)")
    assert "delete" in res.stderr and "compact" in res.stderr
    bad = json.loads(run("verify", b, "--json", ok=False).stdout)["report"]["corrupted"]
    assert bad
    recs = [json.loads(run("show", b, i, "--json").stdout)["document"] for i in bad]
    corpus = tmp_path / "again.jsonl"
    corpus.write_text("".join(json.dumps({"id": r["user_id"], "text": r["text"]}) + "\n" for r in recs))
    run("ingest", b, corpus)  # what the old hint said: skips them, nothing repaired
    assert json.loads(run("verify", b, "--json", ok=False).stdout)["ok"] is False
    run("delete", b, *bad)
    run("compact", b)
    run("ingest", b, corpus)
    assert json.loads(run("verify", b, "--json").stdout)["ok"] is True


def test_interrupted_ingest_says_so_and_resumes(golden: Path, tmp_path: Path) -> None:
    b = tmp_path / "bank"
    run("init", b, "--model", golden / "tiny-msa")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"Document {i} about kettles. " * 20}) + "\n"
                              for i in range(60)))
    cmd = [sys.executable, "-c", "from msabank.cli.main import main; main()", "ingest", str(b), str(corpus),
           "--batch-size", "1"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list((b / "tensors").glob("gen-*/content/c.*")):
        time.sleep(0.05)  # wait for the first committed batch
    time.sleep(0.3)  # a few commits in
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err.decode()
    assert err.decode().startswith("error: interrupted") and "Traceback" not in err.decode()
    committed = len(_ids(b))
    assert committed < 60, "the interrupt came after the last commit"
    rep = json.loads(run("ingest", b, corpus, "--json").stdout)["report"]
    assert (rep["unchanged"], rep["added"]) == (committed, 60 - committed)  # resumes, re-encodes nothing twice
    assert sorted(_ids(b)) == sorted(f"d{i}" for i in range(60))
    assert json.loads(run("verify", b, "--json").stdout)["ok"] is True
