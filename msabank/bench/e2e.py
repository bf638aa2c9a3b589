"""End-to-end benchmark at a model geometry (issue 12): every figure beside its floor from the same run.

One run measures, on one device: the floors (HBM bandwidth, GEMM rate, pinned host→device bandwidth);
time to first token of a question (routing, content fetch, prefill) over a bank of `bank_tokens`; decode
ms/token at several batch sizes; stage 1 alone and ingest through the real engine in tokens/s; and the same
questions through an official-style path implemented here (`official_generate`, `OfficialStyleMemory`), so
each speed-up is a ratio from one run. The product is timed only through its public paths
(`stages.generate`, `stages.encode_documents`, `Engine.ingest`, `RoutingIndex`/`ContentStore`/`BankMemory`),
so whatever makes those faster shows up here.

The model is either random weights of a geometry built in memory (`msa-4b`: Qwen3-4B + router projections,
4.26B parameters; `tiny`, for tests), seeded, bf16 on CUDA and float32 on CPU, or a checkpoint
(`--model DIR`; `embedded` is the shipped default model). A random model costs the same per token as a
trained one. The embedded tokenizer (vocab 4,096) tokenizes for every geometry.

The memory: real stage-1 encodings of synthetic documents (msabank.synth) up to `real_tokens`, plus
synthetic documents up to `bank_tokens` whose routing keys are random rows scaled like the real ones (per
head: the real keys' mean norm under dot routing, unit norm under cosine) and whose content K/V is a real
document's (a shared content pool: 100M tokens of content at the MSA-4B geometry would be 115 GB of host
memory). Routing therefore scans a full-size index; a fetch moves real bytes of the right size.

Not here: quality (random weights answer nothing), multi-round interleave (one round is timed), serving.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from msabank import stages
from msabank.bench.routing import card_name, copy_bandwidth, gemm_flops, h2d_bandwidth, parse_tokens
from msabank.config import ModelConfig
from msabank.errors import InputError
from msabank.index import BankMemory, ContentStore, RoutingIndex
from msabank.kernels.reference import normalize_per_head, sparse_attention_ref, topk_ordered
from msabank.model import MSAModel
from msabank.prompt import Prompt, question_prompt
from msabank.types import EncodedMemory, Routed

log = logging.getLogger(__name__)

GEOMETRY_NAMES = ("msa-4b", "embedded", "tiny")

# config.json of each random-weight geometry. msa-4b: MSA_SPEC §1.2 (Qwen3-4B-Instruct-2507 backbone, router
# layers 18..35, chunk 64, top-16, INFONCE_DECOUPLE = dot routing scaled by 1/sqrt(128), spec §4.1).
_MSA = {"decouple_router": True, "head_reduce_method": "mean", "query_reduce_method": "max",
        "chunk_reduce_method": "max", "aux_loss_method": "INFONCE_DECOUPLE"}
GEOMETRIES: dict[str, dict[str, Any]] = {
    "msa-4b": {
        "model_type": "msa", "vocab_size": 151_936, "hidden_size": 2560, "intermediate_size": 9728,
        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "rms_norm_eps": 1e-6, "rope_theta": 5e6, "max_position_embeddings": 262_144, "tie_word_embeddings": True,
        "msa_config": {**_MSA, "router_layer_idx": ",".join(map(str, range(18, 36))), "pooling_kernel_size": 64,
                       "top_k_docs": 16},
    },
    "tiny": {
        "model_type": "msa", "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": 1e-6, "rope_theta": 10_000.0, "max_position_embeddings": 4096, "tie_word_embeddings": True,
        "msa_config": {**_MSA, "router_layer_idx": "2,3", "pooling_kernel_size": 16, "top_k_docs": 4},
    },
}

# Sizes a default run uses per geometry: (bank_tokens, real_tokens, ingest_tokens, questions). The msa-4b
# defaults fit one H200 in < 6 minutes: 57.6 GB of routing keys, ~1M tokens of stage 1 at ~27K tokens/s.
DEFAULT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "msa-4b": (100_000_000, 1_000_000, 256_000, 5),
    "embedded": (100_000_000, 1_000_000, 256_000, 5),
    "tiny": (20_000, 2_000, 1_000, 2),
}

OFFICIAL_SLICE = 16_384
"""Chunks scored per slice by the official engine (`prefill_stage2`, spec §7.4); each slice's score matrix
is materialised before its max."""


# ---------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------


def _tokens(value: str | int | None, option: str, default: int) -> int:
    if value is None:
        return default
    try:
        n = value if isinstance(value, int) else parse_tokens(str(value))
    except (ValueError, IndexError):
        raise InputError(f"{option} {value!r}: not a number of tokens",
                         hint=f"give a count such as {option} 100M, 250K or 250000") from None
    if n < 1:
        raise InputError(f"{option} {value!r}: must be at least 1 token")
    return n


def _batches(value: str | Sequence[int], option: str = "--batches") -> list[int]:
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for x in items:
        try:
            n = int(x)
        except (TypeError, ValueError):
            raise InputError(f"{option} {value!r}: {str(x).strip()!r} is not an integer",
                             hint=f"give comma-separated batch sizes, e.g. {option} 1,8,32") from None
        if n < 1:
            raise InputError(f"{option} {value!r}: batch sizes must be >= 1")
        out.append(n)
    if not out:
        raise InputError(f"{option} {value!r}: give at least one batch size")
    return out


@dataclass(frozen=True, slots=True)
class Options:
    """The validated options of one run (`check_options`)."""

    geometry: str
    bank_tokens: int
    real_tokens: int
    ingest_tokens: int
    batches: tuple[int, ...]
    new_tokens: int
    questions: int
    question_tokens: int
    model: str | None


def check_options(*, geometry: str = "msa-4b", model: str | None = None, bank_tokens: str | int | None = None,
                  real_tokens: str | int | None = None, ingest_tokens: str | int | None = None,
                  batches: str | Sequence[int] = "1,8,32", new_tokens: int = 32, questions: int | None = None,
                  question_tokens: int = 64) -> Options:
    """Options → `Options`; InputError naming the CLI option at fault."""
    if geometry not in GEOMETRY_NAMES:
        raise InputError(f"--geometry {geometry!r}: unknown geometry", hint=f"use one of {', '.join(GEOMETRY_NAMES)}")
    bank_d, real_d, ingest_d, questions_d = DEFAULT_SIZES[geometry]
    bank = _tokens(bank_tokens, "--bank-tokens", bank_d)
    real = _tokens(real_tokens, "--real-tokens", min(real_d, bank))
    if real > bank:
        raise InputError(f"--real-tokens {real_tokens!r} is more than --bank-tokens {bank:,}",
                         hint="the real encodings are part of the bank: give --real-tokens <= --bank-tokens")
    ingest = _tokens(ingest_tokens, "--ingest-tokens", ingest_d)
    if new_tokens < 2:
        raise InputError(f"--new-tokens {new_tokens}: decode needs at least 2 new tokens (the first comes from prefill)")
    q = questions_d if questions is None else questions
    if q < 1:
        raise InputError(f"--questions {questions}: must be at least 1")
    if question_tokens < 8:
        raise InputError(f"--question-tokens {question_tokens}: must be at least 8 (the prompt template alone is ~8)")
    return Options(geometry, bank, real, ingest, tuple(_batches(batches)), new_tokens, q, question_tokens, model)


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------


def build_model(geometry: str, device: torch.device, *, seed: int = 0) -> MSAModel:
    """Random weights of a geometry (nn.Module defaults, seeded), bf16 on CUDA, float32 on CPU, with the
    embedded tokenizer. msa-4b: 4.26B parameters, 8.52 GB in bf16, built on the device (~17 GB fp32 transient)."""
    from msabank import checkpoint
    from msabank.engine import default_model_path

    cfg = ModelConfig.from_dict(GEOMETRIES[geometry])
    tok = checkpoint.load_tokenizer(default_model_path())
    torch.manual_seed(seed)
    with torch.device(device):
        model = MSAModel(cfg, tok)
    model = model.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.tie_weights()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the fp32 originals (17 GB at msa-4b) go back before the 57.6 GB index
    model.stop_ids = ()  # a random model has no EOS worth stopping at; decode runs a fixed number of tokens
    return model.eval()


def load_bench_model(opts: Options, device: torch.device, seed: int) -> MSAModel:
    from msabank.engine import resolve_model_path
    from msabank.model import load_model

    if opts.model is not None or opts.geometry == "embedded":
        return load_model(resolve_model_path(opts.model), device=device)
    return build_model(opts.geometry, device, seed=seed)


def param_bytes(model: MSAModel) -> int:
    """Bytes of distinct parameters (a tied lm_head counted once): what one decode step must read."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values())


def _layer_linear_params(cfg: ModelConfig, *, router_q: bool, router_k: bool) -> list[int]:
    """Weights of the matmuls of each decoder layer (what a token multiplies by): attention q/k/v/o, MLP,
    and the router projections a stage uses (prefill: router_q; stage 1: router_k)."""
    h, hd, kvd = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    base = h * hd * 2 + h * kvd * 2 + 3 * h * cfg.intermediate_size
    return [base + (h * hd if router_q and cfg.is_router_layer(i) else 0) + (h * kvd if router_k and cfg.is_router_layer(i) else 0)
            for i in range(cfg.num_layers)]


def stage1_flops(cfg: ModelConfig, lengths: Sequence[int]) -> float:
    """FLOPs of stage 1 for documents of these lengths, as `stages.stage1_forward` runs it: layers before
    the last router layer in full (2·weights per token + causal attention 2·2·H·D·n²/2), the last router
    layer's q/k/v and router_k only (its attention and MLP cannot change what is stored)."""
    last = max(cfg.router_layers)
    h, hd, kvd = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_tok = sum(_layer_linear_params(cfg, router_q=False, router_k=True)[:last]) + h * hd + 2 * h * kvd + h * kvd
    n = np.asarray(lengths, dtype=np.float64)
    return float(2 * per_tok * n.sum() + last * 2 * cfg.num_heads * cfg.head_dim * (n * (n + 1)).sum())


def prefill_flops(cfg: ModelConfig, prompt_tokens: Sequence[int], context: Sequence[Sequence[int]]) -> float:
    """FLOPs of one prefill: 2·weights per prompt token (router_q at router layers), lm_head at the last
    position, and attention 4·H·D·T·(memory columns + (T+1)/2) per layer and sample.

    prompt_tokens: real tokens per sample; context: [sample][layer] memory columns (template + chunks)."""
    lin = sum(_layer_linear_params(cfg, router_q=True, router_k=False))
    f = 0.0
    for t, cols in zip(prompt_tokens, context):
        f += 2 * lin * t + 2 * cfg.hidden_size * cfg.vocab_size
        f += sum(4 * cfg.num_heads * cfg.head_dim * t * (c + (t + 1) / 2) for c in cols)
    return f


# ---------------------------------------------------------------------------------------------------
# Floors
# ---------------------------------------------------------------------------------------------------


def measure_floors(device: torch.device) -> dict[str, Any]:
    """HBM bandwidth (device copy, bytes read + written; and a reduction), GEMM rate (bf16 8192³ on CUDA,
    fp32 512³ on CPU) and pinned host→device bandwidth (1 GiB; on CPU a 64 MiB memcpy), on this device now."""
    copy = copy_bandwidth(device)
    red = _reduction_bandwidth(device)
    out: dict[str, Any] = {"card": card_name(device), "copy_Bps": copy, "reduce_Bps": red, "hbm_Bps": max(copy, red),
                           "gemm_flops": gemm_flops(device)}
    if device.type == "cuda":
        out["h2d_Bps"] = h2d_bandwidth(device)["pinned"]
    else:
        out["h2d_Bps"] = _memcpy_bandwidth()
    return out


def _time_s(fn: Callable[[], Any], device: torch.device, reps: int = 5) -> float:
    fn()
    ts = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _reduction_bandwidth(device: torch.device) -> float:
    """A sum over 4 GiB of bf16 (64 MiB fp32 on CPU), bytes read / s: the read-only HBM rate."""
    n = (2 << 30) if device.type == "cuda" else (16 << 20)
    x = torch.ones(n, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device)
    t = _time_s(lambda: x.sum(), device)
    return x.numel() * x.element_size() / t


def _memcpy_bandwidth(nbytes: int = 64 << 20) -> float:
    a = torch.ones(nbytes, dtype=torch.uint8)
    b = torch.empty_like(a)
    return nbytes / _time_s(lambda: b.copy_(a), torch.device("cpu"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------
# The memory
# ---------------------------------------------------------------------------------------------------


class PooledContentStore(ContentStore):
    """A `ContentStore` whose synthetic documents read a real document's rows (the shared content pool):
    `alias(n, source)` makes document n's chunks those of `source`. Fetches copy aliased rows like any
    others, so a question moves as many bytes as in a bank of distinct documents."""

    def alias(self, numbers: Sequence[int], sources: Sequence[int]) -> None:
        ranges = self._segs.ranges
        for n, s in zip(numbers, sources):
            ranges[int(n)] = ranges[int(s)]  # the same (start, count) list: never mutated (nothing is removed)
        self.changed()  # the device document table is rebuilt with the aliases


@dataclass
class BenchMemory:
    """The bank one run routes over: `index` (all rows on the device), `content` (real documents' K/V,
    pinned on CUDA; synthetic documents alias them), and `host`, the same content rows (rows, R, 2, Hkv, D)
    with `starts`/`counts` per real document, which the official-style path gathers from on the host."""

    index: RoutingIndex
    content: PooledContentStore
    host: torch.Tensor
    starts: np.ndarray
    counts: np.ndarray
    real_docs: int
    synthetic_docs: int
    real_tokens: int
    top_k: int
    texts: dict[int, str] = field(default_factory=dict)

    def source(self, number: int) -> int:
        """The real document whose content `number` holds (itself when real)."""
        return number if number < self.real_docs else (number - self.real_docs) % self.real_docs

    def chunks(self, number: int) -> int:
        return int(self.counts[self.source(number)])

    def view(self) -> BankMemory:
        """The product's `MemoryView` (the one `Engine.ask` hands to `stages.generate`)."""
        return BankMemory(self.index, self.content, self.top_k)

    def official_view(self) -> OfficialStyleMemory:
        return OfficialStyleMemory(self)

    def key_bytes(self) -> int:
        """Bytes one question's routing reads: every router layer's keys plus the row → document map."""
        rows = self.index.num_rows
        item = torch.empty(0, dtype=self.index.dtype).element_size()
        return rows * (self.index.num_router_layers * self.index.dim * item + 4)


def build_memory(model: MSAModel, *, real_tokens: int, bank_tokens: int, seed: int = 7) -> tuple[BenchMemory, dict[str, Any]]:
    """Encode synthetic documents (stage 1, timed) up to `real_tokens`, then add synthetic documents up to
    `bank_tokens` / chunk_size routing rows. Returns the memory and the stage-1 measurement."""
    from msabank.synth import World, docs_for_tokens

    cfg, dev, dt = model.config, model.device, model.dtype
    world = World(seed=seed, num_docs=max(8, docs_for_tokens(real_tokens)) * 2)
    docs: list[tuple[int, str]] = []
    tokens = 0
    tok = model.tokenizer
    assert tok is not None
    for d in world.documents():
        if tokens >= real_tokens:
            break
        docs.append((len(docs), d.text))
        tokens += len(tok.encode(d.text)) + 8  # + the [n] markers; the exact count comes from stage 1
    stages.encode_documents(model, docs[:4])  # warm-up: kernels, allocator, cuBLAS heuristics
    _sync(dev)
    t = time.perf_counter()
    enc = stages.encode_documents(model, docs)
    _sync(dev)
    stage1_s = time.perf_counter() - t
    lengths = [e.n_tokens for e in enc]
    stage1 = {"documents": len(enc), "tokens": sum(lengths), "seconds": stage1_s,
              "flops": stage1_flops(cfg, lengths)}
    mem = _fill(model, enc, bank_rows=-(-bank_tokens // cfg.chunk_size), seed=seed)
    mem.texts = dict(docs)
    return mem, stage1


def _fill(model: MSAModel, enc: Sequence[EncodedMemory], *, bank_rows: int, seed: int) -> BenchMemory:
    cfg, dev, dt = model.config, model.device, model.dtype
    r_layers, hkv, d = len(cfg.router_layers), cfg.num_kv_heads, cfg.head_dim
    counts = np.array([e.num_chunks for e in enc], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    real_rows = int(counts.sum())
    # Synthetic document R + i holds the content of real document i % R, with its chunk count.
    need = max(0, bank_rows - real_rows)
    cycles, rest = divmod(need, real_rows)
    extra = int(np.searchsorted(np.cumsum(counts), rest, side="left")) + 1 if rest else 0
    syn_sources = np.concatenate([np.tile(np.arange(len(enc)), cycles), np.arange(extra)]).astype(np.int64)
    syn_counts = counts[syn_sources]
    total_rows = real_rows + int(syn_counts.sum())

    index = RoutingIndex(r_layers, hkv * d, device=dev, dtype=dt)
    index.reserve(total_rows)
    real_keys = [torch.cat([e.routing_keys[r].reshape(e.num_chunks, -1) for e in enc]).to(dev, dt) for r in range(r_layers)]
    # Per-head scale of the synthetic keys: the real keys' mean per-head norm (dot routing) or 1 (cosine).
    norms = [k.float().view(-1, hkv, d).norm(dim=-1).mean().item() for k in real_keys]
    index.add(list(range(len(enc))), counts.tolist(), real_keys)
    del real_keys
    if len(syn_sources):
        numbers = torch.arange(len(enc), len(enc) + len(syn_sources), dtype=torch.int64)
        row_numbers = torch.repeat_interleave(numbers, torch.from_numpy(syn_counts))
        rows = int(row_numbers.numel())

        def layer_keys() -> Any:
            for r in range(r_layers):
                gen = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + r)
                kl = torch.empty(rows, hkv * d, dtype=dt, device=dev).normal_(generator=gen)  # no fp32 temporary
                if cfg.routing_rule == "cosine":
                    kl = normalize_per_head(kl, hkv)
                else:
                    kl.mul_(norms[r] / d**0.5)  # a standard normal head of D dims has norm ~sqrt(D)
                yield kl
                del kl

        index.add_rows(row_numbers, layer_keys())

    host = torch.cat([torch.stack([e.content_k, e.content_v], dim=2).transpose(0, 1) for e in enc]).to(dt)  # (rows, R, 2, Hkv, D)
    if dev.type == "cuda":
        host = host.pin_memory()
    content = PooledContentStore(r_layers, hkv, d, device=dev, dtype=dt)
    content.reserve(real_rows)
    content.add(list(range(len(enc))), [host[s : s + c] for s, c in zip(starts, counts)])
    content.alias(range(len(enc), len(enc) + len(syn_sources)), syn_sources.tolist())
    _sync(dev)
    return BenchMemory(index=index, content=content, host=host, starts=starts, counts=counts, real_docs=len(enc),
                       synthetic_docs=len(syn_sources), real_tokens=sum(e.n_tokens for e in enc), top_k=cfg.top_k)


# ---------------------------------------------------------------------------------------------------
# The official-style path (the baseline)
# ---------------------------------------------------------------------------------------------------


class OfficialStyleMemory:
    """Routing and fetch the way the official engine runs them (MSA_SPEC §4.2, §7.4, §7.5), over the same
    keys and content as the product: per router layer, dense fp32 scores of every chunk, one materialised
    (T, 16,384) slice at a time, max over the query tokens, a per-document max by `scatter_reduce`, top-k,
    the result brought to the host; then the selected chunks gathered with `index_select` on the host (the
    copy lands in pageable memory) and copied to the device. Scores equal the product's reference, so the
    same documents are selected. Accumulates device-synchronised `route_s` and `fetch_s`."""

    def __init__(self, mem: BenchMemory) -> None:
        self.mem = mem
        self.route_s = 0.0
        self.fetch_s = 0.0

    def route(self, layer_index: int, query: torch.Tensor) -> Routed:
        t = time.perf_counter()
        keys, row_doc, num_docs = self.mem.index.layer(layer_index)
        q = query.to(keys.device).to(keys.dtype)
        best = torch.empty(keys.shape[0], dtype=torch.float32, device=keys.device)
        for r0 in range(0, keys.shape[0], OFFICIAL_SLICE):
            tile = keys[r0 : r0 + OFFICIAL_SLICE]
            if tile.is_cuda and tile.dtype in (torch.bfloat16, torch.float16):
                s = torch.mm(tile, q.t(), out_dtype=torch.float32)  # (n, T) scores, materialised
            else:
                s = tile.float() @ q.float().t()
            best[r0 : r0 + OFFICIAL_SLICE] = s.amax(dim=1)
        live = row_doc >= 0
        doc = torch.full((num_docs,), float("-inf"), device=keys.device)
        doc.scatter_reduce_(0, row_doc[live].long(), best[live], reduce="amax")
        kk = min(self.mem.top_k, num_docs)
        kth = torch.topk(doc, kk).values[-1]
        cand = torch.nonzero(doc >= kth).squeeze(1)
        scores, idx = topk_ordered(doc[cand], cand, self.mem.top_k)  # exact order: ties to the lower number
        out = Routed(numbers=idx.cpu(), scores=scores.cpu())
        self.route_s += time.perf_counter() - t
        return out

    def content_kv(self, layer_index: int, numbers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        t = time.perf_counter()
        m = self.mem
        src = [m.source(int(n)) for n in sorted(int(n) for n in numbers)]
        rows = np.concatenate([np.arange(m.starts[s], m.starts[s] + m.counts[s]) for s in src]) if src else np.zeros(0, np.int64)
        kv = m.host[:, layer_index].index_select(0, torch.from_numpy(rows))  # (C_sel, 2, Hkv, D), pageable
        kv = kv.to(m.index.device)
        _sync(m.index.device)
        self.fetch_s += time.perf_counter() - t
        return kv[:, 0], kv[:, 1]


@dataclass
class OfficialResult:
    tokens: list[list[int]]
    routed: list[list[Routed]]
    prefill_s: float
    decode_s: float


def official_generate(model: MSAModel, prompts: Sequence[Prompt], memory: Any,
                      template: tuple[torch.Tensor, torch.Tensor], max_new_tokens: int,
                      stop_ids: Sequence[int] = ()) -> OfficialResult:
    """Greedy generation the official engine's way (MSA_SPEC §4.6, §5.2): prefill with each sample's
    router layers routed and assembled one sample at a time, then eager decode, one Python-driven step per
    token: every layer's K/V grows by `torch.cat`, attention is the PyTorch reference (SDPA, K/V expanded
    to H heads), and each token goes to the host and back (stop check in Python). Same numbers as
    `stages.generate` (same layout, same masks), so the same greedy tokens."""
    cfg, dev, dt = model.config, model.device, model.dtype
    tok = model.tokenizer
    assert tok is not None
    t0 = template[0].shape[2]
    stops = set(stop_ids)
    with torch.inference_mode():
        pb = stages.pad_batch(prompts, pad_id=tok.pad_id, first_position=t0 + cfg.top_k)
        ids, att, route, pos = (x.to(dev) for x in (pb.input_ids, pb.attention_mask, pb.routing_mask, pb.positions))
        _sync(dev)
        start = time.perf_counter()
        b, t = ids.shape
        cos, sin = model.rope(pos)
        causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()[None] & att[:, None, :]  # (B, T, T)
        routed: list[list[Routed]] = [[] for _ in range(b)]
        caches: list[list[torch.Tensor]] = []  # per layer [K, V, valid]
        h = model.model.embed_tokens(ids)
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q, k, v = attn.qkv(x, cos, sin)
            chunks = []
            if attn.is_router:
                r = cfg.router_layers.index(i)
                for s, query in enumerate(stages.routing_queries(attn.router_q(x), route & att, cfg)):
                    sel = memory.route(r, query) if query.shape[0] else Routed(torch.empty(0, dtype=torch.long), torch.empty(0))
                    routed[s].append(sel)
                    chunks.append(memory.content_kv(r, sel.numbers.tolist()) if sel.numbers.numel() else None)
            c_max = max((c[0].shape[0] for c in chunks if c is not None), default=0)
            mk = torch.zeros(b, cfg.num_kv_heads, c_max, cfg.head_dim, device=dev, dtype=dt)
            mv = torch.zeros_like(mk)
            mvalid = torch.zeros(b, t0 + c_max, dtype=torch.bool, device=dev)
            mvalid[:, :t0] = True
            for s, c in enumerate(chunks):
                if c is not None:
                    n = c[0].shape[0]
                    mk[s, :, :n], mv[s, :, :n] = c[0].to(dt).transpose(0, 1), c[1].to(dt).transpose(0, 1)
                    mvalid[s, t0 : t0 + n] = True
            kk = torch.cat([template[0][i].expand(b, -1, -1, -1), mk, k], dim=2)  # (B, Hkv, T0 + C + T, D)
            vv = torch.cat([template[1][i].expand(b, -1, -1, -1), mv, v], dim=2)
            h = layer.finish(h, sparse_attention_ref(q, kk, vv, mvalid, causal))
            caches.append([kk, vv, torch.cat([mvalid, att], dim=1)])
        logits = model.lm_head(model.model.norm(h[:, -1])).float()
        nxt = logits.argmax(-1).tolist()  # host round trip
        prefill_s = time.perf_counter() - start
        tokens = [[n] for n in nxt]
        done = [n in stops for n in nxt]
        last = pos[:, -1]
        self_col = torch.ones(b, 1, 1, dtype=torch.bool, device=dev)
        for step in range(1, max_new_tokens):
            if all(done):
                break
            cur = torch.tensor(nxt, device=dev)  # host → device: the token the host just chose
            cs, sn = model.rope((last + step)[:, None])
            h = model.model.embed_tokens(cur[:, None])
            for layer, c in zip(model.model.layers, caches):
                q, k, v = layer.self_attn.qkv(layer.input_layernorm(h), cs, sn)
                c[0] = torch.cat([c[0], k], dim=2)  # O(T) copy per step and layer, as the official cache
                c[1] = torch.cat([c[1], v], dim=2)
                c[2] = torch.cat([c[2], torch.ones(b, 1, dtype=torch.bool, device=dev)], dim=1)
                h = layer.finish(h, sparse_attention_ref(q, c[0], c[1], c[2][:, :-1], self_col))
            logits = model.lm_head(model.model.norm(h[:, -1])).float()
            nxt = logits.argmax(-1).tolist()  # device → host every token
            for s, n in enumerate(nxt):
                if not done[s]:
                    tokens[s].append(n)
                    done[s] = n in stops
        decode_s = time.perf_counter() - start - prefill_s
    return OfficialResult(tokens=tokens, routed=routed, prefill_s=prefill_s, decode_s=decode_s)


# ---------------------------------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------------------------------

_FILLER = ("Please answer from the documents in memory and name each document you use along the way "
           "before you give the final answer in a few words").split()


def question_prompts(model: MSAModel, count: int, tokens: int, *, seed: int = 11) -> list[Prompt]:
    """`count` round-1 prompts of about `tokens` tokens each: a synthetic question plus filler words."""
    from msabank.synth import World

    tok = model.tokenizer
    assert tok is not None
    world = World(seed=seed, num_docs=1000)
    qs = [q.question for q in world.questions(count, seed=seed)]
    out = []
    for i in range(count):
        text = qs[i % len(qs)]
        words = iter(_FILLER * (1 + tokens))
        p = question_prompt(tok, text, span=model.config.routing_span)
        while len(p.ids) < tokens:
            nxt = text + " " + next(words)
            p2 = question_prompt(tok, nxt, span=model.config.routing_span)
            if len(p2.ids) > tokens and len(p.ids) >= tokens - 2:
                break
            text, p = nxt, p2
        out.append(p)
    return out


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


def _row(name: str, measured: float, floor: float, unit: str, **extra: Any) -> dict[str, Any]:
    """One table row; ratio = measured / floor (for tokens/s the floor is a ceiling: ratio <= 1)."""
    return {"name": name, "measured": measured, "floor": floor, "ratio": measured / floor, "unit": unit, **extra}


def _context(mem: BenchMemory, routed: Sequence[Sequence[Routed]], cfg: ModelConfig, t0: int) -> list[list[int]]:
    """[sample][layer] memory columns: the template, plus at router layers the chunks of its selection."""
    out = []
    for sample in routed:
        cols, r = [], 0
        for i in range(cfg.num_layers):
            c = t0
            if cfg.is_router_layer(i) and r < len(sample):
                c += sum(mem.chunks(int(n)) for n in sample[r].numbers)
                r += 1
            cols.append(c)
        out.append(cols)
    return out


def _fetched_bytes(mem: BenchMemory, routed: Sequence[Sequence[Routed]], cfg: ModelConfig, item: int) -> int:
    """Content bytes a question needs on the device: per router layer, K and V of its selected chunks."""
    per_chunk = 2 * cfg.num_kv_heads * cfg.head_dim * item
    return sum(mem.chunks(int(n)) * per_chunk for sample in routed for sel in sample for n in sel.numbers)


def _ttft_floor(fl: dict[str, Any], mem: BenchMemory, model: MSAModel, prompt: Prompt, routed: Sequence[Sequence[Routed]],
                t0: int, wbytes: int) -> dict[str, float]:
    cfg, item = model.config, torch.empty(0, dtype=model.dtype).element_size()
    route = mem.key_bytes() / fl["hbm_Bps"]
    fetch = _fetched_bytes(mem, routed, cfg, item) / fl["h2d_Bps"]
    flops = prefill_flops(cfg, [len(prompt.ids)], _context(mem, routed, cfg, t0))
    prefill = max(wbytes / fl["hbm_Bps"], flops / fl["gemm_flops"])
    return {"route": route, "fetch": fetch, "prefill": prefill, "total": route + fetch + prefill}


def _decode_floor(fl: dict[str, Any], mem: BenchMemory, model: MSAModel, prompts: Sequence[Prompt],
                  routed: Sequence[Sequence[Routed]], t0: int, wbytes: int, new_tokens: int) -> float:
    """(weights + K/V read per step) / HBM bandwidth; K/V at the mean context of the timed steps."""
    cfg, item = model.config, torch.empty(0, dtype=model.dtype).element_size()
    mean_new = new_tokens / 2  # steps 1..N-1 read contexts of prompt + 1..N-1 tokens
    cols = sum(c + len(p.ids) + mean_new for p, sample in zip(prompts, _context(mem, routed, cfg, t0)) for c in sample)
    kv = cols * 2 * cfg.num_kv_heads * cfg.head_dim * item
    return (wbytes + kv) / fl["hbm_Bps"]


def round2_prompt(model: MSAModel, first: Prompt, mem: BenchMemory, routed: Sequence[Routed], *, docs: int = 2) -> Prompt:
    """An interleave round-2 prompt (msabank.interleave, spec §6.2-6.4): the round-1 prompt, the model naming
    the first `docs` documents round 1 routed to (`[n]…<|object_ref_end|>`, written here: a random model names
    nothing), then their text appended; the question block and the appended documents route."""
    from msabank import prompt as P

    tok = model.tokenizer
    assert tok is not None
    picked: list[int] = []
    for sel in routed:
        picked += [int(n) for n in sel.numbers.tolist() if int(n) not in picked]
    picked = picked[:docs]
    ids = list(first.ids) + tok.encode("".join(f"[{n}]" for n in picked)) + [tok.object_ref_end_id]
    start = len(ids)
    ids += P.injection_ids(tok, [(n, mem.texts[mem.source(n)]) for n in picked])
    mask = P.round_routing_mask(P.later_round_question_mask(tok, first), len(ids), (start, len(ids) - 1))
    return Prompt(ids=ids, routing_mask=mask)


def _ttft(m: MSAModel, mem: BenchMemory, prompts: Sequence[Prompt], rnd: str, rows: list[dict[str, Any]],
          speed: dict[str, float], fl: dict[str, Any], template: tuple[torch.Tensor, torch.Tensor], wbytes: int
          ) -> list[list[Routed]]:
    """Time to first token of each prompt alone on both paths (medians), split into routing, fetch and
    prefill; appends the rows and the speed-up; returns the product's selections."""
    t0 = template[0].shape[2]
    per: list[dict[str, float]] = []
    off: list[dict[str, float]] = []
    routed = []
    for p in prompts:
        mem.content.clear_cache()
        moved = mem.content.bytes_copied
        view, tm = mem.view(), {}
        g = stages.generate(m, [p], view, max_new_tokens=1, stop_ids=(), template=template, timings=tm)
        routed.append(g.routed[0])
        f = _ttft_floor(fl, mem, m, p, g.routed, t0, wbytes)
        total = tm["prefill_s"]
        route, fetch = getattr(view, "route_s", 0.0), getattr(view, "fetch_s", 0.0)
        per.append({"total": total, "route": route, "fetch": fetch, "prefill": total - route - fetch,
                    **{f"floor_{k}": v for k, v in f.items()}, "moved_bytes": float(mem.content.bytes_copied - moved),
                    "needed_bytes": float(_fetched_bytes(mem, g.routed, m.config, torch.empty(0, dtype=m.dtype).element_size()))})
        ov = mem.official_view()
        r = official_generate(m, [p], ov, template, 1)
        off.append({"total": r.prefill_s, "route": ov.route_s, "fetch": ov.fetch_s,
                    "prefill": r.prefill_s - ov.route_s - ov.fetch_s})
    med = {k: statistics.median(x[k] for x in per) for k in per[0]}
    omed = {k: statistics.median(x[k] for x in off) for k in off[0]}
    tokens = statistics.mean(len(p.ids) for p in prompts)
    for path, vals in (("msabank", med), ("official-style", omed)):
        for k, label in (("total", ""), ("route", ".routing"), ("fetch", ".fetch"), ("prefill", ".prefill")):
            extra = {"needed_bytes": med["needed_bytes"], "moved_bytes": med["moved_bytes"]} if k == "fetch" else {}
            rows.append(_row(f"ttft.{rnd}{label}", vals[k] * 1e3, med[f"floor_{k}"] * 1e3, "ms", path=path,
                             prompt_tokens=tokens, **extra))
    speed[f"ttft.{rnd}"] = omed["total"] / med["total"]
    return routed


def run_e2e_bench(*, geometry: str = "msa-4b", model: str | None = None, bank_tokens: str | int | None = None,
                  real_tokens: str | int | None = None, ingest_tokens: str | int | None = None,
                  batches: str | Sequence[int] = "1,8,32", new_tokens: int = 32, questions: int | None = None,
                  question_tokens: int = 64, device: str | None = None, seed: int = 0,
                  log_fn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The whole benchmark; returns the JSON-able result (`rows`: name, measured, floor, ratio, unit)."""
    from msabank.engine import pick_device

    opts = check_options(geometry=geometry, model=model, bank_tokens=bank_tokens, real_tokens=real_tokens,
                         ingest_tokens=ingest_tokens, batches=batches, new_tokens=new_tokens, questions=questions,
                         question_tokens=question_tokens)
    dev = pick_device(device)
    say = log_fn or log.info
    wall = time.perf_counter()
    timing: dict[str, float] = {}

    def phase(name: str, t: float) -> None:
        timing[name] = time.perf_counter() - t
        say(f"e2e: {name} {timing[name]:.1f} s")

    t = time.perf_counter()
    fl = measure_floors(dev)
    phase("floors", t)
    t = time.perf_counter()
    m = load_bench_model(opts, dev, seed)
    cfg = m.config
    wbytes = param_bytes(m)
    template = stages.template_prefix(m)
    t0 = template[0].shape[2]
    phase("model", t)
    t = time.perf_counter()
    mem, s1 = build_memory(m, real_tokens=opts.real_tokens, bank_tokens=opts.bank_tokens, seed=seed + 7)
    phase("memory", t)
    out: dict[str, Any] = {
        "card": fl["card"], "device": str(dev), "dtype": str(m.dtype).removeprefix("torch."),
        "geometry": opts.model or opts.geometry, "options": {k: getattr(opts, k) for k in Options.__slots__},
        "floors": fl,
        "model": {"parameters": sum(p.numel() for p in {p.data_ptr(): p for p in m.parameters()}.values()),
                  "weight_bytes": wbytes, "layers": cfg.num_layers, "hidden": cfg.hidden_size,
                  "router_layers": len(cfg.router_layers), "chunk_size": cfg.chunk_size, "top_k": cfg.top_k,
                  "routing_rule": cfg.routing_rule, "random_weights": opts.model is None and opts.geometry != "embedded"},
        "bank": {"rows_per_layer": mem.index.num_rows, "tokens_equivalent": mem.index.num_rows * cfg.chunk_size,
                 "documents": mem.real_docs + mem.synthetic_docs, "real_documents": mem.real_docs,
                 "real_tokens": mem.real_tokens, "synthetic_documents": mem.synthetic_docs,
                 "index_bytes": mem.key_bytes(), "content_host_bytes": mem.host.numel() * mem.host.element_size(),
                 "shared_content_pool": True,
                 "note": "synthetic documents have random routing keys scaled like the real ones and share the real "
                         "documents' content K/V (document R+i holds real document i mod R's chunks)"},
    }
    rows: list[dict[str, Any]] = []
    prompts = question_prompts(m, max(opts.questions, max(opts.batches)), opts.question_tokens, seed=seed + 11)
    out["question_tokens"] = statistics.mean(len(p.ids) for p in prompts)

    # -- time to first token per round, one question at a time (content pool emptied first: cold fetch) --
    t = time.perf_counter()
    stages.generate(m, [prompts[0]], mem.view(), max_new_tokens=1, stop_ids=(), template=template)  # warm-up
    official_generate(m, [prompts[0]], mem.official_view(), template, 1)
    speed: dict[str, float] = {}
    first = prompts[: opts.questions]
    routed1 = _ttft(m, mem, first, "r1", rows, speed, fl, template, wbytes)
    second = [round2_prompt(m, p, mem, sel) for p, sel in zip(first, routed1)]
    out["round2_tokens"] = statistics.mean(len(p.ids) for p in second)
    _ttft(m, mem, second, "r2", rows, speed, fl, template, wbytes)
    phase("ttft", t)

    # -- decode at each batch size: fixed new tokens, no stop ------------------------------------------
    t = time.perf_counter()
    same: dict[str, bool] = {}
    for b in opts.batches:
        ps = prompts[:b]
        # Warm-up with the timed token count: the same cache width bucket, so decode's CUDA graph is captured here.
        stages.generate(m, ps, mem.view(), max_new_tokens=opts.new_tokens, stop_ids=(), template=template)
        tm = {}
        g = stages.generate(m, ps, mem.view(), max_new_tokens=opts.new_tokens, stop_ids=(), template=template, timings=tm)
        ms = tm["decode_s"] / (opts.new_tokens - 1) * 1e3
        floor = _decode_floor(fl, mem, m, ps, g.routed, t0, wbytes, opts.new_tokens) * 1e3
        rows.append(_row(f"decode.b{b}", ms, floor, "ms/token", path="msabank", batch=b,
                         prefill_ms=tm["prefill_s"] * 1e3))
        r = official_generate(m, ps, mem.official_view(), template, opts.new_tokens)
        oms = r.decode_s / (opts.new_tokens - 1) * 1e3
        rows.append(_row(f"decode.b{b}", oms, floor, "ms/token", path="official-style", batch=b,
                         prefill_ms=r.prefill_s * 1e3))
        same[f"b{b}"] = r.tokens == g.tokens
        speed[f"decode.b{b}"] = oms / ms
    phase("decode", t)

    # -- stage 1 alone (the memory's real documents) and ingest through the engine ---------------------
    s1_floor = s1["tokens"] / (s1["flops"] / fl["gemm_flops"])
    rows.append(_row("stage1", s1["tokens"] / s1["seconds"], s1_floor, "tokens/s", path="msabank",
                     tokens=s1["tokens"], seconds=s1["seconds"]))
    t = time.perf_counter()
    ing = _ingest(m, opts.ingest_tokens, seed=seed + 13)
    rows.append(_row("ingest", ing["tokens"] / ing["seconds"], ing["tokens"] / (ing["flops"] / fl["gemm_flops"]),
                     "tokens/s", path="msabank", **{k: v for k, v in ing.items() if k != "flops"}))
    phase("ingest", t)
    out["rows"] = rows
    out["official_same_tokens"] = same
    out["speedup_vs_official"] = speed
    timing["total"] = time.perf_counter() - wall
    out["seconds"] = timing
    return out


def _ingest(model: MSAModel, tokens: int, *, seed: int, batch_size: int = 64) -> dict[str, Any]:
    """Ingest synthetic documents into a fresh bank on a temp dir through `Engine.ingest` (plan → stage 1 →
    pooling → commit), timed from the first batch to the last commit."""
    from msabank.engine import Engine
    from msabank.synth import World, docs_for_tokens

    world = World(seed=seed, num_docs=docs_for_tokens(tokens))
    docs = [(d.id, d.text) for d in world.documents()]
    with tempfile.TemporaryDirectory(prefix="msabank-e2e-") as tmp, \
            Engine.create(Path(tmp) / "bank", loaded=model) as eng:
        eng.ingest(docs[:4], batch_size=batch_size)  # warm-up (and the bank's first commit)
        t = time.perf_counter()
        rep = eng.ingest(docs[4:], batch_size=batch_size)
        seconds = time.perf_counter() - t
        st = eng.stats()
        lengths = [len(x) for x in stages.document_token_ids(model, [(i + 4, txt) for i, (_, txt) in enumerate(docs[4:])])]
        return {"documents": rep.added, "tokens": sum(lengths), "seconds": seconds, "batch_size": batch_size,
                "flops": stage1_flops(model.config, lengths), "bank_tokens": st.tokens,
                "tensor_bytes_per_token": st.tensor_bytes_on_disk / max(1, st.tokens)}


def render(res: dict[str, Any]) -> list[str]:
    """The printed table: one line per row, measured beside its floor."""
    fl = res["floors"]
    lines = [f"e2e on {res['card']} ({res['dtype']}, {res['geometry']}): HBM {fl['hbm_Bps'] / 1e9:,.0f} GB/s, "
             f"GEMM {fl['gemm_flops'] / 1e12:,.1f} TFLOP/s, H2D {fl['h2d_Bps'] / 1e9:,.1f} GB/s; bank "
             f"{res['bank']['tokens_equivalent'] / 1e6:,.2f}M tokens ({res['bank']['real_tokens']:,} real), "
             f"question {res['question_tokens']:.0f} tokens",
             f"{'row':<16}{'path':<16}{'measured':>14}{'floor':>14}  {'ratio':>7}  unit"]
    for r in res["rows"]:
        lines.append(f"{r['name']:<16}{r['path']:<16}{r['measured']:>14,.3f}{r['floor']:>14,.3f}  {r['ratio']:>7.2f}  "
                     f"{r['unit']}")
    sp = ", ".join(f"{k} {v:.1f}x" for k, v in res["speedup_vs_official"].items())
    lines.append(f"speed-up over the official-style path: {sp}; same greedy tokens: {res['official_same_tokens']}")
    lines.append(f"run {res['seconds']['total']:.0f} s (" + ", ".join(f"{k} {v:.0f}" for k, v in res["seconds"].items()
                                                           if k != "total") + ")")
    return lines
