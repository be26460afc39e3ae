"""A raw_block device or file that cannot hold its metadata area and one slot: exit 2 naming
the adapter and the field, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvhive.cli.main import main
from kvhive.config import L2Config
from kvhive.errors import ConfigError
from kvhive.storage.l2.registry import build_adapter
from support.net import free_port


def raw_block(path: Path, **fields: object) -> str:
    return json.dumps(
        {"type": "raw_block", "device_path": str(path), "slot_bytes": 65536,
         "use_odirect": False, **fields}
    )  # fmt: skip


def small_file(tmp_path: Path, size: int = 1 << 20) -> Path:
    path = tmp_path / "dev.img"
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({}, "field 'meta_total_bytes' (268435456) and one slot of slot_bytes (65536) need "
             "268500992 bytes, but"),
        ({"meta_total_bytes": 8192}, "field 'meta_total_bytes': "),
        ({"meta_total_bytes": 1 << 20}, "need 1114112 bytes, but"),
    ],
)  # fmt: skip
def test_too_small_is_a_config_error(tmp_path: Path, fields: dict, fragment: str) -> None:
    spec = L2Config(adapters=(raw_block(small_file(tmp_path), **fields),)).specs[0]
    with pytest.raises(ConfigError) as info:
        build_adapter(spec)
    assert info.value.flag == "--l2-adapter"
    assert info.value.message.startswith("#0 (raw_block): ")
    assert fragment in info.value.message


def test_missing_file_without_capacity_and_unopenable_path(tmp_path: Path) -> None:
    spec = L2Config(adapters=(raw_block(tmp_path / "absent.img"),)).specs[0]
    with pytest.raises(ConfigError, match=r"field 'capacity_bytes': .* does not exist"):
        build_adapter(spec)
    spec = L2Config(adapters=(raw_block(tmp_path),)).specs[0]  # a directory
    with pytest.raises(ConfigError, match="field 'device_path': cannot open"):
        build_adapter(spec)


def test_a_big_enough_file_opens(tmp_path: Path) -> None:
    text = raw_block(small_file(tmp_path), meta_total_bytes=64 << 10, meta_enable_periodic=False)
    spec = L2Config(adapters=(text,)).specs[0]
    adapter = build_adapter(spec)
    adapter.close()


def test_kvhive_server_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "server", "--l1-size-gb", "0.0625", "--eviction-policy", "LRU", "--host", "127.0.0.1",
        "--port", str(free_port()), "--http-port", str(free_port()),
        "--prometheus-port", str(free_port()), "--l2-adapter", raw_block(small_file(tmp_path)),
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "kvhive server: error: --l2-adapter #0 (raw_block): field 'meta_total_bytes' (268435456)"
    )
