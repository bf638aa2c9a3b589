"""The trainer's routing curriculum: question-only routing span, measured warm-up switch, LR ramp, bank-like
document numbers (msabank.train.data / msabank.train.loop; docs/eval.md says why each exists)."""

from __future__ import annotations

import json
import math
import random

import pytest

from msabank import prompt as P
from msabank.synth import Question
from msabank.train import default_model_path


def _tok() -> P.Tokenizer:
    return P.Tokenizer.from_file(default_model_path() / "tokenizer.json")


def _routed(tok: P.Tokenizer, ids: list[int], mask: list[bool]) -> str:
    return tok.decode([x for x, r in zip(ids, mask) if r])


def test_question_span_routes_on_the_question_text_only():
    tok = _tok()
    for q in ("Who employs Beatrix Draorwyntel?", "What is the special magic number for ember-cobalt-zedkalo?"):
        pr = P.question_prompt(tok, q)
        qs = P.question_prompt(tok, q, span="question")
        assert qs.ids == pr.ids
        assert _routed(tok, qs.ids, qs.routing_mask) == q
        assert all(o for o, m in zip(pr.routing_mask, qs.routing_mask) if m)  # a subset of the official ones
        assert sum(qs.routing_mask) < sum(pr.routing_mask)
        # later rounds: the official block loses its final newline (spec §6.4); the question span is unchanged
        assert _routed(tok, pr.ids, P.later_round_question_mask(tok, pr)).endswith(P.ROUTING_END_MARKER)
        assert P.later_round_question_mask(tok, qs) == qs.routing_mask
    with pytest.raises(ValueError, match="span"):
        P.question_prompt(tok, "Who?", span="answer")


def test_question_span_changes_only_the_routing_of_each_interleave_step():
    from msabank.train.data import question_sequences

    tok = _tok()
    q = Question("Who is the mayor of the town where Ann Bee was born?", "Cy Dee", (0, 1), 2, "twohop:birthplace.mayor")
    args = (tok, q, [42, 7], ["Ann Bee comes from Eton.", "The mayor of Eton is Cy Dee."], [3, 5])
    official = question_sequences(*args)
    question = question_sequences(*args, span="question")
    assert [(s.ids, s.labels, s.positive, s.stage) for s in official] == \
        [(s.ids, s.labels, s.positive, s.stage) for s in question]
    assert _routed(tok, question[0].ids, question[0].routing) == q.question
    # round 2: the question plus the document injected in round 1 (region 1 of the regenerate layout)
    assert _routed(tok, question[1].ids, question[1].routing) == q.question + "[42]. Ann Bee comes from Eton.\n"
    assert _routed(tok, official[1].ids, official[1].routing).endswith(
        P.ROUTING_END_MARKER + "[42]. Ann Bee comes from Eton.\n")
    with pytest.raises(ValueError, match="span"):
        question_sequences(*args, span="answer")


def test_document_numbers_are_drawn_as_a_bank_numbers_them():
    from msabank.train.data import draw_numbers

    rng = random.Random(0)
    draws = [draw_numbers(rng, 256) for _ in range(400)]
    assert all(len(set(d)) == 256 and min(d) >= 0 and max(d) < 150_000 for d in draws)
    digits = [len(str(n)) for d in draws for n in d]
    share = {k: digits.count(k) / len(digits) for k in range(1, 7)}
    # log-uniform bank sizes 200..150K: 4- and 5-digit numbers are the bulk, as in 16K..10M-token banks
    assert share[4] > 0.25 and share[5] > 0.25 and share[1] + share[2] < 0.1 and share[6] < 0.05


def _tc(**kw):
    from msabank.train.loop import TrainConfig

    return TrainConfig(out_dir="unused", **kw)


def test_warm_up_ends_on_measured_recall_or_at_its_cap():
    from msabank.train.loop import _Phase

    ph = _Phase(_tc(warmup_until=0.8, warmup_frac=0.3, recall_window=3))
    assert ph.warm
    assert not ph.observe(0, 0.01, 0.9) and not ph.observe(1, 0.02, 0.9)  # window not full yet
    assert not ph.observe(2, 0.03, 0.5)  # mean 0.77 < 0.8
    assert not ph.observe(3, 0.04, 0.95)  # the last 3: 0.9, 0.5, 0.95 -> 0.78
    assert ph.warm
    assert ph.observe(4, 0.05, 1.0)  # 0.5, 0.95, 1.0 -> 0.82
    assert not ph.warm and ph.switched_at == 0.05 and ph.step0 == 5
    assert not ph.observe(5, 0.06, 0.0)  # never switches back

    capped = _Phase(_tc(warmup_until=0.8, warmup_frac=0.3, recall_window=2))
    assert not capped.observe(0, 0.1, 0.0) and not capped.observe(1, 0.29, 0.1)
    assert capped.observe(2, 0.3, 0.1) and capped.switched_at == 0.3

    assert not _Phase(_tc(warmup_frac=0.0)).warm  # no warm-up: phase 2 from the first step


def test_learning_rate_ramps_then_follows_the_cosine():
    from msabank.train.loop import _lr

    tc = _tc(lr=1e-3, lr_warmup=2e-3, min_lr_frac=0.1, lr_ramp_steps=10)
    assert _lr(tc, 0.0, None, 0) == pytest.approx(2e-4)
    assert _lr(tc, 0.1, None, 50) == pytest.approx(2e-3)
    assert _lr(tc, 0.5, 0.5, 0) == pytest.approx(1e-4)  # ramp restarts with phase 2
    assert _lr(tc, 0.5, 0.5, 20) == pytest.approx(1e-3)
    assert _lr(tc, 0.75, 0.5, 99) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi / 2)))
    assert _lr(tc, 1.0, 0.5, 99) == pytest.approx(1e-4)


def test_training_run_switches_phase_and_span_and_saves(tmp_path):
    import torch

    from msabank.model import load_model
    from msabank.train.loop import TrainConfig, default_model_config, new_model, train

    tok = _tok()
    cfg = default_model_config(tok.vocab_size, layers=3, hidden=32, heads=2, kv_heads=1, head_dim=16,
                               intermediate=64, router_layers=(1, 2))
    model = new_model(cfg, tok)
    tc = TrainConfig(out_dir=str(tmp_path / "ckpt"), steps=8, questions=2, memory=4, world_docs=60, log_every=1,
                     warmup_until=0.0, recall_window=3, warmup_frac=0.9, lr_ramp_steps=2, force_every=1)
    rows = train(model, tok, tc)
    assert [r["phase"] for r in rows] == [1, 1, 1, 2, 2, 2, 2, 2]  # 3 steps fill the window, then phase 2
    assert rows[0]["lr"] == pytest.approx(tc.lr_warmup / 2) and rows[3]["lr"] < tc.lr
    loaded = load_model(tmp_path / "ckpt", device=torch.device("cpu"), dtype=torch.float32)
    assert loaded.config.router_layers == (1, 2)


class _Docs:
    """Two documents, numbered 5 and 9 (the interleave loop's `Documents`)."""

    texts_ = {5: ("doc-5", "Ann Bee comes from Eton."), 9: ("doc-9", "The mayor of Eton is Cy Dee.")}

    def __len__(self) -> int:
        return len(self.texts_)

    def user_ids(self, numbers):
        return {n: self.texts_[n][0] for n in numbers if n in self.texts_}

    def texts(self, numbers):
        return {n: self.texts_[n] for n in numbers if n in self.texts_}


@pytest.mark.parametrize("span", ["official", "question"])
def test_interleave_routes_on_the_trainers_masks(monkeypatch, span):
    """Round by round, the loop `Engine.ask` runs routes on exactly the tokens the trainer routes on for
    the same transcript (one code path, issue 10), under the model's routing span."""
    from types import SimpleNamespace

    import torch

    from msabank import interleave, stages
    from msabank.config import ModelConfig
    from msabank.train.data import question_sequences
    from msabank.types import Routed

    tok = _tok()
    raw = json.loads((default_model_path() / "config.json").read_text())
    raw["msa_config"]["routing_span"] = span
    cfg = ModelConfig.from_dict(raw)
    assert cfg.routing_span == span
    model = SimpleNamespace(tokenizer=tok, config=cfg, stop_ids=[tok.im_end_id])
    script = [tok.encode("[5]") + [tok.object_ref_end_id], tok.encode("[9]") + [tok.object_ref_end_id],
              tok.encode(P.END_OF_RETRIEVE), tok.encode(f"{P.ANSWER_PREFIX} Cy Dee") + [tok.im_end_id]]
    seen: list[P.Prompt] = []

    def fake_generate(model, prompts, memory, **kw):
        seen.append(prompts[0])
        out = script[len(seen) - 1]
        none = Routed(torch.zeros(0, dtype=torch.long), torch.zeros(0))
        return SimpleNamespace(tokens=[out], finish_reasons=["stop"], routed=[[none] * len(cfg.router_layers)])

    monkeypatch.setattr(stages, "generate", fake_generate)
    q = "Who is the mayor of the town where Ann Bee comes from?"
    (answer,) = interleave.run(model, None, _Docs(), [q], template=(torch.zeros(0), torch.zeros(0)))
    assert answer.answer == "Cy Dee"
    trained = question_sequences(tok, _question(q), [5, 9],
                                 [_Docs.texts_[5][1], _Docs.texts_[9][1]], [0, 1], span=span)
    for served, sample in zip(seen[:3], trained):  # rounds 1, 2 and the last retrieval round
        n = len(served.ids)
        assert served.ids == sample.ids[:n]
        assert served.routing_mask == sample.routing[:n]


def _question(text: str):
    return Question(text, "Cy Dee", (0, 1), 2, "twohop:birthplace.mayor")


def test_routing_span_is_a_checked_model_option():
    from msabank.config import ModelConfig
    from msabank.errors import ConfigError

    raw = json.loads((default_model_path() / "config.json").read_text())
    raw["msa_config"].pop("routing_span", None)
    official = ModelConfig.from_dict(raw)
    raw["msa_config"]["routing_span"] = "question"
    question = ModelConfig.from_dict(raw)
    assert (official.routing_span, question.routing_span) == ("official", "question")
    assert official.fingerprint_dict() != question.fingerprint_dict()  # a bank is bound to the span
    raw["msa_config"]["routing_span"] = "everything"
    with pytest.raises(ConfigError, match="routing_span"):
        ModelConfig.from_dict(raw)


def test_reading_excerpt_keeps_the_answer_sentence_and_some_others_in_order():
    import random

    from msabank.train.data import reading_excerpt

    text = "Ann Bee was born in 1990. Trains came late. Ann Bee works as a potter. It rained. Ann Bee likes red."
    assert reading_excerpt(text, "potter", 0, random.Random(0)) == "Ann Bee works as a potter."
    two = reading_excerpt(text, "potter", 2, random.Random(1))
    sents = two.split(". ")
    assert len(sents) == 3 and "Ann Bee works as a potter" in two
    assert [text.index(x.rstrip(".")) for x in sents] == sorted(text.index(x.rstrip(".")) for x in sents)
    assert reading_excerpt(text, "potter", 9, random.Random(0)) == text
    assert reading_excerpt(text, "nowhere", 0, random.Random(0)) == text


def test_reading_curriculum_cuts_only_the_final_rounds_appended_document():
    """With reading_distractors=0 the final round appends the answer sentence alone; memory and every
    earlier round are token for token the batch without it."""
    import random

    import torch

    from msabank.synth import World
    from msabank.train.data import make_batch

    tok = _tok()
    world = World(seed=11, num_docs=300)
    drawn: list = []
    full = make_batch(tok, world, random.Random(5), questions=6, memory=12, kinds=("single", "twohop"), drawn=drawn)
    cut = make_batch(tok, world, random.Random(5), questions=6, memory=12, kinds=("single", "twohop"),
                     reading_distractors=0)
    assert torch.equal(full.mem_ids, cut.mem_ids) and torch.equal(full.stage, cut.stage)
    finals = 0
    for i, st in enumerate(full.stage.tolist()):
        a = tok.decode(full.seq_ids[i, : full.seq_len[i]].tolist())
        b = tok.decode(cut.seq_ids[i, : cut.seq_len[i]].tolist())
        if st < 2:
            assert a == b
            continue
        q = drawn[finals]
        finals += 1
        assert len(b) < len(a) and q.answer in b
        last_doc = world.document(q.gold[-1]).text
        answer_sentence = next(x for x in last_doc.split(". ") if q.answer in x)
        assert answer_sentence in b
    assert finals == 6
