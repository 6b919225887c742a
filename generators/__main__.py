"""Halide's standard generator command line for every rt3d generator.

``python3 -m rt3d_halide.generators -g rt3d_conv3d_dense -o DIR -f NAME -e static_library,c_header
target=arm-64-android spec=... weights=...``. The build driver runs this in a subprocess per layer,
so an LLVM assertion cannot take the driver down with it.
"""

import os
import sys
from collections.abc import Callable

import halide as hl

from rt3d_halide.targets import halide_target, target_list_problem

from . import registry  # noqa: F401  (registers the generators)
from .conv3d_dense import DenseConv3dGenerator, check_dense_inputs
from .conv3d_sparse import SparseConv3dGenerator, sparse_inputs

USAGE = """\
usage: python3 -m rt3d_halide.generators -g GENERATOR -o DIR [-f NAME] [-n FILE] [-e EMITS]
           target=TARGET spec=JSON weights=NPZ [group=GM,GN] [schedule=JSON]
           [dense_families=F,...] [dense_schedule=JSON]
       python3 -m rt3d_halide.generators -r RUNTIME_NAME -o DIR target=TARGET

One Conv3d layer with its weights baked in, as the build compiles each layer (Halide's
generator command line: -e static_library,c_header,stmt,assembly,...), or with -r Halide's
runtime alone.

generators:
  rt3d_conv3d_dense    dense code
  rt3d_conv3d_sparse   vanilla or KGS sparse code; the pattern is read from the weights' zeros

parameters:
  target           a Halide target, or a comma list of one arch-bits-os, each target once: one
                   library that runs the first whose CPU features the device has (with -g, -e
                   then names one of object and static_library)
  spec             the layer as JSON: name, in_channels, out_channels, in_size, kernel, stride,
                   dilation, pads_begin, pads_end ([t, h, w] each), has_bias, relu
  weights          an .npz holding 'weight' (M, N, Kd, Kh, Kw) and, if the layer has one,
                   'bias' (M,) (none: a zero bias)
  group            sparse: the kernel group gM,gN (default: the file's 'group' array, else 8,4)
  schedule         JSON overrides of the schedule knobs (the family's defaults otherwise)
  dense_families   sparse: target families (opencl, arm, x86) that get dense code instead
  dense_schedule   sparse: the dense code's overrides there

exit status: 0 done, 2 bad input (one error line), 1 Halide refused or failed (its message).
"""


def _missing(argv: list[str]) -> list[str]:
    """What Halide's command line needs before it runs (it fails with an empty "Error: "
    otherwise): a generator (-g) or the runtime (-r), an output folder and a target."""
    missing = [] if {"-g", "-r"} & set(argv) else ["-g GENERATOR"]
    missing += [] if "-o" in argv else ["-o DIR"]
    if not any(arg.startswith("target=") for arg in argv):
        missing.append("target=TARGET")
    return missing


# Each generator and its parameter check, run before Halide is: a ValueError raised inside
# Halide's generator main comes out as "Unhandled exception: ..." with pybind11's stack frames.
GENERATORS: dict[str, tuple[type[hl.Generator], Callable[[dict[str, str], hl.Target], object]]] = {
    "rt3d_conv3d_dense": (DenseConv3dGenerator, check_dense_inputs),
    "rt3d_conv3d_sparse": (SparseConv3dGenerator, sparse_inputs),
}
# Parameters Halide gives every generator (autoscheduler.NAME included).
HALIDE_PARAMS = ("target", "autoscheduler")


def _unknown_params(generator: str, names: list[str]) -> list[str]:
    """Parameters ``generator`` does not take: Halide refused them with its stack frames."""
    with hl.GeneratorContext(hl.get_host_target()):
        known = set(GENERATORS[generator][0]()._gp_dict)  # Halide keeps them there
    return [name for name in names if name not in known and name.split(".")[0] not in HALIDE_PARAMS]


# What Halide's compile_multitarget needs exactly one of in -e (its default emits a library).
MULTITARGET_EMITS = {"object", "static_library"}

# Halide 21's generator flags; each takes a value.
HALIDE_FLAGS = ("-d", "-e", "-f", "-g", "-n", "-o", "-p", "-r", "-s", "-t", "-v")


def _flags_and_params(argv: list[str]) -> tuple[dict[str, str], dict[str, str]] | None:
    """The flags' values and the ``name=value`` parameters; None for a command line Halide
    reads otherwise (an unknown flag, such as ``-e=stmt``), which it then reports itself."""
    flags, params, rest = {}, {}, iter(argv)
    for arg in rest:
        if arg in HALIDE_FLAGS:
            flags[arg] = next(rest, "")
        elif arg.startswith("-") or "=" not in arg:
            return None
        else:
            name, value = arg.split("=", 1)
            params[name] = value
    return flags, params


def check_inputs(argv: list[str]) -> None:
    """Checks the output folder, the targets, the parameter names and, for every target of the
    command line, the named generator's check of its parameters (a ValueError names what is
    wrong); Halide reports unknown flags and generators itself."""
    parsed = _flags_and_params(argv)
    if parsed is None:
        return
    flags, params = parsed
    if not os.path.isdir(flags.get("-o", "")):
        raise ValueError(f"-o {flags.get('-o', '')!r}: no such folder (Halide does not make it)")
    targets = params.get("target", "").split(",")
    parsed_targets = []
    for target in targets:
        try:
            parsed = halide_target(target)
        except ValueError as exc:
            raise ValueError(f"target={params['target']}: {exc}") from exc
        if parsed is None:
            raise ValueError(f"target={params['target']}: {target!r} is not a Halide target")
        parsed_targets.append(parsed)
    if problem := target_list_problem(targets, parsed_targets):
        raise ValueError(f"target={params['target']}: {problem}")
    # Halide makes the runtime alone (-r) of a target list as an object and a library at once.
    if len(targets) > 1 and "-e" in flags and "-g" in flags:
        libraries = MULTITARGET_EMITS & set(flags["-e"].split(","))
        if len(libraries) != 1:
            raise ValueError(
                f"-e {flags['-e']}: a list of targets makes one library for them all, so -e "
                f"names exactly one of {' and '.join(sorted(MULTITARGET_EMITS))}"
            )
    generator = flags.get("-g", "")
    if generator not in GENERATORS:
        return
    if unknown := _unknown_params(generator, list(params)):
        raise ValueError(
            f"{generator} takes no parameter {', '.join(unknown)} (see --help for its parameters)"
        )
    for target in parsed_targets:
        GENERATORS[generator][1](params, target)


if __name__ == "__main__":
    args = sys.argv[1:]
    if {"-h", "--help"} & set(args):
        print(USAGE, end="")
        raise SystemExit(0)
    if missing := _missing(args):
        print(USAGE, end="", file=sys.stderr)
        print(f"error: missing {', '.join(missing)}", file=sys.stderr)
        raise SystemExit(2)
    try:
        check_inputs(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        hl.main()
    except RuntimeError as exc:  # Halide printed its usage or the generator's error above
        raise SystemExit(f"error: {exc}") from None
