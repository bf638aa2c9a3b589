"""Where a model's answers fail, teacher-forced: per question type, round-1 naming and final-round reading.

    python -m msabank.train.probe MODEL_DIR [--worlds 6] [--questions 32] [--memory 64]

Training-style steps (`make_batch`: fresh 1,500-document worlds, `--memory` documents, the gold one
forced into the selection, as the trainer's forced steps do) through the training forward
(`core.forward`, which selects what the engine serves: the evaluator and the trainer agree top-1 on every
question of an eval bank), scored per position against the targets:
- `name`: round 1's `[n]<|object_ref_end|>` exact (the document number copied from memory);
- `first`: the final round's first answer token (finding the answer in the appended document);
- `rest|first`: the remaining answer tokens and `<|im_end|>`, when the first was right (copying on).
Found with it (docs/eval.md, sweeps c9/r1): the shipped model reads numeric answers (years, populations)
exactly and word answers (names, towns, colours, jobs) almost never; given the first token it copies on.
A number's first answer token is a lone space (the tokenizer writes ' ' then one token per digit), so
for numbers `first` is trivial and the digits are in `rest|first`.
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict
from typing import Any

import torch

from msabank.model import MSAModel
from msabank.synth import Question, World
from msabank.train.core import forward
from msabank.train.data import make_batch


def probe(model: MSAModel, *, worlds: int = 6, questions: int = 32, memory: int = 64, world_docs: int = 1500,
          seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per question type (q.type): counts and rates of `name`, `first` and `rest|first` (module docstring)."""
    tok = model.tokenizer
    rng = random.Random(seed)
    hits: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    was_training = model.training
    model.eval()
    try:
        for w in range(worlds):
            world = World(seed=50_000_000 + seed * 1000 + w, num_docs=world_docs)
            for kind in ("single", "twohop", "needle"):
                drawn: list[Question] = []
                b = make_batch(tok, world, rng, questions=questions, memory=memory, kinds=(kind,),
                               span=model.config.routing_span, drawn=drawn)
                b = b.to(model.device)
                with torch.no_grad():
                    out = forward(model, b, force_positive=True, want_logits=True)
                ok_all = out.logits.argmax(-1) == b.labels
                groups: list[list[int]] = []  # sequence rows per question, in order
                for i, st in enumerate(b.stage.tolist()):
                    if st == 0:
                        groups.append([])
                    groups[-1].append(i)
                assert len(groups) == len(drawn)
                for q, rows in zip(drawn, groups):
                    h = hits[q.type]
                    for i in rows:
                        lab = b.labels[i] >= 0
                        if b.stage[i] == 0:
                            h["name"][0] += bool(ok_all[i][lab].all())
                            h["name"][1] += 1
                        elif b.stage[i] == 2:  # the answer's own tokens, as the trainer marks them (Batch.answer)
                            at = int(b.answer[i].nonzero()[0, 0])
                            first = bool(ok_all[i, at])
                            h["first"][0] += first
                            h["first"][1] += 1
                            if first:  # the rest of the answer and <|im_end|>
                                h["rest|first"][0] += bool(ok_all[i, at + 1 :][lab[at + 1 :]].all())
                                h["rest|first"][1] += 1
    finally:
        model.train(was_training)
    return {t: {k: {"hit": a, "n": n, "rate": a / n} for k, (a, n) in sorted(v.items())} for t, v in sorted(hits.items())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--worlds", type=int, default=6)
    ap.add_argument("--questions", type=int, default=32)
    ap.add_argument("--memory", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    from msabank.model import load_model

    model = load_model(a.model, device=a.device, dtype=torch.float32)
    res = probe(model, worlds=a.worlds, questions=a.questions, memory=a.memory)
    print(f"{'question type':30s} {'name':>12s} {'first':>12s} {'rest|first':>12s}")
    for t, v in res.items():
        cells = [f"{v[k]['rate']:.2f} ({v[k]['n']})" if k in v else "-" for k in ("name", "first", "rest|first")]
        print(f"{t:30s} " + " ".join(f"{c:>12s}" for c in cells))


if __name__ == "__main__":
    main()
