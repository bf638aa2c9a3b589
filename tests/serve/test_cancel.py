"""A full queue answers 429; a question whose client disconnects before the engine takes it is dropped,
never run.

In-process: the real app and engine loop under uvicorn on 127.0.0.1, with a stand-in engine whose
ask_batch blocks until the test releases it, so "the engine is busy" is a state the test controls, not
a race. Waits are bounded loops on that state.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any

import httpx

from msabank.serve.app import ServeConfig, create_app
from msabank.serve.loop import EngineLoop


@dataclasses.dataclass
class _Stats:
    version: int = 1
    documents: int = 0
    live_chunks: int = 0
    tokens: int = 0
    bytes_on_disk: int = 0


class _BlockingEngine:
    def __init__(self) -> None:
        self.asked: list[str] = []
        self.busy = threading.Event()
        self.release = threading.Event()
        self.tokenizer = SimpleNamespace(encode=lambda s: s.split())
        self.model = SimpleNamespace(device="cpu")

    def refresh(self, snap: Any = None) -> float:
        return 0.0

    def stats(self) -> _Stats:
        return _Stats()

    def ask_batch(self, questions: list[str], **options: Any) -> list[Any]:
        self.asked.extend(questions)
        self.busy.set()
        assert self.release.wait(60)
        return [SimpleNamespace(question=q, answer="ok", outcome="answer", no_answer_reason=None, finish="answer",
                                rounds=[], evidence=[], timings={"total": 0.0}, transcript="") for q in questions]

    def close(self) -> None:
        pass


def _until(cond: Any, what: str) -> None:
    for _ in range(6000):  # bounded: a state change, not a duration, is awaited
        if cond():
            return
        time.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


def test_a_full_queue_refuses_and_a_disconnected_question_is_dropped_before_it_runs(tmp_path: Any) -> None:
    import uvicorn

    eng = _BlockingEngine()
    loop = EngineLoop(tmp_path, open_engine=lambda: eng, batch_wait_s=0.0, queue_size=1)
    server = uvicorn.Server(uvicorn.Config(create_app(loop, ServeConfig()), host="127.0.0.1", port=0,
                                           lifespan="off", log_level="warning", http="h11", ws="none"))
    t_server = threading.Thread(target=server.run, daemon=True)
    t_server.start()
    loop.start()
    try:
        _until(lambda: server.started and loop.state.ready, "server started")
        port = server.servers[0].sockets[0].getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        first: list[httpx.Response] = []
        t_first = threading.Thread(target=lambda: first.append(httpx.post(url + "/v1/ask", json={"question": "A"},
                                                                           timeout=60)))
        t_first.start()
        assert eng.busy.wait(60)  # the engine is inside A's batch

        body = json.dumps({"question": "B"}).encode()
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/ask HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        _until(lambda: loop.queue.qsize() == 1, "B queued")
        queued = loop.queue.queue[0]
        full = httpx.post(url + "/v1/ask", json={"question": "C"}, timeout=60)  # the queue holds 1: B
        assert full.status_code == 429 and full.json()["error"]["type"] == "queue_full"
        assert full.headers["retry-after"] == "1"
        s.close()  # the client goes away while B waits
        _until(lambda: queued.future.cancelled(), "B cancelled by the disconnect")

        eng.release.set()
        t_first.join(60)
        assert first and first[0].status_code == 200 and first[0].json()["answer"] == "ok"
        _until(lambda: loop.metrics.get("msabank_questions_cancelled_total") == 1, "the loop skipped B")
        assert eng.asked == ["A"]  # B never reached the engine
    finally:
        eng.release.set()
        server.should_exit = True
        t_server.join(30)
        loop.stop()
