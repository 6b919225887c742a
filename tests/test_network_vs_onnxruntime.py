"""The embedded default model built for the host against onnxruntime running the same ONNX file.

onnxruntime is the network's end-to-end reference (DESIGN.md): every built function is fed the
tensor onnxruntime computed at its Conv's input and must give the tensor onnxruntime computed at
its output (after the fused Relu), so the whole network as the app runs it (our functions, its own
host ops between them) matches, layer by layer, on sparse and dense code alike.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import AttributeProto, TensorProto, helper, numpy_helper, shape_inference

import rt3d_halide
from rt3d_halide.build import DEFAULT_MODEL, batch_bound_reshapes, build
from rt3d_halide.onnx_import import plan_model


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> rt3d_halide.BuiltModel:
    out = tmp_path_factory.mktemp("default") / "build"
    return rt3d_halide.load(build(DEFAULT_MODEL, "host", out, jobs=1, quiet=True))


def _onnxruntime_tensors(names: set[str], clip: np.ndarray) -> dict[str, np.ndarray]:
    """Every tensor in ``names`` as onnxruntime computes it on ``clip`` (NCDHW), the clip itself
    for the graph's input."""
    model = shape_inference.infer_shapes(onnx.load(str(DEFAULT_MODEL)))
    (graph_input,) = [i.name for i in model.graph.input]
    known = {v.name: v for v in [*model.graph.value_info, *model.graph.output]}
    present = {o.name for o in model.graph.output}
    wanted = sorted(names - {graph_input})
    model.graph.output.extend(known[n] for n in wanted if n not in present)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    tensors = dict(zip(wanted, session.run(wanted, {graph_input: clip}), strict=True))
    return tensors | {graph_input: clip}


def test_every_built_layer_matches_onnxruntime(built: rt3d_halide.BuiltModel) -> None:
    functions = built.manifest["functions"]
    assert {f["kernel"] for f in functions} == {"dense", "sparse"}
    shape = built.manifest["model_input"]["shape"]
    clip = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    names = {f[side]["onnx_tensor"] for f in functions for side in ("input", "output")}
    tensors = _onnxruntime_tensors(names, clip)
    for f in functions:
        x = np.ascontiguousarray(tensors[f["input"]["onnx_tensor"]].transpose(0, 2, 3, 4, 1))
        ref = tensors[f["output"]["onnx_tensor"]].transpose(0, 2, 3, 4, 1)
        out = built[f["name"]](x, out=np.full(ref.shape, np.nan, np.float32))
        assert not np.isnan(out).any(), f["name"]
        scale = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2)))
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * scale, err_msg=f["name"])


def _assert_steps_give_the_models_output(
    built: rt3d_halide.BuiltModel, model_path: Path, clip: np.ndarray
) -> None:
    """``BuiltModel.run``: the steps in order, the host ops as the manifest gives them (op,
    tensors, attributes, constants, ``host_weights.bin``, the file's opset) run by onnxruntime
    one by one, against onnxruntime on the whole ONNX file."""
    manifest = built.manifest
    got = built.run(clip)
    (output,) = manifest["model_outputs"]
    assert output["layout"] == "as in the ONNX graph" and "function" not in output
    assert manifest["onnx_opset"] == onnx.load(str(model_path)).opset_import[0].version
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    (expected,) = session.run([output["name"]], {manifest["model_input"]["name"]: clip})
    assert list(expected.shape[1:]) == output["shape"][1:]
    np.testing.assert_allclose(got[output["name"]], expected, rtol=1e-4, atol=1e-4)


def test_the_manifests_steps_run_the_whole_network(built: rt3d_halide.BuiltModel) -> None:
    """The embedded model (pools, Flatten, Gemm heads between and after its functions)."""
    functions = [f["name"] for f in built.manifest["functions"]]
    assert [s["function"] for s in built.manifest["steps"] if "function" in s] == functions
    assert sorted(s["host_op"] for s in built.manifest["steps"] if "host_op" in s) == list(
        range(len(built.manifest["host_ops"]))
    )
    clip = np.random.default_rng(1).standard_normal(built.manifest["model_input"]["shape"])
    _assert_steps_give_the_models_output(built, DEFAULT_MODEL, clip.astype(np.float32))


class _Flattened(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 2 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


def test_steps_run_torchs_batch_arithmetic(tmp_path: Path) -> None:
    """A dynamic batch exports as Shape, Gather and a Reshape fed by Constant nodes: run from
    host_ops and host_constants, on a batch of 3."""
    torch.manual_seed(0)
    path = tmp_path / "flat.onnx"
    clip = torch.randn(1, 3, 2, 4, 4)
    torch.onnx.export(
        _Flattened().eval(), (clip,), str(path), input_names=["clip"], output_names=["logits"],
        dynamic_axes={"clip": {0: "batch"}}, opset_version=17, dynamo=False,
    )  # fmt: skip
    built = rt3d_halide.load(build(path, "host", tmp_path / "out", jobs=1, quiet=True))
    assert built.manifest["host_constants"]  # the Reshape's shape pieces
    batch = np.random.default_rng(2).standard_normal((3, 3, 2, 4, 4)).astype(np.float32)
    _assert_steps_give_the_models_output(built, path, batch)


class _NonLocal(torch.nn.Module):
    """A non-local block (I3D-NL, SlowFast-NL): the clip flattened and viewed back by its
    sizes, which a dynamic batch exports as Shape, Gather and Concat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv3d(3, 8, 3, padding=1)
        self.theta, self.phi, self.g = (torch.nn.Conv3d(8, 4, 1) for _ in range(3))
        self.out = torch.nn.Conv3d(4, 8, 1)
        self.head = torch.nn.Conv3d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        b, _, t, h, w = x.shape
        theta, phi, g = (conv(x).view(b, 4, -1) for conv in (self.theta, self.phi, self.g))
        attention = torch.softmax(theta.transpose(1, 2) @ phi, -1)
        x = self.head(x + self.out((g @ attention.transpose(1, 2)).view(b, 4, t, h, w)))
        return x.mean(dim=(2, 3, 4))


def test_a_conv_after_a_view_of_a_dynamic_batch_builds(tmp_path: Path) -> None:
    """Shape inference gave the conv after the view no sizes (its Reshape's shape is computed)
    and the build asked for a fixed clip size, which the model had: the batch alone is
    dynamic."""
    torch.manual_seed(0)
    path = tmp_path / "nonlocal.onnx"
    torch.onnx.export(
        _NonLocal().eval(), (torch.randn(1, 3, 2, 4, 4),), str(path), input_names=["clip"],
        output_names=["y"], dynamic_axes={"clip": {0: "batch"}}, opset_version=17, dynamo=False,
    )  # fmt: skip
    built = rt3d_halide.load(build(path, "host", tmp_path / "out", jobs=1, quiet=True))
    assert len(built) == 6
    batch = np.random.default_rng(3).standard_normal((2, 3, 2, 4, 4)).astype(np.float32)
    _assert_steps_give_the_models_output(built, path, batch)


class _MobileActivations(torch.nn.Module):
    """The activations and gates mobile video models put between their convs."""

    def __init__(self) -> None:
        super().__init__()
        conv = torch.nn.Conv3d
        pointwise = [conv(8, 8, 1) for _ in range(4)]
        self.convs = torch.nn.ModuleList([conv(3, 8, 3, padding=1), *pointwise])
        self.acts = torch.nn.ModuleList(
            [torch.nn.ReLU6(), torch.nn.LeakyReLU(0.1), torch.nn.SiLU(), torch.nn.Hardswish()]
        )
        self.gate = conv(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs[0](x)
        for conv, act in zip(self.convs[1:], self.acts, strict=True):
            x = conv(act(x))
        squeezed = x.mean(dim=(2, 3, 4), keepdim=True)
        x = x * torch.sigmoid(self.gate(squeezed)) + torch.nn.functional.hardsigmoid(x)
        x = torch.nn.functional.gelu(torch.tanh(x)) - x.amax(dim=1, keepdim=True)
        return x / 2.0


@pytest.mark.parametrize(("opset", "gelu"), [(17, "Erf"), (20, "Gelu")])
def test_steps_run_mobile_activations(tmp_path: Path, opset: int, gelu: str) -> None:
    """ReLU6, LeakyReLU, SiLU, Hardswish, a squeeze-excitation gate, Hardsigmoid, Tanh, GELU
    and amax export as host ops the app runs; run from the manifest, they give the model's
    output. GELU is one Gelu op from opset 20, torch 2.13's default (it was refused)."""
    torch.manual_seed(0)
    path = tmp_path / "acts.onnx"
    clip = torch.randn(1, 3, 2, 6, 6)
    torch.onnx.export(
        _MobileActivations().eval(), (clip,), str(path), input_names=["clip"],
        output_names=["out"], opset_version=opset, dynamo=False,
    )  # fmt: skip
    built = rt3d_halide.load(build(path, "host", tmp_path / "out", jobs=1, quiet=True))
    ops = {op["op"] for op in built.manifest["host_ops"]}
    assert {"Clip", "LeakyRelu", "Sigmoid", "HardSwish", "HardSigmoid", "Tanh", gelu} <= ops
    assert {"Mul", "Sub", "Div", "ReduceMax"} <= ops
    _assert_steps_give_the_models_output(built, path, clip.numpy())


class _ThreeOutputs(torch.nn.Module):
    """A function's output, a host op's and a tensor of the file (a label table)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, 3, padding=1)
        self.register_buffer("labels", torch.arange(5.0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = self.conv(x)
        return y, y.mean(dim=(2, 3, 4)), self.labels


def test_run_gives_every_output_as_onnxruntime_does(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "three.onnx"
    clip = torch.randn(1, 3, 2, 4, 4)
    names = ["features", "pooled", "labels"]
    torch.onnx.export(
        _ThreeOutputs().eval(), (clip,), str(path), input_names=["clip"], output_names=names,
        opset_version=17, dynamo=False,
    )  # fmt: skip
    built = rt3d_halide.load(build(path, "host", tmp_path / "out", jobs=1, quiet=True))
    outputs = {o["name"]: o for o in built.manifest["model_outputs"]}
    assert outputs[names[0]]["layout"] == "NTHWC" and outputs[names[0]]["function"]
    assert outputs[names[2]]["stored"] and "stored" not in outputs[names[1]]
    got = built.run(clip.numpy())
    assert got["labels"].flags.writeable  # a copy, not a view of the build's weights
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for name, expected in zip(names, session.run(names, {"clip": clip.numpy()}), strict=True):
        np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-5, err_msg=name)


def test_omitted_optional_inputs_and_outputs_and_the_clip_as_an_output(tmp_path: Path) -> None:
    """A Clip with no min ("" for its input) and a Dropout whose mask output is "" run as
    onnxruntime runs them (an empty name was looked up as a tensor); the graph's input given
    as an output is a copy, not the caller's clip (which the caller may change next)."""
    import onnx_factory as F
    from onnx import TensorProto, helper, numpy_helper

    limit = numpy_helper.from_array(np.float32(0.5), "limit_value")
    extra = [
        helper.make_node("Constant", [], ["limit"], value=limit),
        helper.make_node("Clip", ["y", "", "limit"], ["z"], name="clip_max"),
        helper.make_node("Dropout", ["z"], ["d", ""], name="drop"),
    ]
    model = F.one_conv_model(F.conv_weight(4, 8), [1, 8, 4, 6, 6], extra_nodes=extra, output="d")
    model.graph.output.append(
        helper.make_tensor_value_info("clip", TensorProto.FLOAT, [1, 8, 4, 6, 6])
    )
    path = F.save(model, tmp_path / "m.onnx")
    built = rt3d_halide.load(build(path, "host", tmp_path / "out", jobs=1, quiet=True))
    clip = np.random.default_rng(0).standard_normal([1, 8, 4, 6, 6]).astype(np.float32)
    got = built.run(clip)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (expected,) = session.run(["d"], {"clip": clip})
    np.testing.assert_allclose(got["d"], expected, rtol=1e-5, atol=1e-5)
    assert got["clip"] is not clip
    np.testing.assert_array_equal(got["clip"], clip)


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_reshape_fixed_to_the_exported_batch_is_named(tmp_path: Path, capsys, dynamic) -> None:
    """Exported without a dynamic batch axis, x.view(x.size(0), -1) becomes a Reshape to
    [1, -1]: the build says that batch is fixed there; with the axis there is nothing to say."""
    path = tmp_path / "flat.onnx"
    axes = {"dynamic_axes": {"clip": {0: "batch"}}} if dynamic else {}
    torch.onnx.export(
        _Flattened().eval(), (torch.randn(1, 3, 2, 4, 4),), str(path), input_names=["clip"],
        output_names=["logits"], opset_version=17, dynamo=False, **axes,
    )  # fmt: skip
    build(path, "host", tmp_path / "out", jobs=1, quiet=True)  # notes show all the same
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    if dynamic:
        assert notes == []
    else:
        (note,) = notes
        assert "reshapes to [1, -1]: the exported batch of 1 is fixed there" in note


def test_a_reshape_to_a_stored_shape_of_the_exported_batch_is_named(tmp_path: Path) -> None:
    """The shape a stored tensor rather than a Constant (other exporters, or folded)."""
    from onnx_factory import conv_weight, one_conv_model

    reshape = helper.make_node("Reshape", ["y", "flat"], ["f"], name="flatten")
    model = one_conv_model(conv_weight(4, 8), [1, 8, 4, 6, 6], extra_nodes=[reshape], output="f")
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, -1]), "flat"))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("f", TensorProto.FLOAT, [1, None]))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    (note,) = batch_bound_reshapes(plan_model(path))
    assert note.startswith("host op 'flatten' reshapes to [1, -1]: the exported batch of 1 is")


def test_a_reshape_of_a_stored_tensor_is_not_named(tmp_path: Path) -> None:
    """A stored scale reshaped to [1, C, 1, 1, 1] to broadcast holds no batch: it was named as
    fixing the exported batch."""
    from onnx_factory import conv_weight, one_conv_model

    nodes = [
        helper.make_node("Reshape", ["scale", "shape"], ["s"], name="scale_shape"),
        helper.make_node("Mul", ["y", "s"], ["f"], name="scaled"),
    ]
    model = one_conv_model(conv_weight(4, 8), [1, 8, 4, 6, 6], extra_nodes=nodes, output="f")
    model.graph.initializer.append(numpy_helper.from_array(np.ones(4, np.float32), "scale"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1, 4, 1, 1, 1]), "shape"))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    plan = plan_model(path)
    assert [op["op"] for op in plan.host_ops] == ["Reshape", "Mul"]
    assert batch_bound_reshapes(plan) == []


def test_run_checks_the_clip_before_any_step(built: rt3d_halide.BuiltModel, monkeypatch) -> None:
    shape = list(built.manifest["model_input"]["shape"])
    with pytest.raises(TypeError, match="float32 numpy array"):
        built.run(np.zeros(shape, np.float64))
    channels_last = [shape[0], *shape[2:], shape[1]]
    hint = r"N, T, H, W, C clip\? transpose it: clip\.transpose\(0, 4, 1, 2, 3\)$"
    with pytest.raises(ValueError, match=hint):
        built.run(np.zeros(channels_last, np.float32))
    named = [shape[0], shape[1], "T", *shape[3:]]  # a dynamic frame axis matches any size
    monkeypatch.setitem(built.manifest["model_input"], "shape", named)
    with pytest.raises(ValueError, match=hint):
        built.run(np.zeros(channels_last, np.float32))
    monkeypatch.setitem(built.manifest["model_input"], "shape", shape[:4])
    with pytest.raises(ValueError, match=r"the model takes .*named, a dynamic one\)$"):
        built.run(np.zeros(channels_last, np.float32))  # no hint where no 5-D layout is known
    monkeypatch.setitem(built.manifest["model_input"], "shape", [64])  # a flat input
    with pytest.raises(ValueError, match=r"the model takes \[64\] .*named, a dynamic one\)$"):
        built.run(np.zeros(channels_last, np.float32))
    monkeypatch.setitem(built.manifest["model_input"], "shape", list(shape))
    shape[1] += 1
    with pytest.raises(ValueError, match=r"the model takes .*named, a dynamic one\)$"):
        built.run(np.zeros(shape, np.float32))
    # Exported with batch 1 (a Reshape may hold it), the model runs no other batch.
    shape[0], shape[1] = 2, shape[1] - 1
    with pytest.raises(ValueError, match=r"another batch where the file's batch axis is named"):
        built.run(np.zeros(shape, np.float32))
    monkeypatch.delitem(built.manifest, "onnx_opset")  # a build made before it was recorded
    with pytest.raises(ValueError, match="build it again to run the whole model"):
        built.run(np.zeros([1, *shape[1:]], np.float32))


def test_run_passes_channels_last_between_functions(built, monkeypatch) -> None:
    """A function whose input is the previous function's output gets that very array,
    channels innermost, as an app hands it on: no round trip through the graph's layout."""
    from rt3d_halide.runtime import LayerFunction

    seen: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    call = LayerFunction.__call__

    def recording(fn, x, out=None):
        y = call(fn, x, out)
        seen[fn.name] = (x, y)
        return y

    monkeypatch.setattr(LayerFunction, "__call__", recording)
    built.run(np.zeros(built.manifest["model_input"]["shape"], np.float32))
    by_output = {f["output"]["onnx_tensor"]: f["name"] for f in built.manifest["functions"]}
    chained = 0
    for f in built.manifest["functions"]:
        source = by_output.get(f["input"]["onnx_tensor"])
        if source is not None:
            chained += 1
            assert seen[f["name"]][0] is seen[source][1], f["name"]
    assert chained  # the embedded model has consecutive functions


def test_a_build_written_again_after_load_is_named_not_mixed(tmp_path: Path) -> None:
    """load() links the functions at once and run() reads the host ops' weights later: a
    rebuild in place between the two would have run the earlier functions on the new weights."""
    out = build(DEFAULT_MODEL, "host", tmp_path / "build", jobs=1, quiet=True)
    model = rt3d_halide.load(out)
    clip = np.zeros(model.manifest["model_input"]["shape"], np.float32)
    build(DEFAULT_MODEL, "host", out, jobs=1, quiet=True)
    with pytest.raises(ValueError, match="written again since the build was loaded"):
        model.run(clip)
    assert rt3d_halide.load(out).run(clip)
    # Same size, a new file given the old time (a copy that kept it); then the same file
    # written in place at another time: either is another version of the weights.
    weights = out / "host_weights.bin"
    model, data, old = rt3d_halide.load(out), weights.read_bytes(), weights.stat()
    (out / "copy.bin").write_bytes(data)
    os.utime(out / "copy.bin", ns=(old.st_atime_ns, old.st_mtime_ns))
    (out / "copy.bin").replace(weights)
    with pytest.raises(ValueError, match="written again since the build was loaded"):
        model.run(clip)
    model, old = rt3d_halide.load(out), weights.stat()
    with weights.open("r+b") as file:
        file.write(data)
    os.utime(weights, ns=(old.st_atime_ns, old.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="written again since the build was loaded"):
        model.run(clip)
    (out / "host_weights.bin").unlink()
    with pytest.raises(ValueError, match=r"missing; build .* again"):
        rt3d_halide.load(out).run(clip)


def test_a_build_loaded_by_a_relative_path_runs_after_a_chdir(
    built: rt3d_halide.BuiltModel, tmp_path: Path, monkeypatch
) -> None:
    """run() reads the host ops' weights at its first call, from the path load() was given:
    relative, after a chdir it named them "removed since the build was loaded"."""
    monkeypatch.chdir(built.build_dir.parent)
    model = rt3d_halide.load(built.build_dir.name)
    assert model.build_dir == built.build_dir
    monkeypatch.chdir(tmp_path)
    clip = np.random.default_rng(0).standard_normal(model.manifest["model_input"]["shape"])
    clip = clip.astype(np.float32)
    expected = built.run(clip)
    got = model.run(clip)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)


def test_a_short_host_weights_file_is_named(built: rt3d_halide.BuiltModel, monkeypatch) -> None:
    index = built.manifest["host_weights"]
    name, entry = next(iter(index["tensors"].items()))
    monkeypatch.setitem(index["tensors"], name, {**entry, "offset": 10**12})
    monkeypatch.setattr(built, "_network", None)
    with pytest.raises(ValueError, match=f"the manifest's '{name}' ends at byte"):
        built.run(np.zeros(built.manifest["model_input"]["shape"], np.float32))


def test_a_loaded_model_says_it_cannot_be_pickled(built: rt3d_halide.BuiltModel) -> None:
    import copy
    import pickle

    for thing in (built, next(iter(built.values()))):
        with pytest.raises(TypeError, match=r"call rt3d_halide.load\(build_dir\) in each process"):
            pickle.dumps(thing)
    with pytest.raises(TypeError, match="cannot be pickled or copied"):
        copy.deepcopy(built)


def test_a_child_forked_during_a_call_can_call(built: rt3d_halide.BuiltModel) -> None:
    """The child inherited the library's call lock held by the parent's calling thread, which
    it does not have: its first call waited forever (a multiprocessing fork pool beside a
    thread that calls the model)."""
    fn = next(iter(built.values()))
    clip = np.zeros((1, *fn.entry["input"]["shape"][1:]), np.float32)
    with built._shared.lock:  # as a call in another thread holds it
        child = os.fork()
        if child == 0:
            code = 1
            try:
                code = 0 if np.isfinite(fn(clip)).all() else 1
            finally:
                os._exit(code)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(child, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    assert done[0] == child and os.waitstatus_to_exitcode(done[1]) == 0, "the child's call hung"


def test_run_names_an_empty_clip(built: rt3d_halide.BuiltModel) -> None:
    shape = [0, *built.manifest["model_input"]["shape"][1:]]
    with pytest.raises(ValueError, match=r"c3d_small_kgs: the clip holds no sample \(batch 0\)"):
        built.run(np.zeros(shape, np.float32))


def test_run_takes_any_batch_where_the_file_writes_minus_one(tmp_path: Path) -> None:
    """Some exporters write a dynamic batch as -1 rather than naming the axis."""
    from onnx_factory import two_conv_model

    path = tmp_path / "m.onnx"
    onnx.save(two_conv_model(cin=4, mid=8, cout=4, clip=(-1, 4, 4, 8, 8)), path)
    model = rt3d_halide.load(build(path, "host", tmp_path / "out", jobs=1, quiet=True))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 2):
        clip = np.random.default_rng(batch).random((batch, 4, 4, 8, 8), np.float32)
        (got,) = model.run(clip).values()
        (expected,) = session.run(None, {session.get_inputs()[0].name: clip})
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _conv_then(
    nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], outputs: dict[str, int], opset: int
) -> onnx.ModelProto:
    """A 1x1x1 conv of a (2, 3, 4, 5, 5) clip to ``y``, then ``nodes``; ``outputs`` by rank.
    The conv is the same in every such model: built once, then taken from the compile cache."""
    tensors = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3, 1, 1, 1), **inits}
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Conv", ["clip", "w"], ["y"], name="conv"), *nodes], "g",
        [info("clip", TensorProto.FLOAT, [2, 3, 4, 5, 5])],
        [info(name, TensorProto.FLOAT, [None] * rank) for name, rank in outputs.items()],
        [numpy_helper.from_array(array, name) for name, array in tensors.items()],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _built(tmp_path: Path, model: onnx.ModelProto) -> rt3d_halide.BuiltModel:
    path = tmp_path / "host_ops.onnx"
    onnx.save(model, path)
    return rt3d_halide.load(build(path, "host", tmp_path / "out", jobs=1, quiet=True))


def _assert_runs_as_onnxruntime(built: rt3d_halide.BuiltModel) -> None:
    """Every output of the built model's steps against onnxruntime on the whole file."""
    clip = np.random.default_rng(3).standard_normal((2, 3, 4, 5, 5)).astype(np.float32)
    got = built.run(clip)
    session = ort.InferenceSession(
        built.manifest["source"]["path"], providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    for name, expected in zip(names, session.run(names, {"clip": clip}), strict=True):
        np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_host_ops_of_an_older_opset_run_as_onnxruntime_runs_them(tmp_path: Path) -> None:
    """Ops no exported test model holds, at opset 12, whose Softmax (over every axis from
    ``axis`` on before opset 13) and Squeeze (axes an attribute) the file's opset decides:
    Constants of value_float(s) and value_ints, an Identity of an activation, a MaxPool of
    auto_pad SAME_UPPER (a string attribute), an AveragePool counting its padding, Transpose,
    Softmax, ReduceMean, Squeeze and MatMul."""
    make = helper.make_node
    nodes = [
        make("Constant", [], ["half"], value_float=0.5),
        make("Constant", [], ["scales"], value_floats=[0.5, 1.0, 2.0, -1.0]),
        make("Constant", [], ["per_channel"], value_ints=[4, 1, 1, 1]),
        make("Add", ["y", "half"], ["shifted"], name="add"),
        make("Reshape", ["scales", "per_channel"], ["scale"], name="reshape"),
        make("Mul", ["shifted", "scale"], ["scaled"], name="mul"),
        make("Identity", ["scaled"], ["same"], name="identity"),
        # 5 positions: SAME_UPPER pools 3 windows, no padding 2.
        make("MaxPool", ["same"], ["max"], name="max", kernel_shape=[2] * 3, strides=[2] * 3,
             auto_pad="SAME_UPPER"),
        make("AveragePool", ["max"], ["avg"], name="avg", kernel_shape=[2] * 3,
             pads=[1, 1, 1, 0, 0, 0], count_include_pad=1),
        make("Transpose", ["avg"], ["last"], name="transpose", perm=[0, 2, 3, 4, 1]),
        make("Softmax", ["last"], ["soft"], name="softmax", axis=1),
        make("ReduceMean", ["soft"], ["mean"], name="mean", axes=[1, 2, 3], keepdims=1),
        make("Squeeze", ["mean"], ["features"], name="squeeze", axes=[1, 2, 3]),
        make("MatMul", ["features", "fc"], ["logits"], name="matmul"),
    ]  # fmt: skip
    fc = np.linspace(-2, 2, 20, dtype=np.float32).reshape(4, 5)
    built = _built(tmp_path, _conv_then(nodes, {"fc": fc}, {"logits": 2}, 12))
    assert built.manifest["onnx_opset"] == 12
    _assert_runs_as_onnxruntime(built)


def test_an_empty_list_attribute_runs(tmp_path: Path) -> None:
    """ReduceMean's axes=[] (opset 13: every axis) gives JSON no type to infer: the attribute
    takes its type from the op's schema (onnx.helper could not make the node)."""
    mean = helper.make_node("ReduceMean", ["y"], ["mean"], name="mean", keepdims=1)
    mean.attribute.append(helper.make_attribute("axes", [], attr_type=AttributeProto.INTS))
    built = _built(tmp_path, _conv_then([mean], {}, {"mean": 5}, 13))
    assert built.manifest["host_ops"][0]["attributes"] == {"axes": [], "keepdims": 1}
    _assert_runs_as_onnxruntime(built)


def test_trailing_empty_outputs_are_left_out(tmp_path: Path, monkeypatch) -> None:
    """An inference BatchNormalization as opset 9 may list it, outputs ["z", "", "", "", ""]:
    onnxruntime's session of that node crashed the process. The manifest leaves them out (they
    mean what no outputs mean), and so does the run of an earlier build's manifest."""
    stats = {"s": [1, 2, 0.5, 1], "b": [0, 1, -1, 0.5], "mean": [0.1, 0.2, 0.3, 0.4]}
    inits = {n: np.array(v, np.float32) for n, v in {**stats, "var": [1, 2, 3, 4]}.items()}
    outputs = ["z", "", "", "", ""]
    bn = helper.make_node("BatchNormalization", ["y", *inits], outputs, name="bn")
    built = _built(tmp_path, _conv_then([bn], inits, {"z": 5}, 9))
    (op,) = built.manifest["host_ops"]
    assert op["outputs"] == ["z"]
    _assert_runs_as_onnxruntime(built)
    monkeypatch.setitem(op, "outputs", outputs)
    monkeypatch.setattr(built, "_network", None)
    _assert_runs_as_onnxruntime(built)
