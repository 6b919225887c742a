"""One helper runs a Conv3d case end to end on a target family; every conv test is a call to it.

``check_conv(case, family)`` makes random weights and input, writes a one-Conv (+Relu) ONNX model,
builds it with the real build for the family's target, runs the generated code on NaN-poisoned
outputs (x86 and OpenCL in-process through :func:`rt3d_halide.load`, ARM cross-linked and run under
qemu-aarch64) and compares with torch's conv3d in float64.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from rt3d_halide.generators.spec import Conv3dSpec

import rt3d_halide
from rt3d_halide.build import build
from rt3d_halide.layer_model import conv_layer_onnx

Triple = tuple[int, int, int]
FAMILY_TARGETS = {"x86": "host", "opencl": "host-opencl", "arm": "arm-64-linux"}
# Fixed x86 targets for tests that read one ISA's schedule whatever the host has (an AVX-512
# host builds 16-lane code for "host"). AVX2 code may also run (every x86 host the tests run on
# has AVX2); AVX-512 code is compiled, not run.
AVX2_TARGET = "x86-64-linux-avx2-fma-f16c-sse41"
AVX512_TARGET = "x86-64-linux-avx512_skylake-avx2-fma-f16c-sse41"
RUNNER_SOURCE = Path(__file__).parent / "support" / "run_layer.cpp"
AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"
TOLERANCE = 1e-4


@dataclasses.dataclass(frozen=True)
class ConvCase:
    in_channels: int
    out_channels: int
    in_size: Triple
    kernel: Triple = (3, 3, 3)
    stride: Triple = (1, 1, 1)
    dilation: Triple = (1, 1, 1)
    pads_begin: Triple = (0, 0, 0)
    pads_end: Triple = (0, 0, 0)
    bias: bool = True
    relu: bool = False
    batch: int = 1
    seed: int = 0

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel)

    def spec(self, name: str = "conv") -> Conv3dSpec:
        return Conv3dSpec(
            name,
            self.in_channels,
            self.out_channels,
            self.in_size,
            self.kernel,
            self.stride,
            self.dilation,
            self.pads_begin,
            self.pads_end,
            self.bias,
            self.relu,
        )

    @property
    def out_size(self) -> Triple:
        return self.spec().out_size


def temporal_only(case: ConvCase) -> ConvCase:
    """``case`` with one spatial tap, spatial stride 1 and no spatial padding (R(2+1)D's Kx1x1
    convs and 1x1x1 ones): the layers the sparse CPU schedule runs on its input as it is."""
    return dataclasses.replace(
        case,
        kernel=(case.kernel[0], 1, 1),
        stride=(case.stride[0], 1, 1),
        dilation=(case.dilation[0], 1, 1),
        pads_begin=(case.pads_begin[0], 0, 0),
        pads_end=(case.pads_end[0], 0, 0),
    )


def same_plane(case: ConvCase) -> ConvCase:
    """``case`` with stride 1 and a spatial padding of ``(kernel - 1) * dilation`` per axis, so
    that its output plane is its input's (the layers the sparse CPU schedule may copy without
    their padding, masking the reads that fall on it). Each axis keeps as much of the case's
    padding before the input as fits, so that both halves may differ."""
    begin, end = list(case.pads_begin), list(case.pads_end)
    for axis in (1, 2):
        total = (case.kernel[axis] - 1) * case.dilation[axis]
        begin[axis] = min(begin[axis], total)
        end[axis] = total - begin[axis]
    return dataclasses.replace(case, stride=(1, 1, 1), pads_begin=tuple(begin), pads_end=tuple(end))


def conv_onnx(case: ConvCase, weight: np.ndarray, bias: np.ndarray | None) -> onnx.ModelProto:
    """A model holding one Conv (and a Relu when the case fuses one): NCDHW, as exported."""
    return conv_layer_onnx(case.spec(), weight, bias, batch=case.batch)


def reference(
    case: ConvCase, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None
) -> np.ndarray:
    """torch conv3d in float64 on NTHWC data (explicit, possibly asymmetric, zero padding)."""
    xt = torch.from_numpy(x).double().permute(0, 4, 1, 2, 3)
    (pt, ph, pw), (qt, qh, qw) = case.pads_begin, case.pads_end
    xt = torch.nn.functional.pad(xt, (pw, qw, ph, qh, pt, qt))
    bt = torch.from_numpy(bias).double() if bias is not None else None
    out = torch.nn.functional.conv3d(
        xt, torch.from_numpy(weight).double(), bt, stride=case.stride, dilation=case.dilation
    )
    if case.relu:
        out = out.clamp_min(0)
    return out.permute(0, 2, 3, 4, 1).numpy()


def random_case_data(
    case: ConvCase, weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(case.seed)
    x = rng.standard_normal((case.batch, *case.in_size, case.in_channels)).astype(np.float32)
    if weight is None:
        weight = rng.standard_normal(case.weight_shape).astype(np.float32)
    bias = rng.standard_normal(case.out_channels).astype(np.float32) if case.bias else None
    return x, weight, bias


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def assert_matches(out: np.ndarray, ref: np.ndarray, case: ConvCase, family: str) -> float:
    """Every output written, the relative L2 error under ``TOLERANCE`` and every element within
    ``TOLERANCE * (|ref| + sqrt(K))``, K the dense reduction's length (inputs and weights are
    unit normals, so sqrt(K) is a sum's typical size; float32 rounding stays near K * 6e-8).
    The norm alone let one wrong element pass (a dropped tap moves one output by ~|x * w|).

    The norm is taken relative to at least a tenth of the outputs' typical size before a ReLU
    (sqrt(K) per element): where the ReLU zeroed almost every output, float32 rounding of the
    few left (torch's own float32 conv included) exceeded the tolerance of their tiny norm."""
    assert not np.isnan(out).any(), f"{family}: {int(np.isnan(out).sum())} outputs never written"
    terms = case.in_channels * int(np.prod(case.kernel))
    floor = 0.1 * np.sqrt(terms * ref.size)
    err = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), floor))
    assert err < TOLERANCE, f"{family}: relative error {err:.3g} for {case}"
    excess = np.abs(out - ref) - TOLERANCE * (np.abs(ref) + np.sqrt(terms))
    worst = np.unravel_index(int(np.argmax(excess)), excess.shape)
    assert excess[worst] <= 0, (
        f"{family}: element {tuple(int(i) for i in worst)} is {out[worst]:.6g}, torch "
        f"{ref[worst]:.6g} (relative error of the whole {err:.3g}) for {case}"
    )
    return err


def build_case(
    case: ConvCase,
    weight: np.ndarray,
    bias: np.ndarray | None,
    target: str,
    work: Path,
    schedule: str = "",
) -> Path:
    """Dense code forced: ``auto`` gives temporal-only Kx1x1 layers the sparse kernel's quads
    on AVX2 and ARM, where the dense tests of those shapes ran the sparse kernel unawares."""
    model_path = work / "case.onnx"
    onnx.save(conv_onnx(case, weight, bias), str(model_path))
    built = build(
        model_path,
        target,
        work / "build",
        name="case",
        jobs=1,
        quiet=True,
        schedule=schedule,
        kernel="dense",
    )
    assert_kernel(built, "dense")
    return built


def assert_kernel(build_dir: Path, kernel: str) -> None:
    """Every function of the build runs ``kernel`` on every target: a check of the other
    kernel's code proves nothing about this one's."""
    for function in json.loads((build_dir / "manifest.json").read_text())["functions"]:
        ran = set(function["target_kernels"].values())
        assert ran == {kernel}, f"{function['name']}: {function['target_kernels']}, not {kernel}"


def run_generated(case: ConvCase, family: str, build_dir: Path, x: np.ndarray) -> np.ndarray:
    out_shape = (case.batch, *case.out_size, case.out_channels)
    if family == "arm":
        return run_on_arm(build_dir, "case_conv", x, out_shape)
    poisoned = np.full(out_shape, np.nan, dtype=np.float32)
    # Uploaded: on OpenCL the poison stayed on the host, and an unwritten element came back as
    # whatever the fresh device buffer held.
    return rt3d_halide.load(build_dir)["conv"](x, out=poisoned, upload_out=True)


def check_conv(
    case: ConvCase, family: str, weight: np.ndarray | None = None, schedule: str = ""
) -> float:
    """Builds and runs ``case`` on ``family`` (``schedule``: knob overrides, as ``--schedule``
    takes them); asserts and returns the relative error."""
    x, weight, bias = random_case_data(case, weight)
    with tempfile.TemporaryDirectory(prefix="rt3d-case-") as tmp:
        build_dir = build_case(case, weight, bias, FAMILY_TARGETS[family], Path(tmp), schedule)
        out = run_generated(case, family, build_dir, x)
    return assert_matches(out, reference(case, x, weight, bias), case, family)


def link_runner(build_dir: Path, work: Path, cross: bool, defines: Sequence[str] = ()) -> Path:
    """Compiles the C++ runner against a build (the app-side link check); ``defines`` are
    preprocessor names (``RT3D_OPENCL_FALLBACK``: install the OpenCL check first)."""
    manifest = json.loads((build_dir / "manifest.json").read_text())
    table = "".join(f'    {{"{f["name"]}", {f["name"]}}},\n' for f in manifest["functions"])
    (work / "functions.inc").write_text(table)
    compiler = "aarch64-linux-gnu-g++" if cross else os.environ.get("CXX", "g++")
    exe = work / ("run_layer_arm" if cross else "run_layer")
    if defines:
        exe = exe.with_name(f"{exe.name}_{'_'.join(defines).lower()}")
    cmd = [
        compiler,
        "-std=c++17",
        "-O1",
        f'-DMODEL_HEADER="{manifest["model"]}.h"',
        *(f"-D{name}" for name in defines),
        f"-I{work}",
        f"-I{build_dir / 'include'}",
        str(RUNNER_SOURCE),
        str(build_dir / manifest["library"]),
        str(build_dir / manifest["runtime"]),
        "-lpthread",
        "-ldl",
        "-o",
        str(exe),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def run_on_arm(build_dir: Path, fn: str, x: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="rt3d-arm-") as tmp:
        work = Path(tmp)
        exe = link_runner(build_dir, work, cross=True)
        x.astype(np.float32).tofile(work / "in.bin")
        cmd = [
            shutil.which("qemu-aarch64") or "qemu-aarch64",
            "-L",
            AARCH64_SYSROOT,
            str(exe),
            fn,
            str(work / "in.bin"),
            str(work / "out.bin"),
            *map(str, x.shape),
            *map(str, out_shape),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, f"runner failed ({proc.returncode}): {proc.stderr}"
        return np.fromfile(work / "out.bin", dtype=np.float32).reshape(out_shape)
