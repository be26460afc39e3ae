"""Private network namespaces for tests of software that binds every interface (Mooncake).

A test tree that must not expose ports runs as a whole inside ``unshare -n`` (root), after
``ip link set lo up``: its only interface is loopback, and every socket dies with it.

* :func:`netns_unavailable` says why a namespace cannot be made here ("" when it can);
* :func:`run_in_netns` runs a command inside a fresh one and returns its result;
* :func:`loopback_only` tells code already running whether it is inside such a namespace
  (the tests that need one refuse to run otherwise).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Mapping, Sequence

UNSHARE_HINT = "needs root, unshare (util-linux) and ip (iproute2)"


def interfaces() -> list[str]:
    """The network interfaces of this process's namespace (``if_nameindex`` asks the kernel
    for the current namespace; ``/sys/class/net`` would show the one sysfs was mounted in)."""
    try:
        return sorted(name for _, name in socket.if_nameindex())
    except OSError:
        return []


def loopback_only() -> bool:
    """Whether this process's network namespace has no interface but ``lo`` and ``lo`` is
    up (a loopback connection works): a socket bound to 0.0.0.0 here reaches nobody."""
    if interfaces() != ["lo"]:
        return False
    try:
        with socket.create_server(("127.0.0.1", 0)) as server:
            port = server.getsockname()[1]
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return True
    except OSError:
        return False


def netns_unavailable() -> str:
    """Why a private namespace cannot be made here; "" when it can (tried once for real)."""
    missing = [tool for tool in ("unshare", "ip") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found ({UNSHARE_HINT})"
    try:
        probe = run_in_netns(["true"], timeout_s=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare -n failed: {exc} ({UNSHARE_HINT})"
    if probe.returncode != 0:
        return f"unshare -n failed (rc {probe.returncode}): {probe.stderr.strip()} ({UNSHARE_HINT})"
    return ""


def run_in_netns(
    argv: Sequence[str],
    *,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a fresh private network namespace with ``lo`` up; output captured
    as text (stdout and stderr apart).  Everything it starts dies with the namespace's
    sockets when it exits (its child processes are its own business)."""
    script = 'ip link set lo up && exec "$@"'
    return subprocess.run(
        ["unshare", "-n", "--", "sh", "-c", script, "sh", *argv],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        check=False,
    )
