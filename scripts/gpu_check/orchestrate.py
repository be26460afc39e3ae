"""``run``: the whole GPU check, stage by stage, inside one time budget (stdlib only).

Runs in the server venv (its interpreter starts ``kvhive server`` and ``kvhive bench``);
every GPU-side step runs in the client venv's interpreter as a subprocess (``client`` and
``facts`` commands), one per check, each under its own timeout, so one hung or crashed
case costs its own check only.

Process contract: the orchestrator starts the server and the client processes and is the
only one to stop them, by the PIDs it holds (SIGTERM, then SIGKILL after a grace period);
nothing else on the machine is touched.

Files written to OUTDIR (the device tool brings back at most 8): ``gpu-check.json``,
``server.log``, ``clients.log`` (every client subprocess's stderr), ``bench-cuda.json``
and ``bench.log`` (when the bench ran); ``install.log`` comes from gpu_check.sh.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from gpu_check import RESULT_MARK
from gpu_check.report import Check, Report

HERE = Path(__file__).resolve().parent  # scripts/gpu_check
ROOT = HERE.parent.parent
LAYOUT_CASES = (
    "nhd",
    "hnd",
    "hnd_permuted_view",
    "flashinfer_nhd",
    "flashinfer_hnd",
    "mla",
    "fused_nhd",
    "fused_hnd",
    "shared_buffer",
    "blocks_first",
)  # fmt: skip  (kv_layouts.CASE_NAMES; not imported here: that module needs torch)


@dataclass(frozen=True, slots=True)
class Options:
    out: Path
    server_python: str
    client_python: str
    budget_s: float = 420.0
    l1_size_gb: float = 8.0
    cases: Sequence[str] = LAYOUT_CASES
    bench: bool = True
    tp: int = 2
    device: str = "cuda"  # "cpu": the CPU smoke run of the whole pipeline (no GPU there)


class Budget:
    """The run's deadline; each stage asks for at most what is left minus a reserve."""

    def __init__(self, seconds: float, reserve_s: float = 15.0) -> None:
        self.deadline = time.monotonic() + seconds
        self.reserve_s = reserve_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def cap(self, want: float) -> float:
        return max(0.0, min(want, self.left() - self.reserve_s))


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(HERE.parent), env.get("PYTHONPATH", "")) if p
    )
    env.update(LMCACHE_TRACK_USAGE="false", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
    env.setdefault("LMCACHE_LOG_LEVEL", "WARNING")
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_pid(proc: subprocess.Popen[Any], grace_s: float = 10.0) -> int | None:
    """Stop a process this module started: SIGTERM, then SIGKILL. Returns its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


def parse_result(stdout: str) -> dict[str, Any] | None:
    """The last ``RESULT_MARK`` line's JSON, or None."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return dict(json.loads(line[len(RESULT_MARK) :]))
    return None


@dataclass(slots=True)
class Runner:
    """Runs the client interpreter's commands; appends their stderr to clients.log."""

    opts: Options
    log: IO[str]

    def gpu_check(
        self, python: str, args: Sequence[str], timeout_s: float
    ) -> tuple[dict[str, Any] | None, str]:
        """``python scripts/gpu_check ARGS``: (the result JSON or None, an error text)."""
        if timeout_s <= 1:
            return None, "no time left in the run's budget"
        cmd = [python, str(HERE), *args]
        self.log.write(f"\n===== {' '.join(args)}\n")
        self.log.flush()
        try:
            p = subprocess.run(
                cmd, stdout=subprocess.PIPE, stderr=self.log, text=True,
                timeout=timeout_s, env=subprocess_env(), cwd=ROOT, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as e:
            return (
                None,
                f"timed out after {timeout_s:.0f}s (stdout tail: {str(e.stdout or '')[-500:]})",
            )
        res = parse_result(p.stdout)
        if res is None:
            return None, f"exit {p.returncode}, no result line (stdout tail: {p.stdout[-800:]})"
        return res, ""


# ----------------------------------------------------------------- the server


@dataclass(slots=True)
class Server:
    """``kvhive server`` on loopback ports, started and stopped by PID."""

    python: str
    l1_size_gb: float
    log_path: Path
    rpc_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.rpc_port}"

    def argv(self) -> list[str]:
        return [
            self.python, "-m", "kvhive", "server",
            "--host", "127.0.0.1", "--port", str(self.rpc_port),
            "--http-host", "127.0.0.1", "--http-port", str(self.http_port),
            "--l1-size-gb", f"{self.l1_size_gb:g}", "--eviction-policy", "LRU",
            "--supported-transfer-mode", "lmcache_driven",
        ]  # fmt: skip

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.http_port}/healthcheck", timeout=1
            ) as r:
                return int(r.status) == 200
        except OSError:
            return False

    def start(self, timeout_s: float) -> float:
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=subprocess_env(), cwd=ROOT, start_new_session=True,
            )  # fmt: skip
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvhive server exited ({self.proc.returncode}) during start-up")
            if self.healthy():
                return time.monotonic() - t0
            time.sleep(0.1)
        raise RuntimeError(f"kvhive server not healthy within {timeout_s:.0f}s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        return stop_pid(self.proc) if self.proc is not None else None


def log_tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# ----------------------------------------------------------------- stages


def check_from(name: str, res: dict[str, Any] | None, err: str, seconds: float) -> Check:
    if res is None:
        return Check(name, "failed", round(seconds, 3), err)
    details = dict(res.get("details", {}))
    if res.get("timings"):
        details["timings"] = res["timings"]
    if res.get("trace"):
        details["trace"] = res["trace"]
    return Check(
        name,
        str(res.get("status", "failed")),
        round(seconds, 3),
        str(res.get("error", "")),
        details,
    )


def stage_cases(rep: Report, run: Runner, server: Server, budget: Budget, opts: Options) -> None:
    # The client wraps CPU tensors as cpu_shm only when contiguous (migrate_to_shm_and_wrap
    # refuses a strided view), so the CPU smoke run leaves the cross-layer pool out.
    cases = [c for c in opts.cases if opts.device == "cuda" or c != "blocks_first"]
    variants = [(c, False) for c in cases]
    if opts.device == "cuda":
        variants.append(("nhd", True))  # cuda_raw exists on CUDA only
    for case, raw in variants:
        name = f"{'cuda_raw' if raw else 'cuda' if opts.device == 'cuda' else 'cpu-smoke'}/{case}"
        if not server.alive():
            rep.add(Check(name, "failed", 0.0, "kvhive server is not running (crashed earlier?)"))
            continue
        args = ["client", "case", "--url", server.url, "--case", case, "--device", opts.device]
        args += ["--isolated-ipc"] if raw else []
        t0 = time.monotonic()
        res, err = run.gpu_check(opts.client_python, args, budget.cap(90))
        rep.add(check_from(name, res, err, time.monotonic() - t0))


class LineProc:
    """A child process whose stdout lines arrive on a queue (read by a daemon thread)."""

    def __init__(self, cmd: list[str], log: IO[str]) -> None:
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
            env=subprocess_env(), cwd=ROOT, bufsize=1,
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("")  # EOF

    def expect(self, prefixes: tuple[str, ...], deadline: float) -> str:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"waited for {prefixes} in vain")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line == "" and self.proc.poll() is not None:
                raise RuntimeError(f"process exited ({self.proc.returncode}) before {prefixes}")
            if line.startswith(prefixes):
                return line

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()


def stage_tp(rep: Report, run: Runner, server: Server, budget: Budget, opts: Options) -> None:
    """TP = opts.tp worker processes on the same GPU, one scheduler, world_size = opts.tp."""
    name = f"{'cuda' if opts.device == 'cuda' else 'cpu-smoke'}/tp{opts.tp}"
    t0 = time.monotonic()
    deadline = time.monotonic() + budget.cap(150)
    base = [opts.client_python, str(HERE), "client"]
    rid = f"gpu-check-tp-{os.getpid()}"
    run.log.write(f"\n===== {name}\n")
    run.log.flush()
    procs: list[LineProc] = []
    try:
        sched = LineProc(
            [*base, "tp-scheduler", "--url", server.url, "--world-size", str(opts.tp)], run.log
        )
        procs.append(sched)
        ranks = [
            LineProc(
                [
                    *base,
                    "tp-rank",
                    "--url",
                    server.url,
                    "--rank",
                    str(r),
                    "--world-size",
                    str(opts.tp),
                    "--request-id",
                    rid,
                    "--device",
                    opts.device,
                ],
                run.log,
            )
            for r in range(opts.tp)
        ]
        procs += ranks
        hits: dict[str, Any] = {}
        results: list[dict[str, Any] | None] = [None] * opts.tp
        for stage in ("stored", "again"):
            infos = []
            for i, rp in enumerate(ranks):
                line = rp.expect(("@@STAGE", RESULT_MARK), deadline)
                if line.startswith(RESULT_MARK):  # the rank failed before this stage
                    results[i] = json.loads(line[len(RESULT_MARK) :])
                    raise RuntimeError(
                        f"rank {i} stopped before '{stage}': {results[i].get('error')}"
                    )
                infos.append(json.loads(line.split(" ", 2)[2]))
            info = infos[0]
            sched.send(json.dumps({"op": "lookup", **info}))
            hit = json.loads(sched.expect(("{",), deadline))["hit"]
            hits[stage] = hit
            if hit is None or hit < info["end"]:
                raise AssertionError(
                    f"TP lookup at '{stage}' hit {hit} tokens, stored {info['end']}"
                )
            for rp in ranks:
                rp.send("GO")
        for i, rp in enumerate(ranks):
            results[i] = json.loads(rp.expect((RESULT_MARK,), deadline)[len(RESULT_MARK) :])
        sched.send(json.dumps({"op": "quit"}))
        bad = [
            f"rank {i}: {r.get('error')}"
            for i, r in enumerate(results)
            if r and r["status"] != "passed"
        ]
        details = {"lookup_hits": hits, "ranks": results}
        status = "failed" if bad else "passed"
        rep.add(Check(name, status, round(time.monotonic() - t0, 3), "; ".join(bad), details))
    except Exception as e:  # noqa: BLE001 - the check's error text
        rep.add(Check(name, "failed", round(time.monotonic() - t0, 3), f"{type(e).__name__}: {e}"))
    finally:
        for p in procs:
            stop_pid(p.proc, grace_s=5.0)


def bench_has_cuda(python: str) -> bool:
    try:
        p = subprocess.run(
            [python, "-m", "kvhive", "bench", "--help"], capture_output=True, text=True,
            timeout=60, env=subprocess_env(), cwd=ROOT, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return False
    return "cuda" in p.stdout.replace("\n", " ").split("--sections", 1)[-1][:400]


def stage_bench(rep: Report, budget: Budget, opts: Options) -> None:
    name = "bench/cuda"
    if not bench_has_cuda(opts.server_python):
        rep.add(Check(name, "skipped", 0.0, "`kvhive bench` has no 'cuda' section in this tree"))
        return
    out_json = opts.out / "bench-cuda.json"
    t0 = time.monotonic()
    timeout_s = budget.cap(180)
    with (
        tempfile.TemporaryDirectory(prefix="gpu-check-bench-") as logs,
        open(opts.out / "bench.log", "w") as log,
    ):
        cmd = [
            opts.server_python, "-m", "kvhive", "bench", "--sections", "cuda",
            "--client-python", opts.client_python, "--l1-size-gb", f"{opts.l1_size_gb:g}",
            "--json", str(out_json), "--log-dir", logs,
        ]  # fmt: skip
        try:
            p = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                               env=subprocess_env(), cwd=ROOT, check=False)  # fmt: skip
            rc: int | str = p.returncode
        except subprocess.TimeoutExpired:
            rc = f"timed out after {timeout_s:.0f}s"
    details: dict[str, Any] = {"command": " ".join(cmd[1:]), "rc": rc}
    try:
        details["result"] = json.loads(out_json.read_text())
    except (OSError, ValueError) as e:
        details["result_error"] = str(e)
    ok = rc == 0 and "result" in details
    err = "" if ok else f"bench rc={rc}; log tail: {log_tail(opts.out / 'bench.log', 1500)}"
    rep.add(
        Check(name, "passed" if ok else "failed", round(time.monotonic() - t0, 3), err, details)
    )


def install_records(out: Path) -> Iterator[dict[str, Any]]:
    """The install summaries gpu_check.sh left in install.log."""
    with contextlib.suppress(OSError):
        for line in (out / "install.log").read_text(errors="replace").splitlines():
            if line.startswith(RESULT_MARK):
                yield json.loads(line[len(RESULT_MARK) :])


# ----------------------------------------------------------------- run


def run(opts: Options) -> int:
    rep = Report(opts.out)
    budget = Budget(opts.budget_s)
    opts.out.mkdir(parents=True, exist_ok=True)
    for rec in install_records(opts.out):
        status = "failed" if rec.get("error") else "passed"
        rep.add(Check(f"install/{rec.get('set')}", status, 0.0, str(rec.get("error", "")), rec))
    with open(opts.out / "clients.log", "a") as clog:
        runner = Runner(opts, clog)
        t0 = time.monotonic()
        facts, err = runner.gpu_check(opts.client_python, ["facts", "--lmcache"], budget.cap(120))
        rep.facts = facts or {"error": err}
        rep.facts["orchestrator_python"] = sys.version.split()[0]
        rep.write()
        if facts is None:
            rep.add(Check("facts", "failed", round(time.monotonic() - t0, 3), err))
            return rep.finish()
        if opts.device == "cuda" and not facts.get("cuda_available"):
            why = (
                facts.get("torch_error")
                or facts.get("cuda_error")
                or "torch.cuda.is_available() is False"
            )
            return rep.finish(skipped_reason=f"no-cuda: {why}")
        if rep.failed():
            return rep.finish()  # an install failed: the client or server cannot be trusted
        server = Server(opts.server_python, opts.l1_size_gb, opts.out / "server.log")
        try:
            t1 = time.monotonic()
            try:
                took = server.start(budget.cap(90))
                rep.add(
                    Check("server/start", "passed", round(took, 3), "", {"argv": server.argv()[1:]})
                )
            except RuntimeError as e:
                rep.add(Check("server/start", "failed", round(time.monotonic() - t1, 3), str(e),
                              {"log_tail": log_tail(server.log_path)}))  # fmt: skip
                return rep.finish()
            stage_cases(rep, runner, server, budget, opts)
            if opts.tp > 1:
                stage_tp(rep, runner, server, budget, opts)
            alive = server.alive()
            rep.add(Check("server/alive-after-checks", "passed" if alive else "failed", 0.0,
                          "" if alive else f"server died: {log_tail(server.log_path, 2000)}"))  # fmt: skip
        finally:
            rc = server.stop()
            rep.note(
                f"kvhive server (pid {server.proc.pid if server.proc else '-'}) stopped, exit {rc}"
            )
    if opts.bench:
        stage_bench(rep, budget, opts)
    return rep.finish()


def preflight(out: Path) -> int:
    """Run by gpu_check.sh with the box's own python before any venv is made: writes the
    skipped report and returns EXIT_NO_CUDA when there is no CUDA torch/device, else 0."""
    from gpu_check import EXIT_NO_CUDA, facts

    f = facts.collect(probe_lmcache=False)
    if f.get("cuda_available"):
        return 0
    rep = Report(out)
    rep.facts = f
    why = f.get("torch_error") or f.get("cuda_error") or "torch.cuda.is_available() is False"
    code = rep.finish(skipped_reason=f"no-cuda: {why}")
    assert code == EXIT_NO_CUDA
    return code
