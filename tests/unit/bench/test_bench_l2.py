"""The ``l2`` section: adapters that need no service (fs, fs_native, dax on tmpfs, mock, NIXL
POSIX when importable) timed beside their floors; rows, floors and ratios present and sane;
skips carry a reason; the report renders and round-trips the new fields."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from kvhive.bench import BenchConfig, run_bench
from kvhive.bench.config import L2_TIERS
from kvhive.bench.l2_floors import DdMover, MemcpyMover, drop_cache
from kvhive.bench.l2_measure import AdapterMover, Arena, measure_pair
from kvhive.bench.l2_section import TIERS, targets
from kvhive.bench.report import BenchReport
from kvhive.cli.main import main

pytestmark = pytest.mark.timeout(240)

MIB = 4
LOCAL = ["fs", "fs_odirect", "fs_native", "dax", "mock"]
NIXL = importlib.util.find_spec("nixl_cu12") is not None


def _tmpfs() -> str | None:
    return "/dev/shm" if os.path.isdir("/dev/shm") else None


def test_catalog_names_every_tier_once() -> None:
    assert tuple(TIERS) == L2_TIERS
    names = [t.name for t in targets(BenchConfig(sections=("l2",)))]
    assert len(names) == len(set(names))
    # services carry no 0.8x target: their floors are other programs' clients
    assert not any("resp" in n or "s3" in n or "mooncake" in n for n in names)


def test_dd_floor_times_its_own_copy(tmp_path: Path) -> None:
    dd = DdMover(tmp_path, MIB << 20, direct=False, bs=1 << 20)
    for i in range(2):
        assert dd.write(i) > 0 and dd.read(i) > 0
    assert (tmp_path / "dd-0.bin").stat().st_size == MIB << 20
    cold = dd.read_cold(0)
    assert cold is not None and cold > 0
    dd.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError):
        DdMover(tmp_path, 3 << 20, direct=False, bs=2 << 20)


def test_pair_verifies_bytes_and_reports_both_sides(tmp_path: Path) -> None:
    arena = Arena(MIB << 20)
    tier = AdapterMover({"type": "fs", "base_path": str(tmp_path)}, arena,
                        lambda: drop_cache(tmp_path))  # fmt: skip
    floor = DdMover(tmp_path, MIB << 20, direct=False, bs=1 << 20)
    mem = MemcpyMover(arena, tmp_path)
    try:
        res = measure_pair(tier, floor, 2, cold=True)
        hot = measure_pair(tier, mem, 2, cold=True)
    finally:
        tier.close()
        floor.close()
        mem.close()
    assert res.verified and hot.verified and res.reps == 2
    assert res.tier.read_cold_gbs is not None and res.tier.read_cold_gbs > 0
    assert res.floor.read_cold_gbs is not None and res.floor.read_cold_gbs > 0
    assert hot.tier.read_cold_gbs is None  # memcpy has no cold read: none on either side
    assert np.array_equal(arena.dst(1), arena.src(1))
    arena.close()


def test_section_rows_floors_and_ratios(tmp_path: Path) -> None:
    tiers = tuple(LOCAL + (["nixl_posix", "nixl_posix_dynamic"] if NIXL else []))
    cfg = BenchConfig(sections=("l2",), l2_tiers=tiers, l2_reps=2, l2_object_mib=MIB,
                      l2_dir=str(tmp_path), l2_tmpfs_dir=_tmpfs(), l2_warm_mib=16)  # fmt: skip
    report = run_bench(cfg)
    assert report.errors == []
    assert list(tmp_path.iterdir()) == []  # the section's directory is removed
    for name in tiers:
        if name == "dax" and _tmpfs() is None:
            continue
        for variant in ("", "/raw") if TIERS[name].frames else ("",):
            for op in ("write", "read"):
                row = report.row(f"l2/{name}{variant}/{op}")
                assert row is not None, (name, variant, op)
                assert row.kvhive is not None and row.kvhive > 0
                assert row.floor is not None and row.floor > 0
                assert row.vs_floor == pytest.approx(row.kvhive / row.floor, rel=1e-3, abs=1e-4)
                assert 0.001 < row.vs_floor < 1000
        cold = report.row(f"l2/{name}/read_cold")
        buffered_file = TIERS[name].kind == "file" and not TIERS[name].direct
        assert (cold is not None) == buffered_file, name
    # the targets are on the measured default-integrity rows
    checked = {t.row: t for t in report.targets if t.kind == "vs_floor"}
    assert checked["l2/fs/write"].measured == report.row("l2/fs/write").vs_floor  # type: ignore[union-attr]
    assert checked["l2/mock/read"].ok is not None
    text = report.table()
    assert "x floor" in text and "dd bs=" in text and "memcpy" in text


def test_missing_service_or_module_is_a_skip_with_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server, no unshare
    cfg = BenchConfig(sections=("l2",), l2_tiers=("resp", "mooncake"), l2_reps=1,
                      l2_object_mib=MIB, l2_dir=str(tmp_path), l2_warm_mib=0)  # fmt: skip
    report = run_bench(cfg)
    assert report.errors == []
    assert not [r for r in report.rows if r.key.startswith("l2/")]
    assert any("resp" in s and "redis-server" in s for s in report.skipped)
    assert any("mooncake" in s for s in report.skipped)
    assert "skipped:" in report.table()


def test_report_round_trips_floors_and_skips(tmp_path: Path) -> None:
    r = BenchReport()
    r.put("l2/fs/write", "kvhive", 2.0, group="l2", label="fs write", unit="GB/s",
          better="higher", floor=4.0)  # fmt: skip
    r.skipped.append("l2 s3 (default): moto.server is not installed")
    r.finalize(targets(BenchConfig(sections=("l2",), l2_tiers=("fs",))))
    assert r.row("l2/fs/write").vs_floor == pytest.approx(0.5)  # type: ignore[union-attr]
    assert [t.ok for t in r.targets] == [False, None]  # write measured, read not
    path = tmp_path / "r.json"
    r.write_json(path)
    back = BenchReport.read_json(path)
    assert back.row("l2/fs/write").floor == 4.0  # type: ignore[union-attr]
    assert back.skipped == r.skipped


def test_cli_flags_reach_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    rc = main(["bench", "--sections", "l2", "--l2-tiers", "mock", "--l2-reps", "1",
               "--l2-object-mib", "4", "--l2-dir", str(tmp_path), "--no-l2-raw",
               "--no-l2-cold", "--l2-warm-mib", "0", "--json", str(out)])  # fmt: skip
    assert rc == 0
    report = BenchReport.read_json(out)
    cfg = report.meta["config"]
    assert cfg["l2_tiers"] == ["mock"] and cfg["l2_reps"] == 1 and cfg["l2_raw"] is False
    assert report.row("l2/mock/write") is not None
    assert "mock write" in capsys.readouterr().out
