import msgspec
import pytest

from kvhive.errors import ProtocolError, RequestTooLarge, UnknownOperation
from kvhive.wire import codec
from kvhive.wire import types as t
from kvhive.wire.ops import MAX_INLINE_ARG_BYTES, MAX_REGISTRATION_LAYERS, OPS, Pool
from support.descriptors import cpu_shm_payload, ipc_ext

enc = msgspec.msgpack.encode

KEY = {
    "model_name": "m",
    "world_size": 1,
    "worker_id": None,
    "token_ids": [1, 2, 3],
    "start": 0,
    "end": 3,
    "request_id": "r1",
    "cache_salt": "",
    "request_configs": None,
    "num_kv_readers": 1,
}


def test_op_by_legacy_id_and_by_name():
    assert codec.decode_op(bytes([0x15])).name == "get_chunk_size"
    name_frame = bytes.fromhex("ae6765745f6368756e6b5f73697a65")
    assert codec.decode_op(name_frame).name == "get_chunk_size"
    assert codec.decode_op(enc(22)).name == "ping"


@pytest.mark.parametrize("frame", [enc(11), enc(99), enc("nope"), enc(1.5), enc(True), b"\xc1"])
def test_bad_op_frames(frame):
    with pytest.raises(ProtocolError):
        codec.decode_op(frame)


def test_unknown_is_its_own_code():
    with pytest.raises(UnknownOperation):
        codec.decode_op(enc(99))


def test_key_encoding_matches_reference_vector():
    # protocol.md §4.4: a lookup key is a 10-entry map (first byte 0x8a).
    frame = enc(t.CacheKey(**KEY))
    assert frame[0] == 0x8A
    spec = codec.decode_op(enc(8))
    key, tp = codec.decode_args(spec, [enc(KEY), enc(1)])
    assert key == t.CacheKey(**KEY) and tp == 1


def test_key_fields_matched_by_name_defaults_apply():
    short = {
        k: v for k, v in KEY.items() if k not in ("cache_salt", "num_kv_readers", "request_configs")
    }
    (key, _) = codec.decode_args(
        codec.decode_op(enc(8)), [enc(dict(reversed(short.items()))), enc(1)]
    )
    assert key.cache_salt == "" and key.num_kv_readers == 0


def test_wrong_arg_count_and_bad_args():
    spec = codec.decode_op(enc(8))
    with pytest.raises(ProtocolError, match="takes 2"):
        codec.decode_args(spec, [enc(KEY)])
    with pytest.raises(ProtocolError, match="argument 1"):
        codec.decode_args(spec, [enc({"model_name": 1}), enc(1)])
    with pytest.raises(ProtocolError):
        codec.decode_args(codec.decode_op(enc(22)), [enc("x")])


def test_int_and_bool_coercion():
    assert codec.decode_args(codec.decode_op(enc(20)), [enc(1)]) == [True]
    assert codec.decode_args(codec.decode_op(enc(22)), [enc(None)]) == [None]
    assert codec.decode_args(codec.decode_op(enc(22)), [enc(7)]) == [7]


def test_results():
    assert codec.encode_result(None) == []
    assert codec.encode_result((b"", True)) == [bytes.fromhex("92c400c3")]
    assert msgspec.msgpack.decode(
        codec.encode_result(t.PrepareRetrieveResponse(success=False))[0]
    ) == {"success": False, "data": b"", "context": {}}


def test_cpu_shm_descriptor_ext():
    desc = cpu_shm_payload(
        "/lmcache_kv_1_0", "float16", [2, 8, 16, 4, 8], stride=[4096, 512, 32, 8, 1], nbytes=16384
    )
    frame = enc([ipc_ext(desc), ipc_ext({"type": "musa", "version": 1})])
    descs = codec._DESCRIPTOR_DECODER.decode(frame)
    assert isinstance(descs[0], t.CpuShmDescriptor) and descs[0].metadata.shape == [2, 8, 16, 4, 8]
    assert isinstance(descs[1], t.OtherDescriptor) and descs[1].type == "musa"
    bad = dict(desc, extra=1)
    with pytest.raises(msgspec.ValidationError):
        codec._DESCRIPTOR_DECODER.decode(enc([ipc_ext(bad)]))


def test_error_frames_fail_client_op_match():
    op, payload = codec.error_frames("protocol", "bad")
    assert msgspec.msgpack.decode(op).startswith("error: protocol")
    assert msgspec.msgpack.decode(payload) == {"code": "protocol", "message": "bad"}


# ---- limits and nesting (issue 10, fault 5) ---------------------------------------------


def nested(depth):
    return b"\x91" * depth + b"\x01"


@pytest.mark.parametrize(
    "frame", [nested(3000), nested(40), enc([22]), b"\x81\xa1a" * 30 + b"\x01"]
)
def test_op_frames_of_the_wrong_shape_never_recurse(frame):
    with pytest.raises(ProtocolError):
        codec.decode_op(frame)


def test_long_op_frame_is_refused_undecoded():
    with pytest.raises(RequestTooLarge, match="operation frame of"):
        codec.decode_op(enc("x" * 100))
    with pytest.raises(RequestTooLarge):
        codec.decode_op(b"\xc1" * 1000)  # not even valid msgpack: never looked at


def test_every_inline_op_has_a_small_argument_cap():
    for spec in OPS.values():
        if spec.pool is Pool.INLINE:
            assert spec.max_arg_bytes is not None and spec.max_arg_bytes <= MAX_INLINE_ARG_BYTES


def test_argument_size_cap_is_checked_before_decoding():
    ping = OPS["ping"]
    with pytest.raises(RequestTooLarge, match="17 bytes of arguments, at most 16"):
        codec.decode_args(ping, [b"\xc1" * 17])  # undecodable, but refused on size first
    assert codec.decode_args(ping, [enc(2**63 - 1)]) == [2**63 - 1]
    with pytest.raises(ProtocolError, match="takes 0"):
        codec.decode_args(OPS["noop"], [b"x"])


def test_nesting_past_the_recursion_limit_is_a_protocol_error():
    key = dict(KEY, request_configs={"x": 1})
    frame = enc(key).replace(enc({"x": 1}), b"\x81" + enc("x") + nested(5000))
    for op in ("lookup", "free_lookup_locks"):
        with pytest.raises(RequestTooLarge, match="argument 1 is nested too deeply"):
            codec.decode_args(OPS[op], [frame, enc(1)])
    # typed positions stop at the first value of the wrong shape
    with pytest.raises(ProtocolError, match="argument 2 is invalid"):
        codec.decode_args(OPS["lookup"], [enc(KEY), nested(5000)])
    # within the limit, Any positions still decode
    (key, _) = codec.decode_args(
        OPS["lookup"], [enc(dict(KEY, request_configs={"x": [[1]]})), enc(1)]
    )
    assert key.request_configs == {"x": [[1]]}


def test_registration_caps_layers_before_decoding_them():
    spec = OPS["register_kv_cache"]
    n = MAX_REGISTRATION_LAYERS + 1
    descs = b"\xdc" + n.to_bytes(2, "big") + b"\xc1" * n  # entries never decoded
    rest = [enc("m"), enc(1), enc("vllm"), enc({}), enc([])]
    with pytest.raises(RequestTooLarge, match=f"{n} KV cache layers .descriptors., at most"):
        codec.decode_args(spec, [enc(1), descs, *rest])
    groups = enc([{"engine_group_id": 0, "layer_indices": list(range(n))}])
    with pytest.raises(RequestTooLarge, match=f"lists {n} layers"):
        codec.decode_args(spec, [enc(1), enc([]), *rest[:-1], groups])
    many_groups = b"\xdd" + n.to_bytes(4, "big")
    with pytest.raises(RequestTooLarge, match="engine groups"):
        codec.decode_args(spec, [enc(1), enc([]), *rest[:-1], many_groups])
    assert codec.decode_args(spec, [enc(1), enc([]), *rest])[2] == "m"


def test_array_header_reader():
    assert codec._array_len(enc([])) == 0
    assert codec._array_len(enc([1] * 15)) == 15
    assert codec._array_len(enc([1] * 16)) == 16
    assert codec._array_len(enc([1] * 70_000)) == 70_000
    assert codec._array_len(enc({"a": 1})) is None
    assert codec._array_len(b"") is None
    assert codec._array_len(b"\xdc\x01") is None  # truncated header: left to the decoder
