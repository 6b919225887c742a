#!/usr/bin/env bash
# Sets up this checkout on a fresh Debian machine.
#   scripts/setup.sh          the build: halide, numpy, onnx (+ this package, editable)
#   scripts/setup.sh --test   also the test extras and the Debian packages the tests run code on:
#                             g++ (host links), PoCL (OpenCL on the CPU), qemu-user and the
#                             aarch64 cross g++ (ARM), cmake (the CMake package check)
# torch is pinned to 2.13.0, the CPU build (from PyTorch's index where pip's own sources lack it):
# an unpinned torch, or PyPI's 2.13.0 on Linux, is a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -gt 1 ]; then
  echo "usage: $0 [--test]" >&2
  exit 2
fi
mode="${1:-}"
case "$mode" in
  "") extras="" ;;
  --test) extras="[test,pruning]" ;;
  -h|--help) sed -n '2,8p' scripts/setup.sh | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: $0 [--test]" >&2; exit 2 ;;
esac

if ! command -v python3 >/dev/null; then
  echo "error: no python3 on PATH (Debian: apt-get install python3)" >&2
  exit 1
fi
# Debian's own python3 (PEP 668) refuses pip installs outside a virtual environment: say how to
# make one rather than pass on pip's refusal halfway through (unless pip is told to install
# there anyway: PIP_BREAK_SYSTEM_PACKAGES, as some container images set).
managed=0
python3 - <<'PY' || managed=$?
import pathlib, sys, sysconfig
stdlib = sysconfig.get_path("stdlib")
marker = stdlib is not None and pathlib.Path(stdlib, "EXTERNALLY-MANAGED").exists()
sys.exit(3 if sys.prefix == sys.base_prefix and marker else 0)
PY
if [ "$managed" -eq 3 ] && [ -z "${PIP_BREAK_SYSTEM_PACKAGES:-}" ]; then
  echo "error: $(command -v python3) is the system's Python, which pip does not install into" >&2
  echo "(PEP 668). Make and enter a virtual environment, then run this again:" >&2
  echo "  python3 -m venv .venv && . .venv/bin/activate    (Debian: apt-get install python3-venv)" >&2
  exit 1
elif [ "$managed" -ne 0 ] && [ "$managed" -ne 3 ]; then
  echo "error: $(command -v python3) failed to start (exit $managed)" >&2
  exit 1
fi
if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "error: $(command -v python3) has no pip (Debian: apt-get install python3-pip)" >&2
  exit 1
fi

if [ "$mode" = "--test" ]; then
  # First, before the slow pip installs: a user who cannot install them hears it at once.
  # g++ (and with it cc): the loader links each build into a .so, the tests link C++ apps.
  packages=(g++ pocl-opencl-icd ocl-icd-libopencl1 qemu-user g++-aarch64-linux-gnu cmake)
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
      echo "error: the tests need Debian packages ${missing[*]}; run as root or:" >&2
      echo "  sudo apt-get install -y ${missing[*]}" >&2
      exit 1
    fi
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi

  # torch==2.13.0 from PyPI is the CUDA build on Linux (several GB): take the CPU build from
  # PyTorch's own index, unless 2.13.0 is installed already (whichever build: the user's) or
  # pip's own sources offer its CPU build (a local wheel, as on this project's machines). A dry
  # run tells, with pip 23.2 or later (older ones download the whole wheel to read its version).
  installed=$(python3 -c 'from importlib.metadata import version; print(version("torch"))' \
    2>/dev/null || true)
  if [[ "$installed" != 2.13.0* ]]; then
    offered=""
    if python3 - <<'PY'
import sys
from importlib.metadata import version
sys.exit(tuple(int(p) for p in version("pip").split(".")[:2]) < (23, 2))
PY
    then
      # Not found there (or a report of another shape): PyTorch's index below says more.
      offered=$(python3 -m pip install --dry-run --quiet --disable-pip-version-check --no-deps \
        --ignore-installed --report - "torch==2.13.0" 2>/dev/null | python3 -c 'import json, sys
print(" ".join(i["metadata"]["version"] for i in json.load(sys.stdin)["install"]))' \
        2>/dev/null) || offered=""
    fi
    if [[ "$offered" != *+cpu ]]; then
      echo "installing torch 2.13.0, the CPU build, from PyTorch's index (a large download)"
      python3 -m pip install --quiet --disable-pip-version-check torch==2.13.0 \
        --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
fi
echo "installing rt3d-halide${extras} and its Python dependencies (pip)"
python3 -m pip install --quiet --disable-pip-version-check -e ".${extras}"
