"""Plain-PyTorch references for msabank's kernels: the CPU production path, the test oracle and the
benchmark baseline (STYLE.md §2, §7). Triton versions live in `kernels/triton_*.py` and must match these.

Routing (MSA_SPEC.md §4.2, DESIGN.md §6): per router layer the group-summed routing query Q̃ (T, Hkv·D)
is scored against every pooled routing key K̃ (rows, Hkv·D) by a dot product; a row's score is the max
over the T query tokens, a document's score the max over its rows, and the top-k documents are taken by
score, ties broken by the lower document index. Cosine routing is the same dot product on keys and
queries normalised per head beforehand (`normalize_heads`). `routing_query_ref` builds Q̃ from the router
projection; `doc_scores_dense_ref` is the same score for many sequences at once (training).

`routing_topk_batched_ref` scores several questions in one pass over the keys (a per-row question id on
the concatenated query rows). Not here: ANN search.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Rows scored per GEMM in the reference: bounds the temporary (T, ROW_TILE) fp32 score tile and the fp32
# copy of a key tile on CPU (16,384 rows x 1,024 dims x 4 B = 64 MiB) at any bank size.
ROW_TILE = 16_384


def normalize_heads(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """L2-normalise x (..., D) over its last dim, one head's D, in fp32; returns fp32 (cosine routing:
    routing queries and pooled routing keys, MSA_SPEC §3.2, §4.2). Differentiable (the trainer uses it)."""
    xf = x.float()
    return xf / xf.norm(dim=-1, keepdim=True).clamp_min(eps)


def normalize_per_head(x: torch.Tensor, num_heads: int, eps: float = 1e-12) -> torch.Tensor:
    """`normalize_heads` on x (..., num_heads·D) with the heads side by side; returns x's dtype."""
    shape = x.shape
    xf = normalize_heads(x.reshape(*shape[:-1], num_heads, shape[-1] // num_heads), eps)
    return xf.reshape(shape).to(x.dtype)


def routing_query_ref(qr: torch.Tensor, num_kv_heads: int, scale: float, cosine: bool) -> torch.Tensor:
    """The group-summed, scaled routing query Q̃ (MSA_SPEC §4.2, DESIGN.md §6) of every token.

    qr: (B, H, T, D) router_q_proj output. Returns (B, T, Hkv·D) fp32:
    Q̃_t = concat_g (scale/H) Σ_j Q^R[g·(H/Hkv) + j, t], each head L2-normalised first when `cosine`.
    The head mean of the official scores is linear, so summing the H/Hkv query heads of a KV group first
    turns H dot products per key head into one. fp32: routing margins are ~1e-3 (golden p64), below bf16.
    """
    q = normalize_heads(qr) if cosine else qr.float()
    b, h, t, d = q.shape
    g = q.view(b, num_kv_heads, h // num_kv_heads, t, d).sum(2) * (scale / h)  # (B, Hkv, T, D)
    return g.permute(0, 2, 1, 3).reshape(b, t, num_kv_heads * d)


def doc_scores_dense_ref(query: torch.Tensor, keys: torch.Tensor, routing: torch.Tensor, chunk_valid: torch.Tensor
                         ) -> torch.Tensor:
    """Document scores of S sequences against M documents at once (the training forward; differentiable).

    query: (S, T, Hkv·D) from `routing_query_ref`; keys: (M, C, Hkv·D) pooled routing keys; routing:
    (S, T) bool routing tokens; chunk_valid: (M, C) bool real chunks. Returns (S, M) fp32: max over routing
    tokens, then over a document's chunks, of the dot product — `routing_topk_ref`'s score, dense: one
    (S·T, Hkv·D) x (Hkv·D, M·C) GEMM instead of a tiled scan with dead rows.
    """
    s, t, dim = query.shape
    m, c, _ = keys.shape
    raw = (query.float().reshape(s * t, dim) @ keys.float().reshape(m * c, dim).T).view(s, t, m * c)
    raw = raw.masked_fill(~routing[:, :, None], float("-inf"))
    per_chunk = raw.max(dim=1).values.view(s, m, c)  # max over routing tokens
    per_chunk = per_chunk.masked_fill(~chunk_valid[None], float("-inf"))
    return per_chunk.max(dim=2).values  # max over a document's chunks


def _score_tile(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """max over T of <q_t, key_r> for one tile of keys: (rows_tile,) fp32, fp32 accumulation.

    The query is rounded to the keys' dtype first (as the tensor-core kernels must), then both sides
    are exact in fp32. On CUDA with 16-bit keys, `mm(out_dtype=float32)` keeps the operands in 16 bits
    (one read of the keys) and accumulates and writes fp32; elsewhere the tile is upcast first.
    """
    query = query.to(keys.dtype)
    if keys.is_cuda and keys.dtype in (torch.bfloat16, torch.float16):
        s = torch.mm(keys, query.t(), out_dtype=torch.float32)  # (rows_tile, T)
    else:
        s = keys.to(torch.float32) @ query.to(torch.float32).t()
    return s.amax(dim=1)


def row_scores_ref(query: torch.Tensor, keys: torch.Tensor, *, row_tile: int = ROW_TILE) -> torch.Tensor:
    """Per-row routing score: max over the T query tokens of <q_t, key_r>. Returns (rows,) fp32.

    query (T, Hkv·D), keys (rows, Hkv·D). Memory: one (T, row_tile) fp32 tile at a time.
    T = 0 gives -inf everywhere (no routing token scores anything).
    """
    rows = keys.shape[0]
    out = torch.empty(rows, dtype=torch.float32, device=keys.device)
    if query.shape[0] == 0:
        return out.fill_(float("-inf"))
    if keys.is_cuda:
        # One GEMM per 1 GiB of fp32 scores (2^28 / T rows): on a GPU the per-call overhead of small
        # tiles would dominate; this is the "plain PyTorch per-layer GEMM" of the benchmarks.
        row_tile = max(row_tile, (1 << 28) // query.shape[0])
    for r0 in range(0, rows, row_tile):
        out[r0 : r0 + row_tile] = _score_tile(query, keys[r0 : r0 + row_tile])
    return out


def doc_scores_ref(row_score: torch.Tensor, row_doc: torch.Tensor, num_docs: int) -> torch.Tensor:
    """Per-document max of row scores: (num_docs,) fp32, -inf for documents without live rows.

    Rows with row_doc < 0 are dead (deleted or superseded) and ignored.
    """
    out = torch.full((num_docs,), float("-inf"), dtype=torch.float32, device=row_score.device)
    live = row_doc >= 0
    if not bool(live.all()):
        row_score, row_doc = row_score[live], row_doc[live]
    return out.scatter_reduce_(0, row_doc.long(), row_score, reduce="amax", include_self=True)


def topk_ordered(scores: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best (score, index) pairs: score descending, ties by lower index. Drops -inf entries.

    `index` need not be sorted or unique per score. Two stable sorts over the candidates (index
    ascending, then score descending) give the total order; candidates are few (k per block or shard).
    """
    order = torch.argsort(index, stable=True)
    scores, index = scores[order], index[order]
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    scores, index = scores[order], index[order]
    keep = scores > float("-inf")
    return scores[keep], index[keep]


def topk_ordered_padded(scores: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk_ordered` as exactly k entries, (-inf, -1) for missing ones; no host sync (no masking)."""
    order = torch.argsort(index, stable=True)
    scores, index = scores[order], index[order]
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    scores, index = scores[order], index[order]
    index = torch.where(scores > float("-inf"), index, torch.full_like(index, -1))
    return pad_topk(scores, index, k)


def pad_topk(scores: torch.Tensor, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a (k',) result to exactly k entries with (-inf, -1): a fixed size for collectives."""
    n = scores.shape[0]
    if n >= k:
        return scores[:k], index[:k]
    s = torch.full((k,), float("-inf"), dtype=scores.dtype, device=scores.device)
    i = torch.full((k,), -1, dtype=torch.int64, device=index.device)
    s[:n], i[:n] = scores, index
    return s, i


def routing_topk_ref(
    query: torch.Tensor,
    keys: torch.Tensor,
    row_doc: torch.Tensor,
    num_docs: int,
    k: int,
    *,
    pad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k documents for one router layer (MSA_SPEC.md §4.2, plain PyTorch).

    query: (T, Hkv·D) group-summed, scaled routing query (any float dtype).
    keys: (rows, Hkv·D) pooled routing keys, one row per chunk.
    row_doc: (rows,) int document index in 0..num_docs-1 of each row; < 0 marks a dead row.
    Returns scores (k',) fp32 descending and doc_index (k',) int64, ties by lower index, where
    k' = min(k, documents with at least one live row). With pad=True, exactly k entries, padded with
    (-inf, -1) (no host-side size decision; what collectives and the benchmark need).

    Cost: 2·T·Hkv·D·rows FLOPs; reads the keys once (rows·Hkv·D·itemsize bytes).
    """
    if keys.shape[0] != row_doc.shape[0]:
        raise ValueError(f"keys has {keys.shape[0]} rows but row_doc has {row_doc.shape[0]}")
    if query.shape[-1] != keys.shape[-1]:
        raise ValueError(f"query dim {query.shape[-1]} != key dim {keys.shape[-1]}")
    device = keys.device
    if k <= 0 or num_docs == 0 or keys.shape[0] == 0 or query.shape[0] == 0:
        s = torch.empty(0, dtype=torch.float32, device=device)
        i = torch.empty(0, dtype=torch.int64, device=device)
    else:
        doc = doc_scores_ref(row_scores_ref(query.to(device), keys), row_doc, num_docs)
        kk = min(k, num_docs)
        # topk's order among equal values is unspecified: take every document tied with the k-th
        # value, then order them exactly.
        kth = torch.topk(doc, kk).values[-1]
        cand = torch.nonzero(doc >= kth).squeeze(1)
        s, i = topk_ordered(doc[cand], cand, k)
    return pad_topk(s, i, k) if pad else (s, i)


def routing_topk_batched_ref(
    query: torch.Tensor,
    query_seq: torch.Tensor,
    num_seqs: int,
    keys: torch.Tensor,
    row_doc: torch.Tensor,
    num_docs: int,
    k: int,
    *,
    row_tile: int = ROW_TILE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k documents of one router layer for `num_seqs` questions in one pass over the keys.

    query: (T_all, Hkv·D), the routing-query rows of every question concatenated; query_seq: (T_all,) int
    question id of each row in 0..num_seqs-1 (a question without rows routes to nothing). keys, row_doc,
    num_docs, k: as `routing_topk_ref`. A question's score is the max over its own rows, then over a
    document's chunks. Returns scores (S, k) fp32 and doc_index (S, k) int64, each question's row exactly
    `routing_topk_ref(its rows, ...)` padded with (-inf, -1).

    Every key tile is read (and on CPU upcast) once for all questions; each question's GEMM on it is the
    same call `routing_topk_ref` makes on the same tile, so the scores are bit-identical to it (a single
    (tile, T_all) GEMM could reorder the fp32 sums and flip near-ties). Cost: one read of the keys
    (rows·Hkv·D·itemsize) instead of S; 2·T_all·Hkv·D·rows FLOPs, as S separate calls.
    """
    if keys.shape[0] != row_doc.shape[0]:
        raise ValueError(f"keys has {keys.shape[0]} rows but row_doc has {row_doc.shape[0]}")
    if query.shape[-1] != keys.shape[-1]:
        raise ValueError(f"query dim {query.shape[-1]} != key dim {keys.shape[-1]}")
    if query_seq.shape != query.shape[:1]:
        raise ValueError(f"query_seq of shape {tuple(query_seq.shape)} for {query.shape[0]} query rows")
    device = keys.device
    out_s = torch.full((num_seqs, max(k, 0)), float("-inf"), dtype=torch.float32, device=device)
    out_i = torch.full((num_seqs, max(k, 0)), -1, dtype=torch.int64, device=device)
    rows = keys.shape[0]
    if k <= 0 or num_docs == 0 or rows == 0 or num_seqs == 0:
        return out_s, out_i
    seq = query_seq.to(device)
    query = query.to(device)
    qs = {s: query[seq == s] for s in range(num_seqs)}
    qs = {s: q for s, q in qs.items() if q.shape[0]}
    row_score = {s: torch.empty(rows, dtype=torch.float32, device=device) for s in qs}
    if keys.is_cuda and qs:  # the tile row_scores_ref takes for the longest question (its GPU sizing)
        row_tile = max(row_tile, (1 << 28) // max(q.shape[0] for q in qs.values()))
    for r0 in range(0, rows, row_tile):
        tile = keys[r0 : r0 + row_tile]
        if not (tile.is_cuda and tile.dtype in (torch.bfloat16, torch.float16)):
            tile = tile.to(torch.float32)  # once for every question: the one read of this tile
        for s, q in qs.items():
            row_score[s][r0 : r0 + row_tile] = _score_tile(q.to(keys.dtype), tile)
    for s, rs in row_score.items():
        doc = doc_scores_ref(rs, row_doc, num_docs)
        kth = torch.topk(doc, min(k, num_docs)).values[-1]  # ties at the k-th value: ordered exactly below
        cand = torch.nonzero(doc >= kth).squeeze(1)
        sc, ix = topk_ordered(doc[cand], cand, k)
        out_s[s, : sc.shape[0]], out_i[s, : ix.shape[0]] = sc, ix
    return out_s, out_i


def span_index(starts: torch.Tensor, counts: torch.Tensor, seq: torch.Tensor, num_seqs: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row index of a batched gather: sample s's spans laid side by side, padded to the longest sample.

    starts, counts, seq: (P,) int64 on the host, span p = source rows starts[p]..starts[p]+counts[p]-1 of
    sample seq[p]; spans are grouped by sample, in the order they should appear. Returns index (S, C_max)
    int64 (-1 past a sample's length) and lengths (S,) int64. Vectorised: no loop over samples or spans.
    Host bookkeeping in numpy: torch CPU ops on tensors this small pay per-op dispatch and the intra-op
    thread pool (issue 12: ~3 ms per call under load on the GPU host); 16 spans, 2-core box: 480 µs as
    torch ops, 49 µs in numpy (measured)."""
    st = starts.numpy().astype(np.int64, copy=False)
    ct = counts.numpy().astype(np.int64, copy=False)
    sq = seq.numpy().astype(np.int64, copy=False)
    lengths = np.zeros(num_seqs, dtype=np.int64)
    np.add.at(lengths, sq, ct)
    c_max = int(lengths.max()) if num_seqs else 0
    index = np.full((num_seqs, c_max), -1, dtype=np.int64)
    total = int(ct.sum())
    if total:
        span_begin = np.cumsum(ct) - ct
        sample_start = np.cumsum(lengths) - lengths  # rows of earlier samples, in span order
        row_span = np.repeat(np.arange(ct.shape[0]), ct)  # (total,) span of each row
        within = np.arange(total) - span_begin[row_span]  # row's offset inside its span
        col = (span_begin - sample_start[sq])[row_span] + within
        index[sq[row_span], col] = st[row_span] + within
    return torch.from_numpy(index), torch.from_numpy(lengths)


def selected_rows(numbers: torch.Tensor, doc_start: torch.Tensor, doc_count: torch.Tensor, columns: int | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Content rows of each sample's selected documents, laid side by side: the device-side span table.

    numbers: (S, K) int64 document numbers per sample in any order, -1 = none (top-k padding); a number
    may repeat (counted once). doc_start, doc_count: (N,) int64, document number -> first content row and
    chunk count (count 0: no content). Returns rows (S, columns) int64, sample s's documents in ascending
    number order (the official context order), each document's rows start..start+count-1, then -1 past
    lengths[s]; and lengths (S,) int64. A sample whose chunks exceed `columns` is cut at `columns` (the
    caller's bound must cover the largest selection). With a given `columns` only torch ops with shapes
    known on the host (sort, gather, cumsum, searchsorted): no host sync, the same ops on CPU and CUDA.
    columns=None: the longest sample's length (a host read of it: free on CPU, a sync on CUDA).
    """
    s, k = numbers.shape
    dev = numbers.device
    if k == 0 or doc_count.shape[0] == 0:
        return (torch.full((s, columns or 0), -1, dtype=torch.int64, device=dev),
                torch.zeros(s, dtype=torch.int64, device=dev))
    big = torch.iinfo(torch.int64).max
    n = torch.where(numbers >= 0, numbers, big).sort(dim=1).values  # ascending, padding last
    live = n != big
    live[:, 1:] &= n[:, 1:] != n[:, :-1]  # a repeated number counts once
    safe = torch.where(live, n, 0).clamp_max(doc_count.shape[0] - 1)
    count = torch.where(live & (n < doc_count.shape[0]), doc_count[safe], 0)  # (S, K)
    end = count.cumsum(1)
    begin = end - count
    lengths = end[:, -1]
    if columns is None:
        columns = int(lengths.max()) if s else 0
    col = torch.arange(columns, device=dev).expand(s, columns).contiguous()
    j = torch.searchsorted(end, col, right=True).clamp_max(k - 1)  # the document holding each column
    rows = doc_start[safe].gather(1, j) + col - begin.gather(1, j)
    return torch.where(col < lengths[:, None], rows, -1), lengths


def gather_rows_ref(src: torch.Tensor, layer: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Content K and V of one router layer at `rows` in the layout attention reads (the CPU path and the
    oracle of `triton_gather.gather_rows_triton`).

    src: the content arena (arena_rows, R, 2, Hkv, D); rows: (S, C) int64, -1 = padding (zeros). Returns
    k, v (S, Hkv, C, D) in src's dtype on rows' device (src must be there too): one index_select of the
    layer's (2, Hkv, D) slices.
    """
    s, c = rows.shape
    _, _, _, hkv, d = src.shape
    if src.shape[0] == 0 or rows.numel() == 0:
        e = torch.zeros(s, hkv, c, d, dtype=src.dtype, device=rows.device)
        return e, e.clone()
    flat = rows.reshape(-1)
    kv = src[:, layer].index_select(0, flat.clamp_min(0)).masked_fill_((flat < 0).view(-1, 1, 1, 1), 0)
    kv = kv.view(s, c, 2, hkv, d)
    return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """GQA attention with softmax scale D**-0.5.

    q: (B, H, T, D); k, v: (B, Hkv, S, D); mask: bool (B, 1, T, S), True = may attend (None = all).
    Query head h reads kv head h // (H / Hkv) (HF repeat_kv). Every row must see at least one key.
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def sparse_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, memory_valid: torch.Tensor,
                         causal: torch.Tensor) -> torch.Tensor:
    """MSA's sparse attention (MSA_SPEC §5): each query token attends over [memory ; the sequence itself].

    The memory is the template prefix and the pooled K/V of the chunks this sample's router layer selected
    (lower layers: the template alone); the sequence part is causal. Used by prefill, decode (T = 1) and
    the training forward.
    q: (B, H, T, D); k, v: (B, Hkv, M + T, D), the M memory columns first; memory_valid: (B, M) bool, False
    on padding (a sample that selected fewer chunks); causal: (B, T, T) bool over the sequence columns.
    Returns (B, H, T, D). Memory traffic: reads K/V once per query head group, (M + T)·Hkv·D·2 values.
    """
    b, t, m = q.shape[0], q.shape[2], memory_valid.shape[1]
    mask = torch.cat([memory_valid[:, None, :].expand(b, t, m), causal], dim=2)[:, None]  # (B, 1, T, M + T)
    return attention_ref(q, k, v, mask)


def chunk_pool_ref(x: torch.Tensor, valid: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk means over real tokens (MSA_SPEC §3.2): the K̄, V̄, K̄ᴿ of stage 1, for a batch of documents.

    x: (B, Hkv, T, D); valid: (B, T) bool, True on real tokens (a prefix of each row). Returns pooled
    (B, Hkv, C, D) in x's dtype (summed in fp32) and chunk_valid (B, C), C = ceil(T / chunk_size); a
    document's last chunk is averaged over its real tokens only, chunks past its end are zero and invalid.
    """
    b, hkv, t, d = x.shape
    c = -(-t // chunk_size)
    pad = c * chunk_size - t
    xf = x.float()
    if pad:
        xf = F.pad(xf, (0, 0, 0, pad))
        valid = F.pad(valid, (0, pad))
    w = valid.to(torch.float32).view(b, 1, c, chunk_size, 1)
    s = (xf.view(b, hkv, c, chunk_size, d) * w).sum(3)
    n = w.sum(3)
    return (s / n.clamp(min=1)).to(x.dtype), n.view(b, c) > 0
