"""Halide's standard generator command line for every rt3d generator.

``python -m rt3d_halide.generators -g rt3d_conv3d_dense -o DIR -f NAME -e static_library,c_header
target=arm-64-android spec=... weights=...``. The build driver runs this in a subprocess per layer,
so an LLVM assertion cannot take the driver down with it.
"""

import halide as hl

from . import registry  # noqa: F401  (registers the generators)

if __name__ == "__main__":
    try:
        hl.main()
    except RuntimeError as exc:  # Halide printed its usage or the generator's error above
        raise SystemExit(f"error: {exc}") from None
