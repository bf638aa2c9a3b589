"""Teach (and measure) reading an answer out of the appended document: a staged reading phase.

    python -m msabank.train.reading MODEL_DIR|tiny|new --stage color:0:300 --stage color,job,river,product:0:600 \
        [--advance-at 0.9] [--loss first] [--device cuda] [--out DIR [--budget S]]

Trains on final-round samples only (`question_sequences(...)[-1]`: question, `[n]`, the appended document,
`<End-of-Retrieve>`, restatement, answer) of single-hop questions, through the training forward
(`core.forward`, the gold document forced into memory, LM loss only), `--questions` questions over
`--memory` memory documents per step, AdamW. Each `--stage TYPES:DISTRACTORS:MAX_STEPS` draws questions whose
answer type is in TYPES; DISTRACTORS cuts the appended document to the answer sentence plus up to that many
others (`reading_excerpt`; -1 = the whole document, as served). A stage ends after MAX_STEPS, or earlier
once its held-out accuracy on training-style documents reaches `--advance-at` (measured every `--every`
steps). `--loss`: `all` (every final-round target, as the trainer), `first` (the answer's first token
only), `answer` (all targets, the answer's own tokens ×`--answer-weight`).

Every `--every` steps: held-out first-answer-token accuracy on whole documents for every answer type in
`--report-types` (the probe's `first` column, the number that says whether the model reads) and on the
stage's training-style documents. Why staged: on the CPU the shipped model learned to copy a colour word
within 100-175 steps with first-token loss and one sentence, and did not move in 300 steps with four
answer types including names (docs/eval.md); the GPU's thousands of steps go to adding types one group at
a time. `--out DIR`: the log (DIR/reading_log.jsonl), a resumable state (DIR/resume.pt, written every
`--save-every` seconds and when `--budget` seconds are spent; a rerun with the same arguments continues
it), the latest weights as a checkpoint (DIR/ckpt, on every stop; its training.json says how far) and,
once every stage is done, the probe (DIR/probe.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from msabank import prompt as P
from msabank.model import MSAModel
from msabank.synth import World
from msabank.train.core import Batch, forward
from msabank.train.data import collate, question_sequences, reading_excerpt

WORD_TYPES = ("color", "job", "river", "product")  # common words, most one token
NAME_TYPES = ("birthplace", "employer", "hq", "founder", "mayor")  # invented names, 3-5 tokens
NUMBER_TYPES = ("birth_year", "founded", "population")
ANSWER_TYPES = WORD_TYPES + NAME_TYPES + NUMBER_TYPES


@dataclasses.dataclass(frozen=True)
class Stage:
    types: tuple[str, ...]
    distractors: int
    max_steps: int

    @staticmethod
    def parse(spec: str) -> "Stage":
        """`TYPES:DISTRACTORS:MAX_STEPS`, TYPES comma-separated (`words`, `names`, `numbers`, `all` expand)."""
        try:
            types_s, d, n = spec.split(":")
            distractors, max_steps = int(d), int(n)
        except ValueError:
            raise ValueError(f"--stage takes TYPES:DISTRACTORS:MAX_STEPS, got {spec!r}") from None
        groups = {"words": WORD_TYPES, "names": NAME_TYPES, "numbers": NUMBER_TYPES, "all": ANSWER_TYPES}
        types: list[str] = []
        for t in types_s.split(","):
            types += groups.get(t, (t,))
        bad = [t for t in types if t not in ANSWER_TYPES]
        if bad or not types:
            raise ValueError(f"--stage {spec!r}: unknown answer type(s) {bad}; known: {', '.join(ANSWER_TYPES)}")
        if distractors < -1 or max_steps < 0:
            raise ValueError(f"--stage {spec!r}: DISTRACTORS must be >= -1 and MAX_STEPS >= 0")
        return Stage(tuple(dict.fromkeys(types)), distractors, max_steps)


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


def _amp(model: MSAModel) -> Any:
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=model.device.type == "cuda")


def first_token_accuracy(model: MSAModel, batch: Batch) -> float:
    batch = batch.to(model.device)
    with torch.no_grad(), _amp(model):
        logits = forward(model, batch, force_positive=True, want_logits=True).logits
    at = first_answer_positions(batch).to(logits.device)
    rows = torch.arange(batch.labels.shape[0], device=logits.device)
    return float((logits[rows, at].argmax(-1) == batch.labels[rows, at]).float().mean())


class HeldOut:
    """Fixed held-out batches (worlds no training step uses): whole documents per reported answer type,
    and training-style (cut) documents per stage."""

    def __init__(self, model: MSAModel, report_types: Sequence[str], *, questions: int, memory: int, seed: int):
        self.model, self.questions, self.memory, self.seed = model, questions, memory, seed
        rng = random.Random(seed + 98)
        self.whole = {t: final_round_batch(model, rng, World(seed=424_242 + i, num_docs=1500), (t,), -1,
                                           questions=questions, memory=memory)
                      for i, t in enumerate(report_types)}
        self._cut: dict[Stage, Batch] = {}

    def cut(self, stage: Stage) -> Batch:
        if stage not in self._cut:
            self._cut[stage] = final_round_batch(self.model, random.Random(self.seed + 99), World(seed=525_252, num_docs=1500),
                                                 stage.types, stage.distractors, questions=self.questions,
                                                 memory=self.memory)
        return self._cut[stage]

    def row(self, stage: Stage) -> dict[str, Any]:
        per_type = {t: first_token_accuracy(self.model, b) for t, b in self.whole.items()}
        return {"cut": first_token_accuracy(self.model, self.cut(stage)), "whole": per_type,
                "whole_mean": sum(per_type.values()) / max(1, len(per_type))}


def run(model: MSAModel, stages: Sequence[Stage], *, lr: float, loss: str = "first", answer_weight: float = 20.0,
        advance_at: float | None = None, questions: int = 16, memory: int = 16, every: int = 25, seed: int = 1,
        report_types: Sequence[str] = ("color",), out: str | Path | None = None, budget_s: float | None = None,
        save_every_s: float = 120.0, stop_after: int | None = None, probe_worlds: int = 6,
        log: Any = print) -> list[dict[str, Any]]:
    """The staged reading phase (module docstring). Returns the log rows; with `out`, resumes from and
    writes out/resume.pt, and writes out/ckpt + out/probe.json when the last stage ends. `budget_s` (seconds)
    and `stop_after` (training steps of this call) stop early, saving the state a rerun continues from."""
    if loss not in ("all", "first", "answer"):
        raise ValueError(f"loss must be all, first or answer, got {loss!r}")
    if not stages:
        raise ValueError("at least one stage")
    dev = model.device
    held = HeldOut(model, report_types, questions=questions, memory=memory, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    out_dir = Path(out) if out is not None else None
    state = {"stage": 0, "stage_step": 0, "step": 0, "done": False}
    rows: list[dict[str, Any]] = []
    resume = out_dir / "resume.pt" if out_dir is not None else None
    if resume is not None and resume.exists():
        saved = torch.load(resume, map_location=dev, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        log(f"resumed at stage {state['stage']} step {state['stage_step']} (global step {state['step']})")
    log_fh = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_fh = (out_dir / "reading_log.jsonl").open("a")

    def save_state() -> None:
        if resume is not None:
            tmp = resume.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state}, tmp)
            tmp.replace(resume)  # data first, pointer last: a killed save leaves the previous state

    t0 = last_save = time.time()
    first_step = state["step"]
    while not state["done"]:
        stage = stages[state["stage"]]
        if (budget_s is not None and time.time() - t0 >= budget_s) or (
                stop_after is not None and state["step"] - first_step >= stop_after):
            save_state()
            _save_checkpoint(model, out_dir, stages, state, loss, lr)
            log(f"budget spent at stage {state['stage']} step {state['stage_step']}; rerun to continue")
            return rows
        at_end = state["stage_step"] >= stage.max_steps
        if state["stage_step"] % every == 0 or at_end:
            model.eval()
            row = {"step": state["step"], "stage": state["stage"], "stage_step": state["stage_step"],
                   **held.row(stage), "time_s": round(time.time() - t0, 1)}
            rows.append(row)
            if log_fh is not None:
                log_fh.write(json.dumps(row) + "\n")
                log_fh.flush()
            words = " ".join(f"{t} {a:.2f}" for t, a in row["whole"].items())
            log(f"step {row['step']} (stage {row['stage']} step {row['stage_step']}): held-out first-token accuracy, "
                f"training-style {row['cut']:.2f}, whole documents {row['whole_mean']:.2f} [{words}] "
                f"({row['time_s']:.0f} s)")
            if at_end or (advance_at is not None and state["stage_step"] > 0 and row["cut"] >= advance_at):
                state["stage"] += 1
                state["stage_step"] = 0
                if state["stage"] == len(stages):
                    state["done"] = True
                continue
        if time.time() - last_save >= save_every_s:
            save_state()
            last_save = time.time()
        model.train()
        step = state["step"]
        rng = random.Random(seed * 1_000_003 + step)  # per step: a resumed run draws what it would have drawn
        b = final_round_batch(model, rng, World(seed=7_000_000 + seed * 100_000 + step, num_docs=1500), stage.types,
                              stage.distractors, questions=questions, memory=memory)
        if loss == "first":
            b = first_token_only(b)
        for g in opt.param_groups:  # 50-step linear ramp at the start of the run
            g["lr"] = lr * min(1.0, (step + 1) / 50)
        with _amp(model):
            o = forward(model, b.to(dev), force_positive=True, answer_weight=answer_weight if loss == "answer" else 1.0)
        opt.zero_grad()
        o.lm_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state["step"] += 1
        state["stage_step"] += 1
    save_state()
    _save_checkpoint(model, out_dir, stages, state, loss, lr)
    if out_dir is not None:
        from msabank.train.probe import probe

        (out_dir / "probe.json").write_text(json.dumps(probe(model, worlds=probe_worlds), indent=1))
    return rows


def _save_checkpoint(model: MSAModel, out_dir: Path | None, stages: Sequence[Stage], state: dict[str, Any],
                     loss: str, lr: float) -> None:
    """out_dir/ckpt: the latest weights as a loadable checkpoint (bf16; training.json says how far it got)."""
    if out_dir is None:
        return
    from msabank.train.loop import save

    save(model, model.tokenizer, out_dir / "ckpt", extra={"reading_stages": [dataclasses.asdict(s) for s in stages],
                                                          **state, "loss": loss, "lr": lr})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="checkpoint directory, 'tiny' (a fresh 4-layer d64 model) or 'new' (a fresh "
                                  "model of the embedded default's size)")
    ap.add_argument("--stage", action="append", default=[], help="TYPES:DISTRACTORS:MAX_STEPS (repeat, in order)")
    ap.add_argument("--advance-at", type=float, default=0.0,
                    help="end a stage early once its held-out training-style accuracy reaches this (0: never)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--loss", default="first", choices=("all", "first", "answer"))
    ap.add_argument("--answer-weight", type=float, default=20.0)
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--memory", type=int, default=16)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--report-types", default="color", help="answer types whose whole-document accuracy is logged "
                                                             "(words, names, numbers, all expand)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget", type=float, default=None, help="seconds; with --out, save and stop (rerun resumes)")
    ap.add_argument("--stop-after", type=int, default=None, help="training steps of this call; then as --budget")
    a = ap.parse_args(argv)
    try:
        stages = [Stage.parse(s) for s in (a.stage or ["color:0:200"])]
        report = Stage.parse(f"{a.report_types}:0:0").types
    except ValueError as e:
        raise SystemExit(str(e)) from None
    torch.manual_seed(a.seed)
    from msabank.train import default_model_path
    from msabank.train.loop import default_model_config, new_model

    if a.model in ("tiny", "new"):
        tok = P.Tokenizer.from_file(default_model_path() / "tokenizer.json")
        cfg = (default_model_config(tok.vocab_size, layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16,
                                    intermediate=128, router_layers=(2, 3)) if a.model == "tiny"
               else default_model_config(tok.vocab_size))
        model = new_model(cfg, tok, seed=a.seed).to(a.device)
    else:
        from msabank.model import load_model

        model = load_model(a.model, device=a.device, dtype=torch.float32)
    run(model, stages, lr=a.lr, loss=a.loss, answer_weight=a.answer_weight,
        advance_at=a.advance_at if a.advance_at > 0 else None, questions=a.questions, memory=a.memory,
        every=a.every, seed=a.seed, report_types=report, out=a.out, budget_s=a.budget, stop_after=a.stop_after)


if __name__ == "__main__":
    main()
