"""Benchmark plumbing on CPU: synthetic shards agree with the whole bank, and `msabank bench` runs on
tiny sizes and writes its JSON."""

from __future__ import annotations

import json

import torch

from msabank.bench.routing import SyntheticShard, parse_tokens, run
from msabank.kernels import routing_topk
from msabank.kernels.reference import topk_ordered


def test_shards_partition_the_bank_and_give_the_same_topk():
    kw = dict(layers=2, device=torch.device("cpu"), dtype=torch.float32, block_rows=100)
    full = SyntheticShard(64 * 450, **kw)
    parts = [SyntheticShard(64 * 450, rank=r, world_size=2, **kw) for r in range(2)]
    assert full.rows == 450 == sum(p.rows for p in parts)
    assert full.num_docs == parts[0].num_docs == parts[1].num_docs
    assert not set(parts[0].row_doc.tolist()) & set(parts[1].row_doc.tolist())
    q = torch.randn(5, full.keys[0].shape[1])
    want = routing_topk(q, *full.layer(1), 7)
    cand = [routing_topk(q, *p.layer(1), 7, pad=True) for p in parts]
    got = topk_ordered(torch.cat([c[0] for c in cand]), torch.cat([c[1] for c in cand]), 7)
    assert got[1].tolist() == want[1].tolist()
    assert parse_tokens("1.5M") == 1_500_000 and parse_tokens("100M") == 10**8


def test_bench_cli_smoke(tmp_path):
    res = run("all", out_dir=tmp_path, sizes=[20_000], q_tokens=[3], impls=["torch"], gpus=[1], layers=2, reps=1)
    saved = json.loads((tmp_path / "bench_all.json").read_text())
    assert saved["routing"]["rows"][0]["chunks_per_layer"] == 313
    assert res["fetch"]["question"]["ms"] > 0
    # the batched paths sit beside the per-question ones, and question 0 of a batch routes as when alone
    batched = [r for r in saved["routing"]["rows"] if r["impl"] == "torch-batch8"]
    assert batched and all(r["questions"] == 8 and r["read_floor_ms"] > 0 for r in batched)
    agree = saved["routing"]["agreement"][0]
    assert agree["torch-batch8"]["identical_layers"] == agree["torch-batch8"]["layers"] == 2
    assert res["fetch"]["question_batch8"]["ms"] > 0 and res["fetch"]["question_batched"]["ms"] > 0


def test_lifecycle_bench_asks_twice_and_the_second_pass_answers_the_same():
    """The lifecycle bench on a small synthetic bank (CPU): both ask passes are reported with every stage,
    the repeat asks the very same questions (greedy: the same answers), and update-to-visible is measured."""
    from msabank.bench.lifecycle import run_lifecycle_bench

    res = run_lifecycle_bench(docs=40, questions=3, device="cpu")
    assert res["ingest"]["documents"] == 40 and res["ingest"]["tokens"] > 0
    for name in ("ask", "ask_repeat"):
        a = res[name]
        assert a["questions"] == 3 and a["rounds"] >= 1
        assert a["total"] >= a["prefill"] > 0 and a["decode"] >= 0
    assert res["ask_repeat"]["same_answers"] is True
    assert res["update_to_visible"]["commit_to_answer_s"] >= res["update_to_visible"]["commit_s"] > 0
