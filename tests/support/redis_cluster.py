"""A real Redis/Valkey Cluster for tests: 3 masters + 3 replicas of ``redis-server`` on loopback.

:class:`LocalCluster` starts ``shards x (replicas + 1)`` servers with
``--cluster-enabled yes`` in a temporary directory, on ports below 55536 whose cluster-bus
port (port + 10000) is free too, joins them with ``redis-cli --cluster create ...
--cluster-replicas N --cluster-yes`` and waits for ``cluster_state:ok``.  Test helpers:
:meth:`~LocalCluster.slot_of` / :meth:`~LocalCluster.master_of` (which master serves a key),
:meth:`~LocalCluster.kill` (SIGKILL one server by its PID), :meth:`~LocalCluster.wait_failover`
(a replica took over every slot of the dead master and the cluster is ``ok`` again),
:meth:`~LocalCluster.revive` (restart a killed server; it rejoins as a replica) and
:meth:`~LocalCluster.stop`.

Only ``redis-server`` and ``redis-cli`` (or ``valkey-server``/``valkey-cli``) are needed; the
cluster is driven through ``redis-cli`` so the helper works without a Python client.  ``host``
is the address every server binds and announces; ``argv_prefix`` (e.g. ``["ip", "netns",
"exec", "ns1"]``) runs the servers and ``redis-cli`` inside something else.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

BUS_OFFSET = 10000
MAX_PORT = 65535 - BUS_OFFSET  # 55535: the bus port must exist too
SLOTS = 16384


def binaries() -> tuple[str, str] | None:
    """``(server, cli)`` paths, or None when either is not installed."""
    server = shutil.which("redis-server") or shutil.which("valkey-server")
    cli = shutil.which("redis-cli") or shutil.which("valkey-cli")
    return (server, cli) if server and cli else None


def _free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_cluster_ports(n: int, host: str = "127.0.0.1", lo: int = 20000) -> list[int]:
    """``n`` ports in ``lo..55535`` that are free on ``host`` together with port + 10000."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    ports: list[int] = []
    for _ in range(2000):
        port = rng.randrange(lo, MAX_PORT + 1)
        if port in ports or port + BUS_OFFSET in ports or port - BUS_OFFSET in ports:
            continue
        if _free(host, port) and _free(host, port + BUS_OFFSET):
            ports.append(port)
            if len(ports) == n:
                return ports
    raise RuntimeError(f"found only {len(ports)} of {n} free port pairs (port, port+10000)")


def key_slot(key: str | bytes) -> int:
    """The cluster hash slot of ``key`` (CRC16-XMODEM mod 16384, ``{hash tags}`` honoured)."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc % SLOTS


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One line of ``CLUSTER NODES``: ``slots`` as ``(first, last)`` ranges (masters only)."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str
    slots: tuple[tuple[int, int], ...]

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return "fail" in self.flags or "fail?" in self.flags

    def serves(self, slot: int) -> bool:
        return any(lo <= slot <= hi for lo, hi in self.slots)


def _parse_nodes(text: str) -> list[NodeInfo]:
    nodes = []
    for line in text.strip().splitlines():
        parts = line.split()
        port = int(parts[1].split("@")[0].rsplit(":", 1)[1] or 0)
        ranges = []
        for item in parts[8:]:
            if item.startswith("["):  # a slot being migrated
                continue
            lo, _, hi = item.partition("-")
            ranges.append((int(lo), int(hi or lo)))
        flags = frozenset(parts[2].split(","))
        nodes.append(NodeInfo(parts[0], port, flags, parts[3], tuple(ranges)))
    return nodes


class LocalCluster:
    """A running cluster (module docstring); a context manager that stops it on exit."""

    def __init__(
        self,
        *,
        shards: int = 3,
        replicas: int = 1,
        host: str = "127.0.0.1",
        node_timeout_ms: int = 1500,
        workdir: str | Path | None = None,
        argv_prefix: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        wait_s: float = 30.0,
    ) -> None:
        found = binaries()
        if found is None:
            raise FileNotFoundError("redis-server/redis-cli (or valkey-*) are not installed")
        self.server_exe, self.cli_exe = found
        self.host = host
        self.prefix = list(argv_prefix)
        self.wait_s = wait_s
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="kvhive-cluster-")
        self.dir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.node_timeout_ms = node_timeout_ms
        self.extra_args = list(extra_args)
        self.ports = free_cluster_ports(shards * (replicas + 1), host)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        try:
            for port in self.ports:
                self._spawn(port)
            for port in self.ports:
                self._wait_ping(port)
            self.cli("--cluster", "create", *(f"{host}:{p}" for p in self.ports),
                     "--cluster-replicas", str(replicas), "--cluster-yes",
                     timeout=self.wait_s)  # fmt: skip
            self.wait_ok()
            self.wait_replicas()
        except BaseException:
            self.stop()
            raise

    # -- lifecycle -----------------------------------------------------------------------

    def _spawn(self, port: int) -> None:
        argv = [*self.prefix, self.server_exe, "--port", str(port), "--bind", self.host,
                "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                "--cluster-replica-validity-factor", "0", "--cluster-require-full-coverage", "no",
                "--save", "", "--appendonly", "no", "--protected-mode", "no",
                "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
                "--dir", str(self.dir), "--logfile", f"redis-{port}.log", *self.extra_args]  # fmt: skip
        self.procs[port] = subprocess.Popen(
            argv, cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def _wait_ping(self, port: int) -> None:
        deadline = time.monotonic() + self.wait_s
        while time.monotonic() < deadline:
            proc = self.procs[port]
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {port} exited with {proc.returncode}")
            with contextlib.suppress(subprocess.SubprocessError):
                if self.cli("PING", port=port, timeout=2).strip() == "PONG":
                    return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {port} did not answer PING")

    def stop(self) -> None:
        """SIGKILL every server this cluster started (by PID) and remove the work directory."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- queries -------------------------------------------------------------------------

    def cli(self, *args: str, port: int | None = None, timeout: float = 5.0) -> str:
        """Run ``redis-cli -h host -p port args...`` (any live node by default); its stdout."""
        target = port if port is not None else self.live_ports()[0]
        argv = [*self.prefix, self.cli_exe, "-h", self.host, "-p", str(target), *args]
        done = subprocess.run(argv, capture_output=True, timeout=timeout, check=True)
        return done.stdout.decode()

    @property
    def startup_nodes(self) -> str:
        """``"host:port,host:port,..."`` of every server (the adapters' ``startup_nodes``)."""
        return ",".join(f"{self.host}:{p}" for p in self.ports)

    def live_ports(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def nodes(self, port: int | None = None) -> list[NodeInfo]:
        """``CLUSTER NODES`` as seen by ``port`` (any live node by default)."""
        return _parse_nodes(self.cli("CLUSTER", "NODES", port=port))

    def state(self, port: int | None = None) -> str:
        for line in self.cli("CLUSTER", "INFO", port=port).splitlines():
            if line.startswith("cluster_state:"):
                return line.split(":", 1)[1].strip()
        return ""

    def master_of(self, key: str | bytes) -> int:
        """Port of the (non-failed) master that serves ``key``'s slot."""
        return self.master_of_slot(key_slot(key))

    def master_of_slot(self, slot: int) -> int:
        for node in self.nodes():
            if node.is_master and not node.failed and node.serves(slot):
                return node.port
        raise LookupError(f"no live master serves slot {slot}")

    def masters(self) -> list[int]:
        return sorted(n.port for n in self.nodes() if n.is_master and not n.failed and n.slots)

    # -- faults --------------------------------------------------------------------------

    def pid(self, port: int) -> int:
        return self.procs[port].pid

    def kill(self, port: int) -> None:
        """SIGKILL the server on ``port`` (by its PID) and reap it."""
        proc = self.procs[port]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)

    def wait_failover(self, dead_port: int, timeout: float | None = None) -> float:
        """Wait until every slot ``dead_port`` served is served by a live master again, on
        every live node's view, and ``cluster_state:ok``; returns the seconds waited."""
        start = time.monotonic()
        timeout = timeout or self.wait_s
        deadline = start + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.SubprocessError):
                if all(self._healed(port, dead_port) for port in self.live_ports()):
                    return time.monotonic() - start
            time.sleep(0.05)
        raise TimeoutError(f"no failover of {self.host}:{dead_port} within {timeout} s")

    def wait_promoted(self, dead_port: int, timeout: float | None = None) -> float:
        """Wait until some live node (the promoted replica first of all) sees every slot of
        ``dead_port`` served by a live master; returns the monotonic time at which the last
        poll that saw no such node began: the promotion happened after it, so until then
        no client could have been served those slots (``-inf`` when the first poll already
        saw the promotion: nothing is known then)."""
        timeout = timeout or self.wait_s
        deadline = time.monotonic() + timeout
        unpromoted_since = float("-inf")
        while time.monotonic() < deadline:
            began = time.monotonic()
            with contextlib.suppress(subprocess.SubprocessError):
                if any(self._covered(port, dead_port) for port in self.live_ports()):
                    return unpromoted_since
                unpromoted_since = began
            time.sleep(0.02)
        raise TimeoutError(f"no replica of {self.host}:{dead_port} promoted within {timeout} s")

    def _covered(self, port: int, dead_port: int) -> bool:
        """``port``'s own view: live masters other than ``dead_port`` serve every slot."""
        live = [n for n in self.nodes(port) if n.is_master and not n.failed and n.port != dead_port]
        return sum(hi - lo + 1 for n in live for lo, hi in n.slots) == SLOTS

    def _healed(self, port: int, dead_port: int) -> bool:
        return self.state(port) == "ok" and self._covered(port, dead_port)

    def wait_ok(self, timeout: float | None = None) -> None:
        """Wait until every live node reports ``cluster_state:ok``."""
        deadline = time.monotonic() + (timeout or self.wait_s)
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.SubprocessError):
                if all(self.state(p) == "ok" for p in self.live_ports()):
                    return
            time.sleep(0.05)
        raise TimeoutError(f"cluster on {self.startup_nodes} not ok within the wait")

    def wait_replicas(self, timeout: float | None = None) -> None:
        """Wait until every live replica's link to its master is up (synced), so that a
        failover keeps what was written before it."""
        deadline = time.monotonic() + (timeout or self.wait_s)
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.SubprocessError):
                infos = [self.cli("INFO", "replication", port=p) for p in self.live_ports()]
                if all("role:master" in i or "master_link_status:up" in i for i in infos):
                    return
            time.sleep(0.05)
        raise TimeoutError(f"replicas of {self.startup_nodes} not in sync within the wait")

    def revive(self, port: int) -> None:
        """Restart a killed server with its old node config: it rejoins (as a replica)."""
        if self.procs[port].poll() is None:
            raise RuntimeError(f"server on port {port} is still running")
        self._spawn(port)
        self._wait_ping(port)
        self.wait_ok()
        self.wait_replicas()


@contextlib.contextmanager
def local_cluster(**kwargs: object) -> Iterator[LocalCluster]:
    """``with local_cluster(...) as cluster``: a started :class:`LocalCluster`, stopped after."""
    cluster = LocalCluster(**kwargs)  # type: ignore[arg-type]
    try:
        yield cluster
    finally:
        cluster.stop()
