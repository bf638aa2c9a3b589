"""routing_topk: Triton (interpreter on CPU, compiled on GPU) and the PyTorch reference against a float64
oracle, on awkward shapes: odd T, rows not a multiple of the block, dims from several GQA layouts,
k > documents, empty banks, dead rows, shuffled rows, dot and cosine rules, exact ties."""

from __future__ import annotations

import pytest
import torch

from msabank.errors import KernelUnavailableError
from msabank.kernels import normalize_per_head, routing_topk, triton_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.interpret)]

# (T, Hkv, D, rows, num_docs, k): dims are Hkv·D of GQA layouts (1x16, 2x32, 3x40, 8x16, 4x32).
SHAPES = [
    (1, 1, 16, 1, 1, 1),
    (5, 2, 32, 77, 13, 4),
    (17, 3, 40, 203, 50, 16),
    (70, 8, 16, 129, 200, 8),  # T > 64: two token blocks; more documents than rows (empty documents)
    (3, 2, 16, 20, 5, 16),  # k > documents
    (64, 4, 32, 300, 40, 16),
]


def _id(s: tuple[int, ...]) -> str:
    return "T{}-Hkv{}-D{}-R{}-N{}-K{}".format(*s)


def oracle(query: torch.Tensor, keys: torch.Tensor, row_doc: torch.Tensor, num_docs: int, k: int):
    """float64 doc scores of the rounded inputs and the exact top-k order (score desc, index asc)."""
    q = query.to(keys.dtype).double()
    doc = torch.full((num_docs,), float("-inf"), dtype=torch.float64)
    live = row_doc >= 0
    if keys.shape[0] and query.shape[0] and bool(live.any()):
        rs = (keys.double() @ q.t()).amax(dim=1)
        doc.scatter_reduce_(0, row_doc[live].long(), rs[live], reduce="amax")
    order = sorted((i for i in range(num_docs) if doc[i] > float("-inf")), key=lambda i: (-doc[i].item(), i))
    return doc, order[:k]


def assert_topk_close(got, query, keys, row_doc, num_docs, k, rtol=2e-5):
    scores, index = (t.cpu() for t in got)
    doc, want = oracle(query.cpu(), keys.cpu(), row_doc.cpu(), num_docs, k)
    assert scores.dtype == torch.float32 and index.dtype == torch.int64
    assert index.shape == (len(want),), (index.tolist(), want)
    assert torch.isfinite(scores).all()
    if not want:
        return
    tol = rtol * max(1.0, doc[want[0]].abs().item())
    torch.testing.assert_close(scores.double(), doc[want], atol=tol, rtol=0)
    assert torch.all(scores[:-1] >= scores[1:])
    for pos, (g, w) in enumerate(zip(index.tolist(), want)):
        # A different document is acceptable only as a near-tie at this rank.
        assert g == w or abs(doc[g].item() - doc[w].item()) <= tol, (pos, g, w, index.tolist(), want)
    assert len(set(index.tolist())) == len(want)


def make_case(shape, dtype, *, seed, layout="runs", cosine=False, dead=0.0):
    T, hkv, d, rows, num_docs, _ = shape
    g = torch.Generator().manual_seed(seed)
    dim = hkv * d
    keys = torch.randn(rows, dim, generator=g)
    query = torch.randn(T, dim, generator=g)
    if cosine:
        keys, query = normalize_per_head(keys, hkv), normalize_per_head(query, hkv)
    if layout == "runs":  # documents own contiguous, sorted runs of rows (the usual layout)
        row_doc = torch.sort(torch.randint(0, num_docs, (rows,), generator=g)).values
    else:  # a document's rows scattered through the bank
        row_doc = torch.randint(0, num_docs, (rows,), generator=g)
    if dead:
        row_doc = torch.where(torch.rand(rows, generator=g) < dead, -1, row_doc)
    return query.to(dtype).to(DEVICE), keys.to(dtype).to(DEVICE), row_doc.to(DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_oracle(impl, shape, dtype):
    query, keys, row_doc = make_case(shape, dtype, seed=sum(shape) * 7 + len(str(dtype)))
    got = routing_topk(query, keys, row_doc, shape[4], shape[5], impl=impl)
    assert_topk_close(got, query, keys, row_doc, shape[4], shape[5])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["runs", "scattered"])
def test_cosine_scattered_and_dead_rows(impl, layout):
    shape = (9, 4, 16, 150, 30, 7)
    query, keys, row_doc = make_case(shape, torch.float32, seed=7, layout=layout, cosine=True, dead=0.3)
    got = routing_topk(query, keys, row_doc, shape[4], shape[5], impl=impl)
    assert_topk_close(got, query, keys, row_doc, shape[4], shape[5])
    # cosine scores of normalised heads are bounded by the number of heads
    assert got[0].abs().max() <= 4 + 1e-4


@pytest.mark.parametrize("impl", IMPLS)
def test_exact_ties_take_lower_index(impl):
    # Small integers are exact in every dtype and in fp32 accumulation: many exact ties.
    g = torch.Generator().manual_seed(3)
    rows, dim, num_docs, k = 90, 32, 40, 12
    keys = torch.randint(-1, 2, (rows, dim), generator=g).float()
    query = torch.randint(-1, 2, (6, dim), generator=g).float()
    row_doc = torch.randint(0, num_docs, (rows,), generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        q, kk, rd = query.to(dtype).to(DEVICE), keys.to(dtype).to(DEVICE), row_doc.to(DEVICE)
        scores, index = routing_topk(q, kk, rd, num_docs, k, impl=impl)
        _, want = oracle(query, keys, row_doc, num_docs, k)
        assert index.cpu().tolist() == want


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_bank_and_edge_sizes(impl):
    dim = 32
    q = torch.randn(4, dim).to(DEVICE)
    empty_k = torch.empty(0, dim).to(DEVICE)
    empty_d = torch.empty(0, dtype=torch.int64).to(DEVICE)
    s, i = routing_topk(q, empty_k, empty_d, 0, 16, impl=impl)
    assert s.shape == (0,) and i.shape == (0,)
    s, i = routing_topk(q, empty_k, empty_d, 5, 16, impl=impl, pad=True)
    assert s.shape == (16,) and (i == -1).all() and torch.isinf(s).all()
    # every row dead
    keys = torch.randn(10, dim).to(DEVICE)
    s, i = routing_topk(q, keys, torch.full((10,), -1).to(DEVICE), 3, 2, impl=impl)
    assert s.shape == (0,)
    # no query tokens
    s, i = routing_topk(q[:0], keys, torch.zeros(10, dtype=torch.int64).to(DEVICE), 1, 2, impl=impl)
    assert s.shape == (0,)
    # pad with fewer documents than k
    rd = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 2]).to(DEVICE)
    s, i = routing_topk(q, keys, rd, 3, 5, impl=impl, pad=True)
    assert s.shape == (5,) and sorted(i[:3].tolist()) == [0, 1, 2] and (i[3:] == -1).all()


def test_impl_selection(monkeypatch):
    q, keys, rd = torch.randn(2, 16), torch.randn(4, 16), torch.tensor([0, 0, 1, 1])
    monkeypatch.setenv("MSABANK_KERNELS", "torch")
    assert routing_topk(q, keys, rd, 2, 1)[1].shape == (1,)
    monkeypatch.setenv("MSABANK_KERNELS", "bogus")
    with pytest.raises(ValueError):
        routing_topk(q, keys, rd, 2, 1)
    monkeypatch.delenv("MSABANK_KERNELS")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not torch.cuda.is_available():
        with pytest.raises(KernelUnavailableError):
            routing_topk(q, keys, rd, 2, 1, impl="triton")
    # auto on CPU tensors always serves (reference)
    assert routing_topk(q, keys, rd, 2, 2, impl="auto")[1].shape == (2,)
    assert triton_available() in (True, False)


@pytest.mark.interpret
def test_topk_tree_multi_pass_exact():
    # 5,000 documents: 5 blocks of 1,024, then one block of candidates; integer data for exact ties.
    g = torch.Generator().manual_seed(11)
    rows, dim, num_docs, k = 6000, 16, 5000, 20
    keys = torch.randint(-1, 2, (rows, dim), generator=g).float()
    query = torch.randint(-1, 2, (3, dim), generator=g).float()
    row_doc = torch.randint(0, num_docs, (rows,), generator=g)
    _, want = oracle(query, keys, row_doc, num_docs, k)
    s, i = routing_topk(query.to(DEVICE), keys.to(DEVICE), row_doc.to(DEVICE), num_docs, k, impl="triton")
    assert i.cpu().tolist() == want


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tma_and_pointer_scans_agree(dtype):
    from msabank.kernels import triton_routing as tr
    from msabank.kernels.reference import doc_scores_ref, row_scores_ref

    query, keys, row_doc = make_case((37, 5, 16, 333, 60, 8), dtype, seed=4)  # dim 80: BLOCK_D=64 leaves a tail
    want = doc_scores_ref(row_scores_ref(query, keys), row_doc, 60)
    for variant in ("ptr", "tma"):
        got = tr.routing_scan(query, keys, row_doc, 60, config=(variant, 64, 32, 64, 4, 1))
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
