"""Shared fixtures. Tests run on 2 CPU cores; keep them small and fast."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]


def golden_dir() -> Path:
    return Path(os.environ.get("MSABANK_GOLDEN_DIR", REPO.parent / "shared" / "golden"))


@pytest.fixture(scope="session")
def golden() -> Path:
    d = golden_dir()
    if not (d / "manifest.json").exists():
        pytest.fail(f"golden directory {d} not found: set MSABANK_GOLDEN_DIR")
    return d


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`crash` tests (hundreds of SIGKILLs, minutes) run only when `-m` names them: deselected, not skipped."""
    if "crash" in (config.getoption("markexpr") or ""):
        return
    keep = [i for i in items if i.get_closest_marker("crash") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("crash") is not None])
        items[:] = keep
