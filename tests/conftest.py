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
    """Deselected, not skipped: `crash` tests (hundreds of SIGKILLs, minutes) unless `-m` names them, and
    `gpu` tests (CUDA graphs, fused kernels against their CPU reference) where no CUDA device exists (CI);
    they run on a GPU machine with `pytest -m gpu tests/gpu`."""
    expr = config.getoption("markexpr") or ""
    drop = []
    if "crash" not in expr:
        drop.append("crash")
    if not torch.cuda.is_available():
        drop.append("gpu")
    gone = [i for i in items if any(i.get_closest_marker(m) is not None for m in drop)]
    if gone:
        config.hook.pytest_deselected(items=gone)
        items[:] = [i for i in items if i not in gone]
