"""Decode ms/token through `stages.generate`, CUDA graph vs eager, beside the weights-read floor of the same run.

`python -m msabank.bench.decode [--geometry msa-4b|embedded] [--batches 1,8] [--tokens 64] [--out FILE]`:
random weights of the geometry (msa-4b: MSA_SPEC §1.2, 36 layers, hidden 2,560, 32/8 heads x 128, 18 router
layers, chunk 64, top-16; 4.26B parameters, 8.52 GB in bf16), a memory of 256 random documents of 8 chunks
(every router layer selects 16 of them: 128 chunk columns), 64-token prompts, no stop: every sample
decodes `--tokens` tokens. Floor per token = (distinct weight bytes + the K/V bytes a step reads) / the
HBM read bandwidth measured here (a 4 GiB reduction). Each (mode, batch) warms up once with the same
token count (so the graph is captured before timing) and reports the best of 3. Not a test: it times.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from msabank import checkpoint, stages
from msabank.config import ModelConfig
from msabank.engine import default_model_path
from msabank.model import MSAModel, load_model
from msabank.prompt import Prompt
from msabank.types import EncodedMemory

MSA_4B = {
    "model_type": "msa", "vocab_size": 151_936, "hidden_size": 2560, "intermediate_size": 9728,
    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "rms_norm_eps": 1e-6, "rope_theta": 5e6, "max_position_embeddings": 262_144, "tie_word_embeddings": True,
    "msa_config": {"decouple_router": True, "head_reduce_method": "mean", "query_reduce_method": "max",
                   "chunk_reduce_method": "max", "aux_loss_method": "INFONCE_DECOUPLE",
                   "router_layer_idx": ",".join(map(str, range(18, 36))), "pooling_kernel_size": 64, "top_k_docs": 16},
}


def build_model(geometry: str, device: torch.device) -> MSAModel:
    if geometry == "embedded":
        return load_model(default_model_path(), device=device)
    torch.manual_seed(0)
    with torch.device(device):
        model = MSAModel(ModelConfig.from_dict(MSA_4B), checkpoint.load_tokenizer(default_model_path()))
    model = model.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.tie_weights()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model.eval()


def memory(model: MSAModel, docs: int = 256, chunks: int = 8) -> stages.InMemoryMemory:
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    r, shape = len(cfg.router_layers), (chunks, cfg.num_kv_heads, cfg.head_dim)
    enc = {n: EncodedMemory(n_tokens=chunks * cfg.chunk_size,
                            routing_keys=torch.randn(r, *shape, generator=g).to(model.dtype),
                            content_k=torch.randn(r, *shape, generator=g).to(model.dtype),
                            content_v=torch.randn(r, *shape, generator=g).to(model.dtype)) for n in range(docs)}
    return stages.InMemoryMemory(enc, cfg.top_k, device=model.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(device: torch.device, nbytes: int = 4 << 30) -> float:
    x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        t = time.perf_counter()
        x.sum(dtype=torch.float32)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    del x
    return nbytes / best


def run(geometry: str, batches: list[int], tokens: int, device: str = "cuda") -> dict[str, Any]:
    dev = torch.device(device)
    model = build_model(geometry, dev)
    mem = memory(model)
    cfg = model.config
    weights = sum({p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}.values())
    bw = read_bandwidth(dev, 4 << 30 if dev.type == "cuda" else 256 << 20)
    template = stages.template_prefix(model)
    g = torch.Generator().manual_seed(2)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    out: dict[str, Any] = {"geometry": geometry, "device": name, "tokens": tokens,
                           "weight_bytes": weights, "read_bandwidth_Bps": bw, "rows": []}
    for b in batches:
        prompts = [Prompt(torch.randint(100, 4000, (64,), generator=g).tolist(), [True] * 64) for _ in range(b)]
        t0 = template[0].shape[2]
        ctx = t0 + cfg.top_k * 8 + 64 + tokens  # columns a router layer's step reads at most
        kv = b * ctx * cfg.num_kv_heads * cfg.head_dim * 2 * model.dtype.itemsize * cfg.num_layers
        floor_ms = (weights + kv) / bw * 1e3
        for mode in ("eager", "graph") if dev.type == "cuda" else ("eager", "eager"):
            kw = dict(max_new_tokens=tokens, stop_ids=(), template=template, decode=mode)
            ref = stages.generate(model, prompts, mem, **kw)  # warm-up: captures the graph of this bucket
            best = float("inf")
            for _ in range(3):
                tm: dict[str, float] = {}
                gen = stages.generate(model, prompts, mem, timings=tm, **kw)
                assert gen.tokens == ref.tokens
                best = min(best, tm["decode_s"] / (tokens - 1) * 1e3)
            row = {"batch": b, "mode": mode, "ms_per_token": best, "floor_ms": floor_ms, "ratio": best / floor_ms,
                   "prefill_ms": tm["prefill_s"] * 1e3}
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
        e, gr = out["rows"][-2], out["rows"][-1]
        print(f"batch {b}: eager {e['ms_per_token']:.2f} ms/token, graph {gr['ms_per_token']:.2f} ms/token, "
              f"floor {floor_ms:.2f} ms ({gr['ratio']:.2f}x the floor)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", choices=("msa-4b", "embedded"), default="msa-4b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu only smoke-tests this script")
    a = ap.parse_args()
    with torch.inference_mode():
        res = run(a.geometry, [int(x) for x in a.batches.split(",")], a.tokens, a.device)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
