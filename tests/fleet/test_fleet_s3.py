"""S3 as the shared tier across nodes: moto on node S, a ``kvhive server`` on node A and one
on node B on the same bucket.  The real lmcache 0.5.6 client on A stores through kvhive A;
the client on B finds the same tokens through kvhive B, which never stored them: every byte
went A -> S and S -> B over the veths.  S gone: B's lookups are misses in bounded time."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fleet_testlib import (
    CHUNK_BYTES,
    MakeFleet,
    drive,
    report,
    s3_tier,
    start_kvhive,
    start_moto,
    store_on_a_load_on_b,
)

pytestmark = [pytest.mark.interop, pytest.mark.timeout(600)]

CHUNKS = 8
PAYLOAD = CHUNKS * CHUNK_BYTES  # 32 MiB
BOUND_S = 60.0


def test_b_finds_what_a_wrote_to_the_bucket(
    s3_ok: None, client_python: str, make_fleet: MakeFleet, log_dir: Path
) -> None:
    fleet = make_fleet(["s", "a", "b"])
    s, a, b = fleet["s"], fleet["a"], fleet["b"]
    tier = s3_tier(start_moto(s, log_dir))
    kv_a = start_kvhive(a, log_dir, [tier])
    kv_b = start_kvhive(b, log_dir, [tier])

    ho = store_on_a_load_on_b(client_python, kv_a, kv_b, CHUNKS, watch_store=s)
    stored, loaded, s_store, b_load = ho.stored, ho.loaded, ho.store_bytes, ho.load_bytes
    assert s_store["rx_bytes"] >= PAYLOAD, s_store  # A -> S
    assert loaded["l2_loaded"] == [CHUNKS]
    assert b_load["rx_bytes"] >= PAYLOAD, b_load  # S -> B
    assert kv_b.status()["l2"]["adapters"][0]["stored"] == 0

    # S dies: B's lookups are misses, answered in bounded time; the bucket's data is gone
    # with moto (it keeps objects in memory).
    (moto,) = s.procs
    s.kill(moto)
    t0 = time.monotonic()
    gone = drive(client_python, kv_b, "--phase", "load", chunks=CHUNKS)
    gone_s = time.monotonic() - t0
    assert gone["hit_chunks"] == 0 and gone_s < BOUND_S, (gone.result, gone_s)
    assert kv_b.healthy()
    report("s3 A->S->B", payload=PAYLOAD, s_rx_during_store=s_store["rx_bytes"],
           b_rx_during_load=b_load["rx_bytes"], store_driver_s=round(stored.seconds, 1),
           load_driver_s=round(loaded.seconds, 1), s_dead_lookup_driver_s=round(gone_s, 1))  # fmt: skip
