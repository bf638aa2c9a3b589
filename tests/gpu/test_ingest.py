"""Stage 1 and the pipelined ingest on a GPU: the one-copy-per-group path (pinned host buffer, the copy of
group g overlapping the forward of g + 1, cast on the device) against the plain per-document reference
on the same GPU, and the pipelined bank against the one-stage-at-a-time bank on the same GPU.

Run on a GPU machine: `pytest -m gpu tests/gpu/test_ingest.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from msabank import stages
from msabank.engine import Engine, default_model_path
from msabank.kernels.reference import normalize_heads
from msabank.model import load_model
from msabank.synth import World

pytestmark = pytest.mark.gpu


def _reference(model, docs, dtype):  # noqa: ANN001, ANN202
    """Each document alone: forward, pool, per-layer slices copied to the host one by one (the old path)."""
    cfg = model.config
    out = []
    for ids in stages.document_token_ids(model, docs):
        with torch.inference_mode():
            lens = torch.tensor([len(ids)], device=model.device)
            kv = stages.stage1_forward(model, torch.tensor([ids], device=model.device), lens,
                                       through_layer=max(cfg.router_layers))
            pooled = stages.pool_router_layers(cfg, kv, lens)
            rk, k, v = (torch.stack([pooled[layer][s][0].transpose(0, 1) for layer in cfg.router_layers])
                        for s in (2, 0, 1))
            if cfg.routing_rule == "cosine":
                rk = normalize_heads(rk).to(rk.dtype)
        out.append([t.to(dtype).cpu() for t in (rk, k, v)])
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_grouped_stage1_matches_per_document_reference_on_gpu(dtype: torch.dtype) -> None:
    model = load_model(default_model_path(), device=torch.device("cuda"), dtype=dtype)
    docs = [(i, d.text) for i, d in enumerate(World(seed=5, num_docs=300).documents())]
    # small groups: many of them, so the copy of one overlaps the next forward
    got = stages.encode_documents(model, docs, max_tokens_per_batch=2048, dtype=torch.bfloat16)
    want = _reference(model, docs, torch.bfloat16)
    # batched vs alone GEMMs round differently: relative RMS error, bf16 model ~1 ulp (2^-8) per layer
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-3
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        for name, a, b in zip(("routing_keys", "content_k", "content_v"), (g.routing_keys, g.content_k, g.content_v), w):
            assert a.device.type == "cpu" and a.dtype == torch.bfloat16 and a.shape == b.shape, (i, name)
            a, b = a.float(), b.float()
            assert torch.isfinite(a).all(), (i, name)
            rel = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
            assert rel <= tol, (i, name, rel)

def test_pipelined_ingest_on_gpu_is_byte_identical_to_sequential(tmp_path: Path) -> None:
    docs = [(d.id, d.text) for d in World(seed=5, num_docs=600).documents()]
    banks = {}
    for mode in (True, False):
        with Engine.create(tmp_path / f"bank-{mode}", device="cuda") as eng:
            eng.ingest(docs, batch_size=64, pipelined=mode)
            banks[mode] = {r.user_id: (r.number, r.row_start, [t.view(torch.int16) for t in (
                eng.bank.tensors(r.user_id).routing_keys, eng.bank.tensors(r.user_id).content_k,
                eng.bank.tensors(r.user_id).content_v)]) for r in eng.bank.list()}
            assert eng.verify().ok
    assert banks[True].keys() == banks[False].keys()
    for uid, (n, row, ts) in banks[True].items():
        n2, row2, ts2 = banks[False][uid]
        assert (n, row) == (n2, row2)
        assert all(torch.equal(a, b) for a, b in zip(ts, ts2, strict=True)), uid
