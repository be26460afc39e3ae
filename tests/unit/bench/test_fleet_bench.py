"""``benchmarks/fleet_bench.py`` in a tiny configuration: 1 and 2 real ``kvhive server``
processes with and without a shared ``resp`` tier (a throwaway ``redis-server``), a few
requests sharing two prefixes, and one cross-node retrieve (issue 15 item 6).

Checks the figures are there and consistent with each other, not their values: every hit
chunk's bytes verified, the shared tier raises two nodes' hit rate (to what one cache seeing
every request gets, since the run waits for the write-behind), and the cross-node retrieve
really loaded from the tier.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.paths import REPO

pytestmark = pytest.mark.timeout(180)

FLEET = REPO / "benchmarks" / "fleet_bench.py"


def test_fleet_bench_tiny_resp(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None or importlib.util.find_spec("redis") is None:
        pytest.skip("redis-server or redis-py is not installed (pip install 'kvhive[redis]')")
    out = tmp_path / "fleet.json"
    argv = [sys.executable, str(FLEET), "--nodes", "1,2", "--modes", "off,shared",
            "--prefixes", "2", "--prefix-chunks", "3", "--requests", "6", "--shape", "tiny",
            "--l1-size-gb", "0.25", "--xfer-shape", "tiny", "--xfer-chunks", "2",
            "--xfer-reps", "1", "--log-dir", str(tmp_path / "logs"), "--json", str(out)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=170, check=False)
    assert out.exists(), f"no report (exit {proc.returncode})\n{proc.stderr[-4000:]}"
    res = json.loads(out.read_text())
    assert res["errors"] == [], res["errors"]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "prefix hit" in proc.stdout and "cross-node" in proc.stdout, proc.stdout

    rows = {(r["nodes"], r["mode"]): r for r in res["workload"]}
    assert set(rows) == {(1, "off"), (1, "shared"), (2, "off"), (2, "shared")}
    for key, r in rows.items():
        assert r["requests"] == 6, key
        assert r["bad_chunks"] == 0, (key, r)
        assert r["verified_chunks"] == sum(r["hits_per_request"]) > 0, (key, r)
        assert 0 < r["prefill_saved"] < r["prefix_hit_rate"] <= 1, (key, r)
        assert r["prefill_saved"] <= r["ideal_prefill_saved"], (key, r)
        assert r["hit_tokens"] <= r["prefix_tokens"] < r["prompt_tokens"], (key, r)
        assert r["wall_s"] > 0, key
    # one node: its L1 sees every request, with or without the tier, and loads nothing from L2
    for mode in ("off", "shared"):
        assert rows[1, mode]["prefill_saved"] == rows[1, mode]["ideal_prefill_saved"]
        assert rows[1, mode]["l2_loaded_chunks"] == 0
    # two nodes: without the tier each node misses each prefix once; with it (the run waits for
    # the write-behind) only a prefix's first request misses, the rest load from L2 or L1
    off, shared = rows[2, "off"], rows[2, "shared"]
    assert shared["prefix_hit_rate"] > off["prefix_hit_rate"], (off, shared)
    assert shared["prefill_saved"] == shared["ideal_prefill_saved"], shared
    assert shared["l2_loaded_chunks"] > 0 and off["l2_loaded_chunks"] == 0, (off, shared)

    x = res["transfer"]
    assert x["reps"] == 1 and x["bytes"] == 2 * x["chunk_bytes"] > 0
    for where in ("local", "cross"):
        for fig in ("lookup_retrieve_GBps", "lookup_GBps", "retrieve_GBps"):
            assert x[where][fig] > 0, (where, fig, x)
    assert res["memcpy_GBps"] > 0
