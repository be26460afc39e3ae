"""Both protocol versions on one decoder: 0.5.6 and 0.5.7 keys by field name, optional
trailing argument frames, the 0.5.7 registration fields and the new op."""

from __future__ import annotations

import msgspec
import pytest

from kvhive.errors import ProtocolError, RequestTooLarge
from kvhive.wire import codec
from kvhive.wire import types as t
from kvhive.wire.ops import MAX_EXTRA_RANGES, OPS, Pool

enc = msgspec.msgpack.encode

TOKENS = [1, 2, 3, 70000, 2**32 - 1]
PACKED = b"".join(x.to_bytes(4, "big") for x in TOKENS)


def key_map(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {
        "model_name": "m",
        "world_size": 1,
        "worker_id": None,
        "token_bytes": PACKED,
        "start": 0,
        "end": 5,
        "request_id": "r1",
        "cache_salt": "",
        "request_configs": None,
        "num_kv_readers": 1,
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not DROP}


DROP = object()


def decode_key(frame: dict[str, object]) -> t.CacheKey:
    key, _ = codec.decode_args(OPS["lookup"], [enc(frame), enc(1)])
    return key


# ---- PackedTokens ----------------------------------------------------------------------


def test_packed_tokens_is_a_zero_copy_sequence_of_ints():
    p = t.PackedTokens(PACKED)
    assert len(p) == 5 and p[3] == 70000 and p[-1] == 2**32 - 1
    assert list(p) == TOKENS and p.tolist() == TOKENS
    assert p.native().tolist() == TOKENS
    tail = p[1:4]
    assert isinstance(tail, t.PackedTokens) and tail.tolist() == TOKENS[1:4]
    assert tail.data.obj is p.data.obj  # a view of the same bytes
    assert p[4:2].tolist() == [] and p[:99].tolist() == TOKENS
    assert t.pack_tokens(TOKENS) == p and p != t.pack_tokens(TOKENS[:4])
    with pytest.raises(IndexError):
        p[5]
    with pytest.raises(ValueError, match="step 1"):
        p[::2]
    with pytest.raises(ValueError, match="token_bytes: 6 bytes"):
        t.PackedTokens(b"\0" * 6)


def test_packed_tokens_compare_their_bytes():
    p = t.PackedTokens(PACKED)
    other = t.pack_tokens([1, 2, 3, 9])
    assert p.same_prefix(other, 3) and p.same_prefix(p, 5)
    assert not p.same_prefix(other, 4)  # the 4th token differs
    assert not other.same_prefix(p, 5)  # fewer tokens than asked for
    assert p.same_prefix(other, 0)
    assert p[:3] == other[:3] and p != other and p[:4] != other
    assert t.PackedTokens(b"") == t.PackedTokens(bytearray())


# ---- keys in either form ---------------------------------------------------------------


def test_a_057_key_decodes_to_packed_tokens_over_the_frame():
    key = decode_key(key_map())
    assert isinstance(key.token_ids, t.PackedTokens)
    assert key.token_ids.tolist() == TOKENS and key.num_tokens == 5
    assert (key.model_name, key.end, key.num_kv_readers) == ("m", 5, 1)


def test_a_056_key_still_decodes_to_a_list():
    key = decode_key(key_map(token_bytes=DROP, token_ids=TOKENS))
    assert key.token_ids == TOKENS and isinstance(key.token_ids, list)
    # an explicit nil for the other version's field is "not sent"
    assert decode_key(key_map(token_bytes=None, token_ids=TOKENS)).token_ids == TOKENS
    assert decode_key(key_map(token_ids=None)).token_ids == t.PackedTokens(PACKED)


def test_056_and_057_keys_of_the_same_tokens_agree():
    a = decode_key(key_map())
    b = decode_key(key_map(token_bytes=DROP, token_ids=TOKENS))
    assert list(a.token_ids) == list(b.token_ids)
    assert a.num_tokens == b.num_tokens


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"token_bytes": PACKED[:-1]}, "`token_bytes` of 19 bytes"),
        ({"end": 6}, "`end` 6 is beyond the 5 tokens of `token_bytes`"),
        ({"token_ids": TOKENS}, "both `token_ids` and `token_bytes`"),
        ({"token_bytes": DROP}, "`token_ids` (0.5.6) or `token_bytes` (0.5.7) is required"),
        ({"token_bytes": [1, 2]}, "token_bytes"),
    ],
)
def test_bad_keys_get_a_protocol_error_naming_the_field(fields, names):
    with pytest.raises(ProtocolError) as err:
        decode_key(key_map(**fields))
    assert "lookup: argument 1 is invalid" in str(err.value)
    assert names in str(err.value)


def test_a_056_key_end_past_its_tokens_keeps_its_old_treatment():
    # 0.5.6 behaviour is unchanged: the engine refuses such a range (a soft failure).
    key = decode_key(key_map(token_bytes=DROP, token_ids=TOKENS, end=9))
    assert key.end == 9


# ---- optional trailing frames ----------------------------------------------------------


@pytest.mark.parametrize("op", ["free_lookup_locks", "prepare_store"])
def test_either_frame_count_decodes_and_the_default_fills_in(op):
    spec = OPS[op]
    assert spec.min_args == 2 and len(spec.args) == 3 and spec.defaults == ((),)
    short = codec.decode_args(spec, [enc(key_map()), enc(7)])
    assert short[1:] == [7, ()]
    extra = [[0, 64], [64, 128]] if op == "free_lookup_locks" else [[1, 3]]
    full = codec.decode_args(spec, [enc(key_map()), enc(7), enc(extra)])
    assert [list(x) for x in full[2]] == extra


@pytest.mark.parametrize(("op", "count"), [("free_lookup_locks", 1), ("prepare_store", 4)])
def test_a_count_that_fits_neither_version_names_the_op_and_counts(op, count):
    frames = [enc(key_map()), enc(7), enc([]), enc(0)][:count]
    with pytest.raises(
        ProtocolError, match=rf"{op} takes 2 \(0.5.6\) or 3 \(0.5.7\) .* got {count}"
    ):
        codec.decode_args(OPS[op], frames)


def test_ops_without_defaults_keep_their_exact_count():
    with pytest.raises(ProtocolError, match=r"lookup takes 2 argument frame\(s\), got 3"):
        codec.decode_args(OPS["lookup"], [enc(key_map()), enc(1), enc([])])


def test_trailing_arguments_are_typed_and_capped():
    spec = OPS["free_lookup_locks"]
    with pytest.raises(ProtocolError, match="argument 3 is invalid"):
        codec.decode_args(spec, [enc(key_map()), enc(1), enc([[0, "x"]])])
    with pytest.raises(ProtocolError, match="argument 3 is invalid"):
        codec.decode_args(spec, [enc(key_map()), enc(1), enc([[0, 1, 2]])])
    many = enc([[0, 1]] * (MAX_EXTRA_RANGES + 1))
    with pytest.raises(RequestTooLarge, match="extra lock ranges"):
        codec.check_frames(spec, [enc(key_map()), enc(1), many])
    with pytest.raises(RequestTooLarge, match="groups of skipped chunks"):
        codec.check_frames(OPS["prepare_store"], [enc(key_map()), enc(1), enc([[]] * 65)])


# ---- negotiate_chunk_size and the registration ------------------------------------------


def test_negotiate_chunk_size_travels_by_name_and_runs_inline():
    spec = codec.decode_op(enc("negotiate_chunk_size"))
    assert spec.pool is Pool.INLINE and not spec.has_soft
    assert codec.decode_args(spec, [enc(16)]) == [16]
    with pytest.raises(ProtocolError):
        codec.decode_args(spec, [enc("16")])


def registration(**extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "instance_id": 7,
        "model_name": "m",
        "world_size": 1,
        "block_size": 16,
        "num_layers": 2,
        "hidden_dim_size": 16,
        "dtype_str": "float16",
        "use_mla": False,
        "num_physical_slots": 32,
    }
    base.update(extra)
    return base


def test_the_registration_field_set_names_the_client_version():
    spec = OPS["register_kv_cache_engine_driven_context"]
    (old,) = codec.decode_args(spec, [enc(registration())])
    assert old.group_layouts is msgspec.UNSET
    (new,) = codec.decode_args(spec, [enc(registration(group_layouts=[]))])
    assert new.group_layouts == []
    layout = {
        "num_layers": 2,
        "hidden_dim_size": 16,
        "dtype_str": "float16",
        "tokens_per_block": 16,
    }
    (grouped,) = codec.decode_args(spec, [enc(registration(group_layouts=[layout]))])
    assert grouped.group_layouts == [t.GroupLayout(2, 16, "float16", 16)]


def test_null_block_id_is_sent_only_when_set():
    old = msgspec.msgpack.decode(enc(t.EngineDrivenResponse("", 0)))
    assert old == {"shm_name": "", "pool_size": 0}  # what 0.5.6 always got
    new = msgspec.msgpack.decode(enc(t.EngineDrivenResponse("", 0, null_block_id=3)))
    assert new == {"shm_name": "", "pool_size": 0, "null_block_id": 3}
