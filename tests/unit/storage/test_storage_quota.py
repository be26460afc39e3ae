"""QuotaRegistry: per-salt byte limits."""

from __future__ import annotations

import threading

import pytest

from kvhive.storage.quota import QuotaRegistry


def test_set_get_delete_items() -> None:
    q = QuotaRegistry()
    assert q.get("a") is None
    q.set("a", 1024)
    q.set("", 0)
    assert (q.get("a"), q.get("")) == (1024, 0)
    assert q.items() == {"a": 1024, "": 0}
    assert q.delete("a") is True
    assert q.delete("a") is False
    assert len(q) == 1
    with pytest.raises(ValueError):
        q.set("b", -1)


def test_concurrent_writers() -> None:
    q = QuotaRegistry()

    def work(n: int) -> None:
        for i in range(200):
            q.set(f"s{n}-{i}", i)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(q.items()) == 800
