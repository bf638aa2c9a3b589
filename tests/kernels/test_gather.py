"""gather_rows: the Triton row gather (interpreter on CPU; zero-copy from pinned memory on a GPU) and the
facade's fallbacks against plain indexing."""

from __future__ import annotations

import pytest
import torch

from msabank.kernels import gather_rows

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.interpret
@pytest.mark.parametrize("row_shape", [(3, 2, 4), (5, 3)], ids=["words64", "words32"])
def test_triton_gather_rows(row_shape):
    from msabank.kernels import triton_gather

    src = torch.randn(50, *row_shape).to(torch.bfloat16)
    if DEVICE == "cuda":
        src = src.pin_memory()
    index = torch.tensor([7, 0, 49, 7, 13], device=DEVICE)
    out = torch.empty(5, *row_shape, dtype=torch.bfloat16, device=DEVICE)
    triton_gather.gather_rows_triton(src, index, out)
    assert torch.equal(out.cpu(), src[index.cpu()])


def test_facade_gather_rows():
    src = torch.randn(20, 6)
    index = torch.tensor([3, 3, 19, 0], device=DEVICE)
    out = torch.empty(4, 6, device=DEVICE)
    path = gather_rows(src.pin_memory() if DEVICE == "cuda" else src, index, out)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        assert path in ("zero-copy", "staged")
    assert torch.equal(out.cpu(), src[index.cpu()])
