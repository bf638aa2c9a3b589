"""CLI tests: make `_cli` importable (tests run with --import-mode=importlib, no packages)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
