"""HTTP API keys as lmcache 0.5.7 defines them (``--api-key-file``, ``$LMCACHE_API_KEY[_FILE]``,
legacy ``$LMCACHE_HTTP_API_KEY[_FILE]``) next to kvhive's ``--http-api-token``.

With a key, every path but ``/`` and ``/healthcheck`` needs it (reads included); the admin token
still guards changes.  In-process tests use a real KvhiveServer behind the app; the last test
starts ``kvhive server`` and talks to its HTTP port.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from kvhive.cli.main import main
from kvhive.config import HTTPAdminConfig
from kvhive.errors import ConfigError
from kvhive.http.app import create_app, load_api_keys
from kvhive.http.routes._auth import ApiKeys
from kvhive.server.core import KvhiveServer
from support.net import free_port
from support.servers import running_server

TOKEN = "admin-token-7"
KEY1, KEY2 = "key-one-aaaaaaaa", "key-two-bbbbbbbb"
ENV_VARS = (
    "LMCACHE_API_KEY",
    "LMCACHE_API_KEY_FILE",
    "LMCACHE_HTTP_API_KEY",
    "LMCACHE_HTTP_API_KEY_FILE",
)
DENIED = {"detail": "Invalid or missing API key"}


@pytest.fixture(autouse=True)
def _no_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys")
    (path / "k1").write_text(KEY1 + "\n")
    (path / "k2").write_text(f"  {KEY2}  \n")
    (path / "env").write_text("key-from-env-file\n")
    (path / "legacy").write_text("key-from-legacy-file\n")
    (path / "empty").write_text("\n \n")
    (path / "two").write_text("a\nb\n")
    return path


@pytest.fixture(scope="module")
def server(keys_dir: Path) -> Iterator[KvhiveServer]:
    with running_server(
        "--api-key-file", str(keys_dir / "k1"), "--http-api-key-file", str(keys_dir / "k2"),
        "--http-api-token", TOKEN, "--service-instance-id", "keys-1",
    ) as srv:  # fmt: skip
        yield srv


@pytest.fixture(scope="module")
def open_server() -> Iterator[KvhiveServer]:
    with running_server("--http-api-token", TOKEN) as srv:
        yield srv


def http(server: KvhiveServer) -> TestClient:
    """A client of a fresh app: API keys are read (files and environment) when it is built."""
    return TestClient(create_app(server))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_liveness_paths_stay_open(server: KvhiveServer) -> None:
    c = http(server)
    assert c.get("/").status_code == 200
    assert c.get("/healthcheck").json() == {"status": "healthy"}


@pytest.mark.parametrize(
    "path",
    ["/status", "/config", "/metrics", "/version", "/loglevel", "/quota", "/docs",
     "/openapi.json", "/dashboard", "/dashboard/data", "/cache/objects?tier=l1", "/nowhere",
     "/healthcheck/", "/?x"],
)  # fmt: skip
def test_every_other_path_needs_a_key_reads_included(server: KvhiveServer, path: str) -> None:
    c = http(server)
    if path == "/?x":  # the query string is not part of the path: still public
        assert c.get(path).status_code == 200
        return
    r = c.get(path)
    assert (r.status_code, r.json()) == (401, DENIED)
    assert r.headers["www-authenticate"] == "Bearer"
    assert c.get(path, headers=bearer(KEY1)).status_code != 401


@pytest.mark.parametrize(
    "headers",
    [
        bearer(KEY1),
        bearer(KEY2),  # whitespace around the key in its file is stripped
        {"authorization": f"bearer {KEY1}"},  # the scheme is case-insensitive
        {"X-LMCache-API-Key": KEY2},
        {"Authorization": "Bearer wrong", "X-LMCache-API-Key": KEY1},  # either header may match
        bearer(TOKEN),  # the admin token reads too
    ],
)
def test_accepted_credentials(server: KvhiveServer, headers: dict[str, str]) -> None:
    assert http(server).get("/status", headers=headers).json()["service_instance_id"] == "keys-1"


@pytest.mark.parametrize(
    "headers",
    [
        bearer("wrong"),
        bearer(KEY1 + "x"),
        {"Authorization": KEY1},
        {"Authorization": f"Basic {KEY1}"},
        {"Authorization": "Bearer "},
        {"X-API-Token": KEY1},  # kvhive's token header is not an API-key header
    ],
)
def test_refused_credentials(server: KvhiveServer, headers: dict[str, str]) -> None:
    r = http(server).get("/status", headers=headers)
    assert (r.status_code, r.json()) == (401, DENIED)


def test_changes_need_the_admin_token_an_api_key_is_not_enough(server: KvhiveServer) -> None:
    c = http(server)
    assert c.post("/cache/clear").json() == DENIED  # no key at all: the API-key check answers
    r = c.post("/cache/clear", headers=bearer(KEY1))
    assert r.status_code == 401 and "http-api-token" in r.json()["detail"]
    assert c.post("/cache/clear", headers=bearer(TOKEN)).json()["status"] == "ok"
    both = {"X-LMCache-API-Key": KEY1, "X-API-Token": TOKEN}
    assert c.post("/cache/clear", headers=both).json()["status"] == "ok"


def test_config_shows_key_files_never_keys(server: KvhiveServer, keys_dir: Path) -> None:
    r = http(server).get("/config", headers=bearer(KEY1))
    admin = r.json()["http_admin"]
    assert admin["api_key_files"] == [str(keys_dir / "k1"), str(keys_dir / "k2")]
    assert admin["api_token"] == "***"
    assert KEY1 not in r.text and KEY2 not in r.text and TOKEN not in r.text


def test_without_keys_reads_stay_open_and_the_token_still_guards_changes(
    open_server: KvhiveServer,
) -> None:
    c = http(open_server)
    assert c.get("/status").status_code == 200
    assert c.post("/cache/clear").status_code == 401
    assert c.post("/cache/clear", headers=bearer(TOKEN)).status_code == 200


def test_environment_keys(
    open_server: KvhiveServer, keys_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMCACHE_API_KEY", "key-from-env")
    monkeypatch.setenv("LMCACHE_API_KEY_FILE", str(keys_dir / "env"))
    c = http(open_server)
    assert c.get("/status").status_code == 401
    for key in ("key-from-env", "key-from-env-file", TOKEN):
        assert c.get("/status", headers=bearer(key)).status_code == 200


def test_legacy_variables_count_only_when_the_new_ones_are_unset(
    open_server: KvhiveServer, keys_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMCACHE_HTTP_API_KEY", "legacy-key")
    monkeypatch.setenv("LMCACHE_HTTP_API_KEY_FILE", str(keys_dir / "legacy"))
    c = http(open_server)
    for key in ("legacy-key", "key-from-legacy-file"):
        assert c.get("/status", headers=bearer(key)).status_code == 200
    monkeypatch.setenv("LMCACHE_API_KEY", "new-key")
    monkeypatch.setenv("LMCACHE_API_KEY_FILE", "")  # empty counts as unset: legacy file used
    c = http(open_server)
    assert c.get("/status", headers=bearer("new-key")).status_code == 200
    assert c.get("/status", headers=bearer("legacy-key")).status_code == 401
    assert c.get("/status", headers=bearer("key-from-legacy-file")).status_code == 200


@pytest.mark.parametrize(
    ("source", "name", "fragment"),
    [
        ("flag", "missing", "cannot be read"),
        ("flag", "empty", "is empty"),
        ("flag", "two", "must hold one key on one line"),
        ("LMCACHE_API_KEY_FILE", "two", "must hold one key on one line"),
        ("LMCACHE_HTTP_API_KEY_FILE", "missing", "cannot be read"),
    ],
)
def test_bad_key_files_are_config_errors_naming_their_source(
    keys_dir: Path, monkeypatch: pytest.MonkeyPatch, source: str, name: str, fragment: str
) -> None:
    path = str(keys_dir / name)
    if source == "flag":
        config, expected = HTTPAdminConfig(api_key_files=(path,)), "--api-key-file"
    else:
        monkeypatch.setenv(source, path)
        config, expected = HTTPAdminConfig(), source
    with pytest.raises(ConfigError) as info:
        load_api_keys(config)
    assert info.value.flag == expected and fragment in info.value.message


def test_kvhive_server_exits_2_on_a_bad_key_file(
    keys_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "server", "--l1-size-gb", "0.0625", "--eviction-policy", "LRU", "--host", "127.0.0.1",
        "--port", str(free_port()), "--http-port", str(free_port()),
        "--api-key-file", str(keys_dir / "empty"),
    ]  # fmt: skip
    assert main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    empty = str(keys_dir / "empty")
    assert line == (
        f"kvhive server: error: --api-key-file {empty!r} is empty (an API key file holds one key)"
    )


def test_keys_are_never_shown() -> None:
    keys = load_api_keys(HTTPAdminConfig(api_token=TOKEN))
    assert not keys.enabled  # the admin token alone turns on no API-key check
    assert repr(ApiKeys((b"secret",))) == "ApiKeys(enabled=True, count=1)"


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, object]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_real_kvhive_server_process(keys_dir: Path) -> None:
    """Keys from a file and the legacy variable, over a real HTTP port; the no-effect flags
    given are logged at start."""
    rpc, port = free_port(), free_port()
    env = {**os.environ, "LMCACHE_HTTP_API_KEY": "legacy-env-key"}
    for name in ("LMCACHE_API_KEY", "LMCACHE_API_KEY_FILE", "LMCACHE_HTTP_API_KEY_FILE"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "kvhive", "server", "--l1-size-gb", "0.0625",
            "--eviction-policy", "LRU", "--host", "127.0.0.1", "--port", str(rpc),
            "--http-port", str(port), "--api-key-file", str(keys_dir / "k1"),
            "--prometheus-port", str(free_port()), "--isolated-ipc", "--instance-id", "proc-1",
        ],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if _get(base + "/healthcheck")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        assert _get(base + "/") == (200, {"status": "ok", "service": "kvhive HTTP API"})
        assert _get(base + "/status") == (401, DENIED)
        assert _get(base + "/metrics", bearer("nope"))[0] == 401
        code, status = _get(base + "/status", bearer(KEY1))
        assert code == 200 and isinstance(status, dict)
        assert status["service_instance_id"] == "proc-1"
        assert _get(base + "/status", {"X-LMCache-API-Key": "legacy-env-key"})[0] == 200
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert "--isolated-ipc=True accepted, no effect: it changes only CUDA IPC" in err
    assert "HTTP API keys: 2 accepted; every path but / and /healthcheck needs one" in err
