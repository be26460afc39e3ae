"""A ``kvhive server`` subprocess shared by a bench test module (1 GB L1)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvhive.bench.servers import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = ServerProcess("kvhive", 1, log_path=tmp_path_factory.mktemp("bench") / "kvhive.log")
    s.start()
    yield s
    s.stop()
