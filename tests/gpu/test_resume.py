"""The answer hand-off's `stages.resume` on a GPU against the re-prefilled transcript (tests/test_resume.py).

float32: the same tokens, logits within 1e-4, with the CUDA-graph decode and eager. bf16 (serving): logits
within bf16 rounding, greedy tokens parting only at a near-tie (tests/gpu/test_decode.py's rule).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from msabank.model import load_model
from msabank.stages import InMemoryMemory, encode_documents
from tests.gpu.test_decode import _agree, _err
from tests.test_resume import DOCS, resume_and_reprefill

pytestmark = pytest.mark.gpu


def _setup(golden: Path, dtype: torch.dtype):
    model = load_model(golden / "tiny-msa", device="cuda", dtype=dtype)
    enc = dict(zip((n for n, _ in DOCS), encode_documents(model, DOCS)))
    return model, InMemoryMemory(enc, 2, device="cuda")


@pytest.mark.parametrize("mode", ["graph", "eager"])
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_resume_equals_reprefill_float32(golden: Path, mode: str, temperature: float) -> None:
    got, ref = resume_and_reprefill(*_setup(golden, torch.float32), temperature, decode=mode)
    assert got.tokens == ref.tokens and got.finish_reasons == ref.finish_reasons
    assert _err(got.first_logits, ref.first_logits) <= 1e-4
    assert _err(got.step_logits, ref.step_logits) <= 1e-4


def test_resume_equals_reprefill_bf16(golden: Path) -> None:
    got, ref = resume_and_reprefill(*_setup(golden, torch.bfloat16), 0.0, decode="graph")
    tol = 2e-2 * ref.step_logits.abs().max().item()  # bf16: ~3 significant digits
    _agree(got.tokens, ref.tokens, got.step_logits, ref.step_logits, tol)
