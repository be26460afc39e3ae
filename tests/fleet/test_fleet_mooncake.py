"""Mooncake Store as a distributed pool across nodes: one ``mooncake_master`` on node M, a
``kvhive server`` on node A and one on node B, each a Mooncake client mounting its own
segment and advertising its node's address.  The real lmcache 0.5.6 client on A stores
through kvhive A; the client on B looks the same tokens up through kvhive B, which never
stored them, and gets them byte-exact over the veths.  A master restart and node A leaving
cost misses, bounded in time, then the fleet works again."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fleet_testlib import (
    CHUNK_BYTES,
    MakeFleet,
    Master,
    delta,
    drive,
    mooncake_tier,
    report,
    start_kvhive,
)

from support.fleet import Fleet

pytestmark = [pytest.mark.interop, pytest.mark.timeout(600)]

CHUNKS = 8
PAYLOAD = CHUNKS * CHUNK_BYTES  # 32 MiB
BOUND_S = 60.0  # a lookup round through the client, bounded (a hang would be the driver timeout)


def _fleet(make_fleet: MakeFleet, log_dir: Path, *master_flags: str) -> tuple[Fleet, Master]:
    fleet = make_fleet(["m", "a", "b"])
    master = Master(fleet["m"], log_dir, *master_flags)
    master.start()
    return fleet, master


def _assert_all_hit(res: dict[str, Any], chunks: int = CHUNKS) -> None:
    assert res["hit_chunks"] == chunks, res
    assert res["retrieve_ok"] is True and res["load_errors"] == [], res
    assert res["bytes_equal"] is True, res


def test_b_loads_what_a_stored_across_the_veths(
    mooncake_ok: None, client_python: str, make_fleet: MakeFleet, log_dir: Path
) -> None:
    """Default (random) placement: each chunk lives in A's or B's segment.  Either it crossed
    A's veth when A stored it into B's segment, or B's veth when B read it from A's: the two
    counts together are at least the payload."""
    fleet, master = _fleet(make_fleet, log_dir)
    a, b = fleet["a"], fleet["b"]
    kv_a = start_kvhive(a, log_dir, [mooncake_tier(a, master)])
    kv_b = start_kvhive(b, log_dir, [mooncake_tier(b, master)])

    before = a.counters()
    stored = drive(client_python, kv_a, "--phase", "store", chunks=CHUNKS)
    a_store = delta(before, a.counters())
    assert stored["store_ok"] is True and stored["l2_stored"] == [CHUNKS], stored.result

    before = b.counters()
    loaded = drive(client_python, kv_b, "--phase", "load", "--no-clear", chunks=CHUNKS)
    b_load = delta(before, b.counters())
    assert loaded["l1_objects_before_lookup"] == 0  # B never had them
    _assert_all_hit(loaded.result)
    assert loaded["l2_loaded"] == [CHUNKS]
    assert a_store["tx_bytes"] + b_load["rx_bytes"] >= PAYLOAD, (a_store, b_load)
    st_a, st_b = kv_a.status()["l2"]["adapters"][0], kv_b.status()["l2"]["adapters"][0]
    assert (st_a["stored"], st_b["loaded"], st_b["stored"]) == (CHUNKS, CHUNKS, 0)
    report("mooncake A->B", payload=PAYLOAD, a_tx_during_store=a_store["tx_bytes"],
           b_rx_during_load=b_load["rx_bytes"], store_driver_s=round(stored.seconds, 1),
           load_driver_s=round(loaded.seconds, 1))  # fmt: skip


def test_node_a_leaving_costs_misses_never_a_hang(
    mooncake_ok: None, client_python: str, make_fleet: MakeFleet, log_dir: Path
) -> None:
    """``local_first`` placement: what A stores lives in A's segment, so B reads every byte
    from A over the veths.  A killed outright (SIGKILL, no unmount): B's lookups in the
    master's client_ttl window answer in bounded time, and anything they return is exact;
    after it, misses.  A stopped in order: misses at once.  B stores and loads afterwards."""
    fleet, master = _fleet(make_fleet, log_dir, "--allocation_strategy=local_first",
                           "--client_ttl=5")  # fmt: skip
    a, b = fleet["a"], fleet["b"]
    kv_a = start_kvhive(a, log_dir, [mooncake_tier(a, master)])
    kv_b = start_kvhive(b, log_dir, [mooncake_tier(b, master)])

    assert drive(client_python, kv_a, "--phase", "store", chunks=CHUNKS)["store_ok"] is True
    before = b.counters()
    loaded = drive(client_python, kv_b, "--phase", "load", "--no-clear", chunks=CHUNKS)
    b_load = delta(before, b.counters())
    _assert_all_hit(loaded.result)
    assert b_load["rx_bytes"] >= PAYLOAD, b_load  # every chunk came from A's segment

    # A dies: SIGKILL, its segment never unmounted.
    assert kv_a.proc is not None
    a.kill(kv_a.proc)
    t0 = time.monotonic()
    dead = drive(client_python, kv_b, "--phase", "load", chunks=CHUNKS)  # clears B's L1 first
    dead_s = time.monotonic() - t0
    assert dead_s < BOUND_S, dead_s
    if dead["hit_chunks"]:
        assert dead["bytes_equal"] is True, dead.result
    deadline = time.monotonic() + 60
    while True:  # the master drops A's segment after client_ttl
        gone = drive(client_python, kv_b, "--phase", "load", chunks=CHUNKS)
        if gone["hit_chunks"] == 0:
            break
        assert time.monotonic() < deadline, (
            f"A's chunks still found 60 s after it died: {gone.result}"
        )
    gone_s = time.monotonic() - t0

    # A comes back, stores under another model name, then leaves in order: misses at once.
    kv_a2 = start_kvhive(a, log_dir, [mooncake_tier(a, master)], tag="-2")
    again = drive(client_python, kv_a2, "--phase", "store", "--model", "fleet-2", chunks=CHUNKS)
    assert again["store_ok"] is True
    found = drive(client_python, kv_b, "--phase", "load", "--model", "fleet-2", chunks=CHUNKS)
    _assert_all_hit(found.result)
    kv_a2.stop()
    t1 = time.monotonic()
    left = drive(client_python, kv_b, "--phase", "load", "--model", "fleet-2", chunks=CHUNKS)
    left_s = time.monotonic() - t1
    assert left["hit_chunks"] == 0 and left_s < BOUND_S, (left.result, left_s)

    # B alone still stores and loads (into its own segment now).
    own = drive(client_python, kv_b, "--phase", "both", "--model", "fleet-3", chunks=CHUNKS)
    _assert_all_hit(own.result)
    assert kv_b.status()["counters"]["retrieve_failures"] == 0
    report("mooncake node A leaving", b_rx_during_load=b_load["rx_bytes"],
           load_over_veth_driver_s=round(loaded.seconds, 1),
           after_kill_hits=dead["hit_chunks"], after_kill_driver_s=round(dead_s, 1),
           misses_after_kill_s=round(gone_s, 1), after_stop_driver_s=round(left_s, 1))  # fmt: skip


def test_master_restart_costs_misses_then_the_fleet_recovers(
    mooncake_ok: None, client_python: str, make_fleet: MakeFleet, log_dir: Path
) -> None:
    fleet, master = _fleet(make_fleet, log_dir)
    a, b = fleet["a"], fleet["b"]
    kv_a = start_kvhive(a, log_dir, [mooncake_tier(a, master)])
    kv_b = start_kvhive(b, log_dir, [mooncake_tier(b, master)])
    assert drive(client_python, kv_a, "--phase", "store", chunks=CHUNKS)["store_ok"] is True
    _assert_all_hit(drive(client_python, kv_b, "--phase", "load", chunks=CHUNKS).result)

    master.stop()
    t0 = time.monotonic()
    down = drive(client_python, kv_b, "--phase", "load", chunks=CHUNKS)
    down_s = time.monotonic() - t0
    assert down["hit_chunks"] == 0 and down_s < BOUND_S, (down.result, down_s)

    master.start()
    t1 = time.monotonic()
    fresh = drive(client_python, kv_b, "--phase", "load", chunks=CHUNKS)
    assert fresh["hit_chunks"] == 0, fresh.result  # the new master knows nothing
    deadline = time.monotonic() + 90
    rounds = 0
    while True:  # the clients remount their segments on the new master; then A->B again
        rounds += 1
        model = f"fleet-r{rounds}"
        stored = drive(client_python, kv_a, "--phase", "store", "--model", model, chunks=CHUNKS)
        loaded = drive(client_python, kv_b, "--phase", "load", "--model", model, chunks=CHUNKS)
        if loaded["hit_chunks"] == CHUNKS:
            break
        assert time.monotonic() < deadline, f"no recovery in 90 s: {stored.result} {loaded.result}"
    _assert_all_hit(loaded.result)
    report("mooncake master restart", lookup_round_master_down_s=round(down_s, 1),
           recovered_after_s=round(time.monotonic() - t1, 1), rounds=rounds)  # fmt: skip
