"""Memory interleave (MSA_SPEC §6): the multi-hop question loop, once, for a batch of questions.

Each round routes once at prefill over the question plus the documents appended in the previous round,
then decodes. The model names documents `[n]…<|object_ref_end|>`; their original text is appended as
`[n]. text\\n…<|object_ref_end|>` and the next round routes again. `<End-of-Retrieve>` hands off: the
question is restated and the answer decoded with the same document selection (no re-routing). The loop
is bounded (rounds, new tokens per round, transcript tokens) and says when it ends without an answer.

Questions of a batch run their rounds together through one batched `stages.generate` (KV cache) per
round; a question that finishes drops out of the batch. `Engine.ask`/`ask_batch`, the evaluator and the
demo all come here. This module knows nothing of banks or files: it reads memory through a `MemoryView`
and document text through `Documents`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from msabank import prompt as P
from msabank import stages
from msabank.model import MSAModel
from msabank.types import MemoryView, Routed

_NUMBER_RE = re.compile(r"\[(\d+)\]")

OnTokens = Callable[[int, int, list[int]], None]
"""on_tokens(question, round, token_ids): a question's new tokens as they are decoded (once per decode block)."""

NO_ANSWER_REASONS = {
    "empty_bank": "the bank holds no documents, so there is nothing to answer from",
    "round_limit": "the model was still retrieving documents after {max_rounds} rounds",
    "token_budget": "the model ran out of tokens ({max_new_tokens} per round, {token_budget} per transcript) "
                    "before it answered",
    "empty_answer": "the model ended without an answer",
}
"""`Answer.finish` (or "empty_answer") → the sentence `Answer.no_answer_reason` carries."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds of one question's loop (the official loop has none)."""

    max_rounds: int = 4
    """Retrieval rounds at most; after round `max_rounds` the loop gives up ("round_limit")."""
    max_new_tokens: int = 128
    """Tokens generated per round (and for the answer) at most."""
    token_budget: int = 8192
    """Transcript tokens (prompt, generations, appended documents) at most."""


@dataclass(frozen=True, slots=True)
class Sampling:
    """How tokens are chosen: greedy at temperature 0."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


class Documents(Protocol):
    """What the loop needs besides the memory: document names and texts, by number."""

    def __len__(self) -> int:
        """Live documents (0: nothing to route to)."""
        ...

    def user_ids(self, numbers: Sequence[int]) -> dict[int, str]:
        """User id of each routed number."""
        ...

    def texts(self, numbers: Sequence[int]) -> dict[int, tuple[str, str]]:
        """number → (user id, text) of the live documents among `numbers` (the model may name numbers
        that never existed or were deleted: those are left out)."""
        ...


# ---------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class Hit:
    """One retrieved document: its ids and its scores in the router layers that selected it."""

    id: str
    """The user's document id."""
    number: int
    """The permanent document number `[n]`."""
    score: float
    """Best score over the layers that selected it."""
    layers: dict[int, float]
    """Router layer (model layer index) → score, for the layers whose top-k included it."""


@dataclass(frozen=True, slots=True)
class Round:
    """One interleave round: routing over the transcript, then what the model generated."""

    index: int
    """0 for the question alone, then one per injection."""
    documents: list[Hit]
    """Documents routed to in this round (union over router layers), best first."""
    generated: str
    """Text the model generated in this round (special tokens kept; with the hand-off and answer when the
    round ended in one)."""
    tokens: list[int]
    """The token ids generated in this round (before any hand-off text)."""
    requested: list[int]
    """Document numbers the model named `[n]` at the end of the round (empty in the final round)."""
    injected: list[str]
    """User ids of the documents whose text was appended after this round."""
    seconds: float
    """Wall time of the round (of the whole batch's round when questions ran together)."""
    ended: str = ""
    """How the round ended: "named" (the model named documents), "handoff" (the answer was decoded in this
    round), "eos" (the model stopped outside the protocol) or "length" (it ran out of tokens)."""


@dataclass(frozen=True, slots=True)
class Answer:
    """The result of one question (`Engine.ask`, one element of `Engine.ask_batch`)."""

    question: str
    answer: str
    """The text after `The answer to the question is:` (or the final text when the model skipped it);
    empty when there is no answer (`outcome`)."""
    rounds: list[Round]
    finish: str
    """"answer" (the model handed off and answered), "eos" (it stopped outside the protocol; what it said
    is the answer), "round_limit", "token_budget" or "empty_bank"."""
    transcript: str
    """The whole transcript as the model saw it, special tokens kept."""
    timings: dict[str, float]
    """Seconds: refresh (index catch-up), route (scoring + top-k), fetch (content K/V to the device),
    prefill (the prompt forward, excluding route and fetch), decode, total; summed over rounds (over the
    whole batch for `ask_batch`)."""
    outcome: str = "answer"
    """"answer" or "no_answer": the loop ended at a limit, on an empty bank, or the model said nothing.
    A "no_answer" never carries generated text in `answer` (the attempt stays in `rounds`/`transcript`)."""
    no_answer_reason: str | None = None
    """Why there is no answer, as a sentence (None when there is one)."""
    damaged: list[str] = field(default_factory=list)
    """Damaged documents of the bank that were left out (one problem each, naming the document): the
    answer comes from the rest of the bank. Empty for a bank that verifies."""

    @property
    def evidence(self) -> list[Hit]:
        """Every document that was injected as text, in order (the hops the model took)."""
        seen: dict[str, Hit] = {}
        for r in self.rounds:
            for uid in r.injected:
                for h in r.documents:
                    if h.id == uid:
                        seen.setdefault(uid, h)
                seen.setdefault(uid, Hit(uid, -1, float("nan"), {}))
        return list(seen.values())


# ---------------------------------------------------------------------------------------------------
# The loop


@dataclass
class _Question:
    text: str
    transcript: list[int]
    question_mask: list[bool]  # round 1
    later_mask: list[bool]  # rounds after the first: the block without its final newline (spec §6.4)
    latest: tuple[int, int] | None = None  # token span of the documents appended in the latest round
    rounds: list[Round] = field(default_factory=list)
    finish: str | None = None
    answer: str = ""

    def routing_mask(self) -> list[bool]:
        """Routing tokens: the question block and the documents appended in the latest round (spec §6.4),
        taken from where the loop put them, never from searching the text."""
        return P.round_routing_mask(self.later_mask if self.rounds else self.question_mask, len(self.transcript),
                                    self.latest)


@dataclass
class _Handoff:
    q: _Question
    mask: list[bool]  # the round's routing mask
    selected: list[Routed] | None  # the round's selection; None: route now (a forced hand-off)
    hits: list[Hit]
    text: str
    tokens: list[int]
    finish: str  # "answer" or "round_limit"
    context: stages.Context | None = None  # the round's cache (row `row`): the answer continues it
    row: int = -1


def hits(routed: Sequence[Routed], router_layers: Sequence[int], documents: Documents) -> list[Hit]:
    """Routing result of one question (one `Routed` per router layer) as `Hit`s, best first."""
    by_number: dict[int, dict[int, float]] = {}
    for r, sel in enumerate(routed):
        for n, sc in zip(sel.numbers.tolist(), sel.scores.tolist()):
            by_number.setdefault(int(n), {})[router_layers[r]] = float(sc)
    names = documents.user_ids(list(by_number)) if by_number else {}
    out = [Hit(names[n], n, max(ls.values()), ls) for n, ls in by_number.items()]
    return sorted(out, key=lambda h: (-h.score, h.number))


def extract_answer(text: str) -> str:
    """The text after the last `The answer to the question is:` (else all of it), up to an end token."""
    cut = text.rsplit(P.ANSWER_PREFIX, 1)
    body = cut[1] if len(cut) == 2 else text
    for stop in (P.IM_END, P.END_OF_TEXT):
        body = body.split(stop, 1)[0]
    return body.strip()


def run(
    model: MSAModel,
    memory: MemoryView,
    documents: Documents,
    questions: Sequence[str],
    *,
    limits: Limits = Limits(),
    sampling: Sampling = Sampling(),
    handoff_after: int | None = None,
    template: tuple[torch.Tensor, torch.Tensor] | None = None,
    timings: dict[str, float] | None = None,
    on_tokens: OnTokens | None = None,
    reuse_cache: bool = True,
) -> list[Answer]:
    """Answer `questions` (already validated) together, in order.

    `handoff_after`: force the hand-off once this many retrieval rounds have run (1 = the evaluator's "no
    interleave": route, append what the model named, route again, answer). `timings` accumulates
    prefill_s / decode_s of every generation (`stages.generate`). Answers carry no timings (the caller's).
    `on_tokens(question, round, token_ids)`: streaming; each question's (index in `questions`) generated
    tokens of each round (the hand-off's answer included, under the round it ends), as decoded.
    `reuse_cache`: the answer hand-off continues its round's cache (`stages.resume`: only the restatement
    runs) instead of running the whole transcript again with the round's selection (False; the same
    tokens, tests compare the two).
    """
    tok = model.tokenizer
    assert tok is not None, "model without tokenizer"
    template = template if template is not None else stages.template_prefix(model)
    qs = []
    for text in questions:
        first = P.question_prompt(tok, text, span=model.config.routing_span)
        qs.append(_Question(text, list(first.ids), list(first.routing_mask), P.later_round_question_mask(tok, first)))
    if len(documents) == 0:
        for q in qs:
            q.finish = "empty_bank"
    index = {id(q): i for i, q in enumerate(qs)}
    gen_kwargs = dict(temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed, template=template,
                      timings=timings)
    for r in range(limits.max_rounds + 1):
        t_round = time.perf_counter()
        todo: list[tuple[_Question, int]] = []
        handoffs: list[_Handoff] = []
        for q in qs:
            if q.finish is not None:
                continue
            budget = min(limits.max_new_tokens, limits.token_budget - len(q.transcript))
            if budget < 1:
                q.finish = "token_budget"
            elif handoff_after is not None and r >= handoff_after:
                mask = q.routing_mask()
                q.transcript += tok.encode(P.END_OF_RETRIEVE)  # as if the model had ended retrieval
                handoffs.append(_Handoff(q, mask, None, [], P.END_OF_RETRIEVE, [], "answer"))
            else:
                todo.append((q, budget))
        if not todo and not handoffs:
            break
        if todo:
            masks = [q.routing_mask() for q, _ in todo]
            gen = stages.generate(model, [P.Prompt(list(q.transcript), m) for (q, _), m in zip(todo, masks)], memory,
                                  max_new_tokens=[b for _, b in todo], stop_ids=[tok.object_ref_end_id, *model.stop_ids],
                                  stop_text=P.END_OF_RETRIEVE, on_tokens=_stream(on_tokens, r, [index[id(q)] for q, _ in todo]),
                                  keep_cache=reuse_cache, **gen_kwargs)  # type: ignore[arg-type]
            for i, ((q, _), mask) in enumerate(zip(todo, masks)):
                out = gen.tokens[i]
                text = tok.decode(out)
                found = hits(gen.routed[i], model.config.router_layers, documents)
                q.transcript += out
                retrieval_done = P.END_OF_RETRIEVE in text
                if retrieval_done or r == limits.max_rounds:
                    handoffs.append(_Handoff(q, mask, gen.routed[i], found, text, out,
                                             "answer" if retrieval_done else "round_limit", getattr(gen, "context", None), i))
                elif out and out[-1] == tok.object_ref_end_id:
                    _append_documents(q, tok, documents, r, found, text, out, time.perf_counter() - t_round)
                else:  # EOS or length without the protocol: what it said is the answer
                    stopped = gen.finish_reasons[i] == "stop"
                    q.rounds.append(Round(r, found, text, out, [], [], time.perf_counter() - t_round,
                                          "eos" if stopped else "length"))
                    q.answer = extract_answer(text)
                    q.finish = "eos" if stopped else "token_budget"
        if handoffs:
            _hand_off(model, memory, documents, handoffs, limits, gen_kwargs, r, t_round,
                      _stream(on_tokens, r, [index[id(h.q)] for h in handoffs]))
    return [_answer(q, limits, tok) for q in qs]


def _stream(on_tokens: OnTokens | None, r: int, questions: list[int]) -> stages.OnTokens | None:
    """generate's on_tokens(sample, ids) for a batch whose sample s is question questions[s] in round r."""
    if on_tokens is None:
        return None
    return lambda s, ids: on_tokens(questions[s], r, ids)


def _stream_rows(on_tokens: stages.OnTokens | None, group: list[int]) -> stages.OnTokens | None:
    """on_tokens(sample, ids) of a generation whose sample s is hand-off group[s]."""
    if on_tokens is None:
        return None
    return lambda s, ids: on_tokens(group[s], ids)


def _append_documents(q: _Question, tok: P.Tokenizer, documents: Documents, r: int, found: list[Hit], text: str,
                      out: list[int], seconds: float) -> None:
    """The model named documents: append the live ones' text (nothing found: route again on the same text)."""
    requested = sorted({int(m) for m in _NUMBER_RE.findall(text)})
    live = documents.texts(requested) if requested else {}
    if live:
        start = len(q.transcript)
        q.transcript += P.injection_ids(tok, [(n, live[n][1]) for n in sorted(live)])
        q.latest = (start, len(q.transcript) - 1)  # the documents, without the closing delimiter
    q.rounds.append(Round(r, found, text, out, requested, [live[n][0] for n in sorted(live)], seconds, "named"))


def _hand_off(model: MSAModel, memory: MemoryView, documents: Documents, handoffs: list[_Handoff], limits: Limits,
              gen_kwargs: dict[str, object], r: int, t_round: float, on_tokens: stages.OnTokens | None = None) -> None:
    """Stage 3 (spec §6.2): restate the question; answer with the round's selection, all together."""
    tok = model.tokenizer
    assert tok is not None
    restated: list[str] = []
    restated_ids: list[list[int]] = []
    budgets: list[int] = []
    for h in handoffs:
        ids = P.restatement_ids(tok, h.q.text)
        h.q.transcript += ids
        restated.append(tok.decode(ids))
        restated_ids.append(list(ids))
        budgets.append(min(limits.max_new_tokens, limits.token_budget - len(h.q.transcript)))
    ready = [i for i, b in enumerate(budgets) if b >= 1]
    # Hand-offs from this round's generation continue its cache (the transcript up to the restatement is
    # already there, under the same selection); forced ones (`handoff_after`) route and prefill afresh.
    contexts = {id(handoffs[i].context) for i in ready if handoffs[i].context is not None}
    assert len(contexts) <= 1, "hand-offs of one round come from one generation"
    groups = [[i for i in ready if handoffs[i].context is not None], [i for i in ready if handoffs[i].context is None]]
    answers: dict[int, tuple[str, list[Routed]]] = {}
    for group in (g for g in groups if g):
        stream = _stream_rows(on_tokens, group)  # handoffs[i] is sample i
        ctx = handoffs[group[0]].context
        if ctx is not None:
            gen = stages.resume(model, ctx, [handoffs[i].row for i in group], [restated_ids[i] for i in group],
                                max_new_tokens=[budgets[i] for i in group], stop_ids=model.stop_ids, on_tokens=stream,
                                **{k: v for k, v in gen_kwargs.items() if k != "template"})  # type: ignore[arg-type]
        else:
            prompts = [P.Prompt(list(handoffs[i].q.transcript),
                                handoffs[i].mask + [False] * (len(handoffs[i].q.transcript) - len(handoffs[i].mask)))
                       for i in group]
            gen = stages.generate(model, prompts, memory, max_new_tokens=[budgets[i] for i in group],
                                  stop_ids=model.stop_ids, selected=[handoffs[i].selected for i in group],
                                  on_tokens=stream, **gen_kwargs)  # type: ignore[arg-type]
        for j, i in enumerate(group):
            handoffs[i].q.transcript += gen.tokens[j]
            answers[i] = (tok.decode(gen.tokens[j]), gen.routed[j] if ctx is None else handoffs[i].selected or [])
    for i, h in enumerate(handoffs):
        atext, routed = answers.get(i, ("", h.selected or []))
        found = h.hits if h.selected is not None else hits(routed, model.config.router_layers, documents)
        h.q.rounds.append(Round(r, found, h.text + restated[i] + atext, h.tokens, [], [],
                                time.perf_counter() - t_round, "handoff"))
        h.q.answer = extract_answer(atext)
        h.q.finish = h.finish if budgets[i] >= 1 else "token_budget"


def _answer(q: _Question, limits: Limits, tok: P.Tokenizer) -> Answer:
    finish = q.finish or "round_limit"
    reason = None
    if finish in ("answer", "eos"):
        if not q.answer:
            reason = NO_ANSWER_REASONS["empty_answer"]
    else:
        reason = NO_ANSWER_REASONS[finish].format(max_rounds=limits.max_rounds, max_new_tokens=limits.max_new_tokens,
                                                  token_budget=limits.token_budget)
    return Answer(q.text, q.answer if reason is None else "", q.rounds, finish, tok.decode(q.transcript), {},
                  "answer" if reason is None else "no_answer", reason)
