"""An in-process :class:`~kvhive.server.core.KvhiveServer` on free loopback ports.

Servers in a subprocess (``kvhive server`` or the reference ``lmcache server``) are
:class:`kvhive.bench.servers.ServerProcess`, shared with the benchmark; the interop tests
extend it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from kvhive.config import parse_server_args
from kvhive.server.core import KvhiveServer
from support.net import free_port


def server_args(*extra: str) -> list[str]:
    """A small server on 127.0.0.1 and a free ZMQ port: 64 MiB of L1, LRU eviction, the
    remaining flags at their defaults; ``extra`` comes last (and so wins)."""
    return [
        "--host", "127.0.0.1", "--port", str(free_port()),
        "--l1-size-gb", "0.0625", "--eviction-policy", "LRU", *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def running_server(*extra: str) -> Iterator[KvhiveServer]:
    """A started :class:`KvhiveServer` configured by :func:`server_args`; closed on exit."""
    server = KvhiveServer(parse_server_args(server_args(*extra)))
    server.start()
    try:
        yield server
    finally:
        server.close()
