"""The ONNX export contract with the generators (issue 3, section 5)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from rt3d_halide.pruning import Pruner, check_onnx_sparsity, export_onnx
from rt3d_halide.pruning.export import fold_batchnorm
from rt3d_halide.pruning.groups import LayerSparsity, unit_mask_to_weight_mask
from rt3d_halide.pruning.masks import set_mask
from rt3d_halide.pruning.models import R2Plus1D18, Tiny3DCNN
from rt3d_halide.pruning.patterns import kept_units

from rt3d_halide.errors import BuildError
from rt3d_halide.onnx_import import plan_model

torch.set_num_threads(1)

# fp32 with BatchNorm folded: relative L2 error of the logits, as DESIGN.md's fp32 bound.
RELATIVE_TOLERANCE = 1e-5
GROUP44 = LayerSparsity("kgs", (4, 4))


def _randomly_pruned_tiny(scheme: str, group: tuple[int, int]) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = Tiny3DCNN()
    units = {}
    for name, conv in model.named_modules():
        if isinstance(conv, torch.nn.Conv3d) and name != "features.0":
            spec = LayerSparsity(scheme, group)
            units[name] = torch.rand(spec.unit_shape(tuple(conv.weight.shape))) < 0.5
            set_mask(conv, unit_mask_to_weight_mask(units[name], conv.weight.shape, spec), spec)
    model.train()
    for _ in range(3):  # non-trivial BatchNorm statistics to fold
        model(torch.randn(4, 3, 8, 16, 16) * 2 + 0.5)
    return model.eval(), units


def _relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize(("scheme", "group"), [("kgs", (8, 4)), ("vanilla", (4, 4))])
def test_export_matches_torch_with_folded_bn_exact_zeros_and_metadata(tmp_path, scheme, group):
    model, units = _randomly_pruned_tiny(scheme, group)
    path = export_onnx(model, tmp_path / "tiny.onnx", (1, 3, 8, 16, 16))
    onnx_model = onnx.load(str(path))
    assert onnx_model.opset_import[0].version >= 17
    assert "BatchNormalization" not in {node.op_type for node in onnx_model.graph.node}
    metadata = json.loads({p.key: p.value for p in onnx_model.metadata_props}["rt3d.sparsity"])
    assert metadata == {
        "version": 1,
        "layers": {
            "features.0.weight": {"scheme": "dense", "group": [8, 4]},
            "features.4.weight": {"scheme": scheme, "group": list(group)},
            "features.8.weight": {"scheme": scheme, "group": list(group)},
        },
    }
    weights = {i.name: numpy_helper.to_array(i) for i in onnx_model.graph.initializer}
    for name, expected in units.items():
        derived = kept_units(weights[f"{name}.weight"], group)
        if scheme == "vanilla":
            derived = derived.any(axis=(2, 3, 4))
        assert np.array_equal(derived, expected.numpy())
    patterns = check_onnx_sparsity(path)
    assert set(patterns) == set(metadata["layers"])

    x = torch.randn(2, 3, 8, 16, 16)
    with torch.no_grad():
        ref = model(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = [session.run(None, {"input": x[i : i + 1].numpy()})[0] for i in range(2)]
    assert _relative_error(np.concatenate(outs), ref) < RELATIVE_TOLERANCE
    assert model.training is False and hasattr(model.features[4], "weight_mask")


def test_conv_pruned_outside_the_pruner_is_declared_by_its_zeros(tmp_path):
    """Layers zeroed by hand (no pruner masks) are declared KGS, so the build plans them as KGS;
    an untouched one stays dense. The 3 -> 6 stem, smaller than 8x4 both ways, is declared 6x3
    (the build refuses a declared group larger than its layer both ways)."""
    torch.manual_seed(0)
    model = Tiny3DCNN().eval()
    conv = model.features[4]
    spec = LayerSparsity("kgs", (8, 4))
    unit = torch.rand(spec.unit_shape(tuple(conv.weight.shape))) < 0.3
    with torch.no_grad():
        conv.weight.mul_(unit_mask_to_weight_mask(unit, conv.weight.shape, spec))
        model.features[0].weight[:, :, 0, 0, 0] = 0
    path = export_onnx(model, tmp_path / "by_hand.onnx", (1, 3, 8, 16, 16))
    layers = check_onnx_sparsity(path)
    declared = {name: (layer.scheme, layer.group) for name, layer in layers.items()}
    assert declared == {
        "features.0.weight": ("kgs", (6, 3)),
        "features.4.weight": ("kgs", (8, 4)),
        "features.8.weight": ("dense", (8, 4)),
    }
    assert np.array_equal(layers["features.4.weight"].units, unit.numpy())
    stem_units = layers["features.0.weight"].units
    assert stem_units.shape == (1, 1, 3, 3, 3) and stem_units.sum() == 26
    planned = {layer.weight_name: layer.sparsity for layer in plan_model(path).layers}
    assert planned["features.4.weight"].scheme == "kgs"
    assert planned["features.0.weight"].group == (6, 3)
    assert {s.source for s in planned.values()} == {"metadata"}


def test_pruner_defaults_on_a_stem_smaller_than_the_group_export_a_buildable_model(tmp_path):
    """The pruner prunes Tiny3DCNN's 3 -> 6 stem with 8x4 groups (one truncated group); the
    export declares that group clipped to 6x3, the same units, which the build accepts."""
    torch.manual_seed(0)
    model = Tiny3DCNN().eval()
    pruner = Pruner(model, (3, 8, 16, 16), target_rate=2.0).prepare()
    pruner.prune()
    stem = pruner.kept_units(pruner.layers[0]).numpy()
    assert pruner.layers[0].name == "features.0" and not stem.all()
    path = export_onnx(model, tmp_path / "pruned.onnx", (1, 3, 8, 16, 16))
    layers = check_onnx_sparsity(path)
    assert layers["features.0.weight"].group == (6, 3)
    assert np.array_equal(layers["features.0.weight"].units, stem)
    planned = {layer.weight_name: layer.sparsity for layer in plan_model(path).layers}
    assert planned["features.0.weight"].group == (6, 3)


def test_export_r2plus1d_names_every_conv_and_runs(tmp_path):
    torch.manual_seed(0)
    model = R2Plus1D18(num_classes=5).eval()
    conv = model.layer2[0].conv1[0][3]
    spec = LayerSparsity("kgs", (8, 4))
    unit = torch.rand(spec.unit_shape(tuple(conv.weight.shape))) < 0.3
    set_mask(conv, unit_mask_to_weight_mask(unit, conv.weight.shape, spec), spec)
    path = export_onnx(model, tmp_path / "r21d.onnx", (1, 3, 4, 32, 32), dynamic_batch=True)
    layers = check_onnx_sparsity(path)
    assert len(layers) == sum(isinstance(m, torch.nn.Conv3d) for m in model.modules()) == 37
    assert layers["layer2.0.conv1.0.3.weight"].scheme == "kgs"
    assert np.array_equal(layers["layer2.0.conv1.0.3.weight"].units, unit.numpy())
    # The build names each function after its conv's module path (torch's node names drop the
    # outer modules: layer1.1's conv1.0.3 is node /conv1.0.3_1/Conv).
    names = sorted(layer.spec.name for layer in plan_model(path).layers)
    assert names == sorted(f"r21d_{n[: -len('.weight')].replace('.', '_')}" for n in layers)
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        ref = model(x).numpy()
    out = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})[0]
    assert _relative_error(out, ref) < RELATIVE_TOLERANCE


def test_checker_rejects_mislabelled_and_unknown_layers(tmp_path):
    model, _ = _randomly_pruned_tiny("kgs", (8, 4))
    path = export_onnx(model, tmp_path / "tiny.onnx", (1, 3, 8, 16, 16))
    onnx_model = onnx.load(str(path))
    meta = onnx_model.metadata_props[0]
    body = json.loads(meta.value)
    body["layers"]["features.8.weight"]["scheme"] = "vanilla"
    meta.value = json.dumps(body)
    onnx.save(onnx_model, str(tmp_path / "mislabelled.onnx"))
    with pytest.raises(ValueError, match=r"features\.8\.weight: declared vanilla"):
        check_onnx_sparsity(tmp_path / "mislabelled.onnx")
    body["layers"] = {"classifier.weight": {"scheme": "kgs", "group": [8, 4]}}
    meta.value = json.dumps(body)
    onnx.save(onnx_model, str(tmp_path / "unknown.onnx"))
    with pytest.raises(ValueError, match="not the weight of any 3D Conv"):
        check_onnx_sparsity(tmp_path / "unknown.onnx")
    body["layers"] = {"features.8.weight": {"scheme": "kgs", "group": [32, 32]}}
    meta.value = json.dumps(body)
    onnx.save(onnx_model, str(tmp_path / "too_big.onnx"))
    with pytest.raises(ValueError, match=r"group \[32, 32\] does not fit the layer \(20 filters"):
        check_onnx_sparsity(tmp_path / "too_big.onnx")
    with pytest.raises(BuildError, match=r"group \[32, 32\] does not fit the layer \(20 filters"):
        plan_model(tmp_path / "too_big.onnx")
    body["layers"] = {"features.8.weight": {"scheme": "kgs", "group": [True, 4]}}
    meta.value = json.dumps(body)
    onnx.save(onnx_model, str(tmp_path / "truth_value.onnx"))
    with pytest.raises(ValueError, match=r"group must be two positive integers"):
        check_onnx_sparsity(tmp_path / "truth_value.onnx")


def test_checker_reads_a_file_without_metadata_as_the_build_does(tmp_path):
    model, _ = _randomly_pruned_tiny("kgs", (8, 4))
    path = export_onnx(model, tmp_path / "tiny.onnx", (1, 3, 8, 16, 16))
    onnx_model = onnx.load(str(path))
    del onnx_model.metadata_props[:]
    onnx.save(onnx_model, str(tmp_path / "bare.onnx"))
    checked = check_onnx_sparsity(tmp_path / "bare.onnx")
    planned = {
        layer.weight_name: layer.sparsity for layer in plan_model(tmp_path / "bare.onnx").layers
    }
    assert checked.keys() == planned.keys()
    for name, pattern in checked.items():
        assert (pattern.scheme, pattern.group) == (planned[name].scheme, planned[name].group)
        assert planned[name].source == "inferred"


def test_checker_reads_a_constant_nodes_weight_as_the_build_does(tmp_path):
    """A weight from a Constant node (an Identity of it too) is a Conv weight for the metadata,
    as the build resolves it."""
    weight = np.zeros((8, 4, 3, 3, 3), np.float32)
    weight[:, :, 1] = 1.0  # KGS 8x4: only the middle kernel frame kept
    nodes = [
        onnx.helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight, "w")),
        onnx.helper.make_node("Identity", ["w"], ["w2"]),
        onnx.helper.make_node("Conv", ["x", "w2"], ["y"], name="conv", pads=[1] * 6),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 4, 6, 6])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 4, 6, 6])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    entry = {"scheme": "kgs", "group": [8, 4]}
    onnx.helper.set_model_props(
        model, {"rt3d.sparsity": json.dumps({"version": 1, "layers": {"w2": entry}})}
    )
    onnx.save(model, str(tmp_path / "constant.onnx"))
    (checked,) = check_onnx_sparsity(tmp_path / "constant.onnx").values()
    (layer,) = plan_model(tmp_path / "constant.onnx").layers
    assert (checked.name, layer.weight_name, layer.sparsity.source) == ("w2", "w2", "metadata")
    assert checked.units.sum() == 9 and layer.sparsity.scheme == "kgs"


def test_two_convs_with_equal_weights_export_and_build_with_their_declarations(tmp_path):
    """torch's exporter stores equal weights once and feeds the second conv through an
    Identity: both convs are declared, under the names the build reads."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv3d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(16, 16, 3, padding=1)
    )
    twin = torch.nn.Conv3d(16, 16, 3, padding=1)
    twin.load_state_dict(model[2].state_dict())
    model.append(torch.nn.ReLU())
    model.append(twin)
    spec = LayerSparsity("kgs", (8, 4))
    unit = torch.rand(spec.unit_shape(tuple(twin.weight.shape))) < 0.5
    for conv in (model[2], twin):  # the same pattern: the weights stay equal
        set_mask(conv, unit_mask_to_weight_mask(unit, twin.weight.shape, spec), spec)
    path = export_onnx(model, tmp_path / "twins.onnx", (1, 3, 4, 8, 8))
    checked = check_onnx_sparsity(path)
    planned = {layer.weight_name: layer.sparsity for layer in plan_model(path).layers}
    assert checked.keys() == planned.keys() and len(planned) == 3
    assert [(s.source, s.scheme) for s in planned.values()] == [
        ("metadata", "dense"), ("metadata", "kgs"), ("metadata", "kgs"),
    ]  # fmt: skip


def test_a_pruned_models_weights_loaded_into_a_fresh_one_export_with_the_group_given(tmp_path):
    """The scheme and group live on the modules, not in the state_dict: a 4x4-pruned model
    reloaded is declared 8x4 unless export_onnx is told, and the build then runs whole 8x4
    groups."""
    torch.manual_seed(0)
    model = Tiny3DCNN().eval()
    pruner = Pruner(model, (3, 8, 16, 16), target_rate=2.0, group=(4, 4), algorithm="magnitude")
    pruner.prepare().prune()
    pruner.finalize()
    fresh = Tiny3DCNN().eval()
    fresh.load_state_dict(model.state_dict())
    path = export_onnx(fresh, tmp_path / "m.onnx", (3, 8, 16, 16), group=(4, 4))
    declared = {n: (layer.scheme, layer.group) for n, layer in check_onnx_sparsity(path).items()}
    assert declared == {
        "features.0.weight": ("kgs", (4, 3)),
        "features.4.weight": ("kgs", (4, 4)),
        "features.8.weight": ("kgs", (4, 4)),
    }
    untold = check_onnx_sparsity(export_onnx(fresh, tmp_path / "u.onnx", (3, 8, 16, 16)))
    assert untold["features.4.weight"].group == (8, 4)
    marked = export_onnx(model, tmp_path / "marked.onnx", (1, 3, 8, 16, 16))
    assert check_onnx_sparsity(marked).keys() == declared.keys()
    assert {n: (x.scheme, x.group) for n, x in check_onnx_sparsity(marked).items()} == declared


class _SubclassedConv(torch.nn.Conv3d):
    """As torchvision's video ResNets build theirs (Conv3DSimple, Conv3DNoTemporal)."""


class _StandardizedConv(torch.nn.Conv3d):
    """Weight standardization as timm writes it: a folded BatchNorm scale would be divided out
    again, so the BatchNorm stays."""

    def _conv_forward(self, x, weight, bias):
        dims = (1, 2, 3, 4)
        weight = (weight - weight.mean(dim=dims, keepdim=True)) / weight.std(dim=dims, keepdim=True)
        return super()._conv_forward(x, weight, bias)


def test_conv3d_subclasses_keep_their_names_declarations_and_folded_batchnorm(tmp_path):
    """torch.fx's own tracer steps into convs defined outside torch.nn: their scheme and group
    were lost (the build inferred 8x4 groups) and their weights renamed."""
    torch.manual_seed(0)
    conv, bn = _SubclassedConv, torch.nn.BatchNorm3d
    model = torch.nn.Sequential(
        torch.nn.Conv3d(3, 16, 3, padding=1), torch.nn.ReLU(),
        conv(16, 32, 3, padding=1, bias=False), bn(32), torch.nn.ReLU(),
        _StandardizedConv(32, 16, 1), bn(16),
    )  # fmt: skip
    model.train()
    model(torch.randn(4, 3, 4, 8, 8))  # BatchNorm statistics to fold
    pruner = Pruner(
        model, (3, 4, 8, 8), target_rate=1.5, scheme="vanilla", group=(4, 4), exclude=["0", "5"]
    )
    pruner.prepare().prune()
    pruner.finalize()
    path = export_onnx(model.eval(), tmp_path / "m.onnx", (3, 4, 8, 8))
    declared = {n: (layer.scheme, layer.group) for n, layer in check_onnx_sparsity(path).items()}
    # The standardized conv's weight is computed in the graph: no constant to declare. The
    # 3-channel stem's 8x4 is read clipped to it, as the build reads it.
    assert declared == {"0.weight": ("dense", (8, 3)), "2.weight": ("vanilla", (4, 4))}
    onnx_model = onnx.load(str(path))
    assert [n.op_type for n in onnx_model.graph.node].count("BatchNormalization") == 1
    x = torch.randn(1, 3, 4, 8, 8)
    with torch.no_grad():
        ref = model(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert _relative_error(session.run(None, {"input": x.numpy()})[0], ref) < RELATIVE_TOLERANCE
    # Pruned, the standardized conv's zeros do not reach the graph: refused, not lost.
    set_mask(model[5], torch.zeros_like(model[5].weight), LayerSparsity("vanilla", (4, 4)))
    with pytest.raises(
        ValueError,
        match="the pruned conv 5 has no weight in the exported graph: its forward computes",
    ):
        export_onnx(model, tmp_path / "p.onnx", (3, 4, 8, 8))


class _ConvCalledTwice(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv3d(4, 4, 3, padding=1), torch.nn.BatchNorm3d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.bn(self.conv(x))))


class _WeightReadElsewhere(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv3d(4, 4, 3, padding=1), torch.nn.BatchNorm3d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        again = torch.nn.functional.conv3d(x, self.conv.weight, self.conv.bias, padding=1)
        return self.bn(self.conv(x)) + again


class _ConvFeedsASkip(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv3d(4, 4, 3, padding=1), torch.nn.BatchNorm3d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def _hooked() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Conv3d(4, 4, 3, padding=1), torch.nn.BatchNorm3d(4))
    model[0].register_forward_hook(lambda module, args, out: out + 1.0)
    return model


def _weight_normed() -> torch.nn.Module:
    conv = torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv3d(4, 4, 3, padding=1))
    return torch.nn.Sequential(conv, torch.nn.BatchNorm3d(4))


def test_a_pruned_conv_with_a_hook_before_a_batchnorm_exports(tmp_path):
    """The trace keeps that BatchNorm (a hook would meet a folded scale unscaled), and torch's
    exporter folds it into a weight of its own, found neither by name nor by content: the
    export failed, saying the conv computes its weight. Found by its zeros, it is declared
    with the pruner's scheme and group."""
    torch.manual_seed(0)
    model = Tiny3DCNN(4, widths=(8, 16, 16))
    model.features[4].register_forward_hook(lambda module, args, out: None)
    pruner = Pruner(model, (3, 4, 16, 16), target_rate=2.0, algorithm="magnitude", group=(4, 4))
    pruner.prepare()
    pruner.prune()
    pruner.finalize()
    path = export_onnx(model, tmp_path / "hooked.onnx", (3, 4, 16, 16))
    layers = check_onnx_sparsity(path)
    zeros = (model.features[4].weight == 0).numpy()
    (folded,) = [p for n, p in layers.items() if n.startswith("onnx::")]
    assert (folded.scheme, folded.group) == ("kgs", (4, 4))  # the pruner's, not the default 8x4
    assert np.array_equal(folded.units, kept_units(np.where(zeros, 0.0, 1.0), (4, 4)))


class _HookedAfterAnother(torch.nn.Module):
    """``a`` (a hook before its BatchNorm) and ``b`` share their zeros; ``b`` runs first, and
    ``aux``, never called, shares them too."""

    def __init__(self) -> None:
        super().__init__()
        conv = torch.nn.Conv3d
        self.aux, self.a, self.b = (
            conv(8, 8, 3, padding=1),
            conv(8, 8, 3, padding=1),
            conv(8, 8, 3, padding=1),
        )
        self.bna, self.bnb = torch.nn.BatchNorm3d(8), torch.nn.BatchNorm3d(8)
        self.a.register_forward_hook(lambda module, args, out: None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bna(self.a(self.bnb(self.b(x))))


def test_a_folded_weight_found_by_its_zeros_takes_no_other_convs_declaration(tmp_path):
    """Matched by zeros in the same pass as by name, ``a`` took ``b``'s weight (each then
    declared with the other's scheme), and ``aux`` could take ``b``'s and fail the export."""
    torch.manual_seed(0)
    model = _HookedAfterAnother().eval()
    for bn in (model.bna, model.bnb):
        torch.nn.init.uniform_(bn.weight, 0.5, 2.0)
    mask = torch.ones(8, 8, 3, 3, 3)
    mask[:4, :4] = 0
    set_mask(model.aux, mask, LayerSparsity("kgs", (4, 4)))
    set_mask(model.a, mask, LayerSparsity("kgs", (4, 4)))
    set_mask(model.b, mask, LayerSparsity("vanilla", (4, 4)))
    layers = check_onnx_sparsity(export_onnx(model, tmp_path / "m.onnx", (1, 8, 2, 6, 6)))
    schemes = {name if name == "b.weight" else "folded": v.scheme for name, v in layers.items()}
    assert schemes == {"b.weight": "vanilla", "folded": "kgs"}


@pytest.mark.parametrize(
    ("make", "kept"),
    [(_ConvCalledTwice, 1), (_WeightReadElsewhere, 1), (_ConvFeedsASkip, 1), (_hooked, 1),
     (_weight_normed, 1),
     (lambda: torch.nn.Sequential(_StandardizedConv(4, 4, 3), torch.nn.BatchNorm3d(4)), 1),
     (lambda: torch.nn.Sequential(torch.nn.Conv3d(4, 4, 1), torch.nn.BatchNorm3d(4)), 0),
     (lambda: torch.nn.Sequential(
         torch.nn.Conv3d(4, 4, 1), torch.nn.BatchNorm3d(4, track_running_stats=False)), 1),
     (lambda: torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5)), 1)],
    ids=["conv-called-twice", "weight-read-elsewhere", "output-feeds-a-skip", "forward-hook",
         "weight-norm", "standardized", "plain", "batch-statistics", "linear"],
)  # fmt: skip
def test_batchnorm_folds_only_where_the_fold_is_exact(make, kept):
    """A conv called twice or whose weight is read outside its call would take the scale
    everywhere, and a conv whose output also feeds a skip would hand it the normalised output;
    a hook, a parametrization or a forward of its own would meet the folded scale unscaled; a
    BatchNorm without running statistics normalises by each batch's; a Linear acts on the last
    axis, a BatchNorm1d on axis 1: those BatchNorms stay."""
    torch.manual_seed(0)
    model = make().train()
    linear = isinstance(model, torch.nn.Sequential) and isinstance(model[0], torch.nn.Linear)
    shape = (3, 6) if linear else (3, 4, 4, 6, 6)
    for _ in range(3):
        model(torch.randn(shape))
    model.eval()
    with torch.no_grad():
        bn = model.get_submodule("bn" if hasattr(model, "bn") else "1")
        torch.nn.init.uniform_(bn.weight, 0.5, 2)  # a scale that does not commute
        x = torch.randn(shape)
        folded = fold_batchnorm(model)
        assert _relative_error(folded(x).numpy(), model(x).numpy()) < RELATIVE_TOLERANCE
    norms = torch.nn.modules.batchnorm._BatchNorm
    assert sum(isinstance(m, norms) for m in folded.modules()) == kept


class _FunctionalConv(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("kernel", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv3d(x, self.kernel, padding=1)


def test_a_conv_no_module_stands_for_is_declared_by_its_zeros(tmp_path):
    """The metadata lists every conv weight: a functional conv3d's with the group given."""
    torch.manual_seed(0)
    units = torch.rand(2, 2, 3, 3, 3) < 0.5
    weight = torch.randn(8, 8, 3, 3, 3) * unit_mask_to_weight_mask(units, (8, 8, 3, 3, 3), GROUP44)
    path = export_onnx(_FunctionalConv(weight), tmp_path / "f.onnx", (8, 4, 6, 6), group=(4, 4))
    declared = {n: (layer.scheme, layer.group) for n, layer in check_onnx_sparsity(path).items()}
    assert list(declared.values()) == [("kgs", (4, 4))]


class _FunctionalUse(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv3d(x, self.conv.weight, self.conv.bias, padding=1)


def test_a_pruned_conv_read_through_its_weight_keeps_its_declaration(tmp_path):
    """The traced model holds a weight the forward reads outside the conv's call without its
    conv: the declaration is taken from the model itself."""
    torch.manual_seed(0)
    model = _FunctionalUse().eval()
    units = torch.rand(2, 2) < 0.5
    spec = LayerSparsity("vanilla", (4, 4))
    set_mask(model.conv, unit_mask_to_weight_mask(units, (8, 8, 3, 3, 3), spec), spec)
    path = export_onnx(model, tmp_path / "f.onnx", (8, 4, 6, 6))
    declared = {n: (layer.scheme, layer.group) for n, layer in check_onnx_sparsity(path).items()}
    assert list(declared.values()) == [("vanilla", (4, 4))]


class _ConvTwiceThenNorm(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv3d(8, 8, 3, padding=1), torch.nn.BatchNorm3d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(torch.relu(self.conv(x))))


def test_a_shared_convs_weight_the_exporter_folds_keeps_the_pruners_group(tmp_path):
    """The BatchNorm after the second call is not folded here (the conv is called twice) but by
    torch's exporter, into a weight of its own: it holds the conv's zeros and its group, where
    declared by its zeros it took the export's default 8x4."""
    torch.manual_seed(0)
    model = _ConvTwiceThenNorm().eval()
    with torch.no_grad():
        torch.nn.init.uniform_(model.bn.weight, 0.5, 2)
    units = torch.rand(2, 2, 3, 3, 3) < 0.5
    set_mask(model.conv, unit_mask_to_weight_mask(units, (8, 8, 3, 3, 3), GROUP44), GROUP44)
    path = export_onnx(model, tmp_path / "f.onnx", (8, 4, 6, 6))
    declared = {n: (layer.scheme, layer.group) for n, layer in check_onnx_sparsity(path).items()}
    assert len(declared) == 2
    assert set(declared.values()) == {("kgs", (4, 4))}


class _WithAuxiliaryHead(torch.nn.Module):
    """A training-time head the deployed forward leaves out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.aux = torch.nn.Conv3d(8, 8, 3, padding=1), torch.nn.Conv3d(8, 8, 3)
        self.use_aux = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y + self.aux(x).mean() if self.use_aux else y


def test_a_pruned_conv_the_forward_leaves_out_is_not_exported(tmp_path):
    """Pruned with the rest, an auxiliary head off in the deployed forward has no weight in the
    graph: it is left out, not refused."""
    torch.manual_seed(0)
    model = _WithAuxiliaryHead().eval()
    for conv in (model.conv, model.aux):
        units = torch.rand(2, 2, 3, 3, 3) < 0.5
        set_mask(conv, unit_mask_to_weight_mask(units, (8, 8, 3, 3, 3), GROUP44), GROUP44)
    path = export_onnx(model, tmp_path / "f.onnx", (8, 4, 6, 6))
    assert list(check_onnx_sparsity(path)) == ["conv.weight"]


class _ExportBranch(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if torch.onnx.is_in_onnx_export() else y * 2


def test_a_model_without_batchnorm_exports_its_own_forward_not_a_trace(tmp_path):
    """A torch.fx trace decides such a branch when it traces: the file held the training-time
    Mul, where torch's exporter takes the export's branch."""
    path = export_onnx(_ExportBranch().eval(), tmp_path / "f.onnx", (4, 4, 6, 6))
    assert [node.op_type for node in onnx.load(str(path)).graph.node] == ["Conv"]


class _MakesATensor(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + torch.linspace(0, 1, 6)


def test_under_a_float64_default_the_tensors_a_forward_makes_export_in_float32(tmp_path):
    """Only the sample input had been made float32: a tensor the forward makes followed the
    default into a Cast and a float64 output, which the build refuses."""
    model = _MakesATensor().eval()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        path = export_onnx(model, tmp_path / "f.onnx", (4, 4, 6, 6))
    finally:
        torch.set_default_dtype(default)
    exported = onnx.load(str(path))
    assert "Cast" not in {node.op_type for node in exported.graph.node}
    assert exported.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


class _BranchOnShape(torch.nn.Module):
    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.conv, self.norm = torch.nn.Conv3d(4, 8, 3, padding=1), norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.conv(x))
        return x.mean((2, 3, 4)) if x.shape[2] > 1 else x.flatten(1)


def test_a_forward_torch_fx_cannot_trace_exports_unless_a_batchnorm_needs_folding(tmp_path):
    """Only folding BatchNorm takes torch.fx; torch's exporter takes the branch on a shape."""
    torch.manual_seed(0)
    model = _BranchOnShape(torch.nn.Identity()).eval()
    path = export_onnx(model, tmp_path / "f.onnx", (4, 4, 6, 6))
    x = torch.randn(1, 4, 4, 6, 6)
    (out,) = ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})
    assert _relative_error(out, model(x).detach().numpy()) < RELATIVE_TOLERANCE
    with pytest.raises(ValueError, match=r"torch\.fx could not trace .*fuse_conv_bn_eval"):
        normed = _BranchOnShape(torch.nn.BatchNorm3d(8)).eval()
        export_onnx(normed, tmp_path / "g.onnx", (4, 4, 6, 6))


def test_export_inside_autocast_or_a_float64_default_writes_the_same_float32_file(tmp_path):
    """A loop's autocast traced bfloat16 weights; a float64 default dtype made a float64 input
    for the float32 copy. Neither changes the file."""
    model, _ = _randomly_pruned_tiny("kgs", (8, 4))
    files = [export_onnx(model, tmp_path / "plain.onnx", (3, 8, 16, 16))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        files.append(export_onnx(model, tmp_path / "autocast.onnx", (3, 8, 16, 16)))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        files.append(export_onnx(model, tmp_path / "float64.onnx", (3, 8, 16, 16)))
    finally:
        torch.set_default_dtype(default)
    plain, *others = [onnx.load(str(f)) for f in files]
    for other in others:
        assert other.metadata_props == plain.metadata_props
        assert len(other.graph.initializer) == len(plain.graph.initializer)
        for a, b in zip(plain.graph.initializer, other.graph.initializer, strict=True):
            assert b.data_type == onnx.TensorProto.FLOAT
            np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_an_unpruned_conv_with_nan_weights_is_refused_naming_it(tmp_path):
    """A conv no Pruner marked is declared by its zeros, whose reading refused NaN naming no
    layer."""
    model = Tiny3DCNN()
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^features\.0\.weight: weight contains NaN"):
        export_onnx(model, tmp_path / "m.onnx", (1, 3, 8, 16, 16))
    assert not list(tmp_path.iterdir())


def test_export_rejects_bad_arguments(tmp_path):
    model = Tiny3DCNN()
    with pytest.raises(ValueError, match="opset must be >= 17"):
        export_onnx(model, tmp_path / "m.onnx", (1, 3, 8, 16, 16), opset=13)
    with pytest.raises(ValueError, match="input_shape"):
        export_onnx(model, tmp_path / "m.onnx", (8, 16, 16))
    with pytest.raises(ValueError, match="group must be two positive integers"):
        export_onnx(model, tmp_path / "m.onnx", (3, 8, 16, 16), group=(4,))
