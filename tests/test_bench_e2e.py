"""`msabank bench e2e` on CPU at the tiny geometry: every row beside a floor, the official-style baseline
decodes the same greedy tokens as `stages.generate` over the same memory, the synthetic bank has the size
and the content asked for, bad options are errors naming the option, and `Engine.create(loaded=)` binds a
bank to a model built in memory. Nothing here is timed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from msabank import stages
from msabank.bench import e2e
from msabank.errors import ConfigError, InputError, MsabankError

TTFT = [f"ttft.{r}{part}" for r in ("r1", "r2") for part in ("", ".routing", ".fetch", ".prefill")]
ROWS = {*TTFT, "decode.b1", "decode.b2", "stage1", "ingest"}
SMALL = dict(geometry="tiny", device="cpu", bank_tokens="6K", real_tokens=800, ingest_tokens=300, batches="1,2",
             new_tokens=3, questions=1)


def _check_rows(res: dict) -> None:
    names = {(r["name"], r["path"]) for r in res["rows"]}
    assert {n for n, _ in names} == ROWS
    for name in (*TTFT, "decode.b1", "decode.b2"):
        assert (name, "official-style") in names and (name, "msabank") in names
    for r in res["rows"]:
        assert r["measured"] > 0 and r["floor"] > 0, r
        assert r["ratio"] == r["measured"] / r["floor"], r


def test_tiny_run_through_the_python_function() -> None:
    res = e2e.run_e2e_bench(**SMALL)
    _check_rows(res)
    assert res["card"].startswith("cpu") and res["dtype"] == "float32"
    assert all(res["official_same_tokens"].values()) and set(res["official_same_tokens"]) == {"b1", "b2"}
    bank = res["bank"]
    assert bank["shared_content_pool"] and bank["real_tokens"] >= 800 and bank["synthetic_documents"] > 0
    assert 6000 <= bank["tokens_equivalent"] < 6000 + 16 * 8  # tiny chunks are 16 tokens; a doc overshoots by < 8 chunks
    assert set(res["speedup_vs_official"]) == {"ttft.r1", "ttft.r2", "decode.b1", "decode.b2"}
    assert res["round2_tokens"] > res["question_tokens"] + 10  # the named documents' text is appended
    json.dumps(res)  # JSON-able as written


def test_tiny_run_through_the_cli(tmp_path: Path) -> None:
    from msabank.cli.main import app

    args = ["bench", "e2e", "--geometry", "tiny", "--device", "cpu", "--bank-tokens", "6K", "--real-tokens", "800",
            "--ingest-tokens", "300", "--batches", "1,2", "--new-tokens", "3", "--questions", "1", "--out", str(tmp_path)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "bench_e2e.json").read_text())
    _check_rows(saved)
    assert "official-style" in res.stdout and "decode.b2" in res.stdout and "speed-up" in res.stdout


@pytest.fixture(scope="module")
def tiny() -> tuple:
    model = e2e.build_model("tiny", torch.device("cpu"), seed=3)
    mem, stage1 = e2e.build_memory(model, real_tokens=1500, bank_tokens=12_000, seed=5)
    return model, mem, stage1


def test_official_style_path_decodes_the_same_greedy_tokens(tiny: tuple) -> None:
    model, mem, _ = tiny
    template = stages.template_prefix(model)
    prompts = e2e.question_prompts(model, 3, 40)
    want = stages.generate(model, prompts, mem.view(), max_new_tokens=8, stop_ids=(), template=template)
    got = e2e.official_generate(model, prompts, mem.official_view(), template, 8)
    assert got.tokens == want.tokens and all(len(t) == 8 for t in got.tokens)
    for a, b in zip(got.routed, want.routed):
        assert [r.numbers.tolist() for r in a] == [r.numbers.tolist() for r in b]
    chosen = {int(n) for sample in want.routed for r in sample for n in r.numbers}
    assert any(n >= mem.real_docs for n in chosen), "no synthetic document was ever routed to"
    # round 2: the question, the two documents it named, their text appended and routing
    second = [e2e.round2_prompt(model, p, mem, sel) for p, sel in zip(prompts, want.routed)]
    for p, q in zip(prompts, second):
        assert q.ids[: len(p.ids)] == p.ids and sum(q.routing_mask) > sum(p.routing_mask)
        assert not any(q.routing_mask[len(p.ids) :len(p.ids) + 3])  # the names the "model" wrote do not route
    want2 = stages.generate(model, second, mem.view(), max_new_tokens=4, stop_ids=(), template=template)
    assert e2e.official_generate(model, second, mem.official_view(), template, 4).tokens == want2.tokens


def test_synthetic_documents_share_real_content_and_look_like_real_keys(tiny: tuple) -> None:
    model, mem, stage1 = tiny
    cfg = model.config
    assert stage1["tokens"] >= 1500 and stage1["flops"] > 0
    assert 12_000 // cfg.chunk_size <= mem.index.num_rows < 12_000 // cfg.chunk_size + 8
    n = mem.real_docs + 5  # synthetic: holds real document 5's chunks
    view = mem.view()
    for layer in range(len(cfg.router_layers)):
        k, v = view.content_kv(layer, [n])
        k0, v0 = view.content_kv(layer, [5])
        assert k.shape[0] == mem.chunks(n) == mem.chunks(5) and torch.equal(k, k0) and torch.equal(v, v0)
    keys, row_doc, _ = mem.index.layer(0)
    real = row_doc < mem.real_docs
    norm = keys.view(keys.shape[0], cfg.num_kv_heads, cfg.head_dim).norm(dim=-1).mean(dim=1)  # (rows,)
    ratio = float(norm[~real].mean() / norm[real].mean())
    assert 0.9 < ratio < 1.1, ratio  # dot routing: scaled to the real keys' mean per-head norm


@pytest.mark.parametrize("kwargs, option", [
    (dict(geometry="msa-9b"), "--geometry 'msa-9b'"),
    (dict(geometry="tiny", bank_tokens="lots"), "--bank-tokens 'lots'"),
    (dict(geometry="tiny", bank_tokens="0"), "--bank-tokens '0'"),
    (dict(geometry="tiny", bank_tokens="10K", real_tokens="20K"), "--real-tokens '20K'"),
    (dict(geometry="tiny", ingest_tokens="1x"), "--ingest-tokens '1x'"),
    (dict(geometry="tiny", batches="1,x"), "--batches '1,x'"),
    (dict(geometry="tiny", batches="0"), "--batches '0'"),
    (dict(geometry="tiny", new_tokens=1), "--new-tokens 1"),
    (dict(geometry="tiny", questions=0), "--questions 0"),
    (dict(geometry="tiny", question_tokens=2), "--question-tokens 2"),
])
def test_bad_options_name_the_option(kwargs: dict, option: str) -> None:
    with pytest.raises(InputError, match=option.replace("(", r"\(")):
        e2e.check_options(**kwargs)


def test_bad_option_through_the_cli_is_a_clear_error(tmp_path: Path) -> None:
    from msabank.cli.main import app

    res = CliRunner().invoke(app, ["bench", "e2e", "--geometry", "tiny", "--bank-tokens", "many", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "--bank-tokens 'many'" in res.output and "Traceback" not in res.output


def test_engine_create_binds_a_bank_to_a_loaded_model(tmp_path: Path) -> None:
    from msabank.engine import Engine

    model = e2e.build_model("tiny", torch.device("cpu"), seed=1)
    with Engine.create(tmp_path / "bank", loaded=model) as eng:
        assert eng.model is model
        rep = eng.ingest([("a", "The lighthouse was built by Corin."), ("b", "Corin founded Lumford Works.")])
        assert rep.added == 2 and eng.stats().tokens > 0
        assert len(eng.retrieve("Who built the lighthouse?")) > 0
    # engine.json names no checkpoint: reopening without --model is refused, never served by another model
    with pytest.raises(MsabankError, match="built in memory"):
        Engine.open(tmp_path / "bank")
    with pytest.raises(ConfigError, match="not both"):
        Engine.create(tmp_path / "other", "default", loaded=model)
