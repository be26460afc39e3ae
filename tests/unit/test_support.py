"""The shared test helpers in ``tests/support`` do what the tests rely on them for."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from kvhive.transfer.descriptors import TensorDesc
from kvhive.wire import codec
from kvhive.wire import types as t
from support.descriptors import (
    contiguous_strides,
    cpu_shm_descriptor,
    cpu_shm_ext,
    cpu_shm_payload,
    ipc_ext,
    span_nbytes,
)
from support.net import free_port
from support.paths import SRC_DIR, env_with_src
from support.prom import scrape, value
from support.shm import KVGeometry, ShmSegment, make_shm_kv, shm_kv

CASES = [
    ("float16", (24, 2, 16, 16), None, 0),  # the vLLM-CPU layer of support.shm
    ("bfloat16", (2, 8, 16, 4, 8), None, 0),
    ("float32", (3, 4, 5), (5, 15, 1), 7),  # a permuted view from element 7
    ("uint8", (0, 4), None, 0),
]


def test_contiguous_strides() -> None:
    assert contiguous_strides((2, 8, 16, 4, 8)) == (4096, 512, 32, 8, 1)
    assert contiguous_strides((5,)) == (1,) and contiguous_strides(()) == ()


@pytest.mark.parametrize(("dtype", "shape", "stride", "offset"), CASES)
def test_cpu_shm_ext_round_trips_through_the_wire_decoder(
    dtype: str, shape: tuple[int, ...], stride: tuple[int, ...] | None, offset: int
) -> None:
    kw = {"stride": stride, "storage_offset": offset}
    frame = msgspec.msgpack.encode([cpu_shm_ext("/seg_a", dtype, shape, **kw)])
    (decoded,) = codec._DESCRIPTOR_DECODER.decode(frame)
    assert decoded == cpu_shm_descriptor("/seg_a", dtype, shape, **kw)
    assert isinstance(decoded, t.CpuShmDescriptor)
    assert decoded.metadata.shape == list(shape) and decoded.metadata.storage_offset == offset
    assert decoded.metadata.stride == list(stride or contiguous_strides(shape))
    # and kvhive's transfer layer accepts the payload, spanning exactly nbytes
    desc = TensorDesc.from_cpu_shm(cpu_shm_payload("/seg_a", dtype, shape, **kw))
    assert desc.shm_name == "seg_a" and desc.nbytes == decoded.nbytes
    if 0 not in shape:
        assert desc.byte_span() == decoded.nbytes


def test_payload_defaults_and_overrides() -> None:
    p = cpu_shm_payload("/x", "float16", [2, 3])
    assert p == {
        "type": "cpu_shm",
        "shm_name": "/x",
        "nbytes": 12,
        "version": 1,
        "metadata": {
            "dtype": "float16",
            "shape": [2, 3],
            "stride": [3, 1],
            "storage_offset": 0,
            "device_uuid": "cpu",
        },
    }
    assert cpu_shm_payload("/x", "float16", [2, 3], nbytes=4096)["nbytes"] == 4096
    assert span_nbytes("float32", (3, 4, 5), (5, 15, 1), 7) == (7 + 2 * 5 + 3 * 15 + 4 + 1) * 4
    other = msgspec.msgpack.encode([ipc_ext({"type": "musa", "version": 1})])
    assert codec._DESCRIPTOR_DECODER.decode(other) == [t.OtherDescriptor(type="musa")]


def test_shm_segment_is_a_real_posix_segment() -> None:
    seg = ShmSegment(4096, prefix="kvhive_support_")
    try:
        assert seg.name.startswith("kvhive_support_")
        assert os.path.getsize(f"/dev/shm/{seg.name}") == 4096
        assert seg.fill_random(np.random.default_rng(0)) is seg
        assert (
            bytes(seg.buf[:8]) == np.random.default_rng(0).integers(0, 256, 8, np.uint8).tobytes()
        )
    finally:
        seg.destroy()
    assert not os.path.exists(f"/dev/shm/{seg.name}")
    seg.destroy()  # idempotent


def test_shm_kv_layout_descriptors_and_cleanup() -> None:
    geo = KVGeometry()
    with shm_kv(3) as kv, shm_kv(3) as same:
        assert len(kv.segments) == geo.layers and kv.names != same.names
        assert all(os.path.getsize(f"/dev/shm/{n}") == geo.layer_nbytes for n in kv.names)
        assert [lay.shape for lay in kv.layers] == [geo.layer_shape] * geo.layers
        assert np.array_equal(kv.token_rows([1, 2]), same.token_rows([1, 2]))  # same seed
        assert kv.token_rows([1, 2]).shape == (3, 2 * geo.block_size, geo.heads, 2 * geo.head_size)
        kv.layers[1][5, 1, 3, 0] = 0xABCD  # the views are the segments' memory
        flat = np.frombuffer(kv.segments[1].buf, np.uint16)
        assert flat[np.ravel_multi_index((5, 1, 3, 0), geo.layer_shape)] == 0xABCD
        del flat
        decoded = codec._DESCRIPTOR_DECODER.decode(msgspec.msgpack.encode(kv.wire_descriptors()))
        assert decoded == kv.descriptors()
        assert [d.shm_name for d in decoded] == ["/" + n for n in kv.names]
        assert all(d.nbytes == geo.layer_nbytes for d in decoded)
        names = kv.names
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)


def test_make_shm_kv_draws_from_the_callers_generator() -> None:
    rng = np.random.default_rng(7)
    a, b = make_shm_kv(rng), make_shm_kv(rng)
    try:
        assert not np.array_equal(a.layers[0], b.layers[0])
        again = np.random.default_rng(7).integers(0, 256, KVGeometry().layer_nbytes, np.uint8)
        assert bytes(a.segments[0].buf) == again.tobytes()
    finally:
        a.destroy()
        b.destroy()


def test_prom_scrape_and_value() -> None:
    reg = CollectorRegistry()
    c = Counter("demo_chunks", "chunks", ["tier", "model"], registry=reg)
    c.labels("l1", "a").inc(3)
    c.labels("l2", "a").inc(2)
    c.labels("l1", "b").inc(1)
    Histogram("demo_GB_per_second", "throughput", registry=reg).observe(0.5)
    samples = scrape(generate_latest(reg).decode())
    assert value(samples, "demo_chunks_total") == 6
    assert value(samples, "demo_chunks_total", tier="l1") == 4
    assert value(samples, "demo_chunks_total", tier="l1", model="b") == 1
    assert value(samples, "demo_chunks_total", tier="l3") == 0
    assert value(samples, "demo_GB_per_second_count") == 1
    assert value(samples, "demo_GB_per_second_sum") == 0.5
    assert value(samples, "demo_chunks") == 0  # the counter's samples carry _total


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert free_port(exclude=(port,)) != port


def test_env_with_src_imports_kvhive_from_the_source_tree() -> None:
    env = env_with_src({"PYTHONPATH": "/elsewhere", "PATH": os.environ["PATH"]})
    assert env["PYTHONPATH"] == f"{SRC_DIR}{os.pathsep}/elsewhere"
    assert env_with_src({})["PYTHONPATH"] == str(SRC_DIR)
    out = subprocess.run(
        [sys.executable, "-S", "-c", "import kvhive; print(kvhive.__file__)"],
        env=env_with_src(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert Path(out.stdout.strip()).is_relative_to(SRC_DIR)
