"""The ``engine`` section of ``kvhive bench``: the engine's access pattern (fresh block
tables, lookup before retrieve, cold and warm; :mod:`kvhive.bench.engineload`) per shape,
its rows and targets, and the first-touch memcpy floor it is read against."""

from __future__ import annotations

import contextlib
import mmap
import os
import statistics
import subprocess
import sys
import time
from _posixshmem import shm_open, shm_unlink
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from kvhive.bench import engine_floor, engineload
from kvhive.bench.config import BIG, SHAPES, BenchConfig
from kvhive.bench.report import Target
from kvhive.bench.servers import free_port, subprocess_env

if TYPE_CHECKING:
    from kvhive.bench.runner import BenchRunner
    from kvhive.bench.servers import Kind, ServerProcess

GROUP = "engine pattern (fresh block tables per request, lookup -> retrieve)"
SMALL = "smollm2-135m"


def measure_first_touch_memcpy(chunk_mib: int = 32, chunks: int = 8) -> float:
    """GB/s of ``np.copyto`` of ``chunk_mib`` MiB into pages of a shared-memory segment that
    exist (another mapping wrote them) but that this mapping never touched: what a server
    pays per retrieve into an engine's blocks it has not mapped in yet; median."""
    n = chunk_mib << 20
    name = f"/kvhive_bench_ft_{os.getpid()}_{time.monotonic_ns()}"
    fd = shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
    try:
        os.ftruncate(fd, chunks * n)
        with mmap.mmap(fd, chunks * n) as owner:
            np.frombuffer(owner, np.uint8).fill(1)  # the engine wrote its cache
            src = np.ones(n, np.uint8)
            with mmap.mmap(fd, chunks * n) as fresh:
                dst = np.frombuffer(fresh, np.uint8)
                times = []
                for i in range(chunks):
                    t0 = time.perf_counter()
                    np.copyto(dst[i * n : (i + 1) * n], src)
                    times.append(time.perf_counter() - t0)
                del dst
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            shm_unlink(name)
    return n / statistics.median(times) / 1e9


def run(runner: BenchRunner, kind: Kind) -> None:
    """Measure every ``cfg.engine_shapes`` shape against a fresh ``kind`` server, and its
    floor (:mod:`kvhive.bench.engine_floor`) against a bare echo in the same run."""
    port = free_port()
    echo = subprocess.Popen(
        [sys.executable, "-m", "kvhive.bench.echo", str(port)], env=subprocess_env()
    )
    try:
        _run_shapes(runner, kind, f"tcp://127.0.0.1:{port}")
    finally:
        echo.terminate()
        echo.wait(10)


def _run_shapes(runner: BenchRunner, kind: Kind, echo_url: str) -> None:
    cfg = runner.cfg
    for shape_name in cfg.engine_shapes:

        def measure(server: ServerProcess, shape_name: str = shape_name) -> dict[str, Any]:
            waited = wait_l1_populated(server, runner.say)
            res = engineload.run_engine(
                server.rpc_url, SHAPES[shape_name], cache_gib=cfg.engine_cache_gib,
                cold_requests=dict(cfg.engine_cold_requests),
                warm_requests=dict(cfg.engine_warm_requests), block_size=cfg.block_size,
                settle_s=cfg.engine_settle_s,
                server_pid=server.proc.pid if server.proc is not None else None,
                model_name=f"bench-engine-{shape_name}", progress=runner.say,
                ready=lambda: wait_l1_populated(server, runner.say, when="the warm-up pass"),
                after_warm=lambda w: engine_floor.measure_floors(
                    w, echo_url, dict(cfg.engine_warm_requests)),
            )  # fmt: skip
            res["l1_populate_wait_s"] = waited
            return res

        # An eager L1, as the reference's on CPU: the section times copies, not a VM's first
        # touch of guest memory (measure() waits for the population and records the wait).
        res = runner._measure(kind, f"engine pattern, {shape_name}", measure, eager_l1=True,
                              wait_populated=False)  # fmt: skip
        if res:
            record(runner, kind, shape_name, res)


#: How long the engine section waits for a kvhive server to populate its L1 arena.
L1_POPULATE_WAIT_S = 300.0


def wait_l1_populated(
    server: ServerProcess,
    say: Callable[[str], None],
    timeout_s: float = L1_POPULATE_WAIT_S,
    when: str = "the server was healthy",
) -> float | None:
    """Seconds spent waiting until the server's L1 arena is populated (``/status``
    ``l1_populate.pending_bytes`` reaches 0), so that the measured passes see a server that
    is ready, as one started before its engine is; None for a server without that status
    (``lmcache server``).  A server still populating after ``timeout_s`` is measured as it
    is (its stores then fault on the request path: the faults-per-chunk rows show it)."""
    t0 = time.perf_counter()
    try:
        body = server.get_json("/status")
    except (OSError, ValueError):
        return None
    populate = body.get("l1_populate") if isinstance(body, dict) else None
    if not isinstance(populate, dict):
        return None
    pending = int(populate.get("pending_bytes", 0))
    while pending and time.perf_counter() - t0 < timeout_s:
        time.sleep(0.2)
        pending = server.status()["l1_populate"]["pending_bytes"]
    waited = time.perf_counter() - t0
    say(f"L1 arena populated {waited:.1f} s after {when}"
        + (f" ({pending >> 20} MiB still pending)" if pending else ""))  # fmt: skip
    return round(waited, 2)


def record(runner: BenchRunner, kind: Kind, shape: str, res: dict[str, Any]) -> None:
    put = runner.report.put
    mib = res["chunk_bytes"] / (1 << 20)
    for phase, ops in res["phases"].items():
        for op in ("store", "retrieve"):
            for p, f in ops[op].items():
                what = f"{op} {p} chunk/req, {phase}, {shape} ({mib:.1f} MiB)"
                key = f"engine/{shape}/{phase}/{op}/{p}"
                put(key, kind, f["gbs"] if not f["failures"] else None, group=GROUP,
                    label=what, unit="GB/s", better="higher")  # fmt: skip
                if f.get("faults_per_chunk") is not None:
                    put(key + "/faults", kind, f["faults_per_chunk"], group=GROUP,
                        label=f"server page faults per chunk, {what}", unit="faults",
                        better="lower")  # fmt: skip
        for p, f in ops["lookup"].items():
            put(f"engine/{shape}/{phase}/lookup/{p}/p50", kind, f["p50_ms"], group=GROUP,
                label=f"lookup {p} chunk(s) before the retrieve, {phase}, {shape}", unit="ms",
                better="lower")  # fmt: skip
    put(f"engine/{shape}/l1_populate_wait_warm", kind, res.get("ready_after_warm_up_s"),
        group=GROUP, unit="s", better="lower",
        label=f"wait for L1 population after the warm-up pass, {shape}")  # fmt: skip
    put(f"engine/{shape}/register", kind, res.get("register_ms"), group=GROUP,
        label=f"register_kv_cache reply, {res['cache_blocks']}-block cache, {shape}",
        unit="ms", better="lower")  # fmt: skip
    put(f"engine/{shape}/l1_populate_wait", kind, res.get("l1_populate_wait_s"), group=GROUP,
        label=f"wait for the L1 arena's population after start, {shape}", unit="s",
        better="lower")  # fmt: skip
    record_floor(runner, kind, shape, res)
    for err in res.get("errors", [])[:5]:
        runner.report.errors.append(f"{kind} engine pattern {shape}: {err}")


def record_floor(runner: BenchRunner, kind: Kind, shape: str, res: dict[str, Any]) -> None:
    """The floor rows (measured in ``kind``'s run) and every row read against them."""
    floor = res.get("after_warm")
    if not floor:
        return
    put = runner.report.put
    mib = res["chunk_bytes"] / (1 << 20)
    for op, by_p in floor.items():
        for p, f in by_p.items():
            what = f"{op} {p} chunk/req, {shape} ({mib:.1f} MiB)"
            key = f"engine/{shape}/floor/{op}/{p}"
            put(key, kind, f["gbs"], group=GROUP, unit="GB/s", better="higher",
                label=f"floor: empty round trip + a memcpy per row, {what}",
                note="bench process, same client work before it")  # fmt: skip
            put(key + "/rtt", kind, f["rtt_ms_p50"], group=GROUP, unit="ms", better="lower",
                label=f"floor's empty round trip after the client's work, {what}")  # fmt: skip
            for phase, ops in res["phases"].items():
                got = ops[op].get(p)
                if got and not got["failures"] and got["ms_p50"]:
                    put(f"engine/{shape}/{phase}/{op}/{p}/vs_floor", kind,
                        round(f["ms_p50"] / got["ms_p50"], 3), group=GROUP, unit="x floor",
                        better="higher",
                        label=f"{op} {p} chunk/req, {phase}, {shape}: floor time / "
                              "server time")  # fmt: skip


def targets(cfg: BenchConfig) -> list[Target]:
    """The issue's targets on the engine pattern (cold: blocks the server never touched)."""
    if "engine" not in cfg.sections:
        return []
    out: list[Target] = []
    if BIG in cfg.engine_shapes:
        for op in ("store", "retrieve"):
            key = f"engine/{BIG}/cold/{op}/1"
            what = f"{op} 1 chunk/req, fresh blocks, 32 MiB"
            out.append(Target(f"{what} >= 0.7x memcpy", key, "vs_memcpy", 0.7))
            out.append(Target(f"{what} >= 3x reference", key, "vs_reference", 3.0))
    if SMALL in cfg.engine_shapes:
        for op in ("store", "retrieve"):
            for p, floor in ((1, 0.5), (16, 0.7)):
                key = f"engine/{SMALL}/cold/{op}/{p}"
                out.append(Target(f"{op} {p} chunk/req, fresh blocks, SmolLM2 >= {floor}x "
                                  "memcpy", key, "vs_memcpy", floor))  # fmt: skip
    return out
