"""Memory parallel `ask`: every rank opens the bank read-only, holds one shard of the routing index
(documents with number % world == rank), and runs the same question; routing is one collective per router
layer (`msabank.kernels.memory_parallel.ShardedRoutingIndex`), so every rank selects, generates and
answers exactly what one process holding the whole index would. Content K/V of a document another rank
owns is read from the bank on demand.

    torchrun --nproc-per-node 2 -m msabank.parallel BANK "question" [--max-new-tokens N] [--max-rounds R]

NCCL with one GPU per rank when CUDA is present, gloo on CPU. Rank 0 prints the answer as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from msabank.engine import Answer, Engine


def ask_on_ranks(bank: str | Path, question: str, *, group: Any, device: str | None = None, **ask_kwargs: Any) -> Answer:
    """This rank's part of a memory-parallel question (call it on every rank of `group`)."""
    with Engine.open(bank, readonly=True, device=device, group=group) as eng:
        return eng.ask(question, **ask_kwargs)


def spawned_ask(rank: int, world: int, port: int, bank: str, question: str, max_new_tokens: int, out: str) -> None:
    """Body for `kernels.memory_parallel.spawn_workers` (tests, gloo): writes out.<rank> as JSON."""
    import torch.distributed as dist

    from msabank.kernels.memory_parallel import init_tcp

    init_tcp(rank, world, port, backend="gloo", timeout_s=60)
    with Engine.open(bank, readonly=True, device="cpu", group=dist.group.WORLD) as eng:
        ans = eng.ask(question, max_rounds=1, max_new_tokens=max_new_tokens)
        local = eng._index.routing.numbers() if eng._index.routing is not None else []
    Path(f"{out}.{rank}").write_text(json.dumps({"answer": dataclasses.asdict(ans), "local": local}))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    import torch
    import torch.distributed as dist

    from msabank.kernels.memory_parallel import init_from_env

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bank")
    ap.add_argument("question")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-rounds", type=int, default=4)
    a = ap.parse_args(argv)
    rank, _ = init_from_env()
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    ans = ask_on_ranks(a.bank, a.question, group=dist.group.WORLD, device=device,
                       max_new_tokens=a.max_new_tokens, max_rounds=a.max_rounds)
    if rank == 0:
        print(json.dumps(dataclasses.asdict(ans), indent=2, ensure_ascii=False))  # the CLI entry point's output
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
