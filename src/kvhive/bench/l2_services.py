"""Throwaway services of the ``l2`` bench section, each on a free loopback port and stopped
afterwards: ``redis-server`` (for ``resp``) and moto's S3 server (``s3``, NIXL ``OBJ``).

:func:`redis_service` and :func:`moto_service` are context managers; when a binary or a
Python package is missing they raise :class:`Unavailable` with the reason, which the section
turns into a skipped row (never a failed section).
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kvhive.bench.servers import free_port, subprocess_env

START_TIMEOUT_S = 30.0
BUCKET = "kvhive-bench"


class Unavailable(RuntimeError):
    """A service or client this row needs is not installed here (the message says which)."""


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    """Return once ``127.0.0.1:port`` accepts connections; raise if ``proc`` exits first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {START_TIMEOUT_S:g} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate ``proc`` (this process's own child), killing it after 5 s."""
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def need_module(name: str, install: str) -> None:
    """Raise :class:`Unavailable` unless module ``name`` can be imported."""
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise Unavailable(f"{name} is not installed ({install})")


@contextmanager
def redis_service(work_dir: Path) -> Iterator[tuple[str, int]]:
    """A ``redis-server`` (or ``valkey-server``) without persistence; yields (host, port)."""
    exe = shutil.which("redis-server") or shutil.which("valkey-server")
    if exe is None:
        raise Unavailable("redis-server is not installed")
    need_module("redis", "pip install 'kvhive[redis]'")
    port = free_port()
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
            "no", "--dir", str(work_dir), "--protected-mode", "no"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc, "redis-server")
        yield "127.0.0.1", port
    finally:
        stop(proc)


@contextmanager
def moto_service() -> Iterator[tuple[int, str]]:
    """moto's S3 server with bucket :data:`BUCKET`; yields (port, path-style endpoint of the
    bucket)."""
    need_module("moto.server", "pip install 'moto[server]'")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env(),
    )  # fmt: skip
    try:
        wait_port(port, proc, "moto server")
        url = f"http://127.0.0.1:{port}/{BUCKET}"
        urllib.request.urlopen(urllib.request.Request(url, method="PUT"), timeout=10).close()
        yield port, url
    finally:
        stop(proc)
