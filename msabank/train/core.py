"""The MSA training forward: a shared memory of documents, questions routed over it, InfoNCE + LM loss.

One step sees M memory documents (each encoded alone, causally, positions restarting at 0: stage 1) and
S prompt sequences (questions, or interleave transcripts). In every router layer each sequence scores
every document (cosine of L2-normalised router_q_proj(x) and chunk-mean router_k_proj(x), mean over heads,
max over routing tokens, max over chunks: the official training path), the top-k documents are selected
(the positive forced in during training, TRAINING_NOTES), and the sequence attends to
[template head ; pooled K/V of the selected documents' chunks ; itself, causally]. Lower layers see only
[template head ; itself]. The forward equals the official training-mode forward (golden cases/train_p4).

Shapes: M memory documents, Ld their padded length, C chunks per document (padded), S sequences,
T their padded length, Hkv, H, D as usual, R router layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from msabank.kernels.reference import doc_scores_dense_ref, normalize_heads, routing_query_ref
from msabank.kernels import sparse_attention
from msabank.model import MSAModel, rope_cos_sin
from msabank.stages import pool_router_layers, stage1_forward

TEMPLATE_LEN = 3


@dataclass
class Batch:
    """A training (or evaluation) step; tensors on one device. Padding: ids 0, lengths say what is real."""

    mem_ids: torch.Tensor
    """(M, Ld) int64 composed documents `<|im_start|>[n]. text[n]<|im_end|>`."""
    mem_len: torch.Tensor
    """(M,) int64 real lengths."""
    seq_ids: torch.Tensor
    """(S, T) int64 prompt sequences (question or transcript, plus targets)."""
    seq_len: torch.Tensor
    """(S,) int64."""
    routing: torch.Tensor
    """(S, T) bool: routing tokens (doc_ids == 0 in the spec)."""
    labels: torch.Tensor
    """(S, T) int64 next-token targets aligned to positions (label[t] is predicted at t); -100 = none."""
    positive: torch.Tensor
    """(S,) int64 index into the memory of the document this sequence must route to; -1 = none."""
    template: torch.Tensor
    """(3,) int64 template head `<|im_start|>user\\n`."""
    stage: torch.Tensor | None = None
    """(S,) int64: 0 round 1, 1 a later hop, 2 the final (answer) round. The aux loss skips stage 2: there the
    routing text contains the positive document itself, which teaches nothing about finding it."""
    kind: torch.Tensor | None = None
    """(S,) int64 index into msabank.train.data.KINDS of each sequence's question type (-1 unknown); metrics only."""
    answer: torch.Tensor | None = None
    """(S, T) bool: the label at this position is a token of the answer itself (not the fixed
    "The answer to the question is:" before it, nor `<|im_end|>`); `forward(answer_weight=...)`."""

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{k: (v.to(device, non_blocking=True) if v is not None else None) for k, v in self.__dict__.items()})


@dataclass
class Output:
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    scores: list[torch.Tensor] = field(default_factory=list)
    """Per router layer (S, M) document scores (float32)."""
    selected: list[torch.Tensor] = field(default_factory=list)
    """Per router layer (S, k) selected memory indices."""
    logits: torch.Tensor | None = None
    """(S, T, V) when requested."""
    seq_hidden: list[torch.Tensor] = field(default_factory=list)
    mem_hidden: list[torch.Tensor] = field(default_factory=list)
    correct: torch.Tensor | None = None
    """(n,) bool: teacher-forced argmax == label at each labelled position."""
    correct_row: torch.Tensor | None = None
    """(n,) the sequence of each labelled position."""


def _route_scores(rq: torch.Tensor, rk: torch.Tensor, routing: torch.Tensor, chunk_valid: torch.Tensor,
                  token_tau: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Document scores (S, M), float32, by the kernels' routing reference: cosine, scale 1 (the official
    training path scores cosine whatever the rule at inference). Returns (scores, loss_scores).

    rq: (S, H, T, D) router queries; rk: (M, Hkv, C, D) pooled router keys, normalised per head here.
    `scores` is the protocol's max over routing tokens and chunks (what selects documents, here and at
    inference). `loss_scores`, the InfoNCE input, is the same unless `token_tau` > 0: then the max over
    routing tokens becomes a smooth max, token_tau·logsumexp(s_t / token_tau) (the max over chunks stays).
    Why: under the hard max only the winning token gets gradient. Tokens every candidate shares (the
    needle phrase "special magic number for", the template) win it for all candidates alike, so the
    discriminating tokens (the name) never learn: sweeps c4/c5 plateau at chance among needles
    (docs/eval.md). The smooth max gives every routing token a share of the gradient; as token_tau → 0
    it is the max.
    """
    m, hkv, c, d = rk.shape
    query = routing_query_ref(rq, hkv, 1.0, True)  # (S, T, Hkv·D)
    keys = normalize_heads(rk).permute(0, 2, 1, 3).reshape(m, c, hkv * d)  # (M, C, Hkv·D)
    hard = doc_scores_dense_ref(query, keys, routing, chunk_valid)
    if token_tau <= 0:
        return hard, hard
    return hard, smooth_doc_scores(query, keys, routing, chunk_valid, token_tau)


def smooth_doc_scores(query: torch.Tensor, keys: torch.Tensor, routing: torch.Tensor, chunk_valid: torch.Tensor,
                      tau: float) -> torch.Tensor:
    """`doc_scores_dense_ref` with the max over routing tokens replaced by tau·logsumexp(s/tau) − tau·log(n),
    n the sequence's routing tokens (so equal token scores give exactly that score, and the result lies in
    [max − tau·log n, max]). Same shapes; differentiable; a sequence without routing tokens scores -inf."""
    s, t, dim = query.shape
    m, c, _ = keys.shape
    raw = (query.float().reshape(s * t, dim) @ keys.float().reshape(m * c, dim).T).view(s, t, m * c)
    raw = raw.masked_fill(~routing[:, :, None], float("-inf"))
    n = routing.sum(1).clamp(min=1).float()  # (S,)
    per_chunk = tau * torch.logsumexp(raw / tau, dim=1) - (tau * n.log())[:, None]  # (S, M·C)
    per_chunk = per_chunk.view(s, m, c).masked_fill(~chunk_valid[None], float("-inf"))
    return per_chunk.max(dim=2).values


def _select(scores: torch.Tensor, k: int, positive: torch.Tensor | None) -> torch.Tensor:
    """Top-k memory indices (S, k), best first; the positive replaces the k-th when it is missing."""
    k = min(k, scores.shape[1])
    top = scores.detach().topk(k, dim=1).indices
    if positive is None:
        return top
    has = positive >= 0
    missing = has & ~(top == positive[:, None]).any(1)
    top[:, -1] = torch.where(missing, positive, top[:, -1])
    return top


@dataclass
class Memory:
    """Stage-1 output of M documents for every router layer (padded to C chunks), plus the template K/V."""

    pooled: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    """layer -> (K̄ (M, Hkv, C, D), V̄ (M, Hkv, C, D), K̄ᴿ (M, Hkv, C, D), chunk_valid (M, C))."""
    template_kv: list[tuple[torch.Tensor, torch.Tensor]]
    """Per layer (k, v), each (1, Hkv, 3, D)."""
    hidden: list[torch.Tensor] = field(default_factory=list)

    @property
    def size(self) -> int:
        return next(iter(self.pooled.values()))[0].shape[0]


def encode_template(model: MSAModel, template: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Template head `<|im_start|>user\n` alone at positions 0..2: its K/V in every layer (stage 1's forward)."""
    kv = stage1_forward(model, template.view(1, -1), torch.tensor([TEMPLATE_LEN], device=template.device))
    return [(kv[i][0], kv[i][1]) for i in range(model.config.num_layers)]


def encode_memory(model: MSAModel, mem_ids: torch.Tensor, mem_len: torch.Tensor, template: torch.Tensor,
                  *, want_hidden: bool = False) -> Memory:
    """Stage 1 (`msabank.stages.stage1_forward`, the engine's): each document alone, causally, positions
    from 0; chunk means at router layers (`stages.pool_router_layers`). Ld is padded to a multiple of P."""
    p = model.config.chunk_size
    ld = mem_ids.shape[1]
    mem_ids = F.pad(mem_ids, (0, -(-ld // p) * p - ld))
    mem = Memory(pooled={}, template_kv=encode_template(model, template))
    kv = stage1_forward(model, mem_ids, mem_len, through_layer=max(model.config.router_layers),
                        hidden=mem.hidden if want_hidden else None)
    mem.pooled = pool_router_layers(model.config, kv, mem_len)
    return mem


def forward(model: MSAModel, batch: Batch, *, top_k: int | None = None, force_positive: bool = True,
            tau: float = 0.1, want_logits: bool = False, want_hidden: bool = False,
            memory: Memory | None = None, selection: list[torch.Tensor] | None = None,
            lm_only_routed: bool = False,
            aux_layer_weights: Sequence[float] | None = None, token_tau: float = 0.0,
            final_weight: float = 1.0, answer_weight: float = 1.0) -> Output:
    """The MSA training forward (and, with force_positive=False, its exact inference counterpart).

    Returns losses when labels exist: lm_loss (mean CE over labelled positions) and aux_loss (InfoNCE over
    the whole memory, temperature `tau`, summed over router layers, mean over sequences with a positive).
    `memory`: a precomputed stage 1 (else encoded from batch.mem_ids); `selection`: per router layer (S, k)
    memory indices to use instead of routing (decoding re-uses the prefill's choice; spec §5).
    `lm_only_routed`: the LM loss skips the targets of sequences with stage < 2 (their target is the positive's
    `[n]`) whose positive no router layer selected: the number is then nowhere in the model's input, and the
    loss could only teach it to guess a frequent number instead of copying one (out.correct still covers all
    targets, so teacher-forced accuracy stays comparable).
    `aux_layer_weights`: one weight per router layer on its InfoNCE term (default 1 each). Up-weighting the
    first router layer trains the only layer whose routing query never sees a forced document's K/V.
    `token_tau` > 0: the InfoNCE scores reduce the routing tokens by a smooth max (`_route_scores`); the
    selection and `out.scores` keep the protocol's max.
    `final_weight`: the LM loss weighs the targets of final-round sequences (stage 2: `<End-of-Retrieve>` and
    the answer read from the appended documents) by this much against the `[n]` targets (a weighted mean).
    Why: teacher-forced, the shipped model names the right document 94% of the time but reads a single-hop
    answer exactly only 28% (docs/eval.md, sweep c9), and an answer is a few tokens of a step's hundreds.
    `answer_weight`: the same for the answer's own tokens (`batch.answer`), on top of `final_weight`. Why:
    `final_weight` also weighs the fixed, already-learned tokens around the answer and did not help (c9/r1),
    while on the CPU the shipped model learned to copy a colour word (colour questions, the answer
    sentence alone appended) within 100-175 steps once the loss was on the answer's first token alone,
    and much later or not at all with the loss on every final target (docs/eval.md, msabank.train.reading;
    with four answer types and whole documents, weight 20 did not move in 225 steps).
    """
    cfg = model.config
    k = top_k or cfg.top_k
    dev = batch.seq_ids.device
    layers = model.model.layers
    out = Output()
    if memory is None:
        memory = encode_memory(model, batch.mem_ids, batch.mem_len, batch.template, want_hidden=want_hidden)
    out.mem_hidden = memory.hidden
    k = min(k, memory.size)

    # --- stage 2: sequences over [template ; selected documents' chunks ; themselves] ---
    s, t = batch.seq_ids.shape
    pos0 = TEMPLATE_LEN + (top_k or cfg.top_k)
    spos = (pos0 + torch.arange(t, device=dev)).expand(s, t)
    scos, ssin = rope_cos_sin(spos, cfg.head_dim, cfg.rope_theta, model.dtype)
    seq_valid = torch.arange(t, device=dev)[None] < batch.seq_len[:, None]
    causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()[None] & seq_valid[:, None, :]
    causal = causal | torch.eye(t, dtype=torch.bool, device=dev)[None]
    routing = batch.routing & seq_valid
    positive = batch.positive if force_positive else None
    hs = model.model.embed_tokens(batch.seq_ids)
    if want_hidden:
        out.seq_hidden.append(hs)
    aux_terms: list[torch.Tensor] = []
    r = 0
    for i, layer in enumerate(layers):
        x = layer.input_layernorm(hs)
        q, kk, v = layer.self_attn.qkv(x, scos, ssin)
        tk, tv = memory.template_kv[i]
        keys = [tk.expand(s, -1, -1, -1)]
        vals = [tv.expand(s, -1, -1, -1)]
        masks = [torch.ones(s, TEMPLATE_LEN, dtype=torch.bool, device=dev)]  # memory columns: (S, M)
        if cfg.is_router_layer(i):
            pk, pv, prk, cv = memory.pooled[i]
            if selection is not None:
                sel = selection[r]
            else:
                sc, loss_sc = _route_scores(layer.self_attn.router_q(x), prk, routing, cv, token_tau)
                out.scores.append(sc)
                sel = _select(sc, k, positive)
                if batch.positive is not None:
                    has = batch.positive >= 0
                    if batch.stage is not None:
                        has = has & (batch.stage < 2)
                    if bool(has.any()):
                        w = 1.0 if aux_layer_weights is None else float(aux_layer_weights[r])
                        aux_terms.append(w * F.cross_entropy(loss_sc[has] / tau, batch.positive[has]))
            out.selected.append(sel)
            sel_sorted = sel.sort(dim=1).values  # ascending memory order (official context order)
            hkv, d = pk.shape[1], pk.shape[3]
            gk = pk[sel_sorted].permute(0, 2, 1, 3, 4).reshape(s, hkv, -1, d)  # (S, Hkv, k*C, D)
            gv = pv[sel_sorted].permute(0, 2, 1, 3, 4).reshape(s, hkv, -1, d)
            keys.append(gk)
            vals.append(gv)
            masks.append(cv[sel_sorted].reshape(s, -1))  # (S, k*C): padding chunks of short documents off
            r += 1
        keys.append(kk)
        vals.append(v)
        o = sparse_attention(q, torch.cat(keys, 2), torch.cat(vals, 2), torch.cat(masks, 1), causal)
        hs = layer.finish(hs, o)
        if want_hidden:
            out.seq_hidden.append(hs if i < len(layers) - 1 else model.model.norm(hs))
    hs = model.model.norm(hs)
    if want_logits:
        out.logits = model.lm_head(hs)
    lab = batch.labels
    if lab is not None and bool((lab >= 0).any()):
        sel_pos = lab >= 0
        logits = model.lm_head(hs[sel_pos]).float()
        out.correct = logits.argmax(-1) == lab[sel_pos]
        out.correct_row = sel_pos.nonzero()[:, 0]
        keep = None
        if lm_only_routed and batch.positive is not None and out.selected:
            routed = torch.stack([(sel == batch.positive[:, None]).any(1) for sel in out.selected]).any(0)
            unseen = (batch.positive >= 0) & ~routed
            if batch.stage is not None:
                unseen = unseen & (batch.stage < 2)
            keep = ~unseen[out.correct_row]
        weight = torch.ones(out.correct_row.shape[0], device=dev)
        if final_weight != 1.0 and batch.stage is not None:
            weight = torch.where(batch.stage[out.correct_row] == 2, final_weight, 1.0)
        if answer_weight != 1.0 and batch.answer is not None:
            weight = weight * torch.where(batch.answer[sel_pos], answer_weight, 1.0)
        if keep is not None:
            weight = weight * keep
        if bool((weight > 0).any()):
            ce = F.cross_entropy(logits, lab[sel_pos], reduction="none")
            out.lm_loss = (ce * weight).sum() / weight.sum()
        else:
            out.lm_loss = logits.sum() * 0.0
    if aux_terms:
        # summed over router layers: with a mean, the first router layer (the one that must find the document
        # from the question alone) got a quarter of the weight while later layers, which see the selected
        # document's K/V from earlier router layers, drove the loss down on their own.
        out.aux_loss = torch.stack(aux_terms).sum()
    return out
