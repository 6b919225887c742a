"""A one-Conv3d ONNX model: how single layers are built, benchmarked and tested.

The build only takes ONNX, so a layer on its own is a model with one Conv (and a Relu when it is
fused), in the standard NCDHW layout that exporters write.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rt3d_halide.generators.spec import Conv3dSpec

OPSET = 17


def conv_layer_onnx(
    spec: Conv3dSpec,
    weight: np.ndarray,
    bias: np.ndarray | None,
    batch: int = 1,
    metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """A model computing ``spec`` with these weights; its Conv node is named ``conv``."""
    if weight.shape != spec.weight_shape:
        raise ValueError(f"weight shape {weight.shape} != {spec.weight_shape}")
    inits = [numpy_helper.from_array(np.asarray(weight, np.float32), "w")]
    inputs = ["x", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(np.asarray(bias, np.float32), "b"))
        inputs.append("b")
    conv_out = "conv_out" if spec.relu else "y"
    nodes = [
        helper.make_node(
            "Conv",
            inputs,
            [conv_out],
            name="conv",
            kernel_shape=list(spec.kernel),
            strides=list(spec.stride),
            dilations=list(spec.dilation),
            pads=[*spec.pads_begin, *spec.pads_end],
        )
    ]
    if spec.relu:
        nodes.append(helper.make_node("Relu", [conv_out], ["y"], name="relu"))
    graph = helper.make_graph(
        nodes,
        "layer",
        [
            helper.make_tensor_value_info(
                "x", TensorProto.FLOAT, [batch, spec.in_channels, *spec.in_size]
            )
        ],
        [
            helper.make_tensor_value_info(
                "y", TensorProto.FLOAT, [batch, spec.out_channels, *spec.out_size]
            )
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    return model
