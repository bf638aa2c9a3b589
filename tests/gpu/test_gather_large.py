"""On CUDA: the zero-copy row gather at arena offsets past 2^31 elements (a 100M-token arena at the MSA-4B
geometry is ~112 GB, so real row offsets need 64-bit element arithmetic). The arena here is 4.3 GB of pinned
host memory, left uninitialised except the rows read; the reference gathers the same rows on the host."""

from __future__ import annotations

import pytest
import torch

from msabank.kernels import gather_rows, gather_rows_ref

pytestmark = pytest.mark.gpu


def test_gather_rows_past_2_pow_31_elements():
    hkv, d, layers = 1, 128, 2
    row_elems = layers * 2 * hkv * d  # 512 bf16 per row
    n = (2**31) // row_elems + 64  # the last rows start past element 2^31
    src = torch.empty(n, layers, 2, hkv, d, dtype=torch.bfloat16, pin_memory=True)
    rows = torch.tensor([[n - 1, n - 40, 3, -1], [n - 64, 0, n - 2, n - 3]])
    g = torch.Generator().manual_seed(0)
    for r in rows.flatten().tolist():
        if r >= 0:
            src[r] = torch.randn(layers, 2, hkv, d, generator=g).to(torch.bfloat16)
    assert int(rows.max()) * row_elems > 2**31
    for layer in range(layers):
        k, v, path = gather_rows(src, layer, rows.cuda())
        assert path == "zero-copy"
        wk, wv = gather_rows_ref(src, layer, rows)
        assert torch.equal(k.cpu(), wk) and torch.equal(v.cpu(), wv)
