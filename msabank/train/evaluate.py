"""`msabank eval`: answer exact match, per-layer routing recall@k and needle retrieval, with and without
memory interleave, versus bank size, on synthetic worlds whose seeds were never used in training.

The evaluator serves questions exactly as `Engine.ask_batch` does: stage 1 (`stages.encode_documents`)
over every document of the world into an in-process `InMemoryMemory`, then `msabank.interleave.run` with
greedy decoding (batched `stages.generate`, KV cache). Only the bank differs: in memory, with the world's
documents numbered by their index. "Without interleave" forces the hand-off after one retrieval round.
Training worlds use seeds below 10**8 (msabank.train.data); evaluation uses EVAL_SEED_BASE and above.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

from msabank import interleave, stages
from msabank.interleave import Answer, Limits
from msabank.model import MSAModel
from msabank.synth import Question, World

log = logging.getLogger(__name__)

EVAL_SEED_BASE = 900_000_000


class WorldDocuments:
    """`interleave.Documents` over a synthetic world: document n is number n."""

    def __init__(self, world: World) -> None:
        self.world = world

    def __len__(self) -> int:
        return self.world.num_docs

    def user_ids(self, numbers: Sequence[int]) -> dict[int, str]:
        return {n: self.world.document(n).id for n in numbers}

    def texts(self, numbers: Sequence[int]) -> dict[int, tuple[str, str]]:
        return {n: (self.world.document(n).id, self.world.document(n).text) for n in numbers
                if 0 <= n < self.world.num_docs}


def build_bank(model: MSAModel, world: World) -> tuple[stages.InMemoryMemory, int]:
    """Stage 1 over every document of `world` (number = index). Returns the memory and its token count."""
    encoded = stages.encode_documents(model, [(n, world.document(n).text) for n in range(world.num_docs)])
    memory = stages.InMemoryMemory(dict(enumerate(encoded)), model.config.top_k, device=model.device)
    return memory, sum(e.n_tokens for e in encoded)


def run_protocol(model: MSAModel, memory: stages.InMemoryMemory, world: World, questions: Sequence[Question], *,
                 interleave_rounds: bool = True, max_rounds: int = 4, batch: int = 32, max_new: int = 40
                 ) -> list[Answer]:
    """The questions through `msabank.interleave.run`, `batch` at a time; answers in question order."""
    template = stages.template_prefix(model)
    docs = WorldDocuments(world)
    limits = Limits(max_rounds=max_rounds, max_new_tokens=max_new)
    out: list[Answer] = []
    for b0 in range(0, len(questions), batch):
        group = [q.question for q in questions[b0 : b0 + batch]]
        out += interleave.run(model, memory, docs, group, limits=limits, template=template,
                              handoff_after=None if interleave_rounds else 1)
    return out


def first_round_selection(answer: Answer, router_layers: Sequence[int], k: int) -> list[list[int]]:
    """Per router layer, the numbers its top-k selected in round 0, best first (ties: lower number)."""
    if not answer.rounds:
        return [[] for _ in router_layers]
    hits = answer.rounds[0].documents
    return [[h.number for h in sorted((h for h in hits if layer in h.layers), key=lambda h: (-h.layers[layer], h.number))][:k]
            for layer in router_layers]


def score(answers: Sequence[Answer], questions: Sequence[Question], router_layers: Sequence[int], k: int
          ) -> dict[str, Any]:
    """Exact match per question type, first-round routing recall@k per layer, document-number accuracy."""
    out: dict[str, Any] = {}
    named = [[r.requested for r in a.rounds if r.ended == "named"] for a in answers]
    correct = [a.answer.strip() == q.answer for a, q in zip(answers, questions, strict=True)]
    by: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by.setdefault(q.type.split(":")[0], []).append(i)
    for kind, idx in sorted(by.items()):
        out[f"{kind}_em"] = sum(correct[i] for i in idx) / len(idx)
        out[f"{kind}_n"] = len(idx)
        out[f"{kind}_first_id"] = sum(bool(named[i]) and questions[i].gold[0] in named[i][0] for i in idx) / len(idx)
        if kind == "twohop":
            out[f"{kind}_second_id"] = sum(len(named[i]) > 1 and questions[i].gold[1] in named[i][1]
                                           for i in idx) / len(idx)
    selected = [first_round_selection(a, router_layers, k) for a in answers]
    out["recall_at_k_per_layer"] = [
        round(sum(q.gold[0] in s[layer] for q, s in zip(questions, selected)) / len(questions), 4)
        for layer in range(len(router_layers))] if questions else []
    out["no_answer"] = sum(a.outcome != "answer" for a in answers) / max(1, len(answers))
    out["em_all"] = sum(correct) / max(1, len(answers))
    return out


def evaluate(model: MSAModel, *, tokens: int, seed: int = EVAL_SEED_BASE, questions: int = 300,
             interleave: Sequence[bool] = (True, False), batch: int = 32, mean_doc_tokens: float = 85.0
             ) -> dict[str, Any]:
    """Build a bank of about `tokens` tokens from world `seed` and run the protocol on `questions`."""
    world = World(seed=seed, num_docs=max(16, int(tokens / mean_doc_tokens)))
    t0 = time.time()
    memory, total = build_bank(model, world)
    t_bank = time.time() - t0
    qs = world.questions(questions)
    res: dict[str, Any] = {"seed": seed, "documents": world.num_docs, "tokens": total, "encode_s": round(t_bank, 2),
                           "top_k": model.config.top_k}
    for inter in interleave:
        t0 = time.time()
        answers = run_protocol(model, memory, world, qs, interleave_rounds=inter, batch=batch)
        sc = score(answers, qs, model.config.router_layers, model.config.top_k)
        sc["time_s"] = round(time.time() - t0, 1)
        res["interleave" if inter else "no_interleave"] = sc
        log.info("eval tokens=%d interleave=%s %s", total, inter, sc)
    return res
