"""The lookup-hash JSONL log (``--lookup-hash-log-dir``), in the reference's format.

One line per lookup, fields in this order::

    {"timestamp": 1711929600.123, "request_id": "req-abc", "model_name": "m",
     "chunk_size": 256, "seq_len": 1024, "dtypes": ["torch.float16"],
     "shapes": [[2, 32, 256, 1024]], "chunk_hashes": ["0x6309ed50...", ...]}

Files are ``lookup_hashes_<UTC %Y%m%d_%H%M%S of the first record>_<counter:06d>.jsonl``; the
counter starts at the number of files already there.  A new file is started before a record
when none is open, when the open one is ``rotation_interval`` seconds old, or when the record
would take it past ``rotation_max_size`` bytes (a single record larger than the limit gets a
file of its own).  Age is measured on the monotonic clock, so a wall-clock jump neither rotates
early nor late (both reference defects).  At most ``max_files`` files are kept, the open one
included; the oldest are deleted.  All I/O runs on the bus thread.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from kvhive.observability.events import EventType, LookupHashes

log = logging.getLogger(__name__)

FILE_GLOB = "lookup_hashes_*.jsonl"


def format_hash(h: bytes | int) -> str:
    return hex(h) if isinstance(h, int) else "0x" + bytes(h).hex()


def record_line(e: LookupHashes) -> str:
    """One JSONL record (with the trailing newline) in the reference's field order."""
    record = {
        "timestamp": e.timestamp,
        "request_id": e.request_id,
        "model_name": e.model_name,
        "chunk_size": e.chunk_size,
        "seq_len": e.seq_len,
        "dtypes": [d if d.startswith("torch.") else f"torch.{d}" for d in e.dtypes],
        "shapes": [list(s) for s in e.shapes],
        "chunk_hashes": [format_hash(h) for h in e.chunk_hashes],
    }
    return json.dumps(record) + "\n"


class LookupHashLogger:
    """Subscriber for ``mp.lookup`` that writes the rotating JSONL files."""

    name = "lookup_hash_log"

    def __init__(
        self,
        directory: str | Path,
        *,
        rotation_interval: float,
        rotation_max_size: int,
        max_files: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.interval = rotation_interval
        self.max_size = rotation_max_size
        self.max_files = max_files
        self._clock = clock
        self.files: list[Path] = sorted(self.dir.glob(FILE_GLOB), key=_mtime)
        self._counter = len(self.files)
        self._fh: IO[str] | None = None
        self._size = 0
        self._opened_at = 0.0
        self.records = 0
        self._prune()

    def subscriptions(self) -> Mapping[EventType, Callable[[Any], None]]:
        return {EventType.MP_LOOKUP: self.write}

    def write(self, e: LookupHashes) -> None:
        line = record_line(e)
        size = len(line.encode())
        if self._needs_rotation(size):
            self._rotate(e.timestamp)
        assert self._fh is not None
        self._fh.write(line)
        self._fh.flush()
        self._size += size
        self.records += 1

    def _needs_rotation(self, incoming: int) -> bool:
        if self._fh is None:
            return True
        if self._clock() - self._opened_at >= self.interval:
            return True
        return self._size > 0 and self._size + incoming > self.max_size

    def _rotate(self, timestamp: float) -> None:
        self._close()
        stamp = datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y%m%d_%H%M%S")
        path = self.dir / f"lookup_hashes_{stamp}_{self._counter:06d}.jsonl"
        self._counter += 1
        self._fh = path.open("w", encoding="utf-8")
        self._opened_at = self._clock()
        self._size = 0
        self.files.append(path)
        self._prune()

    def _prune(self) -> None:
        while len(self.files) > self.max_files:
            old = self.files.pop(0)
            try:
                old.unlink(missing_ok=True)
            except OSError as exc:
                log.error("cannot delete old lookup-hash log %s: %s", old, exc)

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def shutdown(self) -> None:
        self._close()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
