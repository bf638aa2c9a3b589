"""The trainer on CPU: interleave-step samples follow MSA_SPEC §6, and a tiny model learns on a tiny corpus."""

from __future__ import annotations

import json
import random

import pytest
import torch

from msabank import prompt as P
from msabank.synth import World
from msabank.train import default_model_path


def _tok() -> P.Tokenizer:
    return P.Tokenizer.from_file(default_model_path() / "tokenizer.json")


def test_shipped_tokenizer_meets_the_protocol():
    from tokenizers import Tokenizer

    from msabank.train.tokenizer import check_tokenizer

    check_tokenizer(Tokenizer.from_file(str(default_model_path() / "tokenizer.json")))
    tok = _tok()
    assert len(P.template_parts(tok).head) == 3


def test_samples_for_each_interleave_step():
    from msabank.synth import Question
    from msabank.train.data import question_sequences

    tok = _tok()
    q = Question("Who is the mayor of the town where Ann Bee was born?", "Cy Dee", (0, 1), 2, "twohop:birthplace.mayor")
    seqs = question_sequences(tok, q, [42, 7], ["Ann Bee comes from Eton.", "The mayor of Eton is Cy Dee."], [3, 5])
    labels = [tok.decode([x for x in s.labels if x >= 0]) for s in seqs]
    assert labels == ["[42]<|object_ref_end|>", "[7]<|object_ref_end|>",
                      "<End-of-Retrieve>The answer to the question is: Cy Dee<|im_end|>"]
    assert [s.positive for s in seqs] == [3, 5, 5] and [s.stage for s in seqs] == [0, 1, 2]
    # the answer's own tokens, without the fixed prefix and <|im_end|> (answer_weight's positions)
    assert [tok.decode([x for x, a in zip(s.labels, s.answer) if a]) for s in seqs] == ["", "", " Cy Dee"]
    last = tok.decode(seqs[2].ids)
    assert last.startswith(P.QUESTION_HEAD + q.question + P.QUESTION_TAIL + "<|im_end|>\n<|im_start|>[42]")
    assert "[42]. Ann Bee comes from Eton.\n<|object_ref_end|>[7]<|object_ref_end|>[7]. The mayor" in last
    assert "<End-of-Retrieve><|im_start|>The user's question is: " + q.question + "\n<|object_ref_end|>" in last
    # round 2 routes on the question block and on the document injected in round 1 only
    routed = tok.decode([x for x, r in zip(seqs[1].ids, seqs[1].routing) if r])
    assert routed.endswith("Please return all documents related to the question[42]. Ann Bee comes from Eton.\n")


def test_tiny_model_learns_routing_and_targets():
    from msabank.train.core import forward
    from msabank.train.data import make_batch
    from msabank.train.loop import default_model_config, new_model

    tok = _tok()
    torch.manual_seed(0)
    cfg = default_model_config(tok.vocab_size, layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16,
                               intermediate=128, router_layers=(1, 2))
    model = new_model(cfg, tok)
    batch = make_batch(tok, World(seed=3, num_docs=500), random.Random(0), questions=4, memory=12, max_doc_tokens=96)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        out = forward(model, batch, force_positive=False)
        loss = out.lm_loss + out.aux_loss
        first = first or (out.lm_loss.item(), out.aux_loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = forward(model, batch, force_positive=False)
    rows = (batch.stage < 2) & (batch.positive >= 0)
    recall = float((out.scores[-1].argmax(1)[rows] == batch.positive[rows]).float().mean())
    assert float(out.lm_loss) < 0.5 * first[0]
    assert float(out.aux_loss) < 0.5 * first[1]
    assert recall >= 0.8


def test_lm_loss_skips_number_targets_of_unselected_documents():
    """lm_only_routed: a `[n]` target (stage < 2) counts only when some router layer selected its document;
    final-round targets (answer read from the appended text) always count; accuracy covers every target."""
    import torch.nn.functional as F

    from msabank.train.core import forward
    from msabank.train.data import make_batch
    from msabank.train.loop import default_model_config, new_model

    tok = _tok()
    cfg = default_model_config(tok.vocab_size, layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16,
                               intermediate=128, router_layers=(1, 2))
    model = new_model(cfg, tok)
    batch = make_batch(tok, World(seed=3, num_docs=500), random.Random(0), questions=4, memory=12, max_doc_tokens=96)
    pos = batch.positive.clamp(min=0)[:, None]
    right = [pos, pos]
    wrong = [(pos + 1) % 12, (pos + 1) % 12]
    with torch.no_grad():
        full = forward(model, batch, selection=right, want_logits=True)
        same = forward(model, batch, selection=right, lm_only_routed=True)
        cut = forward(model, batch, selection=wrong, lm_only_routed=True, want_logits=True)
    assert torch.allclose(full.lm_loss, same.lm_loss)
    keep = (batch.labels >= 0) & (batch.stage[:, None] == 2)
    expect = F.cross_entropy(cut.logits[keep].float(), batch.labels[keep])
    assert torch.allclose(cut.lm_loss, expect, atol=1e-5)
    assert cut.correct is not None and cut.correct.numel() == int((batch.labels >= 0).sum())


def test_default_model_loads_and_saves(tmp_path):
    from msabank.model import load_model
    from msabank.train.loop import save

    m = load_model(default_model_path())
    assert m.config.top_k == 1 and m.config.routing_rule == "cosine" and m.config.chunk_size == 16
    assert sum(p.numel() for p in m.parameters()) < 10_000_000
    save(m, m.tokenizer, tmp_path / "ck")
    m2 = load_model(tmp_path / "ck")
    assert torch.equal(m2.model.layers[4].self_attn.router_q_proj[0].weight, m.model.layers[4].self_attn.router_q_proj[0].weight)


def test_evaluator_scores_what_the_interleave_loop_answers(monkeypatch):
    """The evaluator has no inference of its own: its numbers are scores of `msabank.interleave.run`'s
    answers (the loop `Engine.ask_batch` runs), in batches, with the forced hand-off for "no interleave"."""
    from msabank import interleave
    from msabank.model import load_model
    from msabank.train.evaluate import EVAL_SEED_BASE, evaluate

    calls = []
    real = interleave.run

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((kwargs["handoff_after"], args[3], out))
        return out

    monkeypatch.setattr(interleave, "run", spy)
    model = load_model(default_model_path())
    res = evaluate(model, tokens=1200, seed=EVAL_SEED_BASE + 7, questions=3, batch=2)
    assert [(h, len(qs)) for h, qs, _ in calls] == [(None, 2), (None, 1), (1, 2), (1, 1)]
    world = World(seed=EVAL_SEED_BASE + 7, num_docs=16)
    qs = world.questions(3)
    for mode, handoff in (("interleave", None), ("no_interleave", 1)):
        answers = [a for h, _, out in calls if h == handoff for a in out]
        assert [a.question for a in answers] == [q.question for q in qs]
        assert res[mode]["em_all"] == sum(a.answer == q.answer for a, q in zip(answers, qs)) / 3
        first = [[h.number for h in a.rounds[0].documents if layer in h.layers] for a in answers
                 for layer in model.config.router_layers[:1]]
        assert res[mode]["recall_at_k_per_layer"][0] == round(sum(q.gold[0] in f for q, f in zip(qs, first)) / 3, 4)


def _tiny_model_and_batch():
    """A 3-layer model with router layers 1-2 and one batch of 4 questions over 12 memory documents."""
    from msabank.train.data import make_batch
    from msabank.train.loop import default_model_config, new_model

    tok = _tok()
    cfg = default_model_config(tok.vocab_size, layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16,
                               intermediate=128, router_layers=(1, 2))
    model = new_model(cfg, tok)
    batch = make_batch(tok, World(seed=4, num_docs=500), random.Random(1), questions=4, memory=12, max_doc_tokens=96)
    return model, batch


def test_aux_layer_weights_scale_each_router_layers_term():
    """aux_layer_weights multiplies each router layer's InfoNCE term: w=(3,0) + 3·(0,1) == 3·(1,1)."""
    from msabank.train.core import forward
    model, batch = _tiny_model_and_batch()
    with torch.no_grad():
        both = forward(model, batch).aux_loss
        first = forward(model, batch, aux_layer_weights=(3.0, 0.0)).aux_loss
        second = forward(model, batch, aux_layer_weights=(0.0, 1.0)).aux_loss
    assert both is not None and float(both) > 0
    assert torch.allclose(first + 3 * second, 3 * both, rtol=1e-5)
    assert not torch.allclose(first, 3 * both)


def test_smooth_token_max_bounds_and_limit():
    """smooth_doc_scores lies in [max − τ·log n, max] and tends to the protocol's max as τ → 0."""
    from msabank.kernels import doc_scores_dense_ref
    from msabank.train.core import smooth_doc_scores

    g = torch.Generator().manual_seed(3)
    query, keys = torch.randn(3, 7, 8, generator=g), torch.randn(5, 4, 8, generator=g)
    routing = torch.rand(3, 7, generator=g) < 0.6
    routing[:, 0] = True
    valid = torch.ones(5, 4, dtype=torch.bool)
    valid[2, 1:] = False  # a one-chunk document
    hard = doc_scores_dense_ref(query, keys, routing, valid)
    n = routing.sum(1).float()[:, None]
    for tau in (1.0, 0.1):
        soft = smooth_doc_scores(query, keys, routing, valid, tau)
        assert (soft <= hard + 1e-5).all() and (soft >= hard - tau * n.log() - 1e-5).all()
        assert not torch.allclose(soft, hard)
    assert torch.allclose(smooth_doc_scores(query, keys, routing, valid, 1e-4), hard, atol=2e-3)


def test_smooth_token_max_trains_the_token_that_never_wins_the_max():
    """Two routing tokens against two documents: token 0 (a phrase both documents share) wins the max for
    both, token 1 (the name) matches only the positive. Under the hard max InfoNCE gives token 1 no
    gradient at all; under the smooth max it does, and a step on token 1 alone lowers the loss."""
    import torch.nn.functional as F

    from msabank.kernels import doc_scores_dense_ref
    from msabank.train.core import smooth_doc_scores

    keys = torch.tensor([[[1.0, 0.0, 1.0]], [[1.0, 0.0, -1.0]]])  # (M=2, C=1, dim 3): doc 0 is the positive
    shared, name = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.5])
    routing = torch.ones(1, 2, dtype=torch.bool)
    valid = torch.ones(2, 1, dtype=torch.bool)
    positive = torch.tensor([0])

    def grad_of_name(score_fn):
        q = torch.stack([shared, name])[None].clone().requires_grad_(True)  # (S=1, T=2, 3)
        loss = F.cross_entropy(score_fn(q) / 0.1, positive)
        loss.backward()
        return loss.detach(), q.grad[0, 1]

    _, g_hard = grad_of_name(lambda q: doc_scores_dense_ref(q, keys, routing, valid))
    assert torch.equal(g_hard, torch.zeros(3))
    smooth = lambda q: smooth_doc_scores(q, keys, routing, valid, 0.5)  # noqa: E731
    loss0, g_soft = grad_of_name(smooth)
    assert g_soft.abs().sum() > 0
    stepped = torch.stack([shared, name - 0.5 * g_soft])[None]
    assert F.cross_entropy(smooth(stepped) / 0.1, positive) < loss0


def test_token_tau_changes_the_loss_not_the_selection():
    from msabank.train.core import forward
    model, batch = _tiny_model_and_batch()
    with torch.no_grad():
        base = forward(model, batch, force_positive=False)
        soft = forward(model, batch, force_positive=False, token_tau=0.05)
    assert all(torch.equal(a, b) for a, b in zip(base.selected, soft.selected))
    assert all(torch.equal(a, b) for a, b in zip(base.scores, soft.scores))
    assert base.aux_loss is not None and soft.aux_loss is not None
    assert not torch.allclose(base.aux_loss, soft.aux_loss)


def test_final_weight_is_a_weighted_mean_of_the_two_target_groups():
    """final_weight w: LM loss = (n_o·L_o + w·n_f·L_f) / (n_o + w·n_f), L_f the mean CE of final-round targets
    (stage 2: `<End-of-Retrieve>` + answer) and L_o of the `[n]` targets, each measured alone by masking labels."""
    import dataclasses

    from msabank.train.core import forward
    model, batch = _tiny_model_and_batch()
    final = (batch.stage == 2)[:, None] & (batch.labels >= 0)
    other = (batch.stage < 2)[:, None] & (batch.labels >= 0)
    only = lambda m: dataclasses.replace(batch, labels=torch.where(m, batch.labels, -100))  # noqa: E731
    with torch.no_grad():
        lf = forward(model, only(final)).lm_loss
        lo = forward(model, only(other)).lm_loss
        plain = forward(model, batch).lm_loss
        heavy = forward(model, batch, final_weight=4.0).lm_loss
    nf, no = int(final.sum()), int(other.sum())
    assert nf > 0 and no > 0
    assert torch.allclose(plain, (no * lo + nf * lf) / (no + nf), atol=1e-5)
    assert torch.allclose(heavy, (no * lo + 4.0 * nf * lf) / (no + 4.0 * nf), atol=1e-5)


def test_training_metrics_break_exactness_and_recall_down_by_question_kind():
    """Per-kind rows (single / twohop / needle) agree with the overall figure they split."""
    from msabank.train.core import forward
    from msabank.train.data import KINDS, make_batch
    from msabank.train.loop import _metrics, default_model_config, new_model

    tok = _tok()
    cfg = default_model_config(tok.vocab_size, layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16,
                               intermediate=128, router_layers=(1, 2))
    model = new_model(cfg, tok)
    batch = make_batch(tok, World(seed=4, num_docs=500), random.Random(3), questions=12, memory=24, max_doc_tokens=96,
                       kinds=("single", "twohop", "needle"))
    assert set(batch.kind.tolist()) == {0, 1, 2} and KINDS == ("single", "twohop", "needle")
    with torch.no_grad():
        m = _metrics(forward(model, batch), batch)
    for name, stage in (("target_exact_final", 2), ("round1_recall1_L0", 0)):
        rows = batch.stage == stage
        counts = {k: int((rows & (batch.kind == i)).sum()) for i, k in enumerate(KINDS)}
        parts = {k: m[f"{name}_{k}"] for k in KINDS if counts[k]}
        assert parts, name
        total = sum(parts[k] * counts[k] for k in parts) / sum(counts[k] for k in parts)
        assert abs(total - m[name]) < 1e-6, (name, parts, m[name])


def test_probe_scores_naming_first_answer_token_and_the_rest_at_their_positions(monkeypatch):
    """msabank.train.probe with a stand-in forward whose logits are the targets except where the test breaks
    them: every rate is 1, then the final round's first answer token alone wrong gives first = 0 and no
    rest|first, with naming untouched."""
    from msabank.train import probe as probe_mod
    from msabank.train.loop import default_model_config, new_model

    tok = _tok()
    cfg = default_model_config(tok.vocab_size, layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16,
                               intermediate=128, router_layers=(1, 2))
    model = new_model(cfg, tok)
    prefix = len(tok.encode("<End-of-Retrieve>")) + len(tok.encode("The answer to the question is:"))
    break_first = {"on": False}

    def oracle(model, batch, **kw):  # noqa: ANN001, ANN003
        lab = batch.labels.clamp(min=0).clone()
        if break_first["on"]:
            for i in (batch.stage == 2).nonzero()[:, 0].tolist():
                pos = (batch.labels[i] >= 0).nonzero()[:, 0]
                lab[i, pos[prefix]] = (lab[i, pos[prefix]] + 1) % tok.vocab_size
        return type("Out", (), {"logits": torch.nn.functional.one_hot(lab, tok.vocab_size).float()})()

    monkeypatch.setattr(probe_mod, "forward", oracle)
    kw = dict(worlds=1, questions=6, memory=16, world_docs=300)
    good = probe_mod.probe(model, **kw)
    assert any(t.startswith("single") for t in good) and any(t.startswith("twohop") for t in good) and "needle" in good
    assert all(c["rate"] == 1.0 for v in good.values() for c in v.values())
    assert sum(v["first"]["n"] for v in good.values()) == 18  # one final round per question, 3 kinds x 6
    break_first["on"] = True
    bad = probe_mod.probe(model, **kw)
    assert all(v["first"]["rate"] == 0.0 and "rest|first" not in v and v["name"]["rate"] == 1.0 for v in bad.values())


def test_answer_weight_weighs_the_answers_own_tokens():
    """answer_weight w: LM loss = (n_o·L_o + w·n_a·L_a) / (n_o + w·n_a), L_a the mean CE of the answer's own
    tokens (batch.answer) and L_o of every other target, each measured alone by masking labels."""
    import dataclasses

    from msabank.train.core import forward
    model, batch = _tiny_model_and_batch()
    ans = batch.answer & (batch.labels >= 0)
    other = ~batch.answer & (batch.labels >= 0)
    only = lambda m: dataclasses.replace(batch, labels=torch.where(m, batch.labels, -100))  # noqa: E731
    with torch.no_grad():
        la = forward(model, only(ans)).lm_loss
        lo = forward(model, only(other)).lm_loss
        heavy = forward(model, batch, answer_weight=10.0).lm_loss
    na, no = int(ans.sum()), int(other.sum())
    assert 0 < na < no
    assert torch.allclose(heavy, (no * lo + 10.0 * na * la) / (no + 10.0 * na), atol=1e-5)


def test_reading_check_puts_the_first_token_loss_on_the_answers_first_token():
    """msabank.train.reading: final-round batches of the asked answer types; `first` keeps exactly one label
    per sequence, the answer's first token; a 2-step run reports both held-out accuracies."""
    from msabank.train import reading
    from msabank.train.loop import default_model_config, new_model

    tok = _tok()
    model = new_model(default_model_config(tok.vocab_size, layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16,
                                           intermediate=128, router_layers=(1, 2)), tok)
    b = reading.final_round_batch(model, random.Random(0), World(seed=5, num_docs=300), ("color",), 0, questions=4,
                                  memory=6)
    assert (b.stage == 2).all() and b.mem_ids.shape[0] == 6
    one = reading.first_token_only(b)
    assert ((one.labels >= 0).sum(1) == 1).all()
    at = reading.first_answer_positions(b)
    for i in range(4):
        assert int(one.labels[i, at[i]]) == int(b.labels[i, at[i]])
        seen = tok.decode(b.seq_ids[i, : at[i] + 1].tolist())  # the input up to the first answer token
        assert seen.endswith(P.ANSWER_PREFIX)
        word = tok.decode([int(b.labels[i, at[i]])]).strip()
        assert word and word in seen.split(P.END_OF_RETRIEVE)[0]  # copied from the appended document
    rows = reading.run(model, [reading.Stage(("color",), 0, 2)], lr=1e-3, loss="first", every=2,
                       report_types=("color", "job"), log=lambda _: None)
    assert [r["step"] for r in rows] == [0, 2]
    assert all(0.0 <= r["cut"] <= 1.0 and set(r["whole"]) == {"color", "job"} for r in rows)


def test_reading_stages_parse_groups_and_name_a_bad_type():
    from msabank.train.reading import NAME_TYPES, WORD_TYPES, Stage

    s = Stage.parse("color,names:1:300")
    assert s == Stage(("color", *NAME_TYPES), 1, 300)
    assert Stage.parse("words,color:-1:5").types == WORD_TYPES  # no duplicates
    with pytest.raises(ValueError, match="colour"):
        Stage.parse("colour:0:10")
    with pytest.raises(ValueError, match="TYPES:DISTRACTORS:MAX_STEPS"):
        Stage.parse("color:10")


def _tiny_reader(tok):
    from msabank.train.loop import default_model_config, new_model

    return new_model(default_model_config(tok.vocab_size, layers=2, hidden=32, heads=2, kv_heads=1, head_dim=16,
                                          intermediate=64, router_layers=(1,)), tok, seed=3)


def test_reading_phase_advances_on_its_threshold_and_resumes_exactly(tmp_path):
    """A stage ends at MAX_STEPS or once held-out training-style accuracy reaches --advance-at; a run stopped
    mid-stage and rerun from its out/resume.pt ends with the same weights as one uninterrupted run, and the
    finished run writes a loadable checkpoint and the probe."""
    from msabank.model import load_model
    from msabank.train import reading

    tok = _tok()
    stages = [reading.Stage(("color",), 0, 4), reading.Stage(("job", "color"), -1, 3)]
    kw = dict(lr=1e-3, questions=3, memory=4, every=1, log=lambda _: None, probe_worlds=1)
    # threshold 0: stage 0 ends at its first measurement after a step
    rows = reading.run(_tiny_reader(tok), stages, advance_at=0.0, **kw)
    assert [(r["stage"], r["stage_step"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    whole = _tiny_reader(tok)
    reading.run(whole, stages, out=tmp_path / "a", **kw)
    parts = _tiny_reader(tok)
    first = reading.run(parts, stages, out=tmp_path / "b", stop_after=5, **kw)
    assert (first[-1]["step"], first[-1]["stage"]) == (4, 1) and not (tmp_path / "b" / "probe.json").exists()
    assert json.loads((tmp_path / "b" / "ckpt" / "training.json").read_text())["step"] == 5
    rest = reading.run(_tiny_reader(tok), stages, out=tmp_path / "b", **kw)  # a fresh process, as on the device
    assert rest[0]["step"] == 5 and rest[-1]["step"] == 7
    a = load_model(tmp_path / "a" / "ckpt", device="cpu", dtype=torch.float32).state_dict()
    b = load_model(tmp_path / "b" / "ckpt", device="cpu", dtype=torch.float32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "single:color" in json.loads((tmp_path / "b" / "probe.json").read_text())
    logged = [json.loads(x)["step"] for x in (tmp_path / "b" / "reading_log.jsonl").read_text().splitlines()]
    assert logged == [0, 1, 2, 3, 4, 4, 5, 6, 7]  # stage 1 re-measures its step 0; nothing twice across the stop
