"""Shared test settings: hypothesis profiles and the external tools some families need.

Profiles: ``ci`` (default) is derandomized, so every run draws the same cases; ``deep``
(``HYPOTHESIS_PROFILE=deep``) draws fresh cases and many more of them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "deep",
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Example counts per family scale with the profile; ARM runs under qemu, so it draws fewer.
DEPTH = 8 if os.environ.get("HYPOTHESIS_PROFILE") == "deep" else 1


def require_tools(*names: str) -> None:
    """Skips locally when a tool is missing, but fails under CI, where .ci/run installs them."""
    missing = [n for n in names if shutil.which(n) is None]
    if not missing:
        return
    message = f"missing tools {missing}: run scripts/setup.sh --test (apt-get install; see README)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def default_mode() -> int:
    """The mode a new file or directory gets here: 0o777 less the process's umask."""
    umask = os.umask(0o22)
    os.umask(umask)
    return 0o777 & ~umask


def require_opencl() -> None:
    """PoCL registers an ICD file; without one Halide finds no OpenCL platform."""
    if os.path.isdir("/etc/OpenCL/vendors") and os.listdir("/etc/OpenCL/vendors"):
        return
    message = "no OpenCL ICD (install pocl-opencl-icd ocl-icd-libopencl1)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run_build_cli(
    *args: str, cwd: Path, cache: Path, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """``python -m rt3d_halide.build ARGS`` in ``cwd`` with its own compile cache."""
    env = {**os.environ, "RT3D_HALIDE_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, "-m", "rt3d_halide.build", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# CI has no GPU, so these tests skip there; they run on a GPU machine (docs/pruning.md records
# the last such run). The condition is evaluated in the marked test's module, which imports
# torch: the build's tests do not load it.
needs_cuda = pytest.mark.skipif(
    "not torch.cuda.is_available()", reason="needs a CUDA GPU; CI has none"
)


@pytest.fixture
def exact_cuda() -> Iterator[None]:
    """The training CLI's ``--deterministic`` kernels for one test."""
    from rt3d_halide.pruning.train import exact_cuda_kernels

    with exact_cuda_kernels():
        yield
