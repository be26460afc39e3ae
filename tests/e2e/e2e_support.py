"""Helpers of the end-to-end tests (not fixtures): locating the vLLM venv, kvhive server
subprocesses, and runs of the vLLM driver.  See conftest.py for the overview."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kvhive.bench.servers import ServerProcess, subprocess_env
from support.venvs import locate_venv_python

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().parent / "drivers" / "vllm_generate.py"
SETUP_SCRIPT = REPO / "scripts" / "setup_vllm_venv.sh"
RESULT_MARK = "@@KVHIVE_E2E_RESULT@@ "

#: One prompt for every run: 6 full chunks of 256 tokens plus a 175-token tail.
PROMPT_TOKENS = 1711
MAX_TOKENS = 24
#: float32, not bfloat16: this CPU has no AVX-512, so vLLM's bf16 matmuls take a slow
#: fallback (about 25 s per prompt instead of 7 s), and in bf16 a prefill that continues from
#: loaded KV rounds differently from a full prefill, so the greedy text drifts after ~15 tokens
#: (with `lmcache server` exactly as with kvhive).  In float32 the text is identical.
DTYPE = "float32"
DRIVER_TIMEOUT_S = 420.0


def require_e2e() -> bool:
    return os.environ.get("KVHIVE_REQUIRE_E2E", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    if require_e2e():
        pytest.fail(f"e2e required (KVHIVE_REQUIRE_E2E=1) but unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


@dataclass(frozen=True)
class VllmEnv:
    python: str
    model: str


def locate() -> tuple[VllmEnv | None, str]:
    py, reason = locate_venv_python("KVHIVE_VLLM_PYTHON", SETUP_SCRIPT, "vLLM")
    if py is None:
        return None, reason
    model = os.environ.get("KVHIVE_VLLM_MODEL", "").strip() or str(
        Path(py).parent.parent / "kvhive-model"
    )
    if not os.path.isfile(os.path.join(model, "config.json")):
        return None, f"converted model missing at {model} (run scripts/setup_vllm_venv.sh)"
    return VllmEnv(py, model), ""


def require_vllm_env() -> VllmEnv:
    """The located vLLM venv, or skip (fail under ``KVHIVE_REQUIRE_E2E=1``) with the reason."""
    env, reason = locate()
    if env is None:
        unavailable(reason)
    assert env is not None
    return env


#: (title, provider) of the servers and driver runs of the session (e2e runs are few).
CONTEXT: list[tuple[str, Any]] = []


def _last(text: str, n: int) -> str:
    return "\n".join(text.splitlines()[-n:])


@dataclass
class Servers:
    log_dir: Path
    started: list[ServerProcess] = field(default_factory=list)

    def start(self, extra: list[str] | None = None, l1_size_gb: float = 2.0) -> ServerProcess:
        n = len(self.started)
        server = ServerProcess(
            "kvhive", l1_size_gb, list(extra or []), log_path=self.log_dir / f"kvhive-{n}.log"
        )
        self.started.append(server)
        CONTEXT.append((f"kvhive server {n} log (tail)", server.log_tail))
        server.start()
        return server

    def stop_all(self) -> None:
        for s in self.started:
            s.stop()


@dataclass
class RunResult:
    mode: str
    requests: list[dict[str, Any]]
    raw: dict[str, Any]

    @property
    def cold(self) -> dict[str, Any]:
        return self.requests[0]

    @property
    def repeat(self) -> dict[str, Any]:
        return self.requests[-1]


def run_vllm(
    env: VllmEnv, mode: str, *, port: int | None = None, repeats: int = 2, pause_s: float = 0.0
) -> RunResult:
    """Run the vLLM driver once (a fresh engine) and return its parsed result; ``pause_s``
    between the repeats lets the server finish work the first request left behind."""
    argv = [
        env.python, str(DRIVER),
        "--model", env.model,
        "--mode", mode,
        "--prompt-tokens", str(PROMPT_TOKENS),
        "--max-tokens", str(MAX_TOKENS),
        "--repeats", str(repeats),
        "--pause-s", str(pause_s),
        "--dtype", DTYPE,
    ]  # fmt: skip
    if port is not None:
        argv += ["--port", str(port)]
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=DRIVER_TIMEOUT_S,
            cwd=str(DRIVER.parent),
            env=subprocess_env(),
            stdin=subprocess.DEVNULL,
            check=False,
        )
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        err = (exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else "") + (
            f"\n<driver timed out after {DRIVER_TIMEOUT_S}s>"
        )
        rc = None
    n = len(CONTEXT)
    CONTEXT.append(
        (
            f"vLLM driver run {n} ({mode})",
            lambda: (
                f"$ {' '.join(argv)}\n--- stdout ---\n{_last(out, 40)}\n"
                f"--- stderr ---\n{_last(err, 80)}"
            ),
        )
    )
    result = None
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_MARK):
            result = json.loads(line[len(RESULT_MARK) :])
            break
    if rc != 0 or result is None:
        pytest.fail(
            f"vLLM driver failed (rc={rc}, mode {mode})\n$ {' '.join(argv)}\n"
            f"--- stdout (tail) ---\n{_last(out, 30)}\n--- stderr (tail) ---\n{_last(err, 60)}",
            pytrace=False,
        )
    assert result is not None
    return RunResult(mode, result["requests"], result)


def full_chunk_prefix(prompt_tokens: int, chunk_size: int) -> int:
    """Tokens the connector can load: whole chunks only; a prompt that is all whole chunks
    keeps its last token for vLLM to compute."""
    hit = prompt_tokens // chunk_size * chunk_size
    return hit - 1 if hit == prompt_tokens else hit


def baseline(env: VllmEnv) -> RunResult:
    """The prompt through vLLM with no connector at all (the oracle of every e2e check).

    It involves no kvhive code, so it is computed once per vLLM venv, model, driver source and
    prompt settings and kept in ``<venv>/kvhive-baselines/<key>.json``: the e2e, fleet and
    Mooncake suites (separate pytest processes) then share one run instead of three, and a
    change to any of those inputs computes it afresh.  ``KVHIVE_E2E_FRESH_BASELINE=1`` ignores
    the cache."""
    model = Path(env.model)
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model.iterdir())
    inputs = [env.python, env.model, weights, DRIVER.read_text(), PROMPT_TOKENS, MAX_TOKENS, DTYPE]
    key = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:24]
    cache = Path(env.python).parent.parent / "kvhive-baselines" / f"{key}.json"
    fresh = os.environ.get("KVHIVE_E2E_FRESH_BASELINE", "").strip() in ("1", "true", "yes")
    if not fresh:
        try:
            raw = json.loads(cache.read_text())
            return RunResult("none", raw["requests"], raw)
        except (OSError, ValueError, KeyError):
            pass
    run = run_vllm(env, "none", repeats=1)
    try:
        cache.parent.mkdir(exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(run.raw))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only venv: every suite computes its own
    return run
