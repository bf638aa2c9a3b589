"""Where the time of one question goes (issue 12): torch.profiler and cProfile over the product's paths.

    python -m msabank.bench.profile --geometry msa-4b --out DIR [--bank-tokens 1M --real-tokens 64K]
    python -m msabank.bench.profile --geometry embedded --out DIR --ask-docs 1000 --ingest-docs 4000

Writes, per phase (round-1 prefill, round-2 prefill, decode of a few tokens and, for `--ask-docs`, whole
`Engine.ask` calls on a synthetic bank and `--ingest-docs`, `Engine.ingest` into a fresh bank), a torch.profiler table sorted by self CPU time and one sorted by
device time, plus the cProfile top functions by cumulative time, as text files under DIR. A host-bound path
shows as device time far below wall time and many launches per step: the tables say which Python frames
and which operators pay for it. Timings here include profiler overhead; figures belong to the benchmarks.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch


def _profile(name: str, fn: Callable[[], Any], out: Path, device: torch.device, reps: int = 3) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up: graphs captured, kernels loaded
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    wall = (time.perf_counter() - t) / reps
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        sync()
    ka = prof.key_averages()
    (out / f"{name}.cpu.txt").write_text(ka.table(sort_by="self_cpu_time_total", row_limit=45))
    dev_key = "self_cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    (out / f"{name}.device.txt").write_text(ka.table(sort_by=dev_key, row_limit=30))
    launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    syncs = sum(e.count for e in ka if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                    "cudaMemcpyAsync", "cudaEventSynchronize"))
    dev_us = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in ka)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(reps):
        fn()
    sync()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(60)
    s2 = io.StringIO()
    pstats.Stats(pr, stream=s2).sort_stats("tottime").print_stats(40)
    (out / f"{name}.cprofile.txt").write_text(s.getvalue() + "\n\n" + s2.getvalue())
    return {"wall_ms": wall * 1e3, "device_ms_per_rep": dev_us / 1e3 / reps,
            "launches_per_rep": launches / reps, "memcpy_sync_calls_per_rep": syncs / reps}


def run(geometry: str, out: Path, *, bank_tokens: str, real_tokens: str, ask_docs: int, device: str | None,
        ingest_docs: int = 0) -> dict[str, Any]:
    from msabank import stages
    from msabank.bench import e2e
    from msabank.engine import pick_device

    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    opts = e2e.check_options(geometry=geometry, bank_tokens=bank_tokens, real_tokens=real_tokens,
                             ingest_tokens="1K", batches="1", new_tokens=8, questions=1, question_tokens=64)
    m = e2e.load_bench_model(opts, dev, 0)
    template = stages.template_prefix(m)
    mem, _ = e2e.build_memory(m, real_tokens=opts.real_tokens, bank_tokens=opts.bank_tokens, seed=7)
    p1 = e2e.question_prompts(m, 1, 64, seed=11)[0]
    g = stages.generate(m, [p1], mem.view(), max_new_tokens=1, stop_ids=(), template=template)
    p2 = e2e.round2_prompt(m, p1, mem, g.routed[0])
    res: dict[str, Any] = {"geometry": geometry, "device": str(dev), "prompt_tokens": [len(p1.ids), len(p2.ids)]}
    if dev.type == "cuda":
        res["card"] = torch.cuda.get_device_name(dev)
    res["r1_prefill"] = _profile("r1_prefill", lambda: stages.generate(
        m, [p1], mem.view(), max_new_tokens=1, stop_ids=(), template=template), out, dev)
    res["r2_prefill"] = _profile("r2_prefill", lambda: stages.generate(
        m, [p2], mem.view(), max_new_tokens=1, stop_ids=(), template=template), out, dev)
    res["r1_decode16"] = _profile("r1_decode16", lambda: stages.generate(
        m, [p1], mem.view(), max_new_tokens=16, stop_ids=(), template=template), out, dev)
    if ask_docs:
        from msabank.engine import Engine
        from msabank.synth import World

        world = World(seed=7, num_docs=ask_docs)
        qs = [q.question for q in world.questions(4, seed=8)]
        with tempfile.TemporaryDirectory(prefix="msabank-prof-") as tmp, \
                Engine.create(Path(tmp) / "bank", None, device=str(dev)) as eng:
            eng.ingest(((d.id, d.text) for d in world.documents()), batch_size=256)
            eng.refresh()
            res["ask"] = _profile("ask", lambda: [eng.ask(q, max_new_tokens=48) for q in qs], out, dev, reps=1)
            res["ask"]["questions"] = len(qs)
            tm = [eng.ask(q, max_new_tokens=48).timings for q in qs]
            res["ask_timings"] = tm
    if ingest_docs:
        from msabank.engine import Engine
        from msabank.synth import World

        world = World(seed=9, num_docs=ingest_docs)
        docs = [(d.id, d.text) for d in world.documents()]
        tmp = tempfile.TemporaryDirectory(prefix="msabank-prof-ingest-")
        made = iter(range(10**6))

        def ingest() -> None:  # a fresh bank each call: every call commits the same documents
            with Engine.create(Path(tmp.name) / f"bank{next(made)}", None, device=str(dev)) as eng:
                eng.ingest(iter(docs), batch_size=1024)

        res["ingest"] = _profile("ingest", ingest, out, dev, reps=1)
        res["ingest"]["documents"] = ingest_docs
        tmp.cleanup()
    (out / "profile.json").write_text(json.dumps(res, indent=1, default=str))
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", default="embedded", choices=("msa-4b", "embedded", "tiny"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--bank-tokens", default="1M")
    ap.add_argument("--real-tokens", default="64K")
    ap.add_argument("--ask-docs", type=int, default=0, help="also profile Engine.ask on a synthetic bank of N docs "
                                                           "(embedded model only)")
    ap.add_argument("--ingest-docs", type=int, default=0, help="also profile Engine.ingest of N synthetic documents "
                                                              "into a fresh bank (embedded model only)")
    ap.add_argument("--device", default=None)
    a = ap.parse_args(argv)
    if (a.ask_docs or a.ingest_docs) and a.geometry != "embedded":
        raise SystemExit("--ask-docs/--ingest-docs profile the embedded model's Engine; use --geometry embedded")
    res = run(a.geometry, Path(a.out), bank_tokens=a.bank_tokens, real_tokens=a.real_tokens, ask_docs=a.ask_docs,
              device=a.device, ingest_docs=a.ingest_docs)
    print(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
