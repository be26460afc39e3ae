"""Real backends for the L2 adapter tests: a temp directory, device files, a gcc-built C
plugin, a redis-server and a moto S3 server, each started on a free loopback port.

A missing service binary or package skips its tests with the reason, unless
``KVHIVE_REQUIRE_SERVICES=1`` (set by CI), which turns the skip into a failure.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvhive.bench.l2_services import stop as _stop
from kvhive.bench.l2_services import wait_port as _wait_port
from kvhive.storage.l1 import L1Manager
from support.l1 import make_l1
from support.l2kit import Opener, open_adapters
from support.net import free_port
from support.redis_cluster import LocalCluster, binaries
from support.require import services_required, unavailable  # noqa: F401 - re-exported

HERE = Path(__file__).resolve().parent


def nixl_available() -> None:
    """Skip (fail in CI) unless NIXL's cu12 build imports."""
    try:
        import nixl_cu12._api  # noqa: F401
    except ImportError as exc:
        unavailable(f"NIXL is not installed ({exc}): pip install --no-deps nixl-cu12==1.5.1")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    exe = shutil.which("redis-server") or shutil.which("valkey-server")
    if exe is None:
        unavailable("redis-server is not installed (apt-get install -y redis-server)")
    try:
        import redis  # noqa: F401
    except ImportError:
        unavailable("redis-py is not installed (pip install 'kvhive[redis]')")
    port = free_port()
    work = tmp_path_factory.mktemp("redis")
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(work), "--protected-mode", "no"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc, "redis-server")
        yield "127.0.0.1", port
    finally:
        _stop(proc)


def cluster_available() -> None:
    """Skip (fail in CI) unless redis-server, redis-cli and redis-py are installed."""
    if binaries() is None:
        unavailable("redis-server/redis-cli are not installed (apt-get install -y redis-server)")
    try:
        import redis  # noqa: F401
    except ImportError:
        unavailable("redis-py is not installed (pip install 'kvhive[redis]')")


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """A 3-master + 3-replica cluster on loopback, shared by the session (never broken by a
    test: the failover test starts its own)."""
    cluster_available()
    with LocalCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server; yields the path-style endpoint of a fresh bucket."""
    try:
        import awscrt  # noqa: F401
        import moto.server  # noqa: F401
    except ImportError as exc:
        unavailable(f"{exc.name} is not installed (pip install 'kvhive[s3]' 'moto[server]')")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait_port(port, proc, "moto server")
        urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{port}/kvhive", method="PUT")
        )
        yield f"http://127.0.0.1:{port}/kvhive"
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def sample_plugin(tmp_path_factory: pytest.TempPathFactory) -> str:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        unavailable("gcc is not installed (apt-get install -y gcc)")
    out = tmp_path_factory.mktemp("plugin") / "libsample_plugin.so"
    subprocess.run([gcc, "-O2", "-shared", "-fPIC", "-o", str(out), str(HERE / "sample_plugin.c"),
                    "-lpthread"], check=True)  # fmt: skip
    return str(out)


@pytest.fixture
def adapter_json(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """``adapter_json(kind, **extra)``: a JSON object for ``kind`` on this test's backends."""

    def make(kind: str, **extra: Any) -> dict[str, Any]:
        base: dict[str, Any]
        if kind in ("fs", "fs_native"):
            base = {"base_path": str(tmp_path / kind)}
        elif kind == "mock":
            base = {"max_size_gb": 1, "mock_bandwidth_gb": 50}
        elif kind == "raw_block":
            base = {"device_path": str(tmp_path / "raw.img"), "slot_bytes": 1 << 18,
                    "capacity_bytes": 8 << 20, "meta_total_bytes": 1 << 20}  # fmt: skip
        elif kind == "dax":
            base = {"device_path": str(tmp_path / "dax.img"), "max_dax_size_gb": 8 / 1024,
                    "slot_bytes": 1 << 18}  # fmt: skip
        elif kind == "plugin":
            base = {"module_path": str(HERE / "py_plugin.py"), "class_name": "DictStore"}
        elif kind == "native_plugin":
            base = {"library_path": request.getfixturevalue("sample_plugin")}
        elif kind == "resp":
            host, port = request.getfixturevalue("redis_server")
            base = {"host": host, "port": port}
        elif kind == "valkey":
            cluster = request.getfixturevalue("redis_cluster")
            base = {"startup_nodes": cluster.startup_nodes, "cluster_mode": True}
        elif kind == "s3":
            endpoint = request.getfixturevalue("s3_server")
            base = {"s3_endpoint": endpoint, "s3_region": "us-east-1", "disable_tls": True,
                    "aws_access_key_id": "test", "aws_secret_access_key": "test",
                    "s3_num_io_threads": 2}  # fmt: skip
        elif kind == "nixl_store":
            nixl_available()
            base = {"backend": "POSIX", "pool_size": 4, "backend_params": {
                "file_path": str(tmp_path / kind), "use_direct_io": "false",
                "file_size": str(1 << 20)}}  # fmt: skip
        elif kind == "nixl_store_dynamic":
            nixl_available()
            base = {"backend": "POSIX", "backend_params": {
                "file_path": str(tmp_path / kind), "use_direct_io": "false",
                "max_capacity_gb": "1"}}  # fmt: skip
        else:
            raise ValueError(kind)
        return {"type": kind, **base, **extra}

    return make


@pytest.fixture
def open_adapter() -> Iterator[Opener]:
    """``open_adapter(json)``: a ManagedAdapter, closed at teardown (or by the test)."""
    yield from open_adapters()


@pytest.fixture
def l1() -> Iterator[L1Manager]:
    manager = make_l1(size_bytes=32 << 20, watermark=0.95)
    yield manager
    manager.close()
