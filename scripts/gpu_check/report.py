"""The JSON report of one GPU-check run (stdlib only).

One :class:`Report` per run, owned by the orchestrator's thread; every stage adds
:class:`Check` records and the report is rewritten after each stage, so a run killed
half-way still leaves what it had checked in ``OUTDIR/gpu-check.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpu_check import EXIT_FAILED, EXIT_NO_CUDA, EXIT_PASSED, EXIT_SETUP, REPORT_NAME


@dataclass(frozen=True, slots=True)
class Check:
    """One named check: ``status`` is ``passed``, ``failed`` or ``skipped``."""

    name: str
    status: str
    seconds: float
    error: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Report:
    """Everything one run found; ``status`` is ``running`` until :meth:`finish`."""

    out_dir: Path
    status: str = "running"
    reason: str = ""
    started_unix: float = field(default_factory=time.time)
    facts: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        self.write()
        return check

    def note(self, text: str) -> None:
        self.notes.append(text)
        self.write()

    def failed(self) -> list[str]:
        return [c.name for c in self.checks if c.status == "failed"]

    def finish(self, *, skipped_reason: str = "", setup_error: str = "") -> int:
        """Set the final status, write the report, return the process exit code."""
        if setup_error:
            self.status, self.reason, code = "setup-failed", setup_error, EXIT_SETUP
        elif skipped_reason:
            self.status, self.reason, code = "skipped", skipped_reason, EXIT_NO_CUDA
        elif self.failed():
            self.status, code = "failed", EXIT_FAILED
            self.reason = "failed: " + ", ".join(self.failed())
        elif not self.checks:
            self.status, self.reason, code = "failed", "no check ran", EXIT_FAILED
        else:
            self.status, code = "passed", EXIT_PASSED
        self.write()
        return code

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "started_unix": self.started_unix,
            "elapsed_s": round(time.time() - self.started_unix, 3),
            "passed": sum(c.status == "passed" for c in self.checks),
            "failed": len(self.failed()),
            "skipped": sum(c.status == "skipped" for c in self.checks),
            "facts": self.facts,
            "checks": [asdict(c) for c in self.checks],
            "notes": self.notes,
        }

    def write(self) -> Path:
        """Write ``OUTDIR/gpu-check.json`` atomically (a reader never sees half a file)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / REPORT_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path
