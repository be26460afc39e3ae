"""Helpers for tests that run a worker in another PID namespace (``unshare --pid --fork``)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess

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
