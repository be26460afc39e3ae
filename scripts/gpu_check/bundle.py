"""The wheel bundle (``.gpu-wheels/``): its manifest, what to install, the source overlay.

Stdlib only (``packaging`` is used when the interpreter has it).  The bundle is one flat
folder of wheels plus ``manifest.json``, written by ``prepare_gpu_wheels.sh`` through
:func:`write_manifest`; the manifest names two install sets:

* ``server``: kvhive's cp312 wheel and its runtime closure (kvhive's own pins);
* ``client``: the official lmcache 0.5.6 wheel (installed with ``--no-deps``) and only the
  packages its worker-side modules import (pinned by requirements/interop-client.txt).

On the GPU box each set goes into its own venv made with ``--system-site-packages`` over
the box's interpreter (which holds the CUDA torch).  :func:`plan_install` installs a
bundled wheel only where the box lacks the distribution or has a version that a bundled
wheel's own requirements reject, so the box's torch, numpy and numba are never shadowed
needlessly.  lmcache's declared requirements are not honoured on purpose (it declares
~40, most of them unused by the client path).

The kvhive wheel is a snapshot of the source at prepare time.  :func:`overlay_source`
refreshes the installed package from the working tree when only Python files changed
since (the compiled ``_safecopy`` extension must still match its C source).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from email.parser import Parser
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
SCHEMA = 1
SETS = ("server", "client")
# Requirements of these distributions are not honoured (lmcache: installed --no-deps).
NO_DEPS = frozenset({"lmcache"})
# Always installed from the bundle into their set's venv, whatever the box has.
ALWAYS = frozenset({"kvhive", "lmcache"})
NATIVE_SOURCE = "src/kvhive/transfer/_safecopy.c"


def normalize(name: str) -> str:
    """PEP 503 name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True, slots=True)
class WheelName:
    """The distribution name and version a wheel's file name carries."""

    dist: str  # normalized
    version: str
    filename: str

    @classmethod
    def parse(cls, filename: str) -> WheelName:
        parts = Path(filename).name.removesuffix(".whl").split("-")
        if len(parts) < 5 or not filename.endswith(".whl"):
            raise ValueError(f"not a wheel file name: {filename!r}")
        return cls(normalize(parts[0]), parts[1], Path(filename).name)


# --------------------------------------------------------------------------- fingerprints


def _source_files(root: Path) -> list[Path]:
    pkg = root / "src" / "kvhive"
    out = []
    for p in sorted(pkg.rglob("*")):
        if not p.is_file() or "__pycache__" in p.parts or p.suffix in (".so", ".pyc"):
            continue
        out.append(p)
    return out


def source_fingerprint(root: Path) -> str:
    """sha256 over every file of ``src/kvhive`` (names and bytes; no builds, no caches)."""
    h = hashlib.sha256()
    for p in _source_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def native_fingerprint(root: Path) -> str:
    """sha256 of the C extension's source and the build config that compiles it."""
    h = hashlib.sha256()
    for rel in (NATIVE_SOURCE, "pyproject.toml"):
        data = (root / rel).read_bytes()
        if rel == "pyproject.toml":  # only the ext-modules table matters
            text = data.decode()
            start = text.find("[[tool.setuptools.ext-modules]]")
            end = text.find("\n[", start + 1) if start >= 0 else -1
            data = text[start:end].encode() if start >= 0 else b""
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True, slots=True)
class Manifest:
    """What ``manifest.json`` holds."""

    schema: int
    created_unix: float
    python_tag: str
    source_fingerprint: str
    native_fingerprint: str
    sets: dict[str, list[str]]
    sizes: dict[str, int]
    total_bytes: int
    notes: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, wheels: Path) -> Manifest:
        data = json.loads((wheels / MANIFEST).read_text())
        if data.get("schema") != SCHEMA:
            raise ValueError(f"{wheels / MANIFEST}: schema {data.get('schema')} != {SCHEMA}")
        return cls(**data)


def write_manifest(
    out: Path, set_dirs: Mapping[str, Path], root: Path, notes: Sequence[str] = ()
) -> Manifest:
    """Merge the per-set download folders into the flat folder ``out`` and describe it.

    A file name present in two sets is one artifact (same name, same bytes) and is kept
    once; two different files of the same name are an error.
    """
    out.mkdir(parents=True, exist_ok=True)
    sets: dict[str, list[str]] = {}
    for name, src in set_dirs.items():
        files = sorted(p.name for p in src.glob("*.whl"))
        for f in files:
            dst = out / f
            if dst.exists():
                if dst.read_bytes() != (src / f).read_bytes():
                    raise ValueError(f"two different wheels named {f}")
            else:
                shutil.copy2(src / f, dst)
        sets[name] = files
    sizes = {p.name: p.stat().st_size for p in sorted(out.glob("*.whl"))}
    m = Manifest(
        schema=SCHEMA,
        created_unix=time.time(),
        python_tag=f"cp{sys.version_info.major}{sys.version_info.minor}",
        source_fingerprint=source_fingerprint(root),
        native_fingerprint=native_fingerprint(root),
        sets=sets,
        sizes=sizes,
        total_bytes=sum(sizes.values()),
        notes=list(notes),
    )
    (out / MANIFEST).write_text(json.dumps(asdict(m), indent=2, sort_keys=True) + "\n")
    return m


# --------------------------------------------------------------------------- install plan


@dataclass(frozen=True, slots=True)
class Requirement:
    """One ``Requires-Dist`` of a bundled wheel, already filtered by its marker."""

    dist: str
    specifier: str  # "" = any version
    wanted_by: str


@dataclass(frozen=True, slots=True)
class PlanEntry:
    """One bundled wheel and what the plan does with it."""

    filename: str
    dist: str
    version: str
    action: str  # "install" | "reuse"
    why: str
    box_version: str = ""


def wheel_requirements(path: Path) -> list[str]:
    """The raw ``Requires-Dist`` lines of a wheel's METADATA."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(z.read(meta).decode("utf-8", "replace"), headersonly=True)
    return list(msg.get_all("Requires-Dist") or [])


def parse_requirement(line: str, wanted_by: str) -> Requirement | None:
    """The requirement ``line`` names for this interpreter, or None (marker false / extra).

    With ``packaging`` the marker is evaluated; without it, any requirement with a
    marker is dropped (the plan then only checks presence, never versions).
    """
    try:
        from packaging.requirements import Requirement as PReq
    except ImportError:
        if ";" in line:
            return None
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*)", line)
        return Requirement(normalize(m.group(1)), "", wanted_by) if m else None
    req = PReq(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        return None
    return Requirement(normalize(req.name), str(req.specifier), wanted_by)


def satisfies(version: str, specifier: str) -> bool:
    if not specifier:
        return True
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion
    except ImportError:
        return True
    try:
        return SpecifierSet(specifier).contains(version, prereleases=True)
    except InvalidVersion:
        return False


def plan_install(
    wheel_files: Iterable[Path], installed: Mapping[str, str], requirements: Iterable[Requirement]
) -> list[PlanEntry]:
    """Decide, per bundled wheel, whether the box's copy is reused or the wheel installed.

    ``installed`` maps normalized names to the versions the target venv sees (its own
    site-packages and the box's); ``requirements`` are the bundled wheels' own
    requirements (see :func:`set_requirements`).
    """
    reqs: dict[str, list[Requirement]] = {}
    for r in requirements:
        reqs.setdefault(r.dist, []).append(r)
    plan = []
    for path in wheel_files:
        w = WheelName.parse(path.name)
        have = installed.get(w.dist, "")
        bad = [r for r in reqs.get(w.dist, []) if not satisfies(have, r.specifier)] if have else []
        if w.dist in ALWAYS:
            action, why = "install", "always installed from the bundle"
        elif not have:
            action, why = "install", "missing on the box"
        elif bad:
            action = "install"
            why = "box version rejected by " + ", ".join(
                f"{r.wanted_by} ({r.specifier})" for r in bad
            )
        else:
            action, why = "reuse", "box version accepted"
        plan.append(PlanEntry(w.filename, w.dist, w.version, action, why, have))
    return plan


def set_requirements(wheel_files: Iterable[Path]) -> list[Requirement]:
    out = []
    for p in wheel_files:
        w = WheelName.parse(p.name)
        if w.dist in NO_DEPS:
            continue
        for line in wheel_requirements(p):
            r = parse_requirement(line, w.dist)
            if r is not None:
                out.append(r)
    return out


def installed_versions() -> dict[str, str]:
    """Normalized name -> version of every distribution this interpreter can import."""
    import importlib.metadata as md

    out: dict[str, str] = {}
    for d in md.distributions():
        name = d.metadata["Name"] if d.metadata else None
        if name and normalize(name) not in out:  # first on sys.path wins, as for imports
            out[normalize(name)] = d.version
    return out


# --------------------------------------------------------------------------- installing


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _unzip_install(wheel: Path) -> None:
    """Last-resort installer (no pip anywhere): unpack the wheel into this venv.

    Handles what the bundled wheels use: package folders, ``.data/{purelib,platlib,
    scripts}``.  Console scripts are not generated; the check runs ``python -m``.
    """
    site = _site_packages()
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data") and len(parts) > 2:
                kind, rest = parts[1], "/".join(parts[2:])
                base = Path(sys.prefix) / "bin" if kind == "scripts" else site
                target = base / rest
            else:
                target = site / info.filename
            if info.is_dir():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(info))
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(target, mode)


def install_wheels(wheels: Sequence[Path], host_python: str | None) -> str:
    """Install ``wheels`` into this interpreter's venv with no index and no dependency
    resolution.  Tries this venv's pip, then the host's pip (``--python``), then a plain
    unzip.  Returns which installer was used."""
    if not wheels:
        return "nothing to install"
    args = ["install", "--no-index", "--no-deps", "--no-compile", "--disable-pip-version-check"]
    args += [str(w) for w in wheels]
    tries: list[tuple[str, list[str]]] = [("venv pip", [sys.executable, "-m", "pip", *args])]
    if host_python:
        tries.append(("host pip", [host_python, "-m", "pip", "--python", sys.executable, *args]))
    errors = []
    for label, cmd in tries:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return label
        errors.append(f"{label}: rc={proc.returncode} {proc.stderr.strip()[-600:]}")
    for w in wheels:
        _unzip_install(w)
    return "unzip (pip failed: " + " | ".join(errors) + ")"


def install_set(wheels_dir: Path, set_name: str, host_python: str | None) -> dict[str, Any]:
    """Install one set of the bundle into the running interpreter's venv; a JSON-able summary."""
    m = Manifest.load(wheels_dir)
    if set_name not in m.sets:
        raise ValueError(f"the bundle has no set {set_name!r} (has {sorted(m.sets)})")
    files = [wheels_dir / f for f in m.sets[set_name]]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"bundle files missing: {missing}")
    plan = plan_install(files, installed_versions(), set_requirements(files))
    todo = [wheels_dir / e.filename for e in plan if e.action == "install"]
    installer = install_wheels(todo, host_python)
    return {"set": set_name, "installer": installer, "plan": [asdict(e) for e in plan]}


# --------------------------------------------------------------------------- overlay


@dataclass(frozen=True, slots=True)
class Overlay:
    """What :func:`overlay_source` did."""

    state: str  # "fresh" | "overlaid" | "stale-native"
    copied: int = 0
    removed: int = 0
    detail: str = ""


def overlay_source(root: Path, manifest: Manifest, package_dir: Path) -> Overlay:
    """Bring the installed kvhive package (``package_dir``) up to the working tree's
    ``src/kvhive``: copy every source file, delete installed ``.py`` files the tree no
    longer has; the compiled extension and ``.dist-info`` stay.  Refused
    (``stale-native``) when the C source changed since the wheel was built."""
    if source_fingerprint(root) == manifest.source_fingerprint:
        return Overlay("fresh")
    if native_fingerprint(root) != manifest.native_fingerprint:
        return Overlay(
            "stale-native",
            detail="src/kvhive/transfer/_safecopy.c (or its build config) changed since the "
            "bundle was built: run scripts/prepare_gpu_wheels.sh again",
        )
    src = root / "src" / "kvhive"
    wanted = {p.relative_to(src) for p in _source_files(root)}
    copied = 0
    for rel in sorted(wanted):
        dst = package_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dst)
        copied += 1
    removed = 0
    for p in sorted(package_dir.rglob("*.py")):
        if "__pycache__" not in p.parts and p.relative_to(package_dir) not in wanted:
            p.unlink()
            removed += 1
    return Overlay("overlaid", copied, removed)
