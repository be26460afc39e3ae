"""``python scripts/gpu_check <command> ...`` (see the package docstring and docs/cuda.md).

Commands:
  preflight --out DIR                      no CUDA -> skipped report, exit 3 (box python)
  install --set S --wheels DIR [--host-python P] [--root R]
                                           install one bundle set into THIS venv (+ overlay)
  run --out DIR --server-python P --client-python P [--budget-s N] [--no-bench] ...
  facts [--lmcache]                        JSON facts line (client venv)
  client case|tp-rank|tp-scheduler ...     the lmcache-driven GPU round trips (client venv)
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a directory, sys.path[0] is this folder: make `gpu_check` importable as a package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json

from gpu_check import EXIT_SETUP, RESULT_MARK


def _install(argv: list[str]) -> int:
    from gpu_check import bundle

    p = argparse.ArgumentParser(prog="gpu_check install")
    p.add_argument("--set", required=True, choices=bundle.SETS)
    p.add_argument("--wheels", type=Path, required=True)
    p.add_argument("--host-python", default=None)
    p.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[2])
    a = p.parse_args(argv)
    rec: dict[str, object] = {"set": a.set}
    code = 0
    try:
        rec.update(bundle.install_set(a.wheels, a.set, a.host_python))
        if a.set == "server":
            import importlib.util

            spec = importlib.util.find_spec("kvhive")
            if spec is None or not spec.submodule_search_locations:
                raise RuntimeError("kvhive is not importable after the install")
            pkg = Path(next(iter(spec.submodule_search_locations)))
            ov = bundle.overlay_source(a.root, bundle.Manifest.load(a.wheels), pkg)
            rec["overlay"] = {
                "state": ov.state,
                "copied": ov.copied,
                "removed": ov.removed,
                "detail": ov.detail,
            }
            if ov.state == "stale-native":
                raise RuntimeError(ov.detail)
    except Exception as e:  # noqa: BLE001 - reported in the JSON line and the exit code
        rec["error"] = f"{type(e).__name__}: {e}"
        code = EXIT_SETUP
    sys.stdout.write(RESULT_MARK + json.dumps(rec, sort_keys=True, default=str) + "\n")
    return code


def _run(argv: list[str]) -> int:
    from gpu_check import orchestrate

    p = argparse.ArgumentParser(prog="gpu_check run")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--server-python", required=True)
    p.add_argument("--client-python", required=True)
    p.add_argument("--budget-s", type=float, default=420.0)
    p.add_argument("--l1-size-gb", type=float, default=8.0)
    p.add_argument("--cases", default=",".join(orchestrate.LAYOUT_CASES))
    p.add_argument("--tp", type=int, default=2, help="TP ranks of the TP check (1 = skip it)")
    p.add_argument("--no-bench", action="store_true")
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda",
        help="cpu: a smoke run of the same pipeline on CPU tensors (cpu_shm), for machines "
        "without a GPU; it checks the harness, not the CUDA path",
    )  # fmt: skip
    a = p.parse_args(argv)
    cases = [c for c in a.cases.split(",") if c]
    unknown = sorted(set(cases) - set(orchestrate.LAYOUT_CASES))
    if unknown:
        p.error(f"unknown cases {unknown}")
    opts = orchestrate.Options(
        a.out, a.server_python, a.client_python, a.budget_s, a.l1_size_gb, tuple(cases),
        not a.no_bench, a.tp, a.device,
    )  # fmt: skip
    return orchestrate.run(opts)


def _preflight(argv: list[str]) -> int:
    from gpu_check import orchestrate

    p = argparse.ArgumentParser(prog="gpu_check preflight")
    p.add_argument("--out", type=Path, required=True)
    return orchestrate.preflight(p.parse_args(argv).out)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(str(__doc__))
        return 0 if argv else EXIT_SETUP
    cmd, rest = argv[0], argv[1:]
    if cmd == "facts":
        from gpu_check import facts

        return facts.main(rest)
    if cmd == "client":
        from gpu_check import client

        return client.main(rest)
    handlers = {"install": _install, "run": _run, "preflight": _preflight}
    if cmd not in handlers:
        sys.stderr.write(f"gpu_check: unknown command {cmd!r}\n{__doc__}")
        return EXIT_SETUP
    return handlers[cmd](rest)


sys.exit(main(sys.argv[1:]))
