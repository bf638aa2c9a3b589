"""Trainer commands: gen-corpus, train, eval."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

from msabank.cli._render import emit_json, out_console


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
    from tokenizers import Tokenizer

    from msabank.synth import write_corpus
    from msabank.train import default_model_path

    tok = Tokenizer.from_file(str(Path(model or default_model_path()) / "tokenizer.json"))
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
          lr: float = typer.Option(1.5e-3, "--lr"), warmup_frac: float = typer.Option(0.15, "--warmup-frac"),
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

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if init:
        model = load_model(init, device=dev, dtype=torch.float32)
        tok = model.tokenizer
    else:
        tok = Tokenizer.from_file(default_model_path() / "tokenizer.json")
        model = new_model(default_model_config(tok.vocab_size), tok, seed=seed)
    tc = TrainConfig(out_dir=str(out), steps=steps, time_budget_s=seconds, questions=questions, memory=memory,
                     lr=lr, warmup_frac=warmup_frac, force_every=force_every, workers=workers, device=dev,
                     seed=seed)
    run(model, tok, tc, on_log=lambda row: out_console.print(json.dumps(row)))  # type: ignore[arg-type]
    out_console.print(f"saved {out}")


def eval_(model: Optional[str] = typer.Option(None, "--model", "-m", help="Checkpoint (default: the embedded one)."),
          tokens: str = typer.Option("16000,131072", "--tokens", help="Bank sizes in tokens, comma-separated."),
          questions: int = typer.Option(300, "--questions", min=3, help="Questions per bank."),
          seed: Optional[int] = typer.Option(None, "--seed", help="First world seed (default: the evaluation base, "
                                                                    "never used in training)."),
          device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda if available)."),
          json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Answer exact match, routing recall@k per layer, with and without interleave, versus bank size."""
    import torch

    from msabank.evaluate import EVAL_SEED_BASE, evaluate
    from msabank.model import load_model
    from msabank.train import default_model_path

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    m = load_model(model or default_model_path(), device=dev)
    base = EVAL_SEED_BASE if seed is None else seed
    results = []
    for i, t in enumerate(int(x) for x in tokens.split(",") if x.strip()):
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
