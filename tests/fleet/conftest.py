"""Multi-node tests: a fleet of kvhive servers sharing an L2 tier, each "node" a network
namespace made by the test (``tests/support/fleet.py``), joined by veth pairs to a bridge in
one more namespace, on a private 10.213.x.0/24 subnet.  Traffic between nodes crosses real
veth interfaces; nothing in a fleet can reach, or be reached from, the host's network
(Mooncake binds every interface: inside a node that is its loopback and its veth).

Needs root and ``ip netns``; the lmcache 0.5.6 client venv (``scripts/setup_client_venv.sh``)
for the client-driven tests; Mooncake (``kvhive[mooncake]``), moto and awscrt, the vLLM venv
(``scripts/setup_vllm_venv.sh``) for the vLLM ones.  Without them the tests skip with the
reason, or fail under ``KVHIVE_REQUIRE_SERVICES=1`` (vLLM: ``KVHIVE_REQUIRE_E2E=1``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from fleet_testlib import MASTER_BIN, REPO, unavailable

from support.fleet import Fleet, fleet_unavailable
from support.venvs import locate_venv_python


@pytest.fixture(scope="session")
def fleet_ok() -> None:
    reason = fleet_unavailable()
    if reason:
        unavailable(f"cannot make a fleet of network namespaces: {reason}")


@pytest.fixture
def make_fleet(fleet_ok: None) -> Iterator[Callable[[Sequence[str]], Fleet]]:
    """``make_fleet(["m", "a", "b"])``: a built fleet, torn down after the test (its
    processes stopped, its namespaces deleted), whatever the outcome."""
    fleets: list[Fleet] = []

    def make(nodes: Sequence[str]) -> Fleet:
        fleet = Fleet(nodes)
        fleets.append(fleet)
        return fleet.__enter__()

    yield make
    for fleet in reversed(fleets):
        fleet.close()


@pytest.fixture(scope="session")
def mooncake_ok() -> None:
    try:
        import mooncake.store  # noqa: F401
    except ImportError as exc:
        unavailable(f"Mooncake is not installed ({exc}): pip install 'kvhive[mooncake]'")
    if not MASTER_BIN.exists():
        unavailable(f"{MASTER_BIN} is missing: pip install 'kvhive[mooncake]'")


@pytest.fixture(scope="session")
def s3_ok() -> None:
    try:
        import awscrt  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        unavailable(f"{exc.name} is not installed (pip install 'kvhive[s3]' 'moto[server]')")


@pytest.fixture(scope="session")
def client_python() -> str:
    path, reason = locate_venv_python(
        "KVHIVE_CLIENT_PYTHON", REPO / "scripts" / "setup_client_venv.sh", "lmcache client"
    )
    if path is None:
        unavailable(reason)
    assert path is not None
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failing vLLM test shows the kvhive logs and driver output (as tests/e2e does)."""
    outcome = yield
    rep = outcome.get_result()
    support = sys.modules.get("e2e_support")
    if support is None or rep.when not in ("setup", "call") or not rep.failed:
        return
    for title, provider in support.CONTEXT:
        try:
            rep.sections.append((title, provider()))
        except Exception as exc:  # noqa: BLE001 - context must never mask the failure
            rep.sections.append((title, f"<unavailable: {exc}>"))


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path
