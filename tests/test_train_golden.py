"""The trainer's forward reproduces the official training-mode forward (golden cases/train_p4), float32."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Same rule as tests/conftest.py: $MSABANK_GOLDEN_DIR, else ../shared/golden beside the repository.
GOLDEN = Path(os.environ.get("MSABANK_GOLDEN_DIR", Path(__file__).resolve().parents[2] / "shared" / "golden"))
CASE = GOLDEN / "cases" / "train_p4" / "arrays.safetensors"


@pytest.fixture(autouse=True)
def _golden_present() -> None:
    # Missing goldens are a failure, not a skip: this test is how we know the trainer is MSA.
    if not CASE.exists():
        pytest.fail(f"{CASE} not found: set MSABANK_GOLDEN_DIR")


def _batch():
    from safetensors.torch import load_file

    from msabank.train.core import Batch

    a = load_file(str(CASE))
    ids, did = a["train/input_ids"], a["train/doc_ids"]
    docs = [ids[did == d] for d in range(1, int(did.max()) + 1)]
    ld = max(len(x) for x in docs)
    mem = torch.zeros(len(docs), ld, dtype=torch.long)
    for i, x in enumerate(docs):
        mem[i, : len(x)] = x
    q = (did <= 0) & (torch.arange(len(ids)) >= 3)
    seq = ids[q][None]
    batch = Batch(
        mem_ids=mem, mem_len=torch.tensor([len(x) for x in docs]), seq_ids=seq,
        seq_len=torch.tensor([seq.shape[1]]), routing=(did[q] == 0)[None],
        labels=torch.full_like(seq, -100), positive=torch.tensor([-1]), template=ids[:3],
    )  # fmt: skip
    return a, batch, did, q


def test_train_forward_matches_official_training_forward():
    from msabank.model import load_model
    from msabank.train.core import forward

    torch.manual_seed(0)
    a, batch, did, q = _batch()
    model = load_model(GOLDEN / "tiny-msa", dtype=torch.float32)
    with torch.no_grad():
        out = forward(model, batch, force_positive=False, want_logits=True, want_hidden=True)
    # routing: official doc_scores columns are 1-based doc ids, column 0 a dummy
    for r, layer in enumerate((2, 3)):
        ref = a[f"train/L{layer}/doc_scores"][0, 1:]
        torch.testing.assert_close(out.scores[r][0], ref, atol=1e-5, rtol=0)
    # question rows: every layer's hidden state and the logits
    for i in range(5):
        torch.testing.assert_close(out.seq_hidden[i][0], a[f"train/hidden_states/{i}"][q], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.logits[0], a["train/logits"][q], atol=1e-4, rtol=0)
    # document rows (stage 1): hidden states of each document alone
    for i in range(4):
        for d in range(1, 7):
            n = int((did == d).sum())
            torch.testing.assert_close(out.mem_hidden[i][d - 1, :n], a[f"train/hidden_states/{i}"][did == d],
                                       atol=1e-4, rtol=0)
