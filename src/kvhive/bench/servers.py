"""Server subprocesses for the benchmark and the end-to-end tests: ``kvhive server`` (this
interpreter) or the reference ``lmcache server`` (the lmcache client venv), on free loopback
ports, with start-to-healthy timing and an ordered stop.

Every subprocess gets ``LMCACHE_TRACK_USAGE=false`` and ``DO_NOT_TRACK=1``: the reference
sends usage telemetry otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

Kind = Literal["kvhive", "reference"]

#: Environment added to every subprocess the bench starts (no telemetry, no banner).
QUIET_ENV = {
    "LMCACHE_TRACK_USAGE": "false",
    "DO_NOT_TRACK": "1",
    "LMCACHE_DISABLE_BANNER": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "PYTHONUNBUFFERED": "1",
}

_REPO = Path(__file__).resolve().parents[3]
CLIENT_SETUP_SCRIPT = _REPO / "scripts" / "setup_client_venv.sh"


def subprocess_env(**extra: str) -> dict[str, str]:
    """The current environment plus :data:`QUIET_ENV` and ``extra``."""
    env = dict(os.environ)
    env.update(QUIET_ENV)
    env.update(extra)
    return env


def free_port(exclude: tuple[int, ...] = ()) -> int:
    """A TCP port free on 127.0.0.1 right now (not in ``exclude``)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in exclude:
            return port


def locate_client_python(explicit: str | None = None) -> str | None:
    """The lmcache 0.5.6 client venv's python: ``explicit`` if given, else what
    ``scripts/setup_client_venv.sh --print-path`` reports (it never builds), else None."""
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    if not CLIENT_SETUP_SCRIPT.is_file():
        return None
    try:
        path = setup_script_python(CLIENT_SETUP_SCRIPT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return path if path is not None and os.access(path, os.X_OK) else None


def setup_script_python(setup_script: Path) -> str | None:
    """What ``bash setup_script --print-path`` reports: the last line it prints (its venv's
    python) when it exits 0, else None.  The setup scripts never build with ``--print-path``.

    Shared with the interop and end-to-end tests, which explain a missing venv in their own
    words; raises ``OSError`` or ``subprocess.TimeoutExpired`` when the script cannot be run.
    """
    proc = subprocess.run(
        ["bash", str(setup_script), "--print-path"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    return lines[-1] if proc.returncode == 0 and lines else None


def stop_process_group(proc: subprocess.Popen[Any] | None, grace_s: float) -> None:
    """SIGTERM the process group led by ``proc`` (started with ``start_new_session=True``),
    SIGKILL it after ``grace_s``.  Nothing happens once ``proc`` has exited.
    """
    # The group is signalled only while its leader (our child) is alive: afterwards the
    # group id could belong to someone else.
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class LoopbackServer:
    """Addresses and liveness of a server subprocess listening on 127.0.0.1.

    A mixin for dataclasses that have these attributes as fields (:class:`ServerProcess`).
    """

    rpc_port: int
    http_port: int
    proc: subprocess.Popen[bytes] | None

    @property
    def rpc_url(self) -> str:
        return f"tcp://127.0.0.1:{self.rpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class ServerProcess(LoopbackServer):
    """One server subprocess.  ``start()`` returns the seconds from spawn to the first
    ``200`` from ``GET /healthcheck`` (polled every ``poll_s``).

    Also the tests' server subprocess: the interop tests' server handle extends it.
    """

    kind: Kind
    l1_size_gb: float
    extra: list[str] = field(default_factory=list)
    client_python: str | None = None  # required for the reference
    log_path: Path | None = None
    rpc_port: int = 0
    http_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.rpc_port:
            self.rpc_port = free_port()
        if not self.http_port:
            self.http_port = free_port(exclude=(self.rpc_port,))
        if self.kind == "reference" and not self.client_python:
            raise ValueError("the reference server needs the lmcache client venv's python")

    def argv(self) -> list[str]:
        common = [
            "--host", "127.0.0.1",
            "--port", str(self.rpc_port),
            "--http-host", "127.0.0.1",
            "--http-port", str(self.http_port),
            "--l1-size-gb", f"{self.l1_size_gb:g}",
            "--eviction-policy", "LRU",
        ]  # fmt: skip
        if self.kind == "kvhive":
            return [sys.executable, "-m", "kvhive", "server", *common, *self.extra]
        assert self.client_python is not None
        lmcache = str(Path(self.client_python).parent / "lmcache")
        return [lmcache, "server", *common, "--supported-transfer-mode", "auto", *self.extra]

    def start(self, timeout_s: float = 60.0, poll_s: float = 0.01) -> float:
        out = self._log = open(self.log_path, "wb") if self.log_path else None  # noqa: SIM115
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            self.argv(),
            stdout=out if out is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=subprocess_env(),
            start_new_session=True,
        )
        deadline = t0 + timeout_s
        while time.perf_counter() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.kind} server exited during start-up\n{self.log_tail()}")
            if self.healthy(timeout=1.0):
                return time.perf_counter() - t0
            time.sleep(poll_s)
        self.stop()
        raise RuntimeError(f"{self.kind} server not healthy within {timeout_s}s\n{self.log_tail()}")

    def rss_bytes(self) -> int:
        """Resident memory of the server process (0 when unknown)."""
        if self.proc is None:
            return 0
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        return 0

    def settle(self, timeout_s: float = 60.0, quiet_s: float = 1.0, poll_s: float = 0.25) -> float:
        """Wait until the server's resident memory stops growing for ``quiet_s`` (kvhive
        pre-faults its whole L1 in the background after it is healthy, ~1 s per GiB here;
        measuring meanwhile would measure that too).  Returns the seconds waited."""
        t0 = time.perf_counter()
        last, since = self.rss_bytes(), time.perf_counter()
        while time.perf_counter() - t0 < timeout_s and self.alive():
            time.sleep(poll_s)
            now = self.rss_bytes()
            if now > last + (8 << 20):
                last, since = now, time.perf_counter()
            elif time.perf_counter() - since >= quiet_s:
                break
        return time.perf_counter() - t0

    def healthy(self, timeout: float = 1.0) -> bool:
        try:
            with urllib.request.urlopen(self.http_url + "/healthcheck", timeout=timeout) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def get_json(self, path: str, timeout: float = 5.0) -> Any:
        with urllib.request.urlopen(self.http_url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def status(self) -> dict[str, Any]:
        body = self.get_json("/status")
        assert isinstance(body, dict), body
        return body

    def log_tail(self, lines: int = 80) -> str:
        if self.log_path is None:
            return "<no log>"
        if self._log is not None:
            self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"<cannot read {self.log_path}: {exc}>"
        return f"$ {' '.join(self.argv())}\n" + "\n".join(text[-lines:])

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace_s``.  Idempotent."""
        stop_process_group(self.proc, grace_s)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
