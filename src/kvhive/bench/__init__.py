"""``kvhive bench``: how close kvhive comes to this machine's memcpy, and how far ahead of
``lmcache server`` it is, measured in one run.

Python API::

    from kvhive.bench import BenchConfig, run_bench

    report = run_bench(BenchConfig(vs_reference=True))
    print(report.table())
    report.write_json("bench.json")
    report.row("transfer/lmcache/lmcache_driven/32L-8H-128D/store/16").vs_memcpy

Building blocks: :mod:`kvhive.bench.servers` (server subprocesses, start-to-healthy time),
:mod:`kvhive.bench.kvengine` (a fake engine with shared-memory KV caches on kvhive's client),
:mod:`kvhive.bench.kvload` / :mod:`kvhive.bench.lmload` (load through kvhive's client / the
real lmcache 0.5.6 adapters in the client venv), :mod:`kvhive.bench.report`.
"""

from typing import Any

from kvhive.bench.config import SHAPES, BenchConfig, KVShape

_LAZY = {
    "BenchReport": "kvhive.bench.report",
    "Row": "kvhive.bench.report",
    "Target": "kvhive.bench.report",
    "default_targets": "kvhive.bench.runner",
    "measure_memcpy": "kvhive.bench.runner",
    "run_bench": "kvhive.bench.runner",
}


def __getattr__(name: str) -> Any:
    """The runner and report load on first use: ``kvhive server`` imports this package only
    for the CLI's argument table."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = [
    "SHAPES",
    "BenchConfig",
    "KVShape",
    "BenchReport",
    "Row",
    "Target",
    "default_targets",
    "measure_memcpy",
    "run_bench",
]
