"""vLLM's own KV-event stream shows kvhive's L1 changes (issue 16, part 1).

One kvhive server with a small L1 (0.1 GiB: nine float32 SmolLM2 chunks of 11.25 MiB), one
vLLM engine (``LMCacheMPConnector`` from lmcache 0.5.6, prefix caching off) publishing its
KV events on a ZMQ PUB socket, and ``tests/support/vllm_kv_sub.py`` decoding them with
vLLM's own ``msgspec`` classes.  The connector subscribes to kvhive's ``subscribe_kv_events``
and turns its records into ``BlockStored``/``BlockRemoved`` (medium ``CPU``), which vLLM's
scheduler publishes.  Prompt A (1711 tokens, 6 chunks) is stored; prompt B (a different
1711-token prompt) needs 6 more chunks, so kvhive evicts A's oldest chunks, inline while
B's chunks are reserved and then by its background evictor (usage >= 0.8).  The test looks
at kvhive between the two prompts (the driver takes commands on stdin) and compares what a
router sees with what kvhive holds: kvhive's L1 key listing (``/cache/objects?tier=l1``),
its counters, and the chained chunk hashes of the prompts' tokens.
"""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from e2e_support import (
    CONTEXT,
    DRIVER,
    DTYPE,
    MAX_TOKENS,
    PROMPT_TOKENS,
    REPO,
    Servers,
    VllmEnv,
)

from kvhive.bench.servers import free_port, stop_process_group, subprocess_env
from kvhive.hashing import TokenHasher

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SUBSCRIBER = REPO / "tests" / "support" / "vllm_kv_sub.py"
#: 0.1 GiB holds nine 11.25 MiB chunks (float32): prompt A's six stay under the 0.8
#: eviction watermark, A and B together (twelve) do not fit.
L1_SIZE_GB = 0.1
HASH_ALGORITHM = "blake3"
CHUNK_TOKENS = 256
FULL_CHUNKS = PROMPT_TOKENS // CHUNK_TOKENS  # 6 (the 175-token tail is never stored)
MASK64 = 2**64 - 1
STARTUP_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 180.0
EVENTS_TIMEOUT_S = 60.0
#: How long the engine stays idle after the HTTP delete before it is made to step.
IDLE_WAIT_S = 1.5

READY_MARK = "@@KVHIVE_E2E_READY@@ "
REQUEST_MARK = "@@KVHIVE_E2E_REQUEST@@ "
STEPPED_MARK = "@@KVHIVE_E2E_STEPPED@@ "
RESULT_MARK = "@@KVHIVE_E2E_RESULT@@ "
MARKS = (READY_MARK, REQUEST_MARK, STEPPED_MARK, RESULT_MARK)


def as_event_hash(chunk_hash: bytes) -> int:
    """A kvhive chunk hash as vLLM publishes it (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``,
    the default): the low 64 bits of the big-endian integer."""
    return int.from_bytes(chunk_hash, "big") & MASK64


@dataclass(frozen=True)
class KvEvent:
    """One event of a published batch, as the subscriber decoded it."""

    seq: int  # the batch's sequence number
    type: str
    medium: str | None
    block_hashes: tuple[int, ...]
    parent_block_hash: int | None = None
    token_ids: tuple[int, ...] = ()
    block_size: int | None = None
    lora_id: int | None = None

    @classmethod
    def of(cls, seq: int, ev: dict[str, Any]) -> KvEvent:
        return cls(
            seq=seq,
            type=ev["type"],
            medium=ev.get("medium"),
            block_hashes=tuple(ev.get("block_hashes") or ()),
            parent_block_hash=ev.get("parent_block_hash"),
            token_ids=tuple(ev.get("token_ids") or ()),
            block_size=ev.get("block_size"),
            lora_id=ev.get("lora_id"),
        )


@dataclass(frozen=True)
class Batch:
    seq: int
    topic: str
    events: tuple[KvEvent, ...]
    error: str | None


@dataclass(frozen=True)
class ChunkRef:
    """A chunk kvhive should hold: its prompt, index, hash and tokens."""

    prompt: str
    index: int
    chunk_hash: bytes
    token_ids: tuple[int, ...]

    @property
    def event_hash(self) -> int:
        return as_event_hash(self.chunk_hash)


class Subscriber:
    """``vllm_kv_sub.py`` (the vLLM venv's python) writing JSON lines to ``out``."""

    def __init__(self, env: VllmEnv, endpoint: str, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [env.python, str(SUBSCRIBER), "--endpoint", endpoint, "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=subprocess_env(),
            text=True,
            start_new_session=True,
        )
        self.lines = LineReader(self.proc.stdout)
        CONTEXT.append(("vllm_kv_sub.py output (tail)", self.tail))

    def wait_ready(self, timeout_s: float) -> None:
        self.lines.wait_for(lambda line: line.strip() == "READY", timeout_s, "subscriber READY")

    def batches(self) -> list[Batch]:
        if not self.out.exists():
            return []
        text = self.out.read_text()
        rows = [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]
        return [
            Batch(
                row.get("seq", -2),
                row.get("topic", ""),
                tuple(KvEvent.of(row.get("seq", -2), e) for e in row.get("events", ())),
                row.get("error"),
            )
            for row in rows
        ]

    def events(self) -> list[KvEvent]:
        return [e for b in self.batches() for e in b.events]

    def tail(self) -> str:
        text = self.out.read_text() if self.out.exists() else "<no events file>"
        return "\n".join(self.lines.other[-20:] + text.splitlines()[-20:])

    def stop(self) -> None:
        stop_process_group(self.proc, grace_s=5.0)


class LineReader:
    """Reads a child's stdout on a thread: marked lines into a queue, the rest kept."""

    def __init__(self, stream: IO[str] | None) -> None:
        assert stream is not None
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.other: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.queue.put(line)
            self.other.append(line.rstrip("\n"))
            del self.other[:-200]
        self.queue.put(None)

    def wait_for(self, match: Callable[[str], bool], timeout_s: float, what: str) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {what} within {timeout_s:.0f}s", pytrace=False)
            try:
                line = self.queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                pytest.fail(f"the process exited before {what}", pytrace=False)
            if match(line):
                return line


class DriverSession:
    """``drivers/vllm_generate.py --serve-stdin``: one engine, commands sent one at a time."""

    def __init__(self, env: VllmEnv, port: int, events_endpoint: str, log_dir: Path) -> None:
        self.argv = [
            env.python, str(DRIVER),
            "--model", env.model,
            "--mode", "lmcache_driven",
            "--port", str(port),
            "--prompt-tokens", str(PROMPT_TOKENS),
            "--max-tokens", str(MAX_TOKENS),
            "--dtype", DTYPE,
            "--kv-events-endpoint", events_endpoint,
            "--serve-stdin",
        ]  # fmt: skip
        self.stderr_path = log_dir / f"vllm-kv-events-driver-{port}.stderr"
        self._stderr = open(self.stderr_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            cwd=str(DRIVER.parent),
            env=subprocess_env(),
            text=True,
            start_new_session=True,
        )
        self.lines = LineReader(self.proc.stdout)
        CONTEXT.append(("vLLM KV-events driver (tail)", self.tail))

    def expect(self, mark: str, timeout_s: float) -> dict[str, Any]:
        line = self.lines.wait_for(lambda s: s.startswith(mark), timeout_s, mark.strip())
        body = json.loads(line[len(mark) :])
        assert isinstance(body, dict)
        return body

    def command(self, cmd: str, mark: str, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.expect(mark, timeout_s)

    def tail(self) -> str:
        err = self.stderr_path.read_text(errors="replace").splitlines()[-60:]
        out = [s for s in self.lines.other if not s.startswith(MARKS)][-30:]
        return (
            f"$ {' '.join(self.argv)}\n--- stdout ---\n"
            + "\n".join(out)
            + ("\n--- stderr ---\n" + "\n".join(err))
        )

    def quit(self, timeout_s: float = 60.0) -> dict[str, Any] | None:
        """``quit``: the driver prints its result and shuts the engine down."""
        if self.proc.poll() is not None or self.proc.stdin is None:
            return None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        result = self.expect(RESULT_MARK, timeout_s)
        self.proc.wait(timeout=timeout_s)
        return result

    def stop(self) -> None:
        stop_process_group(self.proc, grace_s=10.0)
        self._stderr.close()


@dataclass(frozen=True)
class Phase:
    """kvhive and the event stream once a prompt's records have been published."""

    request: dict[str, Any]
    chunks: list[ChunkRef]  # the prompt's whole chunks, hashed as kvhive hashes them
    status: dict[str, Any]
    l1_keys: dict[bytes, dict[str, Any]]  # kvhive's L1 key listing: hash -> encoded key
    events: list[KvEvent]  # everything the subscriber decoded so far
    steps: int  # ``step`` requests it took to see them

    @property
    def l1_hashes(self) -> frozenset[bytes]:
        return frozenset(self.l1_keys)


@dataclass(frozen=True)
class Deletion:
    """One of B's chunks deleted through the HTTP API while the engine was idle."""

    chunk_hash: bytes
    deleted: int  # what DELETE /cache/objects answered
    idle_events: list[KvEvent]  # the subscriber's view after IDLE_WAIT_S without a step
    events: list[KvEvent]  # ... and once the engine stepped
    steps: int

    @property
    def event_hash(self) -> int:
        return as_event_hash(self.chunk_hash)


@dataclass(frozen=True)
class Observed:
    a: Phase
    b: Phase
    deletion: Deletion
    events: list[KvEvent]  # after a last engine step and the driver's exit
    batches: list[Batch]
    final_status: dict[str, Any]
    seconds: float


def _l1_keys(server: Any) -> dict[bytes, dict[str, Any]]:
    body = server.get_json("/cache/objects?tier=l1&page_size=5000")
    assert body["next_page_token"] is None, body
    return {bytes.fromhex(e["key"]["chunk_hash_hex"]): e["key"] for e in body["entries"]}


def _delete_l1(server: Any, key: dict[str, Any]) -> int:
    req = urllib.request.Request(
        server.http_url + "/cache/objects",
        data=json.dumps({"keys": [key], "tier": "l1"}).encode(),
        headers={"Content-Type": "application/json"},
        method="DELETE",
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return int(json.loads(r.read())["deleted"])


def _settled_status(server: Any, stored_chunks: int, timeout_s: float = 30.0) -> dict[str, Any]:
    """kvhive's /status once ``stored_chunks`` are committed, nothing is staging and L1 is
    under its eviction watermark (the background evictor, once a second, has nothing left
    to do): from then on nothing changes until the next request."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = server.status()
        l1 = status["l1"]
        if (
            status["counters"]["stored_chunks"] >= stored_chunks
            and l1["staging_objects"] == 0
            and l1["usage"] < 0.8
        ):
            return status
        if time.monotonic() > deadline:
            pytest.fail(f"kvhive did not settle: counters {status['counters']}, l1 {l1}")
        time.sleep(0.2)


def _counts(events: list[KvEvent]) -> tuple[int, int]:
    """(CPU BlockStored hashes, CPU BlockRemoved hashes) in ``events``."""
    stored = sum(len(e.block_hashes) for e in events if e.type == "BlockStored")
    removed = sum(len(e.block_hashes) for e in events if e.type == "BlockRemoved")
    return stored, removed


def _pump_until(
    driver: DriverSession, sub: Subscriber, stored: int, removed: int
) -> tuple[list[KvEvent], int]:
    """Step the engine (``step``: a one-token request) until the subscriber has seen at
    least ``stored``/``removed`` CPU hashes, or EVENTS_TIMEOUT_S passed.  The connector
    hands kvhive's pushed records to vLLM's scheduler only inside a model step."""
    deadline = time.monotonic() + EVENTS_TIMEOUT_S
    steps = 0
    while True:
        poll_end = time.monotonic() + 0.5
        while time.monotonic() < poll_end:
            events = sub.events()
            got = _counts(events)
            if got[0] >= stored and got[1] >= removed:
                return events, steps
            time.sleep(0.05)
        if time.monotonic() > deadline:
            return events, steps
        driver.command("step", STEPPED_MARK, REQUEST_TIMEOUT_S)
        steps += 1


def _phase(
    name: str,
    variant: int,
    server: Any,
    driver: DriverSession,
    sub: Subscriber,
    stored_before: int,
    evicted_before: int,
) -> Phase:
    req = driver.command(f"prompt {variant}", REQUEST_MARK, REQUEST_TIMEOUT_S)
    tokens = req["prompt_token_ids"]
    hasher = TokenHasher(HASH_ALGORITHM, CHUNK_TOKENS)
    chunks = [
        ChunkRef(name, i, h, tuple(tokens[i * CHUNK_TOKENS : (i + 1) * CHUNK_TOKENS]))
        for i, h in enumerate(hasher.chunk_hashes(tokens))
    ]
    status = _settled_status(server, stored_before + len(chunks))
    evicted = status["l1"]["evicted_objects"] - evicted_before
    events, steps = _pump_until(driver, sub, stored_before + len(chunks), evicted)
    return Phase(req, chunks, status, _l1_keys(server), events, steps)


def _delete_one(server: Any, driver: DriverSession, sub: Subscriber, b: Phase) -> Deletion:
    """Delete B's last chunk from L1 while no request runs: kvhive pushes the "removed"
    record at once, but vLLM publishes it only when the engine steps again."""
    victim = b.chunks[-1].chunk_hash
    stored, removed = _counts(sub.events())
    deleted = _delete_l1(server, b.l1_keys[victim])
    time.sleep(IDLE_WAIT_S)
    idle_events = sub.events()
    events, steps = _pump_until(driver, sub, stored, removed + 1)
    return Deletion(victim, deleted, idle_events, events, steps)


@pytest.fixture(scope="module")
def observed(vllm_env: VllmEnv, servers: Servers, e2e_logs: Path) -> Iterator[Observed]:
    t0 = time.monotonic()
    server = servers.start(["--hash-algorithm", HASH_ALGORITHM], l1_size_gb=L1_SIZE_GB)
    port = free_port(exclude=(server.rpc_port, server.http_port))
    # vLLM's publisher binds only wildcard endpoints (tcp://127.0.0.1:P would connect).
    sub = Subscriber(vllm_env, f"tcp://127.0.0.1:{port}", e2e_logs / f"kv-events-{port}.jsonl")
    driver = DriverSession(vllm_env, server.rpc_port, f"tcp://*:{port}", e2e_logs)
    try:
        sub.wait_ready(STARTUP_TIMEOUT_S)
        driver.expect(READY_MARK, STARTUP_TIMEOUT_S)
        a = _phase("A", 0, server, driver, sub, 0, 0)
        b = _phase(
            "B",
            1,
            server,
            driver,
            sub,
            a.status["counters"]["stored_chunks"],
            a.status["l1"]["evicted_objects"],
        )
        deletion = _delete_one(server, driver, sub, b)
        driver.quit()
        final_status = server.status()
        seconds = round(time.monotonic() - t0, 1)
        yield Observed(a, b, deletion, sub.events(), sub.batches(), final_status, seconds)
    finally:
        driver.stop()
        sub.stop()
        server.stop()


def _stored(events: list[KvEvent]) -> list[KvEvent]:
    return [e for e in events if e.type == "BlockStored"]


def _removed_hashes(events: list[KvEvent]) -> list[int]:
    return [h for e in events if e.type == "BlockRemoved" for h in e.block_hashes]


def test_the_run_is_as_configured(observed: Observed) -> None:
    """The premises: both prompts stored their 6 chunks, A alone caused no eviction, B did,
    every batch decoded with vLLM's classes, in sequence from 0 (nothing missed)."""
    a, b = observed.a, observed.b
    assert [len(a.chunks), len(b.chunks)] == [FULL_CHUNKS, FULL_CHUNKS]
    assert not {c.chunk_hash for c in a.chunks} & {c.chunk_hash for c in b.chunks}
    assert a.request["num_cached_tokens"] == 0 and b.request["num_cached_tokens"] == 0
    assert a.status["l1"]["evicted_objects"] == 0
    assert b.status["l1"]["evicted_objects"] > 0
    assert [bt.error for bt in observed.batches if bt.error] == []
    assert [bt.seq for bt in observed.batches] == list(range(len(observed.batches)))
    kv = observed.final_status["kv_events"]
    assert (kv["unbound_stores"], kv["lost_markers"]) == (0, 0), kv
    print(
        f"KV-events e2e: {observed.seconds}s, {len(observed.batches)} batches, "
        f"steps needed after A {a.steps}, after B {b.steps}, "
        f"after the delete {observed.deletion.steps}, "
        f"evicted {b.status['l1']['evicted_objects']}"
    )


def test_kvhive_holds_what_it_was_given(observed: Observed) -> None:
    """kvhive's own view (L1 listing): A's chunks after A; after B, all of B's and A's
    minus the evicted ones; the eviction counter counts exactly those."""
    a, b = observed.a, observed.b
    a_hashes = {c.chunk_hash for c in a.chunks}
    b_hashes = {c.chunk_hash for c in b.chunks}
    assert a.l1_hashes == a_hashes
    assert b_hashes <= b.l1_hashes <= a_hashes | b_hashes
    evicted = a_hashes - b.l1_hashes
    assert len(evicted) == b.status["l1"]["evicted_objects"]
    assert b.status["counters"]["stored_chunks"] == 2 * FULL_CHUNKS


def test_block_stored_cpu_for_exactly_the_chunks_kvhive_stored(observed: Observed) -> None:
    """One BlockStored (medium CPU, block_size 256) per chunk kvhive stored, hash = low 64
    bits of kvhive's chunk hash, the chunk's tokens, parents chained from None."""
    stored = _stored(observed.events)
    assert len(stored) == observed.final_status["counters"]["stored_chunks"] == 2 * FULL_CHUNKS
    chunks = observed.a.chunks + observed.b.chunks
    by_hash = {c.event_hash: c for c in chunks}
    assert len(by_hash) == len(chunks)
    assert all(len(e.block_hashes) == 1 for e in stored), stored
    assert sorted(e.block_hashes[0] for e in stored) == sorted(by_hash)
    for e in stored:
        chunk = by_hash[e.block_hashes[0]]
        assert (e.medium, e.block_size, e.lora_id) == ("CPU", CHUNK_TOKENS, None), e
        assert e.token_ids == chunk.token_ids, (chunk.prompt, chunk.index)
        expected_parent = (
            None if chunk.index == 0 else as_event_hash(chunks[chunks.index(chunk) - 1].chunk_hash)
        )
        assert e.parent_block_hash == expected_parent, (chunk.prompt, chunk.index)
    # A's records were published before B was sent; B's after.
    a_stored = _stored(observed.a.events)
    assert sorted(e.block_hashes[0] for e in a_stored) == sorted(
        c.event_hash for c in observed.a.chunks
    )


def test_block_removed_cpu_for_exactly_the_evicted_chunks(observed: Observed) -> None:
    """kvhive's evictions (inline while B reserved, then the background evictor) reach the
    router as BlockRemoved (medium CPU), each evicted hash once, after its BlockStored."""
    a, b = observed.a, observed.b
    evicted = {as_event_hash(h) for h in {c.chunk_hash for c in a.chunks} - b.l1_hashes}
    removed = _removed_hashes(b.events)
    assert sorted(removed) == sorted(evicted)
    assert len(removed) == b.status["l1"]["evicted_objects"]
    assert _removed_hashes(a.events) == []
    stored_seq = {e.block_hashes[0]: e.seq for e in _stored(observed.events)}
    for e in observed.events:
        if e.type == "BlockRemoved":
            assert e.medium == "CPU", e
            assert all(stored_seq[h] <= e.seq for h in e.block_hashes), e


def test_an_http_delete_is_published_at_the_next_engine_step(observed: Observed) -> None:
    """A chunk deleted through kvhive's HTTP API (not an eviction) reaches the router as
    BlockRemoved too, but only once the engine steps: the connector hands over kvhive's
    pushed records inside a model step, so an idle engine publishes nothing."""
    d = observed.deletion
    assert d.deleted == 1
    assert d.event_hash not in _removed_hashes(d.idle_events)
    assert len(d.idle_events) == len(observed.b.events)
    assert d.steps >= 1
    assert _removed_hashes(d.events)[len(_removed_hashes(observed.b.events)) :] == [d.event_hash]
    final = observed.final_status
    assert final["l1"]["objects"] == len(observed.b.l1_keys) - 1
    assert sorted(_removed_hashes(observed.events)) == sorted(
        [*_removed_hashes(observed.b.events), d.event_hash]
    )


def test_no_gpu_medium_events_with_prefix_caching_off(observed: Observed) -> None:
    """vLLM's own block pool publishes (medium GPU) only when prefix caching caches blocks;
    the driver turns it off, so every event is the connector's (CPU), none other."""
    assert {(e.type, e.medium) for e in observed.events} <= {
        ("BlockStored", "CPU"),
        ("BlockRemoved", "CPU"),
    }
