"""What the build reads from an ONNX graph beyond the Conv nodes themselves: constants passed
through Identity nodes, and the names its functions take."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_factory as F
import onnxruntime as ort
import pytest
import torch
from conv_harness import ConvCase, reference, relative_error
from onnx import helper, numpy_helper

import rt3d_halide
from rt3d_halide.build import build
from rt3d_halide.errors import BuildError
from rt3d_halide.onnx_import import layer_label, plan_model


def test_bias_through_identity_of_an_initializer(tmp_path: Path) -> None:
    """torch's exporter stores equal constants once and feeds the other users through Identity
    nodes: conv_b takes conv_a's bias that way, and the build bakes it like any initializer."""
    model = F.two_conv_model(cin=8, mid=8, cout=8, clip=(1, 8, 4, 6, 6))
    graph = model.graph
    graph.node.insert(0, helper.make_node("Identity", ["conv_a.bias"], ["shared_bias"], name="id"))
    conv_b = next(n for n in graph.node if n.name == "conv_b")
    conv_b.input.append("shared_bias")
    path = F.save(model, tmp_path / "m.onnx")
    plan = plan_model(path)
    assert [layer.spec.has_bias for layer in plan.layers] == [True, True]
    assert plan.host_ops == []  # nothing for the app to run: the Identity is resolved

    built = rt3d_halide.load(build(path, "host", tmp_path / "out", jobs=1, quiet=True))
    weights = F.two_conv_weights(8, 8, 8)
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 6, 8)).astype(np.float32)
    hidden = built["m_conv_a"](x)
    got = built["m_conv_b"](hidden, out=np.full((1, 4, 2, 2, 8), np.nan, np.float32))
    conv_b_case = ConvCase(8, 8, (4, 6, 6), (1, 3, 3), stride=(1, 2, 2))
    ref = reference(conv_b_case, hidden, weights["conv_b.weight"], weights["conv_a.bias"])
    assert relative_error(got, ref) < 1e-5


@pytest.mark.parametrize(
    ("node", "weight", "label"),
    [
        ("/conv1.0.3_1/Conv", "layer1.1.conv1.0.3.weight", "layer1.1.conv1.0.3"),
        ("/layer1/conv1/Conv", "onnx::Conv_123", "layer1_conv1"),
        ("conv_b", "w", "conv_b"),
        ("/stem.0/Conv", "", "stem.0"),
        ("/layer1/layer1.0/conv1/conv1.0/Conv", "onnx::Conv_172", "layer1.0_conv1.0"),
        # A scope that only starts like the one before it is another module.
        ("/layer1/layer10/Conv", "", "layer1_layer10"),
        # Weights named like a module's but not of a module path: the node's path.
        ("/stem/Conv", "onnx::stem.weight", "stem"),
        ("/block/Conv", "conv.weight_v", "block"),
        ("/Conv", "", "Conv"),
    ],
    ids=[
        "module-weight",
        "anonymous-weight",
        "plain-weight",
        "no-weight-name",
        "nested-scopes",
        "sibling-scopes",
        "weight-not-a-module-path",
        "weight-past-weight",
        "op-alone",
    ],
)
def test_function_label_prefers_the_weights_module_path(node: str, weight: str, label: str):
    assert layer_label(node, weight) == label


class _Head(torch.nn.Module):
    """A conv, an activation, and a classifier over the flattened features: the head every
    exported video model has."""

    def __init__(self, activation: torch.nn.Module) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, 3, padding=1)
        self.act = activation
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(8 * 4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.conv(x)))
        return self.fc(x.view(x.size(0), -1))


def _exported(path: Path, model: torch.nn.Module, **options: object) -> Path:
    options.setdefault("opset_version", 17)
    torch.onnx.export(
        model, torch.randn(1, 3, 4, 6, 6), path, dynamo=False, input_names=["clip"], **options
    )
    return path


def _assert_builds_the_heads_conv(path: Path, model: _Head, tmp_path: Path, batch: int) -> None:
    """The built model's one function (the head's conv and its fused ReLU) against torch's,
    every output written."""
    (fn,) = rt3d_halide.load(build(path, "host", tmp_path / "out", jobs=1, quiet=True)).values()
    x = np.random.default_rng(0).standard_normal((batch, 4, 6, 6, 3)).astype(np.float32)
    with torch.no_grad():
        ref = torch.relu(model.conv(torch.from_numpy(x).permute(0, 4, 1, 2, 3)))
    ref = ref.permute(0, 2, 3, 4, 1).numpy()
    got = fn(x, out=np.full(ref.shape, np.nan, np.float32))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_torchs_default_opset_builds(tmp_path: Path) -> None:
    """What ``torch.onnx.export(..., dynamo=False)`` writes without an opset (20 in torch 2.13)
    builds to the same conv as opset 17."""
    torch.manual_seed(0)
    model = _Head(torch.nn.ReLU()).eval()
    path = _exported(tmp_path / "head.onnx", model, opset_version=None)
    assert onnx.load(path).opset_import[0].version > 17
    _assert_builds_the_heads_conv(path, model, tmp_path, batch=1)


def test_a_training_mode_export_is_refused(tmp_path: Path) -> None:
    """Dropout that drops and BatchNorm over the batch's statistics are training, not
    inference: handed to the app as exported, they would run as such."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Head(torch.nn.ReLU()))
    training = {"training": torch.onnx.TrainingMode.TRAINING, "do_constant_folding": False}
    path = _exported(tmp_path / "head.onnx", model.train(), **training)
    with pytest.raises(BuildError, match=r"node '/0/drop/Dropout': Dropout in training mode"):
        plan_model(path)
    bn = torch.nn.Sequential(torch.nn.Conv3d(3, 8, 3), torch.nn.BatchNorm3d(8)).train()
    for opset in (13, 17):  # training outputs before opset 14, the training_mode attribute after
        path = _exported(tmp_path / f"bn{opset}.onnx", bn, opset_version=opset, **training)
        with pytest.raises(BuildError, match=r"BatchNormalization in training mode: export the"):
            plan_model(path)


@pytest.mark.parametrize("op", ["BatchNormalization", "Dropout"])
@pytest.mark.parametrize("is_test", [None, 0, 1])
def test_before_opset_7_is_test_decides_training(tmp_path: Path, op: str, is_test: int) -> None:
    """Before opset 7 BatchNormalization and Dropout train unless ``is_test`` is 1 (default 0),
    with no training_mode to read."""
    inits = [numpy_helper.from_array(F.conv_weight(4, 3, (1, 1, 1)), "w")]
    inputs = ["c"]
    if op == "BatchNormalization":
        for name in ("scale", "b", "mean", "var"):
            inits.append(numpy_helper.from_array(np.ones(4, np.float32), name))
        inputs += ["scale", "b", "mean", "var"]
    attrs = {} if is_test is None else {"is_test": is_test}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node(op, inputs, ["y"], name="old", **attrs),
    ]
    clip = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 2, 4, 4])
    model = F.finish(nodes, inits, [clip], "y")
    model.opset_import[0].version = 6
    path = F.save(model, tmp_path / "old.onnx")
    if is_test:
        assert [layer.node for layer in plan_model(path).layers] == ["conv"]
    else:
        match = rf"node 'old': {op} in training mode: set is_test=1 on the node, or re-export"
        with pytest.raises(BuildError, match=match):
            plan_model(path)


def _bn(outputs: list[str], **attrs: object) -> onnx.NodeProto:
    inputs = ["c", "scale", "b", "mean", "var"]
    return helper.make_node("BatchNormalization", inputs, outputs, name="bn", **attrs)


# id -> (opset, the node after the conv (to "y"), whether it trains)
TRAINING_CASES = {
    # An unused statistic is named "": one output, training by its attribute alone.
    "bn-training-mode-attribute": (17, _bn(["y", "", ""], training_mode=1), True),
    "bn-at-opset-7": (7, _bn(["y"]), False),  # no is_test from opset 7 on: inference
    "dropout-at-opset-7": (7, helper.make_node("Dropout", ["c"], ["y"], name="drop"), False),
    # A training_mode that is no constant (here the app's to give) may train.
    "dropout-training-mode-fed": (
        17,
        helper.make_node("Dropout", ["c", "", "training"], ["y"], name="drop"),
        True,
    ),
    "dropout-inputs-left-out": (
        17,
        helper.make_node("Dropout", ["c", "", ""], ["y"], name="drop"),
        False,
    ),
}


@pytest.mark.parametrize("case", list(TRAINING_CASES))
def test_training_mode_from_opset_7(tmp_path: Path, case: str) -> None:
    """From opset 7 (no is_test) BatchNormalization trains by its training_mode or the
    statistics it writes, Dropout by a training_mode input that is no constant false."""
    opset, node, trains = TRAINING_CASES[case]
    inits = [numpy_helper.from_array(F.conv_weight(4, 3, (1, 1, 1)), "w")]
    for name in ("scale", "b", "mean", "var"):
        inits.append(numpy_helper.from_array(np.ones(4, np.float32), name))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), node]
    inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 2, 4, 4])]
    if "training" in node.input:
        inputs.append(helper.make_tensor_value_info("training", onnx.TensorProto.BOOL, []))
    model = F.finish(nodes, inits, inputs, "y")
    model.opset_import[0].version = opset
    path = F.save(model, tmp_path / "m.onnx")
    if trains:
        match = rf"node '{node.name}': {node.op_type} in training mode: export the model in eval"
        with pytest.raises(BuildError, match=match):
            plan_model(path)
    else:
        assert [op["op"] for op in plan_model(path).host_ops] == [node.op_type]


class _Shifted(torch.nn.Module):
    def __init__(self, shift: float) -> None:
        super().__init__()
        self.conv, self.shift = torch.nn.Conv3d(3, 8, 3, padding=1), shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.shift


def test_a_host_ops_constant_that_is_not_finite_is_refused(tmp_path: Path) -> None:
    """Its values would go into manifest.json, which JSON cannot hold as NaN."""
    path = _exported(tmp_path / "shifted.onnx", _Shifted(float("nan")).eval())
    with pytest.raises(BuildError, match=r"node '/Add': .* holds 1 NaN or Inf"):
        plan_model(path)
    plan = plan_model(_exported(tmp_path / "fine.onnx", _Shifted(0.5).eval()))
    assert [c["values"] for c in plan.host_constants.values()] == [[0.5]]


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_host_ops_weight_that_is_not_finite_is_refused(tmp_path: Path, bad: float) -> None:
    """It would ship in host_weights.bin: the classifier's output, not the build, would fail."""
    torch.manual_seed(0)
    model = _Head(torch.nn.ReLU()).eval()
    with torch.no_grad():
        model.fc.weight[2, 7] = bad
    path = _exported(tmp_path / "head.onnx", model)
    with pytest.raises(BuildError, match=r"node '/fc/Gemm': 'fc\.weight' holds 1 NaN or Inf"):
        plan_model(path)


def test_constant_nodes_and_batch_arithmetic_of_torchs_exporter(tmp_path: Path) -> None:
    """torch's exporter feeds Reshape through Constant nodes, and a dynamic batch axis through
    Shape and Gather: the build reads the constants and leaves the shape arithmetic to the
    app, as it does the Reshape."""
    torch.manual_seed(0)
    model = _Head(torch.nn.ReLU()).eval()
    options = {"dynamic_axes": {"clip": {0: "batch"}}}
    path = _exported(tmp_path / "head.onnx", model, **options)
    plan = plan_model(path)
    assert "Constant" not in {op["op"] for op in plan.host_ops}
    assert {"Reshape", "Gemm"} <= {op["op"] for op in plan.host_ops}
    # What the app needs to run them: tensors by name (weights are the file's initializers)
    # and attributes.
    gemm = next(op for op in plan.host_ops if op["op"] == "Gemm")
    assert gemm["inputs"][1:] == ["fc.weight", "fc.bias"] and gemm["attributes"]["transB"] == 1
    # Every tensor a host op reads comes from a node, the file's initializers or the manifest.
    produced = {out for op in plan.host_ops for out in op["outputs"]}
    produced |= {layer.output_name for layer in plan.layers} | {plan.input_name}
    stored = {t.name for t in onnx.load(path).graph.initializer}
    assert not stored & plan.host_constants.keys()  # those are in host_weights, by their name
    assert plan.input_shape == ["batch", 3, 4, 6, 6]  # the axis as the file names it
    for op in plan.host_ops:
        for name in op["inputs"]:
            assert name in produced | stored | plan.host_constants.keys(), (op["node"], name)
    reshape = next(op for op in plan.host_ops if op["op"] == "Reshape")
    shape = plan.host_constants.get(reshape["inputs"][1])
    assert shape is None or shape["dtype"] == "int64"
    _assert_builds_the_heads_conv(path, model, tmp_path, batch=2)


class _Cube(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x**3


def test_an_unsupported_op_behind_constants_is_named(tmp_path: Path) -> None:
    """x**3 exports as Pow with a Constant exponent: the error names the Pow."""
    path = _exported(tmp_path / "cube.onnx", _Head(_Cube()).eval())
    with pytest.raises(BuildError, match=r"node '/act/Pow': op 'Pow' is not supported"):
        plan_model(path)


def test_every_unsupported_op_is_named_before_any_conv_check(tmp_path: Path) -> None:
    """A reflect-padded conv exports as shape arithmetic, a Pad and a Conv whose input shape
    the Pad leaves unknown: the error names the first unsupported op and the Pad, not the
    Conv's shape."""
    conv = torch.nn.Conv3d(3, 8, 3, padding=1, padding_mode="reflect")
    path = _exported(tmp_path / "reflect.onnx", torch.nn.Sequential(conv).eval())
    with pytest.raises(BuildError, match=r"is not supported .*in the model: .*'Pad' at '/0/Pad'"):
        plan_model(path)
    # The error leads with the Pad the user's padding mode made, not the shape arithmetic
    # that feeds it and comes first in the graph.
    with pytest.raises(BuildError, match=r"^node '/0/Pad': op 'Pad' is not supported"):
        plan_model(path)


def test_a_batch_of_minus_one_means_any_batch(tmp_path: Path) -> None:
    """Some converters write -1 for a free batch axis: it plans as one (0 is refused)."""
    model = F.one_conv_model(F.conv_weight(4, 8), [-1, 8, 4, 6, 6])
    (layer,) = plan_model(F.save(model, tmp_path / "m.onnx")).layers
    assert layer.spec.in_channels == 8


@pytest.mark.parametrize("op", ["Mul", "Pow"])
def test_a_weight_computed_in_the_graph_is_named_as_such(tmp_path: Path, op: str) -> None:
    """weight_norm's weight is g * v / ||v||, computed by nodes: reported against the Conv,
    not as the first op of its computation (nor as an unsupported op)."""
    model = F.two_conv_model()
    graph = model.graph
    weight = next(t for t in graph.initializer if t.name == "conv_a.weight")
    weight.name = "conv_a.v"
    graph.initializer.append(numpy_helper.from_array(np.float32(2.0), "conv_a.g"))
    graph.node.insert(0, helper.make_node(op, ["conv_a.v", "conv_a.g"], ["conv_a.weight"]))
    path = F.save(model, tmp_path / "norm.onnx")
    with pytest.raises(BuildError, match=r"node 'conv_a': weight 'conv_a.weight' is not a const"):
        plan_model(path)


def test_function_names_leave_room_for_the_opencl_fallback_header(tmp_path: Path) -> None:
    """rt3d_opencl_fallback.h defines rt3d_opencl_usable and more: a function of that name
    took the build to an app that did not compile."""
    model = F.two_conv_model()
    renames = {"conv_a.weight": "opencl_usable.weight"}
    for tensor in model.graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
    plan = plan_model(F.save(model, tmp_path / "m.onnx"), name="rt3d")
    assert [layer.spec.name for layer in plan.layers] == ["rt3d_opencl_usable_", "rt3d_conv_b"]
    with pytest.raises(BuildError, match=r"include/OPENCL_FALLBACK\.h is a header the builds ship"):
        plan_model(tmp_path / "m.onnx", name="OPENCL_FALLBACK")


@pytest.mark.parametrize(
    ("labels", "expected"),
    [(["conv", "conv_argv"], ["m_conv", "m_conv_argv_"]),
     (["conv_argv", "conv"], ["m_conv_argv", "m_conv_"])],
    ids=["wrapper-second", "wrapper-first"],
)  # fmt: skip
def test_function_names_leave_room_for_halides_own_symbols(tmp_path: Path, labels, expected):
    """Halide defines <fn>_argv and <fn>_metadata beside each function: a layer named like
    another's argv wrapper takes another name (one call reached the other's wrapper), and a
    layer whose wrapper another layer's name already is as well (the library did not link)."""
    model = F.two_conv_model()
    renames = {f"conv_{x}.weight": f"{label}.weight" for x, label in zip("ab", labels, strict=True)}
    for tensor in model.graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
    plan = plan_model(F.save(model, tmp_path / "m.onnx"), name="m")
    names = [layer.spec.name for layer in plan.layers]
    assert names == expected
    assert plan.renamed == {expected[1]: expected[1].removesuffix("_")}
    symbols = {n + suffix for n in names for suffix in ("", "_argv", "_metadata")}
    assert len(symbols) == 3 * len(names)


@pytest.mark.parametrize("reader", [None, "graph_output", "second_user"])
def test_relu_is_fused_only_where_nothing_else_reads_the_conv(tmp_path: Path, reader) -> None:
    """A Relu fused into its conv hides the conv's own output: it is fused only when that
    Relu is the output's one reader and the output is no graph output."""
    weight = F.conv_weight(4, 3, (3, 3, 3))
    nodes = [helper.make_node("Relu", ["y"], ["r"], name="relu")]
    output = "r"
    if reader == "second_user":
        nodes.append(helper.make_node("Add", ["y", "r"], ["s"], name="add"))
        output = "s"
    model = F.one_conv_model(weight, [1, 3, 4, 6, 6], {"pads": [1] * 6}, extra_nodes=nodes)
    model.graph.output[0].name = output
    if reader == "graph_output":
        model.graph.output.append(onnx.helper.make_tensor_value_info("y", 1, [1, 4, 4, 6, 6]))
    plan = plan_model(F.save(model, tmp_path / "m.onnx"))
    (layer,) = plan.layers
    fused = reader is None
    assert (layer.spec.relu, layer.output_name) == ((True, "r") if fused else (False, "y"))
    relus = [op for op in plan.host_ops if op["op"] == "Relu"]
    assert relus == ([] if fused else [{**relus[0], "inputs": ["y"], "outputs": ["r"]}])


@pytest.mark.parametrize(
    ("auto_pad", "stride", "dilation", "begin", "end", "size"),
    [
        # size 6, kernel 2: SAME pads 1 in all, the odd one after (UPPER) or before (LOWER).
        ("SAME_UPPER", 1, 1, 0, 1, 6),
        ("SAME_LOWER", 1, 1, 1, 0, 6),
        # dilation 2 spans 3: 2 in all, one each side.
        ("SAME_UPPER", 1, 2, 1, 1, 6),
        # stride 2: 3 outputs read (3 - 1) * 2 + 2 = 6 inputs, no padding.
        ("SAME_LOWER", 2, 1, 0, 0, 6),
        # size 7, stride 2: ceil(7 / 2) = 4 outputs read (4 - 1) * 2 + 2 = 8 inputs, one pad.
        ("SAME_UPPER", 2, 1, 0, 1, 7),
        # stride 2, dilation 2: (3 - 1) * 2 + 3 = 7 inputs, one pad (LOWER: before).
        ("SAME_LOWER", 2, 2, 1, 0, 6),
        ("VALID", 2, 2, 0, 0, 6),
    ],
)
def test_auto_pad_gives_onnx_padding_and_the_built_conv_matches_torch(
    tmp_path: Path, auto_pad: str, stride: int, dilation: int, begin: int, end: int, size: int
) -> None:
    weight = F.conv_weight(4, 3, (2, 2, 2))
    attrs = {"auto_pad": auto_pad, "strides": [stride] * 3, "dilations": [dilation] * 3}
    clip = [1, 3, size, size, size]
    path = F.save(F.one_conv_model(weight, clip, attrs), tmp_path / "m.onnx")
    (layer,) = plan_model(path).layers
    assert (list(layer.spec.pads_begin), list(layer.spec.pads_end)) == ([begin] * 3, [end] * 3)
    x = np.random.default_rng(0).standard_normal(clip).astype(np.float32)
    # onnxruntime refuses dilation with SAME: torch on the padding ONNX defines.
    padded = torch.nn.functional.pad(torch.from_numpy(x), [begin, end] * 3)
    expected = torch.conv3d(padded, torch.from_numpy(weight), None, stride, 0, dilation)
    (fn,) = rt3d_halide.load(build(path, "host", tmp_path / "out", jobs=1, quiet=True)).values()
    ref = expected.numpy().transpose(0, 2, 3, 4, 1)
    clip = np.ascontiguousarray(x.transpose(0, 2, 3, 4, 1))
    got = fn(clip, out=np.full(ref.shape, np.nan, np.float32))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("attrs", "begin", "end"),
    [
        # Kernel 2 over 6: SAME takes strides and dilations of 1 where none are given.
        ({"auto_pad": "SAME_UPPER"}, 0, 1),
        # Stride 3 reads (2 - 1) * 3 + 2 = 5 of 6 inputs: no padding (none negative).
        ({"auto_pad": "SAME_LOWER", "strides": [3] * 3}, 0, 0),
        # An empty auto_pad is NOTSET: the pads given.
        ({"auto_pad": "", "pads": [1, 1, 1, 0, 0, 0]}, 1, 0),
    ],
    ids=["SAME-defaults", "SAME-nothing-to-pad", "empty"],
)
def test_auto_pad_plans_onnxs_padding(tmp_path: Path, attrs: dict, begin: int, end: int):
    model = F.one_conv_model(F.conv_weight(4, 3, (2, 2, 2)), [1, 3, 6, 6, 6], attrs)
    (layer,) = plan_model(F.save(model, tmp_path / "m.onnx")).layers
    assert (list(layer.spec.pads_begin), list(layer.spec.pads_end)) == ([begin] * 3, [end] * 3)


class _CeilPooled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = torch.nn.MaxPool3d(2, 2, padding=1, ceil_mode=True)
        self.conv = torch.nn.Conv3d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


def test_a_ceil_mode_pool_whose_last_window_starts_in_the_padding_is_refused(tmp_path):
    """onnx's shape inference counts that window, torch and onnxruntime drop it: the conv after
    it would be compiled for a size it never gets. A ceil_mode pool without such a window (on
    6 positions, where 4 windows all start inside) builds."""
    path = tmp_path / "ceil.onnx"
    torch.onnx.export(_CeilPooled().eval(), torch.randn(1, 3, 3, 3, 3), path, dynamo=False)
    with pytest.raises(BuildError, match=r"ceil_mode MaxPool .* gives \[3, 3, 3\], .* \[2, 2, 2\]"):
        plan_model(path)
    torch.onnx.export(_CeilPooled().eval(), torch.randn(1, 3, 6, 6, 6), path, dynamo=False)
    (layer,) = plan_model(path).layers
    assert layer.spec.in_size == (4, 4, 4)


def _pool_then_conv(
    tmp_path: Path, op: str = "MaxPool", between: str | None = None, **pool: object
) -> Path:
    """A ceil_mode ``op`` over (1, 2, 4, 4, 4), then a conv (reading the pool through a
    ``between`` op where given)."""
    weight = numpy_helper.from_array(np.ones((4, 2, 1, 1, 1), np.float32), "w")
    nodes = [helper.make_node(op, ["x"], ["p"], name="pool", ceil_mode=1, **pool)]
    if between:
        nodes.append(helper.make_node(between, ["p"], ["p2"], name="between"))
    nodes.append(helper.make_node("Conv", [nodes[-1].output[0], "w"], ["y"], name="conv"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4, 4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, None, None, None])],
        [weight],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return F.save(model, tmp_path / "pool.onnx")


@pytest.mark.parametrize(
    ("op", "between", "pool"),
    [
        *[("MaxPool", None, {"auto_pad": pad}) for pad in ["VALID", "", "NOTSET", "SAME_UPPER"]],
        ("AveragePool", None, {}),
        ("MaxPool", "Relu", {}),
        # onnx's inference pads a VALID pool by its pads (3 windows), onnxruntime does not (2).
        ("MaxPool", None, {"auto_pad": "VALID", "pads": [1] * 6, "kernel_shape": [2] * 3}),
    ],
    ids=[
        "VALID",
        "empty",
        "NOTSET",
        "SAME_UPPER",
        "AveragePool",
        "conv-after-a-relu",
        "VALID-pads",
    ],
)
def test_a_ceil_mode_pool_of_any_auto_pad_before_a_conv_is_checked(tmp_path, op, between, pool):
    """Kernel 1, stride 2 over 4 positions: onnx infers 3, onnxruntime runs 2; an AveragePool
    alike, and a conv that reads the pool through another op is as much after it."""
    pool = {"kernel_shape": [1] * 3, "strides": [2] * 3, **pool}
    path = _pool_then_conv(tmp_path, op, between, **pool)
    with pytest.raises(BuildError, match=f"node 'pool': a ceil_mode {op} before the conv 'conv'"):
        plan_model(path)


@pytest.mark.parametrize(
    ("pool", "size"),
    [
        ({}, 3),  # strides and dilations of 1: no window can start past the input
        ({"strides": [2] * 3, "dilations": [2] * 3, "pads": [1, 1, 1, 0, 0, 0]}, 2),
    ],
    ids=["defaults", "dilated-padded-before"],
)
def test_a_ceil_mode_pool_whose_windows_all_start_inside_builds(tmp_path, pool, size):
    """Kernel 2 over 4 positions, as onnx infers it and onnxruntime runs it."""
    path = _pool_then_conv(tmp_path, kernel_shape=[2] * 3, **pool)
    (layer,) = plan_model(path).layers
    assert layer.spec.in_size == (size,) * 3


class _CeilPooledHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 4, 1)
        self.pool = torch.nn.MaxPool3d(2, 2, padding=1, ceil_mode=True)
        self.fc = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv(x)))
        return self.fc(torch.nn.functional.adaptive_avg_pool3d(x, 1).flatten(1))


def test_a_ceil_mode_pool_no_conv_follows_builds(tmp_path):
    """After the last conv, before a global pool and a classifier: no compiled shape depends on
    the pool's size, and the whole model runs as onnxruntime does."""
    path = tmp_path / "head.onnx"
    clip = torch.randn(1, 3, 3, 3, 3)
    torch.onnx.export(_CeilPooledHead().eval(), clip, path, dynamo=False, input_names=["clip"])
    built = rt3d_halide.load(build(path, "host", tmp_path / "out", jobs=1, quiet=True))
    (name,) = [o["name"] for o in built.manifest["model_outputs"]]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"clip": clip.numpy()})
    np.testing.assert_allclose(built.run(clip.numpy())[name], expected, rtol=1e-5, atol=1e-6)


class _Clamped(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0, 6)


def test_a_clamp_exported_without_constant_folding_is_a_host_op(tmp_path):
    """Without folding, torch writes a clamp's (or F.relu6's) bounds as Casts of Constants:
    read as data, as Constants are."""
    model = _Head(_Clamped()).eval()
    plan = plan_model(_exported(tmp_path / "clamp.onnx", model, do_constant_folding=False))
    assert "Cast" not in {op["op"] for op in plan.host_ops}
    clip = next(op for op in plan.host_ops if op["op"] == "Clip")
    bounds = [plan.host_constants[name] for name in clip["inputs"][1:]]
    assert bounds == [{"dtype": "float32", "shape": [], "values": [v]} for v in (0.0, 6.0)]


def test_an_input_also_listed_as_an_output_keeps_its_static_shape(tmp_path):
    weight = numpy_helper.from_array(np.ones((4, 2, 1, 1, 1), np.float32), "conv.weight")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["clip", "conv.weight"], ["y"], name="conv")], "g",
        [helper.make_tensor_value_info("clip", onnx.TensorProto.FLOAT, [1, 2, 2, 3, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 2, 3, 3]),
         helper.make_tensor_value_info("clip", onnx.TensorProto.FLOAT, [None] * 5)],
        [weight],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (layer,) = plan_model(F.save(model, tmp_path / "m.onnx")).layers
    assert layer.spec.in_channels == 2


def test_a_conv_of_a_stored_tensor_is_named_as_such(tmp_path):
    weight = numpy_helper.from_array(np.ones((4, 2, 1, 1, 1), np.float32), "conv.weight")
    stored = numpy_helper.from_array(np.ones((1, 2, 2, 3, 3), np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["table", "conv.weight"], ["t"], name="of_table"),
         helper.make_node("Conv", ["clip", "conv.weight"], ["y"], name="conv"),
         helper.make_node("Add", ["y", "t"], ["z"], name="add")], "g",
        [helper.make_tensor_value_info("clip", onnx.TensorProto.FLOAT, [1, 2, 2, 3, 3])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1, 4, 2, 3, 3])],
        [weight, stored],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with pytest.raises(BuildError, match="node 'of_table': convolves the stored tensor 'table'"):
        plan_model(F.save(model, tmp_path / "m.onnx"))


def test_a_large_cast_constant_ships_in_the_host_weights(tmp_path):
    """A float16 classifier weight cast to float32 for its Gemm: its value goes to
    host_weights.bin under the Cast's name, not inline into manifest.json."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((4, 2, 1, 1, 1)).astype(np.float32), "w")
    fc16 = numpy_helper.from_array(rng.standard_normal((5, 4 * 2 * 3 * 3)).astype(np.float16), "fc")
    nodes = [
        helper.make_node("Conv", ["clip", "w"], ["y"], name="conv"),
        helper.make_node("Flatten", ["y"], ["f"], name="flat"),
        helper.make_node("Cast", ["fc"], ["fc32"], name="cast", to=onnx.TensorProto.FLOAT),
        helper.make_node("Gemm", ["f", "fc32"], ["logits"], name="gemm", transB=1),
    ]
    clip_info = helper.make_tensor_value_info("clip", onnx.TensorProto.FLOAT, [1, 2, 2, 3, 3])
    logits_info = helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 5])
    graph = helper.make_graph(nodes, "g", [clip_info], [logits_info], [weight, fc16])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = F.save(model, tmp_path / "m.onnx")
    built = rt3d_halide.load(build(path, "host", tmp_path / "out", jobs=1, quiet=True))
    assert built.manifest["host_constants"]["fc32"] == {"initializer": "fc32"}
    assert built.manifest["host_weights"]["tensors"]["fc32"]["dtype"] == "float32"
    clip = rng.standard_normal((1, 2, 2, 3, 3)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"clip": clip})
    np.testing.assert_allclose(built.run(clip)["logits"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "opsets",
    [[("ai.onnx.ml", 3), ("", 17)], [("ai.onnx", 17)]],
    ids=["another-domain-first", "ai.onnx-spelled-out"],
)
def test_the_host_ops_opset_is_the_onnx_domains(tmp_path: Path, opsets: list) -> None:
    """The opset the host ops follow is the default domain's, however the file lists it."""
    model = F.two_conv_model()
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(domain, v) for domain, v in opsets)
    assert plan_model(F.save(model, tmp_path / "m.onnx")).opset == 17


def test_a_conv_without_bias_may_name_it_empty(tmp_path: Path) -> None:
    model = F.one_conv_model(F.conv_weight(4, 8), [1, 8, 4, 6, 6])
    model.graph.node[0].input.append("")  # an optional input left out
    (layer,) = plan_model(F.save(model, tmp_path / "m.onnx")).layers
    assert layer.bias is None and not layer.spec.has_bias


def test_weights_stored_as_external_data_are_read(tmp_path: Path) -> None:
    """As torch writes a model past 2 GB (and onnx.save_model(save_as_external_data=True))."""
    weight = F.conv_weight(4, 8)
    model = F.one_conv_model(weight, [1, 8, 4, 6, 6])
    path = tmp_path / "m.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="m.data", size_threshold=0)
    (layer,) = plan_model(path).layers
    np.testing.assert_array_equal(layer.weight, weight)


def test_a_stored_tensor_through_an_identity_ships_once_by_its_name(tmp_path: Path) -> None:
    """A host op reading a stored tensor through an Identity (torch's exporter shares equal
    constants so) reads the stored tensor: named, not copied into the manifest."""
    nodes = [
        helper.make_node("Identity", ["offset"], ["shared"], name="id"),
        helper.make_node("Add", ["y", "shared"], ["z"], name="add"),
    ]
    model = F.one_conv_model(F.conv_weight(4, 8), [1, 8, 4, 6, 6], extra_nodes=nodes, output="z")
    offset = np.arange(4, dtype=np.float32).reshape(4, 1, 1, 1)
    model.graph.initializer.append(numpy_helper.from_array(offset, "offset"))
    plan = plan_model(F.save(model, tmp_path / "m.onnx"))
    assert plan.host_constants == {"shared": {"initializer": "offset"}}
    np.testing.assert_array_equal(plan.host_weights["offset"], offset)


def test_nodes_without_a_name_are_named_by_op_and_place(tmp_path: Path) -> None:
    """As errors and the manifest name them (ONNX does not require a node's name)."""
    nodes = [helper.make_node("Sigmoid", ["y"], ["s"]), helper.make_node("Relu", ["s"], ["z"])]
    model = F.one_conv_model(F.conv_weight(4, 8), [1, 8, 4, 6, 6], extra_nodes=nodes, output="z")
    model.graph.node[0].name = ""
    plan = plan_model(F.save(model, tmp_path / "m.onnx"))
    names = [layer.node for layer in plan.layers] + [op["node"] for op in plan.host_ops]
    assert names == ["Conv_0", "Sigmoid_1", "Relu_2"]
    # Never a name the file gives another node: the manifest's names find one node each.
    model.graph.node[1].name = "Conv_0"
    plan = plan_model(F.save(model, tmp_path / "m.onnx"))
    names = [layer.node for layer in plan.layers] + [op["node"] for op in plan.host_ops]
    assert names == ["Conv_0_", "Conv_0", "Relu_2"]
