"""The KV-aware routing example (``examples/router``) on a fleet: two vLLM (CPU) + kvhive
replicas, each in its own network namespace, and the router in a third.  The short workload
(4 prefixes of 1536 tokens, 16 requests, 2 at a time; kvhive's L1 holds 3 of the 4
prefixes) runs round-robin, then KV-aware routing on fresh prefixes, the replicas' L1
cleared in between.  KV-aware routing must save more prefill tokens (vLLM's own
``cached_tokens``) and hit more often, having learned every replica's holdings from
vLLM's KV events."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from fleet_testlib import REPO

sys.path.insert(0, str(REPO / "tests" / "e2e"))  # the e2e helpers
from e2e_support import require_vllm_env

pytestmark = [pytest.mark.timeout(420)]
PREFIXES, PREFIX_TOKENS, REQUESTS = 4, 1536, 16


def _run_fleet() -> ModuleType:
    path = REPO / "examples" / "router" / "run_fleet.py"
    spec = importlib.util.spec_from_file_location("router_run_fleet", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_kv_aware_routing_beats_round_robin(fleet_ok: None, log_dir: Path) -> None:
    env = require_vllm_env()
    rf = _run_fleet()
    setup = rf.Setup(
        vllm_python=env.python,
        model=env.model,
        replicas=2,
        l1_gb=rf.l1_gb_for(PREFIXES, PREFIX_TOKENS, 0.75),
        shared=False,
        direct_events=False,  # vLLM's own stream only: what a stock router sees
        predict_ttl_s=30.0,
        log_dir=log_dir,
    )
    wl = ["--prefixes", str(PREFIXES), "--prefix-tokens", str(PREFIX_TOKENS),
          "--requests", str(REQUESTS), "--concurrency", "2"]  # fmt: skip
    with rf.running(setup) as run:
        res = rf.run_workload(run, wl, timeout_s=240)
    rr, kv = res["policies"]
    assert (rr["policy"], kv["policy"]) == ("round_robin", "kv")
    sys.stderr.write(rf.table([("local", rr), ("local", kv)]) + "\n")

    for pol in (rr, kv):
        assert pol["requests"] == REQUESTS
        assert set(pol["by_replica"]) == {"a", "b"}, pol["by_replica"]
        # vLLM's cached tokens and kvhive's hit chunks tell the same story
        assert pol["prefill_tokens_saved"] == pol["kvhive"]["lookup_hit_chunks"] * 256, pol
    assert kv["prefill_tokens_saved"] > rr["prefill_tokens_saved"], (rr, kv)
    assert kv["hit_requests"] > rr["hit_requests"]
    assert kv["kvhive"]["stored_chunks"] < rr["kvhive"]["stored_chunks"]

    router: dict[str, Any] = kv["router"]
    for name in ("a", "b"):  # vLLM's stream of each replica: kvhive's L1 stores, as CPU
        assert router["events"][name]["BlockStored/CPU"] > 0, router["events"]
    assert router["by_reason"].get("kv_match", 0) >= REQUESTS - 2 * PREFIXES, router
    assert router["matched_tokens_total"] >= kv["prefill_tokens_saved"] // 2, router
    assert router["subscriber"]["decode_errors"] == 0 and not router["stale"], router
