"""The bench report: ratios come from the measured values only; targets; renderings."""

from __future__ import annotations

import json
import sys

import pytest

from kvhive.bench.config import BenchConfig
from kvhive.bench.kvload import latency_summary, percentile_ms, transfer_figures
from kvhive.bench.report import BenchReport, Target
from kvhive.bench.runner import default_targets
from kvhive.cli.main import main

KEY = "transfer/lmcache/lmcache_driven/32L-8H-128D/store/16"


def _report() -> BenchReport:
    r = BenchReport(memcpy_gbs=10.0)
    r.put(KEY, "kvhive", 8.0, group="transfer", label="store 16", unit="GB/s", better="higher")
    r.put(KEY, "reference", 1.25, group="transfer", label="store 16", unit="GB/s", better="higher")
    r.put("lookup/kvhive/hit/1/p50", "kvhive", 0.2, group="lookup", label="lk", unit="ms",
          better="lower")  # fmt: skip
    r.put("lookup/kvhive/hit/1/p50", "reference", 0.8, group="lookup", label="lk", unit="ms",
          better="lower")  # fmt: skip
    r.put("noop/kvhive/p50", "kvhive", 0.15, group="rt", label="noop", unit="ms", better="lower")
    return r


def test_ratios_are_computed_from_the_measured_values() -> None:
    r = _report().finalize()
    row = r.row(KEY)
    assert row is not None
    assert row.vs_memcpy == pytest.approx(8.0 / 10.0)
    assert row.reference_vs_memcpy == pytest.approx(1.25 / 10.0)
    assert row.vs_reference == pytest.approx(8.0 / 1.25)
    lk = r.row("lookup/kvhive/hit/1/p50")
    assert lk is not None and lk.vs_memcpy is None  # only bandwidth relates to memcpy
    assert lk.vs_reference == pytest.approx(0.25)
    noop = r.row("noop/kvhive/p50")
    assert noop is not None and noop.vs_reference is None  # no reference figure


def test_targets_are_checked_against_rows() -> None:
    targets = [
        Target("store >= 0.7x memcpy", KEY, "vs_memcpy", 0.7),
        Target("store >= 5x ref", KEY, "vs_reference", 5.0),
        Target("lookup <= 0.25", "lookup/kvhive/hit/1/p50", "max", 0.25),
        Target("noop <= 0.1", "noop/kvhive/p50", "max", 0.1),
        Target("absent", "healthy/l1-1gb", "max", 1.5),
    ]
    got = {t.name: t for t in _report().finalize(targets).targets}
    assert got["store >= 0.7x memcpy"].ok is True
    assert got["store >= 0.7x memcpy"].measured == pytest.approx(0.8)
    assert got["store >= 5x ref"].ok is True and got["store >= 5x ref"].measured == 6.4
    assert got["lookup <= 0.25"].ok is True
    assert got["noop <= 0.1"].ok is False and got["noop <= 0.1"].measured == 0.15
    assert got["absent"].ok is None and got["absent"].measured is None


def test_missing_memcpy_or_reference_gives_no_ratio() -> None:
    r = BenchReport()
    r.put("x", "kvhive", 3.0, group="g", label="x", unit="GB/s", better="higher")
    r.finalize()
    assert r.rows[0].vs_memcpy is None and r.rows[0].vs_reference is None


def test_dict_json_and_table(tmp_path) -> None:
    r = _report().finalize([Target("store >= 0.7x memcpy", KEY, "vs_memcpy", 0.7)])
    d = r.to_dict()
    assert set(d) == {
        "meta",
        "memcpy_gbs",
        "memcpy_first_touch_gbs",
        "echo_rtt_ms",
        "rows",
        "targets",
        "errors",
        "skipped",
    }
    assert {"key", "kvhive", "reference", "vs_memcpy", "vs_reference", "unit"} <= set(d["rows"][0])
    path = tmp_path / "r.json"
    r.write_json(path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(d))
    table = r.table()
    assert "memcpy (this machine, this run): 10.00 GB/s" in table
    assert "kvhive/ref" in table and "6.40" in table and "0.80" in table
    assert "store >= 0.7x memcpy" in table and "yes" in table


def test_chart_draws_a_png(tmp_path) -> None:
    r = _report().finalize()
    assert r.chart(tmp_path / "c.png") is True
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_chart_without_matplotlib_is_skipped(tmp_path, monkeypatch) -> None:
    # Stand-in for a venv without the bench extra: the import of matplotlib fails.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert _report().finalize().chart(tmp_path / "c.png") is False
    assert not (tmp_path / "c.png").exists()


def test_a_written_report_renders_again(tmp_path, capsys) -> None:
    r = _report().finalize([Target("store >= 0.7x memcpy", KEY, "vs_memcpy", 0.7)])
    r.echo_rtt_ms = 0.09
    r.write_json(tmp_path / "r.json")
    again = BenchReport.read_json(tmp_path / "r.json")
    assert again.to_dict() == r.to_dict() and again.table() == r.table()
    assert (
        main(["bench", "--render", str(tmp_path / "r.json"), "--chart", str(tmp_path / "c.png")])
        == 0
    )
    out = capsys.readouterr().out
    assert "store >= 0.7x memcpy" in out and "kvhive/ref" in out
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "bad.json").write_text('{"rows": [{"nope": 1}]}')
    assert main(["bench", "--render", str(tmp_path / "bad.json")]) == 2
    assert "not a kvhive bench report" in capsys.readouterr().err


def test_transfer_figures_one_engine_uses_the_median_request() -> None:
    spans = [(0.0, 0.010), (1.0, 1.020), (2.0, 2.030)]  # 10, 20, 30 ms
    f = transfer_figures(spans, chunk_bytes=10_000_000, per_req=2, engines=1)
    assert f["gbs"] == pytest.approx(20_000_000 / 0.020 / 1e9)
    assert f["ms_p50"] == pytest.approx(20.0)
    assert f["requests"] == 3


def test_transfer_figures_several_engines_use_the_wall_time() -> None:
    spans = [(0.0, 0.5), (0.1, 0.6), (0.5, 1.0), (0.6, 1.1)]
    f = transfer_figures(spans, chunk_bytes=1_000_000_000, per_req=1, engines=2)
    assert f["gbs"] == pytest.approx(4.0 / 1.1, rel=1e-3)


def test_percentiles() -> None:
    samples = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert percentile_ms(samples, 0.5) == pytest.approx(50.0)
    assert percentile_ms(samples, 0.99) == pytest.approx(99.0)
    assert latency_summary(samples)["n"] == 100


def test_default_targets_cover_the_issue() -> None:
    targets = default_targets(BenchConfig())
    names = [t.name for t in targets]
    transfer = [t for t in targets if t.row.startswith("transfer/") and t.kind == "vs_memcpy"]
    assert len(transfer) == 8  # 2 modes x 2 sizes x store/retrieve
    assert any("5x reference" in n for n in names) and any("3x reference" in n for n in names)
    assert "lookup hit 1 chunk p50 <= 0.25 ms" in names
    by_name = {t.name: t.row for t in targets}
    assert (
        by_name["lookup hit 400 chunks p50 <= 2 ms (0.5.7 keys)"] == "lookup/kvhive057/hit/400/p50"
    )
    assert by_name["lookup hit 1 chunk p50 <= 0.25 ms (0.5.7 keys)"] == "lookup/kvhive057/hit/1/p50"
    assert "engine/32L-8H-128D/cold/retrieve/1" in by_name.values()
    assert "empty round trip p50 <= 0.1 ms" in names
    assert "healthy <= 1.5 s at L1 16 GB" in names
