"""Loopback networking for tests.

``free_port`` is :func:`kvhive.bench.servers.free_port` (the benchmark picks its server ports
with it), re-exported here so that no test keeps its own copy.
"""

from __future__ import annotations

from kvhive.bench.servers import free_port

__all__ = ["free_port"]
