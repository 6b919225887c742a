"""What the build reads from an ONNX graph beyond the Conv nodes themselves: constants passed
through Identity nodes, and the names its functions take."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_factory as F
import pytest
from conv_harness import ConvCase, reference, relative_error
from onnx import helper

import rt3d_halide
from rt3d_halide.build import build
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
    ],
    ids=["module-weight", "anonymous-weight", "plain-weight", "no-weight-name"],
)
def test_function_label_prefers_the_weights_module_path(node: str, weight: str, label: str):
    assert layer_label(node, weight) == label
