"""`msabank bench routing|fetch|all|storage|lifecycle|e2e`: routing latency vs bank size, content-fetch
bandwidth, the storage benchmark, the engine lifecycle, and end to end at a model geometry (all in
`msabank.bench`).

Parse, call `msabank.bench.routing.run`, render a short table; the JSON (and PNG plot) land in --out.
"""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Optional

import typer


class What(str, Enum):
    routing = "routing"
    fetch = "fetch"
    all = "all"
    storage = "storage"
    lifecycle = "lifecycle"
    e2e = "e2e"


def bench(
    what: What = typer.Argument(..., help="routing, fetch, all (routing + fetch), storage, lifecycle (ingest tokens/s, ask latency by "
                    "stage, update-to-visible time, with the embedded model or --model), or e2e (time to first token, "
                    "decode, ingest at a model geometry, each beside its floor and an official-style path)."),
    out: Path = typer.Option(Path("bench-out"), "--out", envvar="OUT", help="Folder for bench_*.json and the plot."),
    sizes: str = typer.Option("1M,10M,100M", "--sizes", help="Synthetic bank sizes in tokens (MSA-4B geometry)."),
    q_tokens: str = typer.Option("64,512", "--q-tokens", help="Routing-query lengths in tokens."),
    impls: str = typer.Option("torch,triton", "--impls", help="Kernel implementations to time."),
    gpus: str = typer.Option("1", "--gpus", help="GPU counts for memory parallel, e.g. 1,2 (NCCL, spawned)."),
    layers: int = typer.Option(18, "--layers", help="Router layers scanned per question."),
    reps: int = typer.Option(5, "--reps", help="Timed repetitions (median reported)."),
    device: Optional[str] = typer.Option(None, "--device", help="torch device (default: cuda if available)."),
    sweep: bool = typer.Option(True, "--sweep/--no-sweep", help="Sweep scan tile configs on this card first."),
    memory_parallel: bool = typer.Option(False, "--memory-parallel", help="Time the NCCL path even for --gpus 1."),
    batch: int = typer.Option(8, "--batch", help="Questions per batched routing scan and batched fetch (1: one question)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="lifecycle: checkpoint (default: embedded)."),
    docs: int = typer.Option(2000, "--docs", help="lifecycle: synthetic documents to ingest."),
    geometry: str = typer.Option("msa-4b", "--geometry", help="e2e: msa-4b or tiny (random weights built in memory), "
                                 "or embedded (the shipped model); --model DIR overrides it."),
    bank_tokens: Optional[str] = typer.Option(None, "--bank-tokens", help="e2e: bank size in tokens (default 100M; "
                                              "tiny 20K), real encodings plus synthetic routing keys."),
    real_tokens: Optional[str] = typer.Option(None, "--real-tokens", help="e2e: tokens of real stage-1 encodings "
                                              "in the bank (default 1M; tiny 2K); also the stage-1-alone figure."),
    ingest_tokens: Optional[str] = typer.Option(None, "--ingest-tokens", help="e2e: tokens ingested through the "
                                                "engine into a temp bank (default 256K; tiny 1K)."),
    batches: str = typer.Option("1,8,32", "--batches", help="e2e: decode batch sizes."),
    new_tokens: int = typer.Option(32, "--new-tokens", help="e2e: tokens decoded per batch (no stop)."),
    questions: Optional[int] = typer.Option(None, "--questions", help="e2e: questions timed for time to first "
                                            "token (median; default 5, tiny 2)."),
    question_tokens: int = typer.Option(64, "--question-tokens", help="e2e: tokens per question prompt."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="lifecycle: documents per committed batch."),
) -> None:
    """Benchmark routing and content fetch (vs bank size, against measured floors), storage, the whole lifecycle, or
    end to end at a model geometry (e2e)."""
    from msabank.bench.routing import parse_tokens, run
    from msabank.cli._render import err_console, out_console

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if what is What.lifecycle:
        import json

        from msabank.bench.lifecycle import run_lifecycle_bench

        out.mkdir(parents=True, exist_ok=True)
        res = run_lifecycle_bench(model=model, docs=docs, device=device, batch_size=batch_size)
        (out / "bench_lifecycle.json").write_text(json.dumps(res, indent=2))
        i, a, u = res["ingest"], res["ask"], res["update_to_visible"]
        out_console.print(f"lifecycle on {res['device']} ({res['model_dtype']}): ingest {i['tokens']} tokens at "
                          f"{i['tokens_per_s']:,.0f} tok/s ({i['of_floor']:.2%} of the stage-1 FLOP floor); index load "
                          f"{res['index_load_s'] * 1000:.0f} ms")
        out_console.print("ask (median ms): " + ", ".join(f"{k} {a[k] * 1000:.1f}" for k in
                          ("refresh", "route", "fetch", "prefill", "decode", "total")) + f"; rounds {a['rounds']}")
        r = res["ask_repeat"]
        out_console.print("ask again, same questions (median ms): " + ", ".join(f"{k} {r[k] * 1000:.1f}" for k in
                          ("route", "fetch", "prefill", "decode", "total"))
                          + ("" if r["same_answers"] else "; ANSWERS DIFFER from the first pass"))
        out_console.print(f"update: commit {u['commit_s'] * 1000:.0f} ms, index refresh {u['refresh_s'] * 1000:.1f} ms, "
                          f"commit→answer {u['commit_to_answer_s'] * 1000:.0f} ms")
        return
    if what is What.e2e:
        import json

        from msabank.bench.e2e import render, run_e2e_bench

        res = run_e2e_bench(geometry=geometry, model=model, bank_tokens=bank_tokens, real_tokens=real_tokens,
                            ingest_tokens=ingest_tokens, batches=batches, new_tokens=new_tokens, questions=questions,
                            question_tokens=question_tokens, device=device,
                            log_fn=lambda line: err_console.print(line, markup=False))
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_e2e.json").write_text(json.dumps(res, indent=2))
        for line in render(res):
            out_console.print(line, markup=False, highlight=False, soft_wrap=True)
        err_console.print(f"results in {out / 'bench_e2e.json'}", markup=False)
        return
    if what is What.storage:
        from msabank.bench.storage import run_storage_bench

        out.mkdir(parents=True, exist_ok=True)
        run_storage_bench(out / "bench_storage.json", log=err_console.print)
        err_console.print(f"results in {out / 'bench_storage.json'}", markup=False)
        return
    from msabank.cli.train import _int_list
    from msabank.errors import InputError

    try:
        size_list = [parse_tokens(s) for s in sizes.split(",")]
    except ValueError:
        raise InputError(f"--sizes {sizes!r}: each size is a number of tokens, e.g. 1M,10M,100M or 250000") from None
    res = run(what.value, out_dir=out, sizes=size_list,
              q_tokens=_int_list(q_tokens, "--q-tokens"), impls=impls.split(","),
              gpus=_int_list(gpus, "--gpus"), layers=layers, reps=reps, device=device, sweep=sweep,
              memory_parallel=memory_parallel, batch=batch)
    r = res.get("routing")
    if r:
        out_console.print(f"routing on {r['card']}: copy {r['copy_bandwidth_Bps'] / 1e9:.0f} GB/s, "
                          f"GEMM {r['gemm_flops'] / 1e12:.0f} TFLOP/s")
        for x in r["rows"]:
            out_console.print(f"  {x['tokens'] / 1e6:8.2f}M tokens  T={x['q_tokens']:<4} {x['impl']:<26}"
                              f"{'sync ' if x['host_sync_per_layer'] else '     '}{x['ms']:10.2f} ms  "
                              f"{x['x_read_floor']:6.2f}x read floor  {x['x_floor']:6.2f}x max floor")
    f = res.get("fetch")
    if f:
        for name in ("transfer", "transfer_device", "layer_assembly", "question", "layer_assembly_batched",
                     "question_batched", f"question_batch{f.get('batch', 8)}"):
            if name not in f:
                continue
            x = f[name]
            out_console.print(f"fetch {name}: {x['ms']:.3f} ms, {x['GBps']:.1f} GB/s"
                              + (f" ({x['x_pinned_h2d']:.0%} of pinned H2D)" if "x_pinned_h2d" in x else ""))
    err_console.print(f"results in {out}" + ("" if res.get("plot") else " (no plot: matplotlib missing or nothing to plot)"),
                      markup=False)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
