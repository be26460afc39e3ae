"""Client lifecycle: leave a session mid-way (lookup done, retrieve not yet).

Runs in the client venv.

``--phase hold``: register, store, ping, look up (the server now holds read
locks for the hit prefix), print the result line with ``"ready": true`` and
then sleep until the pytest side kills this process with SIGKILL.

``--phase unregister``: the same, but then shut the worker adapter down
(``unregister_kv_cache`` / ``unregister_kv_cache_engine_driven_context``),
end the session on the scheduler side and exit normally.
"""

from __future__ import annotations

import time

import _common as common


def main() -> None:
    p = common.driver_parser("interop-lifecycle")
    p.add_argument("--mode", choices=["lmcache_driven", "engine_driven"], default="lmcache_driven")
    p.add_argument("--phase", choices=["hold", "unregister"], required=True)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--settle-ms", type=float, default=0.0)
    p.add_argument("--heartbeat", type=float, default=5.0)
    args = p.parse_args()

    shape = common.ModelShape()
    bs = 16
    h = common.VllmHarness(args.url, args.model, bs, args.mode, heartbeat_interval=args.heartbeat)
    c, b, n = h.chunk_size, h.blocks_in_chunk, args.chunks
    src = common.blocks_for(1, n, b)
    kv = common.register_cpu_kv(h, shape, src[-1] + 1)
    tk = common.tokens(777, n * c)
    common.fill_blocks(kv, src, seed=777)
    res: dict = {"instance_id": h.instance_id, "chunk_size": c, "mode": args.mode}
    res["store_ok"] = h.store("lc-store", tk, src, 0, n * c)
    h.end_session("lc-store")
    # The reaper only considers instances that have pinged at least once
    # (the heartbeat thread would do this within one interval anyway).
    res["ping"] = bool(h.worker.req_client.ping(h.instance_id).result(timeout=10))
    time.sleep(args.settle_ms / 1000)
    res["hit_tokens"] = h.lookup("lc-load", tk)

    if args.phase == "unregister":
        h.worker.shutdown()
        h.end_session("lc-load")
        if h.scheduler is not None:
            h.scheduler.shutdown()
        res["unregistered"] = True
        common.emit(res)
        return

    res["ready"] = True
    common.emit(res)
    while True:  # wait for SIGKILL
        time.sleep(3600)


if __name__ == "__main__":
    main()
