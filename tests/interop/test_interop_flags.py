"""``tests/unit/cli/reference_flags.json`` agrees with the installed lmcache 0.5.6 package.

The unit test ``tests/unit/cli/test_reference_flags.py`` checks every flag of that list against
``kvhive server``; this test rebuilds the 0.5.6 parser in the client venv (from the package's
own ``add_*_args``), so the list cannot drift from the reference.  (0.5.7rc3's half was built
the same way from ``lmcache-cli==0.5.7rc3.dev0``, which cannot be imported whole: see the
unit test's docstring.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop

FIXTURE = Path(__file__).resolve().parents[1] / "unit" / "cli" / "reference_flags.json"


def test_the_flag_list_matches_lmcache_056(driver) -> None:
    res = driver.run("reference_flags.py")
    assert res["version"] == "0.5.6"
    installed = {tuple(a["flags"]): a for a in res["actions"]}
    listed = {
        tuple(r["flags"]): r for r in json.loads(FIXTURE.read_text()) if "0.5.6" in r["versions"]
    }
    assert set(installed) == set(listed)
    for flags, row in listed.items():
        default = row["default"]
        default = default["0.5.6"] if isinstance(default, dict) else default
        assert installed[flags]["default"] == default, flags
        assert installed[flags]["choices"] == row["choices"], flags
