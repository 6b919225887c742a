"""A regular (non-editable) install carries every subpackage and data file the code imports.

setup.sh installs editable, where the source tree hides a package missing from pyproject.toml's
explicit list (a regular install once lacked rt3d_halide.pruning.models and .data, so the
training CLI failed): the list is checked against the source tree's packages.
"""

from __future__ import annotations

import fnmatch
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
