"""``kvhive bench`` end to end on small shapes against a real ``kvhive server`` subprocess,
with kvhive's own client (the lmcache client venv is not needed here)."""

from __future__ import annotations

import json

import pytest

from kvhive.bench import BenchConfig, run_bench
from kvhive.bench.config import SHAPES
from kvhive.bench.kvload import run_transfer
from kvhive.bench.servers import ServerProcess
from kvhive.cli.main import main

pytestmark = pytest.mark.timeout(180)


def test_transfer_round_trips_bytes_and_reports_gbs(server: ServerProcess) -> None:
    res = run_transfer(server.rpc_url, SHAPES["tiny"], chunks=3, per_request=(1, 3), rounds=2)
    assert res["errors"] == []
    assert res["chunk_bytes"] == SHAPES["tiny"].chunk_bytes(256)
    assert set(res["ops"]) == {"store", "retrieve"}
    for op in ("store", "retrieve"):
        assert res["ops"][op]["1"]["requests"] == 6  # 3 chunks x 2 rounds, one per request
        assert res["ops"][op]["3"]["requests"] == 2
        assert res["ops"][op]["3"]["gbs"] > 0
    status = server.status()
    assert status["counters"]["retrieve_failures"] == 0
    assert status["counters"]["store_dropped"] == 0


def test_large_chunks_round_trip_byte_exact(server: ServerProcess) -> None:
    """SmolLM2's 5.6 MiB chunks take the copy engine's two-thread path (30 per-layer
    segments); the retrieved blocks must equal the stored ones (checked inside)."""
    res = run_transfer(server.rpc_url, SHAPES["smollm2-135m"], chunks=2, per_request=(1, 2),
                       rounds=1)  # fmt: skip
    assert res["errors"] == []
    assert all(f["failures"] == 0 for op in res["ops"].values() for f in op.values())


def test_two_engines_at_once(server: ServerProcess) -> None:
    res = run_transfer(server.rpc_url, SHAPES["tiny"], chunks=2, per_request=(2,), rounds=1,
                       engines=2)  # fmt: skip
    assert res["errors"] == [] and res["engines"] == 2
    assert res["ops"]["store"]["2"]["requests"] == 2


def test_run_bench_report_structure_and_ratios(tmp_path) -> None:
    cfg = BenchConfig(
        sections=("memcpy", "healthy", "transfer", "lookup", "noop"),
        clients=("kvhive",),
        shapes=("tiny",),
        chunks=2,
        rounds=1,
        lookup_prefixes=(1, 4),
        lookup_samples=5,
        noop_samples=20,
        healthy_sizes_gb=(0.25,),
        healthy_reps=1,
        l1_size_gb=0.25,
        memcpy_mib=4,
        log_dir=str(tmp_path / "logs"),
    )
    seen: list[str] = []
    report = run_bench(cfg, progress=seen.append)
    assert report.errors == []
    assert seen and any("memcpy" in m for m in seen)  # progress while running
    m = report.memcpy_gbs
    assert m is not None and m > 0
    keys = {r.key for r in report.rows}
    for op in ("store", "retrieve"):
        for p in ("1", "2"):
            key = f"transfer/kvhive/lmcache_driven/tiny/{op}/{p}"
            assert key in keys
            row = report.row(key)
            assert row is not None and row.kvhive is not None and row.kvhive > 0
            assert row.vs_memcpy == pytest.approx(round(row.kvhive / m, 4))
            assert row.reference is None and row.vs_reference is None
    for label in ("hit", "miss"):
        for n in ("1", "4"):
            for stat in ("p50", "p99"):
                assert f"lookup/kvhive/{label}/{n}/{stat}" in keys
                assert f"lookup/kvhive057/{label}/{n}/{stat}" in keys  # 0.5.7 keys, kvhive
    assert {"noop/kvhive/p50", "noop/kvhive/p99", "healthy/l1-0.25gb"} <= keys
    healthy = report.row("healthy/l1-0.25gb")
    assert healthy is not None and 0 < (healthy.kvhive or 0) < 60
    targets = {t.row: t for t in report.targets}
    assert (
        targets["lookup/kvhive/hit/1/p50"].measured == report.row("lookup/kvhive/hit/1/p50").kvhive
    )
    assert targets["noop/kvhive/p50"].ok is not None
    assert report.meta["config"]["chunks"] == 2 and report.meta["duration_s"] > 0


def test_cli_writes_json_and_table(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    rc = main([
        "bench", "--quick", "--clients", "kvhive", "--sections", "memcpy,noop",
        "--noop-samples", "20", "--l1-size-gb", "0.25", "--json", str(out),
    ])  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["key"] for r in data["rows"]] == [
        "noop/kvhive/p50",
        "noop/echo/p50",
        "noop/kvhive/p99",
        "noop/echo/p99",
    ]
    assert data["memcpy_gbs"] > 0
    # the floor was timed by the same client next to the server, and is a real round trip
    assert 0 < data["echo_rtt_ms"] == data["rows"][1]["kvhive"] < 100
    table = capsys.readouterr().out
    assert "empty round trip (noop) p50" in table and "target" in table
    assert "bare pyzmq echo round trip (this machine, this run)" in table


def test_cli_rejects_unknown_section(capsys) -> None:
    assert main(["bench", "--sections", "bogus"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_vs_reference_without_client_venv_is_a_usage_error(capsys) -> None:
    rc = main(["bench", "--vs-reference", "--sections", "memcpy",
               "--client-python", "/nonexistent/python"])  # fmt: skip
    assert rc == 2
    assert "--vs-reference needs it" in capsys.readouterr().err


def test_sections_that_store_gigabytes_run_kvhive_with_an_eager_l1(tmp_path) -> None:
    """The transfer and concurrency sections start kvhive with ``--no-l1-use-lazy`` (the
    reference allocates its L1 up front on CPU); a user's ``--server-arg`` still wins, and
    the engine section keeps the default lazy arena."""
    from kvhive.bench.runner import BenchRunner

    runner = BenchRunner(BenchConfig(server_args=("--l1-use-lazy",), log_dir=str(tmp_path)))
    eager = runner._server("kvhive", 1, "t", eager_l1=True).argv()
    assert "--no-l1-use-lazy" in eager
    assert eager.index("--no-l1-use-lazy") < eager.index("--l1-use-lazy")
    assert "--no-l1-use-lazy" not in runner._server("kvhive", 1, "t").argv()
    runner.client_python = "/nonexistent/bin/python"  # argv only: nothing is started
    assert "--no-l1-use-lazy" not in runner._server("reference", 1, "t", eager_l1=True).argv()
