"""On CUDA: the Triton batched routing against the plain-PyTorch reference, and the batched content fetch's
bytes against the host arena (the pinned zero-copy pool path). Run with `pytest -m gpu tests/gpu`."""

from __future__ import annotations

import pytest
import torch

from msabank.index import ContentStore, RoutingIndex
from msabank.kernels import routing_topk, routing_topk_batched

pytestmark = pytest.mark.gpu


def _bank(rows: int, dim: int, num_docs: int, dtype: torch.dtype, seed: int, layers: int = 1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    keys = torch.randn(layers, rows, dim, device="cuda", generator=g).to(dtype)
    row_doc = torch.sort(torch.randint(0, num_docs, (rows,), device="cuda", generator=g)).values.to(torch.int32)
    row_doc[:: 7] = -1  # dead rows
    return keys, row_doc


@pytest.mark.parametrize("lens", [(64,), (64, 64, 64, 64, 64, 64, 64, 64), (1, 33, 0, 200, 17), (512, 64)],
                         ids=lambda x: "Q" + "x".join(map(str, x)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_triton_batched_matches_reference(lens, dtype):
    rows, dim, num_docs, k = 150_001, 1024, 50_000, 16  # not a multiple of any block; 3 top-k passes
    keys, row_doc = _bank(rows, dim, num_docs, dtype, seed=len(lens))
    keys = keys[0]
    g = torch.Generator(device="cuda").manual_seed(7)
    qs = [torch.randn(t, dim, device="cuda", generator=g) for t in lens]
    seq = torch.repeat_interleave(torch.arange(len(lens), device="cuda"), torch.tensor(lens, device="cuda"))
    query = torch.cat(qs)
    ts, ti = routing_topk_batched(query, seq, len(lens), keys, row_doc, num_docs, k, impl="triton")
    rs, ri = routing_topk_batched(query, seq, len(lens), keys, row_doc, num_docs, k, impl="torch")
    for s, q in enumerate(qs):
        single = routing_topk(q, keys, row_doc, num_docs, k, impl="triton", pad=True)[1]
        assert ti[s].tolist() == single.tolist(), s  # batched Triton == today's Triton, per question
        assert ti[s].tolist() == ri[s].tolist(), s  # and == the reference (random data: no near-ties)
    fin = torch.isfinite(rs)
    assert torch.equal(fin, torch.isfinite(ts))
    torch.testing.assert_close(ts[fin], rs[fin], atol=1e-3, rtol=1e-3)


def test_triton_all_layers_matches_per_layer():
    layers, rows, dim, num_docs, k = 18, 20_000, 1024, 7_000, 16
    keys, row_doc = _bank(rows, dim, num_docs, torch.bfloat16, seed=3, layers=layers)
    g = torch.Generator(device="cuda").manual_seed(1)
    query = torch.randn(layers, 128, dim, device="cuda", generator=g)
    seq = torch.repeat_interleave(torch.arange(2, device="cuda"), torch.tensor([64, 64], device="cuda"))
    s, i = routing_topk_batched(query, seq, 2, keys, row_doc, num_docs, k, impl="triton")
    for layer in range(layers):
        ls, li = routing_topk_batched(query[layer], seq, 2, keys[layer], row_doc, num_docs, k, impl="torch")
        assert i[layer].tolist() == li.tolist(), layer


def test_index_search_batch_on_cuda_equals_search():
    index = RoutingIndex(2, 256, device="cuda", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(1, 6, (3000,), generator=g).tolist()
    index.add(list(range(3000)), counts, [torch.randn(sum(counts), 256, generator=g).bfloat16() for _ in range(2)])
    index.remove(list(range(0, 3000, 5)))
    qs = [torch.randn(t, 256, generator=g) for t in (64, 3, 0, 40)]
    for layer in range(2):
        for q, r in zip(qs, index.search_batch(layer, qs, 16)):
            assert r.numbers.tolist() == index.search(layer, q, 16).numbers.tolist()


@pytest.mark.parametrize("pin", [True, False], ids=["pinned", "pageable"])
@pytest.mark.parametrize("cache_bytes", [8 << 20, 1 << 30], ids=["pool8MiB", "pool1GiB"])
def test_fetch_batch_bytes_equal_the_arena(pin, cache_bytes):
    """Every path (pinned zero-copy / pageable DMA, a pool that overflows / one that holds everything, the
    batched and the single-question fetch) returns the arena's bytes. (Its one H200 failure, 2026-12-02, was
    this test's own empty-selection expectation in float32, not the store.)"""
    torch.manual_seed(0)
    layers, hkv, d = 18, 8, 128
    store = ContentStore(layers, hkv, d, device="cuda", dtype=torch.bfloat16, cache_bytes=cache_bytes, pin=pin)
    truth = {n: torch.randn(1 + n % 8, layers, 2, hkv, d).bfloat16() for n in range(300)}
    for start in range(0, 300, 100):
        nums = list(range(start, start + 100))
        store.add(nums, [truth[n] for n in nums])
    picks = [torch.randperm(300)[:16].tolist() for _ in range(6)] + [[]]
    for rnd in range(2):  # the second round finds documents in the pool
        for layer in (0, 7, 17):
            k, v, lengths = store.fetch_batch(layer, picks)
            assert k.is_cuda and lengths.is_cuda
            for s, p in enumerate(picks):
                want = torch.cat([truth[n][:, layer] for n in sorted(p)]) if p else torch.empty(0, 2, hkv, d, dtype=torch.bfloat16)
                n = int(lengths[s])
                assert n == want.shape[0]
                got_k = k[s, :, :n].transpose(0, 1).cpu()
                got_v = v[s, :, :n].transpose(0, 1).cpu()
                assert torch.equal(got_k.view(torch.int16), want[:, 0].contiguous().view(torch.int16))  # bytes
                assert torch.equal(got_v.view(torch.int16), want[:, 1].contiguous().view(torch.int16))
                assert not k[s, :, n:].any()
                if p:  # the single-question path over the same pool
                    k1, v1 = store.fetch(layer, p)
                    assert torch.equal(k1.cpu().view(torch.int16), want[:, 0].contiguous().view(torch.int16))
                    assert torch.equal(v1.cpu().view(torch.int16), want[:, 1].contiguous().view(torch.int16))
    assert store.last_path in ("zero-copy", "dma")
