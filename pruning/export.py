"""ONNX export: the hand-over from the pruner to the Halide build driver.

The file is standard ONNX so that onnxruntime and any other tool can run it; the pattern travels
as exact zeros in the conv weights and the declared scheme per conv as ``rt3d.sparsity`` metadata
(see :mod:`rt3d_halide.pruning.patterns`). BatchNorm is folded into the preceding convs because the
generators compute conv+bias only, and folding scales whole filters, so zeros stay exact zeros.
"""

from __future__ import annotations

import collections
import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from .layers import check_not_wrapped
from .masks import bake, deepcopy_model, sparsity_of
from .patterns import (
    DEFAULT_GROUP,
    SPARSITY_METADATA_KEY,
    check_group,
    check_onnx_sparsity,
    clipped_group,
    conv_weight_arrays,
    inferred_scheme,
    sparsity_metadata,
)

MIN_OPSET = 17


class _LayerLeafTracer(torch.fx.Tracer):
    """Keeps every Conv3d and BatchNorm a module call, subclasses too.

    torch.fx's own tracer steps into modules defined outside ``torch.nn`` (torchvision's
    ``Conv3DSimple``, a user's ``MyConv(nn.Conv3d)``), leaving a bare ``conv3d`` call with no
    module to carry the pruner's scheme and group, and no module name for the ONNX weight.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        kinds = (nn.Conv3d, nn.modules.batchnorm._BatchNorm)
        return isinstance(m, kinds) or super().is_leaf_module(m, module_qualified_name)


def _computes_as_its_base(module: nn.Module, base: type[nn.Module]) -> bool:
    """``module`` computes what ``base`` does with its parameters: no forward or
    ``_conv_forward`` of its own (weight standardization overrides either), no
    parametrization (weight_norm) and no hooks, any of which a folded scale would meet
    unscaled."""
    own = [name for name in ("forward", "_conv_forward") if hasattr(base, name)]
    return (
        all(getattr(type(module), name) is getattr(base, name) for name in own)
        and not torch.nn.utils.parametrize.is_parametrized(module)
        and not module._forward_hooks
        and not module._forward_pre_hooks
    )


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """A Conv3d into a BatchNorm3d that normalizes by running statistics, both computing as
    torch's own classes do. (Only convs: a Linear acts on the last axis, a BatchNorm1d on axis
    1, which are one axis only for 2-D inputs.)"""
    return (
        isinstance(conv, nn.Conv3d)
        and isinstance(bn, nn.BatchNorm3d)
        and _computes_as_its_base(conv, nn.Conv3d)
        and _computes_as_its_base(bn, nn.BatchNorm3d)
        and bn.track_running_stats
    )


def _baked_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with its masks baked: exact zeros in plain weights."""
    model = deepcopy_model(model).eval()
    for module in model.modules():
        bake(module)
    return model


def _fold(model: nn.Module) -> nn.Module:
    """``model`` traced, each BatchNorm folded into the conv before it where that is exact; a
    model without BatchNorm3d as it is (a trace exports what it saw: a branch on
    ``torch.onnx.is_in_onnx_export()`` or on an argument left None would be decided by it)."""
    from torch.fx.experimental.optimization import replace_node_module
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if not any(isinstance(m, nn.BatchNorm3d) for m in model.modules()):
        return model
    try:
        traced = torch.fx.GraphModule(model, _LayerLeafTracer().trace(model))
    except Exception as err:
        raise ValueError(
            "export_onnx folds each BatchNorm3d into the conv before it, which takes a torch.fx "
            f"trace, and torch.fx could not trace {type(model).__name__} ({err}): make its "
            "forward traceable (no Python branch on a tensor's values or shape), or fold the "
            "BatchNorms into their convs first (torch.nn.utils.fusion.fuse_conv_bn_eval)"
        ) from err
    modules = dict(traced.named_modules())
    graph = traced.graph
    calls = collections.Counter(n.target for n in graph.nodes if n.op == "call_module")
    # A module's parameters read outside its call (F.conv3d(x, conv.weight)) would read the
    # folded values too.
    read = {n.target.rpartition(".")[0] for n in graph.nodes if n.op == "get_attr"}
    for node in list(graph.nodes):
        source = node.args[0] if node.op == "call_module" and node.args else None
        if not isinstance(source, torch.fx.Node) or source.op != "call_module":
            continue
        conv, bn = modules[source.target], modules[node.target]
        alone = all(calls[m] == 1 and m not in read for m in (source.target, node.target))
        if alone and len(source.users) == 1 and len(node.args) == 1 and _foldable(conv, bn):
            replace_node_module(source, modules, fuse_conv_bn_eval(conv, bn))
            node.replace_all_uses_with(source)
            graph.erase_node(node)
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode, masks baked, with each BatchNorm that follows a Conv3d
    folded into it where that is exact: the conv's output read by the BatchNorm alone, each
    called once and its parameters read nowhere else, both computing as torch's own classes
    (:func:`_foldable`); any other BatchNorm stays in the graph, for the app to run.

    Conv modules keep their qualified names and classes (subclasses of Conv3d included), so
    ONNX initializer names stay ``<module path>.weight``.
    """
    return _fold(_baked_copy(model))


def _declared(
    weight: np.ndarray, unmarked_group: tuple[int, int], name: str
) -> tuple[str, tuple[int, int]]:
    """A conv the pruner did not mark is declared by its zeros: KGS with ``unmarked_group``
    when a whole unit is zero (a layer pruned by hand or by another tool, or a pruned model's
    weights loaded into a fresh one, which a ``dense`` declaration would keep from sparse
    code), else dense."""
    scheme = inferred_scheme(weight, unmarked_group, name)
    if scheme == "dense":
        return scheme, unmarked_group
    return scheme, clipped_group(unmarked_group, weight.shape)


def _conv_specs(
    baked: nn.Module, folded: nn.Module, unmarked_group: tuple[int, int]
) -> dict[str, tuple[str, tuple[int, int], np.ndarray, bool]]:
    """Per Conv3d weight of ``baked`` that the traced ``folded`` model uses: the scheme and
    group the pruner recorded (marked: True), else declared by its zeros (:func:`_declared`),
    with its weight as folded. The declarations come from ``baked``: where the model reads a
    conv's weight outside the conv's call, the traced model holds the weight alone. A sparse
    layer's group is written clipped to the layer (:func:`clipped_group`)."""
    specs = {}
    for name, module in baked.named_modules():
        if isinstance(module, nn.Conv3d):
            try:
                parameter = folded.get_parameter(f"{name}.weight")
            except AttributeError:  # a conv the forward never uses
                continue
            spec = sparsity_of(module)
            weight = parameter.detach().cpu().numpy()
            if spec:
                scheme, group = spec.scheme, spec.group
                if scheme != "dense":
                    group = clipped_group(group, weight.shape)
            else:
                scheme, group = _declared(weight, unmarked_group, f"{name}.weight")
            specs[f"{name}.weight"] = (scheme, group, weight, spec is not None)
    return specs


def _declared_as_pruned(
    array: np.ndarray, marked: list[tuple[np.ndarray, str, tuple[int, int]]]
) -> tuple[str, tuple[int, int]] | None:
    """The declaration of the pruned conv whose zeros an unmatched weight shares: the exporter
    folds a BatchNorm after a second call of a shared conv into a weight of its own, which
    declared by its zeros took the export's default group, not the pruner's."""
    for weight, scheme, group in marked:
        if _same_zeros(weight, array):
            return scheme, group
    return None


def _same_zeros(a: np.ndarray, b: np.ndarray) -> bool:
    """Two weights of one shape with zeros (a pruned pattern) in exactly the same places."""
    zeros = a == 0
    return a.shape == b.shape and bool(zeros.any()) and np.array_equal(zeros, b == 0)


def _match_initializer(
    name: str, weight: np.ndarray, conv_weights: dict[str, np.ndarray], taken: set[str]
) -> str | None:
    """Find the ONNX initializer of a torch conv weight: by name, else by identical content
    (None: a conv whose forward computes the weight it convolves with)."""
    if name in conv_weights and name not in taken:
        return name
    for candidate, array in conv_weights.items():
        if candidate not in taken and array.shape == weight.shape and np.array_equal(array, weight):
            return candidate
    return None


def _match_zeros(
    weight: np.ndarray, conv_weights: dict[str, np.ndarray], taken: set[str]
) -> str | None:
    """The untaken ONNX conv weight of ``weight``'s shape with exactly its zeros, if one."""
    for candidate, array in conv_weights.items():
        if candidate not in taken and _same_zeros(weight, array):
            return candidate
    return None


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: Sequence[int],
    *,
    opset: int = MIN_OPSET,
    dynamic_batch: bool = False,
    group: Sequence[int] = DEFAULT_GROUP,
) -> Path:
    """Export ``model`` for the build driver and check the result against the contract.

    ``input_shape`` is NCDHW, e.g. ``(1, 3, 16, 112, 112)`` (CDHW: batch 1, as the
    :class:`Pruner` takes it). The model is not modified; it may live on any device and in any
    floating type (the export traces a float32 copy on the CPU). A failed export leaves
    ``path`` as it was. Convs that a :class:`Pruner`
    marked are declared with its scheme and group; ``group`` is the one declared for the
    others whose zeros hold whole units: the scheme and group live on the module, not in its
    ``state_dict``, so a model pruned with another group and loaded from its weights needs it
    again (or it is declared 8x4, and the build runs whole 8x4 groups).
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}, got {opset}")
    group = check_group(group)
    input_shape = tuple(int(v) for v in input_shape)
    if len(input_shape) == 4:  # (C, D, H, W), as the Pruner takes it
        input_shape = (1, *input_shape)
    if len(input_shape) != 5 or min(input_shape) <= 0:
        raise ValueError(
            f"input_shape must be 5 positive ints (N, C, D, H, W), or 4 (C, D, H, W), "
            f"got {input_shape}"
        )
    check_not_wrapped(model, "export_onnx")
    path = Path(path)
    # Written beside its place and moved there once checked: a failed export leaves no file
    # that breaks the contract (a diverged run's NaN weights) and keeps an earlier one.
    partial = path.with_name(f"{path.name}.partial")
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of the dynamo one, which needs
            # onnxscript (not a dependency); the notices say nothing about this export.
            warnings.simplefilter("ignore", DeprecationWarning)
            # float32, the generated code's type, whatever the model trains in. Under the
            # caller's autocast the trace would hold bfloat16 weights, under a float64 default
            # dtype the tensors the forward makes (torch.fx keeps those made from constants
            # as constants of its trace) float64.
            with torch.autocast("cpu", enabled=False), _default_dtype(torch.float32):
                baked = _baked_copy(model).float()
                folded = _fold(baked).cpu()
                called = _calls_recorded(folded)
                torch.onnx.export(
                    folded,
                    (torch.zeros(input_shape, dtype=torch.float32),),
                    str(partial),
                    dynamo=False,
                    opset_version=opset,
                    input_names=["input"],
                    output_names=["output"],
                    dynamic_axes=(
                        {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
                    ),
                    do_constant_folding=True,
                    training=torch.onnx.TrainingMode.EVAL,
                )
        _write_metadata(baked, folded, partial, group, called)
        check_onnx_sparsity(partial)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _calls_recorded(model: nn.Module) -> set[str]:
    """The names of ``model``'s Conv3d modules, filled as its forward calls them: a conv it
    never calls (an auxiliary head off in the deployed model) has no weight in the graph."""
    called: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv3d):
            module.register_forward_pre_hook(lambda *_args, name=name: called.add(name))
    return called


def _write_metadata(
    baked: nn.Module,
    folded: nn.Module,
    path: Path,
    unmarked_group: tuple[int, int],
    called: set[str],
) -> None:
    onnx_model = onnx.load(str(path))
    conv_weights = conv_weight_arrays(onnx_model)
    layers: dict[str, tuple[str, tuple[int, int]]] = {}
    specs = _conv_specs(baked, folded, unmarked_group)
    unmatched = []
    for name, (scheme, group, weight, marked) in specs.items():
        found = _match_initializer(name, weight, conv_weights, set(layers))
        if found is not None:
            layers[found] = (scheme, group)
        elif marked and name.removesuffix(".weight") in called:
            unmatched.append((name, scheme, group, weight))
    # A BatchNorm the trace could not fold (a hook on the conv) torch's exporter folds itself,
    # into a weight of its own: scaled per filter, the same zeros. Found by them among the
    # weights that no conv took by name or content, and never one named after another conv.
    for name, scheme, group, weight in unmatched:
        found = _match_zeros(weight, conv_weights, set(layers) | set(specs))
        if found is None:
            raise ValueError(
                f"the pruned conv {name.removesuffix('.weight')} has no weight in the exported "
                "graph: its forward computes the weight it convolves with, not its pruned "
                "parameter, so the exported weight would keep no pattern"
            )
        layers[found] = (scheme, group)
    # A Conv no module stands for (a functional conv3d, a weight computed in a forward) is
    # declared by its zeros too: the metadata lists every conv weight.
    marked = [(weight, scheme, group) for scheme, group, weight, mark in specs.values() if mark]
    for name, array in conv_weights.items():
        if name not in layers:
            layers[name] = _declared_as_pruned(array, marked) or _declared(
                array, unmarked_group, name
            )
    others = [(p.key, p.value) for p in onnx_model.metadata_props if p.key != SPARSITY_METADATA_KEY]
    del onnx_model.metadata_props[:]
    for key, value in [*others, (SPARSITY_METADATA_KEY, sparsity_metadata(layers))]:
        onnx_model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(onnx_model)
    onnx.save(onnx_model, str(path))
