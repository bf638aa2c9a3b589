"""`msabank bench e2e` on a CUDA device (run with `pytest -m gpu tests/gpu` on the GPU machine).

The product path (Triton routing, pinned zero-copy fetch, whatever decode path `stages.generate` takes on
CUDA) against the official-style baseline, which is plain PyTorch over the same memory: in float32 they must
select the same documents and decode the same greedy tokens. Then the whole benchmark at the tiny geometry in
bf16 and at the MSA-4B geometry over a small bank, checking every row has a floor and the card is named.
"""

from __future__ import annotations

import pytest
import torch

from msabank import stages
from msabank.bench import e2e

pytestmark = pytest.mark.gpu


def test_product_and_official_style_agree_on_cuda_in_float32() -> None:
    dev = torch.device("cuda")
    model = e2e.build_model("tiny", dev, seed=3).float()
    mem, _ = e2e.build_memory(model, real_tokens=3000, bank_tokens=200_000, seed=5)
    template = stages.template_prefix(model)
    prompts = e2e.question_prompts(model, 4, 48)
    want = stages.generate(model, prompts, mem.view(), max_new_tokens=12, stop_ids=(), template=template)
    got = e2e.official_generate(model, prompts, mem.official_view(), template, 12)
    for a, b in zip(got.routed, want.routed):
        assert [r.numbers.tolist() for r in a] == [r.numbers.tolist() for r in b]
    assert got.tokens == want.tokens


def _check(res: dict) -> None:
    assert res["card"] == torch.cuda.get_device_name() and res["dtype"] == "bfloat16"
    for r in res["rows"]:
        assert r["measured"] > 0 and r["floor"] > 0 and r["ratio"] == r["measured"] / r["floor"], r


def test_tiny_geometry_end_to_end_on_cuda() -> None:
    _check(e2e.run_e2e_bench(geometry="tiny", device="cuda", bank_tokens="1M", real_tokens="10K", batches="1,4",
                             new_tokens=8, questions=2))


def test_msa_4b_geometry_small_bank_on_cuda() -> None:
    res = e2e.run_e2e_bench(geometry="msa-4b", device="cuda", bank_tokens="2M", real_tokens="20K", ingest_tokens="10K",
                            batches="1,2", new_tokens=4, questions=1)
    _check(res)
    assert 4.2e9 < res["model"]["parameters"] < 4.3e9 and res["model"]["router_layers"] == 18
    assert res["bank"]["rows_per_layer"] >= 2_000_000 // 64
