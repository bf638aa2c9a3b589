"""The three MSA stages over an `MSAModel`, usable without any bank (spec §3, §4, §5).

Stage 1 `encode_documents`: each document alone through the decoder (positions from 0), chunk-mean-pooled
K̄, V̄, K̄ᴿ at the router layers; `template_prefix`: K/V of `<|im_start|>user\\n` for every layer.
Stage 2+3 `generate`: per router layer, route the prompt's routing tokens against a `MemoryView`, attend
over [template ; selected chunks ; prompt], then decode over that frozen context (never re-routing).
`InMemoryMemory` is the reference MemoryView. This module does not parse interleave transcripts or touch
storage; prompt layout is msabank.prompt.

`trace(name, tensor)` hooks (optional, for conformance tests) receive intermediates; names are stable.
"""

from __future__ import annotations

import time

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from msabank.config import ModelConfig
from msabank.decode import OnTokens, cache_width
from msabank.decode import decode as decode_tokens
from msabank.errors import InputError
from msabank.kernels.reference import (doc_scores_ref, normalize_heads, routing_query_ref, routing_topk_batched_ref,
                                      routing_topk_ref, row_scores_ref, span_index)
from msabank.kernels import attention, chunk_pool, sparse_attention
from msabank.model import MSAModel
from msabank.prompt import Prompt, Tokenizer, documents_ids, template_parts
from msabank.types import EncodedMemory, MemoryView, Routed

Trace = Callable[[str, torch.Tensor], None]
OnRoute = Callable[[int, int, Routed], None]


def _tokenizer(model: MSAModel) -> Tokenizer:
    if model.tokenizer is None:
        raise ValueError("model has no tokenizer (load it with msabank.model.load_model)")
    return model.tokenizer


# ---------------------------------------------------------------------------------------------------
# Stage 1
# ---------------------------------------------------------------------------------------------------


Layer1 = dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def stage1_forward(
    model: MSAModel,
    ids: torch.Tensor,
    lengths: torch.Tensor,
    *,
    through_layer: int | None = None,
    hidden: list[torch.Tensor] | None = None,
    trace: Callable[[int, str, torch.Tensor], None] | None = None,
) -> Layer1:
    """Stage 1 (spec §3.1): right-padded independent sequences, each alone, causally, at positions 0..

    ids: (B, T); lengths: (B,) real lengths on ids' device. Returns per layer 0..through_layer (default:
    all) (k, v, rk): k post-norm post-RoPE and v, each (B, Hkv, T, D), rk the router_k_proj output at
    router layers (else None). The MLP of `through_layer` is skipped (it cannot change what is stored)
    unless `hidden` (filled with the embeddings and every layer's output, all layers run) or `trace` asks
    for hidden states. Padding rows attend to themselves, so no row is fully masked (no NaN, also in
    gradients). Differentiable: the trainer backpropagates through it; the engine runs it under
    inference_mode. The one stage-1 forward of the engine, the evaluator and the trainer.
    """
    b, t = ids.shape
    dev = ids.device
    last = model.config.num_layers - 1 if through_layer is None else through_layer
    valid = torch.arange(t, device=dev)[None, :] < lengths[:, None]  # (B, T)
    mask = torch.ones(t, t, dtype=torch.bool, device=dev).tril()[None, None] & valid[:, None, None, :]
    mask = mask | torch.eye(t, dtype=torch.bool, device=dev)[None, None]  # (B, 1, T, T)
    cos, sin = model.rope(torch.arange(t, device=dev).expand(b, t))
    h = model.model.embed_tokens(ids)
    if trace:
        trace(-1, "embed_out", h)
    if hidden is not None:
        hidden.append(h)
    out: Layer1 = {}
    for i, layer in enumerate(model.model.layers):
        if i > last and hidden is None:
            break
        x = layer.input_layernorm(h)
        q, k, v = layer.self_attn.qkv(x, cos, sin)
        rk = layer.self_attn.router_k(x) if layer.self_attn.is_router else None
        out[i] = (k, v, rk)
        if trace:
            trace(i, "k_post_rope", k)
            trace(i, "v", v)
            if rk is not None:
                trace(i, "router_k", rk)
        elif i == last and hidden is None:
            break
        h = layer.finish(h, attention(q, k, v, mask))
        if trace:
            trace(i, "hidden_out", h)
        if hidden is not None:
            hidden.append(h)
    return out


def template_prefix(model: MSAModel, *, trace: Trace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of the template head `<|im_start|>user\\n` at positions 0..T0-1, for every layer.

    Returns k, v each (L, Hkv, T0, D) in the model dtype, on the model's device.
    """
    head = template_parts(_tokenizer(model)).head
    ids = torch.tensor([head], device=model.device)
    tr = None
    if trace is not None:
        tr = lambda i, name, x: trace(f"template/{name}" if i < 0 else f"template/L{i}/{name}", x[0])  # noqa: E731
    with torch.inference_mode():
        kv = stage1_forward(model, ids, torch.tensor([len(head)], device=model.device), trace=tr)
    k = torch.stack([kv[i][0][0] for i in range(model.config.num_layers)])
    v = torch.stack([kv[i][1][0] for i in range(model.config.num_layers)])
    return k, v


def pool_router_layers(cfg: ModelConfig, kv: Layer1, lengths: torch.Tensor
                       ) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Chunk means (spec §3.2) at every router layer of a stage-1 forward: layer → (K̄, V̄, K̄ᴿ, chunk_valid),
    each (B, Hkv, C, D) and (B, C), C = ceil(T / chunk_size) (`kernels.chunk_pool`); K̄ᴿ is not normalised."""
    t = next(iter(kv.values()))[0].shape[2]
    valid = torch.arange(t, device=lengths.device)[None, :] < lengths[:, None]
    out = {}
    for layer in cfg.router_layers:
        k, v, rk = kv[layer]
        assert rk is not None, "router layer without router_k_proj"
        pk, cv = chunk_pool(k, valid, cfg.chunk_size)
        pv, _ = chunk_pool(v, valid, cfg.chunk_size)
        prk, _ = chunk_pool(rk, valid, cfg.chunk_size)
        out[layer] = (pk, pv, prk, cv)
    return out


MAX_TOKENS_PER_BATCH = 16_384
"""Padded tokens per stage-1 forward: bounds activations, (B, T, hidden) and the K/V of every layer."""
MAX_MASK_CELLS = 1 << 25
"""B·T·T per stage-1 forward: bounds the attention mask and scores, which grow with the square of the
padded length (32 Mi cells: 32 MB of mask, 128 MB of fp32 scores per head; one 4,096-token document is 16 Mi)."""


def max_document_tokens(model: MSAModel) -> int:
    """The longest composed document the model encodes: its positions run 0..n-1 (spec §3.1), so n is at
    most the checkpoint's `max_position_embeddings`."""
    return int(model.config.max_position_embeddings)


def document_token_ids(model: MSAModel, docs: Sequence[tuple[int, str]], names: Sequence[str] | None = None
                       ) -> list[list[int]]:
    """Token ids of each composed document `<|im_start|>[n]. text[n]<|im_end|>`; InputError naming the
    first document longer than `max_document_tokens` (its id, its length, the limit), before any encoding."""
    tok = _tokenizer(model)
    limit = max_document_tokens(model)
    seqs = documents_ids(tok, docs)  # one batch: every core (a per-document encode cost ~50-250 µs)
    for i, ids in enumerate(seqs):
        if len(ids) > limit:
            name = repr(names[i]) if names is not None else f"[{docs[i][0]}]"
            raise InputError(f"document {name} is {len(ids):,} tokens; the model reads documents of at most "
                             f"{limit:,} tokens (max_position_embeddings)",
                             hint=f"split it into documents of at most {limit:,} tokens and ingest those")
    return seqs


def _stage1_groups(lengths: Sequence[int], max_tokens: int, max_cells: int) -> list[list[int]]:
    """Documents (indices) per stage-1 forward: length-sorted, each group within `max_tokens` padded tokens
    and `max_cells` mask cells (a document alone always forms a group)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    start = 0
    while start < len(order):
        end = start + 1  # sorted ascending, so the last member sets the padded length
        while end < len(order):
            b, t = end + 1 - start, lengths[order[end]]
            if b * t > max_tokens or b * t * t > max_cells:
                break
            end += 1
        groups.append(order[start:end])
        start = end
    return groups


def encode_documents(
    model: MSAModel,
    docs: Sequence[tuple[int, str]],
    *,
    names: Sequence[str] | None = None,
    max_tokens_per_batch: int = MAX_TOKENS_PER_BATCH,
    trace: Trace | None = None,
    token_ids: Sequence[Sequence[int]] | None = None,
    dtype: torch.dtype | None = None,
) -> list[EncodedMemory]:
    """Stage 1 for (number, text) documents, returned in input order.

    Each document `<|im_start|>[n]. text[n]<|im_end|>` is run alone at positions 0.. (spec §3.1);
    several are batched per forward (right-padded, length-sorted, at most `max_tokens_per_batch` padded
    tokens and MAX_MASK_CELLS mask cells) with a causal mask that hides the padding, which does not change
    any document's result. A document longer than `max_document_tokens(model)` is an InputError before
    anything is encoded (`names`: the user ids it names). `token_ids`: the composed documents already
    tokenized (`document_token_ids`; the engine tokenizes per commit batch, ahead of stage 1). Tensors are
    (R, C, Hkv, D) on CPU in `dtype` (default: the model dtype), cast on the model's device.

    Each group's pooled K̄, V̄, K̄ᴿ reach the host in one copy (one (3, R, B, C, Hkv, D) buffer, pinned on a
    GPU, where the copy of group g overlaps the forward of group g + 1); a document's tensors are views of
    its group's buffer, not per-document, per-layer copies (issue 12: 3·R device-to-host syncs per document
    before).
    """
    seqs = document_token_ids(model, docs, names) if token_ids is None else token_ids
    if len(seqs) != len(docs):
        raise ValueError(f"{len(docs)} documents but {len(seqs)} token sequences")
    out_dtype = dtype or model.dtype
    results: list[EncodedMemory | None] = [None] * len(seqs)
    pending: tuple[torch.Tensor, torch.cuda.Event | None, list[int], list[int]] | None = None
    for group in _stage1_groups([len(s) for s in seqs], max_tokens_per_batch, MAX_MASK_CELLS):
        lengths = [len(seqs[i]) for i in group]
        host = _stage1_group(model, group, seqs, lengths, out_dtype, _group_trace(trace, docs, group, lengths))
        if pending is not None:
            _unpack_group(model.config, results, *pending)
        pending = (*host, group, lengths)
    if pending is not None:
        _unpack_group(model.config, results, *pending)
    return [r for r in results if r is not None]


def _group_trace(trace: Trace | None, docs: Sequence[tuple[int, str]], group: list[int], lengths: list[int]
                 ) -> Callable[[int, str, torch.Tensor], None] | None:
    """stage1_forward's trace hook for one group: each row's intermediates under `doc<n>/…` names, unpadded."""
    if trace is None:
        return None
    t = max(lengths)

    def tr(i: int, name: str, x: torch.Tensor) -> None:
        for row, j in enumerate(group):
            key = f"doc{docs[j][0]}/{name}" if i < 0 else f"doc{docs[j][0]}/L{i}/{name}"
            xs = x[row, : lengths[row]] if x.dim() == 3 and x.shape[1] == t else x[row, :, : lengths[row]]
            trace(key, xs)

    return tr


def _stage1_group(model: MSAModel, group: list[int], seqs: Sequence[Sequence[int]], lengths: list[int],
                  dtype: torch.dtype, tr: Callable[[int, str, torch.Tensor], None] | None
                  ) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """One stage-1 forward of a length-sorted group, pooled and packed into one (3, R, B, C, Hkv, D) host
    buffer (slot 0 K̄ᴿ, normalised per head under cosine routing, slot 1 K̄, slot 2 V̄) in `dtype`; on a GPU
    the copy is queued (non-blocking, pinned) and the returned event marks its end."""
    cfg = model.config
    dev = model.device
    tok = _tokenizer(model)
    flat = torch.tensor([t for i in group for t in seqs[i]], dtype=torch.long)
    lens_cpu = torch.tensor(lengths, dtype=torch.long)
    # right-padded (B, T) ids built in one scatter instead of one tensor per row
    ids = torch.full((len(group), max(lengths)), tok.pad_id, dtype=torch.long)
    ids[torch.arange(ids.shape[1])[None, :] < lens_cpu[:, None]] = flat
    with torch.inference_mode():
        lens = lens_cpu.to(dev)
        kv = stage1_forward(model, ids.to(dev), lens, trace=tr, through_layer=None if tr else max(cfg.router_layers))
        pooled = pool_router_layers(cfg, kv, lens)
        rk = torch.stack([pooled[layer][2] for layer in cfg.router_layers])  # (R, B, Hkv, C, D)
        if cfg.routing_rule == "cosine":  # after pooling (spec §3.2), in fp32, back to the model dtype
            rk = normalize_heads(rk).to(rk.dtype)
        packed = torch.stack([rk, *(torch.stack([pooled[layer][s] for layer in cfg.router_layers]) for s in (0, 1))])
        packed = packed.to(dtype).transpose(-3, -2)  # (3, R, B, C, Hkv, D)
        if dev.type != "cuda":
            return packed.contiguous(), None
        host = torch.empty(packed.shape, dtype=dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done


def _unpack_group(cfg: ModelConfig, results: list[EncodedMemory | None], host: torch.Tensor,
                  done: torch.cuda.Event | None, group: list[int], lengths: list[int]) -> None:
    """Each document of a group as views (R, C, Hkv, D) of the group's host buffer (after its copy ends)."""
    if done is not None:
        done.synchronize()
    for row, i in enumerate(group):
        c = -(-lengths[row] // cfg.chunk_size)
        results[i] = EncodedMemory(n_tokens=lengths[row], routing_keys=host[0, :, row, :c],
                                   content_k=host[1, :, row, :c], content_v=host[2, :, row, :c])


# ---------------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------------


def routing_queries(qr: torch.Tensor, mask: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """Group-summed, scaled routing queries (DESIGN.md §6, spec §4.2) of each sample's routing tokens.

    qr: (B, H, T, D) router_q_proj output; mask: bool (B, T). Returns per sample (T_b, Hkv*D) float32:
    Q̃_t = concat_g (s/H) Σ_j Q^R[g·G + j, t], after per-head normalisation when the rule is cosine
    (`kernels.routing_query_ref`, float32).
    """
    g = routing_query_ref(qr, cfg.num_kv_heads, cfg.routing_scale, cfg.routing_rule == "cosine")  # (B, T, Hkv*D)
    return [g[i][mask[i]] for i in range(qr.shape[0])]


class InMemoryMemory:
    """Reference `MemoryView` over encoded documents held in memory (plain PyTorch, CPU or GPU): scores
    and top-k by the kernels' routing reference (`kernels.reference`), over fp32 keys."""

    def __init__(
        self, encoded: Mapping[int, EncodedMemory], top_k: int, *, device: str | torch.device = "cpu"
    ) -> None:
        self.top_k = top_k
        self.device = torch.device(device)
        self._docs = {n: encoded[n] for n in sorted(encoded)}
        self.numbers = torch.tensor(list(self._docs), dtype=torch.long)
        num_layers = max((e.routing_keys.shape[0] for e in self._docs.values()), default=0)
        self._keys: list[torch.Tensor] = []  # per router layer (rows, Hkv*D) float32
        for r in range(num_layers):
            rows = [e.routing_keys[r].reshape(e.num_chunks, -1) for e in self._docs.values()]
            self._keys.append(torch.cat(rows).float().to(self.device))
        counts = torch.tensor([e.num_chunks for e in self._docs.values()], dtype=torch.long)
        # Dense document index = position among the ascending numbers, so ties to the lower index are
        # ties to the lower number.
        self._row_doc = torch.repeat_interleave(torch.arange(len(counts)), counts).to(self.device)
        self._counts = counts
        self._starts = counts.cumsum(0) - counts  # first row of each document in the per-layer tensors
        self._dense = {n: i for i, n in enumerate(self._docs)}
        self._content: list[tuple[torch.Tensor, ...]] = []  # per router layer: k, v (rows, Hkv, D)
        for r in range(num_layers):
            self._content.append(tuple(torch.cat([getattr(e, a)[r] for e in self._docs.values()]).to(self.device)
                                       for a in ("content_k", "content_v")))

    def doc_scores(self, layer_index: int, query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of every document: max over its chunks of max over query rows of <Q̃_t, K̃_c>.

        query: (T, Hkv*D). Returns numbers (N,) ascending and scores (N,) float32.
        """
        n = len(self._docs)
        if n == 0 or query.shape[0] == 0:
            return self.numbers, torch.full((n,), float("-inf"))
        rows = row_scores_ref(query.to(self.device, torch.float32), self._keys[layer_index])
        return self.numbers, doc_scores_ref(rows, self._row_doc, n).cpu()

    def route(self, layer_index: int, query: torch.Tensor) -> Routed:
        if not self._docs or query.shape[0] == 0:
            return Routed(numbers=torch.empty(0, dtype=torch.long), scores=torch.empty(0))
        scores, index = routing_topk_ref(query.to(self.device, torch.float32), self._keys[layer_index],
                                         self._row_doc, len(self._docs), self.top_k)
        return Routed(numbers=self.numbers[index.cpu()], scores=scores.cpu())

    def route_batch(self, layer_index: int, queries: Sequence[torch.Tensor]) -> list[Routed]:
        """`route` for each question, one pass over the layer's keys (`routing_topk_batched_ref`): the same
        scores and ids, bit for bit."""
        if not self._docs or not queries:
            return [self.route(layer_index, q[:0]) for q in queries]
        lens = torch.tensor([q.shape[0] for q in queries])
        seq = torch.repeat_interleave(torch.arange(len(queries)), lens)
        query = torch.cat([q.to(self.device, torch.float32) for q in queries])
        scores, index = routing_topk_batched_ref(query, seq, len(queries), self._keys[layer_index], self._row_doc,
                                                 len(self._docs), self.top_k)
        scores, index = scores.cpu(), index.cpu()
        keep = index >= 0
        return [Routed(numbers=self.numbers[index[s][keep[s]]], scores=scores[s][keep[s]]) for s in range(len(queries))]

    def content_kv_batch(self, layer_index: int, numbers: Sequence[Sequence[int]]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every sample's chunks (ascending numbers) as k, v (B, Hkv, C_max, D) and lengths (B,): one
        index_select per tensor over the layer's content rows."""
        dense = [sorted({self._dense[int(n)] for n in ns}) for ns in numbers]
        d = torch.tensor([i for ds in dense for i in ds], dtype=torch.long)
        seq = torch.repeat_interleave(torch.arange(len(dense)), torch.tensor([len(ds) for ds in dense], dtype=torch.long))
        index, lengths = span_index(self._starts[d], self._counts[d], seq, len(dense))
        b, c_max = index.shape
        if not self._content:
            e = torch.zeros(b, 0, 0, 0, device=self.device)
            return e, e.clone(), lengths.to(self.device)
        flat = index.view(-1).to(self.device)
        pad = (flat < 0).view(-1, 1, 1)
        ck, cv = (x.index_select(0, flat.clamp_min(0)).masked_fill_(pad, 0).view(b, c_max, *x.shape[1:]).transpose(1, 2)
                  for x in self._content[layer_index])
        return ck, cv, lengths.to(self.device)

    def content_kv(self, layer_index: int, numbers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        docs = [self._docs[int(n)] for n in sorted(int(n) for n in numbers)]
        if not docs:
            first = next(iter(self._docs.values()), None)
            shape = (0, *first.content_k.shape[2:]) if first is not None else (0, 0, 0)
            empty = torch.empty(shape, device=self.device)
            return empty, empty
        k = torch.cat([d.content_k[layer_index] for d in docs]).to(self.device)
        v = torch.cat([d.content_v[layer_index] for d in docs]).to(self.device)
        return k, v


# ---------------------------------------------------------------------------------------------------
# Stage 2 + 3
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PaddedPrompts:
    """Left-padded prompts (spec §7.7)."""

    input_ids: torch.Tensor
    """(B, T) int64, pad id on the left."""
    attention_mask: torch.Tensor
    """(B, T) bool, False on padding."""
    routing_mask: torch.Tensor
    """(B, T) bool, routing tokens (never padding)."""
    positions: torch.Tensor
    """(B, T) int64: first_position + i for the i-th real token; padding repeats first_position."""


def pad_batch(prompts: Sequence[Prompt], *, pad_id: int, first_position: int) -> PaddedPrompts:
    t = max(len(p.ids) for p in prompts)
    b = len(prompts)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    att = torch.zeros((b, t), dtype=torch.bool)
    route = torch.zeros((b, t), dtype=torch.bool)
    pos = torch.full((b, t), first_position, dtype=torch.long)
    for i, p in enumerate(prompts):
        n = len(p.ids)
        ids[i, t - n :] = torch.tensor(p.ids, dtype=torch.long)
        att[i, t - n :] = True
        route[i, t - n :] = torch.tensor(p.routing_mask, dtype=torch.bool)
        pos[i, t - n :] = torch.arange(first_position, first_position + n)
    return PaddedPrompts(ids, att, route, pos)


@dataclass(slots=True)
class LayerCache:
    """One layer's compacted context, allocated once: [template (T0) | chunks (C_max) | prompt (T) | new | spare].

    The width S is `decode.cache_width` of what the generation needs (a bucket, so decode's CUDA graphs are
    reused); columns past the last token written are zero and not valid."""

    k: torch.Tensor
    """(B, Hkv, S, D)."""
    v: torch.Tensor
    """(B, Hkv, S, D)."""
    valid: torch.Tensor
    """(B, S) bool: columns that hold a real key (chunk padding, prompt padding, unwritten = False)."""
    prompt_start: int
    """Column of the first prompt token (T0 + C_max)."""


@dataclass(slots=True)
class Generated:
    """What `generate` returns; everything is per sample, in prompt order."""

    tokens: list[list[int]]
    """Generated ids; ends with the stop id when one fired."""
    finish_reasons: list[str]
    """"stop" or "length"."""
    routed: list[list[Routed]]
    """[sample][layer_index]: the documents each router layer selected (evidence)."""
    first_logits: torch.Tensor
    """(B, V) float32 CPU: logits of the first generated token."""
    step_logits: torch.Tensor | None = None
    """(steps, B, V) float32 CPU, only with keep_logits=True."""
    cache: list[LayerCache] | None = None
    """Per layer, only with keep_cache=True."""
    context: Context | None = None
    """What `resume` needs to continue this generation over its cache, only with keep_cache=True."""


@dataclass(slots=True)
class Context:
    """A finished generation's cache, as `resume` continues it (the answer hand-off, spec §6.2)."""

    caches: list[LayerCache]
    """Per layer (B rows): the prompt and every generated token fed so far (the last chosen one is not)."""
    starts: list[int]
    """Per layer: the column of the first generated token (prompt_start + padded prompt length)."""
    last_positions: list[int]
    """Per sample: the position of its prompt's last token."""
    tokens: list[list[int]]
    """Per sample: the generated tokens (`Generated.tokens`)."""


def _as_prompts(prompt_ids: Sequence[int] | Sequence[Sequence[int]] | Sequence[Prompt], routing_mask: object) -> list[Prompt]:
    items = list(prompt_ids)
    if items and isinstance(items[0], Prompt):
        return items  # type: ignore[return-value]
    if items and isinstance(items[0], int):
        items, routing_mask = [items], None if routing_mask is None else [routing_mask]
    masks = routing_mask if routing_mask is not None else [None] * len(items)
    out = []
    for ids, m in zip(items, masks, strict=True):  # type: ignore[arg-type]
        ids = [int(i) for i in ids]  # type: ignore[union-attr]
        out.append(Prompt(ids=ids, routing_mask=[bool(x) for x in m] if m is not None else [True] * len(ids)))
        if len(out[-1].routing_mask) != len(ids):
            raise ValueError("routing_mask must have one entry per prompt token")
    if not out or any(not p.ids for p in out):
        raise ValueError("generate needs at least one non-empty prompt")
    return out


def _choose(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """(B, V) float32 -> (B,) token ids. temperature <= 0 is greedy (first max on ties)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p  # keeps the smallest prefix whose mass reaches top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _prefill(
    model: MSAModel,
    batch: PaddedPrompts,
    memory: MemoryView,
    template: tuple[torch.Tensor, torch.Tensor],
    max_new_tokens: int,
    on_route: OnRoute | None,
    trace: Trace | None,
    selected: Sequence[Sequence[Routed] | None] | None = None,
) -> tuple[list[LayerCache], list[list[Routed]], torch.Tensor]:
    """Route, fetch and run the prompt forward; returns every layer's cache, routed[sample][layer_index] and
    the last position's logits (B, V) float32 on the device.

    Two paths for routing and fetch. The device path (a memory with `prefill_selection`, e.g. BankMemory
    over one RoutingIndex): each router layer's top-k and content gather stay on the device, the chunk
    columns are a static bound on CUDA (`LayerCache.valid` masks the padding), and the host learns the
    selections once, after the last layer: `on_route` fires then, layer by layer. The synced path (any
    other MemoryView, memory parallel, a bound past `index.MAX_STATIC_COLUMNS`): per router layer
    `route_batch` brings the numbers to the host, `content_kv_batch` fetches them, `on_route` fires as each
    layer selects. On CPU both give the same selections, caches and logits, bit for bit.
    """
    cfg, dev, dt = model.config, model.device, model.dtype
    b, t = batch.input_ids.shape
    t0 = template[0].shape[2]
    cos, sin = model.rope(batch.positions)
    causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()[None] & batch.attention_mask[:, None, :]  # (B, T, T)
    # The routing tokens' rows of the (B·T, Hkv·D) routing queries, found once per prefill from the mask
    # (it came from the host: one small read before the forward, instead of a boolean index, a sync, per
    # sample per router layer). Samples with a replayed selection or no routing token do not route.
    route_np = (batch.routing_mask & batch.attention_mask).cpu().numpy()
    per_sample = route_np.sum(1)
    routes = np.array([per_sample[s] > 0 and (selected is None or selected[s] is None) for s in range(b)])
    rows_np = np.flatnonzero((route_np & routes[:, None]).reshape(-1))
    rows = torch.from_numpy(rows_np).to(dev)
    lens = [int(n) if routes[s] else 0 for s, n in enumerate(per_sample)]
    device_sel = memory.prefill_selection(b, selected) if hasattr(memory, "prefill_selection") else None
    seq = torch.from_numpy(rows_np // t).to(dev) if device_sel is not None else None
    routed: list[list[Routed]] = [[] for _ in range(b)]
    caches: list[LayerCache] = []
    h = model.model.embed_tokens(batch.input_ids)
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q, k, v = attn.qkv(x, cos, sin)
        chunk_k = chunk_v = chunk_len = None
        if attn.is_router:
            r = cfg.router_layers.index(i)
            qr = attn.router_q(x)
            if trace:  # the official intermediate is the query as scored: normalised per head under cosine
                trace(f"prefill/L{i}/routing_q", normalize_heads(qr).to(qr.dtype) if cfg.routing_rule == "cosine" else qr)
            g = routing_query_ref(qr, cfg.num_kv_heads, cfg.routing_scale, cfg.routing_rule == "cosine")  # (B, T, Hkv*D)
            query = g.reshape(b * t, -1).index_select(0, rows)  # the routing samples' rows, sample by sample
            if device_sel is not None:
                assert seq is not None
                chunk_k, chunk_v, chunk_len = device_sel.layer(r, query, seq)
            else:
                sels = _route_layer(memory, r, list(query.split(lens)), selected)
                for s, sel in enumerate(sels):
                    routed[s].append(sel)
                    if on_route:
                        on_route(s, r, sel)
                # One gather for every sample's chunks. The numbers came back to the host with the routing (the
                # layer's one sync): the content store keeps its device pool's bookkeeping on the host.
                chunk_k, chunk_v, chunk_len = memory.content_kv_batch(r, [sel.numbers.tolist() for sel in sels])
        c_max = chunk_k.shape[2] if chunk_k is not None else 0
        p0 = t0 + c_max
        size = cache_width(p0 + t + max_new_tokens)  # bucketed: decode's captured graphs are per width
        cache = LayerCache(
            k=torch.zeros(b, cfg.num_kv_heads, size, cfg.head_dim, device=dev, dtype=dt),
            v=torch.zeros(b, cfg.num_kv_heads, size, cfg.head_dim, device=dev, dtype=dt),
            valid=torch.zeros(b, size, dtype=torch.bool, device=dev),
            prompt_start=p0,
        )
        cache.k[:, :, :t0] = template[0][i]
        cache.v[:, :, :t0] = template[1][i]
        cache.valid[:, :t0] = True
        if c_max:  # (B, Hkv, C_max, D): one copy each, whatever the batch
            assert chunk_k is not None and chunk_v is not None and chunk_len is not None
            cache.k[:, :, t0:p0] = chunk_k
            cache.v[:, :, t0:p0] = chunk_v
            cache.valid[:, t0:p0] = torch.arange(c_max, device=dev)[None, :] < chunk_len.to(dev)[:, None]
        cache.k[:, :, p0 : p0 + t] = k
        cache.v[:, :, p0 : p0 + t] = v
        cache.valid[:, p0 : p0 + t] = batch.attention_mask
        # Every query sees the template and its sample's chunks; causal among real prompt tokens only.
        h = layer.finish(h, sparse_attention(q, cache.k[:, :, : p0 + t], cache.v[:, :, : p0 + t], cache.valid[:, :p0],
                                             causal))
        caches.append(cache)
        if trace:
            trace(f"prefill/L{i}/q_post_rope", q)
            trace(f"prefill/L{i}/k_post_rope", k)
            trace(f"prefill/L{i}/hidden_out", h)
    if trace:
        hn = model.model.norm(h)
        trace("prefill/final_norm_out", hn)
        trace("prefill/logits", model.lm_head(hn).float())
    logits = model.lm_head(model.model.norm(h[:, -1])).float()  # only the last position
    if device_sel is not None:  # the selections reach the host once, after every layer is queued
        for r, sels in enumerate(device_sel.finish()):
            for s, sel in enumerate(sels):
                routed[s].append(sel)
                if on_route:
                    on_route(s, r, sel)
    return caches, routed, logits


def _route_layer(memory: MemoryView, r: int, queries: list[torch.Tensor],
                 selected: Sequence[Sequence[Routed] | None] | None) -> list[Routed]:
    """Each sample's selection at router layer r: replayed from `selected` (the answer hand-off, spec §6.2),
    nothing without routing tokens, else routed, every routing sample in one `route_batch` call.
    queries[s]: sample s's routing-query rows (empty for a sample that does not route)."""
    given = [selected[s] if selected is not None else None for s in range(len(queries))]
    todo = [s for s, q in enumerate(queries) if given[s] is None and q.shape[0]]
    fresh = dict(zip(todo, memory.route_batch(r, [queries[s] for s in todo]))) if todo else {}
    none = Routed(numbers=torch.empty(0, dtype=torch.long), scores=torch.empty(0))
    return [g[r] if g is not None else fresh.get(s, none) for s, g in enumerate(given)]


class _Split:
    """`timings`' prefill_s / decode_s of one generation without a host sync between the two: on CUDA two
    events (the start, the prefill's end on the stream) read once decode has synced, so prefill_s is the
    stream's time from the start to the prefill's last kernel and decode_s the rest of the wall time; on a
    CPU host time."""

    def __init__(self, device: torch.device) -> None:
        self.t0 = time.perf_counter()
        self.t1 = self.t0
        self.events: list[torch.cuda.Event] = []
        if device.type == "cuda":
            self.events.append(torch.cuda.Event(enable_timing=True))
            self.events[0].record()

    def mark(self) -> None:
        if self.events:
            self.events.append(torch.cuda.Event(enable_timing=True))
            self.events[1].record()
        else:
            self.t1 = time.perf_counter()

    def done(self, timings: dict[str, float] | None) -> None:
        if timings is None:
            return
        wall = time.perf_counter() - self.t0
        if self.events:
            self.events[1].synchronize()  # already reached: decode's last host round trip came after it
            prefill = min(self.events[0].elapsed_time(self.events[1]) / 1e3, wall)
        else:
            prefill = self.t1 - self.t0
        timings["prefill_s"] = timings.get("prefill_s", 0.0) + prefill
        timings["decode_s"] = timings.get("decode_s", 0.0) + wall - prefill


def _upload(device: torch.device, *xs: torch.Tensor) -> list[torch.Tensor]:
    """Small host int64/bool tensors on `device` in one copy (flattened into one int64 buffer, non-blocking
    on CUDA: staged by the driver, no pin_memory per call) instead of one blocking copy each, each of which
    synchronises the stream."""
    if device.type == "cpu":
        return list(xs)
    flat = torch.cat([x.reshape(-1).long() for x in xs]).to(device, non_blocking=device.type == "cuda")
    out, at = [], 0
    for x in xs:
        part = flat[at : at + x.numel()].view(x.shape)
        out.append(part != 0 if x.dtype == torch.bool else part)
        at += x.numel()
    return out


def _upload_batch(batch: PaddedPrompts, device: torch.device) -> PaddedPrompts:
    """The padded prompts on `device` in one copy (`_upload`)."""
    return PaddedPrompts(*_upload(device, batch.input_ids, batch.attention_mask, batch.routing_mask, batch.positions))


def generate(
    model: MSAModel,
    prompt_ids: Sequence[int] | Sequence[Sequence[int]] | Sequence[Prompt],
    memory: MemoryView,
    *,
    routing_mask: Sequence[bool] | Sequence[Sequence[bool]] | None = None,
    max_new_tokens: int | Sequence[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] | None = None,
    stop_text: str | None = None,
    seed: int | None = None,
    on_route: OnRoute | None = None,
    selected: Sequence[Sequence[Routed] | None] | None = None,
    template: tuple[torch.Tensor, torch.Tensor] | None = None,
    keep_logits: bool = False,
    keep_cache: bool = False,
    trace: Trace | None = None,
    timings: dict[str, float] | None = None,
    decode: str | None = None,
    on_tokens: OnTokens | None = None,
) -> Generated:
    """Route, prefill and decode one prompt or a left-padded batch of prompts (spec §4, §5).

    prompt_ids: one prompt (list of ids), several, or `Prompt`s (which carry their routing masks).
    routing_mask: per token True = routing query (None: every token routes). Query positions start at
    T0 + config.top_k (spec §2.4). Each router layer selects its own documents once, at prefill; decoding
    reuses that context. Greedy when temperature <= 0. A sample stops after emitting any of `stop_ids`
    (default: the checkpoint's EOS ids), once its decoded output contains `stop_text` (the interleave
    marker `<End-of-Retrieve>` is plain text spread over several tokens, spec §1.4), or after
    max_new_tokens (one limit for the batch, or one per sample). on_route(sample, layer_index, routed)
    is called for every selection in layer order (on the device path once the prefill's layers are queued:
    `_prefill`). `selected[sample]`, when given and not None, is that sample's
    earlier selection (one `Routed` per router layer) used instead of routing: the answer hand-off decodes
    with the documents of the round it ends (spec §6.2). `template`: precomputed `template_prefix(model)`.
    `timings`, when given, receives "prefill_s" (routing, fetch and the prompt forward) and "decode_s"
    (device-synchronised wall time). `decode`: "auto" (default, or MSABANK_DECODE: a CUDA graph per step
    on CUDA, eager on CPU), "graph" or "eager" (msabank.decode); the tokens are the same. `on_tokens(sample,
    token_ids)` receives each sample's new tokens once per host block (streaming; stop tokens included,
    tokens after a stop never).
    """
    prompts = _as_prompts(prompt_ids, routing_mask)
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else [int(n) for n in max_new_tokens]
    if len(limits) != len(prompts) or min(limits) < 1:
        raise ValueError("max_new_tokens must be >= 1, one limit or one per prompt")
    if selected is not None and len(selected) != len(prompts):
        raise ValueError("selected needs one entry (or None) per prompt")
    tok = _tokenizer(model)
    stops = set(model.stop_ids if stop_ids is None else stop_ids)
    gen = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    with torch.inference_mode():
        template = template if template is not None else template_prefix(model)
        t0 = template[0].shape[2]
        host = pad_batch(prompts, pad_id=tok.pad_id, first_position=t0 + model.config.top_k)
        batch = _upload_batch(host, model.device)
        split = _Split(model.device)
        caches, routed, logits = _prefill(model, batch, memory, template, max(limits), on_route, trace, selected)
        split.mark()
        t = batch.input_ids.shape[1]
        out = decode_tokens(model, [c.k for c in caches], [c.v for c in caches], [c.valid for c in caches],
                            [c.prompt_start + t for c in caches], logits, batch.positions[:, -1], limits=limits,
                            stop_ids=sorted(stops), stop_text=stop_text, tokenizer=tok, temperature=temperature,
                            top_p=top_p, generator=gen, choose=_choose, keep_logits=keep_logits, keep_cache=keep_cache,
                            mode=decode, on_tokens=on_tokens)
        # After decode, not between prefill and decode: on CUDA a copy there stalls the host until the prefill
        # ends, so the first decode steps could not be queued behind it; decode's last block synced already.
        first = logits.cpu()
    split.done(timings)
    return Generated(
        tokens=out.tokens,
        finish_reasons=["stop" if d else "length" for d in out.stopped],
        routed=routed,
        first_logits=first,
        step_logits=torch.stack([x.cpu() for x in out.step_logits]) if keep_logits else None,
        cache=caches if keep_cache else None,
        context=Context(caches, [c.prompt_start + t for c in caches], host.positions[:, -1].tolist(), out.tokens)
        if keep_cache else None,
    )


def resume(
    model: MSAModel,
    context: Context,
    rows: Sequence[int],
    appended: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] | None = None,
    stop_text: str | None = None,
    seed: int | None = None,
    keep_logits: bool = False,
    timings: dict[str, float] | None = None,
    decode: str | None = None,
    on_tokens: OnTokens | None = None,
) -> Generated:
    """Continue samples `rows` of an earlier generation: feed `appended[j]` after what sample rows[j]
    generated, over the same frozen context (no routing), then decode as `generate` does.

    The answer hand-off (spec §6.2) restates the question after a round and answers with that round's
    selection: `generate(transcript + restatement, selected=round's selection)` runs the whole transcript
    through the model again, recomputing K/V the round's prefill and decode already wrote into its cache
    (3 prefills per 2-round ask, the hand-off's the longest). Here only the new tokens run: each sample's
    last generated token (chosen, never fed) and `appended`, causally among themselves, at the positions
    that continue its transcript, attending over its cache (template, chunks, prompt, fed tokens). The
    cache columns are the transcript's in the same order, so the result equals that re-prefill up to
    float rounding (the same tokens on the golden and synthetic interleave tests); `routed` is empty.
    Columns a sample did not keep (a batch decodes on after a sample stops) are masked.
    """
    if not rows or len(appended) != len(rows):
        raise ValueError("resume needs one appended token list per row (and at least one row)")
    limits = [max_new_tokens] * len(rows) if isinstance(max_new_tokens, int) else [int(n) for n in max_new_tokens]
    if len(limits) != len(rows) or min(limits) < 1:
        raise ValueError("max_new_tokens must be >= 1, one limit or one per row")
    if any(not context.tokens[r] for r in rows):
        raise ValueError("resume continues a generation that produced at least one token")
    tok = _tokenizer(model)
    cfg, dev, dt = model.config, model.device, model.dtype
    stops = set(model.stop_ids if stop_ids is None else stop_ids)
    gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
    lens = [len(context.tokens[r]) for r in rows]
    new = [[context.tokens[r][-1], *map(int, extra)] for r, extra in zip(rows, appended)]
    b, n, kept = len(rows), max(len(x) for x in new), max(lens) - 1  # kept: fed columns of the longest row
    # Left-padded block of new tokens; row j continues at position last + lens[j] (its last token's).
    ids = torch.full((b, n), tok.pad_id, dtype=torch.long)
    att = torch.zeros((b, n), dtype=torch.bool)
    pos = torch.zeros((b, n), dtype=torch.long)
    for j, (r, x) in enumerate(zip(rows, new)):
        p = context.last_positions[r] + lens[j]
        ids[j, n - len(x):] = torch.tensor(x, dtype=torch.long)
        att[j, n - len(x):] = True
        pos[j] = p
        pos[j, n - len(x):] = torch.arange(p, p + len(x))
    # The fed columns each row kept: [start, start + lens[j] - 1); later ones (run past its stop) masked.
    gap = torch.arange(kept)[None, :] >= torch.tensor([x - 1 for x in lens])[:, None]
    with torch.inference_mode():
        split = _Split(dev)
        ids, att, pos, gap, idx = _upload(dev, ids, att, pos, gap, torch.tensor(list(rows), dtype=torch.long))
        cos, sin = model.rope(pos)
        causal = torch.ones(n, n, dtype=torch.bool, device=dev).tril()[None] & att[:, None, :]
        h = model.model.embed_tokens(ids)
        caches: list[LayerCache] = []
        for i, layer in enumerate(model.model.layers):
            old, s0 = context.caches[i], context.starts[i]
            c = s0 + kept  # the new block's first column
            size = cache_width(c + n + max(limits))
            cache = LayerCache(k=torch.zeros(b, cfg.num_kv_heads, size, cfg.head_dim, device=dev, dtype=dt),
                               v=torch.zeros(b, cfg.num_kv_heads, size, cfg.head_dim, device=dev, dtype=dt),
                               valid=torch.zeros(b, size, dtype=torch.bool, device=dev), prompt_start=c)
            cache.k[:, :, :c] = old.k[:, :, :c].index_select(0, idx)
            cache.v[:, :, :c] = old.v[:, :, :c].index_select(0, idx)
            cache.valid[:, :c] = old.valid[:, :c].index_select(0, idx)
            cache.valid[:, s0:c].masked_fill_(gap, False)
            q, k, v = layer.self_attn.qkv(layer.input_layernorm(h), cos, sin)
            cache.k[:, :, c : c + n] = k
            cache.v[:, :, c : c + n] = v
            cache.valid[:, c : c + n] = att
            h = layer.finish(h, sparse_attention(q, cache.k[:, :, : c + n], cache.v[:, :, : c + n], cache.valid[:, :c],
                                                 causal))
            caches.append(cache)
        logits = model.lm_head(model.model.norm(h[:, -1])).float()
        split.mark()
        out = decode_tokens(model, [c.k for c in caches], [c.v for c in caches], [c.valid for c in caches],
                            [c.prompt_start + n for c in caches], logits, pos[:, -1], limits=limits,
                            stop_ids=sorted(stops), stop_text=stop_text, tokenizer=tok, temperature=temperature,
                            top_p=top_p, generator=gen, choose=_choose, keep_logits=keep_logits, mode=decode,
                            on_tokens=on_tokens)
        first = logits.cpu()  # after decode (see generate)
    split.done(timings)
    return Generated(
        tokens=out.tokens,
        finish_reasons=["stop" if d else "length" for d in out.stopped],
        routed=[[] for _ in rows],
        first_logits=first,
        step_logits=torch.stack([x.cpu() for x in out.step_logits]) if keep_logits else None,
    )
