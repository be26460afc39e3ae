"""kvhive's direct KV-event publisher end to end: real ``kvhive server`` processes, chunks
stored through kvhive's own client (:mod:`kvhive.bench.kvengine`), and a subscriber that
decodes with vLLM's own classes (``tests/support/vllm_kv_sub.py`` in the vLLM venv).

The vLLM venv comes from ``KVHIVE_VLLM_PYTHON`` or ``scripts/setup_vllm_venv.sh
--print-path``.  Without it these tests skip, unless ``KVHIVE_REQUIRE_E2E=1`` (CI), which
turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvhive.bench.servers import ServerProcess, subprocess_env
from support.net import free_port
from support.venvs import locate_venv_python

REPO = Path(__file__).resolve().parents[2]
SUB_SCRIPT = REPO / "tests" / "support" / "vllm_kv_sub.py"
SETUP_SCRIPT = REPO / "scripts" / "setup_vllm_venv.sh"


def _required() -> bool:
    return os.environ.get("KVHIVE_REQUIRE_E2E", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def vllm_python() -> str:
    py, why = locate_venv_python("KVHIVE_VLLM_PYTHON", SETUP_SCRIPT, "vLLM")
    if py is None:
        if _required():
            pytest.fail(f"KVHIVE_REQUIRE_E2E=1 but {why}", pytrace=False)
        pytest.skip(why)
    return py


class Subscriber:
    """``vllm_kv_sub.py`` on some endpoints, writing JSON lines to ``out``."""

    def __init__(self, python: str, endpoints: list[str], out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [python, str(SUB_SCRIPT), *[a for ep in endpoints for a in ("--endpoint", ep)],
             "--out", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=subprocess_env(),
        )  # fmt: skip

    def ready(self, timeout: float = 60.0) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # vLLM imports first (5-10 s)
        assert line.strip() == "READY", f"subscriber did not start: {line!r}"
        time.sleep(0.3)  # PUB/SUB: let the subscriptions reach the publishers

    def batches(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        rows = [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]
        errors = [r for r in rows if "error" in r]
        assert not errors, f"vLLM's decoder rejected batches: {errors[:3]}"
        return rows

    def events(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for b in self.batches()
            if endpoint is None or b["endpoint"] == endpoint
            for e in b["events"]
        ]

    def wait_for(
        self, pred: Callable[[list[dict[str, Any]]], bool], what: str, timeout: float = 20.0
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.batches()
            if pred(rows):
                return rows
            time.sleep(0.1)
        summary = [
            (
                b["endpoint"],
                b["seq"],
                [(e["type"], e["medium"], e["block_hashes"]) for e in b["events"]],
            )
            for b in self.batches()
        ]
        raise AssertionError(f"timed out waiting for {what}; got {summary}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def subscribe(vllm_python: str, tmp_path: Path) -> Iterator[Callable[..., Subscriber]]:
    subs: list[Subscriber] = []

    def start(*endpoints: str) -> Subscriber:
        sub = Subscriber(vllm_python, list(endpoints), tmp_path / f"events{len(subs)}.jsonl")
        subs.append(sub)
        return sub

    yield start
    for sub in subs:
        sub.stop()


class Server(ServerProcess):
    """A ``kvhive server`` subprocess with its KV-event endpoints on free loopback ports."""

    pub_url: str = ""
    replay_url: str = ""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(*extra: str, l1_size_gb: float = 0.0625, replay: bool = False) -> Server:
        pub = f"tcp://127.0.0.1:{free_port()}"
        args = ["--kv-events-endpoint", pub, *extra]
        rep = ""
        if replay:
            rep = f"tcp://127.0.0.1:{free_port()}"
            args += ["--kv-events-replay-endpoint", rep]
        srv = Server(
            kind="kvhive",
            l1_size_gb=l1_size_gb,
            extra=args,
            log_path=tmp_path / f"server{len(started)}.log",
        )
        srv.pub_url, srv.replay_url = pub, rep
        started.append(srv)
        srv.start()
        return srv

    yield start
    for srv in started:
        srv.stop()
