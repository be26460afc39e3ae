"""Interop fixtures: a real server subprocess plus driver scripts run in the lmcache client venv.

The server under test is ``kvhive server`` (default) or the reference
``lmcache server`` from the client venv (``KVHIVE_INTEROP_TARGET=reference``),
so every driver and assertion can be validated against the reference first.

The client venv (lmcache 0.5.6 + CPU torch) is located through
``KVHIVE_CLIENT_PYTHON`` or the cached path that ``scripts/setup_client_venv.sh``
builds. Without it the interop tests skip, unless ``KVHIVE_REQUIRE_INTEROP=1``
(set by ``.ci/run``), which turns the skip into a failure.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import queue
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kvhive.bench.servers import ServerProcess, subprocess_env
from support.net import free_port
from support.venvs import locate_venv_python, unavailable

REPO = Path(__file__).resolve().parents[2]
DRIVERS = Path(__file__).resolve().parent / "drivers"
SETUP_SCRIPT = REPO / "scripts" / "setup_client_venv.sh"
RESULT_MARK = "@@KVHIVE_INTEROP_RESULT@@ "
HEALTH_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 150

TARGETS = ("kvhive", "reference")
# Every subprocess gets kvhive.bench.servers.subprocess_env(): the reference must never phone
# home.


def interop_target() -> str:
    target = os.environ.get("KVHIVE_INTEROP_TARGET", "kvhive").strip().lower()
    if target not in TARGETS:
        raise pytest.UsageError(f"KVHIVE_INTEROP_TARGET must be one of {TARGETS}, got {target!r}")
    return target


# ---------------------------------------------------------------------------
# Failure context: server logs and driver output are attached to failing tests.
# ---------------------------------------------------------------------------


def _attach(request: pytest.FixtureRequest, title: str, provider: Any) -> None:
    """Register a callable producing text to show if this test fails."""
    request.node.__dict__.setdefault("_kvhive_interop_context", []).append((title, provider))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.when in ("setup", "call") and rep.failed:
        for title, provider in item.__dict__.get("_kvhive_interop_context", []):
            try:
                rep.sections.append((title, provider()))
            except Exception as exc:  # noqa: BLE001 - context must never mask the failure
                rep.sections.append((title, f"<unavailable: {exc}>"))


# ---------------------------------------------------------------------------
# Client venv
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def client_python() -> str:
    path, reason = locate_venv_python("KVHIVE_CLIENT_PYTHON", SETUP_SCRIPT, "lmcache client")
    if path is None:
        unavailable(reason)
    return str(path)


@pytest.fixture(scope="session")
def target() -> str:
    return interop_target()


@pytest.fixture
def xfail_on_reference(request: pytest.FixtureRequest, target: str):
    """Call with a reason: marks the test as an expected (strict) failure on the reference."""

    def mark(reason: str) -> None:
        if target == "reference":
            request.applymarker(
                pytest.mark.xfail(reason=f"reference defect: {reason}", strict=True)
            )

    return mark


@pytest.fixture(scope="session")
def settle_ms(target: str) -> float:
    """Pause between a store reply and the next lookup.

    kvhive commits before it acknowledges a store, so 0. The reference commits
    after replying (spec 14, defect 12) and needs a moment.
    """
    return 0.0 if target == "kvhive" else 100.0


# ---------------------------------------------------------------------------
# Server process
# ---------------------------------------------------------------------------


class ServerHandle(ServerProcess):
    """A server subprocess (:class:`kvhive.bench.servers.ServerProcess`: ``kvhive server`` or
    the reference ``lmcache server``) with what the interop tests read: raw HTTP answers, a
    ``/status`` summary valid for either server, and a log tail that says whether it runs."""

    @property
    def target(self) -> str:
        return self.kind

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        rc = self.proc.returncode if self.proc else None
        state = "running" if self.alive() else f"exited rc={rc}"
        return f"[{state}; log {self.log_path}]\n{super().log_tail(lines)}"

    def start(self, timeout_s: float = HEALTH_TIMEOUT_S, poll_s: float = 0.2) -> float:
        """Spawn and wait for ``GET /healthcheck`` to answer 200 (RuntimeError otherwise)."""
        return super().start(timeout_s, poll_s)

    def http_get(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=timeout) as resp:
                body = resp.read()
                code = resp.status
        except urllib.error.HTTPError as exc:
            body, code = exc.read(), exc.code
        try:
            return code, json.loads(body)
        except ValueError:
            return code, body.decode(errors="replace")

    def status(self) -> dict[str, Any]:
        code, body = self.http_get("/status")
        assert code == 200, f"GET /status -> {code}: {body!r}"
        assert isinstance(body, dict), body
        return body

    def summary(self) -> StatusSummary:
        return StatusSummary.from_status(self.status())


@dataclass(frozen=True)
class StatusSummary:
    """The parts of GET /status the interop tests look at, for either server."""

    instances: frozenset[str]
    read_locked: int
    staging: int
    raw: dict[str, Any]

    @staticmethod
    def _count(value: Any) -> int:
        if isinstance(value, (list, dict, tuple, set)):
            return len(value)
        return int(value)

    @classmethod
    def from_status(cls, status: dict[str, Any]) -> StatusSummary:
        if "registered_instances" in status:  # kvhive: these fields are required
            l1 = status["l1"]
            return cls(
                instances=frozenset(str(k) for k in status["registered_instances"]),
                read_locked=cls._count(l1["read_locked_objects"]),
                staging=cls._count(l1["staging_objects"]),
                raw=status,
            )
        # reference: cpu_shm registrations are listed with the CUDA ones,
        # engine-driven ones separately.
        ids = {str(i) for i in status.get("registered_gpu_ids", [])}
        ids |= {str(i) for i in status.get("cache_context_meta", {})}
        ids |= {str(i) for i in status.get("registered_non_cuda_instance_ids", [])}
        ids |= {str(i) for i in status.get("non_cuda_context_meta", {})}
        l1 = status["storage_manager"]["l1_manager"]
        return cls(
            instances=frozenset(ids),
            read_locked=int(l1["read_locked_count"]),
            staging=int(l1["staging_object_count"]),
            raw=status,
        )


@pytest.fixture(scope="session")
def _server_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("interop-servers")


def _server_factory(client_python: str, target: str, log_dir: Path, handles: list[ServerHandle]):
    def start(l1_size_gb: float = 0.5, extra: list[str] | None = None) -> ServerHandle:
        rpc = free_port()
        http = free_port(exclude=(rpc,))
        n = len(list(log_dir.iterdir()))
        handle = ServerHandle(
            target,
            l1_size_gb,
            list(extra or []),
            client_python=client_python,
            log_path=log_dir / f"{n:03d}-{target}-{rpc}.log",
            rpc_port=rpc,
            http_port=http,
        )
        handles.append(handle)
        handle.start()
        return handle

    return start


@pytest.fixture(scope="module")
def start_server(client_python: str, target: str, _server_log_dir: Path):
    """Factory ``start_server(l1_size_gb=..., extra=[...])`` -> running ServerHandle.

    Servers started through it live until the end of the test module.
    """
    handles: list[ServerHandle] = []
    yield _server_factory(client_python, target, _server_log_dir, handles)
    for h in handles:
        h.stop()


@pytest.fixture
def fresh_server(client_python: str, target: str, _server_log_dir: Path, attach_server):
    """Like ``start_server`` but the servers live for one test (and their logs are attached)."""
    handles: list[ServerHandle] = []
    start = _server_factory(client_python, target, _server_log_dir, handles)

    def start_attached(l1_size_gb: float = 0.5, extra: list[str] | None = None) -> ServerHandle:
        return attach_server(start(l1_size_gb, extra))

    yield start_attached
    for h in handles:
        h.stop()


@pytest.fixture
def attach_context(request: pytest.FixtureRequest):
    """``attach_context(title, provider)``: show ``provider()`` if the current test fails."""

    def attach(title: str, provider: Any) -> None:
        _attach(request, title, provider)

    return attach


@pytest.fixture(scope="session")
def interop_env() -> dict[str, str]:
    """Environment for client-venv subprocesses (usage telemetry off, no banner)."""
    return subprocess_env()


@pytest.fixture
def attach_server(request: pytest.FixtureRequest):
    """``attach_server(handle)`` shows that server's log if the current test fails."""

    def attach(handle: ServerHandle) -> ServerHandle:
        _attach(request, f"{handle.target} server log (tail)", handle.log_tail)
        return handle

    return attach


# ---------------------------------------------------------------------------
# Driver scripts (run in the client venv)
# ---------------------------------------------------------------------------


def parse_result(stdout: str) -> dict[str, Any] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    return None


@dataclass
class DriverRunner:
    client_python: str
    runs: list[tuple[list[str], str, str]] = field(default_factory=list)

    def argv(self, script: str, *args: str) -> list[str]:
        return [self.client_python, str(DRIVERS / script), *args]

    def run(self, script: str, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        argv = self.argv(script, *args)
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=str(DRIVERS),
                env=subprocess_env(),
                stdin=subprocess.DEVNULL,
                check=False,
            )
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = _text(exc.stdout)
            err = _text(exc.stderr) + f"\n<driver timed out after {timeout}s>"
            rc = None
        self.runs.append((argv, out, err))
        result = parse_result(out)
        if rc != 0 or result is None:
            pytest.fail(
                f"driver {script} failed (rc={rc})\n$ {' '.join(argv)}\n"
                f"--- stdout (tail) ---\n{_last(out)}\n--- stderr (tail) ---\n{_last(err)}",
                pytrace=False,
            )
        return result

    def spawn(self, script: str, *args: str) -> BackgroundDriver:
        return BackgroundDriver(self.argv(script, *args))

    def context(self) -> str:
        parts = []
        for argv, out, err in self.runs:
            parts.append(
                f"$ {' '.join(argv)}\n--- stdout ---\n{_last(out, 40)}\n"
                f"--- stderr ---\n{_last(err, 60)}"
            )
        return "\n\n".join(parts) or "<no driver runs>"


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _last(text: str, n: int = 80) -> str:
    return "\n".join(text.splitlines()[-n:])


class BackgroundDriver:
    """A driver kept running in the background (e.g. to be SIGKILLed mid-session)."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=str(DRIVERS),
            env=subprocess_env(),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._threads = [
            threading.Thread(
                target=self._pump, args=(self.proc.stdout, self.stdout, True), daemon=True
            ),
            threading.Thread(
                target=self._pump, args=(self.proc.stderr, self.stderr, False), daemon=True
            ),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream: Any, sink: list[str], feed: bool) -> None:
        for line in stream:
            sink.append(line)
            if feed:
                self.lines.put(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_result(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            if line.startswith(RESULT_MARK):
                return json.loads(line[len(RESULT_MARK) :])
        raise AssertionError(f"background driver produced no result\n{self.context()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        for t in self._threads:
            t.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        # A killed lmcache client leaves its cpu_shm segments behind.
        for path in glob.glob(f"/dev/shm/lmcache_kv_{self.pid}_*"):
            with contextlib.suppress(OSError):
                os.unlink(path)

    def context(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\n--- stdout ---\n{_last(''.join(self.stdout), 40)}\n"
            f"--- stderr ---\n{_last(''.join(self.stderr), 60)}"
        )


@pytest.fixture
def driver(client_python: str, request: pytest.FixtureRequest) -> DriverRunner:
    runner = DriverRunner(client_python)
    _attach(request, "interop driver runs", runner.context)
    return runner
