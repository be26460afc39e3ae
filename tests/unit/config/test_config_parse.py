"""parse_server_args: every flag reaches its field, every bad value names its flag."""

from __future__ import annotations

import dataclasses
import shlex
from typing import Any

import pytest

from kvhive.config import REFUSALS, MPConfig, ServerConfig, parse_server_args
from kvhive.config.fields import section_fields
from kvhive.config.parse import new_server_parser
from kvhive.config.server import server_sections
from kvhive.errors import ConfigError

REQUIRED = ["--l1-size-gb", "8", "--eviction-policy", "LRU"]


def parse(*args: str) -> ServerConfig:
    return parse_server_args([*REQUIRED, *args])


def config_error(*args: str, required: bool = True) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_server_args([*(REQUIRED if required else []), *args])
    return info.value


@pytest.fixture(autouse=True)
def _no_pythonhashseed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)


def test_minimal_command_line_gives_the_defaults() -> None:
    config = parse()
    assert config.mp == MPConfig()
    assert config.l1.size_gb == 8.0
    assert config.eviction.policy == "LRU"
    assert config.http.port == 8080


# Every supported flag with a non-default value: (argv, section, field, expected)
VALID: list[tuple[list[str], str, str, Any]] = [
    (["--host", "0.0.0.0"], "mp", "host", "0.0.0.0"),
    (["--port", "6555"], "mp", "port", 6555),
    (["--chunk-size", "512"], "mp", "chunk_size", 512),
    (["--max-workers", "4"], "mp", "max_workers", 4),
    (["--max-gpu-workers", "2"], "mp", "max_gpu_workers", 2),
    (["--max-cpu-workers", "3"], "mp", "max_cpu_workers", 3),
    (["--hash-algorithm", "builtin"], "mp", "hash_algorithm", "builtin"),
    (["--hash-algorithm", "sha256_cbor", "--none-hash-seed", "42"], "mp", "none_hash_seed", "42"),
    (["--engine-type", "default"], "mp", "engine_type", "default"),
    (["--supported-transfer-mode", "engine_driven"], "mp", "supported_transfer_mode", "engine_driven"),
    (["--shm-name", "pool"], "mp", "shm_name", "pool"),
    (["--null-block-id", "-1"], "mp", "null_block_id", -1),
    (["--worker-reap-timeout-seconds", "0"], "mp", "worker_reap_timeout_seconds", 0.0),
    (["--worker-registration-grace-seconds", "7200"], "mp", "worker_registration_grace_seconds", 7200.0),
    (["--session-ttl-seconds", "30.5"], "mp", "session_ttl_seconds", 30.5),
    (["--ipc-path", "/tmp/kvhive.sock"], "mp", "ipc_path", "/tmp/kvhive.sock"),
    (["--l1-size-gb", "0.5"], "l1", "size_gb", 0.5),
    (["--no-l1-use-lazy"], "l1", "use_lazy", False),
    (["--l1-use-lazy"], "l1", "use_lazy", True),
    (["--l1-init-size-gb", "4"], "l1", "init_size_gb", 4),
    (["--l1-align-bytes", "65536"], "l1", "align_bytes", 65536),
    (["--l1-write-ttl-seconds", "60"], "l1", "write_ttl_seconds", 60),
    (["--l1-read-ttl-seconds", "30"], "l1", "read_ttl_seconds", 30),
    (["--eviction-policy", "noop"], "eviction", "policy", "noop"),
    (["--eviction-policy", "IsolatedLRU"], "eviction", "policy", "IsolatedLRU"),
    (["--eviction-trigger-watermark", "0.9"], "eviction", "trigger_watermark", 0.9),
    (["--eviction-ratio", "0.1"], "eviction", "ratio", 0.1),
    (["--http-host", "127.0.0.1"], "http", "host", "127.0.0.1"),
    (["--http-port", "9000"], "http", "port", 9000),
    (["--http-api-token", "s3cret"], "http_admin", "api_token", "s3cret"),
    (["--health-copy-deadline-seconds", "5"], "http_admin", "health_copy_deadline_seconds", 5.0),
    (["--disable-observability"], "observability", "disable_observability", True),
    (["--disable-metrics"], "observability", "disable_metrics", True),
    (["--disable-logging"], "observability", "disable_logging", True),
    (["--enable-tracing", "--disable-observability"], "observability", "enable_tracing", True),
    (["--event-bus-queue-size", "5"], "observability", "event_bus_queue_size", 5),
    (["--otlp-endpoint", "http://localhost:4317"], "observability", "otlp_endpoint", "http://localhost:4317"),
    (["--prometheus-port", "9191"], "observability", "prometheus_port", 9191),
    (["--metrics-sample-rate", "0.5"], "observability", "metrics_sample_rate", 0.5),
    (["--service-instance-id", ""], "observability", "service_instance_id", ""),
    (["--lookup-hash-log-dir", "/data/lookup"], "lookup_hash_log", "dir", "/data/lookup"),
    (["--lookup-hash-log-rotation-interval", "60"], "lookup_hash_log", "rotation_interval", 60),
    (["--lookup-hash-log-rotation-max-size", "1024"], "lookup_hash_log", "rotation_max_size", 1024),
    (["--lookup-hash-log-max-files", "3"], "lookup_hash_log", "max_files", 3),
    (["--runtime-plugin-locations", "a.py", "b.sh"], "plugins", "locations", ("a.py", "b.sh")),
    (["--runtime-plugin-config", '{"k": "v"}'], "plugins", "config", '{"k": "v"}'),
    (["--runtime-plugin-stop-grace-seconds", "1"], "plugins", "stop_grace_seconds", 1.0),
    (["--l2-store-policy", "skip_l1"], "l2", "store_policy", "skip_l1"),
    (["--l2-prefetch-policy", "retain"], "l2", "prefetch_policy", "retain"),
    (["--l2-prefetch-max-in-flight", "3"], "l2", "prefetch_max_in_flight", 3),
    (["--l2-adapter", '{"type": "fs", "base_path": "/tmp/l2"}', "--l2-adapter", '{"type": "mock", "max_size_gb": 1, "mock_bandwidth_gb": 2}'], "l2", "adapters", ('{"type": "fs", "base_path": "/tmp/l2"}', '{"type": "mock", "max_size_gb": 1, "mock_bandwidth_gb": 2}')),
    # issue 11: the rest of the reference's flags
    (["--transport", "zmq"], "mp", "transport", "zmq"),
    (["--kv-event-log-size", "0"], "mp", "kv_event_log_size", 0),
    (["--kv-events-l2"], "kv_events", "kv_events_l2", True),
    (["--kv-events-endpoint", "tcp://127.0.0.1:5557"], "kv_events", "kv_events_endpoint", "tcp://127.0.0.1:5557"),
    (["--kv-events-endpoint", "tcp://127.0.0.1:5557", "--kv-events-replay-endpoint", "tcp://127.0.0.1:5558"], "kv_events", "kv_events_replay_endpoint", "tcp://127.0.0.1:5558"),
    (["--kv-events-topic", "kv@pod@{model}"], "kv_events", "kv_events_topic", "kv@pod@{model}"),
    (["--kv-events-buffer-steps", "0"], "kv_events", "kv_events_buffer_steps", 0),
    (["--kv-events-hwm", "10"], "kv_events", "kv_events_hwm", 10),
    (["--kv-events-layout", "array"], "kv_events", "kv_events_layout", "array"),
    (["--server-module", "pkg.mod", "--server-module", '{"module_path": "b.c"}'], "mp", "server_modules", ("pkg.mod", '{"module_path": "b.c"}')),
    (["--instance-id", "inst-7"], "observability", "service_instance_id", "inst-7"),
    (["--enable-gc-monitor"], "observability", "enable_gc_monitor", True),
    (["--gc-monitor-min-pause-ms", "0"], "observability", "gc_monitor_min_pause_ms", 0.0),
    (["--gc-monitor-top-objects", "5"], "observability", "gc_monitor_top_objects", 5),
    (["--enable-extra-logging"], "observability", "enable_extra_logging", True),
    (["--extra-logging-interval", "2.5"], "observability", "extra_logging_interval", 2.5),
    (["--api-key-file", "/k1", "--http-api-key-file", "/k2"], "http_admin", "api_key_files", ("/k1", "/k2")),
    (["--grpc-server-workers", "4"], "compat", "grpc_server_workers", 4),
    (["--grpc-server-mode", "aio"], "compat", "grpc_server_mode", "aio"),
    (["--disable-grpc-metrics"], "compat", "disable_grpc_metrics", True),
    (["--isolated-ipc"], "compat", "isolated_ipc", True),
    (["--script-allowed-imports", "numpy", "pandas"], "compat", "script_allowed_imports", ("numpy", "pandas")),
    (["--enable-segmented-prefix"], "compat", "enable_segmented_prefix", True),
    (["--enable-dedup-content"], "compat", "enable_dedup_content", True),
    (["--enable-blend-reorder"], "compat", "enable_blend_reorder", True),
    (["--p2p-listen-url", "h:1"], "compat", "p2p_listen_url", "h:1"),
    (["--p2p-lookup-timeout", "5"], "compat", "p2p_lookup_timeout", 5.0),
    (["--p2p-load-timeout", "6"], "compat", "p2p_load_timeout", 6.0),
    (["--p2p-transfer-engine", "mooncake"], "compat", "p2p_transfer_engine", "mooncake"),
    (["--no-gds-l1-use-direct-io"], "compat", "gds_l1_use_direct_io", False),
    (["--gds-l1-use-direct-io"], "compat", "gds_l1_use_direct_io", True),
    (["--gds-l1-backend", "cufile"], "compat", "gds_l1_backend", "cufile"),
    (["--l1-devdax-offset-gb", "1.5"], "compat", "l1_devdax_offset_gb", 1.5),
    (["--periodic-notifier-interval-ms", "10"], "compat", "periodic_notifier_interval_ms", 10),
    (["--trace-output", "/tmp/t"], "compat", "trace_output", "/tmp/t"),
    (["--kv-load-policy", "DEFAULT"], "compat", "kv_load_policy", "DEFAULT"),
    (["--coordinator-advertise-ip", "10.0.0.1"], "compat", "coordinator_advertise_ip", "10.0.0.1"),
    (["--coordinator-heartbeat-interval", "3"], "compat", "coordinator_heartbeat_interval", 3.0),
    (["--coordinator-event-reporting"], "compat", "coordinator_event_reporting", True),
    (["--coordinator-event-flush-interval", "2"], "compat", "coordinator_event_flush_interval", 2.0),
    (["--coordinator-event-transport", "kafka"], "compat", "coordinator_event_transport", "kafka"),
    (["--coordinator-kafka-bootstrap-servers", "k:9092"], "compat", "coordinator_kafka_bootstrap_servers", "k:9092"),
    (["--coordinator-kafka-topic", "t"], "compat", "coordinator_kafka_topic", "t"),
    (["--coordinator-kafka-delivery-timeout", "30"], "compat", "coordinator_kafka_delivery_timeout", 30.0),
    (["--coordinator-blend-timeout", "0.5"], "compat", "coordinator_blend_timeout", 0.5),
    (["--coordinator-blend-match-concurrency", "2"], "compat", "coordinator_blend_match_concurrency", 2),
    (["--coordinator-l2-event-reporting"], "compat", "coordinator_l2_event_reporting", True),
    (["--coordinator-l2-event-flush-interval", "4"], "compat", "coordinator_l2_event_flush_interval", 4.0),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "section", "name", "expected"), VALID, ids=[v[0][0] + ("=" + v[0][1] if len(v[0]) > 1 else "") for v in VALID])  # fmt: skip
def test_each_flag_reaches_its_field(
    argv: list[str], section: str, name: str, expected: Any
) -> None:
    value = getattr(getattr(parse(*argv), section), name)
    assert value == expected
    assert type(value) is type(expected)


def test_every_field_flag_is_exercised() -> None:
    flags = {info.spec.flag for _, cls in server_sections() for info in section_fields(cls)}
    tested = {arg for argv, *_ in VALID for arg in argv if arg.startswith("--")}
    assert flags - tested == set()


def test_seed_full_example_without_deferred_flags() -> None:
    # The seed's complete example, minus flags whose features come later.
    config = parse_server_args(
        shlex.split(
            "--host 0.0.0.0 --port 6555 --chunk-size 512 --max-workers 4 --max-gpu-workers 2 "
            "--hash-algorithm blake3 --engine-type default --l1-size-gb 100 --l1-use-lazy "
            "--l1-init-size-gb 20 --l1-align-bytes 4096 --l1-write-ttl-seconds 600 "
            "--l1-read-ttl-seconds 300 --eviction-policy noop --eviction-trigger-watermark 0.9 "
            "--eviction-ratio 0.1"
        )
    )
    assert (config.mp.max_gpu_workers, config.mp.max_cpu_workers) == (2, 4)
    assert config.l1.size_bytes == 100 << 30
    assert (config.eviction.policy, config.eviction.trigger_watermark) == ("noop", 0.9)


# (argv, flag, fragment)
INVALID: list[tuple[list[str], str, str]] = [
    (["--port", "abc"], "--port", "must be an integer (got 'abc')"),
    (["--port", "0"], "--port", "must be in 1..65535 (got 0)"),
    (["--port", "99999"], "--port", "1..65535"),
    (["--port"], "--port", "expected one argument"),
    (["--chunk-size", "1.5"], "--chunk-size", "must be an integer"),
    (["--chunk-size", "0"], "--chunk-size", ">= 1"),
    (["--max-workers", "0"], "--max-workers", ">= 1"),
    (["--max-gpu-workers", "x"], "--max-gpu-workers", "must be an integer"),
    (["--max-cpu-workers", "0"], "--max-cpu-workers", ">= 1"),
    (["--hash-algorithm", "sha256"], "--hash-algorithm", "must be one of builtin, sha256_cbor, blake3 (got 'sha256')"),
    (["--none-hash-seed", "1"], "--none-hash-seed", "only applies to --hash-algorithm sha256_cbor"),
    (["--engine-type", "blend"], "--engine-type", "not supported by kvhive: --engine-type blend"),
    (["--engine-type", "x"], "--engine-type", "default, blend"),
    (["--supported-transfer-mode", "x"], "--supported-transfer-mode", "lmcache_driven, engine_driven, auto"),
    (["--shm-name", "a/b"], "--shm-name", "'/'"),
    (["--null-block-id", "none"], "--null-block-id", "must be an integer"),
    (["--worker-reap-timeout-seconds", "5"], "--worker-reap-timeout-seconds", "0 (disabled) or >= 30 (got 5.0)"),
    (["--worker-reap-timeout-seconds", "nan"], "--worker-reap-timeout-seconds", "finite"),
    (["--worker-registration-grace-seconds", "100"], "--worker-registration-grace-seconds", ">= --worker-reap-timeout-seconds"),
    (["--session-ttl-seconds", "-1"], "--session-ttl-seconds", "> 0"),
    (["--ipc-path", "/" + "x" * 200], "--ipc-path", "107 bytes"),
    (["--l1-size-gb", "0"], "--l1-size-gb", "> 0"),
    (["--l1-size-gb", "lots"], "--l1-size-gb", "must be a number (got 'lots')"),
    (["--l1-use-lazy=no"], "--l1-use-lazy", "ignored explicit argument"),
    (["--l1-init-size-gb", "1.5"], "--l1-init-size-gb", "must be an integer (got '1.5')"),
    (["--l1-init-size-gb", "0"], "--l1-init-size-gb", ">= 1"),
    (["--l1-align-bytes", "3000"], "--l1-align-bytes", "power of two"),
    (["--l1-write-ttl-seconds", "0"], "--l1-write-ttl-seconds", "> 0"),
    (["--l1-read-ttl-seconds", "2.5"], "--l1-read-ttl-seconds", "must be an integer"),
    (["--eviction-policy", "ARC"], "--eviction-policy", "not supported by kvhive: --eviction-policy ARC"),
    (["--eviction-policy", "FIFO"], "--eviction-policy", "must be one of LRU, IsolatedLRU, noop (got 'FIFO')"),
    (["--transport", "grpc"], "--transport", "not supported by kvhive: --transport grpc"),
    (["--transport", "udp"], "--transport", "must be one of zmq, grpc"),
    (["--kv-event-log-size", "-1"], "--kv-event-log-size", ">= 0"),
    (["--kv-events-endpoint", "localhost:5557"], "--kv-events-endpoint", "tcp://HOST:PORT"),
    (["--kv-events-replay-endpoint", "tcp://127.0.0.1:5558"], "--kv-events-replay-endpoint", "needs --kv-events-endpoint"),
    (["--kv-events-endpoint", "tcp://h:1", "--kv-events-replay-endpoint", "tcp://h:1"], "--kv-events-replay-endpoint", "must differ"),
    (["--kv-events-layout", "list"], "--kv-events-layout", "map"),
    (["--kv-events-hwm", "0"], "--kv-events-hwm", ">= 1"),
    (["--server-module", '{"module_path": "a"'], "--server-module", "#0: must be valid JSON"),
    (["--server-module", '{"module_path": "a", "cfg": {}}'], "--server-module", "#0: unknown field(s) cfg"),
    (["--server-module", '{"module_path": "a b"}'], "--server-module", "field 'module_path' must be a dotted module path"),
    (["--server-module", '[{"module_path": "a"}, {"module_path": "b", "config": []}]'], "--server-module", "#0[1]: field 'config' must be a JSON object"),
    (["--server-module", '{"module_path": "a", "factory_name": "1x"}'], "--server-module", "field 'factory_name' must be a Python name"),
    (["--gc-monitor-min-pause-ms", "-1"], "--gc-monitor-min-pause-ms", ">= 0"),
    (["--extra-logging-interval", "0"], "--extra-logging-interval", "> 0"),
    (["--grpc-server-workers", "0"], "--grpc-server-workers", ">= 1"),
    (["--grpc-server-mode", "fast"], "--grpc-server-mode", "sync, aio, native"),
    (["--kv-load-policy", "my_pkg.mod:Policy"], "--kv-load-policy", "not supported by kvhive: custom KVLoadPolicy"),
    (["--kv-load-policy", "FAST"], "--kv-load-policy", "must be DEFAULT or 'package.module:ClassName'"),
    (["--coordinator-heartbeat-interval", "0"], "--coordinator-heartbeat-interval", "> 0"),
    (["--l2-prefetch-inflight-watermark", "0.3"], "--l2-prefetch-inflight-watermark", "not supported by kvhive: admitting"),
    (["--l2-prefetch-inflight-watermark", "x"], "--l2-prefetch-inflight-watermark", "must be a number (got 'x')"),
    (["--trace-level", "all"], "--trace-level", "invalid choice"),
    (["--eviction-trigger-watermark", "1.2"], "--eviction-trigger-watermark", "(0, 1]"),
    (["--eviction-ratio", "0"], "--eviction-ratio", "(0, 1]"),
    (["--http-host", ""], "--http-host", "must not be empty"),
    (["--http-port", "0"], "--http-port", "1..65535"),
    (["--enable-tracing"], "--enable-tracing", "requires --otlp-endpoint"),
    (["--event-bus-queue-size", "0"], "--event-bus-queue-size", ">= 1"),
    (["--prometheus-port", "70000"], "--prometheus-port", "1..65535"),
    (["--metrics-sample-rate", "0"], "--metrics-sample-rate", "(0, 1]"),
    (["--metrics-sample-rate", "1.5"], "--metrics-sample-rate", "(0, 1]"),
    (["--lookup-hash-log-rotation-interval", "0"], "--lookup-hash-log-rotation-interval", ">= 1"),
    (["--lookup-hash-log-rotation-max-size", "0"], "--lookup-hash-log-rotation-max-size", ">= 1"),
    (["--lookup-hash-log-max-files", "0"], "--lookup-hash-log-max-files", ">= 1"),
    (["--runtime-plugin-config", "{bad"], "--runtime-plugin-config", "must be valid JSON"),
    (["--runtime-plugin-config", "[1]"], "--runtime-plugin-config", "must be a JSON object"),
    (["--bogus"], "--bogus", "is not a known option"),
    (["--l1"], "--l1", "is not a known option"),  # no prefix matching
]  # fmt: skip


@pytest.mark.parametrize(("argv", "flag", "fragment"), INVALID, ids=[" ".join(a)[:40] for a, *_ in INVALID])  # fmt: skip
def test_invalid_values_name_their_flag(argv: list[str], flag: str, fragment: str) -> None:
    error = config_error(*argv)
    assert error.flag == flag
    assert fragment in error.message


@pytest.mark.parametrize("flag", ["--l1-size-gb", "--eviction-policy"])
def test_required_flags(flag: str) -> None:
    other = REQUIRED[2:] if flag == "--l1-size-gb" else REQUIRED[:2]
    error = config_error(*other, required=False)
    assert (error.flag, error.message) == (flag, "is required")


def test_refusal_rows_name_flags_once() -> None:
    # a flag is either read by the parser's refusal group or is a section field, never both
    own = [r.flag for r in REFUSALS if r.parse is not None]
    fields = {info.spec.flag for _, cls in server_sections() for info in section_fields(cls)}
    assert len(own) == len(set(own)) and not set(own) & fields
    assert all(r.flag in fields for r in REFUSALS if r.parse is None)


def test_repeated_adapter_flag_and_empty_plugin_list() -> None:
    assert config_error("--l2-adapter", "{}", "--l2-adapter", "{}").flag == "--l2-adapter"
    assert parse("--runtime-plugin-locations").plugins.locations == ()


def test_sha256_cbor_seed_is_resolved_at_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse("--hash-algorithm", "sha256_cbor").mp.none_hash_seed == "vllm-none-hash"
    monkeypatch.setenv("PYTHONHASHSEED", "123")
    assert parse("--hash-algorithm", "sha256_cbor").mp.none_hash_seed == "123"
    assert (
        parse("--hash-algorithm", "sha256_cbor", "--none-hash-seed", "s").mp.none_hash_seed == "s"
    )
    assert parse().mp.none_hash_seed is None  # blake3 has no seed


def test_last_occurrence_wins_and_values_may_look_negative() -> None:
    config = parse("--port", "6000", "--port", "7000", "--null-block-id", "-5")
    assert (config.mp.port, config.mp.null_block_id) == (7000, -5)


def test_help_shows_defaults_and_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # no line wrapping inside the fragments
    text = new_server_parser().format_help()
    for fragment in (
        "--port INT",
        "(default: 5555)",
        "{LRU,IsolatedLRU,noop}",
        "--l1-use-lazy, --no-l1-use-lazy",
        "(default: --max-workers)",
        "Not supported by kvhive",
        "--l2-adapter JSON",
    ):
        assert fragment in text


def test_help_exits_zero() -> None:
    with pytest.raises(SystemExit) as info:
        parse_server_args(["--help"])
    assert info.value.code == 0


def test_config_is_a_plain_frozen_value() -> None:
    config = parse()
    assert config == parse()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.mp = MPConfig()  # type: ignore[misc]
