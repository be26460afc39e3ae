"""Mooncake tests: the real library against a real ``mooncake_master``, all inside a private
network namespace (Mooncake binds every interface: ``tests/support/netns.py``).

``python -m pytest tests`` does not collect this directory: ``tests/l2/test_mooncake_netns.py``
runs it inside ``unshare -n`` instead.  Naming it (``pytest tests/mooncake``) collects it;
outside a loopback-only namespace every test then skips with the reason, or fails under
``KVHIVE_REQUIRE_SERVICES=1``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mc_testlib import MASTER_BIN, Master, client_config, unavailable

from support.l2kit import Opener, open_adapters
from support.netns import loopback_only

HERE = Path(__file__).resolve().parent


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Collect this directory only when the command line names it (or something in it)."""
    if collection_path.name == "conftest.py":
        return None
    base = config.invocation_params.dir
    for arg in config.args:
        asked = (base / arg.split("::")[0]).resolve()
        if asked == HERE or HERE in asked.parents:
            return None
    return True


@pytest.fixture(scope="session", autouse=True)
def private_network() -> None:
    """Refuse to run outside a loopback-only network namespace."""
    if not loopback_only():
        unavailable(
            "the Mooncake tests must run in a private network namespace (Mooncake binds every "
            "interface): run tests/l2/test_mooncake_netns.py, or as root "
            "unshare -n -- sh -c 'ip link set lo up && exec .venv/bin/python -m pytest tests/mooncake'"
        )
    try:
        import mooncake.store  # noqa: F401
    except ImportError as exc:
        unavailable(f"Mooncake is not installed ({exc}): pip install 'kvhive[mooncake]'")
    if not MASTER_BIN.exists():
        unavailable(f"{MASTER_BIN} is missing: pip install 'kvhive[mooncake]'")


@pytest.fixture(scope="session")
def master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Master]:
    """One master for the session (tests that stop theirs start their own)."""
    m = Master(tmp_path_factory.mktemp("mooncake-master"))
    m.start()
    yield m
    m.stop()


@pytest.fixture
def mc_json(master: Master) -> Callable[..., dict[str, Any]]:
    """``mc_json(**extra)``: a ``mooncake_store`` adapter JSON object on the session master."""

    def make(**extra: Any) -> dict[str, Any]:
        return {"type": "mooncake_store", **client_config(master.addr), **extra}

    return make


@pytest.fixture
def open_adapter() -> Iterator[Opener]:
    """``open_adapter(json)``: a ManagedAdapter, closed at teardown unless the test did."""
    yield from open_adapters()
