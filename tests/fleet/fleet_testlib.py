"""Helpers of the fleet tests (imported by name: each test folder has its own conftest).

kvhive servers, a Mooncake master, moto and the real lmcache 0.5.6 client driver, each run
inside one node of a :class:`support.fleet.Fleet`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvhive.bench.servers import ServerProcess, subprocess_env
from support.fleet import Fleet, Node
from support.require import services_required, unavailable  # noqa: F401 - re-exported

REPO = Path(__file__).resolve().parents[2]
DRIVERS = REPO / "tests" / "interop" / "drivers"
RESULT_MARK = "@@KVHIVE_INTEROP_RESULT@@ "
MASTER_BIN = Path(sys.executable).parent / "mooncake_master"
MiB = 1 << 20
SEGMENT = 256 * MiB
RPC_PORT, HTTP_PORT = 5555, 8080
MASTER_PORT, MASTER_METRICS_PORT = 50051, 9003
MOTO_PORT = 5000
#: The driver's KV shape in these tests: 16 layers x 4 heads x 64 x bf16, 256-token chunks:
#: 2 * 16 * 4 * 64 * 256 * 2 bytes = 4 MiB per chunk.
LAYERS = 16
CHUNK_BYTES = 2 * LAYERS * 4 * 64 * 256 * 2

#: The ``make_fleet`` fixture: ``make_fleet(["m", "a", "b"])``.
MakeFleet = Callable[[Sequence[str]], Fleet]


@dataclass
class NodeServer(ServerProcess):
    """``kvhive server`` inside ``node``, listening on all of the node's interfaces (its
    veth address and its own loopback, where a co-located engine dials); the test reaches it
    from inside the node (:meth:`Node.call`)."""

    node: Node | None = None

    def __post_init__(self) -> None:
        self.rpc_port = self.rpc_port or RPC_PORT
        self.http_port = self.http_port or HTTP_PORT
        super().__post_init__()

    @property
    def where(self) -> Node:
        assert self.node is not None
        return self.node

    def argv(self) -> list[str]:
        argv = super().argv()
        for flag in ("--host", "--http-host"):
            argv[argv.index(flag) + 1] = "0.0.0.0"
        return self.where.argv(argv)

    @property
    def rpc_url(self) -> str:
        return f"tcp://{self.where.addr}:{self.rpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.where.addr}:{self.http_port}"

    def start(self, timeout_s: float = 60.0, poll_s: float = 0.1) -> float:
        try:
            return super().start(timeout_s, poll_s)
        finally:
            if self.proc is not None:
                self.where.adopt(self.proc)

    def healthy(self, timeout: float = 1.0) -> bool:
        try:
            self.where.http(self.http_url + "/healthcheck", timeout_s=timeout)
            return True
        except (OSError, urllib.error.URLError, ValueError, TimeoutError):
            return False

    def get_json(self, path: str, timeout: float = 5.0) -> Any:
        return self.where.http(self.http_url + path, timeout_s=timeout)


def start_kvhive(node: Node, log_dir: Path, tiers: list[dict[str, Any]], *extra: str,
                 l1_size_gb: float = 0.5, tag: str = "") -> NodeServer:  # fmt: skip
    args = [a for tier in tiers for a in ("--l2-adapter", json.dumps(tier))] + list(extra)
    server = NodeServer("kvhive", l1_size_gb, args, node=node,
                        log_path=log_dir / f"kvhive-{node.name}{tag}.log")  # fmt: skip
    server.start()
    return server


class Master:
    """``mooncake_master`` inside ``node``, on its address (ports kept across restarts)."""

    def __init__(self, node: Node, log_dir: Path, *flags: str) -> None:
        self.node, self.log_dir, self.flags = node, log_dir, list(flags)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def addr(self) -> str:
        return f"{self.node.addr}:{MASTER_PORT}"

    def start(self) -> float:
        self.starts += 1
        t0 = time.monotonic()
        argv = [str(MASTER_BIN), f"--rpc_address={self.node.addr}", f"--rpc_port={MASTER_PORT}",
                f"--metrics_host={self.node.addr}", f"--metrics_port={MASTER_METRICS_PORT}",
                "--logtostderr=true", *self.flags]  # fmt: skip
        log = self.log_dir / f"master-{self.starts}.log"
        self.proc = self.node.popen(argv, log_path=log)
        self.node.wait_port(MASTER_PORT, proc=self.proc, what="mooncake_master")
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.proc is not None:
            self.node.stop(self.proc)

    def metrics(self) -> str:
        url = f"http://{self.node.addr}:{MASTER_METRICS_PORT}/metrics"
        return str(self.node.call(lambda: urllib.request.urlopen(url, timeout=5).read().decode()))


def mooncake_tier(node: Node, master: Master, segment: int = SEGMENT) -> dict[str, Any]:
    """A ``mooncake_store`` tier for a kvhive in ``node``: its own segment, advertised on the
    node's address (P2PHANDSHAKE: no metadata server)."""
    return {
        "type": "mooncake_store",
        "local_hostname": node.addr,
        "metadata_server": "P2PHANDSHAKE",
        "protocol": "tcp",
        "rdma_devices": "",
        "global_segment_size": str(segment),
        "local_buffer_size": str(64 * MiB),
        "master_server_addr": master.addr,
    }


def start_moto(node: Node, log_dir: Path, bucket: str = "kvhive") -> str:
    """moto's S3 server inside ``node`` with one bucket; its path-style endpoint."""
    proc = node.popen([sys.executable, "-m", "moto.server", "-H", node.addr, "-p", str(MOTO_PORT)],
                      log_path=log_dir / "moto.log", env=subprocess_env())  # fmt: skip
    node.wait_port(MOTO_PORT, proc=proc, what="moto")
    endpoint = f"http://{node.addr}:{MOTO_PORT}/{bucket}"
    node.http(endpoint, method="PUT")
    return endpoint


def s3_tier(endpoint: str) -> dict[str, Any]:
    return {"type": "s3", "s3_endpoint": endpoint, "s3_region": "us-east-1",
            "disable_tls": True, "aws_access_key_id": "test", "aws_secret_access_key": "test",
            "s3_num_io_threads": 2, "s3_addressing_style": "path"}  # fmt: skip


@dataclass
class Drive:
    result: dict[str, Any]
    seconds: float
    stdout: str
    stderr: str

    def __getitem__(self, key: str) -> Any:
        return self.result[key]


def drive(client_python: str, server: NodeServer, *extra: str, chunks: int,
          timeout_s: float = 240.0) -> Drive:  # fmt: skip
    """The lmcache 0.5.6 client driver (``tests/interop/drivers/l2.py``) in the server's
    node, against the server's node address."""
    argv = [client_python, str(DRIVERS / "l2.py"), "--url", server.rpc_url, "--http",
            server.http_url, "--chunks", str(chunks), "--layers", str(LAYERS), *extra]  # fmt: skip
    t0 = time.monotonic()
    try:
        proc = server.where.run(argv, timeout_s=timeout_s, cwd=DRIVERS, env=subprocess_env())
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"driver in node {server.where.name} timed out after {timeout_s}s "
                    f"(a hang)\n{exc.stdout!s}\n{exc.stderr!s}\n--- server ---\n{server.log_tail()}",
                    pytrace=False)  # fmt: skip
    seconds = time.monotonic() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"driver failed in node {server.where.name} (rc={proc.returncode})\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n--- server ---\n"
                    f"{server.log_tail()}", pytrace=False)  # fmt: skip
    return Drive(dict(json.loads(lines[-1][len(RESULT_MARK) :])), seconds, proc.stdout, proc.stderr)


@dataclass(frozen=True, slots=True)
class Handover:
    """A stores ``chunks`` through its kvhive, then B (which never stored them) loads them
    through its own: the two driver runs and the veth byte counts of the nodes watched."""

    stored: Drive
    loaded: Drive
    store_bytes: dict[str, int]  # counters of ``watch_store`` over the store
    load_bytes: dict[str, int]  # counters of B's node over the load


def store_on_a_load_on_b(
    client_python: str, kv_a: NodeServer, kv_b: NodeServer, chunks: int, watch_store: Node
) -> Handover:
    """The shared-tier round of the fleet tests, with its common checks: A's store reached
    the tier (``l2_stored``), B's L1 was empty before its lookup and every chunk hit there,
    byte-exact."""
    before = watch_store.counters()
    stored = drive(client_python, kv_a, "--phase", "store", chunks=chunks)
    store_bytes = delta(before, watch_store.counters())
    assert stored["store_ok"] is True and stored["l2_stored"] == [chunks], stored.result
    before = kv_b.where.counters()
    loaded = drive(client_python, kv_b, "--phase", "load", "--no-clear", chunks=chunks)
    load_bytes = delta(before, kv_b.where.counters())
    assert loaded["l1_objects_before_lookup"] == 0
    assert loaded["hit_chunks"] == chunks, loaded.result
    assert loaded["retrieve_ok"] is True and loaded["bytes_equal"] is True, loaded.result
    return Handover(stored, loaded, store_bytes, load_bytes)


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in before}


def report(name: str, **figures: Any) -> None:
    """One line of measured figures, shown with ``-s`` and kept in the report's sections."""
    print(f"[fleet] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def start_cluster(node: Node, log_dir: Path, node_timeout_ms: int = 1500) -> Any:
    """A Redis/Valkey Cluster (3 masters + 3 replicas, ``tests/support/redis_cluster.py``)
    inside ``node``, every server bound to and announcing the node's address.  Built on a
    thread inside the node (the launcher checks its ports there, and its children start
    there); ``redis-server``/``redis-cli`` run under ``ip netns exec`` for later calls."""
    from support.redis_cluster import LocalCluster, binaries

    if binaries() is None:
        unavailable("redis-server/redis-cli (or valkey-*) are not installed")
    try:
        import redis  # noqa: F401
    except ImportError as exc:
        unavailable(f"redis-py is not installed ({exc}): pip install 'kvhive[redis]'")
    workdir = log_dir / "cluster"
    workdir.mkdir()
    return node.call(
        lambda: LocalCluster(
            host=node.addr,
            workdir=workdir,
            argv_prefix=node.argv([]),
            node_timeout_ms=node_timeout_ms,
        ),
        timeout_s=90,
    )


def valkey_tier(cluster: Any) -> dict[str, Any]:
    return {"type": "valkey", "startup_nodes": cluster.startup_nodes, "cluster_mode": True}


def wait_written_behind(server: NodeServer, chunks: int, timeout_s: float = 60.0) -> dict[str, Any]:
    """Until the server's L2 write-behind is idle with ``chunks`` objects stored in its first
    tier; its status then."""
    deadline = time.monotonic() + timeout_s
    while True:
        status: dict[str, Any] = server.status()
        lanes = status["l2"]["store"]["lanes"].values()
        idle = all(lane["pending"] == 0 and lane["running_tasks"] == 0 for lane in lanes)
        if idle and status["l2"]["adapters"][0]["stored"] >= chunks:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"write-behind not done in {timeout_s}s: {status['l2']}")
        time.sleep(0.2)
