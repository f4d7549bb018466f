"""pdserve as a user installs it: the wheel, built from this tree, in a fresh virtual environment,
run from outside the source tree. `pdserve chaos --quick` and `pdserve bench overhead` need nothing
from `tests/` (their tiny models ship in the package) and start their own Ray cluster on the
wheel's code.

The fresh venv gets the wheel and nothing else; the wheel's dependencies (torch, Ray, ...) are
made visible through a .pth line naming this environment's site-packages, so the test does not
download gigabytes again (a .pth-listed folder's own .pth files are not run, so this
environment's editable install of pdserve stays invisible there)."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # a wheel build and two Ray clusters: about a minute and a half


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed; returns its bin/ folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "--wheel-dir", str(tmp / "dist"), str(ROOT)], capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("pdserve-*.whl")
    venv.create(tmp / "venv", with_pip=False)
    bin_dir = tmp / "venv" / "bin"
    purelib = subprocess.run([str(bin_dir / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), *site.getsitepackages()}
    Path(purelib, "deps-of-the-test-environment.pth").write_text("\n".join(sorted(deps)) + "\n")
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", str(bin_dir / "python"), "install", "--no-deps",
                           "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stdout[-3000:] + inst.stderr[-3000:]
    return bin_dir


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    # no PYTHONPATH and no RAY_ADDRESS: nothing from the source tree, and a Ray cluster of its own
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_installed_package_is_the_wheel_alone(installed, tmp_path):
    code = ("import importlib.util, pdserve, pdserve.engine.tiny_models as t; print(pdserve.__file__); "
            "print([m for m in ('engine', 'router', 'bench', 'tests') if importlib.util.find_spec(m)])")
    done = _run([str(installed / "python"), "-c", code], tmp_path, 120)
    assert done.returncode == 0, done.stderr[-3000:]
    where, bare = done.stdout.splitlines()
    assert where.startswith(str(installed.parent)), where  # the venv's copy, not the source tree
    assert bare == "[]", bare  # no bare top-level packages installed (or found)


def test_chaos_quick_runs_from_the_wheel(installed, tmp_path):
    out = tmp_path / "chaos.json"
    done = _run([str(installed / "pdserve"), "chaos", "--quick", "--scenarios", "baseline", "--requests", "8",
                 "--json", str(out)], tmp_path, 600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (r,) = json.loads(out.read_text())["results"]
    assert r["scenario"] == "baseline" and not r["harness_error"], r
    assert r["completed"] == r["sent"] >= 8 and r["leaked_blocks"] == 0, r


def test_bench_overhead_runs_from_the_wheel(installed, tmp_path):
    done = _run([str(installed / "pdserve"), "bench", "overhead", "--requests", "5", "--streams", "4", "--json"],
                tmp_path, 600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads(done.stdout[done.stdout.index("{"):])
    assert res["requests"] == 5 and res["ttft_ms_p50"] > 0, res
