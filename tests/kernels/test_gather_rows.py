"""gather_rows: the prefill's per-layer content gather from a device-side row table (Triton under the
interpreter on CPU, zero-copy from pinned memory on a GPU) against `reference.gather_rows_ref`."""

from __future__ import annotations

import pytest
import torch

from msabank.kernels import gather_rows, gather_rows_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROWS = [[5, 6, 7, 30, -1, -1], [39, 0, 1, -1, -1, -1], [-1] * 6]  # (S, C), -1: padding


@pytest.mark.interpret
@pytest.mark.parametrize("shape", [(3, 2, 2, 8), (2, 2, 3, 5)], ids=["pow2", "odd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_gather_rows_equals_reference(shape, dtype):
    from msabank.kernels import triton_gather

    g = torch.Generator().manual_seed(0)
    src = torch.randn(40, *shape, generator=g).to(dtype)
    rows = torch.tensor(ROWS)
    _, _, hkv, d = shape
    if DEVICE == "cuda":
        src = src.pin_memory()
    for layer in range(shape[0]):
        out = torch.full((2, 3, hkv, 6, d), 7.0, dtype=dtype, device=DEVICE)  # padding must be written as 0
        triton_gather.gather_rows_triton(src, layer, rows.to(DEVICE), out)
        k, v = gather_rows_ref(src, layer, rows)
        assert torch.equal(out[0].cpu(), k) and torch.equal(out[1].cpu(), v)
        assert not out[:, 2].any()


def test_triton_gather_rows_checks_shapes():
    pytest.importorskip("triton")
    from msabank.kernels import triton_gather

    src = torch.zeros(4, 2, 2, 2, 8)
    with pytest.raises(ValueError):
        triton_gather.gather_rows_triton(src, 0, torch.zeros(3, 6, dtype=torch.long), torch.zeros(2, 3, 2, 5, 8))


def test_facade_gather_rows_on_the_rows_device():
    src = torch.randn(40, 3, 2, 2, 8)
    if DEVICE == "cuda":
        src = src.pin_memory()
    rows = torch.tensor(ROWS, device=DEVICE)
    k, v, path = gather_rows(src, 1, rows)
    assert path == ("zero-copy" if DEVICE == "cuda" else "torch")
    assert k.device == rows.device and k.shape == (3, 2, 6, 8)
    wk, wv = gather_rows_ref(src, 1, rows.cpu())
    assert torch.equal(k.cpu(), wk) and torch.equal(v.cpu(), wv)
