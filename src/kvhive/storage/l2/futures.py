"""Small helpers for ``concurrent.futures.Future`` results of L2 tasks, and :class:`Miss`.

An L2 task resolves to one outcome per key: ``True``, or a falsy outcome.  A falsy outcome
may be a plain ``False`` or a :class:`Miss` that says why the key failed::

    MISSING  "not_found"  no object under the key
    CORRUPT  "corrupt"    an object failed its checks (damaged, or another key's object);
                          it was removed
    ERROR    "error"      the backend or the task failed

A ``Miss`` is an ``int`` equal to ``0``: it is falsy and compares equal to ``False``, so a
``Future[list[bool]]`` consumer (``outcome``, ``sum``, ``==``) needs no change, while the
prefetch controller reads them (``results``, ``reason``) to label its failure metric.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from functools import partial
from typing import Any, TypeVar

T = TypeVar("T")
U = TypeVar("U")


class Miss(int):
    """A failed key's outcome with its ``reason`` (module docstring); equal to ``False``."""

    reason: str

    def __new__(cls, reason: str) -> Miss:
        self = super().__new__(cls, 0)
        self.reason = reason
        return self

    def __repr__(self) -> str:
        return f"Miss({self.reason!r})"


MISSING = Miss("not_found")
CORRUPT = Miss("corrupt")
ERROR = Miss("error")

Outcome = bool | Miss
"""One key's outcome: True, False, or a Miss."""


def resolved(value: T) -> Future[T]:
    fut: Future[T] = Future()
    fut.set_result(value)
    return fut


def failed(exc: BaseException) -> Future[Any]:
    fut: Future[Any] = Future()
    fut.set_exception(exc)
    return fut


def results(fut: Future[Any], n: int) -> list[Outcome]:
    """The per-key outcomes of a finished task, reasons kept: ``True``, a :class:`Miss`, or
    ``False`` (an adapter that did not say why); an exception or a bad shape is all ERROR."""
    if fut.cancelled() or fut.exception() is not None:
        return [ERROR] * n
    result = fut.result()
    if not isinstance(result, (list, tuple)) or len(result) != n:
        return [ERROR] * n
    return [x if isinstance(x, Miss) else bool(x) for x in result]


def outcome(fut: Future[list[bool]], n: int) -> list[bool]:
    """The per-key outcome of a finished task as plain bools: an exception or a bad shape is
    all False."""
    return [bool(x) for x in results(fut, n)]


def reason(result: Outcome) -> str | None:
    """Why a key failed (``Miss.reason``; ``"not_found"`` for a plain False); None if it
    did not."""
    if result:
        return None
    return result.reason if isinstance(result, Miss) else MISSING.reason


def gather(
    parts: Sequence[tuple[Future[list[Outcome]], Sequence[int]]], n: int
) -> Future[list[Outcome]]:
    """One future over ``n`` keys from sub-tasks, each covering the key positions it lists
    (their :class:`Miss` reasons kept)."""
    out: Future[list[Outcome]] = Future()
    result: list[Outcome] = [False] * n
    if not parts:
        out.set_result(result)
        return out
    left = [len(parts)]
    lock = threading.Lock()

    def one_done(fut: Future[list[Outcome]], positions: Sequence[int]) -> None:
        for pos, ok in zip(positions, results(fut, len(positions)), strict=True):
            result[pos] = ok
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            out.set_result(result)

    for fut, positions in parts:
        fut.add_done_callback(partial(_call_with, one_done, positions))
    return out


def then(fut: Future[T], fn: Callable[[Future[T]], U]) -> Future[U]:
    """A future for ``fn(fut)`` once ``fut`` is done (``fn`` runs on the completing thread)."""
    out: Future[U] = Future()

    def done(f: Future[T]) -> None:
        try:
            out.set_result(fn(f))
        except BaseException as exc:  # noqa: BLE001 - task boundary: hand the error to the waiter
            out.set_exception(exc)

    fut.add_done_callback(done)
    return out


def _call_with(
    fn: Callable[[Future[list[Outcome]], Sequence[int]], None],
    positions: Sequence[int],
    fut: Future[list[Outcome]],
) -> None:
    fn(fut, positions)
