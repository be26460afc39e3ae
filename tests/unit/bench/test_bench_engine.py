"""The engine-pattern section: fresh block tables, lookup before retrieve, cold and warm, the
server's page faults per chunk -- against a real ``kvhive server`` subprocess."""

from __future__ import annotations

import os

import pytest

from kvhive.bench import BenchConfig, run_bench
from kvhive.bench.config import SHAPES
from kvhive.bench.engine_section import measure_first_touch_memcpy, targets
from kvhive.bench.engineload import (
    PRIMING_REQUESTS,
    cache_chunks_for,
    run_engine,
    server_minor_faults,
)
from kvhive.bench.servers import ServerProcess

pytestmark = pytest.mark.timeout(240)


def test_engine_pattern_round_trips_and_the_server_takes_no_faults(server: ServerProcess) -> None:
    """SmolLM2's 5.6 MiB chunks are 1,440 pages each: an unpopulated mapping of the engine's
    segments faults each page of a fresh block on first touch.  The server populates its
    mappings at registration, so fresh blocks cost (almost) no faults, cold and warm."""
    assert server.proc is not None
    server.settle()  # the L1 is populated in the background after start: let it finish
    res = run_engine(
        server.rpc_url, SHAPES["smollm2-135m"], cache_gib=0.1, cold_requests={1: 3, 4: 1},
        warm_requests={1: 3, 4: 1}, settle_s=1.0, server_pid=server.proc.pid,
    )  # fmt: skip
    assert res["errors"] == []
    assert res["register_ms"] > 0
    for phase in ("cold", "warm"):
        ph = res["phases"][phase]
        for op in ("store", "retrieve"):
            assert set(ph[op]) == {"1", "4"}
            for f in ph[op].values():
                assert f["failures"] == 0 and f["gbs"] > 0
                assert f["faults_per_chunk"] is not None and f["faults_per_chunk"] < 50
        assert ph["lookup"]["1"]["n"] == 3 and ph["lookup"]["4"]["n"] == 1
    assert res["phases"]["cold"]["retrieve"]["1"]["requests"] == 3


def test_cold_pass_never_reuses_a_block() -> None:
    need = cache_chunks_for(SHAPES["tiny"], 256, 0.0, {1: 3, 16: 2})
    assert need == 2 * (3 + 32 + PRIMING_REQUESTS) + 1


def test_faults_are_read_from_proc() -> None:
    assert (server_minor_faults(os.getpid()) or 0) > 0
    assert server_minor_faults(None) is None


def test_first_touch_memcpy_is_a_positive_bandwidth() -> None:
    assert measure_first_touch_memcpy(4, 2) > 0


def test_section_rows_and_targets(tmp_path) -> None:
    cfg = BenchConfig(
        sections=("memcpy", "engine"), clients=("kvhive",), engine_shapes=("tiny",),
        engine_cache_gib=0.01, engine_settle_s=0.2, engine_cold_requests=((1, 2),),
        engine_warm_requests=((1, 2),), l1_size_gb=0.25, memcpy_mib=4,
        log_dir=str(tmp_path / "logs"),
    )  # fmt: skip
    report = run_bench(cfg)
    assert report.errors == []
    assert report.memcpy_first_touch_gbs is not None and report.memcpy_first_touch_gbs > 0
    keys = {r.key for r in report.rows}
    for phase in ("cold", "warm"):
        for op in ("store", "retrieve"):
            row = report.row(f"engine/tiny/{phase}/{op}/1")
            assert row is not None and row.kvhive is not None and row.vs_memcpy is not None
            assert f"engine/tiny/{phase}/{op}/1/faults" in keys
        assert f"engine/tiny/{phase}/lookup/1/p50" in keys
        for op in ("store", "retrieve"):  # each row also read against the floor
            vs = report.row(f"engine/tiny/{phase}/{op}/1/vs_floor")
            assert vs is not None and vs.kvhive is not None and vs.kvhive > 0
    for op in ("store", "retrieve"):
        floor = report.row(f"engine/tiny/floor/{op}/1")
        assert floor is not None and floor.kvhive is not None and floor.kvhive > 0
        assert f"engine/tiny/floor/{op}/1/rtt" in keys
    assert "engine/tiny/register" in keys
    waited = report.row("engine/tiny/l1_populate_wait")  # kvhive reports its populate front
    assert waited is not None and waited.kvhive is not None and waited.kvhive >= 0
    big = [t.row for t in targets(BenchConfig())]
    assert "engine/32L-8H-128D/cold/retrieve/1" in big
    assert "engine/smollm2-135m/cold/store/16" in big
