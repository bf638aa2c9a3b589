"""gather_spans: the Triton span gather (interpreter on CPU; zero-copy from pinned memory on a GPU) and
the facade's per-document copy path, against plain slicing."""

from __future__ import annotations

import pytest
import torch

from msabank.kernels import gather_spans

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SPANS = [(7, 0, 3), (0, 3, 1), (40, 4, 10), (7, 14, 2)]  # (src row, dst row, rows)


def _want(src: torch.Tensor) -> torch.Tensor:
    return torch.cat([src[s : s + n] for s, _, n in SPANS])


@pytest.mark.interpret
@pytest.mark.parametrize("row_shape", [(3, 2, 4), (5, 3)], ids=["words64", "words32"])
def test_triton_gather_spans(row_shape):
    from msabank.kernels import triton_gather

    src = torch.randn(50, *row_shape).to(torch.bfloat16)
    spans = torch.tensor(SPANS)
    if DEVICE == "cuda":
        src, spans = src.pin_memory(), spans.pin_memory()
    out = torch.empty(16, *row_shape, dtype=torch.bfloat16, device=DEVICE)
    triton_gather.gather_spans_triton(src, spans, out, max_rows=10)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(out.cpu(), _want(src))


@pytest.mark.parametrize("impl", [None, "torch"])
def test_facade_gather_spans(impl):
    src = torch.randn(50, 6)
    spans = torch.tensor(SPANS)
    if DEVICE == "cuda":
        src, spans = src.pin_memory(), spans.pin_memory()
    out = torch.empty(16, 6, device=DEVICE)
    path = gather_spans(src, spans, out, impl=impl)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        assert path in (("zero-copy", "dma") if impl is None else ("dma",))
    assert torch.equal(out.cpu(), _want(src))
