"""LMCache 0.5.7's own client code, loaded in the 0.5.7 client venv (lmcache-cli 0.5.7rc3.dev0).

Runs INSIDE the venv that ``scripts/setup_client057_venv.sh`` builds, never in kvhive's: it
imports nothing from kvhive.  Every request is built, framed and decoded by 0.5.7's
unmodified classes: ``IPCCacheServerKey`` (``token_bytes`` packed by ``token_codec``), the
RPC contract (``transport.base.RequestClient`` via ``rpc.get_rpc_specs``: argument order,
defaults, payload and response types), ``ZmqMultiprocessClient`` over ``MessageQueueClient``
(mq.py: the DEALER socket, ``encode_operation``, the payload-count check, reply decoding) and
the inline transfer codec ``transfer_context.tensor_wire``.

Why a loader at all
-------------------
lmcache-cli ships LMCache's Python without its compiled modules.  ``lmcache/__init__.py``
then cannot resolve ``lmcache.device_ops`` (its CPU ops need ``lmcache.lmcache_native``),
and three package ``__init__`` files pull that in although the client modules under them do
not need it:

* ``lmcache.v1.distributed.transfer_channel``  (``transport.base`` needs only ``.api``),
* ``lmcache.v1.gpu_connector.kv_format``      (``transport.base`` needs only ``.types``),
* ``lmcache.v1.multiprocess.transfer_context`` (``tensor_wire`` is self-contained).

:func:`load` registers those three packages as empty package shells (their real
``__path__``, their ``__init__`` not run), so the submodules import from their own,
unchanged files.  Nothing is stubbed: a module that really needs native code still fails to
import.  What stays out of reach (``transfer_context.inline``/``shm``, the vLLM adapter,
``memory_management``) is listed in ``tests/interop057/README.md``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import time
import types
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("LMCACHE_LOG_LEVEL", "ERROR")

EXPECTED_VERSION = "0.5.7rc3.dev0"

#: Packages whose ``__init__`` imports native code their client submodules do not need.
SHELLED_PACKAGES = (
    "lmcache.v1.distributed.transfer_channel",
    "lmcache.v1.gpu_connector.kv_format",
    "lmcache.v1.multiprocess.transfer_context",
)

#: Modules that need ``lmcache.lmcache_native`` / ``lmcache.device_ops`` (absent here).
NATIVE_ONLY = (
    "lmcache.v1.multiprocess.transfer_context.inline",
    "lmcache.v1.multiprocess.transfer_context.shm",
    "lmcache.v1.memory_management",
    "lmcache.integration.vllm.vllm_multi_process_adapter",
)


def _shell(name: str) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"{name} is not a package in this lmcache")
    module = types.ModuleType(name)
    module.__path__ = list(spec.submodule_search_locations)
    module.__package__ = name
    module.__spec__ = spec
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    setattr(importlib.import_module(parent), child, module)


@dataclass(frozen=True)
class Lmc057:
    """The 0.5.7 modules the drivers use (module docstring)."""

    version: str
    custom_types: Any
    token_codec: Any
    tensor_wire: Any
    rpc: Any
    wire: Any
    mq: Any
    client: Any

    def key(
        self,
        model: str,
        tokens: list[int],
        *,
        start: int = 0,
        end: int | None = None,
        request_id: str = "req-057",
        world_size: int = 1,
        worker_id: int | None = None,
        cache_salt: str = "",
        num_kv_readers: int = 1,
    ) -> Any:
        """An ``IPCCacheServerKey`` built the canonical 0.5.7 way (``from_token_ids``)."""
        return self.custom_types.IPCCacheServerKey.from_token_ids(
            model_name=model, world_size=world_size, worker_id=worker_id, token_ids=tokens,
            start=start, end=len(tokens) if end is None else end, request_id=request_id,
            cache_salt=cache_salt, num_kv_readers=num_kv_readers,
        )  # fmt: skip

    def connect(self, url: str) -> Any:
        """0.5.7's ``ZmqMultiprocessClient`` (as ``create_request_client`` builds it)."""
        import zmq

        mq = self.mq.MessageQueueClient(url, zmq.Context.instance())
        return self.client.ZmqMultiprocessClient(mq)


def load() -> Lmc057:
    """Import 0.5.7's client modules (see the module docstring); raises ImportError."""
    import lmcache

    for name in SHELLED_PACKAGES:
        _shell(name)
    mp = "lmcache.v1.multiprocess"
    mods = {
        attr: importlib.import_module(f"{mp}.{path}")
        for attr, path in (
            ("custom_types", "custom_types"), ("token_codec", "token_codec"),
            ("tensor_wire", "transfer_context.tensor_wire"), ("rpc", "rpc"),
            ("wire", "transport.zmq_impl.wire"), ("mq", "transport.zmq_impl.mq"),
            ("client", "transport.zmq_impl.client"),
        )
    }  # fmt: skip
    from lmcache._version import __version__

    del lmcache
    return Lmc057(version=__version__, **mods)


# -- running requests --------------------------------------------------------------------


@dataclass
class Steps:
    """Ordered results of requests sent with a 0.5.7 client: each step is
    ``{"ok": True, "value": <decoded reply as builtins>}`` or ``{"ok": False, "error": str}``
    (a refused request, an error reply, a timeout); later steps still run."""

    timeout_s: float = 10.0
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    def call(self, name: str, future: Any) -> Any:
        """Wait for ``future`` (a ``MessagingFuture``); record and return its value (None
        when it failed)."""
        try:
            value = future.result(timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - every failure is a recorded result
            self.results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            return None
        self.results[name] = {"ok": True, "value": to_builtins(value)}
        return value

    def poll(self, name: str, submit: Any, *, deadline_s: float = 10.0) -> Any:
        """Call ``submit()`` until its reply is not None (``query_prefetch_status``)."""
        end = time.monotonic() + deadline_s
        while True:
            value = self.call(name, submit())
            if value is not None or not self.results[name]["ok"] or time.monotonic() > end:
                return value
            time.sleep(0.01)


def to_builtins(value: Any) -> Any:
    """A JSON-safe form of a decoded reply (structs and dataclasses as dicts, bytes as base64)."""
    import msgspec

    return msgspec.to_builtins(value, enc_hook=repr, order="deterministic")


# -- the venv's self-check (scripts/setup_client057_venv.sh) ------------------------------


def check() -> None:
    """What the setup script verifies: the version, CPU torch, the client modules, and that
    0.5.7's own encoders work offline.  Prints one line per fact; raises on a failure."""
    import importlib.metadata as md

    import torch

    assert torch.version.cuda is None, f"CUDA torch installed: {torch.__version__}"
    assert md.version("lmcache-cli") == EXPECTED_VERSION, md.version("lmcache-cli")
    assert "lmcache" not in {d.metadata["Name"] for d in md.distributions()}, "full lmcache"
    lmc = load()
    assert lmc.version == EXPECTED_VERSION, lmc.version
    key = lmc.key("m", [1, 2, 70000], request_id="r")
    assert key.token_bytes == bytes.fromhex("000000010000000200011170"), key
    assert lmc.token_codec.unpack_token_ids(key.token_bytes) == [1, 2, 70000]
    frames = [torch.arange(6, dtype=torch.float16).reshape(2, 3)]
    back = lmc.tensor_wire.decode_tensors(
        lmc.tensor_wire.encode_tensors(frames), expected_shape=torch.Size([2, 3]),
        expected_dtype=torch.float16, expected_count=1,
    )  # fmt: skip
    assert torch.equal(back[0], frames[0])
    specs = lmc.rpc.get_rpc_specs()
    assert "negotiate_chunk_size" in specs and len(specs["prepare_store"].payload_types) == 3
    import msgspec

    assert lmc.wire.encode_operation("lookup") == msgspec.msgpack.encode(8)
    client = lmc.connect("tcp://127.0.0.1:9")  # connecting is lazy: no server needed
    client.close()
    print(f"lmcache-cli {lmc.version}: {len(specs)} RPCs; client, key, tensor_wire OK")
    for name in NATIVE_ONLY:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - reported, expected without native modules
            print(f"not importable here (expected): {name}: {type(exc).__name__}: {exc}")
        else:
            print(f"importable: {name}")


if __name__ == "__main__":
    check()
