"""Train (or continue training) the embedded default model and evaluate it: the GPU recipe.

    python -m msabank.train.run_default --out OUT/ckpt --budget 480 [--init DIR] [--eval-tokens 16000,1000000]

Writes OUT/ckpt (checkpoint), OUT/train_log.jsonl and OUT/eval.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch


def _layer_weights(spec: str, n: int) -> tuple[float, ...] | None:
    if not spec:
        return None
    w = tuple(float(x) for x in spec.split(","))
    if len(w) != n:
        raise SystemExit(f"--aux-layer-weights needs {n} values (one per router layer), got {len(w)}")
    return w


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=480.0, help="training seconds")
    ap.add_argument("--init", default=None, help="checkpoint to continue from (else a new model)")
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[1] / "default_model" / "tokenizer.json"))
    ap.add_argument("--tiny", action="store_true", help="tiny model for a CPU dry run")
    ap.add_argument("--steps", type=int, default=10**9)
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--memory", type=int, default=256)
    ap.add_argument("--workers", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--lr-warmup", type=float, default=2e-3)
    ap.add_argument("--warmup-frac", type=float, default=0.3, help="cap of the warm-up phase (share of the run)")
    ap.add_argument("--warmup-until", type=float, default=0.8,
                    help="end the warm-up once the first router layer's running round-1 recall@1 reaches this "
                         "(<= 0: run the warm-up for --warmup-frac)")
    ap.add_argument("--warmup-span", default="question", help="routing span of the warm-up: question or official")
    ap.add_argument("--warmup-kinds", default="single,single,needle")
    ap.add_argument("--span", default="official", help="routing span after the warm-up: official or question")
    ap.add_argument("--aux-weight", type=float, default=0.1, help="weight of the routing loss after the warm-up")
    ap.add_argument("--world-docs", type=int, default=1500,
                    help="documents per training world (small worlds make related documents each other's negatives)")
    ap.add_argument("--world-every", type=int, default=1, help="a fresh world every this many steps")
    ap.add_argument("--lr-ramp-steps", type=int, default=100)
    ap.add_argument("--save-every", type=float, default=0.0, help="save the checkpoint every this many seconds")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--eval-tokens", default="16000,131072")
    ap.add_argument("--eval-questions", type=int, default=300)
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--force-every", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--kinds", default="single,single,twohop,twohop,needle",
                    help="question kinds drawn uniformly from this list (repeat a kind to weight it)")
    ap.add_argument("--keep-unrouted-lm", action="store_true",
                    help="LM loss also on [n] targets whose document was not selected (runs 1-2 did this)")
    ap.add_argument("--aux-layer-weights", default="",
                    help="InfoNCE weight per router layer, e.g. 4,1,1,1 (default 1 each): the first router "
                         "layer is the only one a forced document cannot leak into")
    ap.add_argument("--reading-distractors", type=int, default=-1,
                    help="cut the final round's appended document to the answer sentence plus up to N others (-1: whole)")
    ap.add_argument("--answer-weight", type=float, default=1.0,
                    help="LM-loss weight of the answer's own tokens (not the fixed text around them)")
    ap.add_argument("--final-weight", type=float, default=1.0,
                    help="LM-loss weight of final-round targets (the answer) against the [n] targets")
    ap.add_argument("--token-tau", type=float, default=0.0,
                    help="smooth max over routing tokens in the InfoNCE scores, e.g. 0.05 (0: the official max); "
                         "selection keeps the max (docs/eval.md, sweeps c4/c5: needles)")
    ap.add_argument("--eval-seeds", default="",
                    help="eval world seed offsets, one per --eval-tokens entry (default 0,1,2,...); "
                         "docs/eval.md's banks: 16000->0, 131072->1, 1000000->2, 10000000->3")
    args = ap.parse_args(argv)
    # argument checks before any training time is spent
    kinds = tuple(k for k in args.kinds.split(",") if k)
    warmup_kinds = tuple(k for k in args.warmup_kinds.split(",") if k)
    for flag, ks in (("--kinds", kinds), ("--warmup-kinds", warmup_kinds)):
        if not ks or set(ks) - {"single", "twohop", "needle"}:
            raise SystemExit(f"{flag} takes single, twohop and needle, got {','.join(ks)!r}")
    for flag, span in (("--warmup-span", args.warmup_span), ("--span", args.span)):
        if span not in ("question", "official"):
            raise SystemExit(f"{flag} takes question or official, got {span!r}")
    sizes = [int(x) for x in args.eval_tokens.split(",") if x]
    offsets = [int(x) for x in args.eval_seeds.split(",") if x] or list(range(len(sizes)))
    if len(offsets) != len(sizes):
        raise SystemExit("--eval-seeds needs one offset per --eval-tokens entry")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    from msabank.train.evaluate import EVAL_SEED_BASE, evaluate
    from msabank.model import load_model
    from msabank.prompt import Tokenizer
    from msabank.train.loop import TrainConfig, default_model_config, new_model, save, train

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    root = out.parent
    root.mkdir(parents=True, exist_ok=True)
    if args.init:
        model = load_model(args.init, device=dev, dtype=torch.float32)
        tok = model.tokenizer
    else:
        tok = Tokenizer.from_file(args.tokenizer)
        if args.tiny:
            cfg = default_model_config(tok.vocab_size, layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16,
                                       intermediate=128, router_layers=(2, 3), chunk_size=args.chunk_size)
        else:
            cfg = default_model_config(tok.vocab_size, chunk_size=args.chunk_size)
        model = new_model(cfg, tok, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    logging.info("model params %d on %s", n_params, dev)
    log_fh = (root / "train_log.jsonl").open("a")
    tc = TrainConfig(out_dir=str(out), steps=args.steps, time_budget_s=args.budget, questions=args.questions,
                     memory=args.memory, seed=args.seed, lr=args.lr, lr_warmup=args.lr_warmup,
                     warmup_frac=args.warmup_frac, workers=args.workers, device=dev, log_every=args.log_every,
                     force_every=args.force_every, kinds=kinds, warmup_kinds=warmup_kinds,
                     warmup_span=args.warmup_span, span=args.span, aux_weight=args.aux_weight, warmup_until=args.warmup_until if args.warmup_until > 0 else None,
                     world_docs=args.world_docs, world_every=args.world_every, lr_ramp_steps=args.lr_ramp_steps,
                     save_every_s=args.save_every,
                     lm_only_routed=not args.keep_unrouted_lm,
                     aux_layer_weights=_layer_weights(args.aux_layer_weights, len(model.config.router_layers)),
                     token_tau=args.token_tau, final_weight=args.final_weight,
                     reading_distractors=args.reading_distractors, answer_weight=args.answer_weight)
    t0 = time.time()
    train(model, tok, tc, on_log=lambda row: (log_fh.write(json.dumps(row) + "\n"), log_fh.flush()))
    logging.info("trained %.0f s", time.time() - t0)
    model.eval()
    results = {"params": n_params, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "evals": []}
    for tokens, off in zip(sizes, offsets):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev == "cuda"):
            r = evaluate(model, tokens=tokens, seed=EVAL_SEED_BASE + off, questions=args.eval_questions, batch=100)
        results["evals"].append(r)
        (root / "eval.json").write_text(json.dumps(results, indent=1))
        logging.info("eval %s", json.dumps(r))


if __name__ == "__main__":
    main()
