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
    shape = built.manifest["model_input"]["shape_nctdhw"]
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
