"""The Python API as a notebook uses it: a closed handle says so, a cell run twice does not lock itself out."""

from __future__ import annotations

import gc
import warnings
from pathlib import Path

import pytest

import msabank
from msabank.errors import BankClosedError


def test_ask_after_close_and_reopen_in_one_process(tmp_path: Path, golden: Path) -> None:
    path = tmp_path / "bank"
    eng = msabank.open_bank(path, golden / "tiny-msa", create=True, device="cpu")
    eng.ingest([("a", "The lighthouse keeper retired in 1990.")])
    eng.close()
    with pytest.raises(BankClosedError, match="is closed"):
        eng.ask("When did the keeper retire?", max_new_tokens=2, max_rounds=0)
    with pytest.raises(BankClosedError, match="is closed"):
        eng.retrieve("keeper")
    first = msabank.open_bank(path, device="cpu")
    with pytest.warns(UserWarning, match="closing the earlier handle"):
        second = msabank.open_bank(path, device="cpu")  # the same cell run again
    with pytest.raises(BankClosedError, match="opened for writing again"):
        first.ingest([("b", "Another document.")])
    assert second.ingest([("b", "Another document.")]).added == 1
    del second  # dropped, never closed: the lock goes with it
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no earlier handle left to close
        with msabank.open_bank(path, device="cpu") as third:
            assert [r.user_id for r in third.list()] == ["a", "b"]
