"""server_module_call with the real lmcache 0.5.6 client against ``--server-module``.

The module (``tests/interop/modules/kvh_interop_module.py``) loads in kvhive and in the
reference alike; the driver sends ``server_module_call`` through the 0.5.6 client and the 0.5.7
``server_module_affinity_call`` on a bare socket with 0.5.6's own ``ServerModuleCallRequest``
encoding.  Against the reference (``KVHIVE_INTEROP_TARGET=reference``) the affinity call is not
answered (0.5.6 has no such op), and the rest must agree with kvhive.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop

MODULES = Path(__file__).resolve().parent / "modules"
SPEC = json.dumps({"module_path": "kvh_interop_module", "config": {"prefix": "pre:"}})


@pytest.fixture
def module_server(fresh_server, monkeypatch: pytest.MonkeyPatch):
    # the server process imports the module from PYTHONPATH
    monkeypatch.setenv("PYTHONPATH", str(MODULES))
    return fresh_server(l1_size_gb=0.1, extra=["--server-module", SPEC])


def test_server_module_call_with_the_lmcache_client(module_server, driver, target) -> None:
    args = ["--url", module_server.rpc_url]
    res = driver.run("server_modules.py", *args, *(["--affinity"] if target == "kvhive" else []))
    assert res["echo"] == {
        "outcome": "result",
        "value": {"success": True, "payload": "pre:hello", "error": ""},
    }
    assert res["unknown"] == {
        "outcome": "result",
        "value": {
            "success": False,
            "payload": "",
            "error": "unknown server module method: interop.nope",
        },
    }
    assert res["fail"] == {
        "outcome": "result",
        "value": {"success": False, "payload": "", "error": "interop failure for x"},
    }
    assert res["thread"]["value"]["success"] is True
    if target != "kvhive":
        return
    assert res["thread"]["value"]["payload"].startswith("kvhive-cpu")
    affinity = res["affinity"]["value"]
    assert affinity["success"] and affinity["payload"].startswith("ordered:kvhive-aff")
    assert affinity["payload"].endswith(":aff")
    assert res["affinity_wrong"]["value"] == {
        "success": False,
        "payload": "",
        "error": "server module method interop.echo is served by server_module_call",
    }
    modules = module_server.status()["server_modules"]
    assert modules["methods"] == ["interop.echo", "interop.fail", "interop.thread"]
    assert modules["affinity_methods"] == ["interop.ordered"]
    assert modules["modules"] == [{"interop_calls": 1}]
