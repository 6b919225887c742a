"""Bad input to the build: one clear error naming node and reason, exit 2, nothing left behind.

Every case runs through the Python API twice (into a fresh directory, and over an earlier good
build that must survive untouched); a few also run through ``python -m rt3d_halide.build`` to check
the exit status and that stderr is a single ``error: ...`` line without a traceback.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_factory as F
import pytest
from conftest import default_mode, run_build_cli
from conv_harness import AVX2_TARGET
from onnx import numpy_helper

from rt3d_halide import build as rt3d_build
from rt3d_halide import compile as compile_module
from rt3d_halide.artifacts import write_manifest
from rt3d_halide.build import build
from rt3d_halide.compile import LayerJob, _Refused, compile_layers, failure_summary
from rt3d_halide.errors import BuildError
from rt3d_halide.targets import parse_target

CLIP = [1, 8, 4, 6, 6]


def _weight() -> np.ndarray:
    return F.conv_weight(4, 8)


def _poisoned(value: float) -> np.ndarray:
    w = _weight()
    w[1, 2, 0, 1, 2] = value
    return w


def _truncated(path: Path) -> Path:
    data = F.save(F.two_conv_model(), path.with_name("whole.onnx")).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _png(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 8)
    return path


def _text(path: Path) -> Path:
    path.write_text("name,score\nconv1,0.5\n")
    return path


def _model(make: Callable[[], onnx.ModelProto]) -> Callable[[Path], Path]:
    return lambda path: F.save(make(), path)


def _fifo(path: Path) -> Path:
    os.mkfifo(path)  # read, it would block until a writer came and went
    return path


def _symlink_loop(path: Path) -> Path:
    path.symlink_to(path.name)
    return path


def _long_raw_bias() -> onnx.ModelProto:
    """A bias whose raw data holds 9 floats for its shape of 8 (onnx's checker takes more)."""
    model = F.one_conv_model(_weight(), CLIP, bias=np.ones(4, np.float32))
    (bias,) = [t for t in model.graph.initializer if t.name == "b"]
    bias.raw_data += bias.raw_data[:4]
    return model


def _with_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    model.opset_import[0].version = version
    return model


def _without_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    del model.graph.output[:]
    return model


def _fp16_weight() -> onnx.TensorProto:
    return numpy_helper.from_array(_weight().astype(np.float16), "w")


def _then(*nodes: onnx.NodeProto, output: str = "z") -> onnx.ModelProto:
    """The one conv (to ``y``), then ``nodes``."""
    return F.one_conv_model(_weight(), CLIP, extra_nodes=nodes, output=output)


def _clip_to_infinity() -> onnx.ModelProto:
    """ReLU with no upper bound as opset 6 to 10 write a Clip: bounds are attributes there."""
    clip = onnx.helper.make_node("Clip", ["y"], ["z"], name="relu", min=0.0, max=float("inf"))
    return _with_opset(_then(clip), 6)


def _clip_input_to_infinity() -> onnx.ModelProto:
    """The same from opset 11, bounds as inputs: torch.clamp(x, 0, float("inf")) exports so."""
    bounds = [
        onnx.helper.make_node("Constant", [], [name], name=name, value_float=value)
        for name, value in (("low", 0.0), ("high", float("inf")))
    ]
    return _then(*bounds, onnx.helper.make_node("Clip", ["y", "low", "high"], ["z"], name="relu"))


def _quantized_weight() -> onnx.ModelProto:
    """A weight stored as int8 and dequantized at run time (a QDQ model)."""
    model = F.one_conv_model(_weight(), CLIP)
    conv = model.graph.node[0]
    conv.input[1] = "w_float"
    quantized = np.clip(np.round(_weight() * 50), -127, 127).astype(np.int8)
    model.graph.initializer.remove(model.graph.initializer[0])
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(quantized, "w_q"),
            numpy_helper.from_array(np.array(0.02, np.float32), "w_scale"),
        ]
    )
    dequantize = onnx.helper.make_node(
        "DequantizeLinear", ["w_q", "w_scale"], ["w_float"], name="dq"
    )
    model.graph.node.insert(0, dequantize)
    return model


def _local_function() -> onnx.ModelProto:
    """The conv's output through a function the model holds (torch's
    export_modules_as_functions)."""
    model = _then(onnx.helper.make_node("Scale", ["y"], ["z"], name="scale", domain="local"))
    body = [
        onnx.helper.make_node("Constant", [], ["two"], value_float=2.0),
        onnx.helper.make_node("Mul", ["x", "two"], ["out"]),
    ]
    opsets = [onnx.helper.make_opsetid("", F.OPSET)]
    scale = onnx.helper.make_function("local", "Scale", ["x"], ["out"], body, opsets)
    model.functions.append(scale)
    model.opset_import.append(onnx.helper.make_opsetid("local", 1))
    return model


def _second_input() -> onnx.ModelProto:
    model = _then(onnx.helper.make_node("Mul", ["y", "scale"], ["z"], name="mul"))
    scale = onnx.helper.make_tensor_value_info("scale", onnx.TensorProto.FLOAT, [1, 4, 1, 1, 1])
    model.graph.input.append(scale)
    return model


def _with_stored(offset: np.ndarray) -> onnx.ModelProto:
    """``offset``, a tensor of the file, added to the conv's output and then multiplied."""
    add = onnx.helper.make_node("Add", ["y", "offset"], ["a"], name="add")
    model = _then(add, onnx.helper.make_node("Mul", ["a", "offset"], ["z"], name="mul"))
    model.graph.initializer.append(numpy_helper.from_array(offset, "offset"))
    return model


def _with_stored_output(array: np.ndarray, node: onnx.NodeProto | None = None) -> onnx.ModelProto:
    """A tensor of the file (a label table) as a second output, as it is or through ``node``."""
    model = _then(*([node] if node else []), output="y")
    model.graph.initializer.append(numpy_helper.from_array(array, "table"))
    name = node.output[0] if node else "table"
    elem = onnx.TensorProto.STRING if node else onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
    model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, list(array.shape)))
    return model


# id -> (writes the model file at the given path and returns what to pass as --model, target,
#        extra build() arguments, regex the error must match)
BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], str, dict, str]] = {
    "missing-file": (lambda p: p.with_name("nowhere.onnx"), "host", {}, r"nowhere\.onnx.*no such"),
    "directory": (lambda p: p.parent, "host", {}, r"is a directory"),
    "truncated": (_truncated, "host", {}, r"model\.onnx: not a readable ONNX file"),
    "png-file": (_png, "host", {}, r"model\.onnx: not a readable ONNX|not an ONNX model"),
    "text-file": (_text, "host", {}, r"model\.onnx: not a readable ONNX|not an ONNX model"),
    "empty-file": (lambda p: (p.write_bytes(b""), p)[1], "host", {}, r"not an ONNX model"),
    "lstm": (
        _model(lambda: F.with_lstm(F.two_conv_model())),
        "host",
        {},
        r"node 'my_lstm': op 'LSTM' is not supported",
    ),
    "custom-op": (
        _model(lambda: F.with_custom_op(F.two_conv_model())),
        "host",
        {},
        r"node 'my_gate': op com\.example\.FancyGate is not supported",
    ),
    "group-2": (
        _model(lambda: F.one_conv_model(F.conv_weight(4, 2), [1, 4, 4, 6, 6], {"group": 2})),
        "host",
        {},
        r"node 'bad_conv': grouped convolution \(group=2\) is not supported",
    ),
    "conv2d": (
        _model(lambda: F.one_conv_model(np.ones((4, 3, 3, 3), np.float32), [1, 3, 6, 6])),
        "host",
        {},
        r"node 'bad_conv': Conv with 2-D kernel; only Conv3d",
    ),
    "float16-weights": (
        _model(lambda: F.one_conv_model(_fp16_weight(), CLIP)),
        "host",
        {},
        r"node 'bad_conv': 'w' is FLOAT16; only float32",
    ),
    "float64-weights": (
        _model(lambda: F.one_conv_model(_weight().astype(np.float64), CLIP)),
        "host",
        {},
        r"node 'bad_conv': 'w' is DOUBLE; only float32",
    ),
    "nan-weight": (
        _model(lambda: F.one_conv_model(_poisoned(np.nan), CLIP)),
        "host",
        {},
        r"node 'bad_conv': 'w' holds 1 NaN or Inf",
    ),
    "inf-weight": (
        _model(lambda: F.one_conv_model(_poisoned(-np.inf), CLIP)),
        "host",
        {},
        r"node 'bad_conv': 'w' holds 1 NaN or Inf",
    ),
    # Neither is an ONNX checker error: the first built, the second failed in the generator.
    "kernel-shape-contradicts-weights": (
        _model(lambda: F.one_conv_model(_weight(), CLIP, {"kernel_shape": [3, 3, 2]})),
        "host",
        {},
        r"node 'bad_conv': kernel_shape \[3, 3, 2\] != weights",
    ),
    "input-channels-contradict-weights": (
        _model(lambda: F.one_conv_model(_weight(), [CLIP[0], CLIP[1] + 2, *CLIP[2:]])),
        "host",
        {},
        r"node 'bad_conv': input has \d+ channels, weights expect \d+",
    ),
    "weight-is-graph-input": (
        _model(lambda: F.one_conv_model(_weight(), CLIP, weight_as_input=True)),
        "host",
        {},
        r"node 'bad_conv': weight 'w' is not a constant initializer",
    ),
    "dynamic-spatial-shape": (
        _model(lambda: F.two_conv_model(clip=(1, 8, 4, "height", "width"))),
        "host",
        {},
        r"node 'conv_a': input shape .* is not a static",
    ),
    "sparsity-names-unknown-layer": (
        _model(lambda: F.two_conv_model(metadata=F.sparsity_metadata({"conv_z.weight": {}}))),
        "host",
        {},
        r"rt3d\.sparsity names 'conv_z\.weight', which is not the weight of any Conv node "
        r"\(their weights: 'conv_a\.weight', 'conv_b\.weight'\)",
    ),
    "sparsity-not-json": (
        _model(lambda: F.two_conv_model(metadata={"rt3d.sparsity": '{"layers": {'})),
        "host",
        {},
        r"metadata 'rt3d\.sparsity' is malformed",
    ),
    "sparsity-no-layers-key": (
        _model(lambda: F.two_conv_model(metadata={"rt3d.sparsity": '{"groups": [4, 4]}'})),
        "host",
        {},
        r"metadata 'rt3d\.sparsity' is malformed",
    ),
    "sparsity-no-version": (
        _model(lambda: F.two_conv_model(metadata=F.sparsity_metadata({}, version=None))),
        "host",
        {},
        r"metadata 'rt3d\.sparsity' has version None; this build reads version 1",
    ),
    "sparsity-version-2": (
        _model(lambda: F.two_conv_model(metadata=F.sparsity_metadata({}, version=2))),
        "host",
        {},
        r"metadata 'rt3d\.sparsity' has version 2; this build reads version 1",
    ),
    "sparsity-not-an-object": (
        _model(lambda: F.two_conv_model(metadata={"rt3d.sparsity": "[1, 2]"})),
        "host",
        {},
        r"metadata 'rt3d\.sparsity' is malformed",
    ),
    "sparsity-layers-a-list": (
        _model(
            lambda: F.two_conv_model(metadata={"rt3d.sparsity": '{"version": 1, "layers": []}'})
        ),
        "host",
        {},
        r"metadata 'rt3d\.sparsity' is malformed .*'layers' is a list, not an object",
    ),
    "bias-wrong-length": (
        _model(lambda: F.one_conv_model(_weight(), CLIP, bias=np.ones(3, np.float32))),
        "host",
        {},
        r"node 'bad_conv': bias of shape \[3\] for 4 filters",
    ),
    "batch-0": (
        _model(lambda: F.one_conv_model(_weight(), [0, *CLIP[1:]])),
        "host",
        {},
        r"node 'bad_conv': input batch of 0 clips",
    ),
    "input-smaller-than-kernel": (
        _model(lambda: F.one_conv_model(_weight(), [1, CLIP[1], 2, *CLIP[3:]])),
        "host",
        {},
        r"node 'bad_conv': .*too small for kernel",
    ),
    "negative-pads": (
        _model(lambda: F.one_conv_model(_weight(), CLIP, {"pads": [-1, 0, 0, 0, 0, 0]})),
        "host",
        {},
        r"model\.onnx: ONNX shape inference failed: .*Conv",
    ),
    "target-foo": (_model(F.two_conv_model), "foo", {}, r"unknown Halide target 'foo'"),
    "target-twice": (_model(F.two_conv_model), "host,host", {}, r"'host' is listed twice"),
    "target-never-runs": (
        _model(F.two_conv_model),
        "host,host-opencl",
        {},
        r"target 'host-opencl' would never run: .* 'host', listed before it",
    ),
    "targets-of-two-oses": (
        _model(F.two_conv_model),
        "host,arm-64-android",
        {},
        r"'arm-64-android': every target of one library must share 'host''s architecture",
    ),
    "target-ios": (_model(F.two_conv_model), "arm-64-ios", {}, r"only Linux and Android"),
    "target-sve-without-length": (
        _model(F.two_conv_model),
        "arm-64-linux-sve2",
        {},
        r"SVE code needs the vector length .*'arm-64-linux-sve2-vector_bits_128'",
    ),
    "target-sve-length-0": (
        _model(F.two_conv_model),
        "arm-64-linux-sve2-vector_bits_0",
        {},
        r"SVE code needs the vector length",
    ),
    "target-windows": (_model(F.two_conv_model), "x86-64-windows", {}, r"only Linux and Android"),
    "target-plain-avx512": (
        _model(F.two_conv_model),
        "x86-64-linux-avx512",
        {},
        r"x86-64-linux-avx512.*avx512_skylake",
    ),
    "target-32-bit": (_model(F.two_conv_model), "arm-32-android", {}, r"only 64-bit"),
    "target-cuda": (_model(F.two_conv_model), "host-cuda", {}, r"only GPU API .* is OpenCL"),
    "target-opencl-and-cuda": (
        _model(F.two_conv_model),
        "arm-64-android-opencl-cuda",
        {},
        r"only GPU API with a schedule is OpenCL \(drop cuda\)",
    ),
    "target-empty-item": (_model(F.two_conv_model), "host,", {}, r"empty target"),
    "fifo": (_fifo, "host", {}, r"model\.onnx: not a regular file"),
    "symlink-loop": (_symlink_loop, "host", {}, r"model\.onnx: .*([Ss]ymlink|symbolic links)"),
    "bias-raw-data-too-long": (
        _model(_long_raw_bias),
        "host",
        {},
        r"node 'bad_conv': initializer 'b' does not read: cannot reshape",
    ),
    "sparsity-nested-too-deep": (
        _model(lambda: F.two_conv_model(metadata={"rt3d.sparsity": "[" * 5000 + "]" * 5000})),
        "host",
        {},
        r"metadata 'rt3d\.sparsity' is malformed .*recursion",
    ),
    "sparsity-version-true": (
        _model(lambda: F.two_conv_model(metadata=F.sparsity_metadata({}, version=True))),
        "host",
        {},
        r"metadata 'rt3d\.sparsity' has version True; this build reads version 1",
    ),
    "opset-newer-than-onnx": (
        _model(lambda: _with_opset(F.two_conv_model(), 99)),
        "host",
        {},
        r"opset 99, newer than the \d+ this onnx",
    ),
    "no-outputs": (
        _model(lambda: _without_outputs(F.two_conv_model())),
        "host",
        {},
        r"the graph has no outputs",
    ),
    "stride-past-int32": (
        _model(lambda: F.one_conv_model(_weight(), CLIP, {"strides": [2**40, 1, 1]})),
        "host",
        {},
        r"node 'bad_conv': .*past 2\^31 - 1",
    ),
    "pads-past-int32": (
        _model(lambda: F.one_conv_model(_weight(), CLIP, {"pads": [2**40] * 6})),
        "host",
        {},
        r"node 'bad_conv': .*past 2\^31 - 1",
    ),
    "target-feature-of-another-arch": (
        _model(F.two_conv_model),
        "x86-64-linux-sve2",
        {},
        r"target 'x86-64-linux-sve2': .*incompatible with the Target's architecture",
    ),
    "target-user-context": (
        _model(F.two_conv_model),
        "host-user_context",
        {},
        r"user_context would change the functions' C signature",
    ),
    "target-name-mangling": (
        _model(F.two_conv_model),
        "x86-64-linux,x86-64-linux-c_plus_plus_name_mangling",
        {},
        r"c_plus_plus_name_mangling would change the functions' C signature or symbol names",
    ),
    "target-list-user-context-on-one": (
        _model(F.two_conv_model),
        "x86-64-linux-avx2-fma-f16c-sse41,x86-64-linux-user_context",
        {},
        r"user_context would change the functions' C signature",
    ),
    "target-list-debug-on-one": (
        _model(F.two_conv_model),
        "host-debug,x86-64-linux",
        {},
        r"'x86-64-linux': the feature 'debug' must be set alike on every target .*'host-debug'",
    ),
    "target-jit": (_model(F.two_conv_model), "host-jit", {}, r"jit compiles in-process"),
    "target-bare-jit": (_model(F.two_conv_model), "jit", {}, r"'jit': jit compiles in-process"),
    "invalid-onnx": (
        _model(lambda: F.one_conv_model(_weight(), CLIP, {"padding": [1] * 6})),
        "host",
        {},
        r"model\.onnx: invalid ONNX model: Unrecognized attribute: padding for operator Conv",
    ),
    "auto-pad-unknown": (
        _model(lambda: F.one_conv_model(_weight(), CLIP, {"auto_pad": "SAME"})),
        "host",
        {},
        r"node 'bad_conv': unsupported auto_pad 'SAME'",
    ),
    "bias-of-two-axes": (
        _model(lambda: F.one_conv_model(_weight(), CLIP, bias=np.ones((4, 1), np.float32))),
        "host",
        {},
        r"node 'bad_conv': bias of shape \[4, 1\] for 4 filters",
    ),
    "two-inputs": (
        _model(_second_input),
        "host",
        {},
        r"model\.onnx: expected one input clip, found 2 inputs \('clip', 'scale'\)",
    ),
    "clip-bound-not-finite": (
        _model(_clip_to_infinity),
        "host",
        {},
        r"node 'relu': attribute 'max' is inf; the manifest \(JSON\) holds no NaN or Inf",
    ),
    "quantized-weight": (
        _model(_quantized_weight),
        "host",
        {},
        r"node 'bad_conv': weight 'w_float' is quantized \(dequantized at run time by 'dq'\)",
    ),
    "local-function": (
        _model(_local_function),
        "host",
        {},
        r"op local\.Scale is not supported .* inline them first \(onnx\.inliner",
    ),
    "clip-bound-input-not-finite": (
        _model(_clip_input_to_infinity),
        "host",
        {},
        r"node 'relu': 'high' holds 1 NaN or Inf values; the manifest \(JSON\) holds no NaN or "
        r"Inf: give a finite value \(float32's largest, 3\.4028235e\+38",
    ),
    "stored-output-not-finite-float64": (
        _model(lambda: _with_stored_output(np.array([0.5, np.nan]))),
        "host",
        {},
        r"node \"the graph's outputs\": 'table' holds 1 NaN or Inf",
    ),
    "cast-of-a-stored-tensor-to-string": (
        _model(
            lambda: _with_stored_output(
                np.array([0.5, 2.0], np.float32),
                onnx.helper.make_node(
                    "Cast", ["table"], ["names"], name="to_text", to=onnx.TensorProto.STRING
                ),
            )
        ),
        "host",
        {},
        r"node 'to_text': op 'Cast' is not supported",
    ),
    "host-weight-not-finite": (  # named at its first reader
        _model(lambda: _with_stored(np.array([0.5, np.inf, 1, 2], np.float32).reshape(4, 1, 1, 1))),
        "host",
        {},
        r"node 'add': 'offset' holds 1 NaN or Inf",
    ),
    "jobs-0": (_model(F.two_conv_model), "host", {"jobs": 0}, r"--jobs must be >= 1"),
    "jobs-negative": (_model(F.two_conv_model), "host", {"jobs": -3}, r"--jobs must be >= 1"),
}


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def good_build(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    """An earlier successful build that failed builds must leave alone."""
    work = tmp_path_factory.mktemp("good")
    model = F.save(F.one_conv_model(_weight(), CLIP), work / "good.onnx")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RT3D_HALIDE_CACHE", str(cache))
        return build(model, "host", work / "build", name="good", jobs=1, quiet=True)


@pytest.mark.parametrize("preexisting", [False, True], ids=["fresh-out", "over-good-build"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_build_error(
    case: str, preexisting: bool, tmp_path: Path, good_build: Path, cache: Path, monkeypatch
) -> None:
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(cache))
    write, target, kwargs, pattern = BAD_INPUTS[case]
    model = write(tmp_path / "model.onnx")
    parent = tmp_path / "outs"
    parent.mkdir()
    out = parent / "build"
    if preexisting:
        shutil.copytree(good_build, out)
    before = _tree_digest(parent)
    with pytest.raises(BuildError, match=pattern) as info:
        build(model, target, out, jobs=kwargs.get("jobs", 1), quiet=True)
    assert "\n" not in str(info.value), "an input error is one line"
    # No partial output, no staging directory next to it; an earlier build is byte-identical.
    assert sorted(p.name for p in parent.iterdir()) == (["build"] if preexisting else [])
    assert _tree_digest(parent) == before


def test_the_manifest_is_strict_json(tmp_path: Path) -> None:
    """NaN and Infinity are no JSON (a C++ or JavaScript reader refuses the file): a value the
    planning let through is refused rather than written."""
    with pytest.raises(ValueError, match="not JSON compliant"):
        write_manifest(tmp_path / "manifest.json", {"host_ops": [{"max": float("inf")}]})
    assert not (tmp_path / "manifest.json").exists()


@pytest.mark.parametrize(
    ("case", "extra", "pattern"),
    [
        ("missing-file", [], r"no such file"),
        ("truncated", [], r"not a readable ONNX file"),
        ("lstm", [], r"node 'my_lstm': op 'LSTM'"),
        ("target-foo", ["--target", "foo"], r"unknown Halide target 'foo'"),
        ("jobs-0", ["--jobs", "0"], r"--jobs must be >= 1"),
    ],
)
def test_cli_bad_input_exit_2_one_error_line(
    case: str, extra: list[str], pattern: str, tmp_path: Path, cache: Path
) -> None:
    model = BAD_INPUTS[case][0](tmp_path / "model.onnx")
    out = tmp_path / "outs" / "build"
    args = ["--model", str(model), "--out", str(out), *extra]
    if "--jobs" not in extra:
        args += ["--jobs", "1"]
    proc = run_build_cli(*args, cwd=tmp_path, cache=cache)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith("error: ")
    assert re.search(pattern, lines[0]), lines[0]
    assert proc.stdout == ""
    assert not out.exists()
    assert not (tmp_path / "outs").exists() or not any((tmp_path / "outs").iterdir())


def test_cli_file_system_refusal_exit_2_one_error_line(tmp_path: Path) -> None:
    """The file system's refusals are the user's to fix as well: here a compile cache path
    that names a file. With layers still queued when the first failed, the build hung: the
    compiles it cancelled never counted as done."""
    model = F.save(F.two_conv_model(), tmp_path / "m.onnx")
    not_a_directory = tmp_path / "cache"
    not_a_directory.write_text("not a cache")
    out = tmp_path / "outs" / "build"
    args = [str(model), "--out", str(out), "--quiet", "--jobs", "1"]
    proc = run_build_cli(*args, cwd=tmp_path, cache=not_a_directory, timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and "Not a directory" in line, line
    assert f"error: the compile cache {not_a_directory}: " in line, line
    assert not out.exists()


def test_out_a_mount_point_is_refused_before_compiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build replaces --out whole, which a mount point (Docker's -v $PWD/out:/out) refuses:
    the rename failed with EBUSY once everything had compiled, naming a staging directory."""
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    mount = tmp_path / "mnt"
    mount.mkdir()
    monkeypatch.setattr(rt3d_build, "compile_layers", _no_compile)
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == mount)
    with pytest.raises(BuildError, match=f"--out {mount}: a mount point.* such as {mount}/build"):
        build(model, "host", mount, jobs=1, quiet=True)
    assert list(mount.iterdir()) == []


def test_out_a_bind_mount_of_the_same_file_system_is_refused_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.path.ismount compares devices: a bind mount of a directory of the same file system
    passed it (and the build's rename failed with EBUSY). Its mount differs from its parent's."""
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    mount = tmp_path / "out"
    mount.mkdir()
    assert rt3d_build._mount_id(mount) == rt3d_build._mount_id(tmp_path)
    real = rt3d_build._mount_id
    monkeypatch.setattr(rt3d_build, "_mount_id", lambda d: real(d) + (d == mount))
    monkeypatch.setattr(rt3d_build, "compile_layers", _no_compile)
    with pytest.raises(BuildError, match="a mount point"):
        build(model, "host", mount, jobs=1, quiet=True)


def test_out_the_file_system_refuses_fails_before_compiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Permission bits pass where the file system still refuses (root on /sys, a read-only
    mount): the build tries a directory where it will write before it compiles."""
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    monkeypatch.setattr(rt3d_build, "compile_layers", _no_compile)
    mkdir = Path.mkdir

    def refusing(path: Path, *args: object, **kwargs: object) -> None:
        if path.parent == tmp_path:
            raise PermissionError(1, "Operation not permitted", str(path))
        mkdir(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refusing)
    with pytest.raises(BuildError, match=f"--out {tmp_path / 'out'}: cannot write in {tmp_path}"):
        build(model, "host", tmp_path / "out", jobs=1, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_cli_bad_argument_type_exit_2(tmp_path: Path, cache: Path) -> None:
    proc = run_build_cli("--jobs", "many", cwd=tmp_path, cache=cache)
    assert proc.returncode == 2
    assert "--jobs" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "build").exists()


@pytest.mark.parametrize("argv", [["--model", ""], [""], ["--out", ""]])
def test_cli_an_empty_path_is_named_as_such(tmp_path: Path, cache: Path, argv) -> None:
    """``Path("")`` is the current directory: an empty --model was "a directory, expected an
    ONNX file", an empty --out "the current directory"."""
    proc = run_build_cli(*argv, cwd=tmp_path, cache=cache)
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[-1].endswith(": an empty path"), proc.stderr


def test_failed_compile_keeps_earlier_build(
    tmp_path: Path, good_build: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A generator failing in its subprocess: BuildError naming the layer, old build intact."""
    out = tmp_path / "outs" / "build"
    shutil.copytree(good_build, out)
    before = _tree_digest(out.parent)
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(cache))
    monkeypatch.setattr(rt3d_build, "DENSE_GENERATOR", "rt3d_no_such_generator")
    cached_before = sorted((cache / "layers").iterdir())
    with pytest.raises(BuildError, match="layer m_bad_conv") as excinfo:
        build(model, "host", out, jobs=1, quiet=True)
    assert "generator failed" in str(excinfo.value)
    assert _tree_digest(out.parent) == before
    # Nothing of the failed compile was cached as if it had succeeded, nor left half-written.
    assert sorted((cache / "layers").iterdir()) == cached_before


@pytest.mark.parametrize(
    "knobs, message",
    [
        ('{"register_tiles": [[1, -2]]}', "register_tiles"),
        ('{"register_tiles": [2, 6]}', r"register_tiles must be a non-empty list of \["),
        ('{"register_tiles": [[true, 6]]}', "register_tiles"),
        ('{"family": "arm64-neon"}', r"family is the target's \(x86-"),
        ('{"reduction_unroll": 0}', "reduction_unroll"),
        ('{"parallel": "yes"}', "parallel"),
        ("[" * 5000 + "]" * 5000, "nest too deeply"),
    ],
)
def test_bad_knob_values_refused_before_compiling(
    tmp_path: Path, knobs: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    monkeypatch.setattr(rt3d_build, "compile_layers", _no_compile)
    with pytest.raises(BuildError, match=message) as info:
        build(model, "host", tmp_path / "out", jobs=1, quiet=True, schedule=knobs)
    assert "\n" not in str(info.value), "a knob error is one line"
    assert not (tmp_path / "out").exists()


def test_a_sparse_tile_past_what_llvm_unrolls_is_refused(tmp_path: Path, monkeypatch) -> None:
    """x_vectors 4096 passed the knob check and the generator died (exit -11, no reason)."""
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    monkeypatch.setattr(rt3d_build, "compile_layers", _no_compile)
    with pytest.raises(BuildError, match="sparse knob x_vectors must be <= 256"):
        build(model, "host", tmp_path / "out", jobs=1, quiet=True, kernel="sparse",
              sparse_schedule='{"x_vectors": 4096}')  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_model_past_protobufs_2_gib_is_one_error_line(tmp_path: Path, monkeypatch) -> None:
    """onnx's checker serializes the model, which protobuf refuses past 2 GiB (a traceback
    ending in EncodeError, here raised in its place); the checker's other failures are not
    taken for it."""
    from google.protobuf.message import EncodeError

    from rt3d_halide import onnx_import

    def refuse(_model: onnx.ModelProto) -> None:
        raise EncodeError("Failed to serialize proto")

    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    monkeypatch.setattr(onnx_import.onnx.checker, "check_model", refuse)
    with pytest.raises(BuildError, match=r"protobuf cannot serialize it .* at most 2 GiB"):
        build(model, "host", tmp_path / "out", jobs=1, quiet=True)

    def fail(_model: onnx.ModelProto) -> None:
        raise RuntimeError("another failure")

    monkeypatch.setattr(onnx_import.onnx.checker, "check_model", fail)
    with pytest.raises(RuntimeError, match="another failure"):
        build(model, "host", tmp_path / "out", jobs=1, quiet=True)


def test_a_quad_block_past_what_compiles_in_time_is_refused(tmp_path: Path, monkeypatch) -> None:
    """The quads unroll every accumulator of a block: x_vectors 256 on a group of 32 filters
    (8 accumulators a position) passed the knob check and took 155 s to compile one small
    layer."""
    weight = np.random.default_rng(0).standard_normal((32, 8, 3, 1, 1)).astype(np.float32)
    weight[:, :, 1] = 0  # a pattern of 32x4 groups: every group keeps two of its three frames
    attrs = {"kernel_shape": [3, 1, 1], "pads": [1, 0, 0, 1, 0, 0]}
    model = F.one_conv_model(weight, [1, 8, 2, 12, 12], node_attrs=attrs)
    F.set_metadata(model, F.sparsity_metadata({"w": {"scheme": "kgs", "group": [32, 4]}}))
    path = F.save(model, tmp_path / "m.onnx")
    monkeypatch.setattr(rt3d_build, "compile_layers", _no_compile)
    knobs = '{"input_layout": "interleaved", "x_vectors": 256}'
    message = r"quads' block of 144 positions .* x 8 accumulators each unrolls 1152, more than 512"
    with pytest.raises(BuildError, match=message):
        build(path, "host", tmp_path / "out", jobs=1, quiet=True, kernel="sparse",
              sparse_schedule=knobs)  # fmt: skip
    assert not (tmp_path / "out").exists()
    knobs = '{"input_layout": "interleaved", "x_vectors": 64}'
    with pytest.raises(AssertionError, match="compiled before refusing"):  # 64 x 8 is taken
        build(path, "host", tmp_path / "out", jobs=1, quiet=True, kernel="sparse",
              sparse_schedule=knobs)  # fmt: skip


@pytest.mark.parametrize("overrides", ["3", "[1]", '"x"'])
def test_overrides_that_are_not_a_json_object_are_a_build_error(
    tmp_path: Path, overrides: str
) -> None:
    """Also where a temporal-only layer weighs the sparse schedule before the kernel choice (on
    AVX2, where the temporal-only rule holds; a bare TypeError escaped there)."""
    model = F.save(
        F.one_conv_model(F.conv_weight(4, 8, (3, 1, 1)), (1, 8, 4, 6, 6)), tmp_path / "m.onnx"
    )
    for flag in ("schedule", "sparse_schedule"):
        with pytest.raises(BuildError, match="must be a JSON object"):
            build(model, AVX2_TARGET, tmp_path / "out", jobs=1, quiet=True, **{flag: overrides})
    assert not (tmp_path / "out").exists()


def test_schedule_flag_no_layer_uses_is_still_checked(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The one layer runs dense code: a typo in --sparse-schedule is refused all the same, and a
    valid one builds with a note that it applies to no layer."""
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(cache))
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    with pytest.raises(BuildError, match=r"unknown schedule knobs \['lane'\]"):
        build(model, "host", tmp_path / "bad", jobs=1, quiet=True, sparse_schedule='{"lane": 2}')
    assert not (tmp_path / "bad").exists()
    build(model, "host", tmp_path / "out", jobs=1, quiet=True, sparse_schedule='{"lanes": 2}')
    assert capsys.readouterr().err.startswith("note: --sparse-schedule applies to no layer")


def test_out_never_replaces_foreign_files(tmp_path: Path) -> None:
    """--out naming a file, or a non-empty directory that is no build, is refused untouched."""
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(BuildError, match="not a directory"):
        build(model, "host", a_file, jobs=1, quiet=True)
    assert a_file.read_text() == "mine"
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.c").write_text("int main() {}")
    with pytest.raises(BuildError, match="not an rt3d_halide build"):
        build(model, "host", project, jobs=1, quiet=True)
    assert (project / "src" / "main.c").read_text() == "int main() {}"
    web_app = tmp_path / "web_app"
    (web_app / "src").mkdir(parents=True)
    (web_app / "manifest.json").write_text('{"name": "My PWA", "start_url": "/"}')
    (web_app / "src" / "app.js").write_text("main()")
    with pytest.raises(BuildError, match="not an rt3d_halide build"):
        build(model, "host", web_app, jobs=1, quiet=True)
    assert (web_app / "src" / "app.js").read_text() == "main()"


@pytest.mark.parametrize(
    ("out", "pattern"),
    [
        (".", r"--out \.: the current directory or one holding it"),
        ("..", r"the current directory or one holding it"),
        ("notes.txt/build", r"notes\.txt is not a directory"),
    ],
)
def test_unusable_out_refused_before_compiling(
    out: str, pattern: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build into the working directory would swap it from under the shell; under a file it
    cannot be written: either way the user hears it before any layer compiles."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    monkeypatch.chdir(work)
    monkeypatch.setattr(rt3d_build, "compile_layers", _no_compile)
    with pytest.raises(BuildError, match=pattern):
        build(model, "host", out, jobs=1, quiet=True)
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]


def _no_compile(*_args: object) -> None:
    raise AssertionError("compiled before refusing --out")


def test_a_list_may_differ_in_no_runtime_which_the_build_sets_itself() -> None:
    """The build adds no_runtime to every target: a list naming it on one only is no mismatch
    for Halide (it was refused as one)."""
    assert parse_target("host,x86-64-linux-no_runtime").text == "host,x86-64-linux-no_runtime"


def test_the_manifest_hashes_the_model_the_build_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source's SHA-256 was taken once every layer had compiled: a model exported again
    meanwhile was recorded by its new bytes, and one removed meanwhile failed the build."""
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    read = hashlib.sha256(model.read_bytes()).hexdigest()
    compile_layers = rt3d_build.compile_layers

    def compile_then_remove(*args: object) -> object:
        compiled = compile_layers(*args)
        model.unlink()
        return compiled

    monkeypatch.setattr(rt3d_build, "compile_layers", compile_then_remove)
    out = build(model, "host", tmp_path / "out", jobs=1, quiet=True)
    assert json.loads((out / "manifest.json").read_text())["source"]["sha256"] == read


def test_out_through_a_symlink_loop_is_refused_before_compiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.11's resolve() raises RuntimeError on a loop: it left the build a traceback."""
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    monkeypatch.setattr(rt3d_build, "compile_layers", _no_compile)
    with pytest.raises(BuildError, match=r"--out .*a/build: .*([Ss]ymlink loop|symbolic links)"):
        build(model, "host", tmp_path / "a" / "build", jobs=1, quiet=True)


@pytest.mark.parametrize("inside", ["cache", "."], ids=["holds-the-cache", "is-the-cache"])
def test_out_holding_the_compile_cache_is_refused_before_compiling(
    inside: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache made inside --out went with the earlier build each build replaced: every build
    compiled every layer again, saying it had removed cache/."""
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "out" / inside))
    monkeypatch.setattr(rt3d_build, "compile_layers", _no_compile)
    with pytest.raises(BuildError, match=r"--out .*: holds the compile cache .*RT3D_HALIDE_CACHE"):
        build(model, "host", tmp_path / "out", jobs=1, quiet=True)
    assert not (tmp_path / "out").exists()


def test_an_out_name_too_long_is_refused_before_compiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    monkeypatch.setattr(rt3d_build, "compile_layers", _no_compile)
    out = tmp_path / "outs" / ("x" * 300) / "build"
    with pytest.raises(BuildError, match=r"a name longer than the \d+ bytes"):
        build(model, "host", out, jobs=1, quiet=True)
    # Its last name too long (the file system answers before the build's own check can).
    with pytest.raises(BuildError, match=r"--out .*: File name too long"):
        build(model, "host", tmp_path / ("x" * 300), jobs=1, quiet=True)
    with pytest.raises(BuildError, match=r"\.onnx: File name too long"):
        build(tmp_path / ("m" * 300 + ".onnx"), "host", tmp_path / "out", jobs=1, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_signal_while_the_new_build_goes_in_leaves_a_whole_build(
    exchange: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Moved aside and then replaced, --out was missing in between: a Ctrl-C there left no
    build. Swapped in one step there is no between (the new build's one rename is refused, the
    swap takes its place); without the swap the earlier one returns."""
    earlier, new = tmp_path / "build", tmp_path / "staging"
    for directory, text in ((earlier, "earlier"), (new, "new")):
        directory.mkdir()
        (directory / "manifest.json").write_text(text)
    if exchange:
        probe = tmp_path / "probe"
        probe.mkdir()
        if not rt3d_build._exchange(probe, new):
            pytest.skip("this file system cannot swap two directories (RENAME_EXCHANGE)")
        rt3d_build._exchange(probe, new)
        probe.rmdir()
    else:
        monkeypatch.setattr(rt3d_build, "_exchange", lambda _a, _b: False)
    rename, moves = Path.rename, []

    def interrupted(self: Path, target: Path) -> Path:
        moves.append(self)
        if (
            self == new and moves.count(new) == 2
        ):  # the new build's second try, after the earlier moved aside
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted)
    if exchange:
        rt3d_build._replace_dir(new, earlier)
        assert moves == [new]
        assert (earlier / "manifest.json").read_text() == "new"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]
    else:
        with pytest.raises(KeyboardInterrupt):
            rt3d_build._replace_dir(new, earlier)
        assert (earlier / "manifest.json").read_text() == "earlier"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["build", "staging"]


def test_a_build_written_meanwhile_by_another_is_replaced_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two builds into one --out at once: the other's appeared after this one looked, and the
    rename onto it failed (Directory not empty)."""
    dest, new = tmp_path / "build", tmp_path / "staging"
    new.mkdir()
    (new / "manifest.json").write_text("this")
    rename = Path.rename

    def other_build_first(self: Path, target: Path) -> Path:
        if self == new and not dest.exists():
            dest.mkdir()
            (dest / "manifest.json").write_text("other")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", other_build_first)
    rt3d_build._replace_dir(new, dest)
    assert (dest / "manifest.json").read_text() == "this"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]


def test_an_earlier_build_comes_back_when_the_new_one_cannot_take_its_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    earlier, new = tmp_path / "build", tmp_path / "staging"
    earlier.mkdir()
    (earlier / "manifest.json").write_text("{}")
    new.mkdir()
    rename = Path.rename

    def refuse_new(self: Path, target: Path) -> Path:
        if self == new:
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(self))
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", refuse_new)
    with pytest.raises(OSError, match="cross-device"):
        rt3d_build._replace_dir(new, earlier)
    assert (earlier / "manifest.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build", "staging"]


def _disk_full_at(path: Path | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing the build fails as a full disk would, naming ``path`` (None: a write to an open
    file, which names none)."""

    def disk_full(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", *([str(path)] if path else []))

    monkeypatch.setattr(rt3d_build, "assemble", disk_full)


def test_a_failed_build_removes_only_the_directories_it_made(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``new/../keep/build``: the build makes ``new`` and removes it again on failure, but not
    ``keep``, which was the user's (a list taken from the path as written had removed it)."""
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(cache))
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    (tmp_path / "keep").mkdir()
    _disk_full_at(tmp_path / "keep" / "x", monkeypatch)
    with pytest.raises(BuildError, match="No space left"):
        build(model, "host", tmp_path / "new" / ".." / "keep" / "build", jobs=1, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "m.onnx"]


def test_a_directory_that_cannot_be_made_is_a_build_error(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(cache))
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    mkdir = Path.mkdir

    def read_only(self: Path, *args: object, **kwargs: object) -> None:
        if self.name == "deep":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(BuildError, match=r"cannot make .*deep: Read-only file system"):
        build(model, "host", tmp_path / "made" / "deep" / "build", jobs=1, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_an_unreadable_out_is_a_build_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    out = tmp_path / "out"
    out.mkdir()

    def refused(_self: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(out))

    monkeypatch.setattr(Path, "iterdir", refused)
    monkeypatch.setattr(rt3d_build, "compile_layers", _no_compile)
    with pytest.raises(BuildError, match=r"--out .*out: .*Permission denied"):
        build(model, "host", out, jobs=1, quiet=True)


@pytest.mark.parametrize("where", ["beside-out", "unnamed", "package"])
def test_a_refused_write_leaves_nothing_and_blames_the_right_path(
    where: str, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk while the build is written: a one-line BuildError, and the directories
    made to hold --out are gone again. A write that names no file (a real full disk's, in the
    archive merge or the host weights) names both places it may have gone. The same refusal
    on a file of the package itself is a bug, and stays an OSError with its traceback."""
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(cache))
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    out = tmp_path / "made" / "for" / "build"
    blamed = {
        "beside-out": out.parent / "x",
        "unnamed": None,
        "package": Path(rt3d_build.__file__),
    }[where]
    _disk_full_at(blamed, monkeypatch)
    expected = OSError if where == "package" else BuildError
    if where == "unnamed":
        with pytest.raises(BuildError, match=r"--out .* or the compile cache .*: No space left"):
            build(model, "host", out, jobs=1, quiet=True)
    with pytest.raises(expected, match="No space left") as info:
        build(model, "host", out, jobs=1, quiet=True)
    assert not isinstance(info.value, BuildError) or "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_failed_layer_is_the_error_not_the_compiles_it_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failure closes the build, and the layers queued behind it are refused. Where the
    failure and its refusals end within one wait, the set of futures holds them in any order:
    unsorted, the build raised "no further compile starts" as often as why. Here every layer
    ends before the build looks, and the wait hands the refusals over first."""
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    command = [sys.executable, "-c", "import sys; sys.exit('bad layer')"]
    monkeypatch.setattr(compile_module, "_generator_command", lambda: command)
    wait, refused = compile_module._wait, set()

    def all_ended_refusals_first(futures, until):
        concurrent.futures.wait(futures)
        finished, pending = wait(futures, until)
        refused.update(f for f in finished if isinstance(f.exception(), _Refused))
        return sorted(finished, key=lambda f: f not in refused), pending

    monkeypatch.setattr(compile_module, "_wait", all_ended_refusals_first)
    arrays = {"weight": np.zeros(1, np.float32)}
    jobs = [LayerJob("g", name, "{}", arrays, "host") for name in ("bad", "next", "last")]
    with pytest.raises(BuildError, match=r"(?s)layer bad .*bad layer"):
        compile_layers(jobs, parallel=1)  # one worker: 'next' and 'last' start after 'bad'
    assert len(refused) == 2


def test_failed_compile_names_the_exception_before_its_frames() -> None:
    """A Python generator's failure ends in stack frames: the exception's own line leads."""
    frames = [f"  /work/generators/conv3d_dense.py({n}): generate" for n in range(20)]
    output = "\n".join(
        [
            "Unhandled exception: ValueError: could not broadcast (3,) into (8,)",
            "At:",
            *frames,
            "RuntimeError: Generator failed: -1",
        ]
    )
    summary = failure_summary(output).splitlines()
    assert summary[0] == "Unhandled exception: ValueError: could not broadcast (3,) into (8,)"
    assert summary[-1] == "RuntimeError: Generator failed: -1"
    assert failure_summary("one line").splitlines() == ["one line"]


@pytest.mark.parametrize("name", ["halide", "halide_net"])
def test_a_model_name_in_halides_namespace_is_refused(tmp_path: Path, name: str) -> None:
    """A layer "malloc" of model "halide" would be halide_malloc, a runtime function."""
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    with pytest.raises(BuildError, match="halide_ names belong to Halide's runtime"):
        build(model, "host", tmp_path / "out", name=name, jobs=1, quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name", ["HalideRuntime", "HalideBuffer", "HalideRuntimeOpenCL", "rt3d_opencl_fallback"]
)
def test_a_model_name_of_a_shipped_header_is_refused(tmp_path: Path, name: str) -> None:
    """include/<name>.h would have been overwritten by that header, with no declaration left."""
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    with pytest.raises(BuildError, match=f"include/{name}.h is a header the builds ship"):
        build(model, "host", tmp_path / "out", name=name, jobs=1, quiet=True)
    assert not (tmp_path / "out").exists()


def test_a_model_name_too_long_for_its_files_is_named(tmp_path: Path) -> None:
    """It was reported as --out's fault ("File name too long") after compiling."""
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    name = "a" * (limit - len("Config.cmake") + 1)
    with pytest.raises(BuildError, match=r"give a shorter --name"):
        build(model, "host", tmp_path / "out", name=name, jobs=1, quiet=True)
    assert not (tmp_path / "out").exists()
    build(model, "host", tmp_path / "out", name=name[1:], jobs=1, quiet=True)


def test_out_given_as_a_symlink_is_followed(tmp_path: Path) -> None:
    """An app project's folder linked in as --out gets the build; the link stays, and nothing
    is left over beside either."""
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    (tmp_path / "app" / "rt3d").mkdir(parents=True)
    (tmp_path / "outs").mkdir()
    link = tmp_path / "outs" / "build"
    link.symlink_to(tmp_path / "app" / "rt3d")
    build(model, "host", link, jobs=1, quiet=True)
    assert link.is_symlink() and (tmp_path / "app" / "rt3d" / "manifest.json").is_file()
    assert sorted(p.name for p in (tmp_path / "outs").iterdir()) == ["build"]
    assert sorted(p.name for p in (tmp_path / "app").iterdir()) == ["rt3d"]
    assert (tmp_path / "app" / "rt3d").stat().st_mode & 0o777 == default_mode()


def test_out_linked_to_the_users_files_is_refused(tmp_path: Path) -> None:
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "main.cpp").write_text("int main() {}\n")
    (tmp_path / "build").symlink_to(tmp_path / "app")
    with pytest.raises(BuildError, match="not an rt3d_halide build"):
        build(model, "host", tmp_path / "build", jobs=1, quiet=True)
    assert sorted(p.name for p in (tmp_path / "app").iterdir()) == ["main.cpp"]


def test_a_model_inside_out_is_refused(tmp_path: Path) -> None:
    """The build replaces --out whole: a model kept in an earlier build's folder would go."""
    first = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    build(first, "host", tmp_path / "out", jobs=1, quiet=True)
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "out" / "m.onnx")
    with pytest.raises(BuildError, match=r"lies inside --out .*, which the build replaces whole"):
        build(model, "host", tmp_path / "out", jobs=1, quiet=True)
    assert model.is_file() and (tmp_path / "out" / "manifest.json").is_file()


def test_out_a_symlink_to_nothing_is_refused_before_compiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = F.save(F.one_conv_model(_weight(), CLIP), tmp_path / "m.onnx")
    dangling = tmp_path / "build"
    dangling.symlink_to(tmp_path / "gone")
    monkeypatch.setattr(rt3d_build, "compile_layers", _no_compile)
    with pytest.raises(BuildError, match="a symlink to nothing"):
        build(model, "host", dangling, jobs=1, quiet=True)
