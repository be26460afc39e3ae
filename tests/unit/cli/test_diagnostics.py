"""--enable-gc-monitor and --enable-extra-logging (kvhive.cli.diagnostics)."""

from __future__ import annotations

import gc
import logging
from typing import Any

import pytest

from kvhive.cli.diagnostics import Diagnostics, ExtraLogging, GcMonitor
from kvhive.config import ObservabilityConfig


class Junk:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the collector frees it


def test_gc_monitor_logs_collections_with_the_top_object_types(
    caplog: pytest.LogCaptureFixture,
) -> None:
    monitor = GcMonitor(min_pause_ms=0.0, top_objects=3)
    monitor.start()
    try:
        with caplog.at_level(logging.INFO, logger="kvhive.diagnostics"):
            keep = [Junk() for _ in range(2000)]
            gc.collect(0)
            gc.collect()
    finally:
        monitor.stop()
    del keep
    lines = [r.getMessage() for r in caplog.records if r.name == "kvhive.diagnostics"]
    assert monitor.logged >= 2 and len(lines) == monitor.logged
    assert any(line.startswith("gc: generation 2 took ") for line in lines)
    assert all("; top objects: " in line for line in lines)
    assert monitor._callback not in gc.callbacks


def test_gc_monitor_skips_short_pauses(caplog: pytest.LogCaptureFixture) -> None:
    monitor = GcMonitor(min_pause_ms=60_000.0)
    monitor.start()
    monitor.start()  # once only
    try:
        assert gc.callbacks.count(monitor._callback) == 1
        with caplog.at_level(logging.INFO, logger="kvhive.diagnostics"):
            gc.collect()
    finally:
        monitor.stop()
    assert monitor.logged == 0 and not caplog.records


def test_extra_logging_reports_deltas_and_l1_usage(caplog: pytest.LogCaptureFixture) -> None:
    status: dict[str, Any] = {
        "counters": {"stored_chunks": 10, "retrieved_chunks": 4},
        "l1": {"used_bytes": 1 << 29, "configured_bytes": 1 << 30, "usage": 0.5, "objects": 7},
    }
    extra = ExtraLogging(lambda: status, interval=0.01)
    assert extra.interval == 1.0  # at most one line a second
    with caplog.at_level(logging.INFO, logger="kvhive.diagnostics"):
        first = extra.log_once()
        status["counters"] = {"stored_chunks": 25, "retrieved_chunks": 4}
        second = extra.log_once()
    assert (
        first.startswith("stored 0 chunks") and "L1 0.500 of 1.000 GiB (50.0%), 7 objects" in first
    )
    assert second.startswith("stored 15 chunks") and "retrieved 0 chunks" in second
    assert [r.getMessage() for r in caplog.records] == [
        f"extra logging: {first}",
        f"extra logging: {second}",
    ]


def test_extra_logging_thread_starts_and_stops() -> None:
    extra = ExtraLogging(dict, interval=1.0)
    extra.start()
    extra.stop()
    assert not extra._thread.is_alive()


def test_diagnostics_follow_the_config() -> None:
    off = Diagnostics(ObservabilityConfig(), dict)
    assert off.gc is None and off.extra is None
    off.start()
    off.stop()
    on = Diagnostics(
        ObservabilityConfig(
            enable_gc_monitor=True,
            gc_monitor_min_pause_ms=5.0,
            gc_monitor_top_objects=2,
            enable_extra_logging=True,
            extra_logging_interval=30.0,
        ),
        dict,
    )
    assert on.gc is not None and (on.gc.min_pause_s, on.gc.top_objects) == (0.005, 2)
    assert on.extra is not None and on.extra.interval == 30.0
    on.start()
    on.stop()
    assert on.gc._callback not in gc.callbacks
