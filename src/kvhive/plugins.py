"""Runtime plugins: scripts started next to the server and stopped with it.

``--runtime-plugin-locations`` names files or directories (searched recursively, every ``*.py``
first, then every ``*.sh``, each group sorted).  A ``.py`` plugin runs under the server's own
interpreter (``sys.executable``), a ``.sh`` plugin under ``bash``; other files are refused.
Each plugin gets the server's environment plus:

=====================================  ==========================================================
``LMCACHE_RUNTIME_PLUGIN_CONFIG``      the full server configuration as one JSON object
                                       (``mp_config``, ``storage_manager_config``, ``obs_config``,
                                       ``http_config`` like the reference, plus ``kvhive_config``
                                       and ``runtime_plugin_extra_config`` when non-empty)
``LMCACHE_RUNTIME_PLUGIN_EXTRA_CONFIG``  ``--runtime-plugin-config`` (JSON object)
``LMCACHE_RUNTIME_PLUGIN_ROLE``        ``""``; ``..._WORKER_COUNT`` ``"1"``; ``..._WORKER_ID`` ``"0"``
``LMCACHE_PLUGIN_*``                   legacy duplicates of the four reference variables
``PYTHONUNBUFFERED``                   ``1``
``KVHIVE_HTTP_API_TOKEN``              the ``--http-api-token`` (only when one is set)
=====================================  ==========================================================

The API token is masked inside the JSON config (plugin configs end up in logs).  Each plugin's
stdout and stderr are merged and forwarded line by line to the ``kvhive.plugins`` logger as
``[plugin NAME] line``; its exit is logged with the status.  ``stop()`` sends SIGTERM to each
plugin's process group, waits ``--runtime-plugin-stop-grace-seconds``, then SIGKILLs what is
left.  Plugins start once the HTTP port is open (the reference starts them before).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvhive.config import ServerConfig

log = logging.getLogger("kvhive.plugins")

INTERPRETERS = {".py": [sys.executable], ".sh": ["bash"]}


def find_plugins(locations: tuple[str, ...] | list[str]) -> list[Path]:
    """Plugin files named by ``locations`` (see module docstring); missing paths warn."""
    found: list[Path] = []
    for loc in locations:
        path = Path(loc)
        if path.is_file():
            if path.suffix not in INTERPRETERS:
                log.error("runtime plugin %s: only .py and .sh plugins are supported", path)
                continue
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.rglob("*.py") if p.is_file())
            found += sorted(p for p in path.rglob("*.sh") if p.is_file())
        else:
            log.warning("runtime plugin location %s does not exist", path)
    return found


def plugin_config(config: ServerConfig) -> dict[str, Any]:
    """The aggregated configuration handed to plugins (reference keys plus kvhive's view)."""
    full = config.to_dict()
    storage = {k: full[k] for k in ("l1", "eviction", "l2") if k in full}
    data: dict[str, Any] = {
        "mp_config": full.get("mp", {}),
        "storage_manager_config": storage,
        "obs_config": {**full.get("observability", {}), **full.get("lookup_hash_log", {})},
        "http_config": {"http_host": config.http.host, "http_port": config.http.port},
        "kvhive_config": full,
    }
    if config.plugins.extra:
        data["runtime_plugin_extra_config"] = config.plugins.extra
    return data


def plugin_env(config: ServerConfig) -> dict[str, str]:
    """The environment variables added for every plugin."""
    cfg = json.dumps(plugin_config(config), default=str)
    env = {
        "LMCACHE_RUNTIME_PLUGIN_ROLE": "",
        "LMCACHE_RUNTIME_PLUGIN_CONFIG": cfg,
        "LMCACHE_RUNTIME_PLUGIN_EXTRA_CONFIG": json.dumps(config.plugins.extra),
        "LMCACHE_RUNTIME_PLUGIN_WORKER_COUNT": "1",
        "LMCACHE_RUNTIME_PLUGIN_WORKER_ID": "0",
        "LMCACHE_PLUGIN_ROLE": "",
        "LMCACHE_PLUGIN_CONFIG": cfg,
        "LMCACHE_PLUGIN_WORKER_COUNT": "1",
        "LMCACHE_PLUGIN_WORKER_ID": "0",
        "PYTHONUNBUFFERED": "1",
    }
    if config.http_admin.api_token:
        env["KVHIVE_HTTP_API_TOKEN"] = config.http_admin.api_token
    return env


@dataclass
class Plugin:
    path: Path
    proc: subprocess.Popen[bytes]
    started: float
    exit_code: int | None = None
    reader: threading.Thread | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "pid": self.proc.pid,
            "running": self.exit_code is None,
            "exit_code": self.exit_code,
            "uptime_seconds": round(time.time() - self.started, 3),
        }


class PluginLauncher:
    """Starts, forwards the output of, and stops the runtime plugins of one server."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.grace = config.plugins.stop_grace_seconds
        self.plugins: list[Plugin] = []
        self._started = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Launch every plugin once (idempotent); launch failures are logged, not raised."""
        with self._lock:
            if self._started or not self.config.plugins.locations:
                return
            self._started = True
            paths = find_plugins(self.config.plugins.locations)
            env = {**os.environ, **plugin_env(self.config)}
            for path in paths:
                cmd = [*INTERPRETERS[path.suffix], str(path)]
                try:
                    proc = subprocess.Popen(
                        cmd,
                        env=env,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own process group: stop() reaches children
                    )
                except OSError as exc:
                    log.error("runtime plugin %s failed to start: %s", path, exc)
                    continue
                plugin = Plugin(path, proc, time.time())
                plugin.reader = threading.Thread(
                    target=self._forward, args=(plugin,), name=f"plugin-{path.name}", daemon=True
                )
                plugin.reader.start()
                self.plugins.append(plugin)
                log.info("runtime plugin %s started (pid %d)", path, proc.pid)

    def _forward(self, plugin: Plugin) -> None:
        stream = plugin.proc.stdout
        assert stream is not None
        for raw in iter(stream.readline, b""):
            log.info("[plugin %s] %s", plugin.name, raw.decode(errors="replace").rstrip())
        stream.close()
        code = plugin.proc.wait()
        plugin.exit_code = code
        level = logging.INFO if code == 0 or code == -signal.SIGTERM else logging.WARNING
        log.log(level, "runtime plugin %s exited with status %d", plugin.name, code)

    def stop(self) -> None:
        """SIGTERM every running plugin, SIGKILL after the grace period, wait for output."""
        with self._lock:
            self._started = True  # a start() racing with shutdown launches nothing
        running = [p for p in self.plugins if p.proc.poll() is None]
        for p in running:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for p in running:
            try:
                p.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("runtime plugin %s ignored SIGTERM; killing it", p.name)
                _signal_group(p, signal.SIGKILL)
                p.proc.wait()
        for p in self.plugins:
            if p.reader is not None:
                p.reader.join(timeout=2.0)

    def status(self) -> list[dict[str, Any]]:
        return [p.describe() for p in self.plugins]


def _signal_group(plugin: Plugin, sig: signal.Signals) -> None:
    try:
        os.killpg(plugin.proc.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        plugin.proc.send_signal(sig)
