"""``nixl_store_dynamic`` on the real NIXL library (POSIX backend, CPU only), in temp dirs on
the disk (ext4) and on tmpfs (/dev/shm), both of which accept O_DIRECT here.

Needs ``nixl-cu12`` (``pip install 'kvhive[nixl]'``): without it the tests skip, unless
``KVHIVE_REQUIRE_SERVICES=1`` (CI), which makes them fail.  The server test also needs the
lmcache client venv (``scripts/setup_client_venv.sh``), as the interop tests do.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from l2_testlib import aligned_copy, done, keys_for, payloads

from kvhive.config.l2_adapters import parse_adapter
from kvhive.keys import ObjectKey, pack_kv_rank
from kvhive.storage.l2.adapters.nixl_dynamic import NixlFileStore, build
from kvhive.storage.l2.base import HostRegion
from kvhive.storage.l2.integrity import TRAILER_BYTES
from kvhive.storage.l2.managed import ManagedAdapter
from kvhive.storage.l2.naming import nixl_name, nixl_relpath, parse_nixl_name

N = 64 * 1024 + 123  # unaligned: the O_DIRECT body, its buffered tail and the trailer
BIG = 32 << 20
RANK = pack_kv_rank(1, 0)
OLD = time.time() - 3600

Opener = Callable[..., ManagedAdapter]


@pytest.fixture(scope="module", autouse=True)
def _nixl() -> None:
    try:
        import nixl_cu12._api  # noqa: F401
    except ImportError as exc:
        reason = f"NIXL is not installed ({exc}): pip install 'kvhive[nixl]'"
        if os.environ.get("KVHIVE_REQUIRE_SERVICES", "").strip().lower() in ("1", "true", "yes"):
            pytest.fail(f"KVHIVE_REQUIRE_SERVICES=1 but {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A scratch directory on tmpfs."""
    path = Path(f"/dev/shm/kvhive-nixl-dyn-{os.getpid()}-{time.monotonic_ns()}")
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def config(path: Path, *, direct: bool = False, shard: bool = False, gb: float = 1.0,
           **extra: Any) -> dict[str, Any]:  # fmt: skip
    params = {"file_path": str(path), "use_direct_io": str(direct).lower(),
              "max_capacity_gb": gb, "shard_dirs": str(shard).lower()}  # fmt: skip
    return {"type": "nixl_store_dynamic", "backend": "POSIX", "backend_params": params, **extra}


@pytest.fixture
def open_nixl() -> Iterator[Opener]:
    """``open_nixl(json, host=None)``: a ManagedAdapter, closed at teardown unless closed."""
    opened: list[ManagedAdapter] = []

    def make(raw: dict[str, Any], host: HostRegion | None = None) -> ManagedAdapter:
        spec = parse_adapter(0, json.loads(json.dumps(raw)))
        adapter = ManagedAdapter(spec, build(spec, host=host))  # type: ignore[arg-type]
        opened.append(adapter)
        return adapter

    yield make
    for adapter in opened:
        adapter.close()


def store_of(adapter: ManagedAdapter) -> NixlFileStore:
    store = adapter.adapter.store  # type: ignore[attr-defined]
    assert isinstance(store, NixlFileStore)
    return store


def store_all(adapter: ManagedAdapter, keys: list[ObjectKey], data: list[np.ndarray]) -> list[bool]:
    return done(adapter.store(keys, [memoryview(d) for d in data]))


def load_all(adapter: ManagedAdapter, keys: list[ObjectKey],
             sizes: list[int]) -> tuple[list[bool], list[np.ndarray]]:  # fmt: skip
    bufs = [aligned_copy(np.zeros(n, dtype=np.uint8)) for n in sizes]
    return done(adapter.load(keys, [memoryview(b) for b in bufs])), bufs


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def files_of(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# -- round trips and names -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "direct", "shard"),
    [("disk", False, False), ("disk", True, True), ("tmpfs", True, False), ("tmpfs", False, True)],
)
def test_round_trip_32mib_and_small_objects(
    where: str, direct: bool, shard: bool, tmp_path: Path, shm_dir: Path, open_nixl: Opener
) -> None:
    root = tmp_path / "l2" if where == "disk" else shm_dir
    adapter = open_nixl(config(root, direct=direct, shard=shard))
    sizes = [BIG, N, 100, 8192]
    keys = keys_for(len(sizes), salt="tenant")
    data = [payloads(1, n, seed=i)[0] for i, n in enumerate(sizes)]
    assert store_all(adapter, keys, data) == [True] * 4
    assert files_of(root) == {nixl_relpath(k, shard) for k in keys}
    for key, n in zip(keys, sizes, strict=True):  # payload + key-bound trailer, nothing else
        assert (root / nixl_relpath(key, shard)).stat().st_size == n + TRAILER_BYTES
    assert done(adapter.lookup(keys)) == [True] * 4
    ok, bufs = load_all(adapter, keys, sizes)
    assert ok == [True] * 4 and same(bufs, data)
    assert adapter.status()["adapter"]["direct_io"] is direct
    assert done(adapter.delete(keys[:2])) == [True, True]
    assert done(adapter.lookup(keys)) == [False, False, True, True]
    assert files_of(root) == {nixl_relpath(k, shard) for k in keys[2:]}
    ok, _ = load_all(adapter, keys[:1], sizes[:1])
    assert ok == [False] and adapter.adapter.status()["missing"] == 1


def test_file_names_are_the_references(tmp_path: Path, open_nixl: Opener) -> None:
    keys = [ObjectKey(bytes(8), "org/m", RANK), ObjectKey(b"\x01" * 8, "org/m", RANK, 0, "s"),
            ObjectKey(b"\xab" * 8, "org/m", RANK, 0x1F)]  # fmt: skip
    sharded = open_nixl(config(tmp_path / "sharded", shard=True))
    flat = open_nixl(config(tmp_path / "flat"))
    data = payloads(3, 4096)
    assert store_all(sharded, keys, data) == [True] * 3
    assert store_all(flat, keys, data) == [True] * 3
    assert files_of(tmp_path / "sharded") == {
        "00/00/org--m_01000100_0_0000000000000000.bin",
        "01/01/org--m_01000100_0_0101010101010101@s.bin",
        "ab/ab/org--m_01000100_1f_abababababababab.bin",
    }
    assert files_of(tmp_path / "flat") == {
        "org--m_01000100_0_0000000000000000.bin",
        "org--m_01000100_0_0101010101010101@s.bin",
        "org--m_01000100_1f_abababababababab.bin",
    }
    # The reference's "/" -> "--" would give "a/b" and "a--b" the same file: kvhive escapes
    # the model it cannot name unambiguously, and every name parses back to its key.
    a, b = ObjectKey(bytes(8), "a/b", RANK), ObjectKey(bytes(8), "a--b", RANK)
    assert (nixl_name(a), nixl_name(b)) == ("a--b_01000100_0_0000000000000000.bin",
                                            "a%2D%2Db_01000100_0_0000000000000000.bin")  # fmt: skip
    for key in [*keys, a, b, ObjectKey(b"\x05" * 8, "my_model.v2", RANK, 3, "x_y.z")]:
        assert parse_nixl_name(nixl_name(key)) == key
    assert parse_nixl_name(nixl_name(a) + ".tmp." + "0" * 32) is None


# -- restart, temp files, persistence --------------------------------------------------------


@pytest.mark.parametrize("shard", [False, True])
def test_restart_finds_serves_and_counts_the_files(
    shard: bool, tmp_path: Path, open_nixl: Opener
) -> None:
    raw = config(tmp_path / "l2", shard=shard)
    first = open_nixl(raw)
    keys, data = keys_for(3, salt="s") + keys_for(1), payloads(4, N)
    assert store_all(first, keys, data) == [True] * 4
    first.close()
    second = open_nixl(raw)  # empty index: lookups go to disk, found files join the index
    assert store_of(second).status()["indexed_objects"] == 0
    assert done(second.lookup(keys + keys_for(1))) == [True] * 4 + [False]
    assert store_of(second).status()["indexed_objects"] == 4
    ok, bufs = load_all(second, keys, [N] * 4)
    assert ok == [True] * 4 and same(bufs, data)
    second.close()
    third = open_nixl(raw)
    assert third.rebuild_usage() == 4  # usage from scan
    usage = third.usage()
    assert usage.objects == 4 and usage.used_bytes == 4 * (N + TRAILER_BYTES)
    assert usage.bytes_by_salt == {"s": 3 * (N + TRAILER_BYTES), "": N + TRAILER_BYTES}
    ok, bufs = load_all(third, keys[:1], [N])
    assert ok == [True] and same(bufs, data[:1])


def test_leftover_temp_files_are_removed_others_untouched(
    tmp_path: Path, open_nixl: Opener
) -> None:
    root = tmp_path / "l2"
    key = keys_for(1)[0]
    final = nixl_relpath(key, True)
    old_tmp, young_tmp = f"{final}.tmp.{'a' * 32}", f"{final}.tmp.{'b' * 32}"
    flat_tmp = f"{nixl_name(key)}.tmp.{'c' * 32}"
    foreign = ["notes.txt", "notes.txt.tmp." + "d" * 32, f"{nixl_name(key)}.tmp.xyz",
               "zz/keep.tmp." + "e" * 32, f"other/{flat_tmp}"]  # fmt: skip
    for rel in [old_tmp, young_tmp, flat_tmp, *foreign]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x" * 10)
    for rel in [old_tmp, flat_tmp, *foreign]:
        os.utime(root / rel, (OLD, OLD))
    adapter = open_nixl(config(root, shard=True))
    # Old temp files of its own pattern go; a young one may be a peer's store in flight.
    assert files_of(root) == {young_tmp, *foreign}
    assert store_all(adapter, [key], payloads(1, N)) == [True]
    os.utime(root / young_tmp, (OLD, OLD))
    adapter.close()
    assert files_of(root) == {final, *foreign}


def test_persist_disabled_removes_only_its_own_files(tmp_path: Path, open_nixl: Opener) -> None:
    root = tmp_path / "l2"
    earlier = open_nixl(config(root))
    old_keys = keys_for(2)
    store_all(earlier, old_keys, payloads(2, N))
    earlier.close()
    adapter = open_nixl(config(root, persist_enabled=False))
    new_keys = keys_for(2)
    assert store_all(adapter, new_keys, payloads(2, N)) == [True, True]
    assert done(adapter.lookup(old_keys)) == [True, True]
    adapter.close()
    assert files_of(root) == {nixl_name(k) for k in old_keys}


# -- damaged and foreign files ---------------------------------------------------------------


def test_corrupt_or_copied_file_is_a_counted_miss_and_removed(
    tmp_path: Path, open_nixl: Opener
) -> None:
    root = tmp_path / "l2"
    adapter = open_nixl(config(root, direct=True))
    keys, data = keys_for(3), payloads(3, N)
    store_all(adapter, keys, data)
    path0 = root / nixl_name(keys[0])
    blob = bytearray(path0.read_bytes())
    blob[100] ^= 0xFF
    path0.write_bytes(bytes(blob))
    shutil.copyfile(root / nixl_name(keys[2]), root / nixl_name(keys[1]))  # B's file as A's
    ok, bufs = load_all(adapter, keys, [N] * 3)
    assert ok == [False, False, True] and same(bufs[2:], data[2:])
    assert adapter.adapter.status()["corrupt"] == 2 and adapter.counters["load_corrupt"] == 2
    assert done(adapter.lookup(keys)) == [False, False, True]
    assert files_of(root) == {nixl_name(keys[2])}


@pytest.mark.parametrize("keep", [0, 100, N - 1, N + 1, N + TRAILER_BYTES - 1])
def test_truncated_file_is_a_miss_not_a_hang(keep: int, tmp_path: Path, open_nixl: Opener) -> None:
    root = tmp_path / "l2"
    adapter = open_nixl(config(root, direct=True, timeout_s=5))
    keys = keys_for(1)
    store_all(adapter, keys, payloads(1, N))
    os.truncate(root / nixl_name(keys[0]), keep)  # (exactly N would be a reference file)
    t0 = time.monotonic()
    ok, _ = load_all(adapter, keys, [N])
    assert ok == [False] and time.monotonic() - t0 < 2.0
    assert adapter.adapter.status()["corrupt"] == 1


def test_reference_format_file_is_read_length_checked(tmp_path: Path, open_nixl: Opener) -> None:
    root = tmp_path / "l2"
    adapter = open_nixl(config(root, shard=True))
    keys, data = keys_for(2), payloads(2, 1 << 20)
    for key, d in zip(keys, data, strict=True):  # bare logical bytes, as the reference writes
        path = root / nixl_relpath(key, True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(d.tobytes())
    ok, bufs = load_all(adapter, keys, [1 << 20, (1 << 20) - 4096])
    assert ok == [True, False] and same(bufs[:1], data[:1])


# -- capacity, host memory -------------------------------------------------------------------


def test_capacity_refuses_and_eviction_makes_room(tmp_path: Path, open_nixl: Opener) -> None:
    from kvhive.storage.controllers.eviction import L2EvictionController
    from kvhive.storage.quota import QuotaRegistry

    policy = {"eviction_policy": "LRU", "trigger_watermark": 0.5, "eviction_ratio": 0.5}
    adapter = open_nixl(config(tmp_path / "l2", gb=3.5 * N / 2**30, eviction=policy))
    assert adapter.usage().capacity_bytes == int(3.5 * N)
    assert store_of(adapter).capacity_bytes == int(3.5 * N)
    keys, data = keys_for(4), payloads(4, N)
    assert store_all(adapter, keys, data) == [True, True, True, False]
    assert adapter.counters["store_refused_full"] == 1
    assert L2EvictionController([adapter], QuotaRegistry()).tick() >= 1
    assert done(adapter.lookup(keys[:3])) == [True, False, False]
    assert not (tmp_path / "l2" / nixl_name(keys[1])).exists()  # eviction unlinks
    assert store_all(adapter, keys[3:], data[3:]) == [True]


@pytest.mark.parametrize("direct", [False, True])
def test_buffers_inside_and_outside_the_registered_arena(
    direct: bool, tmp_path: Path, open_nixl: Opener
) -> None:
    arena = aligned_copy(np.zeros(4 << 20, dtype=np.uint8))  # stands in for the L1 arena
    view = memoryview(arena)
    host = HostRegion(int(arena.ctypes.data), arena.nbytes, 4096)
    adapter = open_nixl(config(tmp_path / "l2", direct=direct), host=host)
    agent = store_of(adapter)._agent.agent
    dram: list[int] = []  # sizes of the host buffers registered per transfer
    real = agent.register_memory

    def spy(items: Any, kind: str, *a: Any, **kw: Any) -> Any:
        if kind == "DRAM":
            dram.extend(int(item[1]) for item in items)
        return real(items, kind, *a, **kw)

    agent.register_memory = spy
    try:
        inside_src, inside_dst = view[:N], view[1 << 20 : (1 << 20) + N]
        inside_src[:] = payloads(1, N, seed=1)[0].tobytes()
        outside = payloads(1, N, seed=2)
        keys = keys_for(2)
        # The arena was registered once, at start: only the 24-byte trailer is not in it.
        assert done(adapter.store(keys[:1], [inside_src])) == [True]
        assert done(adapter.load(keys[:1], [inside_dst])) == [True]
        assert dram == [TRAILER_BYTES] * 2 and bytes(inside_dst) == bytes(inside_src)
        dram.clear()
        assert store_all(adapter, keys[1:], outside) == [True]  # registered for its transfer
        ok, bufs = load_all(adapter, keys[1:], [N])
        assert ok == [True] and same(bufs, outside)
        assert sorted(dram) == [TRAILER_BYTES] * 2 + [N] * 2
    finally:
        agent.register_memory = real
        adapter.close()


# -- a kvhive server driven by the real lmcache client ----------------------------------------

REPO = Path(__file__).resolve().parents[2]
DRIVERS = REPO / "tests" / "interop" / "drivers"
RESULT_MARK = "@@KVHIVE_INTEROP_RESULT@@ "
CHUNKS = 4


def _client_python() -> str:
    from support.venvs import locate_venv_python, unavailable

    path, reason = locate_venv_python(
        "KVHIVE_CLIENT_PYTHON", REPO / "scripts" / "setup_client_venv.sh", "lmcache client"
    )
    if path is None:
        unavailable(reason)
    assert path is not None
    return path


def _drive(python: str, server: Any, *extra: str) -> dict[str, Any]:
    from kvhive.bench.servers import subprocess_env

    argv = [python, str(DRIVERS / "l2.py"), "--url", server.rpc_url, "--http", server.http_url,
            "--chunks", str(CHUNKS), "--model", "org/nixl-dyn", *extra]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=str(DRIVERS),
                          env=subprocess_env(), stdin=subprocess.DEVNULL, check=False)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    assert proc.returncode == 0 and lines, (
        f"driver failed rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n"
        f"--- server log ---\n{server.log_tail()}"
    )
    return dict(json.loads(lines[-1][len(RESULT_MARK) :]))


@pytest.mark.interop
@pytest.mark.parametrize("direct", [False, True])
def test_server_stores_and_serves_after_a_restart(direct: bool, tmp_path: Path) -> None:
    from kvhive.bench.servers import ServerProcess

    python = _client_python()
    root = tmp_path / "l2"
    flag = ["--l2-adapter", json.dumps(config(root, direct=direct, shard=True))]
    first = ServerProcess("kvhive", 0.1, flag, log_path=tmp_path / "first.log")
    with first:
        first.start()
        res = _drive(python, first, "--phase", "store")
        assert res["store_ok"] is True and res["l2_stored"] == [CHUNKS]
        adapter = first.status()["l2"]["adapters"][0]
        assert adapter["type"] == "nixl_store_dynamic" and adapter["adapter"]["direct_io"] is direct
    names = files_of(root)
    assert len(names) == CHUNKS and all(n.endswith(".bin") and n.count("/") == 2 for n in names)
    assert all("org--nixl-dyn_01000100_" in n for n in names)
    second = ServerProcess("kvhive", 0.1, flag, log_path=tmp_path / "second.log")
    with second:
        second.start()
        res = _drive(python, second, "--phase", "load", "--no-clear")
        assert res["l1_objects_before_lookup"] == 0
        assert res["hit_chunks"] == CHUNKS and res["l2_loaded"] == [CHUNKS]
        assert res["retrieve_ok"] is True and res["load_errors"] == []
        assert res["bytes_equal"] is True and res["read_locked_after_session"] == 0
        l2 = second.status()["l2"]["adapters"][0]
        assert l2["scanned"] == CHUNKS and l2["objects"] == CHUNKS  # usage rebuilt at start


def _nixl_shim(where: Path) -> Path:
    """A PYTHONPATH entry holding only NIXL: ``nixl_cu12`` (kvhive's build) and a ``nixl``
    package whose ``_api`` is ``nixl_cu12._api`` (what the reference imports)."""
    import nixl_cu12

    site = Path(nixl_cu12.__file__).resolve().parent.parent
    (where / "nixl").mkdir(parents=True)
    (where / "nixl" / "__init__.py").write_text("")
    (where / "nixl" / "_api.py").write_text("from nixl_cu12._api import *  # noqa: F403\n")
    for name in ("nixl_cu12", "nixl_cu12.libs"):
        if (site / name).exists():
            (where / name).symlink_to(site / name)
    return where


@pytest.mark.interop
def test_files_written_by_the_reference_adapter_are_served(
    tmp_path: Path, open_nixl: Opener
) -> None:
    from kvhive.bench.servers import subprocess_env

    python = _client_python()
    root, sizes = tmp_path / "l2", [256 << 10, 1 << 20, 8192]
    env = subprocess_env(PYTHONPATH=str(_nixl_shim(tmp_path / "shim")))
    proc = subprocess.run([python, str(Path(__file__).with_name("nixl_reference_writer.py")),
                           str(root), "true", ",".join(map(str, sizes))], capture_output=True,
                          text=True, timeout=120, env=env, check=False)  # fmt: skip
    assert proc.returncode == 0 and f'{RESULT_MARK}{{"stored": "{sum(sizes)}"}}' in proc.stdout, (
        proc.stdout[-3000:] + proc.stderr[-3000:]
    )
    keys = [ObjectKey(i.to_bytes(8, "big"), "org/m", RANK, 0, "s" if i % 2 else "")
            for i in range(len(sizes))]  # fmt: skip
    assert files_of(root) == {nixl_relpath(k, True) for k in keys}
    want = [np.random.default_rng(i).integers(0, 256, n, np.uint8) for i, n in enumerate(sizes)]
    adapter = open_nixl(config(root, shard=True))
    assert adapter.rebuild_usage() == 3 and adapter.usage().used_bytes == sum(sizes)
    assert done(adapter.lookup(keys)) == [True] * 3
    ok, bufs = load_all(adapter, keys, sizes)
    assert ok == [True] * 3 and same(bufs, want)
