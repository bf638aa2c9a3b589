"""RoutingIndex and ContentStore on CPU: search equals the reference over the live documents after any
sequence of adds, updates and removes (compaction included); content comes back in ascending number
order, deduplicated."""

from __future__ import annotations

import random

import pytest
import torch

from msabank.errors import DocumentNotFoundError, InputError
from msabank.index import ContentStore, RoutingIndex
from msabank.kernels import routing_topk_ref

R, DIM = 3, 24
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _doc_keys(g: torch.Generator, c: int) -> list[torch.Tensor]:
    # small integers: exact in bf16 and fp32, so ties are exact and the tie rule is tested
    return [torch.randint(-2, 3, (c, DIM), generator=g).float() for _ in range(R)]


def _oracle(docs: dict[int, list[torch.Tensor]], layer: int, query: torch.Tensor, k: int):
    nums = sorted(n for n in docs if docs[n][0].shape[0])
    if not nums:
        return [], []
    keys = torch.cat([docs[n][layer] for n in nums])
    row_doc = torch.cat([torch.full((docs[n][layer].shape[0],), n) for n in nums])
    s, i = routing_topk_ref(query, keys, row_doc, max(nums) + 1, k)
    return i.tolist(), s.tolist()


def _add(index: RoutingIndex, docs: dict, numbers: list[int], g: torch.Generator) -> None:
    counts = [int(torch.randint(0, 5, (1,), generator=g)) for _ in numbers]
    per_doc = [_doc_keys(g, c) for c in counts]
    index.add(numbers, counts, [torch.cat([p[l] for p in per_doc]) if per_doc else torch.empty(0, DIM) for l in range(R)])
    for n, p in zip(numbers, per_doc):
        docs[n] = p


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_search_matches_reference_through_updates(dtype, device):
    g = torch.Generator().manual_seed(0)
    rnd = random.Random(0)
    index = RoutingIndex(R, DIM, dtype=dtype, device=device)
    docs: dict[int, list[torch.Tensor]] = {}
    next_number = 0
    for step in range(40):
        op = rnd.random()
        if op < 0.5 or not docs:  # add new documents
            new = list(range(next_number, next_number + rnd.randint(1, 6)))
            next_number += len(new)
            _add(index, docs, new, g)
        elif op < 0.75:  # update: same numbers, new rows
            _add(index, docs, rnd.sample(sorted(docs), min(len(docs), rnd.randint(1, 3))), g)
        else:  # remove
            gone = rnd.sample(sorted(docs), min(len(docs), rnd.randint(1, 4)))
            index.remove(gone + [10_000])  # unknown numbers are ignored
            for n in gone:
                del docs[n]
        live = {n: d for n, d in docs.items() if d[0].shape[0]}
        assert len(index) == len(live) and index.numbers() == sorted(live)
        assert index.num_rows == sum(d[0].shape[0] for d in live.values())
        layer = step % R
        query = torch.randint(-2, 3, (rnd.randint(1, 5), DIM), generator=g).float()
        k = rnd.randint(1, 8)
        routed = index.search(layer, query, k)
        want_i, want_s = _oracle(live, layer, query, k)
        assert routed.numbers.dtype == torch.int64 and routed.scores.dtype == torch.float32
        assert routed.numbers.tolist() == want_i
        assert routed.scores.tolist() == want_s
    assert index._dead * 2 < max(1, index._size)  # compaction ran whenever half was dead


def test_capacity_grows_by_a_quarter_and_add_rows():
    g = torch.Generator().manual_seed(1)
    index = RoutingIndex(R, DIM, dtype=torch.float32)
    caps = set()
    for n in range(300):
        index.add([n], [10], [torch.randn(10, DIM, generator=g) for _ in range(R)])
        caps.add(index._capacity)
    # 3,000 rows in 6 allocations, never more than 25% slack (doubling left up to 50%)
    assert sorted(caps) == [1024, 1280, 1600, 2000, 2500, 3125]
    assert index.memory_bytes() == 3125 * (R * DIM * 4 + 4)
    # bulk load with a document split over two runs, as a storage scan may return
    other = RoutingIndex(R, DIM, dtype=torch.float32)
    rn = torch.tensor([5, 5, 2, 7, 7, 7, 5])
    keys = [torch.randn(7, DIM, generator=g) for _ in range(R)]
    other.add_rows(rn, keys)
    assert other.numbers() == [2, 5, 7] and other.num_rows == 7
    q = torch.randn(2, DIM, generator=g)
    s, i = routing_topk_ref(q, keys[1], rn, 8, 3)
    r = other.search(1, q, 3)
    assert r.numbers.tolist() == i.tolist()
    with pytest.raises(InputError):
        other.add([1, 1], [1, 1], [torch.randn(2, DIM)] * R)
    with pytest.raises(InputError):
        other.add([1], [2], [torch.randn(3, DIM)] * R)
    assert other.search(0, q[:0], 4).numbers.shape == (0,)
    assert RoutingIndex(R, DIM).search(0, q, 4).numbers.shape == (0,)  # empty index


def _content(g: torch.Generator, c: int) -> torch.Tensor:
    return torch.randn(c, R, 2, 2, 8, generator=g)


@pytest.mark.parametrize("device", DEVICES)
def test_content_store_fetch_order_dedup_and_updates(device):
    g = torch.Generator().manual_seed(2)
    store = ContentStore(R, 2, 8, dtype=torch.float32, device=device, cache_bytes=4096)
    assert store.pin is False or torch.cuda.is_available()
    truth = {}
    for n in range(50):
        truth[n] = _content(g, 1 + n % 4)
    store.add(list(truth), list(truth.values()))
    store.prefetch([3, 12])
    k, v = store.fetch(1, [7, 3, 7, 12])
    k, v = k.cpu(), v.cpu()
    want = torch.cat([truth[n][:, 1] for n in (3, 7, 12)])
    assert k.shape == (want.shape[0], 2, 8) and torch.equal(k, want[:, 0]) and torch.equal(v, want[:, 1])
    # update and remove; compaction after half the rows die
    truth[3] = _content(g, 2)
    store.add([3], [truth[3]])
    gone = list(range(10, 45))
    store.remove(gone)
    for n in gone:
        del truth[n]
    assert store._dead == 0 and len(store) == len(truth)
    for layer in range(R):
        nums = sorted(truth)
        k, v = (t.cpu() for t in store.fetch(layer, nums[::-1] + nums[:3]))
        want = torch.cat([truth[n][:, layer] for n in nums])
        assert torch.equal(k, want[:, 0]) and torch.equal(v, want[:, 1])
    with pytest.raises(DocumentNotFoundError):
        store.fetch(0, [11])
    k, v = store.fetch(0, [])
    assert k.shape == (0, 2, 8)
    store.prefetch([3])  # no-op on CPU
    with pytest.raises(InputError):
        store.add([99], [torch.randn(1, R, 2, 2, 9)])


def test_content_arena_uses_power_of_two_blocks():
    store = ContentStore(2, 1, 4, dtype=torch.bfloat16)  # 32 B per row
    store.add([0], [torch.randn(3, 2, 2, 1, 4).bfloat16()])
    assert store.memory_bytes() & (store.memory_bytes() - 1) == 0


def test_bulk_load_is_sized_once_and_takes_one_layer_at_a_time():
    """The engine's index load: reserve exactly, then layers from a generator (one in host memory at a time)."""
    g = torch.Generator().manual_seed(2)
    rows = 3000
    rn = torch.repeat_interleave(torch.arange(600), 5)
    layers = [torch.randn(rows, DIM, generator=g) for _ in range(R)]
    index = RoutingIndex(R, DIM, dtype=torch.float32)
    index.reserve(rows)
    consumed = []

    def gen():
        for i in range(R):
            consumed.append(i)
            yield layers[i]

    index.add_rows(rn, gen())
    assert consumed == list(range(R))
    assert index._capacity == rows and index.num_rows == rows and len(index) == 600
    q = torch.randn(3, DIM, generator=g)
    for layer in range(R):
        _, want = routing_topk_ref(q, layers[layer], rn, 600, 4)
        assert index.search(layer, q, 4).numbers.tolist() == want.tolist()
    # a generator that stops short (or runs long) is an error and changes nothing visible
    before = [index.search(layer, q, 4).numbers.tolist() for layer in range(R)]
    with pytest.raises(InputError, match="router layers"):
        index.add_rows(torch.tensor([7, 7]), (torch.randn(2, DIM) for _ in range(R - 1)))
    with pytest.raises(InputError, match="more than"):
        index.add_rows(torch.tensor([7, 7]), (torch.randn(2, DIM) for _ in range(R + 1)))
    assert index.num_rows == rows and len(index) == 600
    assert [index.search(layer, q, 4).numbers.tolist() for layer in range(R)] == before


def test_content_store_reserve_allocates_once():
    store = ContentStore(2, 1, 4, dtype=torch.bfloat16)  # 32 B per row
    store.reserve(100)
    arena = store._arena
    g = torch.Generator().manual_seed(3)
    for n in range(25):
        store.add([n], [torch.randn(4, 2, 2, 1, 4, generator=g).bfloat16()])
    assert store._arena is arena  # 100 rows added into the reserved arena: no regrowth
    assert store.memory_bytes() == 4096  # 3,200 B rounded up to the allocator's power of two


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_search_batch_equals_search_per_question(dtype, device):
    g = torch.Generator().manual_seed(5)
    index = RoutingIndex(R, DIM, dtype=dtype, device=device)
    docs: dict[int, list[torch.Tensor]] = {}
    _add(index, docs, list(range(30)), g)
    index.remove([4, 9])
    _add(index, docs, [2, 30], g)  # 2 superseded: dead rows in the middle
    qs = [torch.randint(-2, 3, (t, DIM), generator=g).float() for t in (3, 1, 0, 7)]
    for layer in range(R):
        got = index.search_batch(layer, qs, 5)
        assert len(got) == len(qs)
        for q, r in zip(qs, got):
            want = index.search(layer, q, 5)
            assert r.numbers.tolist() == want.numbers.tolist() and torch.equal(r.scores, want.scores)
            assert r.numbers.device.type == "cpu"
    assert index.search_batch(0, [], 5) == []


@pytest.mark.parametrize("device", DEVICES)
def test_content_store_fetch_batch_equals_fetch_per_sample(device):
    g = torch.Generator().manual_seed(3)
    store = ContentStore(R, 2, 8, dtype=torch.float32, device=device, cache_bytes=4096)  # a small pool: refills
    truth = {n: _content(g, 1 + n % 4) for n in range(40)}
    store.add(list(truth), list(truth.values()))
    store.add([5], [_content(g, 3)])  # an update: its rows move to the end of the arena
    picks = [[7, 3, 7, 12], [], [5], list(range(20, 36))]
    for layer in range(R):
        k, v, lengths = store.fetch_batch(layer, picks)
        c_max = max(store.fetch(layer, p)[0].shape[0] for p in picks)
        assert k.shape == (len(picks), 2, c_max, 8) and v.shape == k.shape
        assert lengths.device == k.device
        for s, p in enumerate(picks):
            wk, wv = store.fetch(layer, p)  # (C_s, Hkv, D)
            n = wk.shape[0]
            assert int(lengths[s]) == n
            assert torch.equal(k[s, :, :n].transpose(0, 1).cpu(), wk.cpu())
            assert torch.equal(v[s, :, :n].transpose(0, 1).cpu(), wv.cpu())
            assert not k[s, :, n:].any() and not v[s, :, n:].any()  # padding columns are zero
    k, v, lengths = store.fetch_batch(0, [[], []])
    assert k.shape == (2, 2, 0, 8) and lengths.tolist() == [0, 0]
    with pytest.raises(DocumentNotFoundError):
        store.fetch_batch(0, [[1], [99]])
