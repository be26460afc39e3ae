"""The benchmark report: rows of measured figures, their ratios, the targets, and renderings
(table, JSON, PNG chart).

Every row holds kvhive's figure and, with ``--vs-reference``, the reference's, measured in the
same run.  Ratios are computed here, from those values only:

* ``vs_memcpy``  = figure / plain memcpy GB/s of this machine (bandwidth rows);
* ``vs_reference`` = kvhive / reference (> 1 is better for GB/s, < 1 is better for latency);
* ``vs_floor``   = figure / ``floor``, the row's own floor measured beside it (the ``l2``
  section: ``dd``, memcpy or a raw client of the same service).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

Better = Literal["higher", "lower"]


@dataclass
class Row:
    """One measured figure.  ``key`` is stable across runs (targets and tests use it)."""

    key: str
    group: str
    label: str
    unit: str
    better: Better
    kvhive: float | None = None
    reference: float | None = None
    vs_memcpy: float | None = None
    reference_vs_memcpy: float | None = None
    vs_reference: float | None = None
    note: str = ""
    floor: float | None = None
    vs_floor: float | None = None


@dataclass
class Target:
    """A goal from the issue, checked against one row."""

    name: str
    row: str
    #: "vs_memcpy", "vs_reference", "vs_floor" (ratio >= threshold) or
    #: "max" (kvhive's figure <= threshold, in the row's unit)
    kind: Literal["vs_memcpy", "vs_reference", "vs_floor", "max"]
    threshold: float
    measured: float | None = None
    ok: bool | None = None  # None: not measured in this run


@dataclass
class BenchReport:
    meta: dict[str, Any] = field(default_factory=dict)
    memcpy_gbs: float | None = None
    #: memcpy into existing shared pages this mapping never touched (the page-fault floor)
    memcpy_first_touch_gbs: float | None = None
    echo_rtt_ms: float | None = None  # bare pyzmq echo p50: the floor of a round trip
    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: measurements not taken here, with the reason (a service or module missing)
    skipped: list[str] = field(default_factory=list)

    # -- building -------------------------------------------------------------------------

    def row(self, key: str) -> Row | None:
        for r in self.rows:
            if r.key == key:
                return r
        return None

    def put(
        self,
        key: str,
        server: Literal["kvhive", "reference"],
        value: float | None,
        *,
        group: str,
        label: str,
        unit: str,
        better: Better,
        note: str = "",
        floor: float | None = None,
    ) -> Row:
        """Set ``server``'s figure of row ``key`` (created on first use), and the row's
        ``floor`` when given."""
        r = self.row(key)
        if r is None:
            r = Row(key, group, label, unit, better, note=note)
            self.rows.append(r)
        setattr(r, server, None if value is None else float(value))
        if floor is not None:
            r.floor = float(floor)
        return r

    def finalize(self, targets: Iterable[Target] = ()) -> BenchReport:
        """Compute every ratio from the measured values, then evaluate ``targets``."""
        m = self.memcpy_gbs
        for r in self.rows:
            bandwidth = r.unit == "GB/s"
            r.vs_memcpy = _ratio(r.kvhive, m) if bandwidth else None
            r.reference_vs_memcpy = _ratio(r.reference, m) if bandwidth else None
            r.vs_reference = _ratio(r.kvhive, r.reference)
            r.vs_floor = _ratio(r.kvhive, r.floor)
        self.targets = [self._check(t) for t in targets]
        return self

    def _check(self, t: Target) -> Target:
        r = self.row(t.row)
        measured = None
        if r is not None:
            measured = {
                "vs_memcpy": r.vs_memcpy,
                "vs_reference": r.vs_reference,
                "vs_floor": r.vs_floor,
                "max": r.kvhive,
            }[t.kind]
        ok = None
        if measured is not None:
            ok = measured <= t.threshold if t.kind == "max" else measured >= t.threshold
        return Target(t.name, t.row, t.kind, t.threshold, measured, ok)

    # -- output ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "memcpy_gbs": self.memcpy_gbs,
            "memcpy_first_touch_gbs": self.memcpy_first_touch_gbs,
            "echo_rtt_ms": self.echo_rtt_ms,
            "rows": [asdict(r) for r in self.rows],
            "targets": [asdict(t) for t in self.targets],
            "errors": list(self.errors),
            "skipped": list(self.skipped),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchReport:
        """The report :meth:`to_dict` wrote (to print or chart a recorded run again)."""
        try:
            return cls(
                meta=dict(data.get("meta", {})),
                memcpy_gbs=data.get("memcpy_gbs"),
                memcpy_first_touch_gbs=data.get("memcpy_first_touch_gbs"),
                echo_rtt_ms=data.get("echo_rtt_ms"),
                rows=[Row(**r) for r in data["rows"]],
                targets=[Target(**t) for t in data.get("targets", [])],
                errors=list(data.get("errors", [])),
                skipped=list(data.get("skipped", [])),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a kvhive bench report: {exc}") from None

    @classmethod
    def read_json(cls, path: str | Path) -> BenchReport:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def table(self) -> str:
        """Plain-text table of every row, then the targets."""
        has_ref = any(r.reference is not None for r in self.rows)
        head = ["figure", "unit", "kvhive", "x memcpy"]
        if has_ref:
            head += ["reference", "ref x memcpy", "kvhive/ref"]
        has_floor = any(r.floor is not None for r in self.rows)
        if has_floor:
            head += ["floor", "x floor"]
        lines: list[list[str]] = []
        group = None
        for r in self.rows:
            if r.group != group:
                group = r.group
                lines.append([f"[{group}]"] + [""] * (len(head) - 1))
            cells = [r.label, r.unit, _fmt(r.kvhive), _fmt(r.vs_memcpy, 2)]
            if has_ref:
                cells += [
                    _fmt(r.reference),
                    _fmt(r.reference_vs_memcpy, 2),
                    _fmt(r.vs_reference, 2),
                ]
            if has_floor:
                cells += [_fmt(r.floor), _fmt(r.vs_floor, 2)]
            lines.append(cells)
        out = []
        if self.memcpy_gbs is not None:
            out.append(f"memcpy (this machine, this run): {self.memcpy_gbs:.2f} GB/s")
        if self.memcpy_first_touch_gbs is not None:
            out.append(
                f"first-touch memcpy (into shared pages not yet mapped): "
                f"{self.memcpy_first_touch_gbs:.2f} GB/s"
            )
        if self.echo_rtt_ms is not None:
            out.append(
                f"bare pyzmq echo round trip (this machine, this run): p50 "
                f"{self.echo_rtt_ms * 1000:.0f} us; a lookup takes two round trips"
            )
        out.append(_grid(head, lines))
        if self.targets:
            out.append("")
            out.append(
                _grid(
                    ["target", "measured", "needed", "met"],
                    [
                        [
                            t.name,
                            _fmt(t.measured, 3),
                            ("<= " if t.kind == "max" else ">= ") + f"{t.threshold:g}",
                            {True: "yes", False: "NO", None: "-"}[t.ok],
                        ]
                        for t in self.targets
                    ],
                )
            )
        if self.skipped:
            out.append("")
            out.append("skipped:")
            out.extend(f"  {s}" for s in self.skipped)
        if self.errors:
            out.append("")
            out.append("errors:")
            out.extend(f"  {e}" for e in self.errors)
        return "\n".join(out)

    def chart(self, path: str | Path) -> bool:
        """Draw the bandwidth rows as ratios to memcpy (PNG).  False if matplotlib is absent."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        rows = [r for r in self.rows if r.unit == "GB/s" and r.vs_memcpy is not None]
        if not rows:
            return False
        fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.5))
        ys = range(len(rows))
        ax.barh([y + 0.2 for y in ys], [r.vs_memcpy or 0 for r in rows], 0.4, label="kvhive")
        if any(r.reference_vs_memcpy is not None for r in rows):
            ax.barh(
                [y - 0.2 for y in ys],
                [r.reference_vs_memcpy or 0 for r in rows],
                0.4,
                label="lmcache server",
            )
        ax.axvline(0.7, color="grey", linestyle="--", linewidth=1, label="target 0.7x memcpy")
        ax.set_yticks(list(ys), [r.label for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(f"GB/s as a ratio to memcpy ({self.memcpy_gbs or 0:.1f} GB/s)")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(str(path), dpi=110)
        plt.close(fig)
        return True


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return round(a / b, 4)


def _fmt(v: float | None, digits: int | None = None) -> str:
    if v is None:
        return "-"
    if digits is not None:
        return f"{v:.{digits}f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _grid(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=False)]
    align: list[Callable[[str, int], str]] = [str.ljust, *[str.rjust] * (len(head) - 1)]
    fmt = [
        "  ".join(a(str(c), w) for a, c, w in zip(align, cells, widths, strict=False))
        for cells in [head, *rows]
    ]
    return "\n".join([fmt[0], "  ".join("-" * w for w in widths), *fmt[1:]])
