"""routing_topk_batched: several questions in one scan equal one routing_topk per question, exactly (ids and
scores), for the reference (CPU path) and the Triton kernel (interpreter on CPU): random shapes, questions
without query rows, one document, exact ties, dead rows, k > documents, every router layer at once."""

from __future__ import annotations

import pytest
import torch

from msabank.kernels import routing_topk, routing_topk_batched
from msabank.kernels.reference import span_index

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.interpret)]

# (question lengths, dim, rows, num_docs, k)
CASES = [
    ((5,), 32, 77, 13, 4),
    ((3, 0, 17, 1), 48, 203, 50, 16),  # an empty question between others; dim 48 leaves a BLOCK_D tail
    ((70, 9), 32, 129, 200, 8),  # 70 rows: a question spans two token blocks; more documents than rows
    ((2, 2, 2, 2, 2), 16, 20, 5, 16),  # k > documents; five questions inside one token block
    ((4, 6), 16, 30, 1, 3),  # one document
    ((0, 0), 16, 30, 4, 2),  # no query rows at all
]


def _id(c: tuple) -> str:
    return "Q{}-dim{}-R{}-N{}-K{}".format("x".join(map(str, c[0])), *c[1:])


def _case(case: tuple, dtype: torch.dtype, seed: int, *, integer: bool = False, dead: float = 0.0):
    lens, dim, rows, num_docs, _ = case
    g = torch.Generator().manual_seed(seed)
    if integer:  # small integers: exact in every dtype and in fp32 sums, so many exact ties
        keys = torch.randint(-1, 2, (rows, dim), generator=g).float()
        qs = [torch.randint(-1, 2, (t, dim), generator=g).float() for t in lens]
    else:
        keys = torch.randn(rows, dim, generator=g)
        qs = [torch.randn(t, dim, generator=g) for t in lens]
    row_doc = torch.sort(torch.randint(0, num_docs, (rows,), generator=g)).values
    if dead:
        row_doc = torch.where(torch.rand(rows, generator=g) < dead, -1, row_doc)
    qs = [q.to(dtype).to(DEVICE) for q in qs]
    return qs, keys.to(dtype).to(DEVICE), row_doc.to(DEVICE)


def _batched(qs: list[torch.Tensor], keys, row_doc, num_docs: int, k: int, impl: str):
    seq = torch.repeat_interleave(torch.arange(len(qs)), torch.tensor([q.shape[0] for q in qs], dtype=torch.long))
    query = torch.cat(qs) if qs else torch.empty(0, keys.shape[1], dtype=keys.dtype)
    return routing_topk_batched(query, seq.to(keys.device), len(qs), keys, row_doc, num_docs, k, impl=impl)


def _assert_each_question_equal(got, qs, keys, row_doc, num_docs, k, impl):
    scores, index = (t.cpu() for t in got)
    assert scores.shape == (len(qs), k) and index.shape == (len(qs), k)
    assert scores.dtype == torch.float32 and index.dtype == torch.int64
    for s, q in enumerate(qs):
        ws, wi = (t.cpu() for t in routing_topk(q, keys, row_doc, num_docs, k, impl=impl, pad=True))
        assert index[s].tolist() == wi.tolist(), (s, index[s].tolist(), wi.tolist())
        if impl == "torch":  # the reference runs the same GEMM per question: bit for bit
            assert torch.equal(scores[s], ws), (s, scores[s], ws)
        else:  # compiled, a different tile config may order the fp32 sums differently
            torch.testing.assert_close(scores[s], ws, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batched_equals_one_call_per_question(impl, case, dtype):
    qs, keys, row_doc = _case(case, dtype, seed=len(case[0]) * 31 + case[2])
    got = _batched(qs, keys, row_doc, case[3], case[4], impl)
    _assert_each_question_equal(got, qs, keys, row_doc, case[3], case[4], impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_batched_exact_ties_and_dead_rows(impl):
    case = ((6, 1, 11), 32, 150, 40, 12)
    qs, keys, row_doc = _case(case, torch.float32, seed=5, integer=True, dead=0.3)
    got = _batched(qs, keys, row_doc, 40, 12, impl)
    _assert_each_question_equal(got, qs, keys, row_doc, 40, 12, impl)
    # ties really happen here, and go to the lower document index
    s, i = (t.cpu() for t in got)
    ties = [(a, b) for row_s, row_i in zip(s, i) for a, b in zip(zip(row_s, row_i), zip(row_s[1:], row_i[1:]))
            if a[0] == b[0] and a[1] >= 0 and b[1] >= 0]
    assert ties and all(a[1] < b[1] for a, b in ties)


@pytest.mark.parametrize("impl", IMPLS)
def test_questions_out_of_order_and_empty_bank(impl):
    qs, keys, row_doc = _case(((4, 7, 3), 16, 60, 9, 3), torch.float32, seed=9)
    seq = torch.tensor([2] * 3 + [0] * 4 + [1] * 7)  # rows grouped by question, but not in question order
    query = torch.cat([qs[2], qs[0], qs[1]])
    s, i = routing_topk_batched(query, seq.to(DEVICE), 3, keys, row_doc, 9, 3, impl=impl)
    for b in range(3):
        assert i[b].cpu().tolist() == routing_topk(qs[b], keys, row_doc, 9, 3, impl=impl, pad=True)[1].cpu().tolist()
    empty = torch.empty(0, 16, device=DEVICE)
    s, i = routing_topk_batched(query, seq.to(DEVICE), 3, empty, torch.empty(0, dtype=torch.long, device=DEVICE), 0, 4,
                                impl=impl)
    assert s.shape == (3, 4) and torch.isinf(s).all() and (i == -1).all()


@pytest.mark.interpret
def test_all_layers_in_one_launch_equal_one_layer_at_a_time():
    g = torch.Generator().manual_seed(2)
    layers, rows, dim, num_docs, k, lens = 3, 90, 32, 25, 5, (3, 8)
    keys = torch.randn(layers, rows, dim, generator=g).to(DEVICE)
    row_doc = torch.sort(torch.randint(0, num_docs, (rows,), generator=g)).values.to(DEVICE)
    query = torch.randn(layers, sum(lens), dim, generator=g).to(DEVICE)
    seq = torch.repeat_interleave(torch.arange(2), torch.tensor(lens)).to(DEVICE)
    s, i = routing_topk_batched(query, seq, 2, keys, row_doc, num_docs, k, impl="triton")
    assert s.shape == (layers, 2, k)
    rs, ri = routing_topk_batched(query, seq, 2, keys, row_doc, num_docs, k, impl="torch")
    for layer in range(layers):
        one_s, one_i = routing_topk_batched(query[layer], seq, 2, keys[layer], row_doc, num_docs, k, impl="triton")
        assert torch.equal(i[layer], one_i) and torch.equal(s[layer], one_s)
        assert i[layer].tolist() == ri[layer].tolist()


@pytest.mark.interpret
def test_topk_tree_batched_multi_pass():
    from msabank.kernels.triton_routing import _topk_tree_batched

    g = torch.Generator().manual_seed(4)
    scores = torch.randint(-3, 4, (3, 2500), generator=g).float()  # 3 blocks of 1,024, many exact ties
    scores[1, 100:] = float("-inf")
    s, i = _topk_tree_batched(scores.to(DEVICE), 7)
    for row in range(3):
        order = sorted((j for j in range(2500) if scores[row, j] > float("-inf")), key=lambda j: (-scores[row, j], j))[:7]
        assert i[row].cpu().tolist() == order


def test_span_index_lays_samples_side_by_side():
    index, lengths = span_index(torch.tensor([10, 3, 7, 0]), torch.tensor([2, 1, 3, 0]), torch.tensor([0, 0, 2, 2]), 4)
    assert lengths.tolist() == [3, 0, 3, 0]
    assert index.tolist() == [[10, 11, 3], [-1, -1, -1], [7, 8, 9], [-1, -1, -1]]
    index, lengths = span_index(*(torch.empty(0, dtype=torch.long),) * 3, 2)
    assert index.shape == (2, 0) and lengths.tolist() == [0, 0]
