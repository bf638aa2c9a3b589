"""Host syncs and graph memory of CUDA decode (msabank.decode, stages.generate), on a GPU.

Decode's small inputs (limits, columns, stop ids) go up in one non-blocking copy, the first
block follows the prefill's token on the device unseen, and the prefill's logits come to the host after
decode: a decode of 20 tokens in graph mode synchronises once per host block (blocks 4, 8, 7: three),
counted with torch.cuda.set_sync_debug_mode. The graph LRU drops graphs by bytes (GRAPH_BYTES_PER_MODEL).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
import torch

from msabank import decode as D
from msabank import stages
from msabank.model import load_model
from msabank.prompt import question_prompt
from msabank.stages import InMemoryMemory, encode_documents, generate
from tests.test_decode import DOCS, QUESTIONS

pytestmark = pytest.mark.gpu


def _setup(golden: Path):
    model = load_model(golden / "tiny-msa", device="cuda", dtype=torch.float32)
    enc = dict(zip((n for n, _ in DOCS), encode_documents(model, DOCS)))
    return model, InMemoryMemory(enc, 2, device="cuda"), [question_prompt(model.tokenizer, q) for q in QUESTIONS]


def _decode_counting_syncs(model, mem, prompts, n: int):
    tok = model.tokenizer
    template = stages.template_prefix(model)
    host = stages.pad_batch(prompts, pad_id=tok.pad_id, first_position=template[0].shape[2] + model.config.top_k)
    batch = stages._upload_batch(host, model.device)
    with torch.inference_mode():
        caches, _, logits = stages._prefill(model, batch, mem, template, n, None, None)
        torch.cuda.synchronize()
        t = batch.input_ids.shape[1]
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = D.decode(model, [c.k for c in caches], [c.v for c in caches], [c.valid for c in caches],
                               [c.prompt_start + t for c in caches], logits, batch.positions[:, -1],
                               limits=[n] * len(prompts), stop_ids=[], stop_text=None, tokenizer=tok,
                               choose=stages._choose, mode="graph")
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return out, [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]


def test_graph_decode_syncs_once_per_host_block(golden: Path) -> None:
    model, mem, prompts = _setup(golden)
    _decode_counting_syncs(model, mem, prompts, 20)  # captures the graph (capture syncs)
    out, syncs = _decode_counting_syncs(model, mem, prompts, 20)
    assert [len(t) for t in out.tokens] == [20] * 3
    ref = generate(model, prompts, mem, max_new_tokens=20, stop_ids=[], decode="eager")
    assert out.tokens == ref.tokens
    assert len(syncs) == 3, syncs  # blocks of 4 (unseen after the prefill), 8, 7: one round trip after each


def test_timings_split_without_a_sync_between_prefill_and_decode(golden: Path) -> None:
    model, mem, prompts = _setup(golden)
    generate(model, prompts, mem, max_new_tokens=12, stop_ids=[])  # warm-up, graph captured
    timings: dict[str, float] = {}
    t = time.perf_counter()
    out = generate(model, prompts, mem, max_new_tokens=12, stop_ids=[], timings=timings, keep_logits=True)
    wall = time.perf_counter() - t
    assert timings["prefill_s"] > 0 and timings["decode_s"] > 0
    assert timings["prefill_s"] + timings["decode_s"] <= wall + 1e-3
    assert out.first_logits.device.type == "cpu" and torch.equal(out.first_logits, out.step_logits[0])


def test_graph_lru_drops_by_bytes_on_cuda(golden: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, mem, prompts = _setup(golden)
    monkeypatch.setattr(D, "_GRAPHS", type(D._GRAPHS)())
    small = generate(model, prompts, mem, max_new_tokens=4, stop_ids=[], decode="graph")
    assert D.captured_graphs(model) == 1
    one = sum(g.nbytes for g in D._GRAPHS[model].lru.values())
    monkeypatch.setattr(D, "GRAPH_BYTES_PER_MODEL", one + 1)  # not room for a second, wider graph
    big = generate(model, prompts, mem, max_new_tokens=300, stop_ids=[], decode="graph")
    assert D.captured_graphs(model) == 1 and next(iter(D._GRAPHS[model].lru.values())).nbytes > one
    assert small.tokens == generate(model, prompts, mem, max_new_tokens=4, stop_ids=[], decode="eager").tokens
    assert big.tokens == generate(model, prompts, mem, max_new_tokens=300, stop_ids=[], decode="eager").tokens
