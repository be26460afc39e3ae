"""The dashboard in real headless Chromium, rendering live numbers from a running server.

Skips only when no Chromium binary is installed and KVHIVE_REQUIRE_SERVICES is unset (CI sets
it: Debian's ``chromium`` package must then be there).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from kvhive.http.app import create_app
from kvhive.server.core import KvhiveServer
from support.net import free_port
from support.traffic import C, Traffic, running_server, shm_kv

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars",
]  # fmt: skip


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("KVHIVE_REQUIRE_SERVICES"):
        pytest.fail("chromium is not installed (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium)")


@pytest.fixture(scope="module")
def live() -> Iterator[tuple[KvhiveServer, str]]:
    """A real server with its HTTP app on a real port, after real traffic."""
    with running_server("--service-instance-id", "dash-1") as server, shm_kv() as kv:
        traffic = Traffic(server, kv, instance_id=4242)
        try:
            traffic.round(3, "warm")  # 3 chunks stored, looked up (all hit), retrieved
            traffic.lookup(list(range(7000, 7000 + 2 * C)), "cold")  # 2 chunks missed
            traffic.end("cold")
        finally:
            traffic.close()
        port = free_port()
        uv = uvicorn.Server(
            uvicorn.Config(
                create_app(server), host="127.0.0.1", port=port, log_level="warning",
                lifespan="off",
            )
        )  # fmt: skip
        thread = threading.Thread(target=uv.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not uv.started:
            assert time.monotonic() < deadline, "HTTP app did not start"
            time.sleep(0.02)
        try:
            yield server, f"http://127.0.0.1:{port}/dashboard"
        finally:
            uv.should_exit = True
            thread.join(10)


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=4000", *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def text_of(dom: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert match, f"#{element_id} not in the rendered page"
    return match.group(1)


def test_dashboard_renders_live_numbers(live: tuple[KvhiveServer, str], tmp_path: Path) -> None:
    server, url = live
    proc = run_chromium(tmp_path, "--dump-dom", url)
    dom = proc.stdout
    assert proc.returncode == 0 and "<html" in dom, proc.stderr[-2000:]
    updates = int(re.search(r'data-updates="(\d+)"', dom).group(1))
    assert updates >= 1, "the page never rendered data"
    stats = server.l1.stats()
    assert text_of(dom, "l1-objects") == str(stats.objects) == "3"
    assert text_of(dom, "lookups") == "2"
    assert text_of(dom, "stored") == "3" and text_of(dom, "retrieved") == "3"
    assert text_of(dom, "hit-rate-total") == "60.0%"  # 3 of 5 chunks
    assert text_of(dom, "hit-rate-l1") == "60.0%" and text_of(dom, "hit-rate-l2") == "0.0%"
    assert text_of(dom, "l1-usage") == f"{100 * stats.usage:.1f}%"
    assert text_of(dom, "health") == "healthy" and text_of(dom, "instance") == "dash-1"
    assert "4242" in dom and "obs-model" in dom  # the registered engine's row
    assert dom.count("<polyline") == 3  # L1, L2 and total series of the hit-rate chart
    l1_series = re.search(r'<polyline points="([^"]*)"[^>]*class="series-l1"', dom)
    assert l1_series and l1_series.group(1).strip(), "no hit-rate history drawn"
    assert 'id="error" class="error" hidden' in dom


def test_dashboard_screenshot(live: tuple[KvhiveServer, str], tmp_path: Path) -> None:
    _, url = live
    shot = Path(os.environ.get("KVHIVE_DASHBOARD_SCREENSHOT", tmp_path / "dashboard.png"))
    proc = run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1100,1000", url)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
