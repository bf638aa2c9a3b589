"""`msabank serve` through real clients: the official `openai` client, httpx for the native API.

One server subprocess for the whole module (tests/serve/conftest.py). Questions are kept cheap
(max_rounds 0, a few new tokens): the point is the server's behaviour, not the model's answers.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.serve.conftest import CORPUS, READ_KEY, WRITE_KEY, Server

CHEAP = {"max_rounds": 0, "max_new_tokens": 3}


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {WRITE_KEY}"}, timeout=120) as c:
        yield c


def _err(r: httpx.Response, status: int, field: str | None = None, type: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert set(e) == {"message", "type", "field"} and e["message"]
    if field is not None:
        assert e["field"] == field, e
    if type is not None:
        assert e["type"] == type, e
    return e


# ---- readiness, auth --------------------------------------------------------------------------------

ROUTES = [("GET", "/ready"), ("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/v1/models/msabank"),
          ("GET", "/v1/bank"), ("GET", "/v1/documents"), ("GET", "/v1/documents/acme"),
          ("PUT", "/v1/documents/acme"), ("DELETE", "/v1/documents/acme"), ("POST", "/v1/documents"),
          ("POST", "/v1/ask"), ("POST", "/v1/retrieve"), ("POST", "/v1/chat/completions"), ("GET", "/no/such/route")]


def test_health_is_open_and_ready_reports_the_bank(server: Server, http: httpx.Client) -> None:
    r = httpx.get(server.url + "/health")  # no token
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    ready = http.get("/ready").json()
    assert ready["ready"] is True and ready["documents"] == len(CORPUS) and ready["version"] == 1
    assert ready["index_rows"] == ready["chunks"] > 0 and ready["index_documents"] == len(CORPUS)
    assert ready["model"] == "msabank" and ready["device"] == "cpu"


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_route_but_health_needs_a_token(server: Server, method: str, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {WRITE_KEY}"}):
        r = httpx.request(method, server.url + path, headers=headers, json={"question": "x"})
        _err(r, 401, "Authorization", "authentication_error")
        assert r.headers["www-authenticate"] == "Bearer"


def test_read_only_key_reads_but_cannot_write(server: Server, http: httpx.Client) -> None:
    before = http.get("/v1/bank").json()["version"]
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {READ_KEY}"}, timeout=120) as ro:
        assert ro.get("/v1/bank").status_code == 200
        assert ro.get("/v1/documents/acme").json()["text"] == dict(CORPUS)["acme"]
        assert ro.post("/v1/ask", json={"question": "Who founded Acme?", **CHEAP}).status_code == 200
        _err(ro.post("/v1/documents", json={"documents": [{"id": "x", "text": "y"}]}), 403, "Authorization",
             "permission_error")
        _err(ro.put("/v1/documents/acme", json={"text": "changed"}), 403, "Authorization")
        _err(ro.delete("/v1/documents/acme"), 403, "Authorization")
    assert http.get("/v1/bank").json()["version"] == before
    assert http.get("/v1/documents/acme").json()["text"] == dict(CORPUS)["acme"]


def test_metrics_are_prometheus_text(http: httpx.Client) -> None:
    http.post("/v1/ask", json={"question": "Where does the Liffey flow?", **CHEAP}).raise_for_status()
    text = http.get("/metrics").text
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples["msabank_questions_total"] >= 1 and samples["msabank_rounds_total"] >= 1
    assert samples["msabank_index_rows"] > 0 and "msabank_queue_depth" in samples
    for stage in ("queue", "route", "fetch", "prefill", "decode", "total"):
        assert samples[f'msabank_stage_seconds_count{{stage="{stage}"}}'] >= 1
    assert "# TYPE msabank_stage_seconds histogram" in text


# ---- the OpenAI-compatible routes, through the official client ---------------------------------------


def test_openai_client_models_chat_and_streaming(server: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=WRITE_KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["msabank"]
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who built the lighthouse?"}]
    r = client.chat.completions.create(model="msabank", messages=msgs, max_tokens=3, extra_body={"max_rounds": 0})
    extra = r.model_extra["msabank"]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == extra["answer"]
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert extra["rounds"][0]["documents"] and extra["version"] >= 1
    assert {d["id"] for d in extra["rounds"][0]["documents"]} <= dict(CORPUS).keys()

    chunks = list(client.chat.completions.create(model="msabank", messages=msgs, max_tokens=3, stream=True,
                                                 extra_body={"max_rounds": 0}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content  # greedy
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert _timeless(chunks[-1].model_extra["msabank"]["rounds"]) == _timeless(extra["rounds"])

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=msgs)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


# ---- native API ----------------------------------------------------------------------------------------


def test_ask_returns_rounds_evidence_version_timings_and_streams_the_same(http: httpx.Client) -> None:
    body = {"question": "Who founded the company that built the lighthouse?", "max_rounds": 1, "max_new_tokens": 4}
    a = http.post("/v1/ask", json=body).json()
    assert a["version"] == http.get("/v1/bank").json()["version"]
    assert 1 <= len(a["rounds"]) <= 2 and a["finish"] in ("answer", "eos", "round_limit", "token_budget")
    for r in a["rounds"]:
        assert r["documents"] and all(d["id"] in dict(CORPUS) for d in r["documents"])
        assert all(isinstance(d["score"], float) and d["layers"] for d in r["documents"])
    assert {e["id"] for e in a["evidence"]} == {i for r in a["rounds"] for i in r["injected"]}
    assert {"queue", "refresh", "route", "fetch", "prefill", "decode", "total"} <= set(a["timings"])

    with http.stream("POST", "/v1/ask", json={**body, "stream": True}) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = _sse(s.iter_lines())
    kinds = [k for k, _ in events]
    assert kinds == ["queued"] + ["round"] * len(a["rounds"]) + ["answer"]
    final = events[-1][1]
    assert final["answer"] == a["answer"] and _timeless(final["rounds"]) == _timeless(a["rounds"])
    assert [e for k, e in events if k == "round"][0]["index"] == 0

    hits = http.post("/v1/retrieve", json={"question": body["question"]}).json()
    assert hits["documents"] and hits["version"] == a["version"]


def _timeless(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rounds]


def _sse(lines: Iterator[str]) -> list[tuple[str, Any]]:
    import json

    out, event = [], None
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            out.append((event, json.loads(line[6:])))
    return out


def test_documents_upsert_get_update_delete_with_committed_versions(http: httpx.Client) -> None:
    v0 = http.get("/v1/bank").json()["version"]
    r = http.post("/v1/documents", json={"documents": [{"id": "crud-1", "text": "first text"},
                                                       {"id": 7, "text": "integer id"}]}).json()
    assert r == {"added": 2, "updated": 0, "unchanged": 0, "deleted": 0, "version": v0 + 1}
    doc = http.get("/v1/documents/crud-1").json()
    assert doc["text"] == "first text" and doc["version"] == 1 and doc["versions"][0]["bank_version"] == v0 + 1
    assert http.get("/v1/documents/7").json()["text"] == "integer id"
    r = http.put("/v1/documents/crud-1", json={"text": "second text"}).json()
    assert r["updated"] == 1 and r["version"] == v0 + 2
    doc = http.get("/v1/documents/crud-1").json()
    assert doc["text"] == "second text" and doc["version"] == 2
    assert http.post("/v1/documents", json={"documents": [{"id": "crud-1", "text": "second text"}]}).json() == {
        "added": 0, "updated": 0, "unchanged": 1, "deleted": 0, "version": v0 + 2}
    r = http.delete("/v1/documents/crud-1").json()
    assert r["deleted"] == 1 and r["version"] == v0 + 3
    _err(http.get("/v1/documents/crud-1"), 404, "id", "not_found")
    _err(http.delete("/v1/documents/crud-1"), 404, "id")
    _err(http.put("/v1/documents/never-was", json={"text": "x"}), 404, "id")
    listed = http.get("/v1/documents", params={"limit": 0}).json()
    ids = [d["id"] for d in listed["documents"]]
    assert "crud-1" not in ids and "7" in ids and listed["version"] == v0 + 3
    assert http.delete("/v1/documents/7").json()["version"] == v0 + 4


def test_idempotency_key_replays_the_first_reply(http: httpx.Client) -> None:
    body = {"documents": [{"id": "idem-1", "text": "idempotent upsert"}]}
    h = {"Idempotency-Key": "upload-42"}
    first = http.post("/v1/documents", json=body, headers=h)
    again = http.post("/v1/documents", json=body, headers=h)
    assert first.json() == again.json() and first.json()["added"] == 1
    assert again.headers["idempotent-replayed"] == "true"
    _err(http.post("/v1/documents", json={"documents": [{"id": "idem-1", "text": "other"}]}, headers=h), 422,
         "Idempotency-Key", "idempotency_conflict")
    assert len(http.get("/v1/documents/idem-1").json()["versions"]) == 1


def test_bad_requests_name_the_field(http: httpx.Client) -> None:
    _err(http.post("/v1/ask", content=b"{not json", headers={"content-type": "application/json"}), 400, "body",
         "invalid_json")
    _err(http.post("/v1/ask", content=b"[1, 2]"), 400, "body", "invalid_json")
    _err(http.post("/v1/ask", content=b""), 400, "body")
    _err(http.post("/v1/ask", json={"question": "   "}), 400, "question")
    _err(http.post("/v1/ask", json={"questoin": "typo"}), 400, "question")  # missing required field
    _err(http.post("/v1/ask", json={"question": "q", "bogus": 1}), 400, "bogus")
    _err(http.post("/v1/ask", json={"question": "q", "max_rounds": "3"}), 400, "max_rounds")
    _err(http.post("/v1/ask", json={"question": "q", "max_rounds": 3}), 400, "max_rounds", "limit_exceeded")
    _err(http.post("/v1/ask", json={"question": "q", "max_new_tokens": 17}), 400, "max_new_tokens", "limit_exceeded")
    _err(http.post("/v1/ask", json={"question": "q", "temperature": -1.0}), 400, "temperature")
    _err(http.post("/v1/ask", json={"question": "word " * 100}), 400, "question", "limit_exceeded")
    _err(http.post("/v1/documents", json={"documents": [{"id": "e", "text": " "}]}), 400, "documents[0].text")
    _err(http.post("/v1/documents", json={"documents": [{"id": "", "text": "t"}]}), 400, "documents[0].id")
    _err(http.post("/v1/documents", json={"documents": [{"id": "a", "text": "t"}, {"id": "a", "text": "u"}]}), 400,
         "documents[1].id")
    _err(http.post("/v1/documents", json={"documents": [{"id": "a"}]}), 400, "documents[0].text")
    _err(http.post("/v1/documents", json={"documents": []}), 400, "documents")
    _err(http.post("/v1/documents", json={"documents": [{"id": f"n{i}", "text": "t"} for i in range(9)]}), 413,
         "documents", "limit_exceeded")
    _err(http.put("/v1/documents/acme", json={"text": ""}), 400, "text")
    _err(http.get("/v1/documents", params={"limit": -1}), 400, "limit")
    _err(http.get("/v1/documents", params={"limit": "many"}), 400, "limit")
    _err(http.post("/v1/chat/completions", json={"model": "msabank", "messages": []}), 400, "messages")
    _err(http.post("/v1/chat/completions", json={"model": "msabank", "messages": [{"role": "user", "content": "q"}],
                                                  "n": 2}), 400, "n")
    _err(http.post("/v1/ask", json={"question": "q", "min_version": 10 ** 9}), 409, "min_version")
    assert http.get("/v1/documents/acme").json()["text"] == dict(CORPUS)["acme"]  # nothing changed


def test_oversized_bodies_are_refused_while_read(http: httpx.Client) -> None:
    big = b'{"question": "' + b"x" * 70_000 + b'"}'
    _err(http.post("/v1/ask", content=big), 413, "body", "request_too_large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the server must count
        yield b'{"documents": [{"id": "huge", "text": "'
        for _ in range(40):
            yield b"y" * 4096
        yield b'"}]}'

    r = http.post("/v1/documents", content=chunked())
    assert r.request.headers.get("transfer-encoding") == "chunked"
    _err(r, 413, "body", "request_too_large")
    _err(http.get("/v1/documents/huge"), 404, "id")


# ---- concurrency: batching, read-your-writes, idempotent retries, same answers as in-process ---------------


def test_concurrent_askers_and_writers(server: Server, http: httpx.Client) -> None:
    """16 askers each carrying the newest committed version as min_version, 2 writers retrying every upsert
    with its idempotency key; then every answer equals the in-process Engine.ask on the same snapshot."""
    lock = threading.Lock()
    committed = {"version": http.get("/v1/bank").json()["version"]}
    answers: list[tuple[str, int, int, dict[str, Any]]] = []  # question, min_version, version, answer
    errors: list[BaseException] = []
    questions = ["Who built the lighthouse?", "Where does the Liffey flow?", "When did Jane Roe die?",
                 "What crosses the Liffey?"]

    def client() -> httpx.Client:
        return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {WRITE_KEY}"}, timeout=300)

    def asker(i: int) -> None:
        try:
            with client() as c:
                with lock:
                    mv = committed["version"]
                q = questions[i % len(questions)]
                r = c.post("/v1/ask", json={"question": q, "min_version": mv, **CHEAP})
                r.raise_for_status()
                with lock:
                    answers.append((q, mv, r.json()["version"], r.json()))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def writer(w: int) -> None:
        try:
            with client() as c:
                for b in range(3):
                    docs = [{"id": f"w{w}-{b}-{k}", "text": f"Writer {w} batch {b} note {k}: tide tables."}
                            for k in range(2)]
                    h = {"Idempotency-Key": f"writer-{w}-batch-{b}"}
                    first = c.post("/v1/documents", json={"documents": docs}, headers=h).json()
                    retry = c.post("/v1/documents", json={"documents": docs}, headers=h).json()  # a client retry
                    assert retry == first and first["added"] == 2, (first, retry)
                    with lock:
                        committed["version"] = max(committed["version"], first["version"])
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=asker, args=(i,)) for i in range(16)]
    threads[8:8] = [threading.Thread(target=writer, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(answers) == 16
    for q, mv, v, a in answers:
        assert v >= mv, (q, mv, v)
        assert a["question"] == q
    listed = [d["id"] for d in http.get("/v1/documents").json()["documents"]]
    written = [f"w{w}-{b}-{k}" for w in range(2) for b in range(3) for k in range(2)]
    assert sorted(i for i in listed if i.startswith("w")) == sorted(written)  # none lost, none twice
    final = http.get("/v1/bank").json()["version"]
    assert final == committed["version"]

    # no more writes: the served snapshot is `final`; ask again concurrently and compare with in-process asks
    answers.clear()
    threads = [threading.Thread(target=asker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    from msabank.engine import Engine

    with Engine.open(server.bank, readonly=True, device="cpu") as eng:
        assert eng.bank.version == final
        local = {q: eng.ask(q, **CHEAP) for q in questions}
    for q, _, v, a in answers:
        assert v == final
        want = local[q]
        assert a["answer"] == want.answer and a["finish"] == want.finish
        assert [r["generated"] for r in a["rounds"]] == [r.generated for r in want.rounds]
        assert [[d["id"] for d in r["documents"]] for r in a["rounds"]] == [[h.id for h in r.documents]
                                                                          for r in want.rounds]


# ---- the CLI as a client (--server / MSABANK_SERVER) ---------------------------------------------------------


def test_cli_commands_go_through_the_server(server: Server, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from msabank.cli.main import app

    env = {"MSABANK_SERVER": server.url, "MSABANK_API_KEY": WRITE_KEY}
    runner = CliRunner()

    def run(*args: str, ok: bool = True, **extra: str) -> Any:
        res = runner.invoke(app, [str(a) for a in args], env={**env, **extra})
        # ask exits 3 when the loop ends without an answer (the embedded model, 0 rounds, 2 tokens)
        assert (res.exit_code in ((0, 3) if args[0] == "ask" else (0,))) == ok, (args, res.output, res.exception)
        return res

    corpus = tmp_path / "more.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"cli-{i}", "text": f"Ferry timetable {i}: boats leave hourly."}) + "\n"
                              for i in range(3)))
    rep = json.loads(run("ingest", server.bank, corpus, "--json").stdout)["report"]
    assert rep["added"] == 3 and rep["version"] == json.loads(run("stats", server.bank, "--json").stdout)["version"]
    assert json.loads(run("ingest", server.bank, corpus, "--json").stdout)["report"]["unchanged"] == 3
    ids = [d["id"] for d in json.loads(run("ls", server.bank, "--json").stdout)]
    assert {"cli-0", "cli-1", "cli-2", "acme"} <= set(ids)
    run("update", server.bank, "cli-1", "--text", "Ferry timetable 1: boats leave at dawn.")
    shown = json.loads(run("show", server.bank, "cli-1", "--json").stdout)
    assert shown["document"]["text"] == "Ferry timetable 1: boats leave at dawn." and len(shown["versions"]) == 2
    assert json.loads(run("delete", server.bank, "cli-0", "cli-2", "--json").stdout)["report"]["deleted"] == 2
    res = run("show", server.bank, "cli-0", ok=False)
    assert "'cli-0' is not in the bank" in res.stderr
    ans = json.loads(run("ask", server.bank, "Who founded Acme?", "--max-rounds", "0", "--max-new-tokens", "2",
                         "--json").stdout)
    assert ans["rounds"] and ans["version"] >= rep["version"]
    assert "round 0: routed" in run("ask", server.bank, "Who founded Acme?", "--max-rounds", "0",
                                    "--max-new-tokens", "2").stdout
    hits = json.loads(run("retrieve", server.bank, "Who founded Acme?", "--json").stdout)
    assert hits and all(set(h) >= {"id", "number", "score", "layers"} for h in hits)

    # refusals are CLI errors naming the server, not tracebacks
    res = run("update", server.bank, "acme", "--text", "x", ok=False, MSABANK_API_KEY=READ_KEY)
    assert res.stderr.startswith("error: ") and "refused" in res.stderr and server.url in res.stderr
    res = run("stats", server.bank, ok=False, MSABANK_SERVER="http://127.0.0.1:9")
    assert "cannot reach the msabank server at http://127.0.0.1:9" in res.stderr
    # without a server, a local writer is told which server holds the lock
    res = runner.invoke(app, ["delete", str(server.bank), "acme"], env={"MSABANK_SERVER": ""})
    assert res.exit_code == 1 and f"served by `msabank serve` at {server.url}" in res.stderr, res.output
    assert "--server" in res.stderr
