"""0.5.7 interop fixtures: ``kvhive server`` in a subprocess, driven by LMCache 0.5.7's own
client code running in the 0.5.7 client venv (``drivers/lmc057.py``, ``drivers/drive.py``).

The venv is located through ``KVHIVE_CLIENT057_PYTHON`` or the cached path that
``scripts/setup_client057_venv.sh --print-path`` reports.  Without it the tests skip, unless
``KVHIVE_REQUIRE_INTEROP=1`` (set by ``.ci/run``), which turns the skip into a failure.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvhive.bench.servers import ServerProcess, subprocess_env
from support.venvs import locate_venv_python, unavailable

REPO = Path(__file__).resolve().parents[2]
DRIVERS = Path(__file__).resolve().parent / "drivers"
SETUP_SCRIPT = REPO / "scripts" / "setup_client057_venv.sh"
RESULT_MARK = "@@KVHIVE_INTEROP057_RESULT@@ "


@pytest.fixture(scope="session")
def client057_python() -> str:
    path, reason = locate_venv_python(
        "KVHIVE_CLIENT057_PYTHON", SETUP_SCRIPT, "lmcache 0.5.7 client"
    )
    if path is None:
        unavailable(reason)
    return path


@pytest.fixture(scope="module")
def kvhive_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A ``kvhive server`` subprocess on free loopback ports (0.25 GiB L1, LRU)."""
    log = tmp_path_factory.mktemp("interop057") / "kvhive-server.log"
    server = ServerProcess("kvhive", 0.25, log_path=log)
    server.start(timeout_s=30.0, poll_s=0.05)
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Scenario057:
    """One ``drive.py`` run: the reply of every step, by step name."""

    version: str
    steps: dict[str, dict[str, Any]]

    def value(self, step: str) -> Any:
        """The step's decoded reply; fails the test with the error when the step failed."""
        got = self.steps[step]
        assert got["ok"], f"{step}: {got['error']}"
        return got["value"]


@pytest.fixture(scope="module")
def drive057(client057_python: str, kvhive_server: ServerProcess) -> Callable[..., Scenario057]:
    """``drive057(scenario, *args)``: run ``drivers/drive.py`` against the module's server."""

    def run(name: str, *args: str, timeout: float = 120.0) -> Scenario057:
        argv = [client057_python, str(DRIVERS / "drive.py"), name, "--url", kvhive_server.rpc_url,
                *args]  # fmt: skip
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, cwd=str(DRIVERS),
            env=subprocess_env(), stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
        if proc.returncode != 0 or not lines:
            pytest.fail(
                f"drive.py {name} failed (rc={proc.returncode})\n$ {' '.join(argv)}\n"
                f"--- stderr ---\n{proc.stderr[-4000:]}\n"
                f"--- server log ---\n{kvhive_server.log_tail(40)}",
                pytrace=False,
            )
        result = json.loads(lines[-1][len(RESULT_MARK) :])
        return Scenario057(version=result["version"], steps=result["steps"])

    return run
