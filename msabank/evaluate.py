"""The evaluator lives beside the trainer now: `msabank.train.evaluate`. This name re-exports it only until
msabank/train/run_default.py imports the new module; delete it then."""

from msabank.train.evaluate import EVAL_SEED_BASE, evaluate

__all__ = ["EVAL_SEED_BASE", "evaluate"]
