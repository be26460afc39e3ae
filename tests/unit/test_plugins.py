"""Runtime plugins: discovery, the environment contract, output forwarding, exit logging,
SIGTERM then SIGKILL on stop, and the whole cycle through ``kvhive server``."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from kvhive.bench.servers import ServerProcess
from kvhive.cli.main import main
from kvhive.config import parse_server_args
from kvhive.plugins import PluginLauncher, find_plugins
from support.net import free_port

ENV_DUMP = """
import json, os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: (print("got SIGTERM", flush=True), sys.exit(0)))
keys = [k for k in os.environ if k.startswith(("LMCACHE_", "KVHIVE_", "PYTHONUNBUFFERED"))]
print("ENV " + json.dumps({k: os.environ[k] for k in keys}))
print("EXE " + sys.executable)
time.sleep(60)
"""
STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ignoring SIGTERM", flush=True)
time.sleep(60)
"""
SHELL = 'echo "hello from bash $LMCACHE_RUNTIME_PLUGIN_WORKER_ID"\nexit 3\n'


def config(*extra: str):
    return parse_server_args(["--l1-size-gb", "0.01", "--eviction-policy", "LRU", *extra])


def wait_until(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kvhive.plugins"]


def test_find_plugins_order_and_filters(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.sh", "a.py", "sub/c.py", "sub/d.sh", "notes.txt"):
        (tmp_path / name).write_text("")
    other = tmp_path / "x.rb"
    other.write_text("")
    found = find_plugins([str(tmp_path), str(tmp_path / "missing"), str(other)])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a.py",
        "sub/c.py",
        "b.sh",
        "sub/d.sh",
    ]
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "does not exist" in text and "only .py and .sh" in text


def test_env_contract_output_exit_and_stop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "envdump.py").write_text(ENV_DUMP)
    (tmp_path / "hello.sh").write_text(SHELL)
    cfg = config(
        "--runtime-plugin-locations", str(tmp_path),
        "--runtime-plugin-config", '{"plugin.frontend.heartbeat_url": "http://x/hb"}',
        "--http-api-token", "tok", "--http-port", "8123",
    )  # fmt: skip
    launcher = PluginLauncher(cfg)
    with caplog.at_level(logging.INFO, logger="kvhive.plugins"):
        launcher.start()
        wait_until(lambda: any(m.startswith("[plugin envdump.py] EXE") for m in messages(caplog)))
        wait_until(lambda: any("hello.sh exited with status 3" in m for m in messages(caplog)))
        assert "[plugin hello.sh] hello from bash 0" in messages(caplog)
        running = [p for p in launcher.status() if p["running"]]
        assert [p["name"] for p in running] == ["envdump.py"]
        launcher.stop()
    msgs = messages(caplog)
    env_line = next(m for m in msgs if m.startswith("[plugin envdump.py] ENV "))
    env = json.loads(env_line.split("ENV ", 1)[1])
    assert f"[plugin envdump.py] EXE {sys.executable}" in msgs  # the server's interpreter
    full = json.loads(env["LMCACHE_RUNTIME_PLUGIN_CONFIG"])
    assert set(full) >= {"mp_config", "storage_manager_config", "obs_config", "http_config"}
    assert full["http_config"] == {"http_host": "0.0.0.0", "http_port": 8123}
    assert full["runtime_plugin_extra_config"] == {"plugin.frontend.heartbeat_url": "http://x/hb"}
    assert full["kvhive_config"]["http_admin"]["api_token"] == "***"  # masked in the JSON
    assert json.loads(env["LMCACHE_RUNTIME_PLUGIN_EXTRA_CONFIG"]) == {
        "plugin.frontend.heartbeat_url": "http://x/hb"
    }
    assert env["LMCACHE_PLUGIN_CONFIG"] == env["LMCACHE_RUNTIME_PLUGIN_CONFIG"]
    assert (env["LMCACHE_RUNTIME_PLUGIN_ROLE"], env["LMCACHE_RUNTIME_PLUGIN_WORKER_ID"]) == (
        "",
        "0",
    )
    assert env["LMCACHE_RUNTIME_PLUGIN_WORKER_COUNT"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["KVHIVE_HTTP_API_TOKEN"] == "tok"
    assert "[plugin envdump.py] got SIGTERM" in msgs
    assert any("envdump.py exited with status 0" in m for m in msgs)


def test_sigkill_after_the_grace_period(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "stubborn.py").write_text(STUBBORN)
    cfg = config("--runtime-plugin-locations", str(tmp_path / "stubborn.py"),
                 "--runtime-plugin-stop-grace-seconds", "0.5")  # fmt: skip
    launcher = PluginLauncher(cfg)
    with caplog.at_level(logging.INFO, logger="kvhive.plugins"):
        launcher.start()
        wait_until(lambda: "[plugin stubborn.py] ignoring SIGTERM" in messages(caplog))
        t0 = time.monotonic()
        launcher.stop()
        assert 0.4 < time.monotonic() - t0 < 5
    assert launcher.status()[0]["exit_code"] == -signal.SIGKILL
    assert any("ignored SIGTERM; killing it" in m for m in messages(caplog))


def test_invalid_plugin_config_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["server", "--l1-size-gb", "0.01", "--eviction-policy", "LRU"]
    assert main([*args, "--runtime-plugin-config", "{oops"]) == 2
    assert "--runtime-plugin-config must be valid JSON" in capsys.readouterr().err
    assert main([*args, "--runtime-plugin-config", '"text"']) == 2
    assert "must be a JSON object" in capsys.readouterr().err


def test_plugins_start_and_stop_with_the_server(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    plugin = tmp_path / "probe.py"
    plugin.write_text(
        "import json, os, signal, sys, time, urllib.request\n"
        "cfg = json.loads(os.environ['LMCACHE_RUNTIME_PLUGIN_CONFIG'])['http_config']\n"
        "url = f\"http://127.0.0.1:{cfg['http_port']}/healthcheck\"\n"
        "body = urllib.request.urlopen(url, timeout=5).read().decode()\n"  # HTTP is already up
        f"open({str(marker)!r}, 'w').write(body)\n"
        "print('probe saw ' + body, flush=True)\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        "time.sleep(60)\n"
    )
    extra = ["--prometheus-port", str(free_port()), "--runtime-plugin-locations", str(plugin)]
    log = tmp_path / "server.log"
    server = ServerProcess("kvhive", 0.01, extra, log_path=log)
    try:
        server.start()
        wait_until(marker.exists, timeout=30)
        assert json.loads(marker.read_text()) == {"status": "healthy"}
    finally:
        if server.proc is not None:
            server.proc.send_signal(signal.SIGTERM)  # the server alone: it stops its plugins
            try:
                server.proc.wait(timeout=30)
            finally:
                server.stop()  # kills what is left, closes the log
    err = log.read_text()
    assert server.proc.returncode == 0
    assert "[plugin probe.py] probe saw" in err
    assert "runtime plugin probe.py exited with status 0" in err
    # the plugin process is gone with the server
    pid_lines = [line for line in err.splitlines() if "probe.py started (pid" in line]
    pid = int(re.search(r"started \(pid (\d+)\)", pid_lines[0]).group(1))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
