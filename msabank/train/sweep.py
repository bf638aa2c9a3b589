"""Run several training configurations of the embedded model at once on one GPU, and collect their logs.

    python -m msabank.train.sweep --root RUNS --budget 420 \
        --run 'a: --init msabank/default_model --force-every 1' --run 'b: --memory 128' ...

Each `--run 'NAME: ARGS'` becomes `python -m msabank.train.run_default --out RUNS/NAME/ckpt --budget B ARGS`
in its own process (a 7.4M-parameter model leaves an H200 mostly idle, so 4-8 runs share it with little
slow-down: TRAINING_NOTES). Common arguments go in `--common`. Writes RUNS/summary.json: per run the last
log row and the evaluation, so a sweep is compared from one file.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path


def parse_run(spec: str) -> tuple[str, list[str]]:
    name, sep, args = spec.partition(":")
    name = name.strip()
    if not sep or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise SystemExit(f"--run takes 'NAME: ARGS' with a plain NAME, got {spec!r}")
    return name, shlex.split(args)


def summarize(root: Path, names: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name in names:
        d = root / name
        rows = [json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines() if x.strip()] \
            if (d / "train_log.jsonl").exists() else []
        ev = json.loads((d / "eval.json").read_text()) if (d / "eval.json").exists() else None
        out[name] = {"last": rows[-1] if rows else None, "steps_logged": len(rows), "eval": ev}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--budget", type=float, required=True, help="training seconds per run")
    ap.add_argument("--common", default="", help="arguments given to every run")
    ap.add_argument("--run", action="append", required=True, help="'NAME: ARGS' (repeat)")
    args = ap.parse_args(argv)
    root = Path(args.root)
    runs = [parse_run(s) for s in args.run]
    procs = []
    for name, extra in runs:
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "msabank.train.run_default", "--out", str(d / "ckpt"),
               "--budget", str(args.budget), *shlex.split(args.common), *extra]
        (d / "cmd.txt").write_text(shlex.join(cmd) + "\n")
        log = (d / "stdout.log").open("w")
        procs.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())))
    t0 = time.time()
    codes = {name: p.wait() for name, p in procs}
    summary = {"wall_s": round(time.time() - t0, 1), "exit": codes, "runs": summarize(root, [n for n, _ in runs])}
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    for name, info in summary["runs"].items():  # type: ignore[union-attr]
        last = info["last"] or {}
        ev = info["eval"] or {}
        evs = ev.get("evals", []) if isinstance(ev, dict) else []
        brief = [(e.get("tokens"), e.get("interleave", {}).get("em_all"), e.get("interleave", {}).get("recall_at_k_per_layer"))
                 for e in evs]
        print(name, "exit", codes[name], "step", last.get("step"), "r1L0", last.get("round1_recall1_L0"),
              "r1exact", last.get("target_exact_r1"), "final", last.get("target_exact_final"), "eval", brief)


if __name__ == "__main__":
    main()
