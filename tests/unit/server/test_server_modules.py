"""Server modules (``--server-module``) through a real server and kvhive's client.

The module under test is written to a temporary directory put on ``sys.path``; it serves a
plain and an affinity method, one marked the LMCache way, one that raises and one that returns
no bytes.  ``tests/interop/test_interop_server_modules.py`` sends the same calls with the
lmcache 0.5.6 client's own request types.
"""

from __future__ import annotations

import json
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvhive.cli.main import main
from kvhive.client import KvhiveClient, RemoteError
from kvhive.config import parse_server_args
from kvhive.errors import ConfigError
from kvhive.server.core import KvhiveServer
from kvhive.server.modules import (
    ServerModules,
    ServerModuleSpec,
    handler,
    load_server_modules,
)
from kvhive.wire.types import ServerModuleCallRequest, ServerModuleCallResponse
from support.net import free_port
from support.servers import running_server, server_args

MODULE = "kvh_test_server_module"
SOURCE = """
import threading
from types import SimpleNamespace

from kvhive.server.modules import handler

CLOSED = []
BUILT = []


def _lmcache_marked(method, affinity=False):
    # what LMCache's @server_module_handler leaves on a method (0.5.7 form)
    def mark(fn):
        fn.__lmcache_server_module_handler__ = SimpleNamespace(
            method=method, requires_client_affinity=affinity)
        return fn
    return mark


class Demo:
    def __init__(self, config):
        self.prefix = config.get("prefix", "").encode()
        self.calls = 0

    @handler("demo.echo")
    def echo(self, payload):
        self.calls += 1
        return self.prefix + payload

    @handler("demo.where")
    def where(self, payload):
        return threading.current_thread().name.encode()

    @handler("demo.ordered", affinity=True)
    def ordered(self, payload):
        return b"affinity:" + threading.current_thread().name.encode() + b":" + payload

    @handler("demo.boom")
    def boom(self, payload):
        raise ValueError("no luck with " + payload.decode())

    @handler("demo.silent")
    def silent(self, payload):
        raise KeyError()

    @handler("demo.text")
    def text(self, payload):
        return "not bytes"

    @_lmcache_marked("demo.lmcache")
    def lmcache_style(self, payload):
        return bytearray(b"lm:" + payload)

    @_lmcache_marked("demo.lmcache_affinity", affinity=True)
    def lmcache_affinity(self, payload):
        return memoryview(b"lma")

    def report_status(self):
        return {"calls": self.calls}

    def close(self):
        CLOSED.append(self.prefix)


def build_server_modules(ctx):
    BUILT.append((dict(ctx.config), ctx.module_path, ctx.server_config.mp.chunk_size))
    return Demo(ctx.config)


def other_factory(ctx):
    return [Second(), Second2()]


class Second:
    @handler("other.one")
    def one(self, payload):
        return b"1"

    def close(self):
        CLOSED.append(b"second")


class Second2:
    @handler("demo.echo")
    def clash(self, payload):
        return b""

    def close(self):
        CLOSED.append(b"second2")


def failing(ctx):
    raise RuntimeError("factory says no")


not_callable = 3
"""


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("server_modules")
    (path / f"{MODULE}.py").write_text(textwrap.dedent(SOURCE))
    sys.path.insert(0, str(path))
    yield path
    sys.path.remove(str(path))
    sys.modules.pop(MODULE, None)


def spec(**fields: object) -> str:
    return json.dumps({"module_path": MODULE, **fields})


@pytest.fixture(scope="module")
def server(module_dir: Path) -> Iterator[KvhiveServer]:
    with running_server("--server-module", spec(config={"prefix": "> "})) as srv:
        yield srv


@pytest.fixture
def client(server: KvhiveServer) -> Iterator[KvhiveClient]:
    with KvhiveClient(f"tcp://127.0.0.1:{server.config.mp.port}", timeout=10) as c:
        yield c


def call(client: KvhiveClient, op: str, method: str, payload: bytes) -> ServerModuleCallResponse:
    request = ServerModuleCallRequest(method=method, payload=payload)
    result: ServerModuleCallResponse = client.call(op, request, type_=ServerModuleCallResponse)
    return result


def test_plain_call_runs_the_handler_on_the_cpu_pool(client: KvhiveClient) -> None:
    assert call(client, "server_module_call", "demo.echo", b"hi") == ServerModuleCallResponse(
        True, b"> hi", ""
    )
    where = call(client, "server_module_call", "demo.where", b"")
    assert where.success and where.payload.startswith(b"kvhive-cpu")


def test_affinity_call_runs_on_the_connections_affinity_thread(client: KvhiveClient) -> None:
    first = call(client, "server_module_affinity_call", "demo.ordered", b"1")
    second = call(client, "server_module_affinity_call", "demo.ordered", b"2")
    assert first.success and first.payload.startswith(b"affinity:kvhive-aff")
    thread = first.payload.split(b":")[1]
    assert second.payload == b"affinity:" + thread + b":2"  # the same slot every time


def test_methods_marked_the_lmcache_way_are_served(client: KvhiveClient) -> None:
    assert call(client, "server_module_call", "demo.lmcache", b"x").payload == b"lm:x"
    assert call(client, "server_module_affinity_call", "demo.lmcache_affinity", b"").payload == (
        b"lma"
    )


@pytest.mark.parametrize(
    ("op", "method", "error"),
    [
        ("server_module_call", "demo.nope", "unknown server module method: demo.nope"),
        ("server_module_affinity_call", "demo.nope", "unknown server module method: demo.nope"),
        (
            "server_module_call",
            "demo.ordered",
            "server module method demo.ordered is served by server_module_affinity_call",
        ),
        (
            "server_module_affinity_call",
            "demo.echo",
            "server module method demo.echo is served by server_module_call",
        ),
        ("server_module_call", "demo.boom", "no luck with x"),
        ("server_module_call", "demo.silent", "KeyError"),
        ("server_module_call", "demo.text", "handler returned str, not bytes"),
    ],
)
def test_failures_are_answers(client: KvhiveClient, op: str, method: str, error: str) -> None:
    assert call(client, op, method, b"x") == ServerModuleCallResponse(False, b"", error)


def test_undecodable_request_gets_an_error_reply_naming_the_field(client: KvhiveClient) -> None:
    with pytest.raises(RemoteError) as info:
        client.call("server_module_call", {"payload": b"x"})
    assert "missing required field `method`" in str(info.value)
    with pytest.raises(RemoteError, match="takes 1 argument frame"):
        client.call("server_module_affinity_call")


def test_status_shows_the_modules(server: KvhiveServer, client: KvhiveClient) -> None:
    call(client, "server_module_call", "demo.echo", b"")
    status = server.status()["server_modules"]
    assert status["methods"] == [
        "demo.boom", "demo.echo", "demo.lmcache", "demo.silent", "demo.text", "demo.where",
    ]  # fmt: skip
    assert status["affinity_methods"] == ["demo.lmcache_affinity", "demo.ordered"]
    assert status["modules"][0]["calls"] >= 1


def test_the_factory_gets_its_config_and_close_runs_at_shutdown(module_dir: Path) -> None:
    module = sys.modules.get(MODULE) or __import__(MODULE)
    module.BUILT.clear()
    module.CLOSED.clear()
    with running_server("--server-module", spec(config={"prefix": "z"}), "--chunk-size", "64"):
        assert module.BUILT == [({"prefix": "z"}, MODULE, 64)]
        assert module.CLOSED == []
    assert module.CLOSED == [b"z"]


def test_without_modules_both_calls_still_answer() -> None:
    with running_server() as srv, KvhiveClient(f"tcp://127.0.0.1:{srv.config.mp.port}") as c:
        for op in ("server_module_call", "server_module_affinity_call"):
            assert call(c, op, "x.y", b"") == ServerModuleCallResponse(
                False, b"", "unknown server module method: x.y"
            )
        assert srv.status()["server_modules"] == {
            "methods": [],
            "affinity_methods": [],
            "modules": [],
        }


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ('{"module_path": "kvh_no_such_module_x"}', "#0 (kvh_no_such_module_x): cannot import"),
        (spec(factory_name="missing"), "no factory function 'missing'"),
        (spec(factory_name="not_callable"), "no factory function 'not_callable'"),
        (spec(factory_name="failing"), "failing() failed: RuntimeError: factory says no"),
    ],
)
def test_load_failures_name_the_flag(module_dir: Path, value: str, fragment: str) -> None:
    config = parse_server_args(server_args("--server-module", value))
    with pytest.raises(ConfigError) as info:
        KvhiveServer(config)
    assert info.value.flag == "--server-module"
    assert fragment in info.value.message


def test_a_method_served_twice_is_refused_and_built_objects_are_closed(module_dir: Path) -> None:
    module = sys.modules.get(MODULE) or __import__(MODULE)
    module.CLOSED.clear()
    config = parse_server_args(server_args())
    specs = [
        ServerModuleSpec(MODULE),
        ServerModuleSpec(MODULE, "other_factory"),
    ]
    with pytest.raises(ConfigError, match=r"method 'demo\.echo' is served by two modules"):
        load_server_modules(specs, config)
    assert module.CLOSED == [b"second2", b"second", b""]  # reverse load order


def test_kvhive_server_exits_2_for_a_module_that_does_not_load(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [
        "server", "--l1-size-gb", "0.0625", "--eviction-policy", "LRU", "--host", "127.0.0.1",
        "--port", str(free_port()), "--http-port", str(free_port()),
        "--server-module", "kvh_no_such_module_y",
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("kvhive server: error: --server-module #0 (kvh_no_such_module_y): ")


def test_handler_names_must_be_namespaced() -> None:
    for bad in ("echo", "", ".echo", "echo.", " a.b"):
        with pytest.raises(ValueError, match="namespaced"):
            handler(bad)


def test_a_handler_that_fails_does_not_stop_the_next() -> None:
    calls = threading.Event()

    def boom(payload: bytes) -> bytes:
        calls.set()
        raise RuntimeError("x")

    modules = ServerModules({"a.b": boom, "a.c": lambda p: p})
    assert not modules.call(ServerModuleCallRequest("a.b", b"")).success and calls.is_set()
    assert modules.call(ServerModuleCallRequest("a.c", b"ok")).payload == b"ok"
