"""Small ONNX models for the build tests: good ones and each kind of bad one the build must refuse.

Everything is built with onnx.helper (no torch). Models are NCDHW, opset 17, as exporters write.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def conv_weight(
    cout: int, cin: int, kernel: Sequence[int] = (3, 3, 3), seed: int = 0
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((cout, cin, *kernel)) * 0.2).astype(np.float32)


def finish(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    inputs: list[onnx.ValueInfoProto],
    output: str,
    metadata: dict[str, str] | None = None,
    output_rank: int = 5,
) -> onnx.ModelProto:
    dims = [f"out{i}" for i in range(output_rank)]
    outputs = [helper.make_tensor_value_info(output, TensorProto.FLOAT, dims)]
    graph = helper.make_graph(nodes, "test", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    set_metadata(model, metadata or {})
    return model


def set_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Adds ``metadata`` to the model's metadata_props, keeping what it holds."""
    for key, value in metadata.items():
        helper.set_model_props(
            model, {**{p.key: p.value for p in model.metadata_props}, key: value}
        )


def two_conv_weights(cin: int = 8, mid: int = 8, cout: int = 4, seed: int = 0) -> dict:
    """The initializers of :func:`two_conv_model` (ONNX order)."""
    return {
        "conv_a.weight": conv_weight(mid, cin, (3, 3, 3), seed),
        "conv_a.bias": np.linspace(-0.1, 0.1, mid, dtype=np.float32),
        "conv_b.weight": conv_weight(cout, mid, (1, 3, 3), seed + 1),
    }


def two_conv_model(
    cin: int = 8,
    mid: int = 8,
    cout: int = 4,
    clip: Sequence[int | str] | None = None,
    seed: int = 0,
    weights: dict[str, np.ndarray] | None = None,
    metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """conv_a (3x3x3, pad 1) + Relu -> conv_b (1x3x3, stride (1,2,2), no pad, no bias).

    ``clip`` is the NCDHW input shape (default ``(1, cin, 4, 6, 6)``); strings make dynamic dims.
    """
    clip = clip or (1, cin, 4, 6, 6)
    weights = {**two_conv_weights(cin, mid, cout, seed), **(weights or {})}
    wa, ba, wb = weights["conv_a.weight"], weights["conv_a.bias"], weights["conv_b.weight"]
    inits = [
        numpy_helper.from_array(wa, "conv_a.weight"),
        numpy_helper.from_array(ba, "conv_a.bias"),
        numpy_helper.from_array(wb, "conv_b.weight"),
    ]
    nodes = [
        helper.make_node(
            "Conv",
            ["clip", "conv_a.weight", "conv_a.bias"],
            ["a"],
            name="conv_a",
            kernel_shape=[3, 3, 3],
            pads=[1, 1, 1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["a"], ["a_relu"], name="relu_a"),
        helper.make_node(
            "Conv",
            ["a_relu", "conv_b.weight"],
            ["y"],
            name="conv_b",
            kernel_shape=[1, 3, 3],
            strides=[1, 2, 2],
        ),
    ]
    inputs = [helper.make_tensor_value_info("clip", TensorProto.FLOAT, list(clip))]
    return finish(nodes, inits, inputs, "y", metadata)


def one_conv_model(
    weight: np.ndarray | onnx.TensorProto,
    clip: Sequence[int | str],
    node_attrs: dict | None = None,
    weight_as_input: bool = False,
    extra_nodes: Sequence[onnx.NodeProto] = (),
    output: str = "y",
    bias: np.ndarray | None = None,
) -> onnx.ModelProto:
    """One Conv named ``bad_conv`` over input ``clip``; the weight ``w`` (and bias ``b``) as
    given."""
    tensor = (
        weight if isinstance(weight, onnx.TensorProto) else numpy_helper.from_array(weight, "w")
    )
    tensor.name = "w"
    inputs = [helper.make_tensor_value_info("clip", TensorProto.FLOAT, list(clip))]
    inits = []
    if weight_as_input:
        dims = list(tensor.dims)
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, dims))
    else:
        inits.append(tensor)
    conv_inputs = ["clip", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "b"))
        conv_inputs.append("b")
    nodes = [helper.make_node("Conv", conv_inputs, ["y"], name="bad_conv", **(node_attrs or {}))]
    nodes += list(extra_nodes)
    return finish(nodes, inits, inputs, output, output_rank=len(clip))


def with_lstm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Adds an LSTM node named ``my_lstm`` that consumes nothing the convs make."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    hidden, seq_in = 4, 5
    g = model.graph
    g.initializer.extend(
        [
            numpy_helper.from_array(np.zeros((1, 4 * hidden, seq_in), np.float32), "lstm_W"),
            numpy_helper.from_array(np.zeros((1, 4 * hidden, hidden), np.float32), "lstm_R"),
            numpy_helper.from_array(np.zeros((2, 1, seq_in), np.float32), "lstm_X"),
        ]
    )
    g.node.append(
        helper.make_node(
            "LSTM", ["lstm_X", "lstm_W", "lstm_R"], ["lstm_Y"], name="my_lstm", hidden_size=hidden
        )
    )
    g.output.append(
        helper.make_tensor_value_info("lstm_Y", TensorProto.FLOAT, ["s", "d", "b", "h"])
    )
    return model


def with_custom_op(model: onnx.ModelProto) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    model.graph.node.append(
        helper.make_node("FancyGate", ["y"], ["gated"], name="my_gate", domain="com.example")
    )
    model.graph.output[0].name = "gated"
    return model


def sparsity_metadata(layers: dict[str, dict], version: object = 1) -> dict[str, str]:
    """``rt3d.sparsity`` as the pruning package writes it; ``version=None`` leaves it out."""
    body = {"layers": layers} if version is None else {"version": version, "layers": layers}
    return {"rt3d.sparsity": json.dumps(body)}


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
