"""Can a model learn to read an answer out of the appended document? A focused CPU-sized check.

    python -m msabank.train.reading MODEL_DIR|tiny --types color --distractors 0 --steps 200 --loss first

Trains (in memory, nothing saved) on final-round samples only (`question_sequences(...)[-1]`: question,
`[n]`, the appended document, `<End-of-Retrieve>`, restatement, answer) of single-hop questions whose
answer type is in `--types`, through the training forward (`core.forward`, the gold document forced into
memory, LM loss only), 16 questions over 16 memory documents per step, AdamW. `--distractors N` cuts the
appended document to the answer sentence plus up to N others (`reading_excerpt`; -1 = whole). `--loss`:
`all` (every final-round target, as the trainer), `first` (the answer's first token only), `answer` (all
targets, the answer's own tokens ×`--answer-weight`). Every `--every` steps: held-out first-answer-token
accuracy on whole documents and on training-style (cut) documents. docs/eval.md has what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from typing import Any, Sequence

import torch

from msabank import prompt as P
from msabank.model import MSAModel
from msabank.synth import World
from msabank.train.core import Batch, forward
from msabank.train.data import collate, question_sequences, reading_excerpt


def final_round_batch(model: MSAModel, rng: random.Random, world: World, types: Sequence[str], distractors: int,
                      *, questions: int = 16, memory: int = 16) -> Batch:
    """Final-round samples of `questions` single-hop questions of `types` over `memory` documents."""
    tok = model.tokenizer
    qs = []
    while len(qs) < questions:
        q = world.question(rng.randrange(world.num_docs), rng, two_hop=False)
        if q is not None and q.type.split(":")[-1] in types:
            qs.append(q)
    docs = list(dict.fromkeys(q.gold[0] for q in qs))
    while len(docs) < min(memory, world.num_docs):
        docs = list(dict.fromkeys([*docs, rng.randrange(world.num_docs)]))
    idx = {d: i for i, d in enumerate(docs)}
    seqs = []
    for q in qs:
        text = world.document(q.gold[0]).text
        if distractors >= 0:
            text = reading_excerpt(text, q.answer, rng.randint(0, distractors), rng)
        seqs.append(question_sequences(tok, q, [q.gold[0]], [text], [idx[q.gold[0]]],
                                       span=model.config.routing_span)[-1])
    mem = [P.document_ids(tok, d, world.document(d).text)[:256] for d in docs]
    return collate(tok, mem, seqs)


def first_answer_positions(batch: Batch) -> torch.Tensor:
    """(S,) the position whose label is the answer's first token, in each (final-round) sequence."""
    assert batch.answer is not None
    return batch.answer.float().argmax(1)


def first_token_only(batch: Batch) -> Batch:
    """The batch with every label but the answer's first token removed."""
    at = first_answer_positions(batch)
    rows = torch.arange(batch.labels.shape[0])
    labels = torch.full_like(batch.labels, -100)
    labels[rows, at] = batch.labels[rows, at]
    return dataclasses.replace(batch, labels=labels)


def first_token_accuracy(model: MSAModel, batch: Batch) -> float:
    with torch.no_grad():
        logits = forward(model, batch, force_positive=True, want_logits=True).logits
    at = first_answer_positions(batch)
    rows = torch.arange(batch.labels.shape[0])
    return float((logits[rows, at].argmax(-1) == batch.labels[rows, at]).float().mean())


def run(model: MSAModel, *, types: Sequence[str], distractors: int, steps: int, lr: float, loss: str = "all",
        answer_weight: float = 20.0, every: int = 25, seed: int = 1, log: Any = print) -> list[dict[str, float]]:
    if loss not in ("all", "first", "answer"):
        raise ValueError(f"loss must be all, first or answer, got {loss!r}")
    held_rng = random.Random(seed + 98)
    whole = [final_round_batch(model, held_rng, World(seed=424_242 + i, num_docs=1500), types, -1) for i in range(2)]
    cut = [final_round_batch(model, held_rng, World(seed=525_252 + i, num_docs=1500), types, distractors)
           for i in range(2)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    rng = random.Random(seed)
    rows: list[dict[str, float]] = []
    t0 = time.time()
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            model.eval()
            row = {"step": step, "whole": sum(first_token_accuracy(model, b) for b in whole) / len(whole),
                   "cut": sum(first_token_accuracy(model, b) for b in cut) / len(cut), "time_s": time.time() - t0}
            rows.append(row)
            log(f"step {step}: held-out first-token accuracy, whole documents {row['whole']:.2f}, "
                f"training-style documents {row['cut']:.2f} ({row['time_s']:.0f} s)")
        if step == steps:
            break
        model.train()
        b = final_round_batch(model, rng, World(seed=7_000_000 + seed * 100_000 + step, num_docs=1500), types,
                              distractors)
        if loss == "first":
            b = first_token_only(b)
        out = forward(model, b, force_positive=True, answer_weight=answer_weight if loss == "answer" else 1.0)
        opt.zero_grad()
        out.lm_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="checkpoint directory, or 'tiny' for a fresh 4-layer d64 model")
    ap.add_argument("--types", default="color", help="answer types, e.g. color,job,employer,birthplace")
    ap.add_argument("--distractors", type=int, default=0)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--loss", default="all", choices=("all", "first", "answer"))
    ap.add_argument("--answer-weight", type=float, default=20.0)
    ap.add_argument("--every", type=int, default=25)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    if a.model == "tiny":
        from msabank.train import default_model_path
        from msabank.train.loop import default_model_config, new_model

        tok = P.Tokenizer.from_file(default_model_path() / "tokenizer.json")
        model = new_model(default_model_config(tok.vocab_size, layers=4, hidden=64, heads=4, kv_heads=2,
                                               head_dim=16, intermediate=128, router_layers=(2, 3)), tok)
    else:
        from msabank.model import load_model

        model = load_model(a.model, device="cpu", dtype=torch.float32)
    run(model, types=tuple(a.types.split(",")), distractors=a.distractors, steps=a.steps, lr=a.lr, loss=a.loss,
        answer_weight=a.answer_weight, every=a.every)


if __name__ == "__main__":
    main()
