"""The harness outside a checkout (issue 25): the wheel carries conformance/, matrix/, reference/ and
mutants/ inside autoep_harness/tree/ (pyproject.toml), and the installed commands put that folder on
sys.path first, for this process and the rank processes it starts."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import autoep_harness

ROOT = Path(__file__).resolve().parent.parent


def test_every_harness_package_is_in_the_wheel_under_the_harness_folder():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for name in autoep_harness.HARNESS_PACKAGES:
        assert setuptools["package-dir"][f"autoep_harness.tree.{name}"] == name
        assert f"autoep_harness.tree.{name}" in setuptools["packages"]
        assert name not in setuptools["packages"]  # never a top-level package of site-packages
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["autoep-conformance"] == "autoep_harness:conformance_main"
    assert scripts["autoep-mutants"] == "autoep_harness:mutants_main"


def test_from_a_checkout_the_harness_is_the_checkout():
    assert Path(autoep_harness.harness_root()) == ROOT


def test_an_installed_layout_runs_its_own_copy(tmp_path):
    """The folders laid out as the wheel installs them, run from elsewhere: the commands import the
    installed copy, and a rank process started by the suite's launcher finds it too."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "autoep_harness", site / "autoep_harness")
    for name in autoep_harness.HARNESS_PACKAGES:
        shutil.copytree(ROOT / name, site / "autoep_harness" / "tree" / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    (site / "autoep").symlink_to(ROOT / "autoep")
    script = (
        "import autoep_harness, sys\n"
        "root = autoep_harness.use_harness()\n"
        "import conformance, matrix.profiles\n"
        "from autoep import launch\n"
        "print(root); print(conformance.__file__)\n"
        "print(launch.run(1, 'matrix.profiles:versions', 'smoke')[0])\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    root, module, versions = out.stdout.strip().splitlines()[-3:]
    installed = site / "autoep_harness" / "tree"
    assert Path(root) == installed and Path(module).is_relative_to(installed)
    assert versions.startswith("(") and "5." in versions
