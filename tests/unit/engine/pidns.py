"""Helpers for tests that run a worker in another PID namespace (``unshare --pid --fork``)."""

from __future__ import annotations

import _posixshmem
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
from collections.abc import Iterator
from typing import Any, TypeVar

import pytest


def require_services() -> bool:
    """CI sets KVHIVE_REQUIRE_SERVICES=1: a missing tool fails instead of skipping."""
    return os.environ.get("KVHIVE_REQUIRE_SERVICES", "").strip().lower() in ("1", "true", "yes")


def unshare_argv() -> list[str]:
    """``unshare`` argv for a fresh PID namespace with its own /proc whose processes die
    with the ``unshare`` process; skips the test when unavailable (fails in CI)."""
    exe = shutil.which("unshare")
    reason = ""
    if exe is None:
        reason = "unshare(1) is not installed"
    else:
        probe = subprocess.run(
            [exe, "--pid", "--fork", "--mount-proc", "true"], capture_output=True, check=False
        )
        if probe.returncode != 0:
            reason = f"unshare --pid --fork --mount-proc fails: {probe.stderr.decode()[-300:]}"
    if reason:
        if require_services():
            pytest.fail(f"KVHIVE_REQUIRE_SERVICES=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    assert exe is not None
    return [exe, "--pid", "--fork", "--mount-proc", "--kill-child"]


def invisible_pid() -> int:
    """A pid that no process has in our namespace now: the pid a worker in a fresh
    namespace is given, so that from here its segment names look like a dead process's."""
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    rng = random.Random()
    while True:
        pid = rng.randrange(max(300, pid_max // 2), pid_max - 10)
        if not os.path.exists(f"/proc/{pid}"):
            return pid


class SegmentWorker:
    """A real worker process that creates ``lmcache_kv_<pid>_<n>`` segments and reports
    them on its first stdout line (JSON with ``pid`` and ``names``); optionally in its own
    PID namespace (``ns_pid``: the pid it takes there, ``unshare``: :func:`unshare_argv`)."""

    def __init__(
        self,
        argv: list[str],
        *,
        ns_pid: int = 0,
        ns_flag: list[str] | None = None,
        unshare: list[str] | None = None,
        **popen: Any,
    ) -> None:
        if ns_pid:
            assert unshare is not None
            argv = [*unshare, *argv, *(ns_flag or []), str(ns_pid)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, **popen)
        first = self._read()
        self.pid: int = first["pid"]  # its pid in its own namespace
        self.names: list[str] = first["names"]
        self.ready = first

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"worker exited ({self.proc.wait()}) without answering")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def exists(self) -> list[bool]:
        return [os.path.exists(f"/dev/shm/{n}") for n in self.names]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def cleanup(self) -> None:
        self.kill()
        for n in self.names:
            with contextlib.suppress(FileNotFoundError):
                _posixshmem.shm_unlink("/" + n)


W = TypeVar("W", bound=SegmentWorker)


def cleaned_up(made: list[W]) -> Iterator[list[W]]:
    """Fixture body: the test appends workers; all are killed and unlinked afterwards."""
    yield made
    for w in made:
        w.cleanup()
