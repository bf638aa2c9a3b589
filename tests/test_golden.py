"""Conformance: msabank's model reproduces every array of every engine case of the official-code goldens.

Cases are found at run time under $MSABANK_GOLDEN_DIR (default ../shared/golden): every `cases/*/` whose
manifest describes engine requests (key "requests"). Training-mode cases (e.g. train_p4, no "requests")
belong to the trainer's tests and never feed this parametrization. Each case loads the checkpoint its
manifest names and goes through the public API only (load_model, encode_documents, template_prefix,
InMemoryMemory, generate, prompt layout); `trace` hooks expose intermediates for the debug arrays.
Floats: float32, max abs error <= 1e-4; ids and masks exact. A golden array without a rule here fails.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Sequence

import pytest
import torch

from msabank.model import load_model
from msabank.prompt import document_ids, question_prompt, template_parts
from msabank.stages import InMemoryMemory, encode_documents, generate, template_prefix
from msabank.types import Routed

ATOL = 1e-4
GOLDEN = Path(os.environ.get("MSABANK_GOLDEN_DIR", Path(__file__).resolve().parents[2] / "shared" / "golden"))


def _case_manifests() -> dict[str, dict]:
    out = {}
    for m in sorted(GOLDEN.glob("cases/*/manifest.json")):
        out[m.parent.name] = json.loads(m.read_text())
    return out


def engine_cases() -> list[str]:
    """Case directories that describe engine requests (stage 1 + stage 2/3); training cases do not."""
    return [name for name, man in _case_manifests().items() if "requests" in man and "stage1_blocks" in man]


class RecordingMemory(InMemoryMemory):
    """InMemoryMemory that also records, per call, the query, all doc scores and the fetched content."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.routes: list[tuple[int, torch.Tensor, torch.Tensor, Routed]] = []
        self.fetches: list[tuple[int, list[int], torch.Tensor, torch.Tensor]] = []

    def route_batch(self, layer_index: int, queries: Sequence[torch.Tensor]) -> list[Routed]:
        out = super().route_batch(layer_index, queries)
        for query, routed in zip(queries, out):
            self.routes.append((layer_index, query.clone(), self.doc_scores(layer_index, query)[1], routed))
        return out

    def content_kv_batch(self, layer_index: int, numbers: Sequence[Sequence[int]]) -> tuple[torch.Tensor, ...]:
        k, v, lengths = super().content_kv_batch(layer_index, numbers)
        for b, ns in enumerate(numbers):  # per sample, as the official engine fetches: (C_b, Hkv, D)
            if ns:
                n = int(lengths[b])
                self.fetches.append((layer_index, list(ns), k[b, :, :n].transpose(0, 1), v[b, :, :n].transpose(0, 1)))
        return k, v, lengths


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x.detach().float().cpu()


@functools.lru_cache(maxsize=4)
def reproduce(case: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Our value for every golden array name, plus a row mask for arrays whose padding rows are undefined."""
    man = _case_manifests()[case]
    model = load_model(GOLDEN / man["model_dir"])
    cfg, tok = model.config, model.tokenizer
    docs = list(enumerate(json.loads((GOLDEN / "cases" / case / "memory_docs.json").read_text())))
    ours: dict[str, torch.Tensor] = {}
    rows: dict[str, torch.Tensor] = {}  # name -> bool mask over the token axis to compare (B, T)

    # Stage 1 ------------------------------------------------------------------------------------
    traces: dict[str, torch.Tensor] = {}
    tr = lambda name, x: traces.__setitem__(name, _f32(x))  # noqa: E731
    enc = encode_documents(model, docs, max_tokens_per_batch=256, trace=tr)
    tk, tv = template_prefix(model, trace=tr)
    t0 = tk.shape[2]
    for r, layer in enumerate(cfg.router_layers):
        for name, attr in (("pooled_k", "content_k"), ("pooled_v", "content_v"), ("pooled_router_k", "routing_keys")):
            ours[f"stage1/L{layer}/{name}"] = torch.cat([_f32(getattr(e, attr)[r]) for e in enc]).permute(1, 0, 2)[None]
    for layer in range(cfg.num_layers):
        ours[f"stage1/L{layer}/template_prefix_k"] = _f32(tk[layer])[None]
        ours[f"stage1/L{layer}/template_prefix_v"] = _f32(tv[layer])[None]
    chunks = torch.tensor([e.num_chunks for e in enc])
    ours["stage1/chunk_local_doc_id"] = torch.repeat_interleave(torch.arange(1, len(enc) + 1), chunks)
    ours["stage1/local_to_global_doc_id"] = torch.tensor([0] + [n for n, _ in docs])
    ours["stage1/doc_num_chunks"] = torch.cat([torch.zeros(1, dtype=torch.long), chunks])
    ours["stage1/doc_chunk_offsets"] = torch.cat([torch.zeros(2, dtype=torch.long), chunks.cumsum(0)[:-1]])
    head = template_parts(tok).head
    for b, members in enumerate(man["stage1_blocks"]):
        p = f"stage1/block{b}"
        seqs = [document_ids(tok, n, docs[n][1]) for n in members]
        ours[f"{p}/input_ids"] = torch.tensor(head + [i for s in seqs for i in s])
        ours[f"{p}/doc_ids"] = torch.tensor([-2] * t0 + [j + 1 for j, s in enumerate(seqs) for _ in s])
        ours[f"{p}/position_ids"] = torch.tensor(list(range(t0)) + [i for s in seqs for i in range(len(s))])
        ours[f"{p}/attention_mask"] = torch.ones(t0 + sum(map(len, seqs)), dtype=torch.long)
        ours[f"{p}/pooled_doc_ids"] = torch.repeat_interleave(
            torch.arange(1, len(members) + 1), torch.tensor([enc[n].num_chunks for n in members])
        )
        names = ["embed_out"] + [f"L{layer}/{w}" for layer in range(cfg.num_layers) for w in ("hidden_out", "k_post_rope", "v", "router_k")]
        for name in names:
            parts = [traces.get(f"template/{name}")] + [traces.get(f"doc{n}/{name}") for n in members]
            if all(x is not None for x in parts):
                ours[f"{p}/debug/{name}"] = torch.cat(parts, dim=0 if parts[0].dim() == 2 else 1)

    # Stage 2 + 3 ----------------------------------------------------------------------------------
    for req, spec in man["requests"].items():
        p = f"req_{req}"
        mem = RecordingMemory(dict(zip((n for n, _ in docs), enc)), cfg.top_k)
        prompts = [question_prompt(tok, q) for q in spec["prompts"]]
        traces = {}
        steps = len(spec["generated_token_ids"][0])
        out = generate(model, prompts, mem, max_new_tokens=steps, stop_ids=[], keep_logits=True, keep_cache=True, trace=tr)
        bsz = len(prompts)
        t = max(len(x.ids) for x in prompts)
        att = torch.zeros(bsz, t, dtype=torch.bool)
        route = torch.zeros(bsz, t, dtype=torch.bool)
        ids = torch.full((bsz, t), tok.pad_id)
        pos = torch.full((bsz, t), t0 + cfg.top_k)
        for b, pr in enumerate(prompts):
            n = len(pr.ids)
            att[b, t - n :], ids[b, t - n :] = True, torch.tensor(pr.ids)
            route[b, t - n :] = torch.tensor(pr.routing_mask)
            pos[b, t - n :] = torch.arange(t0 + cfg.top_k, t0 + cfg.top_k + n)
        ours[f"{p}/input/input_ids"], ours[f"{p}/input/attention_mask"] = ids, att.long()
        ours[f"{p}/input/position_ids"] = pos
        ours[f"{p}/input/doc_ids"], rows[f"{p}/input/doc_ids"] = route, att  # routes iff doc_ids == 0 (real tokens)
        for r, layer in enumerate(cfg.router_layers):
            q = f"{p}/stage2/L{layer}"
            calls = [c for c in mem.routes if c[0] == r]
            fetches = [f for f in mem.fetches if f[0] == r]
            assert len(calls) == bsz and len(fetches) == bsz
            ours[f"{q}/routing_q"], rows[f"{q}/routing_q"] = traces[f"prefill/L{layer}/routing_q"], att
            ours[f"{q}/routing_query_mask"] = route & att
            ours[f"{q}/doc_scores"] = torch.stack([torch.cat([torch.tensor([torch.finfo(torch.float32).min]), c[2]]) for c in calls])
            ours[f"{q}/topk_scores"] = torch.stack([c[3].scores for c in calls])
            ours[f"{q}/selected_global_doc_ids"] = torch.stack([c[3].numbers for c in calls])
            ours[f"{q}/topk_local_doc_ids"] = ours[f"{q}/selected_global_doc_ids"] + 1  # numbers 0..N-1 here
            ours[f"{q}/num_selected_chunks"] = torch.tensor([f[2].shape[0] for f in fetches])
            ours[f"{q}/selected_k"] = torch.cat([_f32(f[2]) for f in fetches]).permute(1, 0, 2)
            ours[f"{q}/selected_v"] = torch.cat([_f32(f[3]) for f in fetches]).permute(1, 0, 2)
        for layer, cache in enumerate(out.cache):
            q = f"{p}/kv/L{layer}"
            # Compacted per sample: the valid columns in order (template, chunks, prompt, decoded tokens).
            ours[f"{q}/compacted_k"] = [_f32(cache.k[b][:, cache.valid[b]]) for b in range(bsz)]  # type: ignore[assignment]
            ours[f"{q}/compacted_v"] = [_f32(cache.v[b][:, cache.valid[b]]) for b in range(bsz)]  # type: ignore[assignment]
            ours[f"{q}/attention_mask"] = cache.valid.sum(1)
            ours[f"{q}/kv_lengths"] = cache.valid[:, : cache.prompt_start + t].sum(1)
        ours[f"{p}/output/first_step_logits"] = out.first_logits
        ours[f"{p}/output/step_logits"] = out.step_logits
        ours[f"{p}/output/greedy_token_ids"] = torch.tensor(out.tokens)
        ours[f"{p}/output/engine_sequences"] = torch.cat([ids, torch.tensor(out.tokens)[:, :-1]], 1)
        ours[f"{p}/output/prefill_logits_all_positions"], rows[f"{p}/output/prefill_logits_all_positions"] = traces["prefill/logits"], att
        ours[f"{p}/debug/prefill/final_norm_out"], rows[f"{p}/debug/prefill/final_norm_out"] = traces["prefill/final_norm_out"], att
        for layer in range(cfg.num_layers):
            for w in ("hidden_out", "q_post_rope", "k_post_rope"):
                name = f"{p}/debug/prefill/L{layer}/{w}"
                ours[name], rows[name] = traces[f"prefill/L{layer}/{w}"], att
    return ours, rows


def compare(name: str, gold: torch.Tensor, mine, rows: torch.Tensor | None) -> str | None:
    """None when equal within the rules; otherwise a one-line description of the difference."""
    if name.endswith("/input/doc_ids"):
        gold = gold == 0
    if name.endswith("/compacted_k") or name.endswith("/compacted_v"):
        return None  # compared together with the golden mask in _compare_kv
    if name.endswith("/kv/") or "/kv/L" in name and name.endswith("/attention_mask"):
        gold = gold.long().sum(1)
    if "doc_scores" in name:
        gold, mine = gold[:, 1:], mine[:, 1:]  # column 0 is the official dummy slot
    if rows is not None:  # only real (non-padding) tokens have defined values
        axis = 2 if gold.dim() == 4 else 1
        gold = gold.movedim(axis, 1)[rows] if axis == 2 else gold[rows]
        mine = mine.movedim(axis, 1)[rows] if axis == 2 else mine[rows]
    if tuple(gold.shape) != tuple(mine.shape):
        return f"{name}: shape {tuple(mine.shape)} != golden {tuple(gold.shape)}"
    if gold.is_floating_point():
        err = (gold.float() - mine.float()).abs().max().item() if gold.numel() else 0.0
        return None if err <= ATOL else f"{name}: max abs err {err:.3g} > {ATOL}"
    return None if torch.equal(gold.long(), mine.long()) else f"{name}: ids differ"


def _compare_kv(name: str, gold: torch.Tensor, mask: torch.Tensor, mine: list[torch.Tensor]) -> str | None:
    for b, m in enumerate(mine):
        g = gold[b][:, mask[b].bool()]
        if g.shape != m.shape:
            return f"{name}[{b}]: shape {tuple(m.shape)} != golden {tuple(g.shape)}"
        err = (g - m).abs().max().item()
        if err > ATOL:
            return f"{name}[{b}]: max abs err {err:.3g}"
    return None


GROUPS = {
    "stage1": lambda n: n.startswith("stage1/") and "/debug/" not in n,
    "stage1_debug": lambda n: n.startswith("stage1/") and "/debug/" in n,
    "input": lambda n: "/input/" in n,
    "routing": lambda n: "/stage2/" in n,
    "kv": lambda n: "/kv/" in n,
    "output": lambda n: "/output/" in n,
    "prefill_debug": lambda n: "/debug/prefill/" in n,
}


def _array_names(case: str) -> list[str]:
    from safetensors import safe_open

    path = GOLDEN / "cases" / case / "arrays.safetensors"
    if not path.exists():
        return []
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def case_groups() -> list[tuple[str, str]]:
    """(case, group) for the groups each case holds: a case need not carry every group (e.g. no stage-1
    debug arrays), so only what it holds is tested; a case holding nothing fails below."""
    return [(case, group) for case in engine_cases() for group, member in GROUPS.items()
            if any(member(n) for n in _array_names(case))]


def test_every_engine_case_holds_arrays(golden: Path) -> None:
    assert engine_cases(), f"no engine cases under {GOLDEN}"
    for case in engine_cases():
        assert _array_names(case), f"{case}: the case holds no arrays at all"


@pytest.mark.parametrize(("case", "group"), case_groups())
def test_engine_case_reproduces_golden(golden: Path, case: str, group: str) -> None:
    from safetensors.torch import load_file

    gold = load_file(str(GOLDEN / "cases" / case / "arrays.safetensors"))
    ours, rows = reproduce(case)
    names = [n for n in gold if GROUPS[group](n)]
    problems = []
    for name in names:
        if name not in ours:
            problems.append(f"{name}: not reproduced")
        elif name.endswith(("/compacted_k", "/compacted_v")):
            mask = gold[name.rsplit("/", 1)[0] + "/attention_mask"]
            problems.append(_compare_kv(name, gold[name], mask, ours[name]))  # type: ignore[arg-type]
        else:
            problems.append(compare(name, gold[name], ours[name], rows.get(name)))
    problems = [p for p in problems if p]
    assert not problems, f"{len(problems)} of {len(names)} arrays differ:\n" + "\n".join(problems[:20])


def test_every_golden_array_belongs_to_a_group(golden: Path) -> None:
    from safetensors import safe_open

    for case in engine_cases():
        with safe_open(str(GOLDEN / "cases" / case / "arrays.safetensors"), framework="pt") as f:
            orphans = [n for n in f.keys() if not any(g(n) for g in GROUPS.values())]
        assert not orphans, f"{case}: arrays not checked by any group: {orphans[:5]}"


def test_engine_cases_are_found(golden: Path) -> None:
    assert engine_cases(), f"no engine cases under {GOLDEN}"
    assert not [c for c in engine_cases() if "requests" not in _case_manifests()[c]]
