"""server_module_call with the real lmcache 0.5.6 client, and the 0.5.7 affinity variant
with 0.5.6's own request type on a bare socket (the 0.5.6 client has no method for it).

Runs in the client venv.  Prints one result line: per case ``{"outcome": "result",
"value": {...}}``, ``{"outcome": "error", ...}`` or ``{"outcome": "timeout"}``.
"""

from __future__ import annotations

import msgspec
import zmq
from _common import driver_parser, emit
from lmcache.v1.multiprocess.protocols.server_module import (
    ServerModuleCallRequest,
    ServerModuleCallResponse,
)
from lmcache.v1.multiprocess.transport.factory import RequestClientFactory
from lmcache.v1.multiprocess.transport.zmq_impl.wire import encode_operation


def render(response: ServerModuleCallResponse) -> dict:
    return {
        "success": response.success,
        "payload": response.payload.decode(errors="replace"),
        "error": response.error,
    }


def client_call(client, method: str, payload: bytes, deadline: float) -> dict:
    future = client.server_module_call(ServerModuleCallRequest(method=method, payload=payload))
    try:
        value = future.result(timeout=deadline)
    except TimeoutError:
        return {"outcome": "timeout"}
    except Exception as exc:  # noqa: BLE001 - the outcome is what is recorded
        return {"outcome": "error", "error": f"{type(exc).__name__}: {exc}"}
    assert isinstance(value, ServerModuleCallResponse), type(value)
    return {"outcome": "result", "value": render(value)}


def raw_affinity_call(ctx: zmq.Context, url: str, method: str, deadline: float) -> dict:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    try:
        request = ServerModuleCallRequest(method=method, payload=b"aff")
        sock.send_multipart(
            [
                msgspec.msgpack.encode(7),
                encode_operation("server_module_affinity_call"),
                msgspec.msgpack.encode(request),
            ]
        )
        if not sock.poll(int(deadline * 1000), zmq.POLLIN):
            return {"outcome": "timeout"}
        frames = sock.recv_multipart()
        op = msgspec.msgpack.decode(frames[1])
        if op != "server_module_affinity_call":
            return {"outcome": "error", "error": str(op)}
        value = msgspec.msgpack.decode(frames[2], type=ServerModuleCallResponse)
        return {"outcome": "result", "value": render(value)}
    finally:
        sock.close(linger=0)


def main() -> None:
    p = driver_parser("interop-modules")
    p.add_argument("--deadline", type=float, default=5.0)
    p.add_argument("--affinity", action="store_true")
    args = p.parse_args()
    ctx = zmq.Context()
    client = RequestClientFactory.create(args.url, context=ctx)
    result = {
        "echo": client_call(client, "interop.echo", b"hello", args.deadline),
        "unknown": client_call(client, "interop.nope", b"", args.deadline),
        "fail": client_call(client, "interop.fail", b"x", args.deadline),
        "thread": client_call(client, "interop.thread", b"", args.deadline),
    }
    if args.affinity:
        for name, method in (("affinity", "interop.ordered"), ("affinity_wrong", "interop.echo")):
            result[name] = raw_affinity_call(ctx, args.url, method, args.deadline)
    client.close()
    emit(result)


if __name__ == "__main__":
    main()
