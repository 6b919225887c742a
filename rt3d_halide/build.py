"""``python -m rt3d_halide.build``: an ONNX 3D CNN in, static libraries an app links out.

Every Conv node becomes one generated function (a following Relu is fused into it) with its weights
baked in and the kernel :mod:`rt3d_halide.kernel_choice` picks; see :mod:`rt3d_halide.artifacts`
for the output layout. Bad input, and the file system's refusals of the user's paths, end with one
line that names the problem, exit status 2, and no output written (an earlier build at ``--out``
stays).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import errno
import json
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import halide as hl
import numpy as np

from rt3d_halide.generators.schedules import (
    FAMILIES,
    choose_schedule,
    family_overrides,
    target_family_knobs,
    with_overrides,
)
from rt3d_halide.generators.sparse_choice import choose_sparse_schedule
from rt3d_halide.generators.sparse_knobs import sparse_family_knobs

from . import artifacts
from .archive import merge_archives
from .compile import (
    LayerArtifacts,
    LayerJob,
    cache_root,
    compile_layers,
    compile_runtime,
    sweep_candidates,
)
from .errors import BuildError, Stopped, listing, stopped_by
from .kernel_choice import (
    GPU_SPARSE_BREAK_EVEN_KEPT,
    GPU_SPARSE_MIN_CHANNELS,
    GPU_SPARSE_MIN_INPUT_CHANNELS,
    GPU_SPARSE_MIN_PLANE,
    KERNEL_MODES,
    SPARSE_BREAK_EVEN_KEPT,
    TEMPORAL_QUADS_OFF_FAMILIES,
    KernelChoice,
    choose_layer_kernel,
    sparse_break_even,
)
from .onnx_import import ConvLayer, ModelPlan, plan_model
from .targets import BuildTarget, family_of, parse_target

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "c3d_small_kgs.onnx"
DEFAULT_TARGET = "host"
DENSE_GENERATOR = "rt3d_conv3d_dense"
SPARSE_GENERATOR = "rt3d_conv3d_sparse"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m rt3d_halide.build",
        description=(
            "Compile every Conv3d of an ONNX model (channels-innermost activations, weights baked "
            "into code) to one static library + header per model, one Halide runtime library, a "
            "manifest.json and a CMake package."
        ),
        epilog=(
            "Targets are Halide target strings: arm-64-android (ARM CPU, NEON), "
            "arm-64-android-opencl (phone GPU), arm-64-linux (ARM CPU, runs under qemu), host "
            "(this machine), host-opencl (OpenCL here, e.g. PoCL). A comma list such as "
            "'arm-64-android-opencl,arm-64-android' makes one library that picks the first target "
            "whose CPU features the device has, at run time (a target that an earlier one "
            "always beats is refused); to skip an OpenCL target where no "
            "OpenCL device is found, the app calls rt3d_fall_back_without_opencl() from "
            "include/rt3d_opencl_fallback.h first. Exit status: 0 built, 2 bad input or failed "
            "compile, 130 interrupted (Ctrl-C), 143 SIGTERM, 129 SIGHUP."
        ),
    )
    parser.add_argument(
        "model_file", nargs="?", type=_path_arg, metavar="MODEL", help="ONNX file, as --model"
    )
    parser.add_argument(
        "--model",
        type=_path_arg,
        help="ONNX file (default: the small 3D CNN shipped in the package)",
    )
    parser.add_argument(
        "--target", default=DEFAULT_TARGET, help=f"Halide target(s) (default: {DEFAULT_TARGET})"
    )
    parser.add_argument("--out", type=_path_arg, help="output directory (default: build/<target>/)")
    parser.add_argument(
        "--name",
        help="model name: library lib<name>.a, functions <name>_<layer> (default: file stem)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        help="layers compiled in parallel (default: the CPUs this process may use)",
    )
    parser.add_argument(
        "--schedule",
        default="",
        help="JSON of schedule knob overrides for every layer built as dense code, "
        "e.g. '{\"register_tiles\": [[2, 6]]}'; for a comma list of targets whose families' "
        'knobs differ, one object per family: \'{"arm64-neon": {...}, "opencl": {...}}\' '
        f"(families: {', '.join(FAMILIES)}; see the manifest's schedules)",
    )
    parser.add_argument(
        "--kernel",
        choices=KERNEL_MODES,
        default="auto",
        help="Conv code per layer: 'auto' (default) builds sparse code for a pruned layer whose "
        f"sparse code runs at most {SPARSE_BREAK_EVEN_KEPT} of its dense MACs (the manifest's "
        f"sparse_fraction; {GPU_SPARSE_BREAK_EVEN_KEPT} on OpenCL targets, where convs of fewer "
        f"than {GPU_SPARSE_MIN_INPUT_CHANNELS} input channels stay dense), for a temporal-only "
        "Kx1x1 layer (K > 1) that the sparse schedule reads in place as quads (CPU targets, at "
        f"least 4 input channels, mostly kept quads; not on "
        f"{', '.join(TEMPORAL_QUADS_OFF_FAMILIES)}) "
        "and, on OpenCL targets, for a conv with spatial taps, >= "
        f"{GPU_SPARSE_MIN_CHANNELS} input channels and an output plane >= "
        f"{GPU_SPARSE_MIN_PLANE}x{GPU_SPARSE_MIN_PLANE} (where its measured schedule applies: "
        "a group of 2, 4, 8 or 16 filters, no override against it); dense code otherwise. A "
        "comma list of targets decides per family, OpenCL or CPU (one library; the manifest's "
        "target_kernels): CPU targets of one list decide together. 'dense' or 'sparse' forces "
        "one for every layer. --schedule applies to dense code",
    )
    parser.add_argument(
        "--sparse-schedule",
        default="",
        help="JSON of sparse schedule knob overrides for every sparse layer, "
        "e.g. '{\"x_vectors\": 3}', or one object per family as for --schedule "
        "(see rt3d_halide.generators.sparse_knobs)",
    )
    parser.add_argument(
        "--keep-assembly", action="store_true", help="also write each layer's assembly to asm/"
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress lines (notes, such as files of yours the build removed, still show)",
    )
    return parser


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    schedule: str = ""
    keep_assembly: bool = False
    quiet: bool = False
    kernel: str = "auto"
    sparse_schedule: str = ""


def _canonical_overrides(text: str) -> str:
    """Checked knob overrides as the compile cache keys them: one text for the same knobs
    however spaced or ordered ('' for none, as '{}'), which compiled every layer again."""
    overrides = json.loads(text) if text.strip() else {}
    return json.dumps(overrides, sort_keys=True, separators=(",", ":")) if overrides else ""


def _layer_job(
    layer: ConvLayer, choice: KernelChoice, target: BuildTarget, options: BuildOptions
) -> LayerJob:
    kernel = choice.kernel
    arrays = {"weight": layer.weight}
    if layer.bias is not None:
        arrays["bias"] = layer.bias
    params: tuple[tuple[str, str], ...] = ()
    if kernel == artifacts.PER_TARGET:
        dense = {
            family_of(t) for i, t in enumerate(target.targets) if choice.kernel_at(i) == "dense"
        }
        params = (("dense_families", ",".join(sorted(dense))), ("dense_schedule", options.schedule))
    if kernel != "dense":
        assert layer.sparsity is not None
        # The group travels in the weights file (and so in the compile cache key).
        arrays["group"] = np.asarray(layer.sparsity.group, dtype=np.float32)
    return LayerJob(
        generator=DENSE_GENERATOR if kernel == "dense" else SPARSE_GENERATOR,
        fn_name=layer.spec.name,
        spec_json=layer.spec.to_json(),
        arrays=arrays,
        target=target.generator_target(),
        schedule=options.schedule if kernel == "dense" else options.sparse_schedule,
        emit_assembly=options.keep_assembly,
        params=params,
    )


def _schedule(
    layer: ConvLayer,
    kernel: str,
    target: hl.Target,
    options: BuildOptions,
    shares: tuple[float, float],
) -> Any:
    if kernel == "sparse":
        assert layer.sparsity is not None
        group = layer.sparsity.group
        return choose_sparse_schedule(target, layer.spec, group, options.sparse_schedule, *shares)
    return choose_schedule(target, layer.spec, options.schedule)


def _function_entry(
    layer: ConvLayer, choice: KernelChoice, target: BuildTarget, options: BuildOptions
) -> dict[str, Any]:
    spec, kernel = layer.spec, choice.kernel
    assert layer.sparsity is not None
    io = {
        "input": {
            "name": "input",
            "onnx_tensor": layer.input_name,
            "dtype": "float32",
            "shape": artifacts.activation_shape(spec.input_shape()),
            "layout": "NTHWC",
        },
        "output": {
            "name": "output",
            "onnx_tensor": layer.output_name,
            "dtype": "float32",
            "shape": artifacts.activation_shape(spec.output_shape()),
            "layout": "NTHWC",
        },
    }
    return {
        "name": spec.name,
        "node": layer.node,
        "op": "Conv",
        "kernel": kernel,
        "target_kernels": {
            t.to_string(): choice.kernel_at(i) for i, t in enumerate(target.targets)
        },
        "kernel_reason": choice.reason,
        "sparsity": layer.sparsity.describe(),
        "fused_relu": spec.relu,
        **io,
        "arguments": [io["input"], io["output"]],
        "spec": {
            "in_channels": spec.in_channels,
            "out_channels": spec.out_channels,
            "in_size": list(spec.in_size),
            "kernel": list(spec.kernel),
            "stride": list(spec.stride),
            "dilation": list(spec.dilation),
            "pads_begin": list(spec.pads_begin),
            "pads_end": list(spec.pads_end),
            "bias": spec.has_bias,
        },
        "macs_per_sample": spec.macs(),
        "weight": {"onnx_initializer": layer.weight_name, "shape": list(layer.weight.shape)},
        "schedules": {
            t.to_string(): _schedule(
                layer, choice.kernel_at(i), t, options, choice.shares
            ).describe()
            for i, t in enumerate(target.targets)
        },
    }


def check_schedule(
    plan: ModelPlan, choices: list[KernelChoice], target: BuildTarget, options: BuildOptions
) -> None:
    """Resolves ``--schedule`` / ``--sparse-schedule`` for every layer and target before any
    compile starts.

    The generator subprocess would otherwise fail on each layer with a Python traceback. A flag
    that no layer's kernel uses is still checked against each target family's knobs, so that a
    typo does not pass silently (with a note that it applies to no layer); one that some layers
    use is checked on the targets whose code uses it (knob sets differ per family).
    """
    flags = {
        "dense": ("--schedule", options.schedule, target_family_knobs),
        "sparse": ("--sparse-schedule", options.sparse_schedule, sparse_family_knobs),
    }
    for kernel, (flag, text, family_knobs) in flags.items():
        if not text:
            continue
        _check_families(flag, text, [family_knobs(t).family for t in target.targets])
        per_target = [
            [
                (lay, c)
                for lay, c in zip(plan.layers, choices, strict=True)
                if c.kernel_at(i) == kernel
            ]
            for i in range(len(target.targets))
        ]
        used = any(per_target)
        for hl_target, pairs in zip(target.targets, per_target, strict=True):
            where = str(hl_target)
            try:
                if not used:
                    with_overrides(family_knobs(hl_target), text)
                for layer, choice in pairs:
                    where = f"{hl_target} (layer {layer.node!r})"
                    _schedule(layer, kernel, hl_target, options, choice.shares)
            except json.JSONDecodeError as exc:
                raise BuildError(f"{flag} {text!r} is not valid JSON: {exc}") from exc
            except Exception as exc:  # knob values are user input: any failure is theirs
                raise BuildError(f"{flag} {text!r} for {where}: {exc}") from exc
        if not used:
            _note(f"note: {flag} applies to no layer: every layer runs other code")


def _check_families(flag: str, text: str, families: list[str]) -> None:
    """Per-family overrides name only families the build has: a family of no target is a typo
    or a flag meant for another build, not something to drop silently."""
    try:
        per_family = family_overrides(text)
    except json.JSONDecodeError as exc:
        raise BuildError(f"{flag} {text!r} is not valid JSON: {exc}") from exc
    except ValueError as exc:
        raise BuildError(f"{flag} {text!r}: {exc}") from exc
    for family in per_family or {}:
        if family not in families:
            raise BuildError(
                f"{flag} {text!r}: no target of this build is {family} "
                f"(its families: {', '.join(dict.fromkeys(families))})"
            )


def _log(options: BuildOptions, message: str) -> None:
    if not options.quiet:
        print(message, file=sys.stderr, flush=True)


def _note(message: str) -> None:
    """What the user should know whatever --quiet says (it silences progress): files of theirs
    removed, a name changed, an option or a constant that does not do what it seems to."""
    print(message, file=sys.stderr, flush=True)


def assemble(
    plan: ModelPlan,
    choices: list[KernelChoice],
    target: BuildTarget,
    compiled: list[LayerArtifacts],
    runtime: Path,
    options: BuildOptions,
    dest: Path,
) -> dict[str, Any]:
    (dest / "include").mkdir(parents=True)
    (dest / "lib").mkdir()
    merge_archives([c.library for c in compiled], dest / "lib" / f"lib{plan.name}.a")
    shutil.copy2(runtime, dest / "lib" / "libhalide_runtime.a")
    if options.keep_assembly:
        (dest / "asm").mkdir()
        for c in compiled:
            for asm in c.assembly:
                shutil.copy2(asm, dest / "asm" / asm.name)
    functions = [
        _function_entry(layer, choice, target, options)
        for layer, choice in zip(plan.layers, choices, strict=True)
    ]
    executed = {
        t.to_string(): sum(
            f["sparsity"]["sparse_macs_per_sample"]
            if f["target_kernels"][t.to_string()] == "sparse"
            else f["macs_per_sample"]
            for f in functions
        )
        for t in target.targets
    }
    opencl = "opencl" in target.families
    fallback = target.falls_back_from_opencl
    header = dest / "include" / f"{plan.name}.h"
    artifacts.write_header(header, plan.name, functions, opencl, fallback)
    artifacts.copy_runtime_headers(dest / "include")
    if fallback:
        artifacts.copy_opencl_fallback_header(dest / "include")
    artifacts.write_cmake_config(dest / "lib", plan.name, target.text, target.first)
    manifest = {
        "format": artifacts.MANIFEST_FORMAT,
        "model": plan.name,
        "source": {"path": str(plan.path), "sha256": plan.sha256},
        "target": target.text,
        "halide_targets": [t.to_string() for t in target.targets],
        "target_families": target.families,
        "library": f"lib/lib{plan.name}.a",
        "runtime": "lib/libhalide_runtime.a",
        "runtime_target": target.runtime_target().to_string(),
        "header": f"include/{plan.name}.h",
        **(
            {"opencl_fallback_header": f"include/{artifacts.OPENCL_FALLBACK_HEADER}"}
            if fallback
            else {}
        ),
        "cmake_package": f"lib/cmake/{plan.name}/{plan.name}Config.cmake",
        # The graph's input as its ONNX file declares it (its layout is the graph's, NCDHW as torch
        # exports a Conv3d model); each function gives its own input's shape and layout.
        "model_input": {"name": plan.input_name, "shape": plan.input_shape},
        "model_outputs": _model_outputs(plan, functions),
        "steps": plan.steps,
        "functions": functions,
        "onnx_opset": plan.opset,
        "host_ops": plan.host_ops,
        "host_constants": plan.host_constants,
        "host_weights": artifacts.write_host_weights(dest, plan.host_weights),
        "total_macs_per_sample": sum(layer.spec.macs() for layer in plan.layers),
        # By the first target's kernels: the code a device that has its features runs.
        "executed_macs_per_sample": executed[target.first.to_string()],
        "executed_macs_per_sample_by_target": executed,
        # Weighed against each layer's sparse_fraction, not its kept_fraction.
        "sparse_break_even_fraction": sparse_break_even([target.first]),
        "sparse_break_even_by_target": {
            t.to_string(): sparse_break_even([t]) for t in target.targets
        },
        "versions": artifacts.tool_versions(),
    }
    artifacts.write_manifest(dest / "manifest.json", manifest)
    return manifest


def _model_outputs(plan: ModelPlan, functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The graph's outputs: one that a function writes is in that function's layout and shape
    (channels innermost), any other in the graph's own, as the host op that writes it has it,
    or as the file holds it (``stored``: a constant, in the host weights or constants, which no
    step writes)."""
    written = {f["output"]["onnx_tensor"]: f for f in functions}
    outputs = []
    for output in plan.outputs:
        function = written.get(output["name"])
        if output["name"] in plan.host_weights or output["name"] in plan.host_constants:
            outputs.append({**output, "layout": "as in the ONNX graph", "stored": True})
        elif function is None:
            outputs.append({**output, "layout": "as in the ONNX graph"})
        else:
            written_as = {key: function["output"][key] for key in ("shape", "layout")}
            outputs.append({**output, **written_as, "function": function["name"]})
    return outputs


def _path_arg(text: str) -> Path:
    """An argparse type for a path that names something: ``Path("")`` is the current directory,
    which an empty --model called "a directory" and an empty --out "the current directory"."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    return Path(text)


def _check_out_dir(out: Path) -> Path:
    """A build replaces only an earlier build or an empty directory, never the user's files,
    and finds out before compiling anything whether it can write there. A symlink is followed
    (an app project's folder linked in as --out gets the build): returns the directory that the
    build replaces."""
    try:
        if out.is_symlink():
            if not out.exists():
                raise BuildError(f"--out {out}: a symlink to nothing ({os.readlink(out)})")
            out = out.resolve()
        _check_out_path(out)
    except OSError as exc:  # an unreadable --out, or a name too long
        raise BuildError(f"--out {out}: {exc.strerror or exc}") from exc
    except RuntimeError as exc:  # a symlink loop on the way (Python 3.11's resolve)
        raise BuildError(f"--out {out}: {exc}") from exc
    return out


def _check_out_path(out: Path) -> None:
    cwd = Path.cwd().resolve()
    if out.resolve() in (cwd, *cwd.parents):
        raise BuildError(
            f"--out {out}: the current directory or one holding it; a build replaces its --out "
            "directory whole, so name a directory of its own (such as build/)"
        )
    cache = _resolved(cache_root())
    if out.resolve() in (cache, *cache.parents):
        # Made inside it while the layers compiled, the cache went with the earlier build
        # that this one replaced: every build compiled every layer again.
        raise BuildError(
            f"--out {out}: holds the compile cache {cache} (RT3D_HALIDE_CACHE, else "
            "$XDG_CACHE_HOME/rt3d_halide or ~/.cache/rt3d_halide), which a build would remove "
            "with the directory it replaces; name another --out, or set RT3D_HALIDE_CACHE "
            "outside it"
        )
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and _is_mount_point(out):
        # Found only once everything had compiled: renaming onto it fails (EBUSY).
        raise BuildError(
            f"--out {out}: a mount point, which a build cannot replace (it replaces its --out "
            f"directory whole): name a directory inside it, such as {out / 'build'}"
        )
    if out.is_dir() and any(out.iterdir()) and not _is_build(out):
        raise BuildError(
            f"--out {out}: a non-empty directory that is not an rt3d_halide build; "
            "choose another path (a build replaces its --out directory whole)"
        )
    parent = _existing_parent(out)
    if not parent.is_dir():
        raise BuildError(f"--out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BuildError(f"--out {out}: cannot write in {parent}")
    # Permission bits do not tell all (root, a read-only or virtual file system): a directory
    # made and removed where the build will make its own says it before anything compiles.
    probe = parent / _hidden_name("probe")
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise BuildError(f"--out {out}: cannot write in {parent}: {exc.strerror}") from exc
    longest = os.pathconf(parent, "PC_NAME_MAX")
    for part in out.absolute().relative_to(parent).parts:
        if 0 < longest < len(os.fsencode(part)):
            raise BuildError(f"--out {out}: a name longer than the {longest} bytes {parent} allows")


def _is_mount_point(path: Path) -> bool:
    """``os.path.ismount``, or a directory of another mount than its parent's: a bind mount of
    a directory of the same file system shares its device, which ismount compares. Linux names
    each open directory's mount in /proc/self/fdinfo (a mount point listed in mountinfo may be
    hidden under a later mount on a parent, its path now an ordinary directory)."""
    if os.path.ismount(path):
        return True
    try:
        return _mount_id(path) != _mount_id(path / "..")
    except OSError:  # not Linux
        return False


def _mount_id(directory: Path) -> int:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        info = Path(f"/proc/self/fdinfo/{fd}").read_text()
    finally:
        os.close(fd)
    for line in info.splitlines():
        if line.startswith("mnt_id:"):
            return int(line.split()[1])
    raise OSError(f"no mnt_id for {directory}")


def _existing_parent(out: Path) -> Path:
    """The nearest directory above ``out`` that exists: where the build makes its own."""
    return next(p for p in out.absolute().parents if p.exists())


def _check_model_outside(model: Path, out: Path) -> None:
    """The build replaces ``out`` whole: a model kept inside it would go with the earlier build."""
    try:
        inside = model.resolve().is_relative_to(out.resolve())
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise BuildError(f"{model}: {getattr(exc, 'strerror', None) or exc}") from exc
    if inside:
        raise BuildError(
            f"{model}: lies inside --out {out}, which the build replaces whole; "
            "move the model out of it first"
        )


def _check_name_fits(model: str, out: Path) -> None:
    """The model's files are named after it (lib<model>.a, <model>Config.cmake): a name past
    the file system's limit is the name's fault, not --out's, where the write would fail."""
    longest = os.pathconf(_existing_parent(out), "PC_NAME_MAX")
    needed = len(os.fsencode(f"{model}Config.cmake"))
    if 0 < longest < needed:
        raise BuildError(
            f"model name {model[:20]!r}... ({len(model)} characters): its files' names "
            f"({model[:8]}...Config.cmake) would pass the {longest} bytes a file name may have "
            "here; give a shorter --name"
        )


def _is_build(out: Path) -> bool:
    """Whether ``out`` holds an earlier build: a manifest of this tool's (any format version),
    not merely a file of that name (:func:`artifacts.read_manifest`)."""
    try:
        artifacts.read_manifest(out)
    except (OSError, ValueError):
        return False
    return True


def _hidden_name(kind: str) -> str:
    """A name for a directory beside --out while the build swaps it in: not derived from
    --out's own name, which may already be as long as the file system allows."""
    return f".rt3d_halide-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


AT_FDCWD = -100
RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two directories in one step (Linux's renameat2 with RENAME_EXCHANGE); False where
    the C library or the file system cannot."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:
        return False
    rename.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if rename(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _replace_dir(new: Path, dest: Path) -> None:
    """Puts ``new`` at ``dest``. An older build there is swapped out in one step and then
    removed, so that ``dest`` always holds a whole build, whatever stops this process or
    another build writes there at once. Where the swap is missing, it is moved aside first and
    moved back if ``new`` cannot go in."""
    try:
        new.rename(dest)
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if _exchange(new, dest):
        shutil.rmtree(new, ignore_errors=True)  # the older build, now here
        return
    old = dest.with_name(_hidden_name("old"))
    try:
        dest.rename(old)
        os.utime(old)  # a rename keeps the age the sweep of killed builds' leftovers reads
        new.rename(dest)
    except BaseException:
        if old.exists():
            if dest.exists():  # another build's, newer than the one moved aside
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.rename(dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _sweep_staging(parent: Path) -> None:
    """Removes what builds killed outright (SIGKILL, a crash) left beside --out: a staging
    directory, or where the file system cannot swap, an earlier build moved aside. Each names
    its process, which is gone, and is older than any build takes (a build in another PID
    namespace writing beside it names a process not seen here)."""
    for path in sweep_candidates(parent, ".rt3d_halide-*-*-*"):
        _, kind, pid, _ = path.name.split("-", 3)
        if kind in ("tmp", "old") and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def usable_cpus() -> int:
    """The CPUs this process may run on (taskset, a container's cpuset), not all the machine's:
    more compiles than that only wait for each other."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def build(
    model: Path | str = DEFAULT_MODEL,
    target: str = DEFAULT_TARGET,
    out: Path | str | None = None,
    *,
    name: str | None = None,
    jobs: int | None = None,
    schedule: str = "",
    keep_assembly: bool = False,
    quiet: bool = False,
    kernel: str = "auto",
    sparse_schedule: str = "",
) -> Path:
    """Builds ``model`` for ``target`` into ``out`` (default ``build/<target>``); returns the
    directory written (where a symlinked ``out`` points).

    Raises :class:`BuildError` for bad input and where the file system refuses the user's paths
    (--out, the compile cache); ``out`` is left as it was then.
    """
    build_target = parse_target(target)
    if jobs is None:
        jobs = usable_cpus()
    if jobs < 1:
        raise BuildError("--jobs must be >= 1")
    if name is not None and not name.strip():
        raise BuildError("--name: empty (leave it out to name the model after its file)")
    options = BuildOptions(schedule, keep_assembly, quiet, kernel, sparse_schedule)
    out = _check_out_dir(Path(out) if out else Path("build") / build_target.text)
    _check_model_outside(Path(model), out)
    started = time.monotonic()
    plan = plan_model(Path(model), name)
    given = name or Path(model).stem  # the file's stem names it by default
    if plan.name != given:
        _note(f"model name {given!r} is {plan.name!r} in C (letters, digits, underscores)")
    _check_name_fits(plan.name, out)
    choices = [
        choose_layer_kernel(layer, options.kernel, options.sparse_schedule, build_target.targets)
        for layer in plan.layers
    ]
    check_schedule(plan, choices, build_target, options)
    options = dataclasses.replace(
        options,
        schedule=_canonical_overrides(options.schedule),
        sparse_schedule=_canonical_overrides(options.sparse_schedule),
    )
    count = len(plan.layers)
    _log(options, f"{plan.name}: {count} conv layer{'s' * (count != 1)} for {build_target.text}")
    for note in batch_bound_reshapes(plan):
        _note(f"note: {note}")
    for layer in plan.layers:
        if layer.spec.name in plan.renamed:
            _note(
                f"note: node {layer.node!r} is function {layer.spec.name!r}, not "
                f"{plan.renamed[layer.spec.name]!r}: that name, or a symbol Halide defines "
                "beside it (<fn>_argv, <fn>_metadata), is another layer's or the OpenCL "
                "fallback header's"
            )
    jobs_list = [
        _layer_job(layer, choice, build_target, options)
        for layer, choice in zip(plan.layers, choices, strict=True)
    ]

    chosen = {layer.spec.name: choice for layer, choice in zip(plan.layers, choices, strict=True)}

    def progress(done: int, total: int, result: LayerArtifacts) -> None:
        how = "cached" if result.cached else f"compiled in {result.seconds:.1f} s"
        choice = chosen[result.fn_name]
        kernel = "per target" if choice.kernel == artifacts.PER_TARGET else choice.kernel
        _log(options, f"  [{done}/{total}] {result.fn_name}: {kernel}, {how} ({choice.reason})")

    try:
        compiled = compile_layers(jobs_list, jobs, progress, lambda line: _log(options, line))
        runtime = compile_runtime(build_target.runtime_target().to_string())
        manifests: list[dict[str, Any]] = []  # what assemble wrote into the staging directory
        dropped = _write_out(
            out,
            lambda staging: manifests.append(
                assemble(plan, choices, build_target, compiled, runtime, options, staging)
            ),
        )
    except OSError as exc:
        if where := _users_path(exc, out):
            raise BuildError(f"{where}: {exc}") from exc
        # A write (file.write(), np.savez) that ran out of space names no file.
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) and exc.filename is None:
            raise BuildError(
                f"--out {out} or the compile cache {cache_root()}: {exc.strerror}"
            ) from exc
        raise
    if dropped:
        removed = listing(dropped, shown=5)
        _note(f"{plan.name}: removed with the earlier build in {out}/: {removed}")
    _log(options, _summary(manifests[0], build_target))
    _log(options, f"{plan.name}: wrote {out}/ in {time.monotonic() - started:.1f} s")
    return out


def batch_bound_reshapes(plan: ModelPlan) -> list[str]:
    """Host Reshapes whose constant shape starts with the graph's static batch (torch's
    ``x.view(x.size(0), -1)`` exported without a dynamic batch axis writes ``[1, -1]``): the
    functions take any batch, but an app running another through these would fail or mix
    clips, so the build says so. Not for a Reshape of a stored tensor (a scale reshaped to
    ``[1, C, 1, 1, 1]`` to broadcast), which holds no batch."""
    batch = plan.input_shape[0] if plan.input_shape else None
    if not isinstance(batch, int) or batch < 1:
        return []
    notes = []
    stored_tensors = {*plan.host_weights, *plan.host_constants}
    for op in plan.host_ops:
        if op["op"] != "Reshape" or len(op["inputs"]) < 2 or op["inputs"][0] in stored_tensors:
            continue
        name = op["inputs"][1]
        constant = plan.host_constants.get(name, {})
        stored = plan.host_weights.get(constant.get("initializer", name))
        values = constant.get("values") if stored is None else stored.ravel().tolist()
        if values and values[0] == batch:
            notes.append(
                f"host op {op['node']!r} reshapes to {values}: the exported batch of {batch} is "
                "fixed there (the functions take any batch; export with a dynamic batch axis, "
                "or change that constant, to run others)"
            )
    return notes


def _summary(manifest: dict[str, Any], target: BuildTarget) -> str:
    """What pruning bought, in one line, as the manifest counts it: the sparse layers and the
    conv MACs the code runs per clip against dense code's, per target of a list (a GPU target
    and its CPU fallback may run different kernels)."""
    functions = manifest["functions"]
    layers, total = len(functions), manifest["total_macs_per_sample"]
    by_target = manifest["executed_macs_per_sample_by_target"]
    spelled = [text.strip() for text in target.text.split(",")]
    parts = []
    for hl_target, text in zip(target.targets, spelled, strict=True):
        name = hl_target.to_string()
        sparse = sum(f["target_kernels"][name] == "sparse" for f in functions)
        executed = by_target[name]
        what = f"conv layer{'s' * (layers != 1)} sparse" if not parts else "sparse"
        on = f" on {text}" if len(spelled) > 1 else ""
        parts.append(
            f"{sparse} of {layers} {what}{on}, {_macs_clause(executed, total)} "
            f"({executed:,} of {total:,} per clip)"
        )
    return f"{manifest['model']}: " + "; ".join(parts)


def _macs_clause(executed: int, total: int) -> str:
    if not executed:
        return "every conv weight pruned, no conv MACs left"
    if executed < total:
        return f"{total / executed:.2f}x fewer conv MACs than dense code"
    if executed > total:  # sparse code forced where its groups' padding lanes cost more
        return f"{executed / total:.2f}x more conv MACs than dense code"
    return "as many conv MACs as dense code"


def _write_out(out: Path, write: Callable[[Path], object]) -> list[str]:
    """Has ``write`` fill a directory beside ``out`` and swaps it in; on failure nothing it
    made stays, the directories made to hold ``out`` included. Returns the files of an
    earlier build there that the new one does not hold (gone with it: the user's own notes,
    an earlier --keep-assembly's asm/), relative to ``out``."""
    made: list[Path] = []
    try:
        for parent in reversed(out.absolute().parents):
            if parent.is_dir():
                continue
            try:
                parent.mkdir()
            except FileExistsError:  # made meanwhile by someone else: not ours to remove
                continue
            except OSError as exc:
                raise BuildError(f"--out {out}: cannot make {parent}: {exc.strerror}") from exc
            made.append(parent)  # only what this build made goes again on failure
        _sweep_staging(out.absolute().parent)
        # Made with the umask's mode (mkdtemp's 0700 would keep the build from other users).
        staging = out.parent / _hidden_name("tmp")
        staging.mkdir()
        try:
            write(staging)
            dropped = _files_only_in(out, staging)
            _replace_dir(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    except BaseException:
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    return dropped


def _files_only_in(old: Path, new: Path) -> list[str]:
    """What lies under ``old`` with no counterpart under ``new``, relative paths (a directory
    once, as ``name/``; links not followed)."""
    if old.is_symlink() or not old.is_dir():
        return []
    found = []

    def walk(directory: Path) -> None:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            rel = Path(entry.path).relative_to(old)
            if not os.path.lexists(new / rel):
                found.append(f"{rel}/" if entry.is_dir(follow_symlinks=False) else str(rel))
            elif entry.is_dir(follow_symlinks=False):
                walk(Path(entry.path))

    walk(old)
    return found


def _users_path(exc: OSError, out: Path) -> str:
    """Which of the user's paths the file system refused (beside --out, the compile cache: no
    space, no permission, a cache path that is a file), named as the user gave it, which is the
    user's to fix; "" for a file of the package itself, a bug to see with its traceback (the
    directories made to hold --out report their own refusals)."""
    names = [_resolved(Path(os.fsdecode(n))) for n in (exc.filename, exc.filename2) if n]
    cache = cache_root()
    if any(name.is_relative_to(_resolved(cache)) for name in names):
        return f"the compile cache {cache}"
    if any(name.is_relative_to(_resolved(out.absolute().parent)) for name in names):
        return f"--out {out}"
    return ""


def _resolved(path: Path) -> Path:
    """``path`` with its links followed, or as far as they go: a symlink loop (the very error
    being reported, perhaps) leaves it absolute."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    given = vars(args).pop("model_file")
    if given is not None and args.model is not None:
        parser.error("give the model once: as MODEL or as --model")
    args.model = given or args.model or DEFAULT_MODEL
    try:
        with stopped_by(signal.SIGTERM, signal.SIGHUP):
            build(**vars(args))
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Stopped as exc:
        print(f"stopped by {exc.signal.name}", file=sys.stderr)
        return 128 + exc.signal
    return 0


if __name__ == "__main__":
    sys.exit(main())
