"""How far bfloat16 drifts from float32 on the golden engine cases (run on a GPU; not a pytest module).

Usage: python tests/bf16_drift.py GOLDEN_DIR OUT.json [device]
For every engine case: float32 and bfloat16 runs of the same public API on `device` (default cuda),
compared with each other and with the official float32 goldens. Writes one JSON report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from msabank.model import load_model
from msabank.prompt import question_prompt
from msabank.stages import InMemoryMemory, encode_documents, generate

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


class Scores(InMemoryMemory):
    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.all: list[torch.Tensor] = []

    def route_batch(self, layer_index, queries):
        self.all.extend(self.doc_scores(layer_index, q)[1] for q in queries)
        return super().route_batch(layer_index, queries)


def run(golden: Path, case: str, device: str, dtype: torch.dtype) -> dict:
    man = json.loads((golden / "cases" / case / "manifest.json").read_text())
    model = load_model(golden / man["model_dir"], device=device, dtype=dtype)
    docs = list(enumerate(json.loads((golden / "cases" / case / "memory_docs.json").read_text())))
    enc = encode_documents(model, docs)
    out = {"enc": enc, "req": {}}
    for req, spec in man["requests"].items():
        mem = Scores(dict(enumerate(enc)), model.config.top_k, device=device)
        steps = len(spec["generated_token_ids"][0])
        g = generate(model, [question_prompt(model.tokenizer, q) for q in spec["prompts"]], mem,
                     max_new_tokens=steps, stop_ids=[], keep_logits=True)  # fmt: skip
        out["req"][req] = {"gen": g, "scores": torch.stack(mem.all)}
    return out


def main() -> None:
    golden, dest = Path(sys.argv[1]), Path(sys.argv[2])
    device = sys.argv[3] if len(sys.argv) > 3 else "cuda"
    report: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else device,
                    "torch": torch.__version__, "cases": {}}  # fmt: skip
    cases = [p.parent.name for p in sorted(golden.glob("cases/*/manifest.json"))
             if "requests" in json.loads(p.read_text())]  # fmt: skip
    for case in cases:
        gold = load_file(str(golden / "cases" / case / "arrays.safetensors"))
        f32, b16 = run(golden, case, device, torch.float32), run(golden, case, device, torch.bfloat16)
        pooled = {
            name: max((getattr(a, name).float() - getattr(b, name).float()).abs().max().item()
                      for a, b in zip(f32["enc"], b16["enc"]))  # fmt: skip
            for name in ("routing_keys", "content_k", "content_v")
        }
        c = {"pooled_max_abs_diff_bf16_vs_f32": pooled, "requests": {}}
        for req in f32["req"]:
            a, b = f32["req"][req], b16["req"][req]
            ga, gb = a["gen"], b["gen"]
            sel_a = [[r.numbers.tolist() for r in s] for s in ga.routed]
            sel_b = [[r.numbers.tolist() for r in s] for s in gb.routed]
            set_eq = [[sorted(x) == sorted(y) for x, y in zip(sa, sb)] for sa, sb in zip(sel_a, sel_b)]
            tok_a, tok_b = ga.tokens, gb.tokens
            first_div = [next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None) for ta, tb in zip(tok_a, tok_b)]
            c["requests"][req] = {
                "f32_tokens_equal_golden": tok_a == gold[f"req_{req}/output/greedy_token_ids"].tolist(),
                "f32_first_logits_max_abs_err_vs_golden": (ga.first_logits - gold[f"req_{req}/output/first_step_logits"]).abs().max().item(),
                "doc_scores_max_abs_diff_bf16_vs_f32": (a["scores"] - b["scores"]).abs().max().item(),
                "selected_f32": sel_a,
                "selected_bf16": sel_b,
                "selected_sets_equal": set_eq,
                "selected_order_equal": sel_a == sel_b,
                "first_logits_max_abs_diff_bf16_vs_f32": (ga.first_logits - gb.first_logits).abs().max().item(),
                "first_logits_std_f32": ga.first_logits.std().item(),
                "tokens_f32": tok_a,
                "tokens_bf16": tok_b,
                "tokens_equal": tok_a == tok_b,
                "first_divergent_step": first_div,
            }
        report["cases"][case] = c
    dest.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
