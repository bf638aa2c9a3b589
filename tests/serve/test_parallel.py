"""Memory-parallel serving: `torchrun --nproc-per-node 2 -m msabank.serve` on gloo (CPU) answers as one
process holding the whole index does, and a write is seen by both ranks' shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.serve.conftest import CORPUS, _line, make_bank

QUESTIONS = ["Who built the lighthouse?", "When did Jane Roe die?"]
OPTS = {"max_rounds": 1, "max_new_tokens": 4}


def _local(bank: Path, questions: list[str]) -> list[dict[str, object]]:
    """The in-process answers, one thread per op as each rank runs (torchrun sets OMP_NUM_THREADS=1)."""
    import torch

    from msabank.engine import Engine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with Engine.open(bank, readonly=True, device="cpu") as eng:
            return [{"answer": a.answer, "finish": a.finish, "generated": [r.generated for r in a.rounds],
                     "documents": [[h.id for h in r.documents] for r in a.rounds]}
                    for a in (eng.ask(q, **OPTS) for q in questions)]
    finally:
        torch.set_num_threads(threads)


def _served(a: dict) -> dict[str, object]:  # type: ignore[type-arg]
    return {"answer": a["answer"], "finish": a["finish"], "generated": [r["generated"] for r in a["rounds"]],
            "documents": [[d["id"] for d in r["documents"]] for r in a["rounds"]]}


def test_two_rank_server_answers_as_one_process(tmp_path: Path) -> None:
    bank = make_bank(tmp_path / "bank", CORPUS)
    want = _local(bank, QUESTIONS)
    log = tmp_path / "torchrun.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as errf:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 "--nproc-per-node", "2", "-m", "msabank.serve", str(bank), "--port", "0",
                                 "--device", "cpu"], stdout=subprocess.PIPE, stderr=errf, text=True, env=env,
                                start_new_session=True)
    try:
        assert proc.stdout is not None
        url = _line(proc.stdout, proc, "listening on ", log).split("listening on ", 1)[1].split()[0]
        _line(proc.stdout, proc, "ready:", log)
        with httpx.Client(base_url=url, timeout=120) as c:
            ready = c.get("/ready").json()
            assert 0 < ready["index_rows"] < ready["chunks"]  # rank 0 holds only its shard
            served = [c.post("/v1/ask", json={"question": q, **OPTS}).json() for q in QUESTIONS]
            v = c.post("/v1/documents", json={"documents": [{"id": "late", "text": "The lighthouse keeper was "
                                                             "Tom Hale, who kept it until 1950."}]}).json()["version"]
            after = c.post("/v1/ask", json={"question": QUESTIONS[0], "min_version": v, **OPTS}).json()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        proc.stdout.close()  # type: ignore[union-attr]
    assert [a["version"] for a in served] == [v - 1] * len(QUESTIONS) and after["version"] == v
    assert [_served(a) for a in served] == want
    assert _served(after) == _local(bank, QUESTIONS[:1])[0]  # both shards saw the write
