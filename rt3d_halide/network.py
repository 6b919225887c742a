"""A whole built model run from Python, as an app runs it: the manifest's ``steps`` in order,
the functions through the build's library, the host ops through onnxruntime, one node at a
time, from the build directory alone.

An app runs its own host ops; this checks a build against the ONNX file (or torch) on one's own
clips before the app exists, and shows what each host op reads (its constants from the
manifest, its weights from ``host_weights.bin``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import numpy_helper

if TYPE_CHECKING:
    from .runtime import BuiltModel


def host_tensors(model: BuiltModel) -> dict[str, np.ndarray]:
    """Every tensor the host ops read that is no other step's output: the stored weights
    (``host_weights.bin``, by its index) and the constants the manifest holds."""
    manifest = model.manifest
    index = manifest["host_weights"]
    weights: dict[str, np.ndarray] = {}
    if index["file"] is not None:
        data = (model.build_dir / index["file"]).read_bytes()
        for name, entry in index["tensors"].items():
            raw = data[entry["offset"] : entry["offset"] + entry["bytes"]]
            dtype = np.dtype(entry["dtype"]).newbyteorder("<")
            weights[name] = np.frombuffer(raw, dtype).reshape(entry["shape"])
    constants = dict(weights)
    for name, entry in manifest["host_constants"].items():
        if "initializer" in entry:
            constants[name] = weights[entry["initializer"]]
        else:
            constants[name] = np.asarray(entry["values"], entry["dtype"]).reshape(entry["shape"])
    return constants


class _HostOp:
    """One host op as an onnxruntime session of its node alone, its constants inside."""

    def __init__(
        self, op: dict[str, Any], constants: dict[str, np.ndarray], opset: int, ort: Any
    ) -> None:
        node = onnx.helper.make_node(
            op["op"], op["inputs"], op["outputs"], name=op["node"], **op["attributes"]
        )
        given = {
            n: numpy_helper.from_array(constants[n], n) for n in op["inputs"] if n in constants
        }
        self.fed = [n for n in dict.fromkeys(op["inputs"]) if n and n not in given]
        self.outputs = [n for n in op["outputs"] if n]
        self._node, self._given, self._opset = node, list(given.values()), opset
        self._session: Any = None
        self._ort = ort

    def __call__(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {n: tensors[n] for n in self.fed}
        if self._session is None:
            inputs = [
                onnx.helper.make_tensor_value_info(
                    n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), None
                )
                for n, v in feeds.items()
            ]
            outputs = [onnx.helper.make_empty_tensor_value_info(n) for n in self.outputs]
            graph = onnx.helper.make_graph([self._node], "host_op", inputs, outputs, self._given)
            opsets = [onnx.helper.make_opsetid("", self._opset)]
            # The oldest IR version that holds the opset: an older onnxruntime refuses newer.
            try:
                ir = onnx.helper.find_min_ir_version_for(opsets)
            except ValueError:  # an opset newer than this onnx knows: its own IR version
                ir = onnx.IR_VERSION
            one = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=ir)
            self._session = self._ort.InferenceSession(
                one.SerializeToString(), providers=["CPUExecutionProvider"]
            )
        return dict(zip(self.outputs, self._session.run(self.outputs, feeds), strict=True))


class Network:
    """A built model's steps ready to run: the tensors its host ops read taken from the build
    once, an onnxruntime session per host op (onnxruntime is needed from here on)."""

    def __init__(self, model: BuiltModel) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise ImportError(
                "running a whole model from Python runs its host ops with onnxruntime: "
                "pip install onnxruntime"
            ) from exc
        self.model = model
        self.constants = host_tensors(model)
        opset = model.manifest["onnx_opset"]
        self.host_ops = [
            _HostOp(op, self.constants, opset, onnxruntime) for op in model.manifest["host_ops"]
        ]

    def tensors(self, clip: np.ndarray) -> dict[str, np.ndarray]:
        """Every tensor of the network on ``clip`` (the graph's input, in its layout), each in
        the graph's layout, the stored ones included: a function's input and output are
        transposed to and from its channels-innermost layout, as an app does between its host
        ops and the functions."""
        manifest = self.model.manifest
        tensors = {**self.constants, manifest["model_input"]["name"]: clip}
        functions = {f["name"]: f for f in manifest["functions"]}
        for step in manifest["steps"]:
            if "function" in step:
                f = functions[step["function"]]
                x = np.ascontiguousarray(
                    tensors[f["input"]["onnx_tensor"]].transpose(0, 2, 3, 4, 1)
                )
                y = self.model[f["name"]](x).transpose(0, 4, 1, 2, 3)
                tensors[f["output"]["onnx_tensor"]] = np.ascontiguousarray(y)
            else:
                tensors.update(self.host_ops[step["host_op"]](tensors))
        return tensors

    def outputs(self, clip: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs on ``clip``, each an array of its own, as onnxruntime gives them
        (one that is a stored tensor or the input itself is copied)."""
        tensors = self.tensors(clip)
        outputs = {}
        for output in self.model.manifest["model_outputs"]:
            array = tensors[output["name"]]
            shared = array is clip or any(array is c for c in self.constants.values())
            outputs[output["name"]] = array.copy() if shared else array
        return outputs
