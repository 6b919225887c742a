"""What a build leaves for an app, checked as files and by linking and running it.

One small two-layer model (conv_a 3x3x3 + ReLU, conv_b 1x3x3 stride 2 without bias) is built once
per target for the module: host, arm-64-android (with assembly), arm-64-android-opencl, the
multi-target arm-64-android-opencl,arm-64-android, and, where the tools exist, arm-64-linux and
host-opencl. ARM objects are checked as ELF (machine, symbols), the assembly for NEON, the OpenCL
objects for kernel source; C++ programs link against host and aarch64 builds and run (natively and
under qemu-aarch64); a CMake project finds the package. The host runtime's error handling is here
too.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx_factory as F
import pytest
from conftest import default_mode, require_opencl, require_tools
from conv_harness import (
    AARCH64_SYSROOT,
    ConvCase,
    assert_matches,
    link_runner,
    reference,
    relative_error,
)

import rt3d_halide
from rt3d_halide import artifacts
from rt3d_halide.archive import _members
from rt3d_halide.build import build
from rt3d_halide.compile import LayerJob
from rt3d_halide.runtime import cache_root
from rt3d_halide.targets import parse_target

MODEL = "two"
NODES = ("conv_a", "conv_b")
FUNCTIONS = ("two_conv_a", "two_conv_b")
IN_SHAPE = (4, 6, 6, 3)  # numpy T, H, W, C of one sample
# The two layers of onnx_factory.two_conv_model as conv_harness cases (for the torch reference).
CASES = {
    "conv_a": ConvCase(3, 8, (4, 6, 6), (3, 3, 3), pads_begin=(1, 1, 1), pads_end=(1, 1, 1),
                       relu=True),
    "conv_b": ConvCase(8, 4, (4, 6, 6), (1, 3, 3), stride=(1, 2, 2), bias=False),
}  # fmt: skip
EM_X86_64, EM_AARCH64 = 62, 183


def _weights() -> dict[str, np.ndarray]:
    """The model's weights with every other kernel location of conv_a pruned (whole 8x4 units):
    the build gives conv_a sparse code and conv_b dense code, so every artifact holds both."""
    w = F.two_conv_weights(cin=3)
    pruned = w["conv_a.weight"].copy()
    pruned.reshape(8, 3, 27)[:, :, ::2] = 0
    return {**w, "conv_a.weight": pruned}


def _layer_weights(node: str) -> tuple[np.ndarray, np.ndarray | None]:
    w = _weights()
    if node == "conv_a":
        return w["conv_a.weight"], w["conv_a.bias"]
    return w["conv_b.weight"], None


def _reference(node: str, x: np.ndarray) -> np.ndarray:
    weight, bias = _layer_weights(node)
    return reference(CASES[node], x, weight, bias)


def _input(node: str, batch: int = 1, seed: int = 0) -> np.ndarray:
    case = CASES[node]
    shape = (batch, *case.in_size, case.in_channels)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------- builds (one per target)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("artifacts")
    model = F.save(F.two_conv_model(cin=3, weights=_weights()), root / f"{MODEL}.onnx")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RT3D_HALIDE_CACHE", str(root / "cache"))
        yield root, model


_BUILDS: dict[str, Path] = {}


def _build(workspace, target: str, keep_assembly: bool = False) -> Path:
    root, model = workspace
    key = f"{root}:{target}"
    if key not in _BUILDS:
        out = root / target.replace(",", "+")
        _BUILDS[key] = build(model, target, out, jobs=1, quiet=True, keep_assembly=keep_assembly)
    return _BUILDS[key]


@pytest.fixture(scope="module")
def host_build(workspace) -> Path:
    return _build(workspace, "host")


@pytest.fixture(scope="module")
def android_build(workspace) -> Path:
    return _build(workspace, "arm-64-android", keep_assembly=True)


@pytest.fixture(scope="module")
def android_gpu_build(workspace) -> Path:
    return _build(workspace, "arm-64-android-opencl")


@pytest.fixture(scope="module")
def multi_build(workspace) -> Path:
    return _build(workspace, "arm-64-android-opencl,arm-64-android")


@pytest.fixture(scope="module")
def arm_linux_build(workspace) -> Path:
    require_tools("aarch64-linux-gnu-g++", "qemu-aarch64")
    return _build(workspace, "arm-64-linux")


@pytest.fixture(scope="module")
def host_model(host_build: Path) -> rt3d_halide.BuiltModel:
    return rt3d_halide.load(host_build)


ALL_BUILDS = ["host_build", "android_build", "android_gpu_build", "multi_build"]


def _manifest(build_dir: Path) -> dict:
    return json.loads((build_dir / "manifest.json").read_text())


def _library(build_dir: Path) -> Path:
    return build_dir / "lib" / f"lib{MODEL}.a"


# ---------------------------------------------------------------- ELF reading


def elf_machine(obj: bytes) -> int:
    assert obj[:4] == b"\x7fELF", "not an ELF object"
    assert obj[4] == 2 and obj[5] == 1, "expected 64-bit little-endian ELF"
    return struct.unpack_from("<H", obj, 18)[0]


def elf_symbols(obj: bytes) -> tuple[set[str], set[str]]:
    """(defined global symbols, undefined symbols) from the object's symbol table."""
    shoff = struct.unpack_from("<Q", obj, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", obj, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", obj, shoff + i * shentsize) for i in range(shnum)]
    defined, undefined = set(), set()
    for _name, sh_type, _f, _a, offset, size, link, _i, _al, entsize in sections:
        if sh_type != 2:  # SHT_SYMTAB
            continue
        str_off = sections[link][4]
        for pos in range(offset + entsize, offset + size, entsize):  # entry 0 is null
            st_name, st_info, _other, st_shndx, _value, _size = struct.unpack_from(
                "<IBBHQQ", obj, pos
            )
            end = obj.index(b"\0", str_off + st_name)
            name = obj[str_off + st_name : end].decode()
            bind = st_info >> 4
            if st_shndx == 0:
                undefined.add(name)
            elif bind in (1, 2):  # GLOBAL, WEAK
                defined.add(name)
    return defined, undefined


# ---------------------------------------------------------------- ARM / OpenCL files


@pytest.mark.parametrize(
    ("fixture", "machine"),
    [
        ("android_build", EM_AARCH64),
        ("android_gpu_build", EM_AARCH64),
        ("multi_build", EM_AARCH64),
        ("host_build", EM_X86_64),
    ],
)
def test_library_members_are_elf_for_the_target(
    fixture: str, machine: int, request: pytest.FixtureRequest
) -> None:
    build_dir = request.getfixturevalue(fixture)
    if fixture == "host_build" and not _manifest(build_dir)["halide_targets"][0].startswith("x86"):
        pytest.skip("host is not x86-64")
    for lib in (_library(build_dir), build_dir / "lib" / "libhalide_runtime.a"):
        members, _ = _members(lib)
        assert members, lib
        for name, body in members:
            assert elf_machine(body) == machine, f"{lib.name}({name})"


def test_android_assembly_has_neon_fma(android_build: Path) -> None:
    asm_files = sorted((android_build / "asm").glob("*.s"))
    assert [p.stem for p in asm_files] == list(FUNCTIONS)
    for path in asm_files:
        text = path.read_text()
        fmla = re.findall(
            r"^\s*fmla\s+v\d+\.4s\s*,\s*v\d+\.4s\s*,\s*v\d+\.(?:4s|s\[\d\])", text, re.M
        )
        assert fmla, f"{path.name}: no NEON fmla on .4s vectors"
        assert "__kernel" not in text


def test_opencl_kernel_source_is_embedded(android_gpu_build: Path, android_build: Path) -> None:
    members, _ = _members(_library(android_gpu_build))
    for fn in FUNCTIONS:
        (body,) = [b for n, b in members if n.startswith(fn + ".")]
        assert body.count(b"__kernel") >= 1, f"{fn}: no OpenCL kernel source"
        assert b"__global" in body
    # ...and the CPU deliverable carries none.
    assert b"__kernel" not in _library(android_build).read_bytes()


def test_multi_target_library_has_dispatch_wrapper(multi_build: Path) -> None:
    members, _index = _members(_library(multi_build))
    manifest = _manifest(multi_build)
    assert manifest["halide_targets"] == ["arm-64-android-opencl", "arm-64-android"]
    assert manifest["target_families"] == ["opencl", "arm"]
    for fn in FUNCTIONS:
        mine = {n: b for n, b in members if n.startswith(fn + ".")}
        defined = {n: elf_symbols(b)[0] for n, b in mine.items()}
        (wrapper,) = [n for n, syms in defined.items() if fn in syms]
        variants = [s for n, syms in defined.items() if n != wrapper for s in syms]
        gpu = f"{fn}-arm-64-android-no_runtime-opencl"
        cpu = f"{fn}-arm-64-android-no_bounds_query-no_runtime"
        assert gpu in variants and cpu in variants
        # The wrapper calls both variants and asks the runtime which one the device can use.
        undefined = elf_symbols(mine[wrapper])[1]
        assert {gpu, cpu} <= undefined
        assert "halide_can_use_target_features" in undefined
        gpu_member = next(n for n, syms in defined.items() if gpu in syms)
        assert b"__kernel" in mine[gpu_member]
        cpu_member = next(n for n, syms in defined.items() if cpu in syms)
        assert b"__kernel" not in mine[cpu_member]
    for fn in manifest["functions"]:
        assert set(fn["schedules"]) == {"arm-64-android-opencl", "arm-64-android"}
        gpu_schedule = fn["schedules"]["arm-64-android-opencl"]
        assert gpu_schedule["family"] == "opencl"
        # The work-group and thread order are recorded: sparse code puts x tiles inner.
        assert gpu_schedule["x_threads_inner"] == (
            fn["target_kernels"]["arm-64-android-opencl"] != "dense"
        )
        assert "task_rows" not in gpu_schedule
        assert fn["schedules"]["arm-64-android"]["family"] == "arm64-neon"


# ---------------------------------------------------------------- header, symbols, manifest

DECLARATION = re.compile(
    r"^int (\w+)\(struct halide_buffer_t \*input, struct halide_buffer_t \*output\);$", re.M
)


@pytest.mark.parametrize("fixture", ALL_BUILDS)
def test_header_declares_exactly_the_manifest_functions(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    build_dir = request.getfixturevalue(fixture)
    manifest = _manifest(build_dir)
    header = (build_dir / manifest["header"]).read_text()
    declared = DECLARATION.findall(header)
    assert declared == [f["name"] for f in manifest["functions"]] == list(FUNCTIONS)
    # No other function-like declarations that the pattern missed.
    assert len(re.findall(r"^\w[\w\s\*]*\(", header, re.M)) == len(declared)


@pytest.mark.parametrize("fixture", ALL_BUILDS)
def test_header_says_how_to_move_buffers_where_a_target_is_opencl(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    header = (request.getfixturevalue(fixture) / "include" / f"{MODEL}.h").read_text()
    assert "the output's batch is\n * the input's clips, from the same first one" in header
    opencl = fixture in ("android_gpu_build", "multi_build")
    assert ("set_host_dirty()" in header and "copy_to_host()" in header) == opencl


@pytest.mark.parametrize("fixture", ALL_BUILDS)
def test_declared_functions_are_defined_global_symbols(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    build_dir = request.getfixturevalue(fixture)
    header = (build_dir / "include" / f"{MODEL}.h").read_text()
    members, index = _members(_library(build_dir))
    in_index = {s.decode() for syms in index.values() for s in syms}
    in_objects = set().union(*(elf_symbols(body)[0] for _, body in members))
    for fn in DECLARATION.findall(header):
        assert fn in in_index, f"{fn} missing from the archive's symbol index"
        assert fn in in_objects, f"{fn} not a defined global symbol in any object"
    # The archive index says what the objects say (it is rewritten by the merge).
    for i, syms in index.items():
        assert {s.decode() for s in syms} <= elf_symbols(members[i][1])[0]


def test_header_compiles_as_c_and_cpp(host_build: Path, tmp_path: Path) -> None:
    require_tools("cc", "g++")
    src = tmp_path / "use.c"
    src.write_text(f'#include "{MODEL}.h"\nint (*fns[])(struct halide_buffer_t *, '
                   f'struct halide_buffer_t *) = {{{", ".join(FUNCTIONS)}}};\n')  # fmt: skip
    for compiler, lang in (("cc", "c"), ("g++", "c++")):
        subprocess.run(
            [compiler, "-x", lang, "-fsyntax-only", "-Wall", "-Werror",
             f"-I{host_build / 'include'}", str(src)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip


@pytest.mark.parametrize("build_dir", ALL_BUILDS)
def test_docs_describe_every_manifest_key(build_dir: str, request: pytest.FixtureRequest) -> None:
    """docs/manifest.md names every key a build writes, down to each schedule's knobs (the
    keys of per-target maps are target strings, not fields)."""
    m = _manifest(request.getfixturevalue(build_dir))
    keys = set(m) | set(m["model_input"]) | {k for o in m["model_outputs"] for k in o}
    keys |= {k for step in m["steps"] for k in step} | {k for op in m["host_ops"] for k in op}
    keys |= set(m["source"]) | set(m["versions"]) | set(m["host_weights"])
    keys |= {k for tensor in m["host_weights"]["tensors"].values() for k in tensor}
    keys |= {k for constant in m["host_constants"].values() for k in constant}
    for f in m["functions"]:
        keys |= set(f) | set(f["sparsity"]) | set(f["spec"]) | set(f["weight"])
        keys |= set(f["input"]) | set(f["output"]) | {k for arg in f["arguments"] for k in arg}
        for schedule in f["schedules"].values():
            keys |= set(schedule) | set(schedule.get("work_group", {}))
    doc = Path(__file__).resolve().parent.parent / "docs" / "manifest.md"
    documented = set(re.findall(r"`([a-z_0-9]+)`", doc.read_text()))
    assert keys - documented == set()


def test_manifest_fields(android_build: Path) -> None:
    m = _manifest(android_build)
    assert m["model"] == MODEL
    assert m["target"] == "arm-64-android"
    assert m["halide_targets"] == ["arm-64-android"] and m["target_families"] == ["arm"]
    assert m["library"] == f"lib/lib{MODEL}.a" and m["runtime"] == "lib/libhalide_runtime.a"
    assert m["header"] == f"include/{MODEL}.h"
    assert m["cmake_package"] == f"lib/cmake/{MODEL}/{MODEL}Config.cmake"
    for key in ("library", "runtime", "header", "cmake_package"):
        assert (android_build / m[key]).is_file(), key
    assert m["model_input"] == {"name": "clip", "shape": [1, 3, 4, 6, 6]}
    assert m["host_ops"] == []  # the only Relu is fused into conv_a
    assert m["steps"] == [{"function": "two_conv_a"}, {"function": "two_conv_b"}]
    # The graph's output is conv_b's: given as the function writes it, not as ONNX declares it.
    assert m["model_outputs"] == [
        {"name": "y", "shape": ["N", 4, 2, 2, 4], "layout": "NTHWC", "function": "two_conv_b"}
    ]
    expected = {
        # node: (function, input shape, output shape, fused ReLU, weight shape)
        "conv_a": ("two_conv_a", ["N", 4, 6, 6, 3], ["N", 4, 6, 6, 8], True, [8, 3, 3, 3, 3]),
        "conv_b": ("two_conv_b", ["N", 4, 6, 6, 8], ["N", 4, 2, 2, 4], False, [4, 8, 1, 3, 3]),
    }
    assert [f["node"] for f in m["functions"]] == list(NODES)
    total = 0
    for fn in m["functions"]:
        name, in_shape, out_shape, relu, w_shape = expected[fn["node"]]
        assert fn["name"] == name and fn["op"] == "Conv" and fn["fused_relu"] is relu
        for arg, shape in ((fn["input"], in_shape), (fn["output"], out_shape)):
            assert arg["dtype"] == "float32" and arg["layout"] == "NTHWC"
            assert arg["shape"] == shape
        assert [a["name"] for a in fn["arguments"]] == ["input", "output"]
        assert fn["arguments"] == [fn["input"], fn["output"]]
        assert fn["input"]["onnx_tensor"] == {"conv_a": "clip", "conv_b": "a_relu"}[fn["node"]]
        assert fn["output"]["onnx_tensor"] == {"conv_a": "a_relu", "conv_b": "y"}[fn["node"]]
        assert fn["weight"]["shape"] == w_shape
        # Analytic count: output elements x (input channels x kernel volume).
        _, t, h, w, cout = out_shape
        macs = t * h * w * cout * int(np.prod(w_shape[1:]))
        assert fn["macs_per_sample"] == macs
        total += macs
        assert set(fn["schedules"]) == {"arm-64-android"}
        assert fn["schedules"]["arm-64-android"]["family"] == "arm64-neon"
    kernels = {f["node"]: f["kernel"] for f in m["functions"]}
    assert kernels == {"conv_a": "sparse", "conv_b": "dense"}
    assert total == 4 * 6 * 6 * 8 * 3 * 27 + 4 * 2 * 2 * 4 * 8 * 9
    assert m["total_macs_per_sample"] == total
    versions = m["versions"]
    for dist, key in (("halide", "halide"), ("onnx", "onnx"), ("numpy", "numpy")):
        assert versions[key] == version(dist)
    assert versions["rt3d_halide"] == version("rt3d-halide")
    assert re.fullmatch(r"3\.\d+\.\d+.*", versions["python"])


# ---------------------------------------------------------------- linking and running C++


def _runner_process(
    exe: Path, fn: str, x: np.ndarray, out_shape, work: Path, qemu: bool = False, env=None
) -> subprocess.CompletedProcess[str]:
    x.tofile(work / "in.bin")
    cmd = [str(exe), fn, str(work / "in.bin"), str(work / "out.bin"), *map(str, x.shape),
           *map(str, out_shape)]  # fmt: skip
    if qemu:
        cmd = [shutil.which("qemu-aarch64"), "-L", AARCH64_SYSROOT, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, env=env)


def _run_runner(exe: Path, fn: str, x: np.ndarray, out_shape, work: Path, qemu: bool = False,
                env=None):  # fmt: skip
    proc = _runner_process(exe, fn, x, out_shape, work, qemu, env)
    assert proc.returncode == 0, proc.stderr
    return np.fromfile(work / "out.bin", dtype=np.float32).reshape(out_shape)


def test_host_program_links_and_matches_runtime(
    host_build: Path, host_model, tmp_path: Path
) -> None:
    require_tools("g++")
    exe = link_runner(host_build, tmp_path, cross=False)
    for node in NODES:
        x = _input(node, batch=2, seed=3)
        expected = host_model[node](x)
        out = _run_runner(exe, host_model[node].name, x, expected.shape, tmp_path)
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
        assert_matches(out, _reference(node, x), CASES[node], "x86 program")
        # An output for fewer clips than the input holds is refused, not filled for the first.
        one = (1, *expected.shape[1:])
        proc = _runner_process(exe, host_model[node].name, x, one, tmp_path, False, None)
        said = proc.stdout + proc.stderr  # Halide's default handler prints, then aborts
        assert proc.returncode != 0 and "in dimension 4" in said, said


def test_multi_target_library_falls_back_to_cpu_without_opencl(workspace, tmp_path: Path) -> None:
    """host-opencl,host from C++: with an OpenCL device the OpenCL code runs; without one (no ICD
    listed) the plain library fails, as Halide picks targets by CPU features alone; with
    rt3d_fall_back_without_opencl() installed it runs the host code. Both match torch, for a
    layer whose two targets run different kernels too."""
    require_opencl()
    require_tools("g++")
    multi = _build(workspace, "host-opencl,host")
    assert _manifest(multi)["opencl_fallback_header"] == "include/rt3d_opencl_fallback.h"
    # conv_a is dense on OpenCL (its 3 input channels) and sparse on the host: both of its
    # paths run below.
    conv_a = next(f for f in _manifest(multi)["functions"] if f["node"] == "conv_a")
    assert sorted(conv_a["target_kernels"].values()) == ["dense", "sparse"]
    assert (multi / "include" / "rt3d_opencl_fallback.h").is_file()
    no_opencl = {**os.environ, "OCL_ICD_VENDORS": str(tmp_path / "no_icds")}
    (tmp_path / "no_icds").mkdir()
    # PoCL's devices are CPUs: asking Halide for a GPU leaves it none, as on a phone whose driver
    # lists no GPU.
    no_gpu = {**os.environ, "HL_OCL_DEVICE_TYPE": "gpu"}
    # PoCL lists one device; Halide takes -1 for its own choice and fails on other negatives.
    no_such_device = {**os.environ, "HL_GPU_DEVICE": "3"}
    negative_device = {**os.environ, "HL_GPU_DEVICE": "-2"}
    plain = link_runner(multi, tmp_path, cross=False)
    fallback = link_runner(multi, tmp_path, cross=False, defines=["RT3D_OPENCL_FALLBACK"])
    for node, fn in zip(NODES, FUNCTIONS, strict=True):
        x = _input(node, seed=6)
        ref = _reference(node, x)
        for exe in (plain, fallback):
            out = _run_runner(exe, fn, x, ref.shape, tmp_path)
            assert_matches(out, ref, CASES[node], "opencl program")
        for env, failure in (
            (no_opencl, "clGetPlatformIDs failed"),
            (no_gpu, "clGetDeviceIDs failed"),
            (no_such_device, "Failed to get device"),
            (negative_device, "Failed to get device"),
        ):
            out = _run_runner(fallback, fn, x, ref.shape, tmp_path, env=env)
            assert_matches(out, ref, CASES[node], "fallback program")
            failed = _runner_process(plain, fn, x, ref.shape, tmp_path, env=env)
            # Halide's default error handler prints and aborts.
            assert failed.returncode != 0
            assert failure in failed.stdout + failed.stderr


NULL_BUFFER_APP = """\
#include <cstdio>
#include "HalideBuffer.h"
#include "rt3d_opencl_fallback.h"
#include "two.h"
static void on_error(void *, const char *msg) { std::fprintf(stderr, "halide: %s\\n", msg); }
int main() {
    halide_set_error_handler(on_error);
    rt3d_fall_back_without_opencl();
    Halide::Runtime::Buffer<float> in(8, 6, 6, 4, 1), out(4, 2, 2, 4, 1);
    Halide::Runtime::Buffer<float> none_in(nullptr, 8, 6, 6, 4, 1);
    Halide::Runtime::Buffer<float> none_out(nullptr, 4, 2, 2, 4, 1);
    in.fill(1.0f);
    out.fill(-7.0f);
    int a = two_conv_b(none_in, out), b = two_conv_b(in, none_out);
    std::printf("%d %d %g\\n", a, b, out(0, 0, 0, 0, 0));
    return 0;
}
"""


def test_a_null_buffer_is_an_error_on_cpus_and_a_bounds_query_on_opencl(
    workspace, tmp_path: Path
) -> None:
    """CPU code is built without Halide's bounds query: a NULL host pointer beside a real buffer
    is -34, not 0 with the output left as it was. OpenCL code keeps the query (0, the output
    untouched): without it Halide checks no host pointer there and ran the kernels on an
    uninitialised device buffer, writing garbage."""
    require_opencl()
    require_tools("g++")
    multi = _build(workspace, "host-opencl,host")
    (tmp_path / "app.cpp").write_text(NULL_BUFFER_APP)
    exe = tmp_path / "app"
    subprocess.run(
        [os.environ.get("CXX", "g++"), "-std=c++17", "-O1", str(tmp_path / "app.cpp"),
         f"-I{multi / 'include'}", str(multi / "lib" / "libtwo.a"),
         str(multi / "lib" / "libhalide_runtime.a"), "-lpthread", "-ldl", "-o", str(exe)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (tmp_path / "no_icds").mkdir()
    for env, expected in (
        ({}, "0 0 -7"),  # OpenCL (PoCL)
        ({"OCL_ICD_VENDORS": str(tmp_path / "no_icds")}, "-34 -34 -7"),  # the CPU code
    ):
        proc = subprocess.run(
            [str(exe)], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
        )
        assert proc.returncode == 0 and proc.stdout.strip() == expected, proc


@pytest.mark.parametrize(
    ("target", "runtime"),
    [
        ("x86-64-linux-avx512_skylake-avx2-fma-f16c-sse41,x86-64-linux", "x86-64-linux"),
        (
            "x86-64-linux-avx512_zen4-avx512_cannonlake-avx512_skylake-avx512-avx2-fma-f16c-sse41,"
            "x86-64-linux-avx2-fma-f16c-sse41",
            "x86-64-linux-avx2-f16c-fma-sse41",
        ),
        ("arm-64-android-opencl,arm-64-android", "arm-64-android-opencl"),
        # OpenCL in a later target only: the runtime still needs its OpenCL code.
        ("x86-64-linux-avx2-avx-f16c-fma-sse41,x86-64-linux-opencl", "x86-64-linux-opencl"),
    ],
)
def test_the_runtime_runs_wherever_the_library_dispatches(target: str, runtime: str) -> None:
    """Built for the CPU features every target has (the last one's CPU must run it too), with
    OpenCL where any target has it: for the richest target it died of SIGILL on an older CPU."""
    import halide as hl

    assert parse_target(target).runtime_target() == hl.Target(runtime)


def test_the_dispatch_checks_arm_fp16_and_code_runs_only_on_its_os() -> None:
    """Halide's dispatch checks arm_fp16 (a list that falls back from it to plain ARM code was
    refused as naming only unchecked features); code for Android x86-64 does not run on Linux
    x86-64 (runs_here compared the CPU and not the OS)."""
    import halide as hl

    from rt3d_halide.targets import runs_here

    assert len(parse_target("arm-64-android-arm_fp16,arm-64-android").targets) == 2
    assert not runs_here(hl.Target("x86-64-android"))


def test_missing_cpu_features_follow_halides_implications_and_spelling() -> None:
    import halide as hl

    from rt3d_halide.targets import missing_cpu_features

    sapphire_rapids = hl.Target(
        "x86-64-linux-avx-avx2-avx512-avx512_skylake-avx512_cannonlake-avx512_sapphirerapids-"
        "f16c-fma-sse41"
    )
    assert missing_cpu_features(hl.Target("x86-64-linux-avx512_zen4"), sapphire_rapids) == []
    zen3 = hl.Target("x86-64-linux-avx-avx2-f16c-fma-sse41")
    assert missing_cpu_features(hl.Target("x86-64-linux-avx512_zen4"), zen3) == ["avx512_zen4"]
    arm = hl.Target("arm-64-linux-arm_dot_prod-arm_fp16")
    assert missing_cpu_features(arm, hl.Target("arm-64-linux")) == ["arm_dot_prod", "arm_fp16"]


@pytest.mark.parametrize(
    ("target", "falls_back"),
    [
        ("host-opencl,host", True),
        ("arm-64-android-opencl,arm-64-android", True),
        ("host-opencl", False),
        ("host", False),
    ],
)
def test_which_target_lists_can_fall_back_from_opencl(target: str, falls_back: bool) -> None:
    assert parse_target(target).falls_back_from_opencl == falls_back


@pytest.mark.parametrize(
    ("target", "never_runs", "shadowing"),
    [
        # The CPU target, first, always wins the dispatch.
        ("host,host-opencl", "host-opencl", "host"),
        ("arm-64-android,arm-64-android-opencl", "arm-64-android-opencl", "arm-64-android"),
        (
            "x86-64-linux,x86-64-linux-avx2-fma-f16c-sse41",
            "x86-64-linux-avx2-fma-f16c-sse41",
            "x86-64-linux",
        ),
        # Implications count: every CPU that runs AVX-512 code runs AVX2, FMA and F16C code.
        (
            "x86-64-linux-avx2-fma-f16c-sse41,x86-64-linux-avx512_skylake",
            "x86-64-linux-avx512_skylake",
            "x86-64-linux-avx2-fma-f16c-sse41",
        ),
        # The dispatch does not check avxvnni or the Zen flavours: the first target is taken
        # wherever its checked features are.
        ("x86-64-linux-avx2-avxvnni,x86-64-linux-avx2", "x86-64-linux-avx2", r"[^']*avxvnni"),
        ("x86-64-linux-avx512_zen4,x86-64-linux-avx2", "x86-64-linux-avx2", r"[^']*zen4"),
        (
            "x86-64-linux-avx512_zen5-avx512_skylake,x86-64-linux-avx512_zen4-avx512_skylake",
            "x86-64-linux-avx512_zen4-avx512_skylake",
            r"[^']*zen5[^']*",
        ),
        # OpenCL targets shadow no CPU target only in a list that falls back to the CPU.
        ("x86-64-linux-avx2,x86-64-linux-opencl,x86-64-linux", "x86-64-linux", r"[^']*opencl"),
        (
            "arm-64-android-opencl,arm-64-android-opencl-cl_half,arm-64-android",
            "arm-64-android-opencl-cl_half",
            "arm-64-android-opencl",
        ),
    ],
)
def test_a_target_the_dispatch_never_reaches_is_refused(
    target: str, never_runs: str, shadowing: str
) -> None:
    """Halide runs the first target whose checked CPU features the device has; an OpenCL
    target ahead of its CPU fallback is the one pair the library can be told to skip."""
    from rt3d_halide.errors import BuildError

    pattern = f"target '{never_runs}' would never run: .*'{shadowing}', listed before it"
    with pytest.raises(BuildError, match=pattern):
        parse_target(target)


def test_a_target_naming_only_unchecked_features_is_told_what_to_add() -> None:
    from rt3d_halide.errors import BuildError

    with pytest.raises(BuildError, match=r"does not check avx512_zen4: name what it implies too"):
        parse_target("x86-64-linux-avx512_zen4-avx2-fma-f16c-sse41,x86-64-linux-avx2")
    assert parse_target("x86-64-linux-avx512_zen4-avx512_skylake,x86-64-linux-avx2").targets


def test_fallback_header_only_where_opencl_comes_first_and_cpu_last(
    host_build: Path, android_gpu_build: Path, multi_build: Path
) -> None:
    for build_dir, carried in (
        (host_build, False),
        (android_gpu_build, False),
        (multi_build, True),
    ):
        assert (build_dir / "include" / "rt3d_opencl_fallback.h").exists() == carried
        assert ("opencl_fallback_header" in _manifest(build_dir)) == carried
        header = (build_dir / "include" / f"{MODEL}.h").read_text()
        assert ('include "rt3d_opencl_fallback.h"' in header) == carried


def test_header_gives_each_functions_halide_extents_and_tensors(host_build: Path) -> None:
    """A C caller sets Halide extents innermost first: the header gives them per argument,
    with the ONNX tensors the function reads and writes."""
    header = (host_build / "include" / f"{MODEL}.h").read_text()
    for fn in _manifest(host_build)["functions"]:
        block = header[: header.index(f"int {fn['name']}(")].rsplit("/*", 1)[1]
        tensors = f"tensors {fn['input']['onnx_tensor']} -> {fn['output']['onnx_tensor']}"
        assert tensors in block
        for side in ("input", "output"):
            n, t, h, w, c = fn[side]["shape"]
            assert f"{side:<6} (C, W, H, T, N) = ({c}, {w}, {h}, {t}, {n})" in block


def test_aarch64_program_runs_under_qemu(arm_linux_build: Path, tmp_path: Path) -> None:
    exe = link_runner(arm_linux_build, tmp_path, cross=True)
    for node, fn in zip(NODES, FUNCTIONS, strict=True):
        x = _input(node, seed=4)
        ref = _reference(node, x)
        out = _run_runner(exe, fn, x, ref.shape, tmp_path, qemu=True)
        assert_matches(out, ref, CASES[node], "arm program")


def test_android_library_links_with_aarch64_gxx_and_runs(
    android_build: Path, arm_linux_build: Path, tmp_path: Path
) -> None:
    """The arm-64-android library itself, linked by a glibc cross g++ (the arm-64-linux runtime
    stands in for the Android one, whose logging needs bionic) and run under qemu."""
    combo = tmp_path / "combo"
    shutil.copytree(android_build, combo)
    shutil.copy2(arm_linux_build / "lib" / "libhalide_runtime.a", combo / "lib")
    exe = link_runner(combo, tmp_path, cross=True)
    assert elf_machine(exe.read_bytes()) == EM_AARCH64
    x = _input("conv_a", seed=5)
    ref = _reference("conv_a", x)
    out = _run_runner(exe, "two_conv_a", x, ref.shape, tmp_path, qemu=True)
    assert_matches(out, ref, CASES["conv_a"], "android program")


# C++14: the package itself must raise it to the C++17 that Halide's runtime header needs.
CMAKE_LISTS = """\
cmake_minimum_required(VERSION 3.16)
project(rt3d_app CXX)
set(CMAKE_CXX_STANDARD 14)
find_package({model} CONFIG REQUIRED)
add_executable(app main.cpp)
target_link_libraries(app PRIVATE {model}::{model})
"""
# What the Android NDK's toolchain file does to find_package: a cross sysroot, and packages
# looked up inside it only, so that CMAKE_PREFIX_PATH misses a build outside it.
AARCH64_TOOLCHAIN = """\
set(CMAKE_SYSTEM_NAME Linux)
{processor}set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
"""

CMAKE_MAIN = """\
#include <cstdio>
#include <cstdlib>
#include "HalideBuffer.h"
#include "{model}.h"
// Halide's default handler aborts; an app that wants error codes installs its own.
static void on_error(void *, const char *msg) {{ std::fprintf(stderr, "halide: %s\\n", msg); }}
int main() {{
    halide_set_error_handler(on_error);
    // numpy (N, T, H, W, C) = (1, 4, 6, 6, 8) is Halide (c, x, y, t, n).
    Halide::Runtime::Buffer<float> in(8, 6, 6, 4, 1), out(4, 2, 2, 4, 1);
    in.for_each_element([&](int c, int x, int y, int t, int n) {{
        in(c, x, y, t, n) = 0.01f * (c + 2 * x - y + 3 * t);
    }});
    int err = two_conv_b(in, out);
    if (err) return 10;
    double sum = 0;
    out.for_each_value([&](float v) {{ sum += v; }});
    std::printf("%.6f\\n", sum);
    Halide::Runtime::Buffer<float> bad(7, 6, 6, 4, 1);
    if (two_conv_b(bad, out) == 0) return 11;  // a wrong shape is an error code, not a crash
    // Clip 1 of a batch of 3, in place, as README says: the output's batch starts where the
    // input's does.
    Halide::Runtime::Buffer<float> batch(8, 6, 6, 4, 3), outs(4, 2, 2, 4, 3);
    batch.for_each_element([&](int c, int x, int y, int t, int n) {{
        batch(c, x, y, t, n) = 0.01f * (c - x + 2 * y - t + 5 * n);
    }});
    if (two_conv_b(batch, outs)) return 12;
    Halide::Runtime::Buffer<float> again(4, 2, 2, 4, 3), one(4, 2, 2, 4, 1);
    again.fill(-7.0f);
    if (two_conv_b(batch.cropped(4, 1, 1), again.cropped(4, 1, 1))) return 13;
    if (two_conv_b(batch.cropped(4, 1, 1), one) != -4) return 14;  // starting elsewhere
    again.for_each_element([&](int c, int x, int y, int t, int n) {{
        if (again(c, x, y, t, n) != (n == 1 ? outs(c, x, y, t, 1) : -7.0f)) std::exit(15);
    }});
    // A buffer with no memory is an error (no bounds query), beside a real one too.
    one.fill(-7.0f);
    Halide::Runtime::Buffer<float> none_in(nullptr, 8, 6, 6, 4, 1);
    Halide::Runtime::Buffer<float> none_out(nullptr, 4, 2, 2, 4, 1);
    if (two_conv_b(none_in, one) != -34 || one(0, 0, 0, 0, 0) != -7.0f) return 16;
    if (two_conv_b(in, none_out) != -34 || two_conv_b(none_in, none_out) != -34) return 17;
    return 0;
}}
"""


def _cmake_app(work: Path, *configure: str) -> subprocess.CompletedProcess:
    """Configures (``configure``: how to find the package) and builds the app of CMAKE_LISTS;
    the first failing step's process, else the build's."""
    src, bld = work / "app", work / "app-build"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(CMAKE_LISTS.format(model=MODEL))
    (src / "main.cpp").write_text(CMAKE_MAIN.format(model=MODEL))
    for cmd in (
        ["cmake", "-S", str(src), "-B", str(bld), *configure],
        ["cmake", "--build", str(bld)],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)
        if proc.returncode != 0:
            break
    return proc


def _check_app_output(proc: subprocess.CompletedProcess, host_model) -> None:
    assert proc.returncode == 0, f"app exited {proc.returncode}: {proc.stderr}"
    assert "halide: " in proc.stderr  # the wrong-shape call reached the app's handler
    t, h, w = np.meshgrid(np.arange(4), np.arange(6), np.arange(6), indexing="ij")
    c = np.arange(8)
    x = 0.01 * (c + 2 * w[..., None] - h[..., None] + 3 * t[..., None])
    expected = host_model["conv_b"](x[None].astype(np.float32)).astype(np.float64).sum()
    assert float(proc.stdout) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_cmake_find_package_links_and_runs(host_build: Path, host_model, tmp_path: Path) -> None:
    require_tools("cmake", "g++")
    proc = _cmake_app(tmp_path, f"-DCMAKE_PREFIX_PATH={host_build}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    app = tmp_path / "app-build" / "app"
    _check_app_output(subprocess.run([str(app)], capture_output=True, text=True), host_model)


@pytest.mark.parametrize("processor", ["set(CMAKE_SYSTEM_PROCESSOR aarch64)\n", ""])
def test_cmake_cross_build_finds_the_package_by_its_dir_and_runs(
    arm_linux_build: Path, host_model, tmp_path: Path, processor: str
) -> None:
    """README's form for the NDK's toolchain: ``-D<model>_DIR``, with packages looked up in
    the sysroot only; the app then runs under qemu with the host's results. A toolchain file
    that names no processor is not refused for it."""
    require_tools("cmake", "aarch64-linux-gnu-g++", "qemu-aarch64")
    (tmp_path / "aarch64.cmake").write_text(AARCH64_TOOLCHAIN.format(processor=processor))
    toolchain = f"-DCMAKE_TOOLCHAIN_FILE={tmp_path / 'aarch64.cmake'}"
    package = arm_linux_build / "lib" / "cmake" / MODEL
    proc = _cmake_app(tmp_path, toolchain, f"-D{MODEL}_DIR={package}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    qemu = [shutil.which("qemu-aarch64"), "-L", AARCH64_SYSROOT, str(tmp_path / "app-build/app")]
    _check_app_output(subprocess.run(qemu, capture_output=True, text=True), host_model)


def test_cmake_refuses_a_build_for_another_platform(android_build: Path, tmp_path: Path) -> None:
    """An Android AArch64 build found from a project for this Linux x86-64 machine: refused
    by find_package with both platforms named, not by the linker later."""
    require_tools("cmake", "g++")
    proc = _cmake_app(tmp_path, f"-DCMAKE_PREFIX_PATH={android_build}")
    said = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0
    assert "this build holds Android AArch64 code (target arm-64-android)" in said, said
    assert f"this project builds for Linux on {platform.machine()}" in said, said


def test_cmake_refuses_a_build_for_another_cpu_of_this_os(
    arm_linux_build: Path, tmp_path: Path
) -> None:
    """A Linux AArch64 build found from a project for this Linux x86-64 machine: the same OS,
    so only the processor check can refuse it (a check that took either mismatch, or none,
    let it through to the linker)."""
    require_tools("cmake", "g++")
    if platform.machine() != "x86_64":
        pytest.skip("the project must be for another CPU than the build's AArch64")
    proc = _cmake_app(tmp_path, f"-DCMAKE_PREFIX_PATH={arm_linux_build}")
    said = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0
    assert "this build holds Linux AArch64 code (target arm-64-linux)" in said, said
    assert "this project builds for Linux on x86_64" in said, said


# ---------------------------------------------------------------- host runtime


def test_lookup_by_node_and_function_name(host_model) -> None:
    assert list(host_model) == list(FUNCTIONS) and len(host_model) == 2
    for node, fn in zip(NODES, FUNCTIONS, strict=True):
        assert host_model[node] is host_model[fn]
        assert host_model[fn].node == node and host_model[node].name == fn
        assert node in host_model and fn in host_model
    assert list(host_model.keys()) == list(FUNCTIONS)
    assert [fn.name for _, fn in host_model.items()] == list(FUNCTIONS)
    for unknown in ("conv_c", "two", "", "two_conv_a "):
        assert unknown not in host_model
        with pytest.raises(KeyError, match="not a function or ONNX node"):
            host_model[unknown]


def test_a_loaded_model_says_what_it_is(host_model, host_build: Path) -> None:
    manifest = _manifest(host_build)
    ops = len(manifest["host_ops"])
    assert repr(host_model) == (
        f"<{MODEL} built for host from {host_build}: {len(FUNCTIONS)} functions, "
        f"{ops} host op{'' if ops == 1 else 's'}>"
    )


def test_loaded_model_names_its_shared_object(host_model) -> None:
    """Profilers see the generated code under this file's name (bench/kernel_profile.py)."""
    so = host_model.shared_object
    assert so.suffix == ".so" and so.is_file()
    assert so.name in Path(f"/proc/{os.getpid()}/maps").read_text()
    for fn in FUNCTIONS:
        assert fn.encode() in so.read_bytes()


def test_a_copy_with_another_runtime_links_its_own_shared_object(
    host_model, tmp_path: Path
) -> None:
    """The linked .so is named by both archives: a copy of the build with another runtime
    archive was served the .so linked from the first one's runtime."""
    require_tools("cc", "ar")
    copy = tmp_path / "build"
    shutil.copytree(host_model.build_dir, copy)
    (tmp_path / "extra.c").write_text("int rt3d_test_extra(void) { return 1; }\n")
    obj = tmp_path / "extra.o"
    subprocess.run(["cc", "-c", str(tmp_path / "extra.c"), "-o", str(obj)], check=True)
    subprocess.run(["ar", "q", str(copy / _manifest(copy)["runtime"]), str(obj)], check=True)
    assert rt3d_halide.load(copy).shared_object != host_model.shared_object


def test_runtime_matches_reference_with_batch_of_3(host_model) -> None:
    for node in NODES:
        x = _input(node, batch=3, seed=7)
        ref = _reference(node, x)
        out = host_model[node](x, out=np.full(ref.shape, np.nan, np.float32))
        assert out.dtype == np.float32
        assert_matches(out, ref, CASES[node], "x86")
        for i in range(3):
            np.testing.assert_allclose(host_model[node](x[i : i + 1])[0], out[i], rtol=1e-6)


def test_runtime_out_argument_is_written(host_model) -> None:
    x = _input("conv_b", batch=2)
    out = np.full((2, 4, 2, 2, 4), np.nan, np.float32)
    result = host_model["conv_b"](x, out=out)
    assert result is out
    assert_matches(out, _reference("conv_b", x), CASES["conv_b"], "x86")


@pytest.mark.parametrize("node", NODES)  # sparse and dense code
def test_the_library_itself_refuses_buffers_that_do_not_fit(host_model, node) -> None:
    """The Python runtime checks shapes first; a C caller has only the library's own
    constraints: an output of fewer clips than the input, or an input of another channel
    count (read with the wrong strides), computed without a word."""
    fn = host_model[node]
    x = _input(node, batch=2)
    out = np.full(fn(x[:1]).shape, np.nan, np.float32)
    with pytest.raises(rt3d_halide.HalideCallError, match="beyond the max"):
        host_model._invoke(fn, x, out)
    wider = np.concatenate([x[:1], x[:1, ..., :1]], axis=-1)
    with pytest.raises(rt3d_halide.HalideCallError, match=r"Constraint violated: input\.extent\.0"):
        host_model._invoke(fn, wider, out)


def test_thread_count_is_set_and_results_do_not_change(host_model) -> None:
    x = _input("conv_b", batch=2)
    before = host_model["conv_b"](x)
    previous = host_model.set_num_threads(np.int64(1))
    try:
        assert host_model.set_num_threads(1) == 1
        assert host_model.set_num_threads(0) == 1  # 0 is taken: one worker per CPU
        cpus = int(os.environ.get("HL_NUM_THREADS", 0)) or os.cpu_count()
        assert host_model.set_num_threads(1) == cpus  # what 0 set
        np.testing.assert_array_equal(host_model["conv_b"](x), before)
        host_model.set_num_threads(1000)  # more than the runtime takes: it uses 256
        assert host_model.set_num_threads(1) == 256
        for bad in (-1, 2**40, 1.5, True):
            with pytest.raises(ValueError, match="threads must be an integer in"):
                host_model.set_num_threads(bad)
    finally:
        host_model.set_num_threads(previous)


def test_threads_loading_one_unlinked_build_at_once(workspace, tmp_path: Path) -> None:
    """Each link writes its own temporary file (a shared name lost loads to FileNotFoundError)."""
    build_dir = _build(workspace, "host")
    for stale in (Path(cache_root()) / "host").glob("*.so"):
        stale.unlink()
    errors: list[BaseException] = []

    def load() -> None:
        try:
            rt3d_halide.load(build_dir)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    (so,) = (Path(cache_root()) / "host").glob("*")  # no temporary left
    assert so.stat().st_mode & 0o777 == default_mode()  # as cc makes it: a shared cache


def test_a_compiler_that_cannot_run_is_a_clear_error(workspace, monkeypatch) -> None:
    build_dir = _build(workspace, "host")
    cache = Path(cache_root()) / "host"
    for stale in cache.glob("*"):
        stale.unlink()
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.raises(RuntimeError, match="cannot run /nonexistent/cc"):
        rt3d_halide.load(build_dir)
    assert list(cache.glob("*")) == []


def test_a_linked_build_loads_without_a_compiler(workspace, monkeypatch) -> None:
    """The linked object is cached: where no compiler is left, a build linked before by the
    default cc loads (the compiler's absence is said only when it has to link)."""
    from rt3d_halide import runtime

    build_dir = _build(workspace, "host")
    monkeypatch.delenv("CC", raising=False)
    linked = rt3d_halide.load(build_dir).shared_object
    monkeypatch.setattr(runtime.shutil, "which", lambda _name: None)
    assert rt3d_halide.load(build_dir).shared_object == linked
    linked.unlink()
    with pytest.raises(RuntimeError, match="needs a C compiler"):
        rt3d_halide.load(build_dir)


def test_a_compiler_given_with_arguments_links(workspace, monkeypatch) -> None:
    """CC may hold arguments, as make and Python's sysconfig take it (``ccache cc``): it was
    run as one program name ("cannot run env cc")."""
    build_dir = _build(workspace, "host")
    for stale in (Path(cache_root()) / "host").glob("*"):
        stale.unlink()
    monkeypatch.setenv("CC", "env cc")
    model = rt3d_halide.load(build_dir)
    x = _input("conv_a")
    np.testing.assert_allclose(model["conv_a"](x), _reference("conv_a", x), rtol=1e-4, atol=1e-4)
    # Other flags, another link: the cache does not hand back the object linked without them.
    monkeypatch.setenv("CC", "env cc -Wl,-O1")
    assert rt3d_halide.load(build_dir).shared_object != model.shared_object
    monkeypatch.setenv("CC", "cc '-O1")
    with pytest.raises(RuntimeError, match=r"CC=\"cc '-O1\" does not read as a command"):
        rt3d_halide.load(build_dir)


def test_a_model_name_as_long_as_the_build_takes_loads(workspace, tmp_path: Path) -> None:
    """The linked library's file name held the model's whole name and a digest: a name of 230
    characters, which the build takes, made a load fail ("File name too long")."""
    _, model = workspace
    name = "m" * 230
    loaded = rt3d_halide.load(build(model, "host", tmp_path / "build", name=name, quiet=True))
    x = _input("conv_a")
    np.testing.assert_allclose(
        loaded[f"{name}_conv_a"](x), _reference("conv_a", x), rtol=1e-4, atol=1e-4
    )


def test_a_node_name_two_convs_share_names_neither(tmp_path: Path, monkeypatch) -> None:
    """ONNX node names need not be unique: looked up by one two convs shared, the model gave
    the last of them, silently."""
    model = F.two_conv_model(cin=3)
    for node in model.graph.node:
        if node.op_type == "Conv":
            node.name = "conv"
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    path = F.save(model, tmp_path / "dup.onnx")
    loaded = rt3d_halide.load(build(path, "host", tmp_path / "build", jobs=1, quiet=True))
    names = list(loaded)
    assert len(names) == 2 and "conv" not in loaded
    with pytest.raises(KeyError, match=rf"2 ONNX nodes have this name.*{names[0]}, {names[1]}"):
        loaded["conv"]
    assert [loaded[name].node for name in names] == ["conv", "conv"]


def test_runtime_accepts_non_contiguous_input(host_model) -> None:
    x = _input("conv_a", batch=2)
    view = x[:, :, ::-1, :, :]
    np.testing.assert_array_equal(host_model["conv_a"](view), host_model["conv_a"](view.copy()))


def test_runtime_takes_arrays_whose_length_1_axes_have_any_stride(host_model) -> None:
    """numpy calls ``clip[None]`` (batch stride 0) and every-other-clip views of one clip
    C-contiguous: the same results as a fresh array, written where the view points."""
    x = _input("conv_a", batch=2)
    expected = host_model["conv_a"](x[:1].copy())
    np.testing.assert_array_equal(host_model["conv_a"](x[0][None]), expected)
    np.testing.assert_array_equal(host_model["conv_a"](x[::2]), expected)
    both = np.full((2, *expected.shape[1:]), np.nan, np.float32)
    host_model["conv_a"](x[0][None], out=both[::2])
    np.testing.assert_array_equal(both[0], expected[0])
    assert np.isnan(both[1]).all()


SHAPE = r"input must have shape \(N, T, H, W, C\) = \(1, 4, 6, 6, 3\)"


@pytest.mark.parametrize(
    ("make", "error", "pattern"),
    [
        (lambda: _input("conv_a").astype(np.float64), TypeError, "float32"),
        (lambda: _input("conv_a").astype(np.float16), TypeError, "float32"),
        (lambda: (_input("conv_a") * 10).astype(np.int32), TypeError, "float32"),
        (lambda: _input("conv_a").tolist(), TypeError, "numpy array"),
        (lambda: 3.0, TypeError, "numpy array"),
        (lambda: None, TypeError, "numpy array"),
        (lambda: _input("conv_a")[0], ValueError, "5-D"),
        (lambda: _input("conv_a")[None], ValueError, "5-D"),
        (lambda: np.zeros((1, 4, 6, 6, 4), np.float32), ValueError, SHAPE),
        (lambda: np.zeros((1, 4, 6, 6, 1), np.float32), ValueError, SHAPE),
        (lambda: np.zeros((1, 4, 6, 7, 3), np.float32), ValueError, SHAPE),
        (lambda: np.zeros((1, 3, 6, 6, 3), np.float32), ValueError, SHAPE),
        (lambda: np.zeros((1, 4, 60, 6, 3), np.float32), ValueError, SHAPE),
        (lambda: np.zeros((1, 3, 4, 6, 6), np.float32), ValueError, r"N, C, T, H, W array\?"),
        (lambda: np.zeros((0, 4, 6, 6, 3), np.float32), ValueError, "no sample"),
    ],
    ids=[
        "float64", "float16", "int32", "list", "scalar", "none", "4-D", "6-D",
        "4-channels", "1-channel", "width-7", "time-3", "height-60", "ncdhw", "batch-0",
    ],
)  # fmt: skip
def test_runtime_rejects_bad_input(host_model, make, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        host_model["conv_a"](make())
    # The interpreter and the library are still fine afterwards.
    x = _input("conv_a")
    assert relative_error(host_model["conv_a"](x), _reference("conv_a", x)) < 1e-4


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


@pytest.mark.parametrize(
    ("out", "error"),
    [
        (np.zeros((1, 4, 6, 6, 4), np.float32), ValueError),
        (np.zeros((2, 4, 6, 6, 8), np.float32), ValueError),
        (np.zeros((1, 4, 6, 6, 8), np.float64), TypeError),
        (np.zeros((1, 4, 6, 8, 6), np.float32).transpose(0, 1, 2, 4, 3), ValueError),
        (_read_only(np.zeros((1, 4, 6, 6, 8), np.float32)), ValueError),
    ],
    ids=["channels", "batch", "float64", "non-contiguous", "read-only"],
)
def test_runtime_rejects_bad_out(host_model, out, error) -> None:
    with pytest.raises(error):
        host_model["conv_a"](_input("conv_a"), out=out)


def test_runtime_out_must_not_overlap_the_input(host_model) -> None:
    """conv_a keeps its input's shape but for the channels: one buffer cut to both shapes."""
    storage = np.zeros(100 + 4 * 6 * 6 * 8, np.float32)
    x = storage[: 4 * 6 * 6 * 3].reshape(1, 4, 6, 6, 3)
    with pytest.raises(ValueError, match="overlap"):
        host_model["conv_a"](x, out=storage[100:].reshape(1, 4, 6, 6, 8))


def test_two_loads_of_one_build_keep_their_error_messages(workspace, host_model) -> None:
    """Both loads share the library and its error handler; freeing one leaves the other's
    calls and messages intact (its handler was freed with it, and the next error crashed)."""
    again = rt3d_halide.load(host_model.build_dir)
    del again
    gc.collect()
    # Past the Python checks (straight to the generated code): Halide's own shape check.
    wrong = np.zeros((1, 4, 6, 6, 5), np.float32)
    out = np.zeros((1, 4, 6, 6, 8), np.float32)
    with pytest.raises(rt3d_halide.HalideCallError, match=r"Halide error -?\d+: \S"):
        host_model._invoke(host_model["conv_a"], wrong, out)


def test_load_refuses_a_build_for_another_machine(android_build: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not run on this machine"):
        rt3d_halide.load(android_build)
    with pytest.raises(FileNotFoundError, match=r"manifest\.json"):
        rt3d_halide.load(tmp_path)


def test_load_refuses_code_for_cpu_features_this_machine_lacks(host_model, monkeypatch) -> None:
    """A host build made on a newer CPU: refused at load, not killed by SIGILL at the first call
    (here: this machine's build, on a pretended CPU with SSE4.1 only)."""
    import halide as hl

    monkeypatch.setattr(hl, "get_host_target", lambda: hl.Target("x86-64-linux-sse41"))
    with pytest.raises(ValueError, match=r"needs CPU features this machine lacks \(avx"):
        rt3d_halide.load(host_model.build_dir)


def test_load_takes_a_list_whose_last_target_runs_here(workspace, monkeypatch) -> None:
    """An AVX2 library that falls back to SSE4.1 code runs on an SSE4.1-only CPU (the dispatch
    takes the last target there): load checked the first target and refused it."""
    import halide as hl

    out = _build(workspace, "x86-64-linux-avx2-avx-f16c-fma-sse41,x86-64-linux-sse41")
    monkeypatch.setattr(hl, "get_host_target", lambda: hl.Target("x86-64-linux-sse41"))
    assert list(rt3d_halide.load(out)) == list(FUNCTIONS)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("{not json", "not a readable build manifest"),
        ('{"model": "m"}', r"not an rt3d_halide build manifest \(no 'target'\)"),
    ],
)
def test_load_names_a_broken_manifest(tmp_path: Path, text: str, pattern: str) -> None:
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match=rf"manifest\.json: {pattern}"):
        rt3d_halide.load(tmp_path)


def _renamed_first_function(manifest: dict) -> dict:
    first = {**manifest["functions"][0], "name": "two_conv_z"}
    return {**manifest, "functions": [first, *manifest["functions"][1:]]}


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (lambda m: {**m, "format": 99}, r"manifest format 99, this rt3d_halide reads \d+; rebuild"),
        (
            lambda m: {**m, "format": artifacts.MANIFEST_FORMAT - 1},
            rf"manifest format {artifacts.MANIFEST_FORMAT - 1}, this rt3d_halide reads",
        ),
        (lambda m: {**m, "halide_targets": []}, "lists no Halide target"),
        (_renamed_first_function, "names 'two_conv_z', which its library lacks"),
    ],
    ids=["newer-format", "older-format", "no-targets", "missing-function"],
)
def test_load_refuses_a_manifest_it_cannot_read(
    host_model, tmp_path: Path, change: Callable[[dict], dict], pattern: str
) -> None:
    copy = tmp_path / "build"
    shutil.copytree(host_model.build_dir, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(change(manifest)))
    with pytest.raises(ValueError, match=pattern):
        rt3d_halide.load(copy)


@pytest.mark.parametrize("key", ["library", "runtime"])
def test_load_names_a_missing_library(host_model, tmp_path: Path, key: str) -> None:
    copy = tmp_path / "build"
    shutil.copytree(host_model.build_dir, copy)
    (copy / host_model.manifest[key]).unlink()
    expected = rf"incomplete build, its {re.escape(host_model.manifest[key])} is missing"
    with pytest.raises(FileNotFoundError, match=expected):
        rt3d_halide.load(copy)


def test_built_model_takes_a_path_string_and_checks_it(host_model, android_build: Path) -> None:
    """``BuiltModel`` is public (the type ``load`` returns): built directly, it takes what
    ``load`` takes and checks the build the same way."""
    model = rt3d_halide.BuiltModel(str(host_model.build_dir))
    assert list(model) == list(host_model)
    with pytest.raises(ValueError, match="does not run on this machine"):
        rt3d_halide.BuiltModel(str(android_build))


def test_load_names_a_compile_cache_it_cannot_write(
    host_model, tmp_path: Path, monkeypatch
) -> None:
    """The linked library goes to the compile cache: a cache path that is a file is named."""
    cache = tmp_path / "cache"
    cache.write_text("")
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(cache))
    with pytest.raises(RuntimeError, match=rf"the compile cache {re.escape(str(cache))} cannot"):
        rt3d_halide.load(host_model.build_dir)


def _unaligned(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array one byte off its natural alignment."""
    raw = np.zeros(int(np.prod(shape)) * 4 + 1, np.uint8)
    array = raw[1:].view(np.float32).reshape(shape)
    assert not array.flags.aligned
    return array


def test_unaligned_arrays_are_copied_in_and_refused_out(host_model) -> None:
    """Halide assumes aligned floats: an unaligned input is copied (as a strided one is), an
    unaligned out, which must be written in place, is refused."""
    x = _input("conv_a")
    shifted = _unaligned(x.shape)
    shifted[...] = x
    out = np.full(host_model["conv_a"].output_shape(1), np.nan, np.float32)
    got = host_model["conv_a"](shifted, out=out)
    assert_matches(got, _reference("conv_a", x), CASES["conv_a"], "x86")
    with pytest.raises(ValueError, match="aligned"):
        host_model["conv_a"](x, out=_unaligned(out.shape))


def test_host_opencl_build_matches_host(workspace, host_model) -> None:
    require_opencl()
    gpu = rt3d_halide.load(_build(workspace, "host-opencl"))
    assert _manifest(gpu.build_dir)["target_families"] == ["opencl"]
    for node in NODES:
        x = _input(node, batch=2, seed=11)
        poisoned = np.full(host_model[node].output_shape(2), np.nan, np.float32)
        out = gpu[node](x, out=poisoned)
        assert not np.isnan(out).any()
        assert relative_error(out, host_model[node](x)) < 1e-5
        assert_matches(out, _reference(node, x), CASES[node], "opencl")


def test_an_opencl_call_frees_the_device_buffers_of_its_input_and_output(
    workspace, monkeypatch
) -> None:
    """The input's device copy was never freed: every call leaked it on the GPU."""
    require_opencl()
    gpu = rt3d_halide.load(_build(workspace, "host-opencl"))
    free = gpu._lib.halide_device_free
    freed: list[int] = []

    def spy(context: object, buf: object) -> int:
        freed.append(buf._obj.host)
        return free(context, buf)

    monkeypatch.setattr(gpu._lib, "halide_device_free", spy)
    x = _input("conv_b", batch=2)
    out = gpu["conv_b"](x)
    assert sorted(freed) == sorted([x.ctypes.data, out.ctypes.data])


def test_android_cmake_package_links_the_log_library_its_runtime_calls(android_build: Path) -> None:
    """The Android runtime prints through __android_log_print: the package's interface adds
    liblog on Android (an NDK app linking through CMake had to find that out itself)."""
    require_tools("nm")
    symbols = subprocess.run(
        ["nm", "-u", str(android_build / "lib" / "libhalide_runtime.a")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "__android_log_print" in symbols
    config = (android_build / "lib" / "cmake" / MODEL / f"{MODEL}Config.cmake").read_text()
    assert "$<$<PLATFORM_ID:Android>:log>" in config


FALLBACK_UNIT = """#include "rt3d_opencl_fallback.h"
void install_{name}(void) {{ rt3d_fall_back_without_opencl(); }}
"""
FALLBACK_MAIN = """#include <stdio.h>
#include "two.h"
void install_a(void);
void install_b(void);
int main(void) {{
    static float in[4 * 6 * 6 * 3], out[4 * 6 * 6 * 8];
    halide_dimension_t din[5] = {{{{0, 3, 1, 0}}, {{0, 6, 3, 0}}, {{0, 6, 18, 0}},
                                 {{0, 4, 108, 0}}, {{0, 1, 432, 0}}}};
    halide_dimension_t dout[5] = {{{{0, 8, 1, 0}}, {{0, 6, 8, 0}}, {{0, 6, 48, 0}},
                                  {{0, 4, 288, 0}}, {{0, 1, 1152, 0}}}};
    halide_buffer_t a = {{0}}, b = {{0}};
    a.host = (uint8_t *)in; a.type.code = halide_type_float; a.type.bits = 32; a.type.lanes = 1;
    a.dimensions = 5; a.dim = din;
    b.host = (uint8_t *)out; b.type = a.type; b.dimensions = 5; b.dim = dout;
    install_a(); install_b(); install_a();  /* {calls} */
    printf("%d\\n", two_conv_a(&a, &b));
    return 0;
}}
"""


def test_fallback_installed_from_two_source_files_runs_the_cpu_code(
    workspace, tmp_path: Path
) -> None:
    """Two files of one C program install the fallback, in turn: the second and third calls do
    nothing (each file's hook had chained to the other's: the first layer call never returned),
    and the header builds as pedantic C11."""
    require_tools("cc")
    multi = _build(workspace, "host-opencl,host")
    for name in ("a", "b"):
        (tmp_path / f"tu_{name}.c").write_text(FALLBACK_UNIT.format(name=name))
    (tmp_path / "main.c").write_text(FALLBACK_MAIN.format(calls="A, B, A again"))
    exe = tmp_path / "app"
    subprocess.run(
        ["cc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", f"-I{multi / 'include'}",
         *(str(tmp_path / f) for f in ("main.c", "tu_a.c", "tu_b.c")),
         str(multi / "lib" / f"lib{MODEL}.a"), str(multi / "lib" / "libhalide_runtime.a"),
         "-lpthread", "-ldl", "-lm", "-o", str(exe)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (tmp_path / "no_icds").mkdir()
    env = {**os.environ, "OCL_ICD_VENDORS": str(tmp_path / "no_icds")}
    proc = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "0", proc.stdout + proc.stderr


CROPPED_OPENCL_MAIN = """\
#include <cstdio>
#include "HalideBuffer.h"
#include "{model}.h"
using Halide::Runtime::Buffer;
int main() {{
    Buffer<float> in(8, 6, 6, 4, 3), whole(4, 2, 2, 4, 3), out(4, 2, 2, 4, 3);
    in.for_each_element([&](int c, int x, int y, int t, int n) {{
        in(c, x, y, t, n) = 0.01f * (c + x - 2 * y + t + 7 * n);
    }});
    in.set_host_dirty();
    if (two_conv_b(in, whole)) return 2;
    whole.copy_to_host();
    out.fill(-7.0f);
    {{
        auto in_k = in.cropped(4, 1, 2), out_k = out.cropped(4, 1, 2);
        if (two_conv_b(in_k, out_k)) return 3;
        out_k.copy_to_host();  // the crop holds the GPU's copy
    }}
    int wrong = 0;
    out.for_each_element([&](int c, int x, int y, int t, int n) {{
        wrong += out(c, x, y, t, n) != (n ? whole(c, x, y, t, n) : -7.0f);
    }});
    std::printf("%d\\n", wrong);
    return 0;
}}
"""


def test_a_cropped_batch_runs_in_place_on_opencl(workspace, tmp_path: Path) -> None:
    """Clips 1 and 2 of 3 through crops, as README shows for OpenCL (copied back from the crop),
    on PoCL: the same as the whole batch's, clip 0 untouched."""
    require_opencl()
    require_tools("g++")
    build_dir = _build(workspace, "host-opencl")
    (tmp_path / "main.cpp").write_text(CROPPED_OPENCL_MAIN.format(model=MODEL))
    exe = tmp_path / "app"
    subprocess.run(
        ["g++", "-std=c++17", f"-I{build_dir / 'include'}", str(tmp_path / "main.cpp"),
         str(build_dir / "lib" / f"lib{MODEL}.a"), str(build_dir / "lib" / "libhalide_runtime.a"),
         "-lpthread", "-ldl", "-o", str(exe)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    proc = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "0", proc.stdout + proc.stderr


def _archives_defining_helper(tmp_path: Path, weak: tuple[bool, bool]) -> list[Path]:
    """Two archives whose objects each define ``helper`` (weak or strong, per ``weak``) and
    a function of their own that calls it."""
    libs = []
    for name, is_weak in zip(("one", "two"), weak, strict=True):
        attribute = "__attribute__((weak)) " if is_weak else ""
        (tmp_path / f"{name}.c").write_text(
            f"{attribute}int helper(void) {{ return {len(name)}; }}\n"
            f"int {name}(void) {{ return helper(); }}\n"
        )
        obj, lib = tmp_path / f"{name}.o", tmp_path / f"lib{name}.a"
        subprocess.run(["cc", "-c", str(tmp_path / f"{name}.c"), "-o", str(obj)], check=True)
        subprocess.run(["ar", "rcs", str(lib), str(obj)], check=True)
        libs.append(lib)
    return libs


@pytest.mark.parametrize("weak", [(False, False), (True, False), (False, True)])
def test_merging_refuses_a_symbol_defined_twice(tmp_path: Path, weak) -> None:
    """The linker would take either definition without a word; a weak one beside a strong one
    too (from an archive, the member that holds the strong one may never be pulled in)."""
    require_tools("cc", "ar")
    from rt3d_halide.archive import merge_archives

    libs = _archives_defining_helper(tmp_path, weak)
    with pytest.raises(ValueError, match="symbol helper defined twice"):
        merge_archives(libs, tmp_path / "merged.a")


def test_merging_keeps_weak_symbols_defined_in_every_member(tmp_path: Path) -> None:
    """Halide's profiling code defines its helpers weak in each pipeline's object."""
    require_tools("cc", "ar")
    from rt3d_halide.archive import merge_archives

    libs = _archives_defining_helper(tmp_path, (True, True))
    merge_archives(libs, tmp_path / "libmerged.a")
    (tmp_path / "main.c").write_text(
        "int one(void);\nint two(void);\nint main(void) { return one() == two() ? 0 : 1; }\n"
    )
    exe = tmp_path / "main"
    subprocess.run(
        ["cc", str(tmp_path / "main.c"), str(tmp_path / "libmerged.a"), "-o", str(exe)], check=True
    )
    assert subprocess.run([str(exe)]).returncode == 0


def test_merging_pads_a_symbol_index_of_odd_length(tmp_path: Path) -> None:
    """An archive's members start at even offsets: an odd-length symbol index without its
    padding byte put every member one byte off its offset in the index (the tests' indexes
    happened to be even)."""
    require_tools("cc", "ar", "nm")
    from rt3d_halide.archive import merge_archives

    libs, objects = [], {}
    for name in ("f", "gh"):  # index body: 4 + 2 * 4 + len("f\0gh\0") = 17 bytes
        (tmp_path / f"{name}.c").write_text(f"int {name}(void) {{ return {len(name)}; }}\n")
        obj, lib = tmp_path / f"{name}.o", tmp_path / f"lib{name}.a"
        subprocess.run(["cc", "-c", str(tmp_path / f"{name}.c"), "-o", str(obj)], check=True)
        subprocess.run(["ar", "rcs", str(lib), str(obj)], check=True)
        libs.append(lib)
        objects[obj.name] = obj.read_bytes()
    merge_archives(libs, tmp_path / "libmerged.a")
    members, by_member = _members(tmp_path / "libmerged.a")
    assert dict(members) == objects
    assert sorted(s for symbols in by_member.values() for s in symbols) == [b"f", b"gh"]
    proc = subprocess.run(["nm", "-s", str(tmp_path / "libmerged.a")], capture_output=True)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr


def test_merging_an_archive_cut_at_a_members_end_names_it(tmp_path: Path) -> None:
    """Every header whole, the symbol index names a member the cut took: a bare KeyError."""
    require_tools("cc", "ar")
    from rt3d_halide.archive import merge_archives

    lib = _archives_defining_helper(tmp_path, (False, False))[0]
    data = lib.read_bytes()
    size = int(data[8 + 48 : 8 + 58])  # the symbol index's, the first member
    lib.write_bytes(data[: 8 + 60 + size + (size & 1)])
    with pytest.raises(ValueError, match=r"libone\.a: its symbol index names a member at byte"):
        merge_archives([lib], tmp_path / "merged.a")


def test_a_profiled_build_of_two_layers_reports_each(workspace) -> None:
    """Target feature "profile": every layer's object defines the profiler's helpers (weak);
    the merged library used to be refused for it."""
    out = _build(workspace, "host-profile")
    script = (
        "import numpy as np, rt3d_halide, sys\n"
        f"model = rt3d_halide.load({str(out)!r})\n"
        "x = np.ones((1, 4, 6, 6, 3), np.float32)\n"
        "model['two_conv_b'](model['two_conv_a'](x))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    report = proc.stdout + proc.stderr
    assert all(f"{fn}\n total time:" in report for fn in FUNCTIONS), report


def test_a_layer_name_past_the_file_systems_limit_builds_and_runs(tmp_path: Path) -> None:
    """A 250-character node name made file names Halide could not write (a traceback ending in
    'File name too long'); the function keeps its whole name."""
    onnx_model = F.one_conv_model(F.conv_weight(4, 3), [1, 3, 4, 6, 6], {"pads": [1] * 6})
    onnx_model.graph.node[0].name = "n" * 250
    model = F.save(onnx_model, tmp_path / "m.onnx")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
        build(model, "host-opencl,host", tmp_path / "out", name="long", jobs=1, quiet=True)
        build(model, "host", tmp_path / "host", name="long", jobs=1, quiet=True)
    (fn,) = _manifest(tmp_path / "out")["functions"]
    assert fn["name"] == "long_" + "n" * 250
    assert fn["name"] in (tmp_path / "out" / "include" / "long.h").read_text()
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 6, 3)).astype(np.float32)
    out = rt3d_halide.load(tmp_path / "host")["n" * 250](x)
    case = ConvCase(3, 4, (4, 6, 6), pads_begin=(1, 1, 1), pads_end=(1, 1, 1), bias=False)
    assert_matches(out, reference(case, x, F.conv_weight(4, 3), None), case, "x86")


def test_a_long_name_builds_for_a_list_of_long_targets(tmp_path: Path) -> None:
    """Halide names a list's objects ``<base>.a-<target>.o``: with an AVX-512 host spelled out
    and four features beside an 80-character base they passed 255 bytes ('File name too
    long'). Spelled out here, so that the target is as long on any host (it is only built)."""
    onnx_model = F.one_conv_model(F.conv_weight(4, 3), [1, 3, 4, 6, 6])
    onnx_model.graph.node[0].name = "n" * 120
    model = F.save(onnx_model, tmp_path / "m.onnx")
    avx512 = "x86-64-linux-avx-avx2-avx512-avx512_cannonlake-avx512_skylake-f16c-fma-sse41"
    targets = f"{avx512}-profile-strict_float-large_buffers-trace_pipeline,x86-64-linux"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
        build(model, targets, tmp_path / "out", name="long", jobs=1, quiet=True, keep_assembly=True)
    (fn,) = _manifest(tmp_path / "out")["functions"]
    assert fn["name"] == "long_" + "n" * 120
    written = list((tmp_path / "out" / "asm").iterdir())
    assert len(written) == 2 and all(len(p.name.encode()) <= 255 for p in written)
    long_list = "x86-64-linux," + "x86-64-linux-" + "-".join(["profile"] * 60)
    assert len(LayerJob("g", "f" * 300, "{}", {}, long_list).file_base) == 12  # a digest alone
    single = LayerJob("g", "f" * 300, "{}", {}, long_list.split(",")[1])
    assert len(single.file_base) == 80  # one target's files take no target in their names


def test_header_survives_odd_node_names_and_case_only_model_names(tmp_path: Path) -> None:
    """A node named a*/b ended the header's comment early; models named Plain and plain shared
    one include guard, so the second header included declared nothing."""
    require_tools("cc")
    onnx_model = F.one_conv_model(F.conv_weight(4, 8), [1, 8, 4, 4, 4])
    onnx_model.graph.node[0].name = "a*/b/*c"
    model = F.save(onnx_model, tmp_path / "m.onnx")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
        for name in ("Plain", "plain"):
            build(model, "host", tmp_path / name, name=name, jobs=1, quiet=True)
    names = [_manifest(tmp_path / name)["functions"][0]["name"] for name in ("Plain", "plain")]
    (tmp_path / "use.c").write_text(
        '#include "Plain.h"\n#include "plain.h"\n'
        "int (*fns[])(struct halide_buffer_t *, struct halide_buffer_t *) = "
        f"{{{', '.join(names)}}};\n"
    )
    subprocess.run(
        ["cc", "-fsyntax-only", "-Wall", "-Werror", f"-I{tmp_path / 'Plain' / 'include'}",
         f"-I{tmp_path / 'plain' / 'include'}", str(tmp_path / "use.c")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip


def test_host_weights_are_aligned_little_endian_and_round_trip(tmp_path: Path) -> None:
    """Each tensor starts on a 64-byte boundary whatever the sizes before it, and reads back
    from the file by its index entry; no file where no host op reads a stored tensor."""
    tensors = {
        "a": np.arange(3, dtype=np.float32),
        "b": np.arange(5, dtype=np.int64).reshape(5, 1),
        "c": np.ones((2, 3), np.float32),
    }
    index = artifacts.write_host_weights(tmp_path, tensors)
    data = (tmp_path / index["file"]).read_bytes()
    assert index["byte_order"] == "little"
    for name, entry in index["tensors"].items():
        assert entry["offset"] % 64 == 0
        dtype = np.dtype(entry["dtype"]).newbyteorder("<")
        got = np.frombuffer(data[entry["offset"] : entry["offset"] + entry["bytes"]], dtype)
        np.testing.assert_array_equal(got.reshape(entry["shape"]), tensors[name])
    assert [e["offset"] for e in index["tensors"].values()] == [0, 64, 128]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert artifacts.write_host_weights(empty, {})["file"] is None
    assert not any(empty.iterdir())
