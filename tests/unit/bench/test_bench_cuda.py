"""The bench's ``cuda`` section: its skip path (no CUDA device here), its descriptors, the
aggregation of engine phases and the rows; the GPU path itself runs on a GPU machine."""

from __future__ import annotations

import argparse

import msgspec
import pytest

from kvhive.bench import cuda_section as cs
from kvhive.bench.cli import add_bench_arguments, config_from_args
from kvhive.bench.config import BenchConfig
from kvhive.bench.report import BenchReport
from kvhive.bench.runner import run_bench

MiB = 1 << 20
CHUNK = 32 * MiB
FLOOR = cs.Floor(d2h_gbs=50.0, h2d_gbs=40.0)


def _cuda() -> bool:
    return cs.cuda_unavailable() == ""


@pytest.mark.skipif(_cuda(), reason="this machine has a CUDA device")
def test_without_cuda_the_section_is_one_skipped_line(tmp_path) -> None:
    seen: list[str] = []
    report = run_bench(BenchConfig(sections=("cuda",), log_dir=str(tmp_path)), seen.append)
    assert report.errors == [] and report.rows == []
    assert len(report.skipped) == 1 and report.skipped[0].startswith("cuda: no CUDA device")
    assert any("cuda: skipped" in m for m in seen)
    assert "no CUDA device" in report.table()


def test_the_cli_accepts_the_section() -> None:
    assert "cuda" in BenchConfig().sections
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    assert config_from_args(p.parse_args(["--sections", "cuda"])).sections == ("cuda",)


def test_cuda_descriptor_is_the_section_4_3_wrapper() -> None:
    share = (0, b"m" * 64, 1 << 30, 4096, b"r" * 64, 8, b"e" * 64, True)
    ext = cs.cuda_descriptor(share, dtype="bfloat16", shape=[2, 5, 16, 8, 128],
                             stride=[81920, 16384, 1024, 128, 1], storage_offset=0,
                             device_uuid="GPU-1234")  # fmt: skip
    assert ext.code == 1
    body = msgspec.msgpack.decode(ext.data)
    assert body["type"] == "cuda" and body["version"] == 1
    assert body["handle"] == list(share)  # bytes travel as bin
    assert body["metadata"] == {"dtype": "bfloat16", "shape": [2, 5, 16, 8, 128],
                                "stride": [81920, 16384, 1024, 128, 1], "storage_offset": 0,
                                "device_uuid": "GPU-1234"}  # fmt: skip
    with pytest.raises(ValueError, match="8 elements"):
        cs.cuda_descriptor(share[:7], dtype="bfloat16", shape=[1], stride=[1],
                           storage_offset=0, device_uuid="x")  # fmt: skip


def test_aggregate_spans_all_engines_wall_time_and_adds_latency_over_the_floor() -> None:
    phases = [  # two engines storing 2 requests of 1 chunk each, overlapping
        cs.Phase("store", 1, start=10.0, end=10.2, latencies=[0.001, 0.002]),
        cs.Phase("store", 1, start=10.1, end=10.4, latencies=[0.003, 0.004]),
        cs.Phase("retrieve", 16, start=20.0, end=21.0, latencies=[0.05]),
    ]
    figs = cs.aggregate(phases, engines=2, chunk_bytes=CHUNK, floor=FLOOR)
    assert [(f.op, f.per_request) for f in figs] == [("store", 1), ("retrieve", 16)]
    store, retrieve = figs
    assert store.gbs == pytest.approx(4 * CHUNK / 0.4 / 1e9)
    assert store.p50_s == pytest.approx(0.0025)
    assert store.added_ms_per_chunk == pytest.approx((0.0025 - CHUNK / 50e9) * 1e3)
    assert retrieve.gbs == pytest.approx(16 * CHUNK / 1.0 / 1e9)
    assert retrieve.added_ms_per_chunk == pytest.approx((0.05 - 16 * CHUNK / 40e9) / 16 * 1e3)


def test_a_failed_request_voids_the_figure() -> None:
    phases = [cs.Phase("store", 1, 0.0, 1.0, [0.01], failures=1)]
    (fig,) = cs.aggregate(phases, engines=1, chunk_bytes=CHUNK, floor=FLOOR)
    assert fig.gbs is None


def test_rows_carry_the_floor_of_their_direction() -> None:
    report = BenchReport()
    cs.record_floor(report, FLOOR)
    figs = [cs.OpFigure("store", 1, 4, 25.0, 0.002, 0.5),
            cs.OpFigure("retrieve", 16, 4, 30.0, 0.02, 0.4)]  # fmt: skip
    cs.record(report, figs, FLOOR, 32)
    report.finalize()
    assert report.row("cuda/floor/d2h").kvhive == 50.0
    assert report.row("cuda/floor/h2d").kvhive == 40.0
    store = report.row("cuda/4e/store/1")
    assert (store.unit, store.floor, store.vs_floor) == ("GB/s", 50.0, 0.5)
    retrieve = report.row("cuda/4e/retrieve/16")
    assert (retrieve.floor, retrieve.vs_floor) == (40.0, 0.75)
    added = report.row("cuda/4e/store/1/added_ms")
    assert (added.kvhive, added.unit, added.better) == (0.5, "ms", "lower")
    assert {r.group for r in report.rows} == {cs.GROUP}
    assert report.to_dict()["rows"]  # JSON output carries them


class NoServer:
    """Stands in for a ServerProcess that no engine reaches (the engines fail first here)."""

    rpc_url = "tcp://127.0.0.1:9"

    def status(self) -> dict:
        return {}


@pytest.mark.skipif(_cuda(), reason="this machine has a CUDA device")
def test_engines_that_cannot_start_report_why_and_never_hang_the_bench() -> None:
    seen: list[str] = []
    res = cs.run_engines(NoServer(), 2, seen.append)
    assert res["phases"] == []
    assert any(e.startswith("engine 0:") for e in res["errors"]), res["errors"]
    assert any(e.startswith("engine 1:") for e in res["errors"]), res["errors"]
