import msgspec
import pytest

from kvhive.errors import ProtocolError, UnknownOperation
from kvhive.wire import codec
from kvhive.wire import types as t
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
    frame = enc([ipc_ext(desc), ipc_ext({"type": "cuda", "version": 1})])
    descs = codec._DESCRIPTOR_DECODER.decode(frame)
    assert isinstance(descs[0], t.CpuShmDescriptor) and descs[0].metadata.shape == [2, 8, 16, 4, 8]
    assert isinstance(descs[1], t.OtherDescriptor) and descs[1].type == "cuda"
    bad = dict(desc, extra=1)
    with pytest.raises(msgspec.ValidationError):
        codec._DESCRIPTOR_DECODER.decode(enc([ipc_ext(bad)]))


def test_error_frames_fail_client_op_match():
    op, payload = codec.error_frames("protocol", "bad")
    assert msgspec.msgpack.decode(op).startswith("error: protocol")
    assert msgspec.msgpack.decode(payload) == {"code": "protocol", "message": "bad"}
