"""`msabank eval`: answer exact match, per-layer routing recall@k and needle retrieval, with and without
memory interleave, versus bank size, on synthetic worlds whose seeds were never used in training.

The bank here is an in-process stage-1 encoding of the whole world (msabank.train.core.encode_memory), and
questions run the official interleave protocol (MSA_SPEC §6) with greedy decoding:
round r routes once at prefill (question + the documents injected in round r-1), the model names `[n]`
ids and ends the round with `<|object_ref_end|>`, the documents are appended, and on `<End-of-Retrieve>`
the hand-off `<|im_start|>The user's question is: {q}\\n<|object_ref_end|>` is fed and the answer decoded.
"Without interleave" stops after one retrieval round: the hand-off is forced after the first documents.
Training worlds use seeds below 10**8 (msabank.train.data); evaluation uses EVAL_SEED_BASE and above.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from msabank import prompt as P
from msabank.model import MSAModel
from msabank.synth import Question, World
from msabank.train.core import Batch, Memory, encode_memory, forward

log = logging.getLogger(__name__)

EVAL_SEED_BASE = 900_000_000
_ID = re.compile(r"\[(\d+)\]")


@torch.no_grad()
def build_bank(model: MSAModel, world: World, *, batch_tokens: int = 65_536, max_doc_tokens: int = 256
               ) -> tuple[Memory, int]:
    """Stage 1 over every document of `world` (number = index). Returns the memory and its token count."""
    tok = model.tokenizer
    assert tok is not None
    dev = model.device
    p = model.config.chunk_size
    c_max = -(-max_doc_tokens // p)
    docs = [P.document_ids(tok, n, world.document(n).text)[:max_doc_tokens] for n in range(world.num_docs)]
    total = sum(len(d) for d in docs)
    template = torch.tensor(P.template_parts(tok).head, device=dev)
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]))
    pooled: dict[int, list[list[torch.Tensor]]] = {}
    template_kv = None
    i = 0
    while i < len(order):
        ld = -(-len(docs[order[min(len(order) - 1, i)]]) // p) * p
        n = max(1, batch_tokens // max(ld, 1))
        idx = order[i : i + n]
        ld = -(-max(len(docs[j]) for j in idx) // p) * p
        ids = torch.zeros(len(idx), ld, dtype=torch.long)
        for r, j in enumerate(idx):
            ids[r, : len(docs[j])] = torch.tensor(docs[j])
        mem = encode_memory(model, ids.to(dev), torch.tensor([len(docs[j]) for j in idx], device=dev), template)
        template_kv = mem.template_kv
        for layer, tensors in mem.pooled.items():
            slot = pooled.setdefault(layer, [[], [], [], [], []])
            for s, x in enumerate(tensors):
                pad = c_max - x.shape[2 if x.dim() == 4 else 1]
                x = torch.nn.functional.pad(x, (0, 0, 0, pad) if x.dim() == 4 else (0, pad))
                slot[s].append(x)
            slot[4].append(torch.tensor(idx, device=dev))
        i += len(idx)
    out: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for layer, (pk, pv, prk, cv, num) in pooled.items():
        inv = torch.empty(len(docs), dtype=torch.long, device=dev)
        inv[torch.cat(num)] = torch.arange(len(docs), device=dev)
        out[layer] = tuple(torch.cat(x)[inv] for x in (pk, pv, prk, cv))  # type: ignore[assignment]
    assert template_kv is not None
    return Memory(pooled=out, template_kv=template_kv), total


@dataclass
class _Run:
    q: Question
    ids: list[int]
    routing: list[bool]
    named: list[list[int]] = field(default_factory=list)
    selected_r1: list[list[int]] = field(default_factory=list)
    answer: str | None = None
    rounds: int = 0
    done: bool = False
    question_mask: list[bool] = field(default_factory=list)
    latest: tuple[int, int] | None = None


@torch.no_grad()
def _decode(model: MSAModel, memory: Memory, prompts: Sequence[tuple[list[int], list[bool]]], *, max_new: int,
            stop: set[int], score_block: int, selection: list[torch.Tensor] | None = None,
            end_seq: Sequence[int] = ()) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy continuation of a batch of prompts; routing once at prefill, then re-used (spec §5)."""
    dev = model.device
    seqs = [list(p[0]) for p in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    live = [True] * len(prompts)
    for _ in range(max_new):
        t = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), t, dtype=torch.long)
        routing = torch.zeros(len(seqs), t, dtype=torch.bool)
        for i, (s, p) in enumerate(zip(seqs, prompts)):
            ids[i, : len(s)] = torch.tensor(s)
            routing[i, : len(p[1])] = torch.tensor(p[1])
        lens = torch.tensor([len(s) for s in seqs])
        batch = Batch(mem_ids=None, mem_len=None, seq_ids=ids.to(dev), seq_len=lens.to(dev),  # type: ignore[arg-type]
                      routing=routing.to(dev), labels=None, positive=None, template=None)  # type: ignore[arg-type]
        out = forward(model, batch, force_positive=False, memory=memory, selection=selection,
                      score_block=score_block, want_last_logits=True)
        if selection is None:
            selection = out.selected
        nxt = out.logits.argmax(-1).tolist()  # type: ignore[union-attr]
        for i in range(len(seqs)):
            if not live[i]:
                continue
            seqs[i].append(nxt[i])
            outs[i].append(nxt[i])
            if nxt[i] in stop or (end_seq and outs[i][-len(end_seq):] == list(end_seq)):
                live[i] = False
        if not any(live):
            break
    return outs, selection


def run_protocol(model: MSAModel, memory: Memory, world: World, questions: Sequence[Question], *,
                 interleave: bool = True, max_rounds: int = 4, batch: int = 32, score_block: int = 4096,
                 max_new: int = 40) -> list[_Run]:
    """The interleave loop of msabank.engine.Engine.ask, batched: same prompts, stops, budgets and answer
    extraction (tests/test_train.py checks they agree token for token)."""
    tok = model.tokenizer
    assert tok is not None
    ore, im_end = tok.object_ref_end_id, tok.im_end_id
    end_seq = tok.encode(P.END_OF_RETRIEVE)
    stop = {ore, im_end, tok.endoftext_id}
    runs: list[_Run] = []
    for b0 in range(0, len(questions), batch):
        group = []
        for q in questions[b0 : b0 + batch]:
            pr = P.question_prompt(tok, q.question)
            group.append(_Run(q, list(pr.ids), list(pr.routing_mask), question_mask=list(pr.routing_mask)))
        for rnd in range(max_rounds + 1):
            active = [r for r in group if not r.done]
            if not active:
                break
            force_handoff = not interleave and rnd >= 1
            if force_handoff:
                prompts = [(r.ids + end_seq, r.routing) for r in active]
                gen = [list(end_seq) for _ in active]
                _, sel_list = _decode(model, memory, prompts, max_new=1, stop=stop, score_block=score_block)
            else:
                gen, sel_list = _decode(model, memory, [(r.ids, r.routing) for r in active], max_new=max_new,
                                        stop=stop, score_block=score_block, end_seq=end_seq)
            handoff: list[tuple[_Run, list[int], int]] = []
            for j, (r, g) in enumerate(zip(active, gen)):
                if rnd == 0:
                    r.selected_r1 = [s[j].tolist() for s in sel_list]
                r.rounds = rnd + 1
                text = tok.decode(g)
                if P.END_OF_RETRIEVE in text or force_handoff or rnd == max_rounds:
                    r.ids = r.ids + g + P.restatement_ids(tok, r.q.question)
                    handoff.append((r, [], j))
                    continue
                if not g or g[-1] != ore:  # EOS or length without the protocol: what it said is the answer
                    r.done = True
                    r.answer = _extract(tok.decode([x for x in g if x not in stop]))
                    continue
                nums = sorted({int(x) for x in _ID.findall(text)})
                r.named.append(nums)
                r.ids = r.ids + g
                found = [n for n in nums if n < world.num_docs]
                if found:  # nothing found: no injection, route again on the same text (as the engine does)
                    start = len(r.ids)
                    r.ids = r.ids + P.injection_ids(tok, [(n, world.document(n).text) for n in found])
                    r.latest = (start, len(r.ids) - 1)
                mask = r.question_mask + [False] * (len(r.ids) - len(r.question_mask))
                if r.latest is not None:
                    mask[r.latest[0] : r.latest[1]] = [True] * (r.latest[1] - r.latest[0])
                r.routing = mask
            if handoff:
                sel = [torch.stack([s[j] for (_, _, j) in handoff]) for s in sel_list]
                outs, _ = _decode(model, memory, [(r.ids, r.routing) for (r, _, _) in handoff], max_new=max_new,
                                  stop=stop, score_block=score_block, selection=sel)
                for (r, _, _), g in zip(handoff, outs):
                    r.answer = _extract(tok.decode([x for x in g if x not in stop]))
                    r.done = True
        runs += group
    return runs


def _extract(text: str) -> str:
    """The text after the last `The answer to the question is:` (else all of it), stripped."""
    return text.rsplit(P.ANSWER_PREFIX, 1)[-1].strip() if P.ANSWER_PREFIX in text else text.strip()


def score(runs: Sequence[_Run], k: int) -> dict[str, Any]:
    """Exact match per question type, first-round routing recall@k per layer, document-number accuracy."""
    out: dict[str, Any] = {}
    by: dict[str, list[_Run]] = {}
    for r in runs:
        by.setdefault(r.q.type.split(":")[0], []).append(r)
    for kind, rs in sorted(by.items()):
        out[f"{kind}_em"] = sum((r.answer or "").strip() == r.q.answer for r in rs) / len(rs)
        out[f"{kind}_n"] = len(rs)
        out[f"{kind}_first_id"] = sum(bool(r.named) and r.q.gold[0] in r.named[0] for r in rs) / len(rs)
        if kind == "twohop":
            out[f"{kind}_second_id"] = sum(len(r.named) > 1 and r.q.gold[1] in r.named[1] for r in rs) / len(rs)
    layers = len(runs[0].selected_r1) if runs else 0
    out["recall_at_k_per_layer"] = [
        round(sum(r.q.gold[0] in r.selected_r1[layer][:k] for r in runs) / len(runs), 4) for layer in range(layers)]
    out["em_all"] = sum((r.answer or "").strip() == r.q.answer for r in runs) / max(1, len(runs))
    return out


def evaluate(model: MSAModel, *, tokens: int, seed: int = EVAL_SEED_BASE, questions: int = 300,
             interleave: Sequence[bool] = (True, False), batch: int = 32, score_block: int = 1024,
             mean_doc_tokens: float = 85.0) -> dict[str, Any]:
    """Build a bank of about `tokens` tokens from world `seed` and run the protocol on `questions`."""
    world = World(seed=seed, num_docs=max(16, int(tokens / mean_doc_tokens)))
    t0 = time.time()
    memory, total = build_bank(model, world)
    t_bank = time.time() - t0
    qs = world.questions(questions)
    res: dict[str, Any] = {"seed": seed, "documents": world.num_docs, "tokens": total, "encode_s": round(t_bank, 2),
                           "top_k": model.config.top_k}
    for inter in interleave:
        t0 = time.time()
        runs = run_protocol(model, memory, world, qs, interleave=inter, batch=batch, score_block=score_block)
        sc = score(runs, model.config.top_k)
        sc["time_s"] = round(time.time() - t0, 1)
        res["interleave" if inter else "no_interleave"] = sc
        log.info("eval tokens=%d interleave=%s %s", total, inter, sc)
    return res
