"""Reading an ONNX 3D CNN into the layer plan: one :class:`ConvLayer` per Conv node.

The interchange is standard ONNX (shared/DESIGN.md beside this repository): weights are dense
initializers and any pruning shows as exact zeros. The importer checks everything the generators
rely on and names the node when it refuses, so that a user with a model from elsewhere knows what
to change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import stat
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import EncodeError
from onnx import numpy_helper, shape_inference

from rt3d_halide.generators.spec import Conv3dSpec
from rt3d_halide.pruning.patterns import (
    DEFAULT_GROUP,
    SPARSITY_METADATA_KEY,
    SPARSITY_METADATA_VERSION,
    check_group,
    check_group_fits,
    check_scheme,
    inferred_scheme,
    validate_pattern,
)

from .artifacts import OPENCL_FALLBACK_HEADER, OPENCL_FALLBACK_SYMBOLS, RUNTIME_HEADERS
from .errors import BuildError, listing
from .network import listed_outputs

# Ops the build leaves to the app (they are cheap next to the convs, or belong to the classifier
# head). They are listed in the manifest so that nothing runs silently nowhere.
HOST_OPS = frozenset(
    {
        "AveragePool",
        "BatchNormalization",
        "Concat",
        "Dropout",
        "Flatten",
        "Gemm",
        "GlobalAveragePool",
        "Identity",
        "MatMul",
        "MaxPool",
        "Add",
        "Relu",
        "Reshape",
        "Softmax",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "ReduceMean",
        "ReduceMax",
        # Activations and elementwise arithmetic a mobile model runs between its convs
        # (ReLU6 exports as Clip, SiLU as Sigmoid and Mul, GELU as Div, Erf, Add and Mul before
        # opset 20 and as Gelu from it, torch's default; a squeeze-excitation gate as Sigmoid
        # and Mul).
        "Clip",
        "LeakyRelu",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Erf",
        "Gelu",
        "Mul",
        "Sub",
        "Div",
        # Shape arithmetic of a dynamic batch axis (torch's x.view(x.size(0), -1)).
        "Shape",
        "Gather",
    }
)


SUPPORTED_OPS = HOST_OPS | {"Conv"}


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
    """A Conv's pattern: declared (metadata) or inferred, validated against its zeros.

    ``kept_macs`` are the dense MACs the kept KGS units hold; ``sparse_macs`` what the sparse
    code executes: per output position, every kept (input channel, kernel location) entry times
    the ``gM`` lanes of its group, lanes past the last filter included (they are computed), so
    more than ``kept_macs`` where gM does not divide the filters. Both count the taps on the
    temporal padding, which most sparse code skips (``skip_frame_padding``; a sixth of C3D
    conv4b's on 4 frames), as the break-even rule was fitted. The kept fraction is what the
    pruning kept; the sparse fraction is what the kernel choice weighs.
    """

    scheme: str
    group: tuple[int, int]
    source: str  # "metadata" or "inferred"
    balanced: bool
    dense_macs: int
    kept_macs: int
    sparse_macs: int

    @property
    def kept_fraction(self) -> float:
        return self.kept_macs / self.dense_macs if self.dense_macs else 1.0

    @property
    def sparse_fraction(self) -> float:
        return self.sparse_macs / self.dense_macs if self.dense_macs else 1.0

    def describe(self) -> dict:
        return {
            "scheme": self.scheme,
            "group": list(self.group),
            "source": self.source,
            "balanced": self.balanced,
            "kept_fraction": round(self.kept_fraction, 6),
            "sparse_fraction": round(self.sparse_fraction, 6),
            "dense_macs_per_sample": self.dense_macs,
            "sparse_macs_per_sample": self.sparse_macs,
        }


@dataclasses.dataclass
class ConvLayer:
    """One Conv node with everything the generator needs and what the manifest reports."""

    spec: Conv3dSpec
    node: str
    weight_name: str
    weight: np.ndarray
    bias: np.ndarray | None
    input_name: str
    output_name: str
    sparsity: LayerSparsity | None = None


@dataclasses.dataclass
class ModelPlan:
    name: str
    path: Path
    sha256: str  # of the file's bytes as read (:func:`load_onnx`)
    layers: list[ConvLayer]
    host_ops: list[dict[str, Any]]
    input_name: str
    input_shape: list[int | str]
    # Inputs of host ops that are no initializer of the file: Constant nodes' values, and
    # Identity outputs of a stored tensor (by its name), so that the manifest and the file's
    # initializers hold everything the app's host ops read.
    host_constants: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # The file's default-domain opset: the version of each host op's semantics.
    opset: int = 1
    # Functions ({"function": name}) and host ops ({"host_op": index into host_ops}) in the
    # graph's order, a valid order to run them in; and the graph's outputs as the file declares
    # them.
    steps: list[dict[str, str | int]] = dataclasses.field(default_factory=list)
    outputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # The file's stored tensors that host ops read (a Gemm's weights), in order of first use:
    # the build ships them beside the library, so that an app needs no ONNX reader.
    host_weights: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    # Functions given a trailing "_" because their name was taken (two layers whose names
    # become one C name, or a name ending as a Halide symbol does): each to the name it wanted.
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)


# The symbols Halide defines beside each function <fn>.
HALIDE_SUFFIXES = ("_argv", "_metadata")


def _halide_symbols(fn_name: str) -> set[str]:
    """The symbols a generated function named ``fn_name`` defines."""
    return {fn_name, *(fn_name + suffix for suffix in HALIDE_SUFFIXES)}


def c_identifier(text: str) -> str:
    """ASCII letters, digits and underscores (``\\w`` would let Unicode through)."""
    ident = re.sub(r"[^0-9A-Za-z_]+", "_", text).strip("_") or "layer"
    return ident if not ident[0].isdigit() else f"l{ident}"


MODULE_WEIGHT = re.compile(r"([A-Za-z_]\w*(?:\.\w+)*)\.weight")


def layer_label(node_name: str, weight_name: str = "") -> str:
    """The label a Conv's function is named by: its weight's module path when the initializer
    is named ``<module path>.weight``, as torch's exporter names it; else the node's path.

    Exporters name nodes by module path and op (``/layer1/conv1/Conv``), but torch's can drop
    the outer modules of a traced model: R(2+1)D-18's ``layer1.1.conv1.0.3`` exports as node
    ``/conv1.0.3_1/Conv``, its weight as ``layer1.1.conv1.0.3.weight``. A scope that
    extends the one before it (``/layer1/layer1.0/conv1/conv1.0/Conv``, torch's names where
    constant folding renamed the weight) stands for both: ``layer1.0_conv1.0``."""
    match = MODULE_WEIGHT.fullmatch(weight_name)
    if match:
        return match.group(1)
    parts = [p for p in node_name.split("/") if p]
    if len(parts) > 1 and parts[-1] == "Conv":
        parts = parts[:-1]
    scopes: list[str] = []
    for part in parts:
        if scopes and part.startswith(scopes[-1] + "."):
            scopes[-1] = part
        else:
            scopes.append(part)
    return "_".join(scopes) or node_name


def load_onnx(path: Path) -> tuple[onnx.ModelProto, str]:
    """The model ``path`` holds and the SHA-256 of the bytes read: the manifest's record of
    the source, taken from what was built (hashed once the build had compiled, a model
    exported again meanwhile was recorded by its new contents)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise BuildError(f"{path}: no such file") from None
    except OSError as exc:  # a name too long, a folder it may not enter, a symlink loop
        raise BuildError(f"{path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise BuildError(f"{path}: is a directory, expected an ONNX file")
    if not stat.S_ISREG(mode):  # a FIFO or a device would be read until it ends, if ever
        raise BuildError(f"{path}: not a regular file, expected an ONNX file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BuildError(f"{path}: {exc.strerror or exc}") from None
    digest = hashlib.sha256(data).hexdigest()
    try:
        model = onnx.load_model_from_string(data)
        del data  # not held through the checks: a model may take a GiB
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:  # the protobuf decoder raises several unrelated types
        raise BuildError(f"{path}: not a readable ONNX file ({exc})") from exc
    if not model.graph.node:
        raise BuildError(
            f"{path}: not an ONNX model (no graph nodes; truncated or another format?)"
        )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise BuildError(f"{path}: invalid ONNX model: {first}") from exc
    except EncodeError as exc:  # the checker serializes the model, which protobuf caps at 2 GiB
        size = sum(len(tensor.raw_data) for tensor in model.graph.initializer)
        raise BuildError(
            f"{path}: protobuf cannot serialize it for onnx's checker ({size / 2**30:.1f} GiB "
            "of stored tensors, external data included; one message takes at most 2 GiB): "
            "the build reads models under that"
        ) from exc
    return model, digest


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _static_shape(value_info: onnx.ValueInfoProto) -> list[int | str]:
    dims = value_info.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def _conv_pads(
    node: onnx.NodeProto, attrs: dict, in_size: tuple[int, ...], kernel: tuple[int, ...]
) -> tuple[list[int], list[int]]:
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    strides = list(attrs.get("strides", [1, 1, 1]))
    dilations = list(attrs.get("dilations", [1, 1, 1]))
    if auto_pad in ("NOTSET", ""):
        pads = list(attrs.get("pads", [0] * 6))
        return pads[:3], pads[3:]
    if auto_pad == "VALID":
        return [0, 0, 0], [0, 0, 0]
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(in_size, kernel, strides, dilations, strict=True):
            out = -(-size // s)
            total = max(0, (out - 1) * s + d * (k - 1) + 1 - size)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        return begin, end
    raise BuildError(f"node {node.name!r}: unsupported auto_pad {auto_pad!r}")


def _float_initializer(node: onnx.NodeProto, name: str, inits: dict) -> np.ndarray:
    if name not in inits:
        raise BuildError(
            f"node {node.name!r}: weight {name!r} is not a constant initializer; "
            "the build bakes weights into code, so they must be stored in the model"
        )
    tensor = inits[name]
    if tensor.data_type != onnx.TensorProto.FLOAT:
        type_name = onnx.TensorProto.DataType.Name(tensor.data_type)
        raise BuildError(
            f"node {node.name!r}: {name!r} is {type_name}; only float32 is supported (export "
            "the model in float32: torch's model.float(), or rt3d_halide.pruning.export_onnx, "
            "which does so)"
        )
    try:
        array = numpy_helper.to_array(tensor)
    except ValueError as exc:  # raw data of another size than the shape (the checker takes more)
        raise BuildError(f"node {node.name!r}: initializer {name!r} does not read: {exc}") from exc
    _check_finite(node.name, name, array)
    return array.astype(np.float32, copy=False)


def _check_finite(node: str, name: str, array: np.ndarray, hint: str = "") -> None:
    """A weight that is NaN or Inf anywhere makes every output so: bad input, named."""
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise BuildError(f"node {node!r}: {name!r} holds {bad} NaN or Inf values{hint}")


# What a constant the manifest holds may not be, and what to give instead.
FINITE_CONSTANT_HINT = (
    "; the manifest (JSON) holds no NaN or Inf: give a finite value (float32's largest, "
    "3.4028235e+38, for a bound that clips nothing)"
)


def _conv_layer(
    node: onnx.NodeProto, inits: dict, shapes: dict, fuse_relu: bool, fn_name: str
) -> ConvLayer:
    attrs = _attrs(node)
    weight = _float_initializer(node, node.input[1], inits)
    if weight.ndim != 5:
        raise BuildError(
            f"node {node.name!r}: Conv with {weight.ndim - 2}-D kernel; only Conv3d (5-D weights) "
            "is supported"
        )
    if attrs.get("group", 1) != 1:
        raise BuildError(
            f"node {node.name!r}: grouped convolution (group={attrs['group']}) is not supported; "
            "only group=1 Conv3d (no depthwise or grouped generator)"
        )
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = _float_initializer(node, node.input[2], inits)
        if bias.shape != weight.shape[:1]:
            raise BuildError(
                f"node {node.name!r}: bias of shape {list(bias.shape)} for {weight.shape[0]} "
                "filters"
            )
    if node.input[0] in inits:
        raise BuildError(
            f"node {node.name!r}: convolves the stored tensor {node.input[0]!r}, not an "
            "activation of the clip: nothing to compile (fold it into a constant before export)"
        )
    in_shape = shapes.get(node.input[0])
    if in_shape is None or len(in_shape) != 5 or not all(isinstance(d, int) for d in in_shape[1:]):
        raise BuildError(
            f"node {node.name!r}: input shape {in_shape} is not a static (N, C, T, H, W); "
            "export the model with a fixed clip size"
        )
    batch, channels, t, h, w = in_shape
    # Some converters write -1 for "any batch": only an explicit 0 is refused.
    if batch == 0:
        raise BuildError(f"node {node.name!r}: input batch of 0 clips")
    if channels != weight.shape[1]:
        raise BuildError(
            f"node {node.name!r}: input has {channels} channels, weights expect {weight.shape[1]}"
        )
    kernel = tuple(int(k) for k in weight.shape[2:])
    if "kernel_shape" in attrs and tuple(attrs["kernel_shape"]) != kernel:
        raise BuildError(f"node {node.name!r}: kernel_shape {attrs['kernel_shape']} != weights")
    begin, end = _conv_pads(node, attrs, (t, h, w), kernel)
    try:
        spec = Conv3dSpec(
            name=fn_name,
            in_channels=int(channels),
            out_channels=int(weight.shape[0]),
            in_size=(t, h, w),
            kernel=kernel,
            stride=tuple(attrs.get("strides", [1, 1, 1])),
            dilation=tuple(attrs.get("dilations", [1, 1, 1])),
            pads_begin=tuple(begin),
            pads_end=tuple(end),
            has_bias=bias is not None,
            relu=fuse_relu,
        )
    except ValueError as exc:
        raise BuildError(f"node {node.name!r}: {exc}") from exc
    return ConvLayer(spec, node.name, node.input[1], weight, bias, node.input[0], node.output[0])


def read_sparsity_metadata(model: onnx.ModelProto, path: Path) -> dict[str, dict]:
    """The ``layers`` object of the ``rt3d.sparsity`` metadata, {} without it. Its entries are
    checked per layer (:func:`layer_sparsity`), naming the node; a version other than the one
    this build reads is refused, as the pruning package's checker refuses it, rather than
    guessed at."""
    for prop in model.metadata_props:
        if prop.key == SPARSITY_METADATA_KEY:
            try:
                data = json.loads(prop.value)
                version, layers = data.get("version"), data["layers"]
                if not isinstance(layers, dict):  # dict() took [] (or pairs) for an object
                    raise TypeError(f"'layers' is a {type(layers).__name__}, not an object")
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
                raise BuildError(
                    f"{path}: metadata {SPARSITY_METADATA_KEY!r} is malformed "
                    f'(expected JSON {{"version": {SPARSITY_METADATA_VERSION}, '
                    f'"layers": {{...}}}}: {exc})'
                ) from exc
            if isinstance(version, bool) or version != SPARSITY_METADATA_VERSION:  # true == 1
                raise BuildError(
                    f"{path}: metadata {SPARSITY_METADATA_KEY!r} has version {version!r}; "
                    f"this build reads version {SPARSITY_METADATA_VERSION}"
                )
            return layers
    return {}


def _pattern_macs(spec: Conv3dSpec, units: np.ndarray, group: tuple[int, int]) -> tuple[int, int]:
    """(kept, sparse) MACs per sample of a kept-unit mask ``units`` (P, Q, Kd, Kh, Kw): each
    kept unit holds its group's real filters x real input channels per output position; the
    sparse code runs every kept entry (input channel, location) on all gM lanes."""
    g_m, g_n = group
    filters = np.minimum(g_m, spec.out_channels - g_m * np.arange(units.shape[0]))
    channels = np.minimum(g_n, spec.in_channels - g_n * np.arange(units.shape[1]))
    per_unit = units.sum(axis=(2, 3, 4))
    kept = int((per_unit * filters[:, None] * channels[None, :]).sum())
    entries = int((per_unit * channels[None, :]).sum())
    positions = int(np.prod(spec.out_size))
    return kept * positions, entries * g_m * positions


def layer_sparsity(layer: ConvLayer, declared: object | None) -> LayerSparsity:
    """Resolves a Conv's scheme and group and checks its zeros form that pattern.

    Without a metadata entry the pattern is inferred: group 8x4, "kgs" if any KGS unit is
    pruned, else "dense". Every refusal names the node.
    """
    node = layer.node
    if declared is None:
        group, scheme, source = (
            DEFAULT_GROUP,
            inferred_scheme(layer.weight, name=layer.weight_name),
            "inferred",
        )
    else:
        try:
            if not isinstance(declared, dict) or set(declared) != {"scheme", "group"}:
                raise ValueError(f"expected {{'scheme': ..., 'group': [gM, gN]}}, got {declared}")
            scheme = check_scheme(declared["scheme"])
            group = check_group(declared["group"])
        except ValueError as exc:
            raise BuildError(
                f"node {node!r}: {SPARSITY_METADATA_KEY} entry for {layer.weight_name!r}: {exc}"
            ) from exc
        source = "metadata"
    try:
        if source == "metadata":
            group = check_group_fits(scheme, group, layer.weight.shape, layer.weight_name)
        pattern = validate_pattern(layer.weight, scheme, group, name=layer.weight_name)
    except ValueError as exc:
        raise BuildError(f"node {node!r}: {exc}") from exc
    kept_macs, sparse_macs = _pattern_macs(layer.spec, pattern.units, group)
    return LayerSparsity(
        scheme=scheme,
        group=group,
        source=source,
        balanced=pattern.balanced,
        dense_macs=layer.spec.macs(),
        kept_macs=kept_macs,
        sparse_macs=sparse_macs,
    )


def _host_op(node: onnx.NodeProto) -> dict:
    """A node the app runs, as the manifest lists it: what it reads and writes (tensor names:
    weights are the ONNX file's initializers of those names) and its attributes (a MaxPool's
    kernel and strides, a Gemm's transB), so that the app need not parse the graph for them."""
    attributes = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        elif isinstance(value, list | tuple):
            value = [v.decode(errors="replace") if isinstance(v, bytes) else v for v in value]
        if isinstance(value, int | float | str | list):
            attributes[attr.name] = value
        if isinstance(value, float) and not np.isfinite(value):
            # Clip's max=inf at opset 6 to 10: manifest.json, strict JSON, holds no Inf or NaN.
            # (No host op has a list of floats.)
            raise BuildError(
                f"node {node.name!r}: attribute {attr.name!r} is {value}{FINITE_CONSTANT_HINT}"
            )
    return {
        "node": node.name,
        "op": node.op_type,
        "inputs": list(node.input),
        "outputs": listed_outputs(node.output),
        "attributes": attributes,
    }


ONNX_DOMAINS = ("", "ai.onnx")


def _onnx_op(node: onnx.NodeProto) -> str | None:
    """The node's op where it is one of ONNX's own, None for a custom domain's."""
    return node.op_type if node.domain in ONNX_DOMAINS else None


def _constant_result(node: onnx.NodeProto, inits: dict) -> bool:
    """A Constant node, or an Identity or Cast of a constant (torch exports ReLU6's bounds
    without constant folding as Casts of Constants): its output is a constant, read as data,
    nothing for the app to run."""
    op = _onnx_op(node)
    if op == "Cast" and _attrs(node).get("to") == onnx.TensorProto.STRING:
        return False  # no numeric constant: left to the unsupported-op check
    if op in ("Identity", "Cast"):
        return node.input[0] in inits
    return op == "Constant"


def _constant_result_value(node: onnx.NodeProto, inits: dict) -> onnx.TensorProto:
    if node.op_type == "Constant":
        return _constant_value(node)
    if node.op_type == "Identity":
        return inits[node.input[0]]
    to = onnx.helper.tensor_dtype_to_np_dtype(_attrs(node)["to"])
    array = numpy_helper.to_array(inits[node.input[0]]).astype(to)
    return numpy_helper.from_array(array, node.output[0])


def _in_training_mode(node: onnx.NodeProto, inits: dict, opset: int) -> bool:
    """A BatchNormalization that normalises by the batch's statistics, or a Dropout that drops:
    an app running them as exported would compute what training does, not inference. A
    Dropout's training_mode that is no constant counts as training; before opset 7 both ops
    train unless their ``is_test`` attribute says otherwise (its default is 0)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if opset < 7 and node.op_type in ("BatchNormalization", "Dropout"):
        return not attrs.get("is_test", 0)
    if node.op_type == "BatchNormalization":
        return bool(attrs.get("training_mode", 0)) or len([o for o in node.output if o]) > 1
    if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
        flag = inits.get(node.input[2])
        return flag is None or bool(numpy_helper.to_array(flag))
    return False


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto:
    """A Constant node's value as a tensor named after its output (torch's exporter emits them
    for Reshape shapes, Dropout's ratio, ReduceMean's axes from opset 18)."""
    (attr,) = node.attribute
    if attr.name == "value":
        array = numpy_helper.to_array(attr.t)
    elif attr.name in ("value_float", "value_floats"):
        array = np.asarray(onnx.helper.get_attribute_value(attr), dtype=np.float32)
    elif attr.name in ("value_int", "value_ints"):
        array = np.asarray(onnx.helper.get_attribute_value(attr), dtype=np.int64)
    else:
        raise BuildError(f"node {node.name!r}: a Constant of {attr.name} is not supported")
    return numpy_helper.from_array(array, node.output[0])


def _ceil_pool_size(
    size: int, kernel: int, stride: int, pads: tuple[int, int], dilation: int
) -> int:
    """A ceil_mode pool's output size as torch and onnxruntime compute it: a last window that
    would start in the end padding is dropped."""
    span = size + pads[0] + pads[1] - dilation * (kernel - 1) - 1
    out = -(-span // stride) + 1
    return out - 1 if (out - 1) * stride >= size + pads[0] else out


def _downstream_convs(graph: onnx.GraphProto, tensor: str) -> list[str]:
    """The Conv nodes that read ``tensor`` or anything computed from it."""
    reached, convs = {tensor}, []
    for node in graph.node:  # graph order is topological
        if reached.intersection(node.input):
            reached.update(node.output)
            if node.op_type == "Conv":
                convs.append(node.name)
    return convs


def _check_ceil_pools(graph: onnx.GraphProto, shapes: dict) -> None:
    """onnx's shape inference (1.23) counts a ceil_mode pool's last window where it would start
    past the input and its begin padding, which torch and onnxruntime drop: the shapes after
    such a pool are wrong, and a conv compiled after it would take a size it never gets.
    Refused where a Conv follows, naming the node (a pool before a global pool and a classifier
    builds: no compiled shape depends on it)."""
    for node in graph.node:
        if _onnx_op(node) not in ("MaxPool", "AveragePool"):
            continue
        attrs = _attrs(node)
        if not attrs.get("ceil_mode"):
            continue
        in_shape, out_shape = shapes.get(node.input[0]), shapes.get(node.output[0])
        kernel = attrs.get("kernel_shape", [])
        axes = len(kernel)
        if not kernel or not in_shape or not out_shape or len(in_shape) < axes + 2:
            continue
        sizes = in_shape[-axes:]
        if not all(isinstance(s, int) for s in [*sizes, *out_shape[-axes:]]):
            continue
        auto_pad = attrs.get("auto_pad", b"NOTSET").decode() or "NOTSET"
        if auto_pad.startswith("SAME"):
            expected = None  # onnx and onnxruntime disagree here too: no size to trust
        else:
            strides = attrs.get("strides", [1] * axes)
            pads = [0] * 2 * axes if auto_pad == "VALID" else attrs.get("pads", [0] * 2 * axes)
            dilations = attrs.get("dilations", [1] * axes)
            expected = [
                _ceil_pool_size(s, k, st, (pads[i], pads[i + axes]), d)
                for i, (s, k, st, d) in enumerate(
                    zip(sizes, kernel, strides, dilations, strict=True)
                )
            ]
            if list(out_shape[-axes:]) == expected:
                continue
        convs = _downstream_convs(graph, node.output[0])
        if not convs:
            continue
        sizes_said = (
            f"onnx's shape inference gives {list(out_shape[-axes:])}, torch and onnxruntime "
            f"{expected}"
            if expected
            else f"auto_pad {auto_pad}, where onnx's shape inference and onnxruntime differ"
        )
        raise BuildError(
            f"node {node.name!r}: a ceil_mode {node.op_type} before the conv {convs[0]!r} "
            f"whose output size is in doubt ({sizes_said}): the conv would be compiled for a "
            "size it never gets; export the pool with ceil_mode=False, or a size, stride or "
            "padding that leaves no window starting past the input"
        )


def _check_conv_weights(graph: onnx.GraphProto, inits: dict) -> None:
    """Every Conv's weight is stored in the model, checked before any other node: a weight
    computed at run time (weight_norm's g * v / ||v||) is reported as such, not as the first
    op of its computation."""
    producers = {output: node for node in graph.node for output in node.output}
    for node in graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] not in inits:
            producer = producers.get(node.input[1])
            if producer is not None and producer.op_type == "DequantizeLinear":
                raise BuildError(
                    f"node {node.name!r}: weight {node.input[1]!r} is quantized (dequantized at "
                    f"run time by {producer.name!r}); the build bakes float32 weights: export "
                    "the model unquantized"
                )
            _float_initializer(node, node.input[1], inits)


def _op_name(node: onnx.NodeProto) -> str:
    """The op as the error names it: quoted for ONNX's own, ``domain.Op`` for a custom one."""
    if _onnx_op(node):
        return repr(node.op_type)
    return f"{node.domain}.{node.op_type}"


# Ops torch's exporter emits to compute another op's shape input (a reflect or replicate Pad's
# pads): an error leads with the op they feed, which the user wrote.
SHAPE_ARITHMETIC_OPS = frozenset(
    {"ConstantOfShape", "Slice", "Cast", "Range", "Expand", "Equal", "Where", "ScatterND"}
)


def _unsupported_message(unsupported: list[onnx.NodeProto]) -> str:
    """The first unsupported node that is no shape arithmetic (:data:`SHAPE_ARITHMETIC_OPS`,
    which comes first in the graph: before a reflect Pad, say), then every unsupported op with
    its first nodes: a model may repeat each many times."""
    first = next(
        (node for node in unsupported if _onnx_op(node) not in SHAPE_ARITHMETIC_OPS),
        unsupported[0],
    )
    label, op = first.name, _op_name(first)
    message = (
        f"node {label!r}: op {op} is not supported "
        f"(compiled: Conv; left to the app: {', '.join(sorted(HOST_OPS))})"
    )
    nodes: dict[str, list[str]] = {}
    for node in unsupported:
        nodes.setdefault(_op_name(node), []).append(node.name)
    if len(unsupported) > 1:
        ops = ", ".join(
            f"{kind} at {listing([repr(name) for name in names])}" for kind, names in nodes.items()
        )
        message += f"; unsupported in the model: {ops}"
    return message


def plan_model(path: Path, name: str | None = None) -> ModelPlan:
    """Reads and checks ``path``; every refusal names the node and the reason."""
    model, sha256 = load_onnx(path)
    try:
        # data_prop: a Reshape whose shape is computed (Shape, Gather, Concat of a dynamic
        # batch: a non-local block's x.view(b, c, t, h, w)) gets its sizes, so the conv after
        # it has a static clip.
        inferred = shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:
        # onnx's messages end in a newline: the error stays one line.
        message = " ".join(str(exc).split())
        raise BuildError(f"{path}: ONNX shape inference failed: {message}") from exc
    graph = inferred.graph
    opset = next((o.version for o in model.opset_import if o.domain in ONNX_DOMAINS), 1)
    if opset > onnx.defs.onnx_opset_version():  # its host ops' semantics are unknown here
        raise BuildError(
            f"{path}: opset {opset}, newer than the {onnx.defs.onnx_opset_version()} this onnx "
            f"{onnx.__version__} knows; export at an older opset (17 is tested)"
        )
    if not graph.output:
        raise BuildError(f"{path}: the graph has no outputs; nothing would run")
    inits = {t.name: t for t in graph.initializer}
    # torch's exporter stores equal constants once and passes them to their other users through
    # Identity nodes (the folded biases of a freshly initialised model are all zeros): those are
    # resolved here, not left to the app (:func:`_constant_result`).
    # An unnamed node takes its op and index, made unlike every name the file gives (a node
    # named Conv_2 already): the manifest names nodes, and a node name finds its function.
    taken = {node.name for node in graph.node}
    for index, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"
            while node.name in taken:
                node.name += "_"
            taken.add(node.name)
        if _constant_result(node, inits):
            inits[node.output[0]] = _constant_result_value(node, inits)
    _check_conv_weights(graph, inits)
    real_inputs = [i for i in graph.input if i.name not in inits]
    # The graph's own input declarations last: an input also listed as an output with unknown
    # dimensions keeps its static shape.
    declared = [*graph.value_info, *graph.output, *graph.input]
    shapes = {v.name: _static_shape(v) for v in declared}
    _check_ceil_pools(graph, shapes)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
    graph_outputs = {o.name for o in graph.output}

    model_name = c_identifier(name or path.stem)
    if model_name == "halide" or model_name.startswith("halide_"):
        # <model>_<layer> would land among the runtime's halide_* symbols (halide_malloc).
        raise BuildError(f"model name {model_name!r}: halide_ names belong to Halide's runtime")
    if f"{model_name}.h" in (*RUNTIME_HEADERS, OPENCL_FALLBACK_HEADER) or (
        f"RT3D_{model_name}_H" in OPENCL_FALLBACK_SYMBOLS  # the header guards would clash
    ):
        # include/<model>.h would be written over by (or write over) the header of that name.
        raise BuildError(
            f"model name {model_name!r}: include/{model_name}.h is a header the builds ship "
            "(or its header guard would be one's)"
        )
    layers: list[ConvLayer] = []
    host_ops: list[dict[str, Any]] = []
    steps: list[dict[str, str | int]] = []
    fused: set[int] = set()
    # A function may not take a name the OpenCL fallback header defines either.
    used_names: set[str] = set(OPENCL_FALLBACK_SYMBOLS)
    renamed: dict[str, str] = {}
    # Every unsupported op in one error, before any Conv's checks: an unsupported op upstream
    # (a reflect Pad) leaves its Conv's input shape unknown, which is not the user's problem.
    unsupported = [
        node
        for node in graph.node
        if not _constant_result(node, inits) and _onnx_op(node) not in SUPPORTED_OPS
    ]
    if unsupported:
        message = _unsupported_message(unsupported)
        local = {(f.domain, f.name) for f in model.functions}
        if any((node.domain, node.op_type) in local for node in unsupported):
            message += (
                "; the model holds local functions (torch's export_modules_as_functions): "
                "inline them first (onnx.inliner.inline_local_functions)"
            )
        raise BuildError(message)
    for node in graph.node:
        if _in_training_mode(node, inits, opset):
            if opset < 7:
                fix = "set is_test=1 on the node, or re-export the model at opset 7 or later in "
            else:
                fix = "export the model in "
            raise BuildError(
                f"node {node.name!r}: {node.op_type} in training mode: {fix}eval mode "
                "(model.eval(); torch.onnx.export(..., training=torch.onnx.TrainingMode.EVAL))"
            )
    for node in graph.node:
        label = node.name
        if id(node) in fused or _constant_result(node, inits):
            continue
        if node.op_type == "Conv":
            users = consumers.get(node.output[0], [])
            relu = (
                len(users) == 1
                and users[0].op_type == "Relu"
                and node.output[0] not in graph_outputs
            )
            weight_name = node.input[1] if len(node.input) > 1 else ""
            fn_name = wanted = c_identifier(f"{model_name}_{layer_label(label, weight_name)}")
            # Halide also defines <fn>_argv and <fn>_metadata: no name may take another's.
            while _halide_symbols(fn_name) & used_names:
                fn_name += "_"
            if fn_name != wanted:
                renamed[fn_name] = wanted
            used_names |= _halide_symbols(fn_name)
            layer = _conv_layer(node, inits, shapes, relu, fn_name)
            if relu:
                relu_node = users[0]
                fused.add(id(relu_node))
                layer.output_name = relu_node.output[0]
            layers.append(layer)
            steps.append({"function": fn_name})
        else:
            steps.append({"host_op": len(host_ops)})  # node names need not be unique
            host_ops.append(_host_op(node))
    if not layers:
        raise BuildError(f"{path}: the model has no Conv nodes to compile")
    # Checked after the nodes, so that a Conv weight fed as a graph input is reported against
    # its node ("not a constant initializer") rather than as a second input clip.
    if len(real_inputs) != 1:
        names = ", ".join(repr(i.name) for i in real_inputs)
        raise BuildError(
            f"{path}: expected one input clip, found {len(real_inputs)} inputs ({names})"
        )
    sparsity = read_sparsity_metadata(model, path)
    weight_names = {layer.weight_name for layer in layers}
    for weight_name in sparsity:
        if weight_name not in weight_names:
            # The weights' names in the file, which can differ from the torch module's (a conv
            # whose BatchNorm the exporter folded reads an initializer named onnx::Conv_29).
            known = listing([repr(layer.weight_name) for layer in layers], shown=3)
            raise BuildError(
                f"{path}: {SPARSITY_METADATA_KEY} names {weight_name!r}, "
                f"which is not the weight of any Conv node (their weights: {known})"
            )
    for layer in layers:
        layer.sparsity = layer_sparsity(layer, sparsity.get(layer.weight_name))
    stored = {t.name for t in graph.initializer}
    host_constants: dict[str, dict[str, Any]] = {}
    # A graph output that is a constant of the file (a label table a model returns) is computed
    # by no step: it ships as a host op's constant input does.
    readers = [(op["node"], op["inputs"]) for op in host_ops]
    readers.append(("the graph's outputs", [o.name for o in graph.output if o.name in inits]))
    for reader, names in readers:
        for name in names:
            if name in inits and name not in stored and name not in host_constants:
                host_constants[name] = _host_constant(name, inits[name], stored, reader)
    read = [name for _, names in readers for name in names if name in stored]
    read += [c["initializer"] for c in host_constants.values() if "initializer" in c]
    host_weights = {name: numpy_helper.to_array(inits[name]) for name in dict.fromkeys(read)}
    first_reader = {name: node.name for node in reversed(graph.node) for name in node.input}
    for name, array in host_weights.items():
        _check_finite(first_reader.get(name, "the graph's outputs"), name, array)
    return ModelPlan(
        name=model_name,
        path=path,
        sha256=sha256,
        layers=layers,
        host_ops=host_ops,
        input_name=real_inputs[0].name,
        input_shape=_static_shape(real_inputs[0]),
        host_constants=host_constants,
        steps=steps,
        outputs=[{"name": o.name, "shape": _static_shape(o)} for o in graph.output],
        host_weights=host_weights,
        opset=opset,
        renamed=renamed,
    )


# Constants of more elements than this ship in host_weights.bin rather than manifest.json.
INLINE_CONSTANT_MAX = 256


def _host_constant(
    name: str, tensor: onnx.TensorProto, stored: set[str], node: str
) -> dict[str, Any]:
    """A host op's constant input: the stored tensor it is an Identity of, or its value (which
    JSON could not hold as NaN or Inf, were they not refused); a large computed one (a Cast of a
    stored weight) ships in the host weights under its own name, not inline in the manifest."""
    if tensor.name in stored:
        return {"initializer": tensor.name}
    array = numpy_helper.to_array(tensor)
    _check_finite(node, name, array, FINITE_CONSTANT_HINT if array.size == 1 else "")
    if array.size > INLINE_CONSTANT_MAX:
        return {"initializer": tensor.name}
    return {"dtype": str(array.dtype), "shape": list(array.shape), "values": array.ravel().tolist()}
