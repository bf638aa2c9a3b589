"""`msabank bench routing|fetch|all|storage`: routing latency vs bank size, content-fetch bandwidth, and
the storage benchmark (`msabank.storage.bench`).

Parse, call `msabank.bench.run`, render a short table; the JSON (and PNG plot) land in --out.
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


def bench(
    what: What = typer.Argument(..., help="routing, fetch, all (routing + fetch) or storage."),
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
) -> None:
    """Benchmark routing (latency per question vs bank size, against measured floors) and content fetch."""
    from msabank.bench import parse_tokens, run
    from msabank.cli._render import err_console, out_console

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if what is What.storage:
        from msabank.storage.bench import run_storage_bench

        out.mkdir(parents=True, exist_ok=True)
        run_storage_bench(out / "bench_storage.json", log=err_console.print)
        err_console.print(f"results in {out / 'bench_storage.json'}")
        return
    res = run(what.value, out_dir=out, sizes=[parse_tokens(s) for s in sizes.split(",")],
              q_tokens=[int(x) for x in q_tokens.split(",")], impls=impls.split(","),
              gpus=[int(x) for x in gpus.split(",")], layers=layers, reps=reps, device=device, sweep=sweep,
              memory_parallel=memory_parallel)
    r = res.get("routing")
    if r:
        out_console.print(f"routing on {r['card']}: copy {r['copy_bandwidth_Bps'] / 1e9:.0f} GB/s, "
                          f"GEMM {r['gemm_flops'] / 1e12:.0f} TFLOP/s")
        for x in r["rows"]:
            out_console.print(f"  {x['tokens'] / 1e6:8.2f}M tokens  T={x['q_tokens']:<4} {x['impl']:<7}"
                              f"{'sync ' if x['host_sync_per_layer'] else '     '}{x['ms']:10.2f} ms  "
                              f"{x['x_read_floor']:6.2f}x read floor  {x['x_floor']:6.2f}x max floor")
    f = res.get("fetch")
    if f:
        for name in ("transfer", "transfer_device", "layer_assembly", "question"):
            if name not in f:
                continue
            x = f[name]
            out_console.print(f"fetch {name}: {x['ms']:.3f} ms, {x['GBps']:.1f} GB/s"
                              + (f" ({x['x_pinned_h2d']:.0%} of pinned H2D)" if "x_pinned_h2d" in x else ""))
    err_console.print(f"results in {out}" + ("" if res.get("plot") else " (no plot: matplotlib missing or nothing to plot)"))


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
