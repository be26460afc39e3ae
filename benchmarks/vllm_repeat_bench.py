"""A real vLLM (CPU) engine's repeat request through kvhive vs `lmcache server`.

Runs in kvhive's dev venv; starts each server in turn on free ports and runs the e2e driver
(tests/e2e/drivers/vllm_generate.py) in the vLLM venv against it: one cold request (computes
and stores the prompt's 6 full chunks) then ``--repeats`` repeats that load them.  Reports the
median repeat time per server, per transfer mode, the spread of the repeats (max - min), and
checks that both servers produced the same tokens.  ``--max-tokens 1`` times the request to
its first token (what loading the prefix shortens); the default 24 adds decoding, which no
KV cache changes.

    .venv/bin/python benchmarks/vllm_repeat_bench.py [--repeats 5] [--dtype float32]
        [--max-tokens 24] [--prompt-tokens 1711] [--modes lmcache_driven,engine_driven]
        [--json out.json]

A longer ``--prompt-tokens`` (up to SmolLM2's 8192-token context; the driver's
``--max-model-len`` follows it) loads more chunks per repeat, so that the servers' load time
is a larger share of the time to the first token.

Needs scripts/setup_vllm_venv.sh and scripts/setup_client_venv.sh built.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from kvhive.bench.servers import ServerProcess, locate_client_python, subprocess_env

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "e2e" / "drivers" / "vllm_generate.py"
MARK = "@@KVHIVE_E2E_RESULT@@ "


def vllm_python() -> str:
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "setup_vllm_venv.sh"), "--print-path"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def run(
    py: str, mode: str, port: int, repeats: int, dtype: str, prompt: int, max_tokens: int
) -> dict:
    """The driver's result: one cold request then ``repeats`` repeats of it."""
    max_len = max(2048, prompt + max_tokens + 64)  # the driver's default fits 1711 tokens only
    model = str(Path(py).parent.parent / "kvhive-model")
    argv = [py, str(DRIVER), "--model", model, "--mode", mode, "--port", str(port),
            "--repeats", str(repeats + 1), "--dtype", dtype, "--prompt-tokens", str(prompt),
            "--max-tokens", str(max_tokens), "--max-model-len", str(max_len)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, env=subprocess_env(), check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    raise RuntimeError(f"driver failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt-tokens", type=int, default=1711)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--modes", default="lmcache_driven,engine_driven")
    ap.add_argument("--json", default=None)
    ap.add_argument("--rescore", default=None, help="recompute a recorded run's summaries")
    a = ap.parse_args()
    if a.rescore:
        return rescore(a.rescore)
    py, client = vllm_python(), locate_client_python()
    if client is None:
        print("lmcache client venv missing (scripts/setup_client_venv.sh)", file=sys.stderr)
        return 2
    results: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory() as logs:
        for mode in a.modes.split(","):
            for kind in ("kvhive", "reference"):
                server = ServerProcess(kind, 4, client_python=client,
                                       log_path=Path(logs) / f"{kind}-{mode}.log")  # fmt: skip
                server.start()
                try:
                    res = run(py, mode, server.rpc_port, a.repeats, a.dtype, a.prompt_tokens,
                              a.max_tokens)  # fmt: skip
                finally:
                    server.stop()
                reqs = res["requests"]
                results.setdefault(mode, {})[kind] = {
                    "cold_s": reqs[0]["seconds"],
                    "repeat_s": [r["seconds"] for r in reqs[1:]],
                    "repeat_loaded_tokens": [r["num_cached_tokens"] for r in reqs[1:]],
                    "token_ids": reqs[-1]["token_ids"],
                }
                summarize(results[mode][kind])
                print(f"{mode} {kind}: cold {reqs[0]['seconds']:.2f} s, repeat median "
                      f"{results[mode][kind]['repeat_median_s']:.3f} s", file=sys.stderr)  # fmt: skip
    return report(results, a.json, vars(a))


def summarize(r: dict) -> None:
    """Median and spread (max - min) of the repeats that loaded the whole stored prefix (the
    most tokens any repeat loaded); a repeat that loaded less timed something else (the
    reference commits a store only after replying, so its first repeat can find part of the
    prefix missing) and is counted in ``partial_repeats``, its time kept in ``repeat_s``."""
    full = max(r["repeat_loaded_tokens"])
    times = [t for t, n in zip(r["repeat_s"], r["repeat_loaded_tokens"], strict=True) if n == full]
    r["repeat_median_s"] = round(statistics.median(times), 4)
    r["repeat_spread_s"] = round(max(times) - min(times), 4)
    r["partial_repeats"] = len(r["repeat_s"]) - len(times)
    r["repeat_median_all_s"] = round(statistics.median(r["repeat_s"]), 4)


def report(results: dict[str, dict[str, dict]], out: str | None, args: dict) -> int:
    """Print the table (and write ``out``): margin = reference median - kvhive median."""
    print(f"{'mode':16} {'kvhive repeat s':>16} {'reference repeat s':>19} {'kvhive/ref':>11} "
          f"{'margin s':>9} {'spread s (kvhive, ref)':>23}")  # fmt: skip
    for mode, r in results.items():
        k, ref = r["kvhive"]["repeat_median_s"], r["reference"]["repeat_median_s"]
        sk, sr = r["kvhive"]["repeat_spread_s"], r["reference"]["repeat_spread_s"]
        same = r["kvhive"]["token_ids"] == r["reference"]["token_ids"]
        r["margin_s"] = round(ref - k, 4)
        r["margin_exceeds_spread"] = ref - k > max(sk, sr)
        print(f"{mode:16} {k:16.3f} {ref:19.3f} {k / ref:11.3f} {ref - k:9.3f} "
              f"{sk:11.3f} {sr:11.3f}  same tokens: {same}, margin > spread: "
              f"{r['margin_exceeds_spread']}, partial repeats (kvhive, ref): "
              f"{r['kvhive']['partial_repeats']}, {r['reference']['partial_repeats']}")  # fmt: skip
    if out:
        Path(out).write_text(json.dumps({"args": args, "results": results}, indent=2) + "\n")
    return 0


def rescore(path: str) -> int:
    """Recompute the summaries of a recorded run (``--rescore FILE``) and rewrite it."""
    data = json.loads(Path(path).read_text())
    for by_kind in data["results"].values():
        for r in by_kind.values():
            if isinstance(r, dict) and "repeat_s" in r:
                summarize(r)
    results = {m: {k: v for k, v in r.items() if isinstance(v, dict)}
               for m, r in data["results"].items()}  # fmt: skip
    return report(results, path, data["args"])


if __name__ == "__main__":
    sys.exit(main())
