"""Every flag of ``lmcache server`` 0.5.6 and 0.5.7rc3 is known to ``kvhive server``.

``reference_flags.json`` lists the actions of both reference parsers, built from the packages'
own ``add_mp_server_args``, ``add_p2p_args``, ``add_storage_manager_args``,
``add_http_frontend_args``, ``add_observability_args`` and ``add_coordinator_args`` (0.5.6
from the client venv, 0.5.7rc3.dev0 from ``lmcache-cli``; ``tests/interop/test_interop_flags.py``
checks the 0.5.6 half against the installed package).  For every option string and version:

* the reference's default value parses (a command line spelling out the defaults starts);
* a value that asks for something parses, or exits 2 with ``--flag: not supported by kvhive:
  <why>``; never "is not a known option", never another error.

The README's flag table must list exactly these flags, each with the status the code gives it.
"""

from __future__ import annotations

import json
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kvhive.cli
from kvhive.cli.main import main
from kvhive.config import ServerConfig
from kvhive.config.compat import CompatConfig
from kvhive.config.deferred import REFUSED_FLAGS
from kvhive.config.fields import section_fields
from kvhive.config.server import server_sections

REFERENCE: list[dict[str, Any]] = json.loads(
    (Path(__file__).with_name("reference_flags.json")).read_text()
)
README = Path(__file__).resolve().parents[3] / "README.md"
REQUIRED = ["--l1-size-gb", "1", "--eviction-policy", "LRU"]

# Flags whose sample needs a companion or a well-formed value.
COMPANIONS = {"--enable-tracing": ["--disable-observability"]}
SAMPLES = {
    "--l2-adapter": '{"type": "mock", "max_size_gb": 1, "mock_bandwidth_gb": 1}',
    "--server-module": "demo_pkg.module",
    "--l1-manager": '{"type": "DRAM", "tag": "a", "size_gb": 1}',
    "--api-key-file": "/nonexistent/key",
    "--runtime-plugin-locations": "/nonexistent/plugin.py",
    "--enable": "transfer_query",
    "--script-allowed-imports": "numpy",
}
TYPED_SAMPLES = {"int": "2", "float": "2.5", "str": "sample", None: "sample"}


def _default(row: dict[str, Any], version: str) -> Any:
    default = row["default"]
    return default.get(version) if isinstance(default, dict) else default


def _cases() -> Iterator[tuple[str, list[str], bool]]:
    """(id, argv, must_parse): the default-value and the asking-value case of each flag."""
    for row in REFERENCE:
        flag, kind = row["flags"][0], row["kind"]
        for version in row["versions"]:
            default = _default(row, version)
            tag = f"{version}:{flag}"
            if kind == "on_off":
                on, off = row["flags"]
                yield f"{tag}=default", [on if default else off], True
                yield f"{tag}=given", [off if default else on], False
                continue
            if kind == "store_true":
                yield f"{tag}=given", [flag, *COMPANIONS.get(flag, [])], False
                continue
            has_default = default not in (None, [], "") and not isinstance(default, bool)
            if has_default:
                yield f"{tag}=default", [flag, str(default)], True
            elif row["nargs"] == "*":
                yield f"{tag}=default", [flag], True  # no values: the reference's []
            if row["choices"]:
                values = row["choices"]
            elif has_default:
                continue  # the default is a value that asks for something
            else:
                values = [SAMPLES.get(flag, TYPED_SAMPLES[row["type"]])]
            for value in values:
                yield f"{tag}={value}"[:80], [flag, value], False


CASES = list(_cases())


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[ServerConfig]:
    """``kvhive server`` with serve() replaced by a recorder (nothing starts)."""
    calls: list[ServerConfig] = []
    stub = types.ModuleType("kvhive.cli.serve")
    stub.serve = lambda config: calls.append(config) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kvhive.cli.serve", stub)
    monkeypatch.setattr(kvhive.cli, "serve", stub, raising=False)
    return calls


@pytest.mark.parametrize(("argv", "must_parse"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_reference_flag_parses_or_is_refused(
    argv: list[str],
    must_parse: bool,
    served: list[ServerConfig],
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = main(["server", *REQUIRED, *argv])
    err = capsys.readouterr().err
    assert "is not a known option" not in err
    if status == 0:
        assert len(served) == 1
        return
    assert not must_parse, f"the reference's default value must parse: {err}"
    assert status == 2
    assert err.startswith(f"kvhive server: error: {argv[0]}: not supported by kvhive: "), err
    assert err.count("\n") == 1 and served == []


def test_the_fixture_covers_both_versions() -> None:
    v056 = {r["flags"][0] for r in REFERENCE if "0.5.6" in r["versions"]}
    v057 = {r["flags"][0] for r in REFERENCE if "0.5.7" in r["versions"]}
    assert (len(v056), len(v057), len(v056 | v057)) == (89, 95, 96)
    assert v056 - v057 == {"--enable"}
    assert v057 - v056 == {
        "--api-key-file", "--grpc-server-mode", "--kv-load-policy", "--l1-devdax-offset-gb",
        "--l1-mlock", "--l2-prefetch-inflight-watermark", "--enable-token-trace",
    }  # fmt: skip


# -- the README table ---------------------------------------------------------------------------

IMPLEMENTED, NO_EFFECT, REFUSED = "implemented", "accepted, no effect", "refused"


def code_status(flag: str) -> str:
    """What the code makes of a reference flag (the module docstring of config/deferred.py)."""
    for _name, cls in server_sections():
        for info in section_fields(cls):
            if flag == info.spec.flag or flag in info.spec.aliases:
                return NO_EFFECT if cls is CompatConfig else IMPLEMENTED
    if flag in {r.flag for r in REFUSED_FLAGS}:
        return REFUSED
    raise AssertionError(f"{flag} is unknown to kvhive")


_ROW = re.compile(r"^\| `(--[a-z0-9-]+)`[^|]*\| ([^|]*) \| ([^|]*) \| \*\*([a-z, ]+)\*\*")


def readme_rows() -> dict[str, tuple[str, str, str]]:
    """flag -> (0.5.6 column, 0.5.7 column, status) of the README's flag table."""
    rows = {}
    for line in README.read_text().splitlines():
        m = _ROW.match(line)
        if m:
            rows[m[1]] = (m[2].strip(), m[3].strip(), m[4])
    return rows


def test_readme_lists_every_reference_flag_with_its_status() -> None:
    rows = readme_rows()
    assert set(rows) == {r["flags"][0] for r in REFERENCE}
    for row in REFERENCE:
        flag = row["flags"][0]
        v056, v057, status = rows[flag]
        assert (v056 != "—", v057 != "—") == (
            "0.5.6" in row["versions"],
            "0.5.7" in row["versions"],
        ), flag
        assert status == code_status(flag), flag


def test_readme_counts_match_the_table() -> None:
    rows = readme_rows().values()
    text = README.read_text()
    for version, column in (("0.5.6", 0), ("0.5.7", 1)):
        present = [row[2] for row in rows if row[column] != "—"]
        counts = {s: present.count(s) for s in (IMPLEMENTED, NO_EFFECT, REFUSED)}
        line = (
            f"{version}: {len(present)} flags: {counts[IMPLEMENTED]} implemented, "
            f"{counts[NO_EFFECT]} accepted with no effect, {counts[REFUSED]} refused"
        )
        assert line in text, line
