"""Small helpers for ``concurrent.futures.Future`` results of L2 tasks."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from functools import partial
from typing import Any, TypeVar

T = TypeVar("T")
U = TypeVar("U")


def resolved(value: T) -> Future[T]:
    fut: Future[T] = Future()
    fut.set_result(value)
    return fut


def failed(exc: BaseException) -> Future[Any]:
    fut: Future[Any] = Future()
    fut.set_exception(exc)
    return fut


def outcome(fut: Future[list[bool]], n: int) -> list[bool]:
    """The per-key outcome of a finished task: an exception or a bad shape is all False."""
    if fut.cancelled() or fut.exception() is not None:
        return [False] * n
    result = fut.result()
    if not isinstance(result, (list, tuple)) or len(result) != n:
        return [False] * n
    return [bool(x) for x in result]


def gather(parts: Sequence[tuple[Future[list[bool]], Sequence[int]]], n: int) -> Future[list[bool]]:
    """One future over ``n`` keys from sub-tasks, each covering the key positions it lists."""
    out: Future[list[bool]] = Future()
    result = [False] * n
    if not parts:
        out.set_result(result)
        return out
    left = [len(parts)]
    lock = threading.Lock()

    def one_done(fut: Future[list[bool]], positions: Sequence[int]) -> None:
        for pos, ok in zip(positions, outcome(fut, len(positions)), strict=True):
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
    fn: Callable[[Future[list[bool]], Sequence[int]], None],
    positions: Sequence[int],
    fut: Future[list[bool]],
) -> None:
    fn(fut, positions)
