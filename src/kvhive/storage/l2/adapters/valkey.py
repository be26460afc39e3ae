"""``valkey``: objects as strings in a Valkey/Redis Cluster, or on one Valkey/Redis server.

Key: ``<key_prefix>@<flat_name>`` (``<flat_name>`` alone without a prefix), as LMCache 0.5.6's
valkey adapter: ``flat_name`` is ``<model>@<rank:08x>@<group>@<hash>[@<salt>]``, and the
prefix may not contain ``@``.  Value: the logical bytes plus the integrity trailer bound to
the key (``integrity: "raw"`` stores the bare bytes, readable by the reference).  A framed
value is written as ``SET`` (``EX ttl_seconds`` when set) + ``APPEND`` in one MULTI/EXEC on
the key's node: one key is one slot, so the transaction is legal in a cluster, the payload
is not copied, and no reader (another kvhive node included) ever sees half a value.

Cluster mode (``cluster_mode: true``) uses redis-py's slot-aware ``RedisCluster``: it
discovers the topology from any reachable startup node, follows MOVED/ASK, and refreshes the
slot table after a connection error, so once a replica is promoted its slots are served
again.  Reads go to masters (a replica may lag).  Standalone mode talks to the first startup
node only (a warning names the others), on logical db ``database_id``.

Bounds.  ``connection_timeout`` (s) bounds each connect and ``request_timeout`` (s) each
reply; a call retries once after a failed connection (with a topology refresh in a cluster),
so a call on a dead shard ends within about ``2 x (connection_timeout + request_timeout)``,
and the task deadline (``timeout_s``) bounds it for the caller anyway.  Start-up waits at
most ``connection_timeout + request_timeout`` for the first answer from ``startup_nodes``;
none answering is a :class:`ConfigError` naming them (the server exits 2).  At run time a
dead shard's keys are errors: counted (``errors`` for loads and stores, ``lookup_errors`` for
keys of lookups), logged, and misses for the caller; keys on live shards keep hitting.

Client choice (measured here, a 2-core VM also running the cluster: 3 masters on loopback,
32 MiB values, SET then GET of 24 objects; GB/s, three runs each)::

    client                          1 thread SET / GET       4 threads SET / GET
    redis-py 8.2 RedisCluster       1.1-1.4 / 0.43-0.46      0.35-1.2 / 0.22-0.31
    valkey-glide-sync 2.6 cluster   0.18-0.46 / 0.21-0.30    0.78 / 0.19-0.22

redis-py is as fast or faster on GET (the hot path: a prefetch) and on one-thread SET, is
already kvhive's ``resp`` client (extra ``kvhive[redis]``), is pure Python with typed errors,
and has cluster MULTI/EXEC for the trailer without a copy; glide (the reference's client)
brings a native core and an IPC hop, and its buffer GET still stages through a scratch buffer
in the reference.  ``valkey`` (PyPI) is a redis-py fork with the same code paths.  Adapter vs
raw client on the same cluster (24 x 32 MiB, same concurrency, GB/s; the machine had a load
average of 6-10 on 2 cores from other jobs, so these bound rather than measure)::

    workers   raw RedisCluster SET / GET   this adapter store / load
    4         0.12-1.48 / 0.12-0.28        0.39-0.46 / 0.10-0.15
    8         0.74-1.07 / 0.21-0.31        0.34-0.51 / 0.09-0.37

The adapter adds an XXH3 trailer (~1 ms per 32 MiB) and MULTI/EXEC round trips on stores,
nothing on loads beyond the check.  Under that load some 32 MiB calls with 8 workers passed
the default ``request_timeout`` of 5 s and were counted errors: raise it for big objects on
a busy server.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from kvhive.config.l2_adapters import FLAG, ValkeyAdapterConfig
from kvhive.errors import ConfigError
from kvhive.keys import ObjectKey
from kvhive.storage.l2.adapters.resp import read_value
from kvhive.storage.l2.base import L2Adapter, ObjectStore
from kvhive.storage.l2.naming import SEP, flat_name
from kvhive.storage.l2.pooled import PooledAdapter

try:
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.exceptions import RedisClusterException
    from redis.retry import Retry

    FAILURES: tuple[type[BaseException], ...] = (redis.RedisError, RedisClusterException, OSError)
except ImportError:  # optional extra: pip install 'kvhive[redis]'
    redis = None  # type: ignore[assignment]
    FAILURES = (OSError,)

log = logging.getLogger(__name__)

RETRIES = 1
"""Retries of a call after a connection error or timeout (a cluster refreshes its slots)."""


def wire_name(prefix: str, key: ObjectKey) -> str:
    """The reference's key of ``key``: ``<prefix>@<flat_name>``, or ``flat_name`` alone."""
    name = flat_name(key)
    return f"{prefix}{SEP}{name}" if prefix else name


class ValkeyStore(ObjectStore):
    """Objects as strings through one thread-safe redis-py client (cluster or standalone)
    whose per-node pools hold up to ``num_workers`` + 2 connections; the client is built by
    :func:`connect`.  Thread-safe; every method may raise ``redis.RedisError`` or ``OSError``
    on a dead shard (PooledAdapter counts them), except :meth:`exists_many`, which answers
    False for such keys and counts them in ``lookup_errors``."""

    durable = True

    def __init__(self, client: Any, *, prefix: str, ttl_s: int | None, where: str) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.where = where
        self.cluster = isinstance(client, RedisCluster)
        self._lock = threading.Lock()
        self.lookup_errors = 0

    def name(self, key: ObjectKey) -> str:
        return wire_name(self.prefix, key)

    def put(self, key: ObjectKey, parts: Sequence[memoryview]) -> None:
        name = self.name(key)
        if len(parts) == 1:
            self.client.set(name, parts[0], ex=self.ttl_s)
            return
        with self.client.pipeline(transaction=True) as pipe:  # one key: one slot, one node
            pipe.set(name, parts[0], ex=self.ttl_s)
            for part in parts[1:]:
                pipe.append(name, part)
            pipe.execute()

    def get(self, key: ObjectKey, parts: Sequence[memoryview]) -> int:
        return read_value(self.client, self.name(key), parts)

    def exists(self, key: ObjectKey) -> bool:
        return bool(self.client.exists(self.name(key)))

    def exists_many(self, keys: Sequence[ObjectKey]) -> list[bool]:
        """One pipeline (split per node by the client); if a node fails, each key again on
        its own, so keys on live shards still hit, and the failed node's keys are counted
        misses (tried once per batch and node: a dead shard costs one timeout, not one per
        key)."""
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.exists(self.name(key))
                return [bool(x) for x in pipe.execute()]
        except FAILURES as exc:
            log.debug("valkey %s: pipelined lookup failed (%s); key by key", self.where, exc)
        failed: set[str] = set()
        return [self._exists_or_false(self.name(key), failed) for key in keys]

    def _exists_or_false(self, name: str, failed: set[str]) -> bool:
        node = self._node_of(name)
        if node not in failed:
            try:
                return bool(self.client.exists(name))
            except FAILURES as exc:
                failed.add(node)
                log.warning("valkey %s: lookups on %s fail: %s", self.where, node, exc)
        with self._lock:
            self.lookup_errors += 1
        return False

    def _node_of(self, name: str) -> str:
        """``host:port`` serving ``name`` as the client sees it ("" when unknown)."""
        if not self.cluster:
            return self.where
        try:
            return str(self.client.get_node_from_key(name).name)
        except FAILURES:
            return ""

    def delete(self, key: ObjectKey) -> bool:
        return bool(self.client.delete(self.name(key)))

    def status(self) -> dict[str, Any]:
        with self._lock:
            errors = self.lookup_errors
        return {
            "mode": "cluster" if self.cluster else "standalone",
            "startup_nodes": self.where,
            "key_prefix": self.prefix,
            "lookup_errors": errors,
        }

    def close(self) -> None:
        self.client.close()


def _client_kwargs(cfg: ValkeyAdapterConfig) -> dict[str, Any]:
    return {
        "username": cfg.username or None,
        "password": cfg.password or None,
        "socket_timeout": cfg.request_timeout,
        "socket_connect_timeout": cfg.connection_timeout,
        "max_connections": cfg.num_workers + 2,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), RETRIES),
        "health_check_interval": 30,
    }


def _open_cluster(cfg: ValkeyAdapterConfig) -> Any:
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in cfg.nodes],
        require_full_coverage=False,  # a dead shard must not stop the others
        ssl=cfg.tls_enable,
        **_client_kwargs(cfg),
    )


def _open_standalone(cfg: ValkeyAdapterConfig) -> Any:
    host, port = cfg.nodes[0]
    kwargs = _client_kwargs(cfg)
    pool = redis.BlockingConnectionPool(
        host=host,
        port=port,
        db=cfg.database_id or 0,
        timeout=cfg.request_timeout,  # waiting for a free connection
        connection_class=redis.SSLConnection if cfg.tls_enable else redis.Connection,
        **kwargs,
    )
    client = redis.Redis(connection_pool=pool, retry=kwargs["retry"])
    try:
        client.ping()
    except BaseException:
        client.close()
        pool.disconnect()
        raise
    return client


def _within(seconds: float, opener: Callable[[], Any]) -> Any:
    """``opener()`` on a daemon thread, given up after ``seconds`` (TimeoutError); a client it
    opens after that is closed when it arrives."""
    box: list[Any] = []
    done = threading.Event()
    given_up = threading.Event()

    def run() -> None:
        try:
            box.append(opener())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            box.append(exc)
        done.set()
        if given_up.is_set() and box and not isinstance(box[0], BaseException):
            box[0].close()

    threading.Thread(target=run, name="valkey-connect", daemon=True).start()
    if not done.wait(seconds):
        given_up.set()
        raise TimeoutError(f"no answer within {seconds:g} s")
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def connect(cfg: ValkeyAdapterConfig) -> Any:
    """A connected client for ``cfg`` (cluster topology read, or PING answered) within
    ``connection_timeout + request_timeout`` s; ConfigError naming ``startup_nodes`` when
    none answers, or when redis-py is missing."""
    if redis is None:
        raise ConfigError(FLAG, "type 'valkey' needs redis-py: pip install 'kvhive[redis]'")
    nodes = ", ".join(f"{h}:{p}" for h, p in cfg.nodes)
    if not cfg.cluster_mode and len(cfg.nodes) > 1:
        log.warning("%s: cluster_mode is false; using %s:%d only", cfg.label, *cfg.nodes[0])
    if cfg.cluster_mode and cfg.database_id is not None:
        log.warning("%s: database_id is ignored in cluster mode", cfg.label)
    opener = _open_cluster if cfg.cluster_mode else _open_standalone
    wait = cfg.connection_timeout + cfg.request_timeout
    try:
        return _within(wait, lambda: opener(cfg))
    except FAILURES as exc:  # TimeoutError is an OSError
        mode = "cluster" if cfg.cluster_mode else "server"
        raise cfg.fail(f"no valkey {mode} answered at {nodes} within {wait:g} s: {exc}") from exc


def build(cfg: ValkeyAdapterConfig) -> L2Adapter:
    """Connect (bounded, see :func:`connect`) and run the store on ``num_workers`` threads."""
    client = connect(cfg)
    store = ValkeyStore(client, prefix=cfg.key_prefix, ttl_s=cfg.ttl_seconds,
                        where=cfg.startup_nodes)  # fmt: skip
    return PooledAdapter(store, workers=cfg.num_workers, integrity=cfg.integrity, name=cfg.label)
