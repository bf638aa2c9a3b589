"""Training samples for every interleave step (MSA_SPEC §6), over a shared memory per step.

For a question with gold documents g1 (, g2) numbered n1 (, n2):
- round 1: question prompt (§2.2) -> target `[n1]<|object_ref_end|>`; routes to g1.
- two-hop round 2: transcript + `[n1]. text1\\n<|object_ref_end|>` (regenerate layout, §6.4)
  -> target `[n2]<|object_ref_end|>`; routes to g2.
- last round: transcript with the last documents appended -> target `<End-of-Retrieve>`, then the engine's
  hand-off `<|im_start|>The user's question is: {q}\\n<|object_ref_end|>` (no loss), then the target
  `The answer to the question is: {answer}<|im_end|>`; routes to the last gold document.

Document numbers are re-drawn every step (TRAINING_NOTES lesson 3) so the model copies them from memory,
with the digit lengths a bank of that size has (`draw_numbers`).

Routing span (`span`): "official" routes on the whole question block (MSA_SPEC §2.2, §6.4), as served;
"question" routes on the question's own tokens only. At the first router layer nothing has seen memory, so
the block's ~20 fixed tokens have one hidden state for every question; with max over routing tokens they
win and the question tokens get no gradient (the plateau, TRAINING_NOTES). The warm-up trains on the
question span, the rest of the run on the official one.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from msabank import prompt as P
from msabank.synth import Question, World
from msabank.train.core import Batch


@dataclass(frozen=True)
class Seq:
    ids: list[int]
    routing: list[bool]
    labels: list[int]  # aligned: labels[t] is the token to predict at position t (-100 none)
    positive: int  # memory index, -1 none
    stage: int = 0  # 0 round 1 (question only routes), 1 a later hop, 2 the final round (answer)
    kind: int = -1  # index into KINDS of the question's type (-1 unknown): per-kind training metrics
    answer: tuple[bool, ...] = ()  # aligned with labels: True where the label is a token of the answer itself


def _with_targets(prefix: P.Prompt, pieces: Sequence[tuple[list[int], bool]], positive: int, stage: int,
                  answer_span: tuple[int, int] | None = None) -> Seq:
    """prefix (no loss), then pieces (ids, has_loss). Labels shift by one: position t predicts ids[t+1].
    `answer_span` (start, end) in ids marks the answer's own tokens (Seq.answer)."""
    ids = list(prefix.ids)
    routing = list(prefix.routing_mask)
    loss_on = [False] * len(ids)
    for piece, has_loss in pieces:
        ids += piece
        routing += [False] * len(piece)
        loss_on += [has_loss] * len(piece)
    labels = [-100] * len(ids)
    answer = [False] * len(ids)
    for t in range(len(ids) - 1):
        if loss_on[t + 1]:
            labels[t] = ids[t + 1]
            answer[t] = answer_span is not None and answer_span[0] <= t + 1 < answer_span[1]
    return Seq(ids, routing, labels, positive, stage, answer=tuple(answer))


SPANS = P.ROUTING_SPANS
KINDS = ("single", "twohop", "needle")


def question_sequences(tok: P.Tokenizer, q: Question, numbers: Sequence[int], texts: Sequence[str],
                       mem_index: Sequence[int], *, span: str = "official") -> list[Seq]:
    """The interleave steps of one question. numbers/texts/mem_index: per gold document, in hop order.

    Routing masks come from the functions msabank.interleave serves with (`P.question_prompt`,
    `P.later_round_question_mask`, `P.round_routing_mask`), so trainer and engine route on the same tokens."""
    if span not in SPANS:
        raise ValueError(f"span must be one of {SPANS}, got {span!r}")
    ore = [tok.object_ref_end_id]
    first = P.question_prompt(tok, q.question, span=span)
    later = P.later_round_question_mask(tok, first)
    transcript = list(first.ids)
    out: list[Seq] = []
    current = first
    for hop in range(len(numbers)):
        target = tok.encode(f"[{numbers[hop]}]") + ore
        out.append(_with_targets(current, [(target, True)], mem_index[hop], min(hop, 1)))
        transcript += target
        start = len(transcript)
        transcript += P.injection_ids(tok, [(numbers[hop], texts[hop])])
        current = P.Prompt(list(transcript), P.round_routing_mask(later, len(transcript), (start, len(transcript) - 1)))
    end = tok.encode(P.END_OF_RETRIEVE)
    answer = tok.encode(f"{P.ANSWER_PREFIX} {q.answer}") + [tok.im_end_id]
    restated = P.restatement_ids(tok, q.question)
    lead = _common_prefix(answer, tok.encode(P.ANSWER_PREFIX))  # the fixed "The answer to the question is:"
    at = len(current.ids) + len(end) + len(restated)
    out.append(_with_targets(current, [(end, True), (restated, False), (answer, True)], mem_index[-1], 2,
                             answer_span=(at + lead, at + len(answer) - 1)))  # the answer, not <|im_end|>
    base = q.type.split(":")[0]
    kind = KINDS.index(base) if base in KINDS else -1
    return [Seq(s.ids, s.routing, s.labels, s.positive, s.stage, kind, s.answer) for s in out]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def draw_numbers(rng: random.Random, count: int, *, min_bank: int = 200, max_bank: int = 150_000) -> list[int]:
    """`count` distinct document numbers as a bank would have them: a bank numbers its documents 0..N-1 in
    ingest order, so draw a bank size N log-uniformly in [min_bank, max_bank] (16K to ~12M tokens of this
    corpus) and sample from range(N). A 1M-token bank (~12K documents) then has 83% 4-digit numbers, as
    served; uniform digit lengths (the old draw) gave 4-digit numbers a sixth of the time."""
    lo = max(min_bank, count)
    n = int(math.exp(rng.uniform(math.log(lo), math.log(max(lo, max_bank)))))
    return rng.sample(range(max(n, count)), count)


def make_batch(tok: P.Tokenizer, world: World, rng: random.Random, *, questions: int, memory: int,
               kinds: Sequence[str] = ("single", "single", "twohop", "twohop", "needle"),
               max_doc_tokens: int = 256, renumber: bool = True, span: str = "official",
               drawn: list[Question] | None = None, reading_distractors: int = -1) -> Batch:
    """One step: `questions` questions over a memory of `memory` documents (their gold ones inside).
    `drawn`, when given, receives the questions in sequence order (diagnostics: msabank.train.probe).
    `reading_distractors` ≥ 0: the final round's appended document is cut to its answer sentence(s) plus
    0..reading_distractors of its other sentences, in document order (`reading_excerpt`); memory and the
    earlier rounds keep the whole document. A reading curriculum: docs/eval.md (sweeps c9/r1) found the
    model finds a number in the appended text but never a word, so the answer's sentence is made easy to
    find first. -1: the whole document, as served.

    With a small world (1-2K documents) the memory holds a large share of it, so the documents a gold one
    names (its town, employer, founder) and those naming it are often in memory too: hard negatives."""
    qs: list[Question] = []
    while len(qs) < questions:
        want = kinds[rng.randrange(len(kinds))]
        n = rng.randrange(world.num_docs)
        if (want == "needle") != world.is_needle(n):
            continue
        q = world.question(n, rng, two_hop=want == "twohop")
        if q is not None:
            qs.append(q)
    if drawn is not None:
        drawn.extend(qs)
    mem_docs: dict[int, int] = {}  # world doc -> memory index
    for q in qs:
        for g in q.gold:
            mem_docs.setdefault(g, len(mem_docs))
    while len(mem_docs) < max(memory, len(mem_docs)) and len(mem_docs) < world.num_docs:
        mem_docs.setdefault(rng.randrange(world.num_docs), len(mem_docs))
    order = list(mem_docs)
    numbers = draw_numbers(rng, len(order)) if renumber else order
    num_of = dict(zip(order, numbers))
    texts = {d: world.document(d).text for d in order}
    mem = [P.document_ids(tok, num_of[d], texts[d])[:max_doc_tokens] for d in order]
    seqs: list[Seq] = []
    for q in qs:
        injected = [texts[g] for g in q.gold]
        if reading_distractors >= 0:
            injected[-1] = reading_excerpt(injected[-1], q.answer, rng.randint(0, reading_distractors), rng)
        seqs += question_sequences(tok, q, [num_of[g] for g in q.gold], injected,
                                   [mem_docs[g] for g in q.gold], span=span)
    return collate(tok, mem, seqs)


def reading_excerpt(text: str, answer: str, distractors: int, rng: random.Random) -> str:
    """The sentences of `text` that contain `answer`, plus `distractors` of its other sentences drawn at
    random, in the document's order. Synthetic documents are sentences ending in '.' joined by one space
    (msabank.synth); a text without the answer is returned whole."""
    sents = re.split(r"(?<=\.) ", text)
    keep = [i for i, x in enumerate(sents) if answer in x]
    if not keep:
        return text
    others = [i for i in range(len(sents)) if i not in keep]
    keep += rng.sample(others, min(distractors, len(others)))
    return " ".join(sents[i] for i in sorted(keep))


def collate(tok: P.Tokenizer, mem: Sequence[Sequence[int]], seqs: Sequence[Seq]) -> Batch:
    ld = max(len(x) for x in mem)
    mem_ids = torch.zeros(len(mem), ld, dtype=torch.long)
    for i, x in enumerate(mem):
        mem_ids[i, : len(x)] = torch.tensor(x)
    t = max(len(s.ids) for s in seqs)
    seq_ids = torch.zeros(len(seqs), t, dtype=torch.long)
    routing = torch.zeros(len(seqs), t, dtype=torch.bool)
    labels = torch.full((len(seqs), t), -100, dtype=torch.long)
    answer = torch.zeros(len(seqs), t, dtype=torch.bool)
    for i, s in enumerate(seqs):
        seq_ids[i, : len(s.ids)] = torch.tensor(s.ids)
        routing[i, : len(s.ids)] = torch.tensor(s.routing)
        labels[i, : len(s.ids)] = torch.tensor(s.labels)
        if s.answer:
            answer[i, : len(s.ids)] = torch.tensor(s.answer)
    return Batch(
        mem_ids=mem_ids, mem_len=torch.tensor([len(x) for x in mem]), seq_ids=seq_ids,
        seq_len=torch.tensor([len(s.ids) for s in seqs]), routing=routing, labels=labels,
        positive=torch.tensor([s.positive for s in seqs]),
        template=torch.tensor(P.template_parts(tok).head), stage=torch.tensor([s.stage for s in seqs]),
        kind=torch.tensor([s.kind for s in seqs]), answer=answer,
    )  # fmt: skip


class StepStream(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """Endless batches from training worlds; each DataLoader worker draws from its own seeds."""

    def __init__(self, tokenizer_json: bytes, *, seed: int, world_docs: int, questions: int, memory: int,
                 kinds: Sequence[str] = ("single", "single", "twohop", "twohop", "needle"), span: str = "official",
                 world_every: int = 50, reading_distractors: int = -1) -> None:
        self.tokenizer_json, self.seed, self.world_docs = tokenizer_json, seed, world_docs
        self.reading_distractors = reading_distractors
        self.questions, self.memory, self.kinds = questions, memory, tuple(kinds)
        self.span, self.world_every = span, max(1, world_every)

    def __iter__(self) -> Iterator[Batch]:
        from tokenizers import Tokenizer as HF

        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        tok = P.Tokenizer(HF.from_str(self.tokenizer_json.decode()))
        rng = random.Random(self.seed * 1000 + wid)
        step = 0
        while True:
            # a fresh world every `world_every` steps: names, attributes and layouts keep changing
            world = World(seed=(self.seed * 100 + wid) * 1_000_000 + step // self.world_every, num_docs=self.world_docs)
            yield make_batch(tok, world, rng, questions=self.questions, memory=self.memory, kinds=self.kinds,
                             span=self.span, reading_distractors=self.reading_distractors)
            step += 1
