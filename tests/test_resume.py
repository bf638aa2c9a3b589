"""The answer hand-off continues its round's cache (`stages.resume`) instead of re-prefilling the transcript.

The oracle is what the hand-off ran before: `generate(transcript + restatement, selected=the round's
selection)`, the whole transcript through the model again. `resume` feeds only the tokens the round's cache
lacks; the tokens, finish reasons and logits must be the re-prefill's (float32, within the goldens' 1e-4),
also for a batch whose samples stopped at different steps (the batch decoded on after them, so their cache
holds columns of discarded tokens) and for a subset of the round's samples in another order.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from msabank import interleave, stages
from msabank.engine import Engine
from msabank.index import SnapshotDocuments
from msabank.synth import World
from msabank.model import MSAModel
from msabank.prompt import Prompt, question_prompt
from msabank.stages import generate

# the tiny golden model over three documents, and the logit check, shared with the decode tests
from tests.test_decode import DOCS, QUESTIONS, _close, _Docs, setup  # noqa: E402,F401


def resume_and_reprefill(model: MSAModel, mem, temperature: float, decode: str | None = None):
    """(resumed, re-prefilled) Generated of the same continuation. The round: sample 0 ends after 2 tokens,
    sample 2 after 4, sample 1 runs to 7, so the batch decodes on after samples 0 and 2 end, writing cache
    columns of discarded tokens they must not read when resumed. Resumed: rows 2, 0, 1 (another order),
    each with other appended tokens. Also the GPU tests' body (tests/gpu/test_resume.py)."""
    prompts = [question_prompt(model.tokenizer, q) for q in QUESTIONS]
    rnd = generate(model, prompts, mem, max_new_tokens=[2, 7, 4], stop_ids=[], keep_cache=True, decode=decode)
    assert [len(t) for t in rnd.tokens] == [2, 7, 4] and rnd.context is not None
    appended = {0: model.tokenizer.encode("\nSo: "), 1: model.tokenizer.encode(" and then?"), 2: [65, 66, 67, 68, 69]}
    rows = [2, 0, 1]
    kw = dict(max_new_tokens=[5, 6, 4], stop_ids=[], temperature=temperature, seed=5, keep_logits=True, decode=decode)
    got = stages.resume(model, rnd.context, rows, [appended[r] for r in rows], **kw)
    ref = generate(model, [Prompt(prompts[r].ids + rnd.tokens[r] + appended[r], prompts[r].routing_mask
                                  + [False] * (len(rnd.tokens[r]) + len(appended[r]))) for r in rows], mem,
                   selected=[rnd.routed[r] for r in rows], **kw)
    assert [len(t) for t in ref.tokens] == [5, 6, 4]
    return got, ref


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_resume_equals_reprefilling_the_transcript(setup, temperature: float) -> None:
    got, ref = resume_and_reprefill(*setup, temperature)
    assert got.tokens == ref.tokens
    assert got.finish_reasons == ref.finish_reasons
    _close("first_logits", got.first_logits, ref.first_logits)
    _close("step_logits", got.step_logits, ref.step_logits)


def test_resume_rejects_bad_input(setup) -> None:
    model, mem = setup
    rnd = generate(model, [question_prompt(model.tokenizer, QUESTIONS[0])], mem, max_new_tokens=2, keep_cache=True)
    assert rnd.context is not None
    with pytest.raises(ValueError, match="one appended token list per row"):
        stages.resume(model, rnd.context, [0], [], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        stages.resume(model, rnd.context, [0], [[65]], max_new_tokens=0)
    assert generate(model, [question_prompt(model.tokenizer, QUESTIONS[0])], mem, max_new_tokens=2).context is None



@pytest.mark.parametrize("max_rounds", [0, 1])
def test_interleave_answers_are_those_of_the_reprefilled_hand_off(setup, monkeypatch: pytest.MonkeyPatch,
                                                                  max_rounds: int) -> None:
    """interleave.run with the hand-off continuing the round's cache gives the transcripts, answers and
    rounds of the re-prefilled hand-off, question by question and batched; the hand-off prefills only the
    restatement (one `resume` per hand-off round, no third full `generate`)."""
    model, mem = setup
    calls: list[str] = []
    for name in ("generate", "resume"):
        fn = getattr(stages, name)
        monkeypatch.setattr(stages, name, lambda *a, _fn=fn, _name=name, **kw: (calls.append(_name), _fn(*a, **kw))[1])
    limits = interleave.Limits(max_rounds=max_rounds, max_new_tokens=6)

    def answers(qs: list[str], reuse: bool) -> list[tuple]:
        out = interleave.run(model, mem, _Docs(), qs, limits=limits, reuse_cache=reuse)
        return [(a.transcript, a.answer, a.finish, a.outcome, [(r.index, r.ended, r.tokens, r.generated, r.injected,
                 [h.number for h in r.documents]) for r in a.rounds]) for a in out]

    handed_off = 0
    for qs in ([QUESTIONS[0]], [QUESTIONS[1]], list(QUESTIONS)):
        calls.clear()
        old = answers(qs, False)
        assert "resume" not in calls
        n_old = len(calls)
        calls.clear()
        new = answers(qs, True)
        assert new == old
        handoff_rounds = {rnd[0] for a in new for rnd in a[4] if rnd[1] == "handoff"}  # one generation each
        handed_off += len(handoff_rounds)
        assert len(calls) == n_old and calls.count("resume") == len(handoff_rounds)  # resumed, not re-prefilled
    if max_rounds == 0:  # round 0 is the last: every question hands off (the random model never names one)
        assert handed_off == 3


def test_forced_hand_off_still_routes(setup) -> None:
    """`handoff_after` (the evaluator's no-interleave) hands off before any generation of that round: there
    is no cache to continue, so the answer routes and prefills the transcript (unchanged by reuse_cache)."""
    model, mem = setup
    for after in (0, 1):
        a = interleave.run(model, mem, _Docs(), list(QUESTIONS[:2]), limits=interleave.Limits(2, 5), handoff_after=after)
        b = interleave.run(model, mem, _Docs(), list(QUESTIONS[:2]), limits=interleave.Limits(2, 5), handoff_after=after,
                           reuse_cache=False)
        assert [x.transcript for x in a] == [x.transcript for x in b]
        assert [[h.number for r in x.rounds for h in r.documents] for x in a] == \
               [[h.number for r in x.rounds for h in r.documents] for x in b]


def test_multi_round_asks_of_the_embedded_model_are_unchanged(tmp_path: Path) -> None:
    """The embedded model on a synthetic bank names documents, routes again over them and hands off (2-3
    rounds): the hand-off then continues a round whose prompt holds injected documents. Same answers,
    transcripts, rounds and selections as the re-prefilled hand-off, alone and batched."""
    world = World(seed=7, num_docs=40)
    with Engine.create(tmp_path / "bank", None, device="cpu") as eng:
        eng.ingest(((d.id, d.text) for d in world.documents()), batch_size=64)
        qs = [q.question for q in world.questions(4, seed=8)]
        with eng.bank.snapshot() as snap:
            eng.refresh(snap)
            mem, docs = eng._index.view(snap, eng.model.config.top_k), SnapshotDocuments(snap, eng.damaged)

            def run(batch: list[str], reuse: bool) -> list[tuple]:
                out = interleave.run(eng.model, mem, docs, batch, limits=interleave.Limits(4, 48),
                                     template=eng._template, reuse_cache=reuse)
                return [(a.transcript, a.answer, a.finish, [(r.ended, r.tokens, [h.number for h in r.documents])
                                                             for r in a.rounds]) for a in out]

            alone = [run([q], True)[0] for q in qs]
            assert alone == [run([q], False)[0] for q in qs]
            assert run(qs, True) == run(qs, False)
    ended = [[r[0] for r in a[3]] for a in alone]
    assert all(e[-1] == "handoff" for e in ended) and any(len(e) >= 2 for e in ended), ended
