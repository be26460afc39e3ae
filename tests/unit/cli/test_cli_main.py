"""The kvhive console script: exit statuses and one-line errors."""

from __future__ import annotations

import subprocess
import sys
import types
from collections.abc import Callable

import pytest

import kvhive
import kvhive.cli
from kvhive.cli.main import main
from kvhive.config import ServerConfig

REQUIRED = ["--l1-size-gb", "1", "--eviction-policy", "LRU"]


@pytest.fixture
def fake_serve(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[ServerConfig]]:
    """Replace kvhive.cli.serve with a stub whose serve() records its config."""

    def install(result: int = 0, raises: BaseException | None = None) -> list[ServerConfig]:
        calls: list[ServerConfig] = []

        def serve(config: ServerConfig) -> int:
            calls.append(config)
            if raises is not None:
                raise raises
            return result

        stub = types.ModuleType("kvhive.cli.serve")
        stub.serve = serve  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "kvhive.cli.serve", stub)
        monkeypatch.setattr(kvhive.cli, "serve", stub, raising=False)
        return calls

    return install


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err.strip()


def test_server_passes_the_config_to_serve(fake_serve: Callable[..., list[ServerConfig]]) -> None:
    calls = fake_serve(result=0)
    assert main(["server", *REQUIRED, "--port", "6001", "--max-workers", "3"]) == 0
    (config,) = calls
    assert (config.mp.port, config.mp.max_gpu_workers, config.l1.size_gb) == (6001, 3, 1.0)


def test_serve_exit_status_is_returned(fake_serve: Callable[..., list[ServerConfig]]) -> None:
    fake_serve(result=3)
    assert main(["server", *REQUIRED]) == 3


def test_ctrl_c_exits_130(fake_serve: Callable[..., list[ServerConfig]]) -> None:
    fake_serve(raises=KeyboardInterrupt())
    assert main(["server", *REQUIRED]) == 130


def test_a_failing_command_exits_1_with_a_logged_traceback(
    fake_serve: Callable[..., list[ServerConfig]], capsys: pytest.CaptureFixture[str]
) -> None:
    fake_serve(raises=RuntimeError("boom"))
    assert main(["server", *REQUIRED]) == 1
    err = capsys.readouterr().err
    assert "kvhive server failed" in err and "RuntimeError: boom" in err


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["--port", "0"], "kvhive server: error: --port must be in 1..65535 (got 0)"),
        (["--port", "x"], "kvhive server: error: --port must be an integer (got 'x')"),
        (["--eviction-policy", "FIFO"], "kvhive server: error: --eviction-policy must be one of LRU, IsolatedLRU, noop (got 'FIFO')"),
        (["--hash-algorithm", "xxhash"], "kvhive server: error: --hash-algorithm must be one of builtin, sha256_cbor, blake3 (got 'xxhash')"),
        (["--engine-type", "blend"], "kvhive server: error: --engine-type: not supported by kvhive: --engine-type blend (the CacheBlend engine and its cb_* operations) is not built; use --engine-type default"),
        (["--transport", "grpc"], "kvhive server: error: --transport: not supported by kvhive: --transport grpc is not built; kvhive serves LMCache's ZMQ protocol only (--transport zmq, the default)"),
        (["--l2-adapter", '{"type": "nixl_store", "backend": "POSIX", "pool_size": 4}'], "kvhive server: error: --l2-adapter #0 (nixl_store): backend POSIX needs backend_params.file_path"),
        (["--l2-adapter", '{"type": "fs"}'], "kvhive server: error: --l2-adapter #0 (fs): field 'base_path' is required"),
        (["--enable-tracing"], "kvhive server: error: --enable-tracing requires --otlp-endpoint"),
        (["--runtime-plugin-config", "{x"], "kvhive server: error: --runtime-plugin-config must be valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
        (["--metrics-sample-rate", "2"], "kvhive server: error: --metrics-sample-rate must be in (0, 1] (got 2.0)"),
        (["--worker-reap-timeout-seconds", "10"], "kvhive server: error: --worker-reap-timeout-seconds must be 0 (disabled) or >= 30 (got 10.0)"),
        (["--frobnicate", "3"], "kvhive server: error: --frobnicate is not a known option"),
        (["--chunk-size"], "kvhive server: error: --chunk-size expected one argument"),
    ],
)  # fmt: skip
def test_bad_flags_exit_2_with_one_line(
    argv: list[str],
    line: str,
    fake_serve: Callable[..., list[ServerConfig]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls = fake_serve()
    assert main(["server", *REQUIRED, *argv]) == 2
    assert one_line_error(capsys) == line
    assert calls == []


def test_missing_required_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["server", "--eviction-policy", "LRU"]) == 2
    assert one_line_error(capsys) == "kvhive server: error: --l1-size-gb is required"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out == f"kvhive {kvhive.__version__}\n"
    assert main(["--version"]) == 0
    assert kvhive.__version__ in capsys.readouterr().out


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: kvhive" in err and "server" in err and "version" in err


def test_unknown_command_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve"]) == 2
    err = one_line_error(capsys)
    assert err.startswith("kvhive: error:") and "'server'" in err


def test_server_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["server", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--l1-size-gb" in out and "--http-port" in out and "Not supported by kvhive" in out


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvhive", *args], capture_output=True, text=True, timeout=60
    )


def test_python_dash_m_version() -> None:
    proc = run_module("version")
    assert (proc.returncode, proc.stdout) == (0, f"kvhive {kvhive.__version__}\n")


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--http-port", "70000"], "--http-port"),
        (["--eviction-policy", "FIFO"], "--eviction-policy"),
        (["--prometheus-port", "0"], "--prometheus-port"),
        (["--eviction-policy", "ARC"], "--eviction-policy:"),  # refused: "--flag: not supported"
    ],
)
def test_python_dash_m_server_rejects_bad_flags(argv: list[str], flag: str) -> None:
    proc = run_module("server", *REQUIRED, *argv)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"kvhive server: error: {flag} ")
    assert proc.stderr.count("\n") == 1
