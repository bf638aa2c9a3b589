"""Stage behaviour beyond the goldens: sampling, stopping, small memories, ties, cosine keys, batching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from msabank.model import load_model
from msabank.prompt import question_prompt
from msabank.stages import InMemoryMemory, encode_documents, generate
from msabank.types import EncodedMemory

DOCS = [(0, "Mira planted."), (1, "The lighthouse keeper on Gull Point ret."), (2, "Copper kettles.")]


@pytest.fixture(scope="module")
def setup(golden: Path):
    model = load_model(golden / "tiny-msa")
    enc = dict(zip((n for n, _ in DOCS), encode_documents(model, DOCS)))
    return model, enc


def test_encoding_is_independent_of_batching(setup) -> None:
    model, enc = setup
    alone = encode_documents(model, DOCS[1:2])[0]
    packed = encode_documents(model, DOCS, max_tokens_per_batch=10_000)[1]
    assert torch.allclose(alone.content_k, packed.content_k, atol=1e-5)
    assert alone.num_chunks == -(-alone.n_tokens // model.config.chunk_size)


def test_seeded_sampling_is_reproducible_and_greedy_is_deterministic(setup) -> None:
    model, enc = setup
    mem = InMemoryMemory(enc, 2)
    p = [question_prompt(model.tokenizer, "Who planted?")]
    kw = dict(max_new_tokens=6, stop_ids=[])
    a = generate(model, p, mem, temperature=1.0, top_p=0.9, seed=1, **kw).tokens
    assert a == generate(model, p, mem, temperature=1.0, top_p=0.9, seed=1, **kw).tokens
    assert generate(model, p, mem, **kw).tokens == generate(model, p, mem, **kw).tokens


def test_stop_id_ends_generation_and_is_reported(setup) -> None:
    model, enc = setup
    mem = InMemoryMemory(enc, 2)
    p = question_prompt(model.tokenizer, "Who planted?")
    free = generate(model, p.ids, mem, routing_mask=p.routing_mask, max_new_tokens=5, stop_ids=[])
    stop = free.tokens[0][2]
    out = generate(model, p.ids, mem, routing_mask=p.routing_mask, max_new_tokens=5, stop_ids=[stop])
    assert out.tokens[0] == free.tokens[0][: free.tokens[0].index(stop) + 1]
    assert out.finish_reasons == ["stop"] and free.finish_reasons == ["length"]


def test_top_k_larger_than_memory_and_batch_equals_singles(setup) -> None:
    model, enc = setup
    mem = InMemoryMemory({2: enc[2]}, 16)
    qs = [question_prompt(model.tokenizer, q) for q in ("Who planted?", "When did the keeper retire?")]
    both = generate(model, qs, mem, max_new_tokens=4, stop_ids=[])
    for b, q in enumerate(qs):
        one = generate(model, [q], mem, max_new_tokens=4, stop_ids=[])
        assert one.tokens[0] == both.tokens[b]
        assert torch.allclose(one.first_logits[0], both.first_logits[b], atol=1e-4)
    assert all(r.numbers.tolist() == [2] for s in both.routed for r in s)


def test_ties_go_to_the_lower_number_and_k_is_capped() -> None:
    def doc(value: float, chunks: int = 2) -> EncodedMemory:
        t = torch.full((1, chunks, 2, 4), value)
        return EncodedMemory(n_tokens=chunks * 4, routing_keys=t, content_k=t, content_v=t)

    mem = InMemoryMemory({7: doc(1.0), 3: doc(1.0), 5: doc(0.5, 1)}, 2)
    routed = mem.route(0, torch.ones(3, 8))
    assert routed.numbers.tolist() == [3, 7] and routed.scores.tolist() == [8.0, 8.0]
    assert InMemoryMemory({5: doc(0.5)}, 16).route(0, torch.ones(1, 8)).numbers.tolist() == [5]
    k, v = mem.content_kv(0, [7, 5])
    assert k.shape == (3, 2, 4)  # doc 5 (1 chunk) then doc 7 (2 chunks), ascending numbers


def test_cosine_rule_stores_unit_routing_keys(golden: Path) -> None:
    model = load_model(golden / "tiny-msa", routing_rule="cosine")
    enc: EncodedMemory = encode_documents(model, DOCS[:1])[0]
    assert torch.allclose(enc.routing_keys.norm(dim=-1), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("rule", ["dot", "cosine"])
def test_traced_routing_query_is_the_query_as_scored(golden: Path, rule: str) -> None:
    """Under cosine routing (aux_loss_method INFONCE) the official routing-query intermediate is the per-head
    L2-normalised query; under dot it is the raw router_q_proj output."""
    model = load_model(golden / "tiny-msa", routing_rule=rule)
    mem = InMemoryMemory(dict(zip((n for n, _ in DOCS), encode_documents(model, DOCS))), 2)
    traces: dict[str, torch.Tensor] = {}
    generate(model, [question_prompt(model.tokenizer, "Who planted?")], mem, max_new_tokens=1,
             trace=lambda name, x: traces.setdefault(name, x.clone()))
    layer = model.config.router_layers[0]
    norms = traces[f"prefill/L{layer}/routing_q"].norm(dim=-1)  # (B, H, T)
    assert torch.allclose(norms, torch.ones(()), atol=1e-5) == (rule == "cosine")
