"""msabank's MSA trainer: the official training-mode forward (core), interleave-step samples over a
synthetic corpus (data), the two-phase loop (loop), the tokenizer recipe (tokenizer) and the default-model
recipe (run_default). Heavy imports stay in the submodules so `import msabank.train` is cheap.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["default_model_path"]


def default_model_path() -> Path:
    """The small MSA model shipped inside the package (msabank/default_model)."""
    return Path(__file__).resolve().parents[1] / "default_model"
