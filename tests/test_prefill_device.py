"""The device prefill path (BankMemory.prefill_selection: routing top-k and the content fetch of every router
layer on the device, the selections to the host once) against the synced path it replaces (per layer
route_batch, numbers to the host, content_kv_batch), on the CPU in float32: selections, caches and logits
bit for bit, on the golden tiny model over banks with updated and deleted documents (the content store's
rows moved by updates and compaction), batches of prompts of different lengths, samples without routing
tokens and replayed selections. Also the row-table kernels (`kernels.selected_rows`, `gather_rows_ref`)
against `ContentStore.fetch_batch`, and the static column bound the CUDA path uses."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from msabank import stages
from msabank.errors import DocumentNotFoundError
from msabank.index import BankMemory, ContentStore, RoutingIndex
from msabank.kernels import gather_rows, gather_rows_ref, selected_rows
from msabank.model import MSAModel, load_model
from msabank.prompt import Prompt, question_prompt
from msabank.types import EncodedMemory, Routed

WORDS = "lighthouse keeper gull point copper kettle garden river stone winter harbour lantern bread".split()


@pytest.fixture(scope="module")
def model(golden: Path) -> MSAModel:
    return load_model(golden / "tiny-msa")


def _text(rnd: random.Random) -> str:
    return " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 30)))


def _bank(model: MSAModel, seed: int, top_k: int | None = None, *, device: str = "cpu",
          dtype: torch.dtype = torch.float32) -> BankMemory:
    """A RoutingIndex + ContentStore over random documents after adds, updates and deletes (dead rows,
    rows moved to the arena's end, compaction); on CUDA the arena is pinned. Also the GPU tests' bank."""
    cfg = model.config
    rnd = random.Random(seed)
    index = RoutingIndex(len(cfg.router_layers), cfg.num_kv_heads * cfg.head_dim, dtype=dtype, device=device)
    content = ContentStore(len(cfg.router_layers), cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device)

    def put(numbers: list[int]) -> None:
        enc: list[EncodedMemory] = stages.encode_documents(model, [(n, _text(rnd)) for n in numbers])
        index.add(numbers, [e.num_chunks for e in enc],
                  [torch.cat([e.routing_keys[r].reshape(e.num_chunks, -1) for e in enc]).to(device, dtype)
                   for r in range(len(cfg.router_layers))])
        content.add(numbers, [torch.stack([e.content_k, e.content_v], dim=2).transpose(0, 1).cpu().to(dtype) for e in enc])

    put(list(range(12)))
    put(rnd.sample(range(12), 4))  # updates: the new rows go to the arena's end
    gone = rnd.sample(range(12), 3)
    index.remove(gone)
    content.remove(gone)
    put([12, 13, 20])
    put(rnd.sample(sorted(content._segs.ranges), 5))  # more updates: compaction on the way
    return BankMemory(index, content, top_k or cfg.top_k)


def _batch(model: MSAModel, prompts: list[Prompt]) -> stages.PaddedPrompts:
    t0 = stages.template_prefix(model)[0].shape[2]
    return stages.pad_batch(prompts, pad_id=model.tokenizer.pad_id, first_position=t0 + model.config.top_k)


def _run(model: MSAModel, mem: BankMemory, prompts: list[Prompt], selected=None, device: bool = True):
    mem.device_prefill = device
    calls: list[tuple[int, int, list[int]]] = []
    template = stages.template_prefix(model)
    with torch.inference_mode():
        batch = _batch(model, prompts)
        batch = stages.PaddedPrompts(*(x.to(model.device) for x in (batch.input_ids, batch.attention_mask,
                                                                      batch.routing_mask, batch.positions)))
        caches, routed, logits = stages._prefill(model, batch, mem, template, 4,
                                                 lambda s, r, sel: calls.append((s, r, sel.numbers.tolist())), None,
                                                 selected)
    return caches, routed, logits, calls


def _same_routed(a: list[list[Routed]], b: list[list[Routed]]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert len(ra) == len(rb)
        for x, y in zip(ra, rb):
            assert x.numbers.dtype == y.numbers.dtype == torch.int64 and x.scores.dtype == y.scores.dtype == torch.float32
            assert x.numbers.tolist() == y.numbers.tolist() and torch.equal(x.scores, y.scores)


def _prompts(model: MSAModel) -> list[Prompt]:
    tok = model.tokenizer
    ps = [question_prompt(tok, q) for q in ("Who kept the lighthouse on gull point?", "kettle?",
                                             "Which river runs past the stone garden in winter, and why?")]
    silent = question_prompt(tok, "bread")
    ps.append(Prompt(ids=silent.ids, routing_mask=[False] * len(silent.ids)))  # no routing token
    return ps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_device_path_equals_synced_path_bit_for_bit(model: MSAModel, seed: int) -> None:
    mem = _bank(model, seed)
    prompts = _prompts(model)
    got = _run(model, mem, prompts, device=True)
    want = _run(model, mem, prompts, device=False)
    _same_routed(got[1], want[1])
    assert all(r.numbers.numel() == 0 for r in got[1][3])  # the silent sample routes to nothing
    assert any(r.numbers.numel() for r in got[1][0])
    assert got[3] == want[3]  # on_route: the same calls, layer by layer (fired after the last layer)
    assert [r for _, r, _ in got[3]] == sorted(r for _, r, _ in got[3])
    for cg, cw in zip(got[0], want[0]):
        assert cg.prompt_start == cw.prompt_start
        assert torch.equal(cg.k, cw.k) and torch.equal(cg.v, cw.v) and torch.equal(cg.valid, cw.valid)
    assert torch.equal(got[2], want[2])


def test_device_path_replays_given_selections(model: MSAModel) -> None:
    mem = _bank(model, 3)
    prompts = _prompts(model)
    first = _run(model, mem, prompts, device=True)[1]
    other = _run(model, _bank(model, 4), prompts, device=True)[1]  # another bank's picks: a real replay
    live = set(mem.content._segs.ranges)

    def replay(r: Routed) -> Routed:  # another bank's picks that exist here, plus one more: wider than top_k
        ns = sorted({n for n in r.numbers.tolist() if n in live} | {min(live), max(live)})
        return Routed(numbers=torch.tensor(ns[::-1]), scores=torch.arange(len(ns), dtype=torch.float32))

    given = [[replay(r) for r in other[0]], None, first[2], None]
    got = _run(model, mem, prompts, given, device=True)
    want = _run(model, mem, prompts, given, device=False)
    _same_routed(got[1], want[1])
    assert got[1][0] == given[0] and got[1][2] == first[2]  # replayed as given (the objects themselves)
    for cg, cw in zip(got[0], want[0]):
        assert torch.equal(cg.k, cw.k) and torch.equal(cg.valid, cw.valid)
    assert torch.equal(got[2], want[2])


def test_generate_through_the_device_path_equals_the_synced_path(model: MSAModel) -> None:
    mem = _bank(model, 5)
    prompts = _prompts(model)[:3]
    out = {}
    for device in (True, False):
        mem.device_prefill = device
        out[device] = stages.generate(model, prompts, mem, max_new_tokens=5, stop_ids=())
    assert out[True].tokens == out[False].tokens
    assert torch.equal(out[True].first_logits, out[False].first_logits)
    _same_routed(out[True].routed, out[False].routed)
    assert mem.route_s > 0 and mem.fetch_s > 0  # host-timed on CPU, both paths


def test_static_column_bound_changes_only_padding(model: MSAModel) -> None:
    """The CUDA layout on the CPU: columns = top_k × the largest documents' chunks, bucketed. The real
    columns hold what the exact path holds and everything past them is zero and not valid. Masked padding
    adds exact zeros to the softmax sums, but SDPA blocks a longer row differently, so from the first
    router layer's attention output on, values agree to float rounding (not bit for bit)."""
    mem = _bank(model, 6)
    prompts = _prompts(model)
    exact = _run(model, mem, prompts, device=True)
    real = mem.prefill_selection
    mem.prefill_selection = lambda n, given=None: real(n, given, static_columns=True)  # type: ignore[method-assign]
    static = _run(model, mem, prompts, device=True)
    for ra, rb in zip(static[1], exact[1]):
        for x, y in zip(ra, rb):
            assert x.numbers.tolist() == y.numbers.tolist()
            torch.testing.assert_close(x.scores, y.scores, rtol=0, atol=1e-5)
    t0 = stages.template_prefix(model)[0].shape[2]
    t = _batch(model, prompts).input_ids.shape[1]
    first = model.config.router_layers[0]
    for i, (ce, cs) in enumerate(zip(exact[0], static[0])):
        c_e, c_s = ce.prompt_start - t0, cs.prompt_start - t0
        if i < first:  # below the first router layer: the template alone, the same bits
            assert c_e == c_s == 0 and torch.equal(cs.k, ce.k)
            continue
        assert c_s % 64 == 0 and c_s >= mem.content.column_bound(mem.top_k) >= c_e
        same = torch.equal if i == first else (lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=1e-5) or True)
        assert same(cs.k[:, :, : ce.prompt_start], ce.k[:, :, : ce.prompt_start])
        assert same(cs.v[:, :, : ce.prompt_start], ce.v[:, :, : ce.prompt_start])
        assert torch.equal(cs.valid[:, : ce.prompt_start], ce.valid[:, : ce.prompt_start])
        assert not cs.valid[:, ce.prompt_start : cs.prompt_start].any()
        assert not cs.k[:, :, ce.prompt_start : cs.prompt_start].any()
        assert same(cs.k[:, :, cs.prompt_start : cs.prompt_start + t], ce.k[:, :, ce.prompt_start : ce.prompt_start + t])
        assert torch.equal(cs.valid[:, cs.prompt_start :][:, :t], ce.valid[:, ce.prompt_start :][:, :t])
    torch.testing.assert_close(static[2], exact[2], rtol=0, atol=1e-4)


def test_synced_fallbacks(model: MSAModel) -> None:
    mem = _bank(model, 7)
    assert mem.prefill_selection(2) is not None
    mem.device_prefill = False
    assert mem.prefill_selection(2) is None
    mem.device_prefill = True
    import msabank.index as I

    old = I.MAX_STATIC_COLUMNS
    try:
        I.MAX_STATIC_COLUMNS = 0
        assert mem.prefill_selection(2, static_columns=True) is None  # a bound past the limit
        assert mem.prefill_selection(2) is not None  # exact columns on CPU
    finally:
        I.MAX_STATIC_COLUMNS = old
    sharded = BankMemory(object(), mem.content, mem.top_k)  # memory parallel: not a RoutingIndex
    assert sharded.prefill_selection(2) is None


def test_index_and_store_disagreeing_is_an_error(model: MSAModel) -> None:
    mem = _bank(model, 8, top_k=64)  # every live document is selected
    victim = max(mem.content._segs.ranges)
    mem.content.remove([victim])
    with pytest.raises(DocumentNotFoundError):
        _run(model, mem, _prompts(model)[:1], device=True)


def _store(seed: int) -> tuple[ContentStore, dict[int, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    store = ContentStore(3, 2, 4, dtype=torch.float32)
    truth: dict[int, torch.Tensor] = {}

    def put(ns: list[int]) -> None:
        cs = [torch.randn(int(torch.randint(0, 5, (1,), generator=g)), 3, 2, 2, 4, generator=g) for _ in ns]
        store.add(ns, cs)
        truth.update(zip(ns, cs))

    put(list(range(30)))
    put([3, 7, 11, 29])
    store.remove([5, 6, 20])
    for n in (5, 6, 20):
        del truth[n]
    put([40, 7])
    return store, truth


@pytest.mark.parametrize("seed", [0, 1])
def test_selected_rows_and_gather_equal_fetch_batch(seed: int) -> None:
    store, truth = _store(seed)
    rnd = random.Random(seed)
    live = sorted(store._segs.ranges)  # documents with chunks (a 0-chunk document has no content)
    picks = [rnd.sample(live, 6), [], [live[0]], rnd.sample(live, 3) + [-1, -1], [live[2], live[2], live[1]]]
    k = 6
    numbers = torch.tensor([(p + [-1] * k)[:k] for p in picks])  # unsorted, padded, a repeat
    start, count = store.document_table()
    bound = store.column_bound(k)
    for layer in range(3):
        want_k, want_v, want_len = store.fetch_batch(layer, [[n for n in p if n >= 0] for p in picks])
        rows, lengths = selected_rows(numbers, start, count, None)
        got_k, got_v, path = gather_rows(store._arena, layer, rows)
        assert path == "torch" and torch.equal(lengths, want_len)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
        rows_b, lengths_b = selected_rows(numbers, start, count, bound)
        assert rows_b.shape == (len(picks), bound) and torch.equal(lengths_b, want_len)
        assert torch.equal(rows_b[:, : rows.shape[1]], rows) and (rows_b[:, rows.shape[1] :] == -1).all()
        bk, bv = gather_rows_ref(store._arena, layer, rows_b)
        assert torch.equal(bk[:, :, : rows.shape[1]], want_k) and not bk[:, :, rows.shape[1] :].any()
    for s, p in enumerate(picks):  # ascending numbers, each document's rows in order
        ns = sorted({n for n in p if n >= 0})
        expect = [r for n in ns for r in range(*(lambda a, c: (a, a + c))(*store._segs.ranges[n][0]))] if ns else []
        assert rows[s, : len(expect)].tolist() == expect


def test_column_bound_is_the_k_largest_documents() -> None:
    store, truth = _store(2)
    sizes = sorted((t.shape[0] for t in truth.values()), reverse=True)
    assert store.column_bound(3) == sum(sizes[:3]) and store.column_bound(1000) == sum(sizes)
    store.add([41], [torch.zeros(9, 3, 2, 2, 4)])  # a bank change rebuilds the table
    assert store.column_bound(1) == 9 and int(store.document_table()[1][41]) == 9


def test_selected_rows_of_an_empty_table() -> None:
    rows, lengths = selected_rows(torch.full((2, 3), -1), torch.zeros(0, dtype=torch.long),
                                  torch.zeros(0, dtype=torch.long), 8)
    assert rows.shape == (2, 8) and (rows == -1).all() and lengths.tolist() == [0, 0]
    k, v = gather_rows_ref(torch.zeros(0, 3, 2, 2, 4), 1, rows)
    assert k.shape == (2, 2, 8, 4) and not k.any()
