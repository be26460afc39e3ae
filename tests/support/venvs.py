"""Locating the cached client venvs the interop suites drive kvhive with."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kvhive.bench.servers import setup_script_python


def interop_required() -> bool:
    """``KVHIVE_REQUIRE_INTEROP=1`` (set by ``.ci/run``): a missing venv fails, not skips."""
    return os.environ.get("KVHIVE_REQUIRE_INTEROP", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Skip the test, or fail it when interop is required."""
    if interop_required():
        pytest.fail(
            f"interop required (KVHIVE_REQUIRE_INTEROP=1) but unavailable: {reason}", pytrace=False
        )
    pytest.skip(reason)


def locate_venv_python(env_var: str, setup_script: Path, what: str) -> tuple[str | None, str]:
    """(python, "") from ``$env_var`` or ``setup_script --print-path``, else (None, why)."""
    env = os.environ.get(env_var, "").strip()
    if env:
        if os.path.isfile(env) and os.access(env, os.X_OK):
            return env, ""
        return None, f"{env_var}={env!r} is not an executable file"
    if not setup_script.is_file():
        return None, f"{setup_script} is missing"
    try:
        path = setup_script_python(setup_script)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"could not query {setup_script.name}: {exc}"
    if path is not None and os.path.isfile(path):
        return path, ""
    return None, f"{what} venv not built; run scripts/{setup_script.name} or set {env_var}"
