"""Rank the runs of a sweep (msabank.train.sweep) by their evaluation, best first.

    python -m msabank.train.pick RUNS [--top 2] [--copy-to DIR]

Score: mean over evaluated banks of the interleave exact match plus the share of questions whose first
round named the gold document (copying), so runs that route and copy rank above runs that only route.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def score(ev: dict) -> float:
    evs = ev.get("evals", []) if ev else []
    if not evs:
        return -1.0
    tot = 0.0
    for e in evs:
        i = e.get("interleave", {})
        named = [i.get(k, 0.0) for k in ("single_first_id", "needle_first_id", "twohop_first_id")]
        tot += i.get("em_all", 0.0) + sum(named) / len(named)
    return tot / len(evs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--top", type=int, default=2)
    ap.add_argument("--copy-to", default="")
    args = ap.parse_args(argv)
    root = Path(args.root)
    ranked = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        f = d / "eval.json"
        ranked.append((score(json.loads(f.read_text())) if f.exists() else -1.0, d.name))
    ranked.sort(reverse=True)
    for s, name in ranked:
        print(f"{name}\t{s:.4f}")
    if args.copy_to:
        out = Path(args.copy_to)
        out.mkdir(parents=True, exist_ok=True)
        for _, name in ranked[: args.top]:
            src = root / name / "ckpt" / "model.safetensors"
            if src.exists():
                shutil.copy(src, out / f"{name}.safetensors")


if __name__ == "__main__":
    main()
