"""Trainer commands: gen-corpus, train, eval."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

from msabank.cli._render import emit_json, out_console
from msabank.errors import ConfigError, InputError


def _int_list(value: str, option: str) -> list[int]:
    """`1,2,3` → [1, 2, 3]; InputError naming the option and the bad item otherwise."""
    out = []
    for x in value.split(","):
        if not x.strip():
            continue
        try:
            n = int(x)
        except ValueError:
            raise InputError(f"{option} {value!r}: {x.strip()!r} is not an integer",
                             hint=f"give comma-separated integers, e.g. {option} 16000,131072") from None
        if n < 1:
            raise InputError(f"{option} {value!r}: {n} must be at least 1")
        out.append(n)
    if not out:
        raise InputError(f"{option} is empty", hint=f"give comma-separated integers, e.g. {option} 16000")
    return out


def gen_corpus(out: Path = typer.Argument(..., help="Output folder (documents.*, questions.*, corpus.json)."),
               seed: int = typer.Option(..., "--seed", help="World seed (the same seed gives the same corpus)."),
               tokens: int = typer.Option(16_000, "--tokens", min=1, help="Target size in tokens (16K .. 100M)."),
               questions: int = typer.Option(1000, "--questions", min=0, help="Questions to write."),
               fmt: str = typer.Option("jsonl", "--format", help="jsonl or parquet."),
               needle_every: int = typer.Option(10, "--needle-every", min=0,
                                                help="Every n-th document is a needle (0: none)."),
               model: Optional[str] = typer.Option(None, "--model", "-m",
                                                   help="Count tokens with this checkpoint's tokenizer "
                                                        "(default: the embedded model's)."),
               json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Write a seeded synthetic memory corpus: entities, single-hop, two-hop and needle questions."""
    from msabank.engine import resolve_model_path
    from msabank.prompt import Tokenizer
    from msabank.synth import write_corpus

    if fmt not in ("jsonl", "parquet"):
        raise InputError(f"unknown --format {fmt!r}", hint="use jsonl or parquet")
    mdir = resolve_model_path(model)
    try:
        tok = Tokenizer.from_file(mdir / "tokenizer.json")
    except Exception as err:  # tokenizers raises a bare Exception for a missing or malformed file
        raise ConfigError(f"{mdir / 'tokenizer.json'}: cannot load the tokenizer ({err})",
                          hint="point --model at a checkpoint directory with tokenizer.json") from None
    summary = write_corpus(out, seed=seed, tokens=tokens, num_questions=questions, fmt=fmt, tokenizer=tok,
                           needle_every=needle_every)
    if json_out:
        emit_json(summary)
    else:
        out_console.print(f"wrote {summary['documents']} documents ({summary['tokens']} tokens) and "
                          f"{questions} questions to {out}")


def train(out: Path = typer.Argument(..., help="Checkpoint directory to write."),
          init: Optional[str] = typer.Option(None, "--init", help="Checkpoint to fine-tune (default: a new small "
                                                                   "model with the embedded tokenizer)."),
          seconds: Optional[float] = typer.Option(None, "--seconds", help="Train for this long (schedule follows time)."),
          steps: int = typer.Option(1000, "--steps", min=1, help="Steps when --seconds is not given."),
          questions: int = typer.Option(64, "--questions", min=1, help="Questions per step."),
          memory: int = typer.Option(256, "--memory", min=2, help="Memory documents per step."),
          lr: float = typer.Option(1.5e-3, "--lr"), warmup_frac: float = typer.Option(0.3, "--warmup-frac", help="Cap of the warm-up phase, as a share of the run."),
          force_every: int = typer.Option(2, "--force-every", help="Force the positive document on every n-th step."),
          workers: int = typer.Option(0, "--workers", min=0, help="DataLoader workers generating samples."),
          device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda if available)."),
          seed: int = typer.Option(1, "--seed")) -> None:
    """Train an MSA model (two phases, InfoNCE routing + LM loss) on seeded synthetic interleave samples."""
    import torch

    from msabank.model import load_model
    from msabank.prompt import Tokenizer
    from msabank.train import default_model_path
    from msabank.train.loop import TrainConfig, default_model_config, new_model
    from msabank.train.loop import train as run

    from msabank.engine import pick_device

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dev = str(pick_device(device))
    if init:
        model = load_model(init, device=dev, dtype=torch.float32)
        tok = model.tokenizer
    else:
        tok = Tokenizer.from_file(default_model_path() / "tokenizer.json")
        model = new_model(default_model_config(tok.vocab_size), tok, seed=seed)
    tc = TrainConfig(out_dir=str(out), steps=steps, time_budget_s=seconds, questions=questions, memory=memory,
                     lr=lr, warmup_frac=warmup_frac, force_every=force_every, workers=workers, device=dev,
                     seed=seed)
    run(model, tok, tc, on_log=lambda row: out_console.print(json.dumps(row), markup=False))  # type: ignore[arg-type]
    out_console.print(f"saved {out}", markup=False)


def eval_(model: Optional[str] = typer.Option(None, "--model", "-m", help="Checkpoint (default: the embedded one)."),
          tokens: str = typer.Option("16000,131072", "--tokens", help="Bank sizes in tokens, comma-separated."),
          questions: int = typer.Option(300, "--questions", min=3, help="Questions per bank."),
          seed: Optional[int] = typer.Option(None, "--seed", help="First world seed (default: the evaluation base, "
                                                                    "never used in training)."),
          device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)."),
          json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Answer exact match, routing recall@k per layer, with and without interleave, versus bank size."""
    from msabank.engine import pick_device
    from msabank.train.evaluate import EVAL_SEED_BASE, evaluate
    from msabank.model import load_model
    from msabank.train import default_model_path

    sizes = _int_list(tokens, "--tokens")
    dev = pick_device(device)
    m = load_model(model or default_model_path(), device=dev)
    base = EVAL_SEED_BASE if seed is None else seed
    results = []
    for i, t in enumerate(sizes):
        r = evaluate(m, tokens=t, seed=base + i, questions=questions)
        results.append(r)
        if not json_out:
            for mode in ("interleave", "no_interleave"):
                s = r[mode]
                out_console.print(
                    f"{r['tokens']:>10} tokens  {mode:<14} single {s.get('single_em', 0):.2f}  "
                    f"two-hop {s.get('twohop_em', 0):.2f}  needle {s.get('needle_em', 0):.2f}  "
                    f"recall@{r['top_k']} per layer {s['recall_at_k_per_layer']}")
    if json_out:
        emit_json(results)


def register(app: typer.Typer) -> None:
    app.command("gen-corpus")(gen_corpus)
    app.command("train")(train)
    app.command("eval")(eval_)
