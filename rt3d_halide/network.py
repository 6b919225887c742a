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

from .runtime import file_stamp

if TYPE_CHECKING:
    from .runtime import BuiltModel


def host_tensors(model: BuiltModel) -> dict[str, np.ndarray]:
    """Every tensor the host ops read that is no other step's output: the stored weights
    (``host_weights.bin``, by its index) and the constants the manifest holds."""
    manifest = model.manifest
    index = manifest["host_weights"]
    weights: dict[str, np.ndarray] = {}
    if index["file"] is not None:
        path = model.build_dir / index["file"]
        stamp = file_stamp(path)
        if model.host_weights_stamp is None:
            raise ValueError(f"{path}: missing; build {model.build_dir} again")
        if stamp != model.host_weights_stamp:
            changed = "removed" if stamp is None else "written again"
            raise ValueError(
                f"{path}: {changed} since the build was loaded (rebuilt in place?); the "
                "functions loaded are the earlier build's: load() it again"
            )
        data = path.read_bytes()
        for name, entry in index["tensors"].items():
            if entry["offset"] + entry["bytes"] > len(data):
                raise ValueError(
                    f"{path}: {len(data)} bytes, where the manifest's {name!r} ends at byte "
                    f"{entry['offset'] + entry['bytes']}: not this build's file; build it again"
                )
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


def listed_outputs(outputs: list[str]) -> list[str]:
    """A node's outputs without its trailing "" ones, which mean what no outputs mean (a
    BatchNormalization's unused statistics, as opset 9 lists them): onnxruntime's session of a
    node that listed them crashed."""
    outputs = list(outputs)
    while outputs and not outputs[-1]:
        outputs.pop()
    return outputs


def _attributes(op: dict[str, Any], opset: int) -> list[onnx.AttributeProto]:
    """A host op's attributes as the manifest gives them (JSON values), each typed as the op's
    schema at ``opset`` declares it: an empty list (ReduceMean's ``axes=[]``) has no type of
    its own to infer."""
    try:
        schema = onnx.defs.get_schema(op["op"], opset, "")
        types = {name: attr.type for name, attr in schema.attributes.items()}
    except onnx.defs.SchemaError:  # no op of ONNX's: each value's own type
        types = {}
    return [
        onnx.helper.make_attribute(name, value, attr_type=types.get(name))
        for name, value in op["attributes"].items()
    ]


class _HostOp:
    """One host op as an onnxruntime session of its node alone, its constants inside."""

    def __init__(
        self, op: dict[str, Any], constants: dict[str, np.ndarray], opset: int, ort: Any
    ) -> None:
        # Also here for a manifest of an earlier build, which listed them.
        outputs = listed_outputs(op["outputs"])
        node = onnx.helper.make_node(op["op"], op["inputs"], outputs, name=op["node"])
        node.attribute.extend(_attributes(op, opset))
        given = {
            n: numpy_helper.from_array(constants[n], n) for n in op["inputs"] if n in constants
        }
        self.fed = [n for n in dict.fromkeys(op["inputs"]) if n and n not in given]
        self.outputs = [n for n in outputs if n]
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
            # One thread that sleeps when idle: a session per host op, each with a pool of
            # spinning workers, took the CPU from the functions' own threads.
            options = self._ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = self._ort.InferenceSession(
                one.SerializeToString(), options, providers=["CPUExecutionProvider"]
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

    def outputs(self, clip: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs on ``clip`` (the graph's input, in its layout), each an array of
        its own in the graph's layout, as onnxruntime gives them.

        Tensors pass between consecutive functions channels innermost, as an app passes them;
        one is transposed to the graph's layout only where a host op or an output reads it.
        """
        manifest = self.model.manifest
        graph = {**self.constants, manifest["model_input"]["name"]: clip}
        channels_last: dict[str, np.ndarray] = {}

        def in_graph_layout(name: str) -> np.ndarray:
            if name not in graph:
                graph[name] = np.ascontiguousarray(channels_last[name].transpose(0, 4, 1, 2, 3))
            return graph[name]

        functions = {f["name"]: f for f in manifest["functions"]}
        for step in manifest["steps"]:
            if "function" in step:
                f = functions[step["function"]]
                source = f["input"]["onnx_tensor"]
                x = channels_last.get(source)
                if x is None:
                    x = np.ascontiguousarray(graph[source].transpose(0, 2, 3, 4, 1))
                channels_last[f["output"]["onnx_tensor"]] = self.model[f["name"]](x)
            else:
                op = self.host_ops[step["host_op"]]
                graph.update(op({name: in_graph_layout(name) for name in op.fed}))
        outputs = {}
        for output in manifest["model_outputs"]:
            array = in_graph_layout(output["name"])
            shared = array is clip or any(array is c for c in self.constants.values())
            outputs[output["name"]] = array.copy() if shared else array
        return outputs
