"""Helpers shared by the transfer tests (imported by name; not a test module)."""

from __future__ import annotations

import os
import pathlib
import subprocess

from support.paths import env_with_src

PROBE_PYTHON = pathlib.Path(
    os.environ.get("KVHIVE_CLIENT_PYTHON") or "/root/.cache/kvhive/venv-probe/bin/python"
)
HERE = pathlib.Path(__file__).resolve().parent


def maps_of(name: str) -> int:
    """How many mappings of /dev/shm/<name> this process has."""
    needle = f"/dev/shm/{name.lstrip('/')}"
    with open(f"/proc/{os.getpid()}/maps") as f:
        return sum(1 for line in f if line.rstrip().endswith(needle))


def run_probe(python: pathlib.Path, script: str, timeout: float = 240) -> str:
    """Run ``script`` (a file next to this one) with ``python``; return its stdout.

    ``python`` need not have kvhive installed: kvhive's ``src`` goes first on PYTHONPATH.
    """
    proc = subprocess.run(
        [str(python), str(HERE / script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env_with_src(),
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
        )
    return proc.stdout
