"""Recipe of ``tiny_c3d.onnx``, the build's default model.

Regenerate with ``python -m rt3d_halide.models.make_tiny_c3d``.

A C3D-shaped network scaled down so that a first build takes seconds: four 3x3x3 convs with ReLU,
C3D's pooling pattern, a global average pool and a classifier, on an 8x32x32 RGB clip. Weights are
He-initialised from a fixed seed (deterministic file), with no torch needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CLIP = (1, 3, 8, 32, 32)
CONVS = (("conv1", 3, 16), ("conv2", 16, 32), ("conv3a", 32, 64), ("conv3b", 64, 64))
POOL_AFTER = {"conv1": (1, 2, 2), "conv2": (2, 2, 2), "conv3b": (2, 2, 2)}
CLASSES = 10


def make_tiny_c3d(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current = "clip"
    for name, cin, cout in CONVS:
        std = np.sqrt(2.0 / (cin * 27))
        weight = (rng.standard_normal((cout, cin, 3, 3, 3)) * std).astype(np.float32)
        bias = (rng.standard_normal(cout) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(weight, f"{name}.weight")]
        inits += [numpy_helper.from_array(bias, f"{name}.bias")]
        nodes.append(
            helper.make_node(
                "Conv",
                [current, f"{name}.weight", f"{name}.bias"],
                [f"{name}_out"],
                name=name,
                kernel_shape=[3, 3, 3],
                pads=[1, 1, 1, 1, 1, 1],
            )
        )
        nodes.append(
            helper.make_node("Relu", [f"{name}_out"], [f"{name}_relu"], name=f"{name}_relu")
        )
        current = f"{name}_relu"
        if name in POOL_AFTER:
            kernel = list(POOL_AFTER[name])
            nodes.append(
                helper.make_node(
                    "MaxPool",
                    [current],
                    [f"{name}_pool"],
                    name=f"{name}_pool",
                    kernel_shape=kernel,
                    strides=kernel,
                )
            )
            current = f"{name}_pool"
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["features"], name="flatten"))
    fc = (rng.standard_normal((CLASSES, CONVS[-1][2])) * 0.1).astype(np.float32)
    inits += [numpy_helper.from_array(fc, "fc.weight")]
    inits += [numpy_helper.from_array(np.zeros(CLASSES, np.float32), "fc.bias")]
    nodes.append(
        helper.make_node(
            "Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1
        )
    )
    graph = helper.make_graph(
        nodes,
        "tiny_c3d",
        [helper.make_tensor_value_info("clip", TensorProto.FLOAT, list(CLIP))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, CLASSES])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="rt3d-halide"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("tiny_c3d.onnx"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    onnx.save(make_tiny_c3d(args.seed), str(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
