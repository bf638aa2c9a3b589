"""Lifecycle benchmark (issue 4): ingest tokens/s, `ask` latency by stage, update-to-visible time.

Runs the real engine on a synthetic corpus (msabank.synth) with any checkpoint (default: the embedded
model), on CPU or GPU. Results are a JSON-able dict; `msabank bench lifecycle` prints and saves them.
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_lifecycle_bench(*, model: str | None = None, docs: int = 2000, questions: int = 12, device: str | None = None,
                        seed: int = 7, batch_size: int = 64) -> dict[str, Any]:
    from msabank import pipeline, stages
    from msabank.engine import Engine
    from msabank.synth import World

    world = World(seed=seed, num_docs=docs)
    out: dict[str, Any] = {"docs": docs, "seed": seed}
    with tempfile.TemporaryDirectory(prefix="msabank-bench-") as tmp, \
            Engine.create(Path(tmp) / "bank", model, device=device) as eng:
        out["device"] = _device_name(eng.model.device)
        out["model_dtype"] = str(eng.model.dtype).removeprefix("torch.")
        # warm-up outside the timing: the first forward on a GPU pays for CUDA context, cuBLAS and kernel loads
        stages.encode_documents(eng.model, [(i, d.text) for i, d in zip(range(8), world.documents())])
        if eng.model.device.type == "cuda":
            torch.cuda.synchronize(eng.model.device)
        t = time.perf_counter()
        rep = eng.ingest(((d.id, d.text) for d in world.documents()), batch_size=batch_size)
        ingest_s = time.perf_counter() - t
        st = eng.stats()
        out["ingest"] = {"documents": rep.added, "tokens": st.tokens, "seconds": ingest_s,
                         "tokens_per_s": st.tokens / ingest_s, "docs_per_s": rep.added / ingest_s,
                         "batch_size": batch_size, "window_tokens": pipeline.WINDOW_TOKENS,
                         "bytes_on_disk": st.bytes_on_disk, "tensor_bytes_per_token": st.tensor_bytes_on_disk / st.tokens}
        t = time.perf_counter()
        eng.refresh()
        out["index_load_s"] = time.perf_counter() - t
        qs = world.questions(questions, seed=seed + 1)
        per: list[dict[str, float]] = []
        for q in qs:
            a = eng.ask(q.question, max_new_tokens=48)
            per.append(dict(a.timings, rounds=len(a.rounds)))
        out["ask"] = {k: statistics.median(p[k] for p in per)
                      for k in ("refresh", "route", "fetch", "prefill", "decode", "total", "rounds")}
        out["ask"]["questions"] = len(per)
        # Update-to-visible: commit an update, then time until an ask in this long-lived engine sees it.
        lat = []
        for i in range(3):
            d = world.document(i * 7 % docs)
            t = time.perf_counter()
            eng.update(d.id, d.text + f" Revision {i}.")
            commit_s = time.perf_counter() - t
            a = eng.ask(qs[0].question, max_new_tokens=1, max_rounds=0)
            lat.append({"commit_s": commit_s, "refresh_s": a.timings["refresh"],
                        "commit_to_answer_s": time.perf_counter() - t})
        out["update_to_visible"] = {k: statistics.median(x[k] for x in lat) for k in lat[0]}
    return out
