"""The CUDA-graph decode against eager decode and the per-token loop, on a GPU (msabank.decode).

float32 on the GPU: graph, eager and the loop (tests/test_decode.py's oracle) give the same tokens and step
logits within 1e-4, the goldens' tolerance. bf16 (what serving runs): logits within bf16 rounding, greedy
tokens parting only at a near-tie. A second generation of the same (batch, width) bucket replays the
captured graph; a failed capture falls back to eager decode, logged once, with the same tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from msabank import decode as D
from msabank.model import load_model
from msabank.prompt import question_prompt
from msabank.stages import InMemoryMemory, encode_documents, generate
from tests.test_decode import DOCS, QUESTIONS, reference_generate

pytestmark = pytest.mark.gpu


def _setup(golden: Path, dtype: torch.dtype):
    model = load_model(golden / "tiny-msa", device="cuda", dtype=dtype)
    enc = dict(zip((n for n, _ in DOCS), encode_documents(model, DOCS)))
    return model, InMemoryMemory(enc, 2, device="cuda"), [question_prompt(model.tokenizer, q) for q in QUESTIONS]


def _agree(a_tokens: list[list[int]], b_tokens: list[list[int]], a_logits: torch.Tensor, b_logits: torch.Tensor,
           tol: float) -> None:
    """bf16: step logits within `tol` while the tokens agree; where greedy tokens first differ, only a
    near-tie (top-2 margin within 2 tol) may explain it, and the steps after it are not comparable."""
    for j in range(min(a_logits.shape[0], b_logits.shape[0])):
        assert _err(a_logits[j], b_logits[j]) <= tol, f"step {j}"
        differ = [s for s in range(len(a_tokens)) if a_tokens[s][j : j + 1] != b_tokens[s][j : j + 1]]
        for s in differ:
            top = b_logits[j, s].float().topk(2).values
            assert top[0] - top[1] <= 2 * tol, f"step {j} sample {s}: tokens differ without a near-tie"
        if differ:
            return


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_graph_equals_eager_and_the_loop_float32(golden: Path, temperature: float) -> None:
    model, mem, prompts = _setup(golden, torch.float32)
    kw = dict(max_new_tokens=[9, 5, 7], stop_ids=[], temperature=temperature, seed=5)
    ref_tokens, ref_finish, ref_logits, ref_caches = reference_generate(model, prompts, mem, **kw)
    for mode in ("graph", "eager"):
        out = generate(model, prompts, mem, decode=mode, keep_logits=True, keep_cache=True, **kw)
        assert out.tokens == ref_tokens and out.finish_reasons == ref_finish, mode
        assert _err(out.step_logits, ref_logits.cpu()) <= 1e-4, mode
        for mine, ref in zip(out.cache, ref_caches):
            assert torch.equal(mine.valid, ref.valid), mode
            assert _err(mine.k, ref.k) <= 1e-4 and _err(mine.v, ref.v) <= 1e-4, mode
    assert D.captured_graphs(model) >= 1


def test_graph_stops_like_the_loop(golden: Path) -> None:
    """Stop ids and a stop_text across the 4-token first block, with the graph's device-side flags."""
    model, mem, prompts = _setup(golden, torch.float32)
    free = reference_generate(model, prompts, mem, max_new_tokens=[12] * 3, stop_ids=[])[0]
    marker = model.tokenizer.decode(free[0][4:6])  # tokens 5 and 6: the host's 2nd check is after token 5
    kw = dict(max_new_tokens=[12] * 3, stop_ids=[free[1][2]], stop_text=marker)
    ref_tokens, ref_finish, *_ = reference_generate(model, prompts, mem, **kw)
    streamed: dict[int, list[int]] = {}
    out = generate(model, prompts, mem, decode="graph", on_tokens=lambda s, ids: streamed.setdefault(s, []).extend(ids),
                   **kw)
    assert out.tokens == ref_tokens and out.finish_reasons == ref_finish
    assert streamed == dict(enumerate(ref_tokens))
    assert ref_finish[0] == ref_finish[1] == "stop"


def test_graph_is_reused_within_a_bucket(golden: Path) -> None:
    model, mem, prompts = _setup(golden, torch.bfloat16)
    a = generate(model, prompts[:2], mem, max_new_tokens=8, stop_ids=[], decode="graph", keep_logits=True)
    n = D.captured_graphs(model)
    b = generate(model, prompts[:2], mem, max_new_tokens=6, stop_ids=[], decode="graph", keep_logits=True)
    assert D.captured_graphs(model) == n  # same batch, same width bucket: replayed, not captured again
    assert b.tokens == [t[:6] for t in a.tokens]  # the same graph on the same inputs
    assert _err(b.step_logits, a.step_logits[:6]) <= 1e-3 * a.step_logits.abs().max().item()


def test_bf16_graph_equals_eager_and_the_loop(golden: Path) -> None:
    model, mem, prompts = _setup(golden, torch.bfloat16)
    kw = dict(max_new_tokens=6, stop_ids=[])
    ref_tokens, _, ref_logits, _ = reference_generate(model, prompts, mem, max_new_tokens=[6] * 3, stop_ids=[])
    graph = generate(model, prompts, mem, decode="graph", keep_logits=True, **kw)
    eager = generate(model, prompts, mem, decode="eager", keep_logits=True, **kw)
    tol = 2e-2 * ref_logits.abs().max().item()  # bf16: ~3 significant digits
    _agree(graph.tokens, eager.tokens, graph.step_logits, eager.step_logits, tol)
    _agree(graph.tokens, ref_tokens, graph.step_logits, ref_logits.cpu(), tol)


def test_failed_capture_falls_back_to_eager(golden: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    model, mem, prompts = _setup(golden, torch.float32)

    def refuse(*args, **kwargs):
        raise RuntimeError("capture refused (test)")

    monkeypatch.setattr(torch.cuda, "graph", refuse)
    monkeypatch.setattr(D, "_logged", set())
    want = generate(model, prompts, mem, max_new_tokens=5, stop_ids=[], decode="eager").tokens
    with caplog.at_level(logging.WARNING, logger="msabank.decode"):
        for _ in range(2):
            assert generate(model, prompts, mem, max_new_tokens=5, stop_ids=[], decode="graph").tokens == want
    assert D.captured_graphs(model) == 0
    assert sum("CUDA graph capture failed" in r.getMessage() for r in caplog.records) == 1


def test_compiled_graph_equals_eager(golden: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MSABANK_DECODE_COMPILE=1: the torch.compile'd step, captured (not fallen back), gives eager's tokens."""
    monkeypatch.setenv("MSABANK_DECODE_COMPILE", "1")
    model, mem, prompts = _setup(golden, torch.float32)
    kw = dict(max_new_tokens=[9, 5, 7], stop_ids=[], keep_logits=True)
    eager = generate(model, prompts, mem, decode="eager", **kw)
    graph = generate(model, prompts, mem, decode="graph", **kw)
    assert D.captured_graphs(model) == 1
    assert graph.tokens == eager.tokens
    assert _err(graph.step_logits, eager.step_logits) <= 1e-4
