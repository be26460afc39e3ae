"""Logging subscriber lines, --disable-logging, and the deterministic lifecycle sampling gate."""

from __future__ import annotations

import hashlib
import logging

import pytest
from prometheus_client import CollectorRegistry

from kvhive.keys import ObjectKey
from kvhive.observability import events as ev
from kvhive.observability.metrics import MetricsSubscriber, sampled
from support.traffic import Traffic, running_server, shm_kv


def keys(n: int) -> list[ObjectKey]:
    return [ObjectKey(hashlib.sha256(b"%d" % i).digest(), "m", 0) for i in range(n)]


def test_sampling_gate_is_deterministic_and_proportional() -> None:
    ks = keys(20000)
    threshold = int(0.01 * 1_000_003)
    picked = [k for k in ks if sampled(k, threshold)]
    assert picked == [k for k in ks if sampled(k, threshold)]  # same chunks every time
    assert 100 < len(picked) < 300  # about 1 %


def observations(registry: CollectorRegistry, name: str) -> float:
    return sum(s.value for m in registry.collect() for s in m.samples if s.name == f"{name}_count")


@pytest.mark.parametrize(("rate", "expect_all"), [(1.0, True), (0.01, False)])
def test_lifecycle_histograms_are_sampled(rate: float, expect_all: bool) -> None:
    reg = CollectorRegistry()
    sub = MetricsSubscriber(reg, sample_rate=rate)
    ks = keys(1000)
    sub._l1_write(ev.L1WriteFinished(keys=ks, timestamp=100.0))
    sub._l1_read(ev.L1ReadFinished(keys=ks, timestamp=110.0))
    sub._l1_evicted(ev.L1KeysEvicted(keys=ks, timestamp=130.0))
    lifetimes = observations(reg, "lmcache_mp_l1_chunk_lifetime_seconds")
    if expect_all:
        assert lifetimes == 1000
        assert observations(reg, "lmcache_mp_l1_chunk_reuse_gap_seconds") == 1000
        assert observations(reg, "lmcache_mp_l1_chunk_idle_before_evict_seconds") == 1000
    else:
        assert 0 < lifetimes < 50
    # counters count every key regardless of sampling
    counted = sum(s.value for m in reg.collect() for s in m.samples
                  if s.name == "lmcache_mp_l1_write_chunks_total")  # fmt: skip
    assert counted == 1000


def test_logging_subscriber_writes_debug_lines(caplog: pytest.LogCaptureFixture) -> None:
    debug = caplog.at_level(logging.DEBUG, logger="kvhive.events")
    with debug, running_server() as server, shm_kv() as kv:
        traffic = Traffic(server, kv)
        try:
            traffic.round(1, "logme")
        finally:
            traffic.close()
        assert server.obs.bus.flush()
    lines = [r.getMessage() for r in caplog.records if r.name == "kvhive.events"]
    assert any(line.startswith("store end session=logme") for line in lines)
    assert any(line.startswith("lookup end session=logme found=1") for line in lines)
    assert any(line.startswith("l1.write.finished keys=1") for line in lines)


def test_disable_logging_skips_the_subscriber(caplog: pytest.LogCaptureFixture) -> None:
    debug = caplog.at_level(logging.DEBUG, logger="kvhive.events")
    with debug, running_server("--disable-logging") as server:
        server.obs.bus.publish(ev.RequestEnd(session_id="quiet"))
        assert server.obs.bus.flush()
    assert not [r for r in caplog.records if r.name == "kvhive.events"]
