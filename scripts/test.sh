#!/usr/bin/env bash
# The test command of README.md: sets up what the tests need, then runs every target family's
# tests (x86 natively, OpenCL on PoCL, ARM under qemu-aarch64) and the pruning tests.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m arm` or `scripts/test.sh -k kgs`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  sed -n '2,4p' scripts/test.sh | sed 's/^# \{0,1\}//'
  echo "pytest's own options: python3 -m pytest --help"
  exit 0
fi
bash scripts/setup.sh --test
exec python3 -m pytest -q -rs -p no:cacheprovider -n "${RT3D_TEST_WORKERS:-2}" "$@"
