"""A fleet of "nodes" for multi-node tests: network namespaces joined by a switch.

Each node is a named network namespace (``ip netns add kvh<rand>-<node>``) with ``lo`` up and
one veth interface with a private address; the other ends of the veths hang off a bridge in
one more namespace, the "switch" (``kvh<rand>-sw``).  Traffic between nodes therefore crosses
real veth interfaces and a bridge, never one loopback, and nothing in the fleet can reach the
host's network or be reached from it (no interface of the fleet lives in the host's
namespace; the veths are created directly inside the fleet's namespaces).

* :func:`fleet_unavailable` says why a fleet cannot be made here ("" when it can);
* :class:`Fleet` (a context manager) makes the namespaces, the switch and the addresses, and
  at exit stops every process it started (their process groups, then anything still left in
  its namespaces: only its own processes can be there) and deletes its namespaces;
* :class:`Node`: ``popen``/``run`` a command inside the node (``ip netns exec``),
  ``call`` a Python function on a thread that entered the node's namespace (the test's own
  HTTP requests to a node's servers), ``wait_port``, ``counters`` of its veth.

Needs root and iproute2.  Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

T = TypeVar("T")

HINT = "needs root and ip (iproute2) with 'ip netns'"
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
_libc = ctypes.CDLL(None, use_errno=True)


def _ip(
    *args: str, timeout_s: float = 20.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL, check=False)  # fmt: skip
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"ip {' '.join(args)} failed (rc {proc.returncode}): {proc.stderr.strip()}"
        )
    return proc


def fleet_unavailable() -> str:
    """Why a fleet cannot be made here; "" when it can (a namespace is made and deleted)."""
    if os.geteuid() != 0:
        return f"not root ({HINT})"
    if shutil.which("ip") is None:
        return f"ip not found ({HINT})"
    probe = f"kvh{os.urandom(3).hex()}-probe"
    try:
        made = _ip("netns", "add", probe, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"ip netns add failed: {exc} ({HINT})"
    if made.returncode != 0:
        return f"ip netns add failed: {made.stderr.strip()} ({HINT})"
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        _ip("netns", "del", probe, check=False)
    return ""


def _used_networks() -> list[ipaddress.IPv4Network]:
    """The IPv4 networks of the host namespace's addresses and routes."""
    nets: list[ipaddress.IPv4Network] = []
    for args in (("-4", "-j", "addr", "show"), ("-4", "-j", "route", "show", "table", "all")):
        try:
            out = json.loads(_ip(*args).stdout or "[]")
        except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired):
            continue
        for entry in out:
            cands = [f"{a['local']}/{a['prefixlen']}" for a in entry.get("addr_info", [])]
            dst = entry.get("dst")
            if dst and dst != "default":
                cands.append(dst)
            for cand in cands:
                with contextlib.suppress(ValueError):
                    net = ipaddress.ip_network(cand, strict=False)
                    if isinstance(net, ipaddress.IPv4Network):
                        nets.append(net)
    return nets


def pick_subnet() -> ipaddress.IPv4Network:
    """A random 10.213.<x>.0/24 that no address or route of the host namespace overlaps."""
    used = _used_networks()
    rng = random.Random(os.urandom(8))
    for _ in range(64):
        net = ipaddress.IPv4Network(f"10.213.{rng.randrange(1, 255)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.213.x.0/24 subnet")


@dataclass
class Node:
    """One node of a :class:`Fleet`: namespace ``ns``, veth ``ifname``, address ``addr``."""

    fleet: Fleet
    name: str
    ns: str
    ifname: str
    addr: str
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    _logs: list[IO[bytes]] = field(default_factory=list, repr=False)

    def argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside this node (``ip netns exec`` execs it: same PID)."""
        return ["ip", "netns", "exec", self.ns, *map(str, argv)]

    def popen(
        self,
        argv: Sequence[str],
        *,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in this node, in a new session (stopped with its process group by
        :meth:`stop` or the fleet's exit); output to ``log_path`` (else discarded)."""
        out: IO[bytes] | None = open(log_path, "ab") if log_path else None  # noqa: SIM115
        if out is not None:
            self._logs.append(out)
        proc = subprocess.Popen(
            self.argv(argv),
            stdout=out if out is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd is not None else None,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def adopt(self, proc: subprocess.Popen[Any]) -> None:
        """Track a process started elsewhere (in this node, in its own session) for teardown."""
        self.procs.append(proc)

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout_s: float,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in this node to completion (``timeout_s``: its process group is killed
        and ``subprocess.TimeoutExpired`` raised); output captured as text."""
        proc = subprocess.Popen(
            self.argv(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd is not None else None,
            start_new_session=True,
        )
        self.procs.append(proc)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc, 0.0)
            out, err = proc.communicate(timeout=10)
            raise subprocess.TimeoutExpired(proc.args, timeout_s, out, err) from None
        finally:
            self.procs.remove(proc)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def call(self, fn: Callable[..., T], *args: Any, timeout_s: float = 30.0) -> T:
        """``fn(*args)`` on a thread that entered this node's network namespace (``setns``
        changes the calling thread only): sockets it opens live in the node."""
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                fd = os.open(NETNS_DIR / self.ns, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns({self.ns}): {os.strerror(err)}")
                finally:
                    os.close(fd)
                box["result"] = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc

        thread = threading.Thread(target=target, name=f"netns-{self.ns}", daemon=True)
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            raise TimeoutError(
                f"{getattr(fn, '__name__', fn)} in node {self.name} took over {timeout_s}s"
            )
        if "error" in box:
            raise box["error"]
        result: T = box["result"]
        return result

    def http(
        self, url: str, body: Any = None, *, method: str | None = None, timeout_s: float = 10.0
    ) -> Any:
        """An HTTP request from inside this node; the JSON answer (or None when empty)."""

        def request() -> Any:
            data = None if body is None else json.dumps(body).encode()
            req = urllib.request.Request(url, data=data, method=method or ("GET" if data is None else "POST"),
                                         headers={"content-type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                raw = resp.read()
            return json.loads(raw) if raw.strip() else None

        return self.call(request, timeout_s=timeout_s + 5)

    def can_connect(self, host: str, port: int, timeout_s: float = 0.5) -> bool:
        def probe() -> bool:
            try:
                with socket.create_connection((host, port), timeout=timeout_s):
                    return True
            except OSError:
                return False

        return self.call(probe, timeout_s=timeout_s + 5)

    def wait_port(
        self, port: int, *, host: str | None = None, timeout_s: float = 30.0,
        proc: subprocess.Popen[Any] | None = None, what: str = "server",
    ) -> None:  # fmt: skip
        """Until ``host:port`` (default: this node's address) accepts a connection from this
        node; RuntimeError when ``proc`` exits first or after ``timeout_s``."""
        host = host or self.addr
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what} in node {self.name} exited with {proc.returncode}")
            if self.can_connect(host, port):
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"{what} in node {self.name} not listening on {host}:{port} in {timeout_s}s"
        )

    def counters(self) -> dict[str, int]:
        """Byte and packet counters of this node's veth (``rx_bytes``, ``tx_bytes``, ...)."""
        out = json.loads(_ip("-n", self.ns, "-s", "-j", "link", "show", "dev", self.ifname).stdout)
        stats = out[0]["stats64"]
        return {f"{d}_{k}": int(stats[d][k]) for d in ("rx", "tx") for k in ("bytes", "packets")}

    def stop(self, proc: subprocess.Popen[Any], grace_s: float = 10.0) -> int | None:
        """SIGTERM ``proc``'s process group, SIGKILL after ``grace_s``; its exit status."""
        _kill_group(proc, grace_s)
        return proc.returncode

    def kill(self, proc: subprocess.Popen[Any]) -> None:
        """SIGKILL ``proc``'s process group at once (a node dying)."""
        _kill_group(proc, 0.0)

    def stop_all(self, grace_s: float = 5.0) -> None:
        for proc in reversed(self.procs):
            _kill_group(proc, grace_s)
        self.procs.clear()
        for log in self._logs:
            with contextlib.suppress(OSError):
                log.close()
        self._logs.clear()


def _kill_group(proc: subprocess.Popen[Any], grace_s: float) -> None:
    """Signal the group ``proc`` leads (its own session) while ``proc`` is alive: afterwards
    the group id could belong to someone else."""
    if proc.poll() is not None:
        return
    if grace_s > 0:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


class Fleet:
    """``with Fleet(["m", "a", "b"]) as fleet: fleet["a"].popen(...)``.

    Node ``i`` (in the order given) gets address ``subnet[i + 1]`` (``subnet``: a free
    ``10.213.x.0/24`` unless given).  Names: namespaces ``kvh<6 hex>-<node>`` and
    ``kvh<6 hex>-sw``, interfaces ``kvh<6 hex><node>`` (node side) and ``kvh<6 hex><node>s``
    (switch side), bridge ``kvh<6 hex>br``; node names are 1-3 lowercase letters or digits.
    """

    def __init__(self, nodes: Sequence[str], *, subnet: str | None = None) -> None:
        if len(set(nodes)) != len(nodes) or not nodes:
            raise ValueError(f"node names must be distinct and present: {nodes}")
        for name in nodes:
            if not re.fullmatch(r"[a-z0-9]{1,3}", name):
                raise ValueError(f"node name {name!r}: 1-3 lowercase letters or digits")
        self.tag = f"kvh{os.urandom(3).hex()}"
        self.names = list(nodes)
        self.subnet = ipaddress.IPv4Network(subnet) if subnet else pick_subnet()
        self.switch_ns = f"{self.tag}-sw"
        self.bridge = f"{self.tag}br"
        self.nodes: dict[str, Node] = {}
        self._made: list[str] = []

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def __enter__(self) -> Fleet:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _netns_add(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._netns_add(self.switch_ns)
        _ip("-n", self.switch_ns, "link", "add", self.bridge, "type", "bridge")
        _ip("-n", self.switch_ns, "link", "set", self.bridge, "up")
        hosts = list(self.subnet.hosts())
        for i, name in enumerate(self.names):
            ns, ifname = f"{self.tag}-{name}", f"{self.tag}{name}"
            self._netns_add(ns)
            port = f"{ifname}s"
            # Made inside the switch with its peer put straight into the node: no interface
            # of the fleet ever exists in the host's namespace.
            _ip("-n", self.switch_ns, "link", "add", port, "type", "veth",
                "peer", "name", ifname, "netns", ns)  # fmt: skip
            _ip("-n", self.switch_ns, "link", "set", port, "master", self.bridge)
            _ip("-n", self.switch_ns, "link", "set", port, "up")
            addr = str(hosts[i])
            _ip("-n", ns, "addr", "add", f"{addr}/{self.subnet.prefixlen}", "dev", ifname)
            _ip("-n", ns, "link", "set", ifname, "up")
            self.nodes[name] = Node(self, name, ns, ifname, addr)
        self._wait_reachable()

    def _wait_reachable(self, timeout_s: float = 15.0) -> None:
        """Until every node reaches every other one (a listener in each, connects from all)."""
        for target in self.nodes.values():

            def listen(host: str = target.addr) -> socket.socket:
                return socket.create_server((host, 0))

            server = target.call(listen)
            try:
                port = server.getsockname()[1]
                for source in self.nodes.values():
                    if source is target:
                        continue
                    deadline = time.monotonic() + timeout_s
                    while not source.can_connect(target.addr, port):
                        if time.monotonic() > deadline:
                            raise RuntimeError(
                                f"node {source.name} cannot reach {target.name} ({target.addr})"
                            )
                        time.sleep(0.1)
            finally:
                server.close()

    def close(self) -> None:
        """Stop every process started here, then delete this fleet's namespaces.  Idempotent."""
        for node in self.nodes.values():
            node.stop_all()
        for ns in self._made:
            _kill_leftovers(ns)
        for ns in reversed(self._made):
            with contextlib.suppress(RuntimeError, OSError, subprocess.TimeoutExpired):
                _ip("netns", "del", ns)
        self._made.clear()


def _kill_leftovers(ns: str) -> None:
    """SIGKILL what still runs in ``ns`` (a namespace this fleet made: only processes it
    started, or their children, can be in it), then wait for them to go (bounded)."""
    try:
        pids = [int(p) for p in _ip("netns", "pids", ns).stdout.split()]
    except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired):
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]
        time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True
