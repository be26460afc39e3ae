"""Arguments of ``kvhive bench`` and the command itself (wired in ``kvhive.cli.main``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from kvhive.bench.config import CLIENTS, L2_TIERS, MODES, SECTIONS, SHAPES, BenchConfig


def _csv(
    choices: tuple[str, ...] | None = None, conv: type = str
) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        items = tuple(conv(x.strip()) for x in text.split(",") if x.strip())
        if not items:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        if choices is not None:
            bad = [x for x in items if x not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return items

    return parse


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    p.add_argument(
        "--vs-reference",
        action="store_true",
        help="also run every section against `lmcache server` (from the lmcache "
        "client venv) on other ports and report kvhive/reference ratios",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a short smoke run: small shape, 4 chunks, 1 round, few samples",
    )
    p.add_argument(
        "--sections",
        type=_csv(SECTIONS),
        default=d.sections,
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)",
    )
    p.add_argument(
        "--clients",
        type=_csv(CLIENTS),
        default=d.clients,
        help="lmcache (the real 0.5.6 vLLM adapters, in the client venv) and/or "
        "kvhive (kvhive.client.KvhiveClient)",
    )
    p.add_argument(
        "--modes", type=_csv(MODES), default=d.modes, help="transfer modes of the lmcache client"
    )
    p.add_argument(
        "--shapes",
        type=_csv(tuple(SHAPES)),
        default=d.shapes,
        help=f"KV shapes for store/retrieve (from {', '.join(SHAPES)})",
    )
    p.add_argument(
        "--chunks",
        type=int,
        default=d.chunks,
        help="chunks per round, and chunks per batched request",
    )
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument(
        "--engines",
        type=_csv(conv=int),
        default=d.engines,
        help="concurrent engine counts for the concurrency section",
    )
    p.add_argument(
        "--engine-shapes",
        type=_csv(tuple(SHAPES)),
        default=d.engine_shapes,
        help="KV shapes of the engine-pattern section (fresh block tables per request)",
    )
    p.add_argument(
        "--engine-cache-gib",
        type=float,
        default=d.engine_cache_gib,
        help="KV cache size of the engine-pattern section's engine",
    )
    p.add_argument(
        "--engine-settle-s",
        type=float,
        default=d.engine_settle_s,
        help="pause between registration and the cold pass",
    )
    p.add_argument("--lookup-samples", type=int, default=d.lookup_samples)
    p.add_argument("--noop-samples", type=int, default=d.noop_samples)
    p.add_argument("--healthy-sizes-gb", type=_csv(conv=float), default=d.healthy_sizes_gb)
    p.add_argument("--healthy-reps", type=int, default=d.healthy_reps)
    p.add_argument(
        "--l1-size-gb",
        type=float,
        default=d.l1_size_gb,
        help="L1 size of the servers the load runs against",
    )
    p.add_argument(
        "--block-size", type=int, default=d.block_size, help="engine KV block size in tokens"
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for both servers (repeatable, e.g. "
        "--server-arg=--max-workers --server-arg=2)",
    )
    p.add_argument(
        "--client-python",
        default=None,
        help="python of the lmcache client venv (default: "
        "scripts/setup_client_venv.sh --print-path)",
    )
    p.add_argument(
        "--l2-tiers",
        type=_csv(L2_TIERS),
        default=d.l2_tiers,
        help=f"adapters of the l2 section (from {', '.join(L2_TIERS)}; default: all)",
    )
    p.add_argument("--l2-reps", type=int, default=d.l2_reps, help="timed objects per l2 tier")
    p.add_argument("--l2-object-mib", type=int, default=d.l2_object_mib)
    p.add_argument(
        "--l2-dir",
        default=None,
        help="the l2 section's files go to a fresh directory under this one, removed after "
        "(default: the system temp dir)",
    )
    p.add_argument(
        "--l2-tmpfs-dir", default=None, help="tmpfs directory of the dax tier (default /dev/shm)"
    )
    p.add_argument(
        "--l2-dd-bs-mib", type=int, default=d.l2_dd_bs_mib, help="dd block size of file floors"
    )
    p.add_argument(
        "--l2-cold",
        action=argparse.BooleanOptionalAction,
        default=d.l2_cold,
        help="also time reads after dropping the bench's own files from the page cache",
    )
    p.add_argument(
        "--l2-raw",
        action=argparse.BooleanOptionalAction,
        default=d.l2_raw,
        help='also time integrity "raw" for tiers that add a checksum trailer',
    )
    p.add_argument(
        "--l2-warm-mib",
        type=int,
        default=d.l2_warm_mib,
        help="MiB of memory touched and freed before the l2 timings (0: none)",
    )
    p.add_argument("--log-dir", default=None, help="keep server logs here")
    p.add_argument(
        "--json", dest="json_path", default=None, metavar="PATH", help="write the report as JSON"
    )
    p.add_argument("--chart", default=None, metavar="PNG",
                   help="draw bandwidth ratios to memcpy (needs matplotlib: the bench extra)")  # fmt: skip
    p.add_argument("--render", default=None, metavar="JSON",
                   help="measure nothing: print the table of a report written by --json "
                        "(and draw it with --chart)")  # fmt: skip


def config_from_args(a: argparse.Namespace) -> BenchConfig:
    cfg = BenchConfig(
        sections=a.sections,
        vs_reference=a.vs_reference,
        clients=a.clients,
        modes=a.modes,
        shapes=a.shapes,
        chunks=a.chunks,
        rounds=a.rounds,
        engines=a.engines,
        engine_shapes=a.engine_shapes,
        engine_cache_gib=a.engine_cache_gib,
        engine_settle_s=a.engine_settle_s,
        lookup_samples=a.lookup_samples,
        noop_samples=a.noop_samples,
        healthy_sizes_gb=a.healthy_sizes_gb,
        healthy_reps=a.healthy_reps,
        l1_size_gb=a.l1_size_gb,
        block_size=a.block_size,
        server_args=tuple(a.server_arg),
        client_python=a.client_python,
        log_dir=a.log_dir,
        l2_tiers=a.l2_tiers,
        l2_reps=a.l2_reps,
        l2_object_mib=a.l2_object_mib,
        l2_dir=a.l2_dir,
        l2_tmpfs_dir=a.l2_tmpfs_dir,
        l2_dd_bs_mib=a.l2_dd_bs_mib,
        l2_cold=a.l2_cold,
        l2_raw=a.l2_raw,
        l2_warm_mib=a.l2_warm_mib,
    )
    if a.quick:
        cfg.shapes = ("smollm2-135m",)
        cfg.chunks, cfg.rounds, cfg.concurrency_rounds = 4, 1, 1
        cfg.engines = (2,)
        cfg.lookup_prefixes = (1, 64)
        cfg.lookup_samples, cfg.noop_samples = 20, 200
        cfg.healthy_sizes_gb, cfg.healthy_reps = (1.0,), 1
        cfg.l1_size_gb = min(cfg.l1_size_gb, 2.0)
        cfg.memcpy_mib = 8
        cfg.engine_shapes = ("smollm2-135m",)
        cfg.engine_cache_gib = min(cfg.engine_cache_gib, 0.25)
        cfg.engine_cold_requests, cfg.engine_warm_requests = ((1, 2), (16, 1)), ((1, 3), (16, 1))
        cfg.l2_reps = min(cfg.l2_reps, 2)
    return cfg


def run_bench_command(a: argparse.Namespace) -> int:
    """Run, print the table on stdout, write JSON / chart.  1 if any measurement failed."""
    from kvhive.bench.report import BenchReport
    from kvhive.bench.runner import BenchSetupError, run_bench, stderr_progress

    try:
        if a.render:
            report = BenchReport.read_json(a.render)
        else:
            report = run_bench(config_from_args(a), stderr_progress())
    except (BenchSetupError, OSError, ValueError) as exc:
        print(f"kvhive bench: error: {exc}", file=sys.stderr)
        return 2
    print(report.table())
    if a.json_path:
        report.write_json(a.json_path)
        print(f"\nJSON report: {a.json_path}", file=sys.stderr)
    if a.chart:
        if report.chart(a.chart):
            print(f"chart: {a.chart}", file=sys.stderr)
        else:
            print("chart skipped: matplotlib is not installed", file=sys.stderr)
    return 1 if report.errors else 0
