"""``kvhive bench``: runs every section against ``kvhive server`` (and, with ``vs_reference``,
against ``lmcache server``, one server at a time on other ports) and builds the report.

Sections (in run order):

* ``memcpy``      this machine's plain copy bandwidth (32 MiB chunks, no cache reuse);
* ``healthy``     server start to first ``200`` from ``/healthcheck``, per L1 size;
* ``engine``      the engine's own access (the headline figures, ``bench/engine_section.py``):
                  a fresh block table per request drawn across the whole KV cache, lookup
                  before retrieve, cold (blocks the server never touched) and warm, 1 and
                  16 chunks per request, server page faults per chunk; read against plain
                  and first-touch memcpy;
* ``transfer``    store / retrieve GB/s per client, mode and shape, 1 engine, 1 and N chunks
                  per request, the same blocks every time ("warm blocks");
* ``concurrency`` the same with several engines at once (N chunks per request);
* ``lookup``      lookup latency for 1 / 64 / 400-chunk prefixes, hit and miss, with 0.5.6
                  keys (``token_ids``) and, against kvhive, 0.5.7 keys (``token_bytes``);
* ``noop``        the empty round trip, timed alongside a bare pyzmq echo (the floor);
* ``l2``          write / read GB/s of 32 MiB objects through each L2 adapter, next to its
                  floor (dd, memcpy, a raw client of the service; ``bench/l2_section.py``);
                  needs no kvhive server;
* ``cuda``        GPU engines (``cuda`` IPC descriptors, 1 / 2 / 4 engines) storing and
                  retrieving through kvhive, next to pinned cudaMemcpy D2H / H2D
                  (``bench/cuda_section.py``); skipped with one line without a CUDA device.

Every load measurement runs against a server started for it alone, once its memory has
settled (see ``BenchRunner._measure``); start-up is timed separately, in ``healthy``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

import kvhive
from kvhive.bench import cuda_section, engine_section, kvload, l2_section, lmload
from kvhive.bench.config import BIG, SHAPES, BenchConfig
from kvhive.bench.report import BenchReport, Target
from kvhive.bench.servers import Kind, ServerProcess, free_port, subprocess_env

Progress = Callable[[str], None]


class BenchSetupError(RuntimeError):
    """The run cannot start (e.g. --vs-reference without the lmcache client venv)."""


def stderr_progress() -> Progress:
    t0 = time.monotonic()

    def say(msg: str) -> None:
        sys.stderr.write(f"[bench +{time.monotonic() - t0:6.1f}s] {msg}\n")
        sys.stderr.flush()

    return say


def measure_memcpy(chunk_mib: int = 32, chunks: int = 16, reps: int = 3) -> float:
    """GB/s of ``np.copyto`` of ``chunk_mib`` MiB chunks, each from and to a fresh place in
    two ``chunks x chunk_mib`` buffers (no cache reuse, as in a store or retrieve); median."""
    n = chunk_mib << 20
    src = np.ones(chunks * n, dtype=np.uint8)
    dst = np.zeros_like(src)
    np.copyto(dst, src)  # fault every page in before timing
    times = []
    for _ in range(reps):
        for i in range(chunks):
            a, b = src[i * n : (i + 1) * n], dst[i * n : (i + 1) * n]
            t0 = time.perf_counter()
            np.copyto(b, a)
            times.append(time.perf_counter() - t0)
    return n / statistics.median(times) / 1e9


def default_targets(cfg: BenchConfig) -> list[Target]:
    out: list[Target] = engine_section.targets(cfg) + l2_section.targets(cfg)
    for mode in cfg.modes:
        for p in (1, cfg.chunks):
            for op, vs_ref in (("store", 5.0), ("retrieve", 3.0)):
                key = f"transfer/lmcache/{mode}/{BIG}/{op}/{p}"
                what = f"{op} {p} chunk/req ({mode}, 32 MiB chunks)"
                out.append(Target(f"{what} >= 0.7x memcpy", key, "vs_memcpy", 0.7))
                out.append(Target(f"{what} >= {vs_ref:g}x reference", key, "vs_reference", vs_ref))
    out += [
        Target("lookup hit 1 chunk p50 <= 0.25 ms", "lookup/kvhive/hit/1/p50", "max", 0.25),
        Target(
            "lookup hit 1 chunk p50 <= 0.25 ms (0.5.7 keys)",
            "lookup/kvhive057/hit/1/p50",
            "max",
            0.25,
        ),
        Target(
            "lookup hit 400 chunks p50 <= 2 ms (0.5.7 keys)",
            "lookup/kvhive057/hit/400/p50",
            "max",
            2.0,
        ),
        Target("empty round trip p50 <= 0.1 ms", "noop/kvhive/p50", "max", 0.1),
    ]
    for gb in cfg.healthy_sizes_gb:
        out.append(Target(f"healthy <= 1.5 s at L1 {gb:g} GB", f"healthy/l1-{gb:g}gb", "max", 1.5))
    return out


class BenchRunner:
    def __init__(self, cfg: BenchConfig, progress: Progress | None = None) -> None:
        self.cfg = cfg
        self.say = progress or (lambda _msg: None)
        self.report = BenchReport()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.log_dir = Path(cfg.log_dir) if cfg.log_dir else None
        self.client_python: str | None = None
        self._n = 0

    # -- orchestration --------------------------------------------------------------------

    def run(self) -> BenchReport:
        cfg = self.cfg
        started = time.time()
        if self.log_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kvhive-bench-")
            self.log_dir = Path(self._tmp.name)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        needs_client = cfg.vs_reference or (
            "lmcache" in cfg.clients and {"transfer", "concurrency", "lookup"} & set(cfg.sections)
        )
        if needs_client:
            from kvhive.bench.servers import locate_client_python

            self.client_python = locate_client_python(cfg.client_python)
            if self.client_python is None:
                msg = "lmcache client venv not found (scripts/setup_client_venv.sh)"
                if cfg.vs_reference:
                    raise BenchSetupError(msg + ": --vs-reference needs it")
                self.report.errors.append(msg + "; lmcache-client sections skipped")
                self.say(msg + "; lmcache-client sections skipped")
        try:
            if "memcpy" in cfg.sections:
                self.report.memcpy_gbs = round(measure_memcpy(cfg.memcpy_mib), 3)
                self.say(f"memcpy: {self.report.memcpy_gbs:.2f} GB/s")
                if "engine" in cfg.sections:
                    ft = engine_section.measure_first_touch_memcpy(cfg.memcpy_mib)
                    self.report.memcpy_first_touch_gbs = round(ft, 3)
                    self.say(f"first-touch memcpy: {ft:.2f} GB/s")
            kinds: list[Kind] = ["kvhive", "reference"] if cfg.vs_reference else ["kvhive"]
            if "healthy" in cfg.sections:
                for kind in kinds:
                    self._healthy(kind)
            load = [
                s
                for s in ("engine", "transfer", "concurrency", "lookup", "noop")
                if s in cfg.sections
            ]
            if load:
                for kind in kinds:
                    self._load(kind, load)
            if "l2" in cfg.sections:
                l2_section.run(self)
            if "cuda" in cfg.sections:
                cuda_section.run(self)
        finally:
            self.report.meta = self._meta(started)
            if self._tmp is not None and not self.report.errors:
                self._tmp.cleanup()
        return self.report.finalize(default_targets(cfg))

    def _meta(self, started: float) -> dict[str, Any]:
        return {
            "kvhive_version": kvhive.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "processor": _cpu_model(),
            "cpus": _cpu_count(),
            "started_unix": round(started, 1),
            "duration_s": round(time.time() - started, 1),
            "argv": sys.argv,
            "config": asdict(self.cfg),
            "server_torch": importlib.util.find_spec("torch") is not None,
            "log_dir": str(self.log_dir) if self._tmp is None or self.report.errors else None,
        }

    def _server(
        self, kind: Kind, l1_size_gb: float, tag: str, eager_l1: bool = False
    ) -> ServerProcess:
        assert self.log_dir is not None
        eager = ["--no-l1-use-lazy"] if eager_l1 and kind == "kvhive" else []
        return ServerProcess(
            kind,
            l1_size_gb,
            [*eager, *self.cfg.server_args],  # the user's --server-arg comes last: it wins
            client_python=self.client_python,
            log_path=self.log_dir / f"{kind}-{tag}.log",
        )

    def _healthy(self, kind: Kind) -> None:
        for gb in self.cfg.healthy_sizes_gb:
            times = []
            for rep in range(self.cfg.healthy_reps):
                server = self._server(kind, gb, f"healthy-{gb:g}gb-{rep}")
                try:
                    times.append(server.start())
                finally:
                    server.stop()
            value = statistics.median(times)
            self.report.put(
                f"healthy/l1-{gb:g}gb", kind, round(value, 3),
                group="start-up", label=f"start to healthy, L1 {gb:g} GB (median of "
                f"{len(times)})", unit="s", better="lower",
            )  # fmt: skip
            self.say(f"{kind}: healthy after {value:.2f} s at L1 {gb:g} GB ({times})")

    def _load(self, kind: Kind, sections: Sequence[str]) -> None:
        for section in sections:
            getattr(self, f"_{section}")(kind)

    def _measure(
        self,
        kind: Kind,
        what: str,
        fn: Callable[[ServerProcess], Any],
        eager_l1: bool = False,
        wait_populated: bool = True,
    ) -> Any:
        """``fn(server)`` against a fresh server (L1 ``l1_size_gb``), stopped afterwards.

        Each measurement gets its own server: the reference stops finding anything once a
        client has unregistered (every later client's lookups miss), and a fresh server
        keeps one measurement's L1 contents out of the next one's.  Failures are recorded,
        never raised: one failed measurement must not lose the others.

        ``eager_l1``: kvhive runs with ``--no-l1-use-lazy`` and is measured once its arena is
        populated -- the reference allocates its L1 up front on CPU before it reports
        healthy, and the sections that store several GB at once into a fresh server would
        otherwise time a VM's first touch of guest memory (benchmarks/RESULTS.md).  Without
        ``wait_populated`` ``fn`` waits itself (the engine section records how long)."""
        self.say(f"{kind}: {what}")
        self._n += 1
        server = self._server(kind, self.cfg.l1_size_gb, f"load-{self._n:02d}", eager_l1)
        try:
            server.start()
            waited = server.settle()
            self.say(f"{kind}: settled {waited:.1f} s after healthy "
                     f"(RSS {server.rss_bytes() / 2**30:.2f} GiB)")  # fmt: skip
            if eager_l1 and wait_populated:
                engine_section.wait_l1_populated(server, self.say)
            return fn(server)
        except Exception as exc:  # noqa: BLE001 - measurement boundary: one failure must not lose the rest
            self.report.errors.append(f"{kind} {what}: {type(exc).__name__}: {exc}")
            self.say(f"{kind} {what} FAILED: {exc}")
            return None
        finally:
            server.stop()

    def _clients(self) -> list[str]:
        return [c for c in self.cfg.clients if c == "kvhive" or self.client_python]

    # -- sections ---------------------------------------------------------------------------

    def _engine(self, kind: Kind) -> None:
        engine_section.run(self, kind)

    def _transfer(self, kind: Kind) -> None:
        cfg = self.cfg
        for client in self._clients():
            modes = cfg.modes if client == "lmcache" else ("lmcache_driven",)
            for mode in modes:
                for shape_name in cfg.shapes:
                    res = self._measure(
                        kind,
                        f"transfer, {client} client, {mode}, {shape_name}",
                        functools.partial(self._run_transfer, client, mode, shape_name,
                                          (1, cfg.chunks), cfg.rounds, 1),
                        eager_l1=True,
                    )  # fmt: skip
                    if res:
                        self._record_transfer(kind, "transfer", client, mode, shape_name, res)

    def _concurrency(self, kind: Kind) -> None:
        cfg = self.cfg
        for client in self._clients():
            for n in cfg.engines:
                res = self._measure(
                    kind,
                    f"{n} engines, {client} client, lmcache_driven, {BIG}",
                    functools.partial(self._run_transfer, client, "lmcache_driven", BIG,
                                      (cfg.chunks,), cfg.concurrency_rounds, n),
                    eager_l1=True,
                )  # fmt: skip
                if res:
                    self._record_transfer(kind, "concurrency", client, "lmcache_driven", BIG, res)

    def _run_transfer(
        self,
        client: str,
        mode: str,
        shape_name: str,
        per_request: tuple[int, ...],
        rounds: int,
        engines: int,
        server: ServerProcess,
    ) -> dict[str, Any]:
        shape, cfg = SHAPES[shape_name], self.cfg
        model = f"bench-{client}-{mode}-{shape_name}-{engines}"
        if client == "kvhive":
            return kvload.run_transfer(
                server.rpc_url, shape, chunks=cfg.chunks, per_request=per_request,
                rounds=rounds, engines=engines, block_size=cfg.block_size, model_name=model,
                progress=self.say,
            )  # fmt: skip
        assert self.client_python is not None
        return lmload.run_transfer(
            self.client_python, server.rpc_url, shape, mode=mode, chunks=cfg.chunks,
            per_request=per_request, rounds=rounds, engines=engines,
            block_size=cfg.block_size, model_name=model, progress=self.say,
        )  # fmt: skip

    def _record_transfer(
        self, kind: Kind, group: str, client: str, mode: str, shape: str, res: dict[str, Any]
    ) -> None:
        e = res["engines"]
        mib = res["chunk_bytes"] / (1 << 20)
        for op, by_p in res["ops"].items():
            for p, f in by_p.items():
                if group == "transfer":
                    key = f"transfer/{client}/{mode}/{shape}/{op}/{p}"
                    label = f"{op} {p} chunk/req, {shape} ({mib:.1f} MiB), {client} {mode}"
                else:
                    key = f"engines/{client}/{mode}/{shape}/{op}/{p}/{e}"
                    label = f"{op} {e} engines x {p} chunk/req, {shape}, {client}"
                # A figure with failed requests (misses, failed or wrong retrieves) measured
                # something else than a copy: no value, the failures go to the errors.
                value = f["gbs"] if not f.get("failures") else None
                self.report.put(key, kind, value, group=group, label=label, unit="GB/s",
                                better="higher")  # fmt: skip
        for err in res.get("errors", [])[:5]:
            self.report.errors.append(f"{kind} {group} {client} {mode} {shape}: {err}")

    def _lookup(self, kind: Kind) -> None:
        cfg = self.cfg
        # 0.5.7 keys (token_bytes) for kvhive only: `lmcache server` 0.5.6 refuses them.
        packed = kind == "kvhive"
        res = self._measure(kind, "lookups through kvhive's client", lambda server: (
            kvload.run_lookups(server.rpc_url, prefixes=cfg.lookup_prefixes,
                               samples=cfg.lookup_samples, block_size=cfg.block_size,
                               packed=packed, progress=self.say)))  # fmt: skip
        if res:
            self._record_lookup(kind, "kvhive", "kvhive client, 0.5.6 keys, no sleeps", res)
            if "packed" in res:
                self._record_lookup(kind, "kvhive057", "kvhive client, 0.5.7 keys, no sleeps",
                                    {**res["packed"], "errors": []})  # fmt: skip
        if "lmcache" in self._clients():
            res = self._measure(kind, "lookups through the lmcache scheduler adapter",
                                lambda server: lmload.run_lookups(
                self.client_python or "", server.rpc_url, SHAPES["tiny"],
                prefixes=cfg.lookup_prefixes, samples=max(20, cfg.lookup_samples // 2),
                block_size=cfg.block_size, progress=self.say))  # fmt: skip
            if res:
                self._record_lookup(kind, "lmcache-tight", "adapter, 50 us polls", res["tight"])
                self._record_lookup(kind, "lmcache-poll", "adapter, 2 ms polls", res["poll"])
                for err in res.get("errors", [])[:5]:
                    self.report.errors.append(f"{kind} lookup (lmcache adapter): {err}")

    def _record_lookup(self, kind: Kind, client: str, how: str, res: dict[str, Any]) -> None:
        for label in ("hit", "miss"):
            for n, f in res.get(label, {}).items():
                for stat in ("p50", "p99"):
                    self.report.put(
                        f"lookup/{client}/{label}/{n}/{stat}", kind, f[f"{stat}_ms"],
                        group="lookup", label=f"lookup {label} {n} chunk(s) {stat} ({how})",
                        unit="ms", better="lower",
                    )  # fmt: skip
        for err in res.get("errors", [])[:5]:
            self.report.errors.append(f"{kind} lookup ({client}): {err}")

    def _noop(self, kind: Kind) -> None:
        port = free_port()
        echo = subprocess.Popen(
            [sys.executable, "-m", "kvhive.bench.echo", str(port)], env=subprocess_env()
        )
        try:
            res = self._measure(kind, "empty round trips", lambda server: kvload.run_noop(
                server.rpc_url, samples=self.cfg.noop_samples,
                floor_url=f"tcp://127.0.0.1:{port}", progress=self.say))  # fmt: skip
        finally:
            echo.terminate()
            echo.wait(10)
        if not res:
            return
        for stat in ("p50", "p99"):
            self.report.put(
                f"noop/kvhive/{stat}", kind, res[f"{stat}_ms"], group="round trip",
                label=f"empty round trip (noop) {stat}, kvhive client", unit="ms",
                better="lower",
            )  # fmt: skip
            self.report.put(
                f"noop/echo/{stat}", kind, res["floor"][f"{stat}_ms"], group="round trip",
                label=f"bare pyzmq echo round trip {stat} (floor), same client", unit="ms",
                better="lower", note="measured alongside this server, blocks interleaved",
            )  # fmt: skip
        if kind == "kvhive":
            self.report.echo_rtt_ms = res["floor"]["p50_ms"]


def run_bench(cfg: BenchConfig, progress: Progress | None = None) -> BenchReport:
    """Run the benchmark described by ``cfg``; returns the finalized report."""
    return BenchRunner(cfg, progress).run()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


__all__ = [
    "BenchConfig",
    "BenchSetupError",
    "BenchRunner",
    "default_targets",
    "measure_memcpy",
    "run_bench",
]
