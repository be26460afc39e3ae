"""The prepared GPU check (scripts/gpu_check.sh, scripts/gpu_check/, prepare_gpu_wheels.sh):
what of it can run without a GPU.

* both shell scripts parse (``bash -n``);
* on this CPU machine ``gpu_check.sh`` stops at its preflight with the documented exit code
  3 and a ``skipped`` / ``no-cuda`` report, quickly, installing nothing; ``run`` says the
  same after its own facts stage;
* the bundle logic: wheel names, the install plan (missing / accepted / rejected / always),
  requirements read from real wheel METADATA, the merged manifest, the source overlay and
  its refusal when the C extension's source changed;
* the report's statuses and exit codes;
* the ``--device cpu`` smoke run of the whole pipeline against a real ``kvhive server`` with
  the real lmcache 0.5.6 client (cpu_shm instead of CUDA IPC: it checks the harness, not
  the CUDA path), and that the same run fails when the server cannot keep what was stored.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

from gpu_check import EXIT_FAILED, EXIT_NO_CUDA, EXIT_PASSED, EXIT_SETUP, bundle  # noqa: E402
from gpu_check.report import Check, Report  # noqa: E402

from support.venvs import locate_venv_python, unavailable  # noqa: E402

PY = sys.executable  # the dev venv: kvhive and a CPU torch


def _env_with_venv_first() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(PY).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("OUT", None)
    return env


# ----------------------------------------------------------------- the scripts


@pytest.mark.parametrize("script", ["gpu_check.sh", "prepare_gpu_wheels.sh"])
def test_shell_scripts_parse(script: str) -> None:
    proc = subprocess.run(["bash", "-n", str(SCRIPTS / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gpu_check_sh_without_cuda_is_skipped_with_exit_3(tmp_path: Path) -> None:
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_check.sh"), str(out)],
        capture_output=True, text=True, timeout=120, env=_env_with_venv_first(), cwd=tmp_path,
    )  # fmt: skip
    took = time.monotonic() - t0
    assert proc.returncode == EXIT_NO_CUDA == 3, proc.stdout + proc.stderr
    assert took < 60, took
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["status"] == "skipped"
    assert report["reason"].startswith("no-cuda")
    assert report["facts"]["cuda_available"] is False
    assert report["checks"] == []
    assert "no CUDA device" in proc.stdout
    assert not (out / "install.log").exists()  # stopped before making any venv


def test_run_without_cuda_is_skipped_after_facts(tmp_path: Path) -> None:
    proc = subprocess.run(
        [PY, str(SCRIPTS / "gpu_check"), "run", "--out", str(tmp_path),
         "--server-python", PY, "--client-python", PY, "--no-bench"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == EXIT_NO_CUDA, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["status"] == "skipped"
    assert report["facts"]["torch"].endswith("+cpu")
    assert not (tmp_path / "server.log").exists()  # no server was started


def test_unknown_command_is_a_setup_error() -> None:
    proc = subprocess.run(
        [PY, str(SCRIPTS / "gpu_check"), "bogus"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == EXIT_SETUP
    assert "unknown command" in proc.stderr


# ----------------------------------------------------------------- bundle logic


def _wheel(
    folder: Path, name: str, version: str, requires: list[str], tag: str = "py3-none-any"
) -> Path:
    """A minimal but real wheel file (METADATA with Requires-Dist lines)."""
    path = folder / f"{name}-{version}-{tag}.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
        z.writestr(f"{name}/__init__.py", "")
    return path


def test_wheel_name_parsing() -> None:
    w = bundle.WheelName.parse("pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.whl")
    assert (w.dist, w.version) == ("pydantic-core", "2.50.5")
    with pytest.raises(ValueError, match="not a wheel"):
        bundle.WheelName.parse("numpy-2.2.6.tar.gz")


def test_install_plan(tmp_path: Path) -> None:
    files = [
        _wheel(
            tmp_path,
            "kvhive",
            "0.1.0",
            ["numpy>=1.26", "zeta>=2", "windowsonly; sys_platform == 'win32'"],
        ),
        _wheel(tmp_path, "numpy", "2.2.6", []),
        _wheel(tmp_path, "zeta", "2.5", []),
        _wheel(tmp_path, "absent", "1.0", []),
        _wheel(tmp_path, "lmcache", "0.5.6", ["numpy<=2.2.6"]),  # never honoured (--no-deps)
    ]
    reqs = bundle.set_requirements(files)
    assert {(r.dist, r.specifier) for r in reqs} == {("numpy", ">=1.26"), ("zeta", ">=2")}
    box = {"numpy": "2.5.2", "zeta": "1.9", "kvhive": "0.0.1"}
    plan = {e.dist: e for e in bundle.plan_install(files, box, reqs)}
    assert (
        plan["numpy"].action == "reuse"
    )  # the box's 2.5.2 satisfies >=1.26; lmcache's cap ignored
    assert plan["zeta"].action == "install" and "kvhive (>=2)" in plan["zeta"].why
    assert plan["absent"].action == "install" and plan["absent"].why == "missing on the box"
    assert plan["kvhive"].action == "install" and plan["lmcache"].action == "install"
    assert plan["numpy"].box_version == "2.5.2"


def test_write_manifest_merges_sets(tmp_path: Path) -> None:
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    a.mkdir()
    b.mkdir()
    _wheel(a, "shared", "1.0", [])
    shutil.copy(a / "shared-1.0-py3-none-any.whl", b)
    _wheel(a, "only_a", "1.0", [])
    _wheel(b, "only_b", "2.0", [])
    m = bundle.write_manifest(out, {"server": a, "client": b}, ROOT)
    assert sorted(p.name for p in out.glob("*.whl")) == sorted(m.sizes)
    assert len(m.sizes) == 3 and m.total_bytes == sum(m.sizes.values())
    assert (
        "shared-1.0-py3-none-any.whl" in m.sets["server"]
        and "shared-1.0-py3-none-any.whl" in m.sets["client"]
    )
    assert bundle.Manifest.load(out) == m
    # a different artifact under the same name is refused
    c = tmp_path / "c"
    c.mkdir()
    _wheel(c, "shared", "1.0", ["other"])
    with pytest.raises(ValueError, match="two different wheels"):
        bundle.write_manifest(tmp_path / "out2", {"server": a, "client": c}, ROOT)


def _fake_repo(root: Path) -> Path:
    pkg = root / "src" / "kvhive" / "transfer"
    pkg.mkdir(parents=True)
    (root / "src" / "kvhive" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "_safecopy.c").write_text("int x;\n")
    (pkg / "_safecopy.cpython-311-x86_64-linux-gnu.so").write_bytes(b"ignored")
    (root / "pyproject.toml").write_text(
        '[project]\nname="kvhive"\n\n[[tool.setuptools.ext-modules]]\nname = "kvhive.transfer._safecopy"\n'
    )
    return root


def test_overlay_source(tmp_path: Path) -> None:
    root = _fake_repo(tmp_path / "repo")
    m = bundle.write_manifest(tmp_path / "wheels", {}, root)
    installed = tmp_path / "site" / "kvhive"
    shutil.copytree(root / "src" / "kvhive", installed)
    (installed / "transfer" / "_safecopy.cpython-312-x86_64-linux-gnu.so").write_bytes(b"built")
    (installed / "old_module.py").write_text("gone = True\n")

    assert bundle.overlay_source(root, m, installed).state == "fresh"
    (root / "src" / "kvhive" / "new.py").write_text("x = 1\n")
    (root / "src" / "kvhive" / "__pycache__").mkdir()
    (root / "src" / "kvhive" / "__pycache__" / "new.cpython-311.pyc").write_bytes(b"junk")
    ov = bundle.overlay_source(root, m, installed)
    assert ov.state == "overlaid" and ov.removed == 1
    assert (installed / "new.py").read_text() == "x = 1\n"
    assert not (installed / "old_module.py").exists()
    assert (
        installed / "transfer" / "_safecopy.cpython-312-x86_64-linux-gnu.so"
    ).read_bytes() == b"built"
    assert not (installed / "__pycache__").exists()

    (root / "src" / "kvhive" / "transfer" / "_safecopy.c").write_text("int y;\n")
    ov = bundle.overlay_source(root, m, installed)
    assert ov.state == "stale-native" and "prepare_gpu_wheels.sh" in ov.detail


# ----------------------------------------------------------------- the report


def test_report_statuses_and_exit_codes(tmp_path: Path) -> None:
    r = Report(tmp_path)
    assert r.finish() == EXIT_FAILED  # nothing ran is not a pass
    r = Report(tmp_path)
    r.add(Check("a", "passed", 0.1))
    r.add(Check("b", "skipped", 0.0, "not here"))
    assert r.finish() == EXIT_PASSED
    r.add(Check("c", "failed", 0.2, "boom"))
    assert r.finish() == EXIT_FAILED
    data = json.loads((tmp_path / "gpu-check.json").read_text())
    assert data["status"] == "failed" and data["reason"] == "failed: c"
    assert (data["passed"], data["failed"], data["skipped"]) == (1, 1, 1)
    assert Report(tmp_path).finish(skipped_reason="no-cuda: x") == EXIT_NO_CUDA
    assert Report(tmp_path).finish(setup_error="no bundle") == EXIT_SETUP


# ----------------------------------------------------------------- CPU smoke run


@pytest.fixture(scope="module")
def client_python() -> str:
    path, reason = locate_venv_python(
        "KVHIVE_CLIENT_PYTHON", SCRIPTS / "setup_client_venv.sh", "lmcache client"
    )
    if path is None:
        unavailable(reason)
    assert path is not None
    return path


def _smoke(out: Path, client: str, *extra: str) -> tuple[int, dict]:
    proc = subprocess.run(
        [PY, str(SCRIPTS / "gpu_check"), "run", "--out", str(out), "--server-python", PY,
         "--client-python", client, "--device", "cpu", "--no-bench", *extra],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    return proc.returncode, json.loads((out / "gpu-check.json").read_text())


def test_cpu_smoke_pipeline_passes(tmp_path: Path, client_python: str) -> None:
    rc, rep = _smoke(tmp_path, client_python, "--cases", "nhd,fused_hnd", "--l1-size-gb", "0.25")
    by_name = {c["name"]: c for c in rep["checks"]}
    assert rc == EXIT_PASSED, json.dumps(rep, indent=1)[-4000:]
    assert set(by_name) == {
        "server/start", "cpu-smoke/nhd", "cpu-smoke/fused_hnd", "cpu-smoke/tp2",
        "server/alive-after-checks",
    }  # fmt: skip
    tp = by_name["cpu-smoke/tp2"]["details"]
    assert [r["status"] for r in tp["ranks"]] == ["passed", "passed"]
    assert tp["lookup_hits"]["stored"] == by_name["cpu-smoke/nhd"]["details"]["chunks"] * 256
    assert any("stopped, exit" in n for n in rep["notes"])


def test_cpu_smoke_fails_when_the_server_keeps_nothing(tmp_path: Path, client_python: str) -> None:
    # 1 MiB of L1 cannot hold one 4 MiB chunk: the store is acknowledged, nothing is kept,
    # and the check must say so instead of passing.
    rc, rep = _smoke(
        tmp_path, client_python, "--cases", "nhd", "--tp", "1", "--l1-size-gb", "0.001"
    )
    assert rc == EXIT_FAILED
    failed = [c for c in rep["checks"] if c["status"] == "failed"]
    assert [c["name"] for c in failed] == ["cpu-smoke/nhd"]
    assert "lookup hit 0 tokens" in failed[0]["error"]
