"""msabank: a versioned, crash-safe memory-bank database for Memory Sparse Attention (MSA) models.

`msabank.open_bank(path, model=None, create=False)` returns an `Engine` (see msabank.engine); imports are
lazy so `import msabank` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["open_bank", "Engine", "Answer", "Hit", "Round", "load_model", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("open_bank", "Engine", "Answer", "Hit", "Round"):
        from msabank import engine

        return getattr(engine, name)
    if name == "load_model":
        from msabank.model import load_model

        return load_model
    raise AttributeError(f"module 'msabank' has no attribute {name!r}")
