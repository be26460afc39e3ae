"""``mooncake_store``: its real-library tests (``tests/mooncake``) run inside a private network
namespace from here, plus the checks that never start Mooncake (config, missing library)."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvhive.errors import ConfigError
from kvhive.storage.l2.adapters import mooncake
from support.net import free_port
from support.netns import netns_unavailable, run_in_netns

REPO = Path(__file__).resolve().parents[2]


def _unavailable(reason: str) -> None:
    if os.environ.get("KVHIVE_REQUIRE_SERVICES", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"KVHIVE_REQUIRE_SERVICES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _readable(text: str, lines: int = 200) -> str:
    """The output without Mooncake's glog lines (``I1204 16:10:05.025 ...``), tail only."""
    kept = [ln for ln in text.splitlines() if not re.match(r"^[IWEF]\d{4} ", ln)]
    return "\n".join(kept[-lines:])


@pytest.mark.timeout(900)
def test_the_mooncake_suite_passes_in_a_private_netns() -> None:
    try:
        import mooncake.store  # noqa: F401
    except ImportError as exc:
        _unavailable(f"Mooncake is not installed ({exc}): pip install 'kvhive[mooncake]'")
    reason = netns_unavailable()
    if reason:
        _unavailable(f"cannot make a private network namespace: {reason}")
    argv = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
            str(REPO / "tests" / "mooncake")]  # fmt: skip
    run = run_in_netns(argv, timeout_s=840, cwd=str(REPO))
    out = _readable(run.stdout + "\n" + run.stderr)
    print(out)
    assert run.returncode == 0, (
        f"tests/mooncake failed in the namespace (rc {run.returncode}):\n{out}"
    )
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    if " passed" not in summary:
        _unavailable(f"tests/mooncake ran nothing: {summary}")


@pytest.mark.parametrize("legacy", ["master_server_address", "device_name"])
def test_legacy_keys_make_the_server_exit_2(legacy: str) -> None:
    """Checked while parsing the flags: Mooncake is never started (so no namespace needed)."""
    tier = {"type": "mooncake_store", "local_hostname": "127.0.0.1",
            "metadata_server": "P2PHANDSHAKE", legacy: "127.0.0.1:1"}  # fmt: skip
    argv = [sys.executable, "-m", "kvhive", "server", "--host", "127.0.0.1", "--port",
            str(free_port()), "--http-port", str(free_port()), "--l1-size-gb", "0.01",
            "--eviction-policy", "LRU", "--l2-adapter", json.dumps(tier)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"field '{legacy}' is an old lmcache name" in proc.stderr


def test_a_missing_library_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(message: str):  # type: ignore[no-untyped-def]
        def fake(name: str) -> object:
            raise ImportError(message)

        return fake

    monkeypatch.setattr(importlib, "import_module", broken("No module named 'mooncake'"))
    with pytest.raises(ConfigError, match=re.escape("pip install 'kvhive[mooncake]'")):
        mooncake.load_store_class()
    monkeypatch.setattr(
        importlib,
        "import_module",
        broken("libibverbs.so.1: cannot open shared object file: No such file or directory"),
    )
    with pytest.raises(ConfigError, match="apt-get install -y libibverbs1"):
        mooncake.load_store_class()
