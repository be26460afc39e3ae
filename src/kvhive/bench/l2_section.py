"""The ``l2`` section of ``kvhive bench``: write and read GB/s of 32 MiB objects through each
L2 adapter (its :class:`~kvhive.storage.l2.base.L2Adapter` contract, built as a server builds
it), each next to its floor measured in the same interleaved loop (:mod:`kvhive.bench.l2_floors`):

* file tiers (``fs``, ``fs_native``, their ``_odirect`` forms, NIXL ``POSIX`` pool and
  dynamic): ``dd`` in the same directory with the same flags; reads right after the write
  come from the page cache for both (O_DIRECT tiers: from the device), and a *cold* read
  drops this bench's own files' pages first;
* memory tiers (``dax`` on a tmpfs file, ``mock``): memcpy;
* services: a raw client of the same server (redis-py for ``resp``, awscrt for ``s3`` and
  NIXL ``OBJ``, both against throwaway servers; ``MooncakeDistributedStore`` for
  ``mooncake``, run with its own master inside a private network namespace because
  Mooncake binds every interface: ``l2_mooncake.py``).

Rows ``l2/<tier>/<op>`` (default integrity) and ``l2/<tier>/raw/<op>`` (``integrity: "raw"``,
tiers that frame objects, with ``l2_raw``) hold the adapter's median GB/s, the floor's and
their ratio; ``op`` is ``write``, ``read`` or ``read_cold``.  Targets: file and memory tiers
write and read >= 0.8x their floor.  A tier whose service, client or adapter module is
missing here is skipped with the reason (``report.skipped``); a failed one is an error.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kvhive.bench.config import L2_TIERS, BenchConfig
from kvhive.bench.l2_floors import DdMover, MemcpyMover, RedisMover, S3Mover, drop_cache
from kvhive.bench.l2_measure import (
    AdapterMover,
    Arena,
    Mover,
    PairResult,
    measure_pair,
    warm_memory,
)
from kvhive.bench.l2_services import BUCKET, Unavailable, moto_service, need_module, redis_service
from kvhive.bench.report import Target
from kvhive.bench.servers import subprocess_env
from kvhive.storage.l2.registry import BUILDERS

if TYPE_CHECKING:
    from kvhive.bench.runner import BenchRunner

GROUP = "L2 adapters (one object per call) vs their floors"
TARGET_RATIO = 0.8
TierKind = Literal["file", "memory", "service"]
NIXL_INSTALL = "pip install --no-deps nixl-cu12==1.5.1"
MOONCAKE_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class Tier:
    """One adapter configuration of the section: its registry ``adapter`` type, ``kind``
    (file and memory tiers carry the 0.8x target), ``direct`` (O_DIRECT, for the file and
    its dd flags), ``frames`` (the store adds kvhive's integrity trailer, so a ``raw``
    variant differs) and the service it ``needs`` ("" / redis / moto)."""

    adapter: str
    kind: TierKind
    direct: bool = False
    frames: bool = True
    needs: str = ""
    nixl: bool = False


TIERS: dict[str, Tier] = {
    "fs": Tier("fs", "file"),
    "fs_odirect": Tier("fs", "file", direct=True),
    "fs_native": Tier("fs_native", "file"),
    "fs_native_odirect": Tier("fs_native", "file", direct=True),
    "nixl_posix": Tier("nixl_store", "file", nixl=True),
    "nixl_posix_dynamic": Tier("nixl_store_dynamic", "file", nixl=True),
    "nixl_obj": Tier("nixl_store", "service", needs="moto", nixl=True),
    "resp": Tier("resp", "service", needs="redis"),
    "s3": Tier("s3", "service", needs="moto"),
    "mooncake": Tier("mooncake_store", "service"),
    "dax": Tier("dax", "memory", frames=False),
    "mock": Tier("mock", "memory", frames=False),
}
assert tuple(TIERS) == L2_TIERS


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one tier variant gave: a ``result``, or the ``skipped`` reason, or an ``error``."""

    result: PairResult | None = None
    skipped: str = ""
    error: str = ""
    floor: str = ""


def adapter_module_missing(tier: Tier) -> str:
    """Why ``tier``'s adapter cannot be built here ("" when it can)."""
    module = BUILDERS[tier.adapter].partition(":")[0]
    if importlib.util.find_spec(module) is None:
        return f"adapter module {module} does not exist yet"
    return ""


def variants(name: str, cfg: BenchConfig) -> tuple[str, ...]:
    """``("default",)`` plus ``"raw"`` for tiers that frame objects, when ``cfg.l2_raw``."""
    return ("default", "raw") if cfg.l2_raw and TIERS[name].frames else ("default",)


def pool_file_bytes(nbytes: int) -> int:
    """One object and its trailer in whole 4 KiB pages (a NIXL pool file or OBJ page)."""
    return -(-(nbytes + 4096) // 4096) * 4096


class Services:
    """The section's throwaway servers, started on first use and stopped by :meth:`close`;
    a service that could not start is not retried (its reason is kept)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self._stack = ExitStack()
        self._up: dict[str, Any] = {}
        self._down: dict[str, str] = {}

    def get(self, what: str) -> Any:
        """(host, port) of redis, (port, bucket URL) of moto; Unavailable when missing."""
        if what in self._down:
            raise Unavailable(self._down[what])
        if what not in self._up:
            try:
                cm = redis_service(self.work) if what == "redis" else moto_service()
                self._up[what] = self._stack.enter_context(cm)
            except Unavailable as exc:
                self._down[what] = str(exc)
                raise
            except (OSError, RuntimeError) as exc:
                self._down[what] = f"{what} did not start: {exc}"
                raise Unavailable(self._down[what]) from None
        return self._up[what]

    def close(self) -> None:
        self._stack.close()


@dataclass(frozen=True, slots=True)
class Plan:
    """How one tier variant runs: the adapter JSON, its floor, what drops its cache."""

    raw: dict[str, Any]
    floor: Mover
    floor_what: str
    cold_dir: Path | None


def _plan(name: str, integrity: str, cfg: BenchConfig, arena: Arena, work: Path,
          services: Services) -> Plan:  # fmt: skip
    """The adapter JSON and floor of ``name`` in its own directory under ``work``."""
    tier, n, reps = TIERS[name], arena.nbytes, cfg.l2_reps + 3
    d = work / f"{name}-{integrity}"
    d.mkdir(parents=True)
    raw: dict[str, Any] = {"type": tier.adapter}
    s3_port = s3_url = None
    if tier.needs == "moto":
        s3_port, s3_url = services.get("moto")
    if name in ("fs", "fs_odirect", "fs_native", "fs_native_odirect"):
        raw |= {"base_path": str(d), "use_odirect": tier.direct}
    elif name == "nixl_posix":
        raw |= {"backend": "POSIX", "pool_size": reps, "persist_enabled": False,
                "backend_params": {"file_path": str(d), "use_direct_io": "false",
                                   "file_size": str(pool_file_bytes(n))}}  # fmt: skip
    elif name == "nixl_posix_dynamic":
        raw |= {"backend": "POSIX", "backend_params": {"file_path": str(d),
                "use_direct_io": "false", "max_capacity_gb": "4"}}  # fmt: skip
    elif name == "nixl_obj":
        raw |= {"backend": "OBJ", "pool_size": reps, "backend_params": {
            "bucket": BUCKET, "endpoint_override": f"http://127.0.0.1:{s3_port}",
            "scheme": "http", "access_key": "test", "secret_key": "test",
            "region": "us-east-1", "use_virtual_addressing": "false",
            "file_size": str(pool_file_bytes(n))}}  # fmt: skip
    elif name == "resp":
        host, port = services.get("redis")
        raw |= {"host": host, "port": port}
    elif name == "s3":
        raw |= {"s3_endpoint": s3_url, "s3_region": "us-east-1", "disable_tls": True,
                "aws_access_key_id": "test", "aws_secret_access_key": "test"}  # fmt: skip
    elif name == "dax":
        shm = Path(cfg.l2_tmpfs_dir or "/dev/shm")
        if not shm.is_dir():
            raise Unavailable(f"no tmpfs directory {shm} for the dax file")
        d = Path(tempfile.mkdtemp(prefix="kvhive-bench-l2-dax-", dir=shm))
        raw |= {"device_path": str(d / "dax.img"), "slot_bytes": n,
                "max_dax_size_gb": (reps * (n + 8192) + (64 << 20)) / 2**30}  # fmt: skip
    elif name == "mock":
        raw |= {"max_size_gb": 4, "mock_bandwidth_gb": 10_000}
    if integrity == "raw":
        raw["integrity"] = "raw"
    floor: Mover
    if tier.kind == "file":
        dd = DdMover(d, n, direct=tier.direct, bs=cfg.l2_dd_bs_mib << 20)
        floor, what = dd, dd.what
    elif tier.kind == "memory":
        floor = MemcpyMover(arena, d if name == "dax" else None)
        what = "memcpy" + (" (tmpfs mapping)" if name == "dax" else "")
    elif tier.needs == "redis":
        floor, what = RedisMover(arena, *services.get("redis")), RedisMover.what
    else:
        assert s3_url is not None
        floor, what = S3Mover(arena, s3_url), S3Mover.what
    cold = d if tier.kind == "file" and not tier.direct else None
    return Plan(raw, floor, what, cold)


def _scratch_dirs(plan: Plan) -> list[Path]:
    device = plan.raw.get("device_path")
    return [Path(device).parent] if device else []


def run_tier(name: str, integrity: str, cfg: BenchConfig, arena: Arena, work: Path,
             services: Services) -> Outcome:  # fmt: skip
    """Measure one in-process tier variant; never raises (skips and errors are outcomes)."""
    tier = TIERS[name]
    try:
        if missing := adapter_module_missing(tier):
            return Outcome(skipped=missing)
        if tier.nixl:
            need_module("nixl_cu12", NIXL_INSTALL)
        plan = _plan(name, integrity, cfg, arena, work, services)
    except Unavailable as exc:
        return Outcome(skipped=str(exc))
    except Exception as exc:  # noqa: BLE001 - one tier's failure must not lose the others
        return Outcome(error=f"{type(exc).__name__}: {exc}")
    mover = None
    try:
        cold = plan.cold_dir
        mover = AdapterMover(plan.raw, arena, (lambda: drop_cache(cold)) if cold else None)
        res = measure_pair(mover, plan.floor, cfg.l2_reps, cold=cfg.l2_cold)
        return Outcome(result=res, floor=plan.floor_what)
    except Exception as exc:  # noqa: BLE001 - one tier's failure must not lose the others
        return Outcome(error=f"{type(exc).__name__}: {exc}", floor=plan.floor_what)
    finally:
        if mover is not None:
            mover.close()
        plan.floor.close()
        for d in _scratch_dirs(plan):
            shutil.rmtree(d, ignore_errors=True)


def run_mooncake(cfg: BenchConfig, names: tuple[str, ...], work: Path) -> dict[str, Outcome]:
    """The ``mooncake`` variants ``names``, measured by ``l2_mooncake.py`` in a
    private network namespace (``unshare -n``) with its own master; outcome per variant."""
    if missing := adapter_module_missing(TIERS["mooncake"]):
        return {v: Outcome(skipped=missing) for v in names}
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return {v: Outcome(skipped="unshare or ip (iproute2) is not installed") for v in names}
    args = json.dumps({"variants": list(names), "reps": cfg.l2_reps, "cold": cfg.l2_cold,
                       "object_bytes": cfg.l2_object_mib << 20, "work": str(work)})  # fmt: skip
    argv = ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$0" "$@"',
            sys.executable, "-m", "kvhive.bench.l2_mooncake", args]  # fmt: skip
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=subprocess_env(),
                              timeout=MOONCAKE_TIMEOUT_S, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {v: Outcome(error=f"no answer within {MOONCAKE_TIMEOUT_S:g} s") for v in names}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        if done.returncode and "unshare" in why:
            return {v: Outcome(skipped=f"no private network namespace: {why}") for v in names}
        return {v: Outcome(error=f"driver rc {done.returncode}: {why}") for v in names}
    out: dict[str, Outcome] = {}
    for v, d in json.loads(lines[-1]).items():
        res = PairResult.from_dict(d["result"]) if d.get("result") else None
        out[v] = Outcome(res, d.get("skipped", ""), d.get("error", ""), d.get("floor", ""))
    return out


@contextmanager
def _workspace(cfg: BenchConfig) -> Iterator[Path]:
    """A fresh directory under ``cfg.l2_dir`` (default: the system temp dir), removed after."""
    if cfg.l2_dir:
        os.makedirs(cfg.l2_dir, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kvhive-bench-l2-", dir=cfg.l2_dir or None))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(runner: BenchRunner) -> None:
    """Measure every ``cfg.l2_tiers`` tier (and its raw variant) and record the rows."""
    cfg = runner.cfg
    with _workspace(cfg) as work:
        services = Services(work)
        took = warm_memory(cfg.l2_warm_mib << 20)
        runner.say(f"l2: touched {cfg.l2_warm_mib} MiB of fresh memory in {took:.1f} s")
        arena = Arena(cfg.l2_object_mib << 20)
        try:
            for name in cfg.l2_tiers:
                names = variants(name, cfg)
                if name == "mooncake":
                    runner.say("l2: mooncake (private network namespace)")
                    outcomes = run_mooncake(cfg, names, work)
                else:
                    outcomes = {}
                    for v in names:
                        runner.say(f"l2: {name} ({v})")
                        outcomes[v] = run_tier(name, v, cfg, arena, work, services)
                for v, outcome in outcomes.items():
                    record(runner, name, v, outcome)
        finally:
            services.close()
            arena.close()


def _integrity(name: str, variant: str) -> str:
    if variant == "raw":
        return "raw"
    return {"dax": "slot header", "mock": "raw"}.get(name, "checksum")


def record(runner: BenchRunner, name: str, variant: str, outcome: Outcome) -> None:
    """Rows of one tier variant: write, read and cold read with their floors."""
    report, tier = runner.report, TIERS[name]
    tag = f"l2 {name} ({variant})"
    if outcome.skipped:
        report.skipped.append(f"{tag}: {outcome.skipped}")
        runner.say(f"{tag} skipped: {outcome.skipped}")
        return
    if outcome.error or outcome.result is None:
        report.errors.append(f"{tag}: {outcome.error or 'no result'}")
        runner.say(f"{tag} FAILED: {outcome.error}")
        return
    res = outcome.result
    if not res.verified:
        report.errors.append(f"{tag}: the loaded bytes differ from the stored ones")
    mib = runner.cfg.l2_object_mib
    base = f"l2/{name}" + ("/raw" if variant == "raw" else "")
    reads = "O_DIRECT" if tier.direct else ("page cache" if tier.kind == "file" else "")
    ops = {"write": (res.tier.write_gbs, res.floor.write_gbs, ""),
           "read": (res.tier.read_gbs, res.floor.read_gbs, reads),
           "read_cold": (res.tier.read_cold_gbs, res.floor.read_cold_gbs,
                         "own pages dropped")}  # fmt: skip
    for op, (value, floor, how) in ops.items():
        if value is None:
            continue
        what = f"{op.replace('_', ' ')}" + (f" ({how})" if how else "")
        label = f"{name} {what}, {mib} MiB, {_integrity(name, variant)}; floor: {outcome.floor}"
        report.put(f"{base}/{op}", "kvhive", value, group=GROUP, label=label, unit="GB/s",
                   better="higher", floor=floor, note=f"median of {res.reps}")  # fmt: skip
    runner.say(f"{tag}: write {res.tier.write_gbs:.2f} GB/s (floor {res.floor.write_gbs:.2f}), "
               f"read {res.tier.read_gbs:.2f} GB/s (floor {res.floor.read_gbs:.2f})")  # fmt: skip


def targets(cfg: BenchConfig) -> list[Target]:
    """The issue's target: every file and memory tier writes and reads >= 0.8x its floor."""
    if "l2" not in cfg.sections:
        return []
    out = []
    for name in cfg.l2_tiers:
        if TIERS[name].kind in ("file", "memory"):
            for op in ("write", "read"):
                out.append(Target(f"L2 {name} {op} >= {TARGET_RATIO:g}x its floor",
                                  f"l2/{name}/{op}", "vs_floor", TARGET_RATIO))  # fmt: skip
    return out
