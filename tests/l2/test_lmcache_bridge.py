"""LMCache's own L2 adapter classes under kvhive's ``plugin`` type (``lmcache_bridge.py``).

The adapters run in-process in the lmcache 0.5.6 client venv, with kvhive's sources on the
path (``lmcache_bridge_probe.py``): LMCache's ``fs`` adapter (its files are checked here,
byte for byte) and its ``mock`` adapter (which insists on LMCache's ``TensorMemoryObj`` and
locks on lookup).  Without the venv the tests skip, unless ``KVHIVE_REQUIRE_INTEROP=1``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sysconfig
from pathlib import Path
from typing import Any

import pytest

from kvhive.bench.servers import locate_client_python, subprocess_env
from kvhive.config.l2_adapters import parse_adapter
from kvhive.errors import ConfigError
from kvhive.storage.l2.adapters.lmcache_bridge import LMCACHE_BASE, is_lmcache_adapter
from kvhive.storage.l2.registry import build_adapter
from support.paths import env_with_src

HERE = Path(__file__).resolve().parent
PROBE = HERE / "lmcache_bridge_probe.py"


@pytest.fixture(scope="module")
def client_python() -> str:
    path = locate_client_python(os.environ.get("KVHIVE_CLIENT_PYTHON") or None)
    if path is None:
        reason = "lmcache 0.5.6 client venv not built (scripts/setup_client_venv.sh)"
        if os.environ.get("KVHIVE_REQUIRE_INTEROP", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"required (KVHIVE_REQUIRE_INTEROP=1): {reason}", pytrace=False)
        pytest.skip(reason)
    return path


def probe(client_python: str, kind: str, where: Path) -> dict[str, Any]:
    env = env_with_src(subprocess_env(KVHIVE_DEV_SITE=sysconfig.get_paths()["purelib"]))
    proc = subprocess.run(
        [client_python, str(PROBE), kind, str(where)], capture_output=True, text=True,
        timeout=180, env=env, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"probe {kind} failed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_lmcache_fs_adapter_class(client_python: str, tmp_path: Path) -> None:
    out = probe(client_python, "fs", tmp_path)
    assert out["class"] == "lmcache.v1.distributed.l2_adapters.fs_l2_adapter.FSL2Adapter"
    assert out["store"] == [True] * 4
    # LMCache's own file names (model, kv_rank, group, hash, salt) holding the raw bytes
    names = out["files"]
    assert len(names) == 4 and all(n.startswith("org-SEP-model-x@0x02010201@") for n in names)
    assert sum(n.endswith("@tenant-a.data") for n in names) == 1
    assert out["files_exact"] is True
    assert out["lookup"] == [True, True, True, True, False]
    # 4 objects byte-exact; an absent key and a buffer longer than its object fail
    assert out["load"] == [True, True, True, True, False, False]
    assert out["load_exact"] == [True] * 4
    assert out["delete"] == [True, True, False]
    assert out["lookup_after_delete"] == [False, True, True, False]
    assert out["capacity"] == 0
    assert (out["managed_store"], out["managed_load"], out["managed_exact"]) == (
        [True],
        [True],
        True,
    )
    assert (out["managed_used"], out["managed_delete"], out["managed_used_after"]) == (
        3000,
        [True],
        0,
    )
    # what is left on disk: the group-1 object and the tenant-a one (keys 1 and 2)
    left = sorted(os.listdir(tmp_path))
    assert left == sorted(n for n in names if n.split("@")[2] == "1" or "@tenant-a" in n)


def test_lmcache_mock_adapter_class(client_python: str, tmp_path: Path) -> None:
    out = probe(client_python, "mock", tmp_path)
    assert out["class"].endswith("mock_l2_adapter.MockL2Adapter")
    assert out["capacity"] == int(0.01 * 2**30)  # the adapter's own capacity reaches kvhive
    assert out["store"] == [True] * 4
    assert out["lookup"] == [True, True, True, True, False]
    assert out["locked_after_lookup"] == 0  # LMCache's lookup locks are given back at once
    assert out["load"] == [True, True, True, True, False]
    assert out["load_exact"] == [True] * 4
    assert out["delete"] == [True, True, False]
    assert out["lookup_after_delete"] == [False, True, True, False]
    assert (out["managed_used"], out["managed_used_after"]) == (3000, 0)


def test_detects_lmcache_base_by_name_without_importing_it() -> None:
    base = type("L2AdapterInterface", (), {"__module__": LMCACHE_BASE[0]})
    assert is_lmcache_adapter(type("Plugin", (base,), {}))
    assert not is_lmcache_adapter(type("Plugin", (), {}))


def test_other_classes_are_refused_naming_both_interfaces(tmp_path: Path) -> None:
    module = tmp_path / "not_an_adapter.py"
    module.write_text("class Thing:\n    pass\n")
    spec = parse_adapter(0, {"type": "plugin", "module_path": str(module), "class_name": "Thing"})
    with pytest.raises(ConfigError, match="or of LMCache's L2AdapterInterface"):
        build_adapter(spec)
