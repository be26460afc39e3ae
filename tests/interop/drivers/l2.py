"""L2 end to end with the real lmcache 0.5.6 client: store, drop L1, hit from L2, retrieve.

Phases (``--phase``): ``store`` writes ``--chunks`` chunks and waits until the server's
write-behind has put them in L2 (or, with ``--expect-l1-freed``, until skip_l1 has emptied
L1); ``load`` clears L1 over HTTP (unless told not to), looks the request up, retrieves the
hit into other blocks and compares bytes; ``both`` does one after the other.  The result
reports hits, byte equality and L1 object counts before and after the session ends.
"""

from __future__ import annotations

import json
import time
import urllib.request

import _common as common

SEED = 4242


def http(base: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method="GET" if body is None else "POST",
                                 headers={"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def l2_idle(status: dict) -> bool:
    lanes = status["l2"]["store"]["lanes"].values()
    return all(lane["pending"] == 0 and lane["running_tasks"] == 0 for lane in lanes)


def wait_for(base: str, what: str, check, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = http(base, "/status")
        if check(status):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{what} not reached in {timeout}s: {json.dumps(status.get('l2'))[:2000]}"
            )
        time.sleep(0.05)


def main() -> None:
    p = common.driver_parser("interop-l2")
    p.add_argument("--http", required=True)
    p.add_argument("--phase", choices=["store", "load", "both"], default="both")
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--expect-l1-freed", action="store_true")
    p.add_argument("--no-clear", action="store_true")
    p.add_argument("--layers", type=int, default=common.ModelShape.num_layers)
    p.add_argument("--kv-heads", type=int, default=common.ModelShape.num_kv_heads)
    p.add_argument("--head-size", type=int, default=common.ModelShape.head_size)
    args = p.parse_args()

    shape = common.ModelShape(args.layers, args.kv_heads, args.head_size)
    h = common.VllmHarness(args.url, args.model, args.block_size, "lmcache_driven")
    c, b, n = h.chunk_size, h.blocks_in_chunk, args.chunks
    src, dst = common.src_dst_blocks(n, b)
    kv = common.register_cpu_kv(h, shape, dst[-1] + 1)
    toks = common.tokens(SEED, n * c)
    res: dict = {"chunk_size": c}

    if args.phase in ("store", "both"):
        common.fill_blocks(kv, src, seed=SEED)
        res["store_ok"] = h.store("l2-store", toks, src, 0, n * c)
        h.end_session("l2-store")
        status = wait_for(args.http, "write-behind", l2_idle)
        if args.expect_l1_freed:
            status = wait_for(args.http, "skip_l1 freeing", lambda s: s["l1"]["objects"] == 0)
        res["l1_objects_after_store"] = status["l1"]["objects"]
        res["l2_stored"] = [a["stored"] for a in status["l2"]["adapters"]]
        common.log(f"stored {n} chunks; L2 stored {res['l2_stored']}")

    if args.phase in ("load", "both"):
        if not args.no_clear:
            http(args.http, "/cache/clear", {})
        res["l1_objects_before_lookup"] = http(args.http, "/status")["l1"]["objects"]
        hit = h.lookup("l2-load", toks)
        res["hit_chunks"] = hit // c
        nb = hit // c * b
        common.fill_blocks(kv, src, seed=SEED)
        want = common.snapshot_blocks(kv, src[:nb])
        common.set_blocks(kv, dst, 5.0)
        ok, errors = h.retrieve("l2-load", toks, dst[:nb], 0, hit) if hit else (False, [])
        res["retrieve_ok"], res["load_errors"] = ok, errors
        res["bytes_equal"] = bool(hit) and common.bytes_equal(
            common.snapshot_blocks(kv, dst[:nb]), want
        )
        h.end_session("l2-load")
        status = http(args.http, "/status")
        res["l1_objects_after_session"] = status["l1"]["objects"]
        res["read_locked_after_session"] = status["l1"]["read_locked_objects"]
        res["l2_loaded"] = [a["loaded"] for a in status["l2"]["adapters"]]
        common.log(f"hit {hit // c} chunks; loaded {res['l2_loaded']}")

    h.shutdown()
    common.emit(res)


if __name__ == "__main__":
    main()
