"""Memory parallel routing with 2 gloo processes (spawned; ~15 s each on 2 cores): identical to one index
holding every shard (round-robin shards, and one rank holding none); then a rank dies or hangs and the
survivor gets DistributedError within its timeout instead of hanging."""

from __future__ import annotations

import json

import pytest

from msabank.kernels.memory_parallel import _selftest_worker, spawn_workers


@pytest.mark.parametrize("die_mode", ["exit", "hang"])
def test_two_ranks_match_single_device_and_survive_a_dead_rank(tmp_path, die_mode):
    cfg = {
        "docs": 60, "layers": 2, "dim": 24, "seed": 5, "ks": [1, 4, 16, 100], "timeout_s": 60.0,
        "layouts": ["round_robin", "all_on_0"], "die_rank": 1, "die_mode": die_mode, "dead_timeout_s": 2.0,
    }
    if die_mode == "hang":
        cfg["layouts"], cfg["ks"] = ["round_robin"], [3]
    out = str(tmp_path / "res")
    codes = spawn_workers(_selftest_worker, 2, (cfg, out), timeout_s=120)
    res = []
    for r in range(2):
        with open(f"{out}.{r}") as f:
            res.append(json.load(f))
    assert all(r.get("ok") for r in res), res
    assert res[0]["checks"] == len(cfg["layouts"]) * cfg["layers"] * len(cfg["ks"])
    assert res[0]["dead_rank"] == "DistributedError", res[0]
    assert res[0]["dead_rank_s"] < 2.0 + 5.0  # the timeout, not a hang
    assert codes[1] == 0
