"""Helpers shared by the L2 tests (imported by name: several test folders have a conftest)."""

from __future__ import annotations

from support.l2kit import aligned_copy, done, keys_for, payloads

KINDS = ("fs", "fs_native", "mock", "raw_block", "dax", "plugin", "native_plugin", "resp", "s3",
         "nixl_store", "nixl_store_dynamic", "valkey")  # fmt: skip
DURABLE = ("fs", "fs_native", "raw_block", "dax", "resp", "s3", "nixl_store_dynamic")

# The generic kit (keys, payloads, aligned buffers, futures) is shared with tests/mooncake.
__all__ = ["DURABLE", "KINDS", "aligned_copy", "done", "keys_for", "payloads"]
