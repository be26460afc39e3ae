"""A Valkey/Redis Cluster as the shared tier across nodes: 3 masters + 3 replicas on node M,
a ``kvhive server`` on node A and one on node B.  The real lmcache 0.5.6 client on A stores
through kvhive A; the client on B finds the chunks through kvhive B over the veths.  A shard
dies (its master SIGKILLed): B's lookups lose the chunks on that shard, in bounded time,
until its replica takes over; then every chunk hits again, byte-exact."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fleet_testlib import (
    CHUNK_BYTES,
    MakeFleet,
    drive,
    report,
    start_cluster,
    start_kvhive,
    store_on_a_load_on_b,
    valkey_tier,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(600)]

CHUNKS = 8
PAYLOAD = CHUNKS * CHUNK_BYTES  # 32 MiB
BOUND_S = 60.0


def test_b_finds_what_a_stored_and_survives_a_shard_dying(
    client_python: str, make_fleet: MakeFleet, log_dir: Path
) -> None:
    fleet = make_fleet(["m", "a", "b"])
    m, a, b = fleet["m"], fleet["a"], fleet["b"]
    # A 10 s node timeout: B's lookup (about 4 s after the kill) sees the shard down, not
    # already failed over.
    cluster = start_cluster(m, log_dir, node_timeout_ms=10_000)
    try:
        tier = valkey_tier(cluster)
        kv_a = start_kvhive(a, log_dir, [tier])
        kv_b = start_kvhive(b, log_dir, [tier])

        ho = store_on_a_load_on_b(client_python, kv_a, kv_b, CHUNKS, watch_store=a)
        loaded, a_store, b_load = ho.loaded, ho.store_bytes, ho.load_bytes
        assert a_store["tx_bytes"] >= PAYLOAD, a_store
        assert b_load["rx_bytes"] >= PAYLOAD, b_load

        # The shard holding most of the chunks dies, after its replica has them all.
        held = {p: int(cluster.cli("DBSIZE", port=p)) for p in cluster.masters()}
        victim = max(held, key=lambda p: held[p])
        assert held[victim] > 0, held
        assert int(cluster.cli("WAIT", "1", "5000", port=victim, timeout=10)) == 1
        cluster.kill(victim)
        t0 = time.monotonic()
        dead = drive(client_python, kv_b, "--phase", "load", chunks=CHUNKS)  # clears B's L1
        dead_s = time.monotonic() - t0
        assert dead["hit_chunks"] < CHUNKS and dead_s < BOUND_S, (dead.result, dead_s)
        if dead["hit_chunks"]:
            assert dead["bytes_equal"] is True, dead.result

        failover_s = time.monotonic() - t0 + cluster.wait_failover(victim, timeout=60)
        deadline = time.monotonic() + 60
        while True:  # the client refreshes its slot table after the connection errors
            healed = drive(client_python, kv_b, "--phase", "load", chunks=CHUNKS)
            if healed["hit_chunks"] == CHUNKS:
                break
            assert time.monotonic() < deadline, f"no recovery 60 s after failover: {healed.result}"
        assert healed["bytes_equal"] is True, healed.result
        healed_s = time.monotonic() - t0
        assert kv_b.healthy()
        report("valkey A->M->B", payload=PAYLOAD, a_tx_during_store=a_store["tx_bytes"],
               b_rx_during_load=b_load["rx_bytes"], load_driver_s=round(loaded.seconds, 1),
               shard_keys=held, hits_with_shard_dead=dead["hit_chunks"],
               dead_driver_s=round(dead_s, 1), failover_s=round(failover_s, 1),
               all_hits_again_after_s=round(healed_s, 1))  # fmt: skip
    finally:
        cluster.stop()
