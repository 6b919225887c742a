"""The embedded default model built for the host against onnxruntime running the same ONNX file.

onnxruntime is the network's end-to-end reference (DESIGN.md): every built function is fed the
tensor onnxruntime computed at its Conv's input and must give the tensor onnxruntime computed at
its output (after the fused Relu), so the whole network as the app runs it (our functions, its own
host ops between them) matches, layer by layer, on sparse and dense code alike.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import shape_inference

import rt3d_halide
from rt3d_halide.build import DEFAULT_MODEL, build


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


def _run_host_op(node: onnx.NodeProto, model: onnx.ModelProto, tensors: dict) -> None:
    """One host op, as an app would run it: the node alone, on its inputs, by onnxruntime."""
    inits = {t.name: t for t in model.graph.initializer}
    feeds = {n: tensors[n] for n in node.input if n and n not in inits}
    graph = onnx.helper.make_graph(
        [node],
        "host_op",
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in feeds],
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in node.output],
        [inits[n] for n in node.input if n in inits],
    )
    one = onnx.helper.make_model(graph, opset_imports=model.opset_import)
    session = ort.InferenceSession(one.SerializeToString(), providers=["CPUExecutionProvider"])
    tensors.update(zip(node.output, session.run(list(node.output), feeds), strict=True))


def test_the_manifests_steps_run_the_whole_network(built: rt3d_halide.BuiltModel) -> None:
    """An app that runs ``steps`` in order, the functions channels innermost and the host ops in
    the graph's layout, computes the model's output (``model_outputs``) as onnxruntime does."""
    manifest = built.manifest
    model = onnx.load(str(DEFAULT_MODEL))
    nodes = {node.name: node for node in model.graph.node}
    functions = {f["name"]: f for f in manifest["functions"]}
    shape = manifest["model_input"]["shape"]
    clip = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    tensors = {manifest["model_input"]["name"]: clip}
    for step in manifest["steps"]:
        if "host_op" in step:
            _run_host_op(nodes[step["host_op"]], model, tensors)
            continue
        f = functions[step["function"]]
        x = np.ascontiguousarray(tensors[f["input"]["onnx_tensor"]].transpose(0, 2, 3, 4, 1))
        y = built[f["name"]](x)
        tensors[f["output"]["onnx_tensor"]] = np.ascontiguousarray(y.transpose(0, 4, 1, 2, 3))
    assert [s["function"] for s in manifest["steps"] if "function" in s] == list(functions)
    (output,) = manifest["model_outputs"]
    assert output["layout"] == "as in the ONNX graph" and "function" not in output
    session = ort.InferenceSession(str(DEFAULT_MODEL), providers=["CPUExecutionProvider"])
    (expected,) = session.run([output["name"]], {manifest["model_input"]["name"]: clip})
    assert list(expected.shape) == output["shape"]
    np.testing.assert_allclose(tensors[output["name"]], expected, rtol=1e-4, atol=1e-4)
