"""What a newcomer installs: a regular (non-editable) install carries every subpackage and data
file the code imports, setup.sh answers its command line, the default model's recipe checks its
output first.

setup.sh installs editable, where the source tree hides a package missing from pyproject.toml's
explicit list (a regular install once lacked rt3d_halide.pruning.models and .data, so the
training CLI failed): the list is checked against the source tree's packages.
"""

from __future__ import annotations

import fnmatch
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_FILES = ("models/c3d_small_kgs.onnx", "templates/rt3d_opencl_fallback.h")


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_source_package_is_listed() -> None:
    """Every folder that holds a module, with or without an ``__init__.py`` (one without works
    in the tree as a namespace package, and a regular install leaves it out unless listed)."""
    config = _setuptools()
    found = set()
    for package, directory in config["package-dir"].items():
        for module in (ROOT / directory).rglob("*.py"):
            relative = module.parent.relative_to(ROOT / directory).parts
            found.add(".".join([package, *relative]))
    assert set(config["packages"]) == found


def test_data_files_are_package_data() -> None:
    patterns = _setuptools()["package-data"]["rt3d_halide"]
    for name in DATA_FILES:
        assert (ROOT / "rt3d_halide" / name).is_file(), name
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


def test_setup_script_gives_its_help_from_anywhere_and_refuses_extra_arguments() -> None:
    script = ROOT / "scripts" / "setup.sh"
    shown = subprocess.run(
        ["bash", "setup.sh", "--help"], cwd=script.parent, capture_output=True, text=True
    )
    assert shown.returncode == 0 and "scripts/setup.sh --test" in shown.stdout
    for args in (["--test", "extra"], ["--help", "extra"], ["--bogus"]):
        refused = subprocess.run(["bash", str(script), *args], capture_output=True, text=True)
        assert refused.returncode == 2 and "usage:" in refused.stderr, args


def test_the_test_script_gives_its_help_without_installing_anything() -> None:
    """--help went on to pytest after the setup: Debian packages, torch and the extras."""
    shown = subprocess.run(
        ["bash", str(ROOT / "scripts" / "test.sh"), "--help"], capture_output=True, text=True
    )
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    assert shown.stdout.startswith("The test command of README.md") and "pytest" in shown.stdout
    assert len(shown.stdout.splitlines()) == 4, shown.stdout


def test_the_default_models_recipe_checks_its_output_before_training(tmp_path) -> None:
    """A folder that is not there failed after the training, with a traceback."""
    for out, said in ((tmp_path / "none" / "m.onnx", "no folder"), (tmp_path, "is a directory")):
        proc = subprocess.run(
            [sys.executable, "-m", "rt3d_halide.models.make_default", "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and said in proc.stderr.splitlines()[-1], proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "rt3d_halide.models.make_default", "--seed", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--seed: must be at least 0, got -1" in proc.stderr, proc.stderr
