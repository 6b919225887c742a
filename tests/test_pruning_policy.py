"""Pruning policy: reweighted penalty, FLOPs-targeted selection, masks, lifecycle."""

import copy
import json
import re

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
import torch.nn.functional as F
from conftest import needs_cuda
from hypothesis import given, settings
from hypothesis import strategies as st
from rt3d_halide.pruning import (
    Pruner,
    check_onnx_sparsity,
    deepcopy_model,
    export_onnx,
    phase_step,
)
from rt3d_halide.pruning import pruner as pruner_module
from rt3d_halide.pruning.distill import distillation_loss
from rt3d_halide.pruning.flops import conv_macs, count_macs
from rt3d_halide.pruning.groups import LayerSparsity, unit_norms, unit_scaled_norms
from rt3d_halide.pruning.masks import is_masked
from rt3d_halide.pruning.models import Tiny3DCNN
from rt3d_halide.pruning.patterns import is_balanced, validate_pattern
from rt3d_halide.pruning.regularizers import GroupLasso, Regularizer, ReweightedGroupLasso
from rt3d_halide.pruning.report import LayerReport, PruningReport
from rt3d_halide.pruning.selection import LayerCandidates, select_units
from torch import nn

torch.set_num_threads(1)
SHAPE = (3, 8, 16, 16)


def _tiny(seed: int = 0) -> Tiny3DCNN:
    torch.manual_seed(seed)
    return Tiny3DCNN()


def _scaled_units_layer() -> tuple[Pruner, torch.Tensor]:
    """A pruner whose first prunable layer has unit norms spread over three decades."""
    model = _tiny()
    pruner = Pruner(model, SHAPE, target_rate=2.0, exclude=["features.0"]).prepare()
    layer = pruner.layers[0]
    with torch.no_grad():
        units = layer.spec.unit_shape(layer.weight_shape)
        scale = torch.logspace(-3, 0, steps=int(torch.tensor(units).prod())).reshape(units)
        layer.weight.mul_(scale.repeat_interleave(8, 0).repeat_interleave(4, 1)[:12, :6])
    return pruner, scale


def test_reweighted_penalty_gradient_is_nonzero_and_shrinks_small_units_faster():
    pruner, _ = _scaled_units_layer()
    pruner.reweight()
    layer = pruner.layers[0]
    layer.weight.grad = None
    pruner.regularization().backward()
    grad = layer.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    spec = layer.spec
    norms = unit_norms(layer.weight.detach(), spec)
    grad_norms = unit_norms(grad, spec)
    # Per MAC of cost (padded groups are cheaper), the relative shrink strictly decreases with
    # the unit's norm: small units are pushed harder.
    relative = (grad_norms / norms / layer.cost_weight).flatten()
    order = torch.argsort(norms.flatten())
    assert torch.all(relative[order][:-1] > relative[order][1:])
    # Analytic value: strength * cost * P * W / ||W||, with P = 1 / (||W||^2 + eps), detached.
    p = 1.0 / (norms**2 + pruner.regularizer.eps)
    expected = pruner.regularizer.strength * layer.cost_weight * p
    torch.testing.assert_close(grad_norms, expected, rtol=1e-3, atol=0)
    assert not pruner.regularizer.weights[layer.name].requires_grad


def test_plain_group_lasso_pushes_every_unit_equally_hard():
    pruner, _ = _scaled_units_layer()
    layer = pruner.layers[0]
    penalty = GroupLasso(1e-3).penalty([layer])
    (grad,) = torch.autograd.grad(penalty, layer.weight)
    grad_norms = unit_norms(grad, layer.spec)
    torch.testing.assert_close(grad_norms, 1e-3 * layer.cost_weight, rtol=1e-4, atol=0)


@pytest.mark.parametrize(
    ("algorithm", "kind"),
    [("magnitude", Regularizer), ("group_lasso", GroupLasso), ("reweighted", ReweightedGroupLasso)],
)
def test_each_algorithm_runs_its_own_penalty(algorithm, kind):
    """A name mapped to another penalty would train silently with it (group_lasso ran the
    reweighted one)."""
    assert type(Pruner(_tiny(), SHAPE, target_rate=2.0, algorithm=algorithm).regularizer) is kind


def test_each_layers_scores_have_an_rms_of_one():
    """The reference scale is the RMS of the layer's unit norms, so that layers compete on one
    scale; a mean (or any other statistic) would favour layers of evenly spread norms."""
    pruner = Pruner(_tiny(), SHAPE, target_rate=2.0, flops_exponent=0.0).prepare()
    for name, scores in pruner.scores().items():
        assert float(scores.pow(2).mean().sqrt()) == pytest.approx(1.0, rel=1e-5), name


def test_scaled_norms_of_a_constant_weight_are_equal_in_truncated_groups():
    """12 filters in groups of 8 leave a 4-filter group: its units hold half the weights, and
    scaling by the square root of that ratio (not the ratio) gives them the full units' norm."""
    norms = unit_scaled_norms(torch.ones(12, 8, 3, 3, 3), LayerSparsity("kgs", (8, 4)))
    torch.testing.assert_close(norms, torch.full_like(norms, 32**0.5))


def test_vanilla_unit_norms_are_the_l2_norms_of_whole_groups():
    """A vanilla unit is a whole group: its norm sums the squares over the kernel too (a max
    over the kernel would rank groups by their largest location only)."""
    torch.manual_seed(0)
    weight = torch.randn(12, 8, 3, 2, 3)
    expected = torch.tensor(
        [[float(weight[p : p + 8, q : q + 4].norm()) for q in (0, 4)] for p in (0, 8)]
    )
    norms = unit_norms(weight, LayerSparsity("vanilla", (8, 4)))
    torch.testing.assert_close(norms, expected)


def test_reweighting_drives_small_units_to_zero_and_keeps_large_ones():
    """Units start with norms 3e-4..0.12. Plain SGD on a non-smooth penalty leaves the smallest
    ones oscillating at the step size rather than at exactly zero; hard pruning removes them."""
    pruner, _ = _scaled_units_layer()
    layer = pruner.layers[0]
    regularizer = ReweightedGroupLasso(strength=2e-5, eps=1e-6)
    optimizer = torch.optim.SGD([layer.weight], lr=0.05)
    before = unit_norms(layer.weight.detach(), layer.spec)
    for step in range(100):
        if step % 10 == 0:
            regularizer.reweight([layer])
        optimizer.zero_grad()
        regularizer.penalty([layer]).backward()
        optimizer.step()
    after = unit_norms(layer.weight.detach(), layer.spec)
    small, middle, large = before < 0.06, (before > 0.015) & (before < 0.06), before > 0.1
    assert large.sum() >= 5 and middle.sum() >= 10
    assert after[small].max() < 0.02
    assert (after[middle] / before[middle]).max() < 1 / 3
    assert (after[large] / before[large]).min() > 0.9


@settings(max_examples=25, deadline=None)
@given(
    rate=st.floats(1.0, 6.0),
    balanced=st.booleans(),
    seed=st.integers(0, 1000),
    group=st.sampled_from([(8, 4), (4, 4)]),
)
def test_hard_pruning_hits_the_mac_target_to_one_item(rate, balanced, seed, group):
    pruner = Pruner(
        _tiny(seed), SHAPE, target_rate=rate, balanced=balanced, group=group, min_keep=0.0
    ).prepare()
    report = pruner.prune()
    required = pruner.required_removal()
    removed = report.conv_macs_before - report.conv_macs_after
    # One item is one unit, or (balanced) one kernel location of every group of a layer.
    if balanced:
        item = max(float(layer.unit_macs[..., 0, 0, 0].sum()) for layer in pruner.layers)
    else:
        item = max(float(layer.unit_macs.max()) for layer in pruner.layers)
    assert required - 1 <= removed < required + item
    assert report.rate >= rate * (1 - 1e-9)
    for layer in pruner.layers:
        units = pruner.kept_units(layer)
        if balanced:
            assert is_balanced(units.numpy())


@pytest.mark.parametrize("scheme", ["kgs", "vanilla"])
def test_masked_fine_tuning_keeps_exact_zeros_of_a_valid_pattern(scheme):
    model = _tiny()
    x, y = torch.randn(4, *SHAPE), torch.tensor([0, 1, 2, 3])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(2):  # momentum built up on soon-to-be-pruned weights
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    pruner = Pruner(model, SHAPE, target_rate=2.5, scheme=scheme, group=(4, 4)).prepare()
    pruner.prune()
    masks = {layer.name: layer.conv.weight_mask.clone() for layer in pruner.layers}
    for _ in range(3):
        F.cross_entropy(model(x), y).backward()
        pruner.fine_tune_step(optimizer)
        optimizer.zero_grad()
        for layer in pruner.layers:
            assert torch.all(layer.conv.weight_orig[masks[layer.name] == 0] == 0)
    report = pruner.finalize()
    for layer in pruner.layers:
        assert "weight_orig" not in dict(layer.conv.named_parameters())
        weight = layer.conv.weight.detach()
        assert torch.equal(weight != 0, masks[layer.name] != 0)
        pattern = validate_pattern(weight.numpy(), scheme, (4, 4), name=layer.name)
        units = pattern.units if scheme == "kgs" else pattern.units.any(axis=(2, 3, 4))
        assert (units == pruner.kept_units(layer).numpy()).all()
    assert report.rate >= 2.5


def test_bounds_and_exclusions_are_respected():
    model = _tiny()
    pruner = Pruner(
        model,
        SHAPE,
        target_rate=1.2,
        exclude=["features.0"],
        layer_bounds={"features.4": (0.9, 1.0), "features.8": (0.0, 0.5)},
    ).prepare()
    assert [layer.name for layer in pruner.layers] == ["features.4", "features.8"]
    report = {r.name: r for r in pruner.prune().layers}
    assert report["features.4"].macs_after >= 0.9 * report["features.4"].macs_before
    assert report["features.8"].macs_after <= 0.5 * report["features.8"].macs_before
    assert not hasattr(model.features[0], "weight_mask")
    with pytest.raises(ValueError, match=r"target_rate 50 cannot be reached: .* at most 1\.\d+x"):
        Pruner(_tiny(), SHAPE, target_rate=50.0, min_keep=0.5).prepare().prune()


@pytest.mark.parametrize(
    ("rate", "said"), [(1.9751, "1.97"), (1.996, "1.99"), (3.6, "3.6"), (12.349, "12.3")]
)
def test_an_unreachable_target_offers_a_rate_the_selection_reaches(rate, said):
    """The highest reachable rate is rounded down, so that asking for it succeeds."""
    assert pruner_module._rounded_down(rate) == said


def test_max_keep_never_passes_min_keep():
    """Removing down to max_keep skips units that would pass min_keep; bounds that removal in
    score order cannot meet are an error (a 3 -> 45 conv's six 8x4 groups hold 8 filters, the
    last 5)."""
    model = torch.nn.Sequential(torch.nn.Conv3d(3, 45, 3, padding=1))
    for scheme in ("vanilla", "kgs"):
        pruner = Pruner(
            model, (3, 4, 6, 6), target_rate=1.0, scheme=scheme, layer_bounds={"0": (0.45, 0.55)}
        ).prepare()
        (layer,) = pruner.prune().layers
        assert 0.45 <= layer.macs_after / layer.macs_before <= 0.55, scheme
        pruner.finalize()
    exact = Pruner(
        model, (3, 4, 6, 6), target_rate=1.0, scheme="vanilla", layer_bounds={"0": (0.5, 0.5)}
    ).prepare()
    with pytest.raises(ValueError, match=r"in score order cannot keep between 0\.5 and 0\.5"):
        exact.plan()


def test_units_of_a_truncated_group_are_ranked_by_the_weights_they_hold():
    """A 45 -> 45 conv in 8x4 groups: the last group of input channels holds one channel. With
    weights of one scale everywhere, its units must be kept about as often as the others (ranked
    by norm, they were all removed first)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(45, 45, 3, padding=1))
    keep = Pruner(model, (45, 4, 6, 6), target_rate=1.5).prepare().plan()["0"]
    full, last = keep[:, :-1].float().mean(), keep[:, -1].float().mean()
    assert 0.5 < float(last / full) < 1.5, (float(full), float(last))


def test_the_penalty_and_scores_follow_the_model_to_its_device():
    """Prepared on the CPU and moved (here to "meta", standing in for a GPU): the unit costs
    and the penalty weights, left on the CPU as a resumed run loads them, meet the weights on
    their device."""
    model = _tiny()
    pruner = Pruner(model, SHAPE, target_rate=2.0, algorithm="reweighted").prepare()
    model.to("meta")
    assert pruner.regularization().device.type == "meta"
    assert {w.device.type for w in pruner.regularizer.weights.values()} == {"meta"}
    assert {s.device.type for s in pruner.scores().values()} == {"meta"}


def test_a_whole_number_of_macs_to_remove_is_not_rounded_up():
    """Tiny3DCNN's 2405376 conv MACs at 3x: exactly 1603584 to remove (the old formula gave
    1603584.0000000002, so the selection took one unit more than the target needs)."""
    pruner = Pruner(_tiny(), SHAPE, target_rate=3.0).prepare()
    assert pruner.conv_macs_before == 2405376
    assert pruner.required_removal() == 1603584


def test_selection_is_exact_on_a_hand_made_case():
    layer = LayerCandidates("a", torch.tensor([[3.0, 1.0, 2.0]]), torch.tensor([[10.0, 10.0, 5.0]]))
    keep, removed = select_units([layer], required_macs=12.0)
    assert keep["a"].tolist() == [[True, False, False]] and removed == 15.0
    keep, removed = select_units([layer], required_macs=10.0)
    assert keep["a"].tolist() == [[True, False, True]] and removed == 10.0


def test_balanced_slices_compete_by_their_mean_score():
    """A balanced slice's score is its groups' mean: a sum would rank a layer of more groups
    behind (here B's slices of 4 groups scored 4 and 8, and A was stripped whole)."""
    scores = torch.tensor([1.0, 2.0])
    a = LayerCandidates("a", scores.expand(1, 1, 2), torch.ones(1, 1, 2), balanced=True)
    b = LayerCandidates("b", scores.expand(2, 2, 2), torch.ones(2, 2, 2), balanced=True)
    keep, removed = select_units([a, b], required_macs=5.0)
    assert keep["a"].flatten().tolist() == [False, True] and removed == 5.0
    assert keep["b"][..., 0].logical_not().all() and keep["b"][..., 1].all()


def test_a_layer_at_its_min_keep_bound_still_offers_its_cheaper_units():
    """The second 4-MAC unit would pass min_keep and is skipped; the 1-MAC unit after it still
    fits (a layer that stopped offering at the skip made the target unreachable)."""
    layer = LayerCandidates(
        "a", torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[4.0, 4.0, 1.0]]), min_keep=4 / 9
    )
    keep, removed = select_units([layer], required_macs=5.0)
    assert keep["a"].tolist() == [[False, True, False]] and removed == 5.0


def test_a_layer_of_one_unit_offers_it():
    """A layer's last item is offered too: A's only unit, the weakest, goes first."""
    a = LayerCandidates("a", torch.tensor([[1.0]]), torch.tensor([[10.0]]))
    b = LayerCandidates("b", torch.tensor([[5.0, 6.0]]), torch.tensor([[10.0, 10.0]]))
    keep, removed = select_units([a, b], required_macs=10.0)
    assert keep["a"].tolist() == [[False]] and keep["b"].tolist() == [[True, True]]
    assert removed == 10.0


@pytest.mark.parametrize(("max_keep", "required"), [(1.0, 2.0), (0.5, 0.0)])
def test_a_layer_gives_up_units_down_to_exactly_min_keep(max_keep, required):
    """min_keep is a bound that may be met exactly, when the target asks for it or max_keep
    equals it (a strict bound refused the unit that reaches it)."""
    layer = LayerCandidates(
        "a", torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.ones(1, 4), min_keep=0.5, max_keep=max_keep
    )
    keep, removed = select_units([layer], required_macs=required)
    assert keep["a"].tolist() == [[False, False, True, True]] and removed == 2.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_rate": 0.5}, "target_rate"),
        ({"target_rate": float("nan")}, "finite number >= 1"),
        ({"target_rate": float("inf")}, "finite number >= 1"),
        ({"target_rate": 2.0, "scheme": "vanilla", "balanced": True}, "balanced"),
        ({"target_rate": 2.0, "algorithm": "admm"}, "unknown pruning algorithm"),
        ({"target_rate": 2.0, "scheme": "dense"}, "scheme must be"),
        ({"target_rate": 2.0, "group": (0, 4)}, "positive integers"),
        ({"target_rate": "2"}, "target_rate must be a number"),
        ({"target_rate": None}, "target_rate must be a number"),
        ({"target_rate": 2.0, "exclude": "features.0"}, "a list of layer names, got the string"),
        ({"target_rate": 2.0, "layer_bounds": {"features.4": 0.5}}, r"\(min_keep, max_keep\)"),
        ({"target_rate": 2.0, "layer_bounds": {"features.4": (0.9, 0.1)}}, "min <= max"),
        ({"target_rate": np.bool_(True)}, "target_rate must be a number"),
        ({"target_rate": torch.tensor(True)}, "target_rate must be a number"),
        ({"target_rate": 2 + 1j}, "target_rate must be a number"),
        ({"target_rate": 2.0, "group": 8}, "group must be two positive integers"),
        ({"target_rate": 2.0, "min_keep": "0.1"}, "min_keep must be a number"),
        ({"target_rate": 2.0, "flops_exponent": "x"}, "flops_exponent must be a number"),
        ({"target_rate": 2.0, "flops_exponent": float("nan")}, "flops_exponent must be a finite"),
        ({"target_rate": 2.0, "balanced": "no"}, "balanced must be True or False"),
        ({"target_rate": 2.0, "strength": float("nan")}, "finite strength"),
        ({"target_rate": 2.0, "strength": "5e-4"}, "strength must be a number"),
        ({"target_rate": 2.0, "eps": float("inf")}, "finite eps"),
        ({"target_rate": 2.0, "algorithm": "group_lasso", "strength": float("inf")}, "finite"),
    ],
)
def test_bad_configuration_is_a_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Pruner(_tiny(), SHAPE, **kwargs)


@pytest.mark.parametrize(
    ("rate", "bounds"),
    [
        (np.float32(2.0), (np.float64(0), 1)),
        (torch.tensor(2.0), torch.tensor([0.0, 1.0])),
        (2, np.array([0.0, 1.0])),
    ],
    ids=["numpy-scalars", "tensors", "numpy-array"],
)
def test_numbers_of_numpy_and_torch_are_numbers(rate, bounds):
    """A rate or bounds computed with numpy or torch are as good as Python's numbers."""
    pruner = Pruner(_tiny(), SHAPE, target_rate=rate, layer_bounds={"features.4": bounds})
    assert pruner.layer_bounds == {"features.4": (0.0, 1.0)}
    assert pruner.prepare().prune().rate >= 2.0


def test_excluding_a_module_leaves_every_conv_in_it_dense():
    """``features`` holds every conv of the tiny network: nothing is left to prune."""
    with pytest.raises(ValueError, match="no prunable Conv3d"):
        Pruner(_tiny(), SHAPE, target_rate=2.0, exclude=["features"]).prepare()
    from rt3d_halide.pruning.models import R2Plus1D18

    pruner = Pruner(R2Plus1D18(4), (3, 8, 32, 32), target_rate=2.0, exclude=["stem"]).prepare()
    names = [layer.name for layer in pruner.layers]
    assert names and not any(name.startswith("stem") for name in names)
    assert "layer1.0.conv1.0.0" in names
    # A glob still matches conv names only: "*.0" leaves stem.3 (the stem's second conv) in.
    pruner = Pruner(R2Plus1D18(4), (3, 8, 32, 32), target_rate=2.0, exclude=["*.0"]).prepare()
    names = [layer.name for layer in pruner.layers]
    assert "stem.3" in names and "stem.0" not in names and "layer1.0.conv1.0.3" in names


def test_a_plain_name_excludes_that_module_not_names_it_begins():
    """exclude=["1"] leaves "10" and "11" prunable: a plain name covers the convs under it
    (``1.*``), not every name that starts with its letters."""
    model = nn.Sequential(*(nn.Conv3d(4, 4, 1) for _ in range(12)))
    pruner = Pruner(model, (4, 2, 4, 4), target_rate=1.2, exclude=["1"]).prepare()
    assert [layer.name for layer in pruner.layers] == [str(i) for i in range(12) if i != 1]


def test_a_grouped_conv_is_not_prunable():
    """Kernel groups span the input channels of a dense conv; a grouped conv's weight holds only
    its group's, so it stays dense."""
    model = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 8, 3, groups=2))
    pruner = Pruner(model, SHAPE, target_rate=1.2).prepare()
    assert [layer.name for layer in pruner.layers] == ["0"]


def test_a_shape_the_model_cannot_run_names_input_shape():
    """Without a second, real forward: on a full-size model it would cost seconds and memory."""
    model = _tiny()
    devices = []
    model.register_forward_pre_hook(lambda _, args: devices.append(args[0].device.type))
    with pytest.raises(ValueError, match=r"forward fails on input_shape \(8, 3, 16, 16\)"):
        Pruner(model, (8, 3, 16, 16), target_rate=2.0).prepare()
    assert devices == ["meta"]


class _RealTensorsInForward(nn.Module):
    """Forwards that make or read real tensors, which a meta-device run cannot take."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.mean = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1, 1)  # no buffer
        self.conv = nn.Conv3d(3, 8, 3, padding=1)
        self.head = nn.Conv3d(8, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "attribute":
            x = x - self.mean
        elif self.how == "made":
            x = x - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1, 1)
        elif self.conv.weight.abs().max().item() > 0:
            x = x * 2
        return self.head(self.conv(x))


@pytest.mark.parametrize("how", ["attribute", "made", "item"])
def test_a_forward_of_real_tensors_is_counted_on_a_real_run(how):
    model = _RealTensorsInForward(how)
    assert count_macs(model, SHAPE) == (3 * 8 + 8 * 16) * 27 * 8 * 16 * 16
    assert Pruner(model, SHAPE, target_rate=2.0).prepare().prune().rate >= 2.0
    with pytest.raises(ValueError, match=r"forward fails on input_shape \(8, 3, 16, 16\)"):
        count_macs(model, (8, 3, 16, 16))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_a_model_of_another_float_type_is_pruned_and_exported_in_float32(tmp_path, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 16, 3))
    model = model.to(dtype)
    assert count_macs(model, SHAPE) == 3 * 8 * 27 * 8 * 16 * 16 + 8 * 16 * 27 * 6 * 14 * 14
    pruner = Pruner(model, SHAPE, target_rate=2.0).prepare()
    pruner.prune()
    rate = pruner.finalize().rate
    path = export_onnx(model, tmp_path / "m.onnx", SHAPE)
    assert model[0].weight.dtype == dtype and rate >= 2.0
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = {w.name: onnx.numpy_helper.to_array(w) for w in graph.initializer}
    assert {w.dtype for w in weights.values()} == {np.dtype(np.float32)}
    np.testing.assert_array_equal(weights["2.weight"], model[2].weight.detach().float().numpy())


def test_the_reweighted_penalty_of_a_float16_model_stays_finite():
    """In float16, ``1 / (||W||^2 + eps)`` passed its largest value on every unit below a norm
    of 0.004, as regularization drives them: the penalty, and the loss, became infinite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 16, 3))
    model = model.to(torch.float16)
    with torch.no_grad():
        model[2].weight[:, :, 0] *= 1e-2
        model[2].weight[:, :, 1] = 0
    pruner = Pruner(model, SHAPE, target_rate=2.0).prepare()
    penalty = pruner.regularization()
    penalty.backward()
    assert torch.isfinite(penalty)
    assert all(torch.isfinite(conv.weight.grad).all() for conv in (model[0], model[2]))


def test_a_failed_export_leaves_the_path_as_it_was(tmp_path):
    model = _tiny()
    pruner = Pruner(model, SHAPE, target_rate=2.0).prepare()
    pruner.prune()
    pruner.finalize()
    good = export_onnx(model, tmp_path / "good.onnx", SHAPE).read_bytes()
    with pytest.raises(RuntimeError):  # torch's trace: 8 input channels for 3
        export_onnx(model, tmp_path / "good.onnx", (8, 8, 16, 16))
    with torch.no_grad():
        model.features[4].weight[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        export_onnx(model, tmp_path / "m.onnx", SHAPE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.onnx"]
    assert (tmp_path / "good.onnx").read_bytes() == good


def test_fine_tune_step_needs_the_masks():
    """Before prune() or after finalize() a step would regrow pruned weights: refused."""
    model = _tiny()
    pruner = Pruner(model, SHAPE, target_rate=2.0).prepare()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(RuntimeError, match="needs the masks"):
        pruner.fine_tune_step(optimizer)
    pruner.prune()
    pruner.fine_tune_step(optimizer)
    rate = pruner.finalize().rate
    with pytest.raises(RuntimeError, match="needs the masks"):
        pruner.fine_tune_step(optimizer)
    assert pruner.report().rate == rate


def test_finalize_needs_the_masks_of_prune_and_a_second_one_changes_nothing():
    """Without prune() the model would export dense, as if pruned."""
    pruner = Pruner(_tiny(), SHAPE, target_rate=2.0).prepare()
    with pytest.raises(RuntimeError, match=r"call prune\(\) first"):
        pruner.finalize()
    pruner.prune()
    rate = pruner.finalize().rate
    assert rate >= 2.0 and pruner.finalize().rate == rate


def test_masking_before_prepare_is_refused():
    pruner = Pruner(_tiny(), SHAPE, target_rate=2.0)
    for call in (pruner.mask_gradients, pruner.apply_masks, pruner.state_dict):
        with pytest.raises(RuntimeError, match=r"call Pruner.prepare\(\) first"):
            call()


def test_unknown_layer_names_are_value_errors():
    with pytest.raises(ValueError, match=r"matches no conv.*; its convs: features\.0, features\.4"):
        Pruner(_tiny(), SHAPE, target_rate=2.0, exclude=["conv9"]).prepare()
    # A glob that names modules but no conv excludes nothing: refused, not ignored.
    with pytest.raises(ValueError, match=r"'feature\[s\]' matches no conv"):
        Pruner(_tiny(), SHAPE, target_rate=2.0, exclude=["feature[s]"]).prepare()
    with pytest.raises(ValueError, match="not a prunable layer"):
        Pruner(_tiny(), SHAPE, target_rate=2.0, layer_bounds={"x": (0, 1)}).prepare()


def test_state_dict_round_trip_restores_masks_and_penalties(tmp_path):
    model = _tiny()
    pruner = Pruner(model, SHAPE, target_rate=2.5).prepare()
    pruner.prune()
    torch.save({"pruner": pruner.state_dict(), "model": model.state_dict()}, tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    clone = _tiny(seed=1)
    restored = Pruner(clone, SHAPE, target_rate=2.5).prepare()
    restored.load_state_dict(saved["pruner"])
    clone.load_state_dict(saved["model"])
    for a, b in zip(pruner.layers, restored.layers, strict=True):
        assert torch.equal(a.conv.weight_mask, b.conv.weight_mask)
        assert torch.equal(pruner.regularizer.weights[a.name], restored.regularizer.weights[b.name])
        assert b.reference_norm == a.reference_norm
    assert restored.report() == pruner.report()


def test_a_pruner_restored_before_pruning_plans_as_the_saved_one():
    """A resume during the regularization restores the reference scales prepare() took: the
    fresh model's (here a tenth of features.4's) would change which units the plan removes."""
    model = _tiny()
    with torch.no_grad():
        model.features[4].weight.mul_(10)
    pruner = Pruner(model, SHAPE, target_rate=2.5).prepare()
    clone = _tiny()
    restored = Pruner(clone, SHAPE, target_rate=2.5).prepare()
    restored.load_state_dict(pruner.state_dict())
    clone.load_state_dict(model.state_dict())
    planned, replanned = pruner.plan(), restored.plan()
    assert planned.keys() == replanned.keys()
    assert all(torch.equal(replanned[name], units) for name, units in planned.items())


def test_loading_masks_into_a_pruned_model_replaces_its_masks():
    """A resume may load a state into a model already pruned: its masks are replaced, not
    intersected with the saved ones (which pruned more than the state says)."""
    saved, other = (Pruner(_tiny(seed), SHAPE, target_rate=2.0).prepare() for seed in (0, 1))
    report = saved.prune()
    other.prune()
    state = saved.state_dict()
    other.load_state_dict(state)
    for layer in other.layers:
        assert torch.equal(layer.conv.weight_mask, state["masks"][layer.name]), layer.name
    assert other.report() == report


def _weight_names(model: torch.nn.Module) -> list[str]:
    return [name.removesuffix("_orig") for name, _ in model.named_parameters()]


@pytest.mark.parametrize("made", ["before", "after"])
def test_a_resumed_optimizer_may_be_made_before_or_after_loading_the_masks(tmp_path, made):
    """Optimizer state maps parameters by position: masking and baking keep each conv's weight
    where it stood, so a state saved after prune() steps the same wherever the new optimizer is
    made (torch's pruning had put the weight after the bias: the momentum landed on the wrong
    tensor and SGD failed at its first step)."""
    x = torch.randn(2, *SHAPE)

    def step(model, optimizer, pruner):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        pruner.fine_tune_step(optimizer)

    def biased(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        conv = torch.nn.Conv3d
        return torch.nn.Sequential(conv(3, 8, 3, padding=1), torch.nn.ReLU(), conv(8, 16, 3))

    model = biased(0)
    names = _weight_names(model)
    pruner = Pruner(model, SHAPE, target_rate=2.5).prepare()
    pruner.prune()
    assert _weight_names(model) == names
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step(model, optimizer, pruner)
    torch.save(
        {"pruner": pruner.state_dict(), "model": model.state_dict(), "opt": optimizer.state_dict()},
        tmp_path / "c.pt",
    )
    saved = torch.load(tmp_path / "c.pt", weights_only=True)
    step(model, optimizer, pruner)

    clone = biased(1)
    restored = Pruner(clone, SHAPE, target_rate=2.5).prepare()
    if made == "before":
        resumed = torch.optim.SGD(clone.parameters(), lr=0.1, momentum=0.9)
    restored.load_state_dict(saved["pruner"])
    clone.load_state_dict(saved["model"])
    if made == "after":
        resumed = torch.optim.SGD(clone.parameters(), lr=0.1, momentum=0.9)
    resumed.load_state_dict(saved["opt"])
    step(clone, resumed, restored)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(clone.state_dict()[name], value, msg=name)
    pruner.finalize()
    assert _weight_names(model) == names


def test_distillation_loss_limits():
    logits, targets = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    torch.testing.assert_close(
        distillation_loss(logits, torch.randn(5, 4), targets, alpha=0.0),
        F.cross_entropy(logits, targets),
    )
    assert distillation_loss(logits, logits, targets, alpha=1.0).abs() < 1e-6
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(logits, logits, targets, temperature=0.0)


def test_distillation_loss_is_hintons_formula_written_out():
    """alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * CE: the KL's direction and the
    T^2 that keeps its gradients' size show only at T != 1 on logits that differ."""
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 4) * 3, torch.randn(5, 4) * 3
    targets, t, alpha = torch.tensor([0, 1, 2, 3, 0]), 4.0, 0.3
    p_teacher = F.softmax(teacher / t, dim=1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(student / t, dim=1))).sum(1).mean()
    expected = alpha * t**2 * kl + (1 - alpha) * F.cross_entropy(student, targets)
    actual = distillation_loss(student, teacher, targets, temperature=t, alpha=alpha)
    torch.testing.assert_close(actual, expected)


def test_unit_norm_gradient_is_finite_at_zero():
    weight = torch.zeros(8, 4, 3, 3, 3, requires_grad=True)
    unit_norms(weight, LayerSparsity("kgs", (8, 4))).sum().backward()
    assert torch.isfinite(weight.grad).all()


def test_plan_is_a_dry_run_of_prune():
    model = _tiny()
    pruner = Pruner(model, SHAPE, target_rate=2.0).prepare()
    planned = pruner.plan()
    assert not any(hasattr(m, "weight_mask") for m in model.modules())
    pruner.prune()
    for layer in pruner.layers:
        assert torch.equal(pruner.kept_units(layer), planned[layer.name])


def test_phase_step_adds_the_penalty_and_holds_the_masks() -> None:
    """regularize trains on loss + penalty (the penalty's gradient reaches the weights) and
    returns the sum; finetune keeps pruned weights at exactly zero."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(4, 8, 3, padding=1))
    pruner = Pruner(model, (4, 4, 6, 6), target_rate=2.0, algorithm="reweighted").prepare()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(2, 4, 4, 6, 6)
    weight = model[0].weight
    (loss_grad,) = torch.autograd.grad(model(x).square().mean(), weight)
    (penalty_grad,) = torch.autograd.grad(pruner.regularization(), weight)
    base = model(x).square().mean()
    total = phase_step(base, optimizer, pruner, "regularize")
    assert total.item() > base.item()
    torch.testing.assert_close(weight.grad, loss_grad + penalty_grad)
    pruner.prune()
    pruned = model[0].weight_mask == 0
    before = model[0].weight_orig.detach().clone()
    for _ in range(3):
        phase_step(model(x).square().mean(), optimizer, pruner, "finetune")
    after = model[0].weight_orig.detach()
    assert bool(pruned.any()) and bool((after[pruned] == 0).all())
    assert not torch.equal(after[~pruned], before[~pruned])
    with pytest.raises(ValueError, match="needs a pruner"):
        phase_step(base, optimizer, None, "finetune")
    with pytest.raises(ValueError, match="phase must be one of"):
        phase_step(base, optimizer, pruner, "warmup")


def _own_loop(device: str) -> tuple[torch.nn.Module, PruningReport]:
    """The user's loop of docs/pruning.md on ``device``: regularize with a reweighting,
    prune, fine-tune with the masks held, finalize. Weights and data are made on the CPU."""
    model = _tiny().to(device)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, *SHAPE, generator=generator).to(device)
    y = torch.randint(0, 4, (8,), generator=generator).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    pruner = Pruner(model, SHAPE, target_rate=2.5, algorithm="reweighted").prepare()
    for step in range(4):
        phase_step(F.cross_entropy(model(x), y), optimizer, pruner, "regularize")
        if step == 1:
            pruner.reweight()
    pruner.prune()
    for _ in range(2):
        phase_step(F.cross_entropy(model(x), y), optimizer, pruner, "finetune")
    return model, pruner.finalize()


@needs_cuda
def test_the_lifecycle_on_a_gpu_ends_as_on_the_cpu_and_exports(exact_cuda, tmp_path):
    """Same pattern and report, weights within float32 rounding, and the GPU model exports
    (the export traces a CPU copy) to the same patterns."""
    cpu_model, cpu_report = _own_loop("cpu")
    gpu_model, gpu_report = _own_loop("cuda")
    assert gpu_report == cpu_report
    expected, actual = cpu_model.state_dict(), gpu_model.state_dict()
    for key in expected:
        assert actual[key].device.type == "cuda", key
        torch.testing.assert_close(actual[key].cpu(), expected[key], rtol=1e-4, atol=1e-5)
        assert torch.equal(actual[key].cpu() == 0, expected[key] == 0), key
    shape = (1, *SHAPE)
    patterns = [
        check_onnx_sparsity(export_onnx(model, tmp_path / f"{name}.onnx", shape))
        for name, model in (("cpu", cpu_model), ("gpu", gpu_model))
    ]
    assert patterns[0].keys() == patterns[1].keys()
    for name in patterns[0]:
        assert patterns[0][name].scheme == patterns[1][name].scheme == "kgs", name
        assert np.array_equal(patterns[0][name].units, patterns[1][name].units), name
    assert next(gpu_model.parameters()).device.type == "cuda"  # the export left it there


class _SharedConv(torch.nn.Module):
    """A conv applied twice in one forward: its weight costs both calls' MACs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv3d(3, 16, 3, padding=1)
        self.shared = torch.nn.Conv3d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(torch.relu(self.shared(torch.relu(self.stem(x)))))


def test_a_conv_called_twice_costs_both_calls():
    """The MAC target counts every call of a shared conv, as count_macs does: pruning it to
    1.15x fewer conv MACs removes units worth 1.15x of both calls, checked from the zeros."""
    torch.manual_seed(0)
    model = _SharedConv()
    shape = (3, 4, 8, 8)
    convs = count_macs(model, shape, convs_only=True)
    assert conv_macs(model, shape) == {"stem": 3 * 27 * 16 * 256, "shared": 2 * 16 * 27 * 16 * 256}
    pruner = Pruner(model, shape, target_rate=1.15, algorithm="magnitude", exclude=["stem"])
    pruner.prepare()
    report = pruner.prune()
    assert report.conv_macs_before == convs
    kept = float((model.shared.weight != 0).double().mean())
    removed = (1 - kept) * conv_macs(model, shape)["shared"]
    assert report.conv_macs_after == pytest.approx(convs - removed)
    assert 1.15 <= convs / (convs - removed) < 1.16


class _ReachedTwice(torch.nn.Module):
    """One conv and one PReLU reached by two attribute names each, as ``nn.Sequential(conv,
    act, conv)`` holds a module twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv3d(3, 8, 3, padding=1)
        self.conv = torch.nn.Conv3d(8, 8, 3, padding=1)
        self.again = self.conv
        self.act = torch.nn.PReLU()
        self.act_again = self.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_again(self.again(self.act(self.conv(self.stem(x)))))


def test_a_module_reached_by_two_names_keeps_its_weights():
    """Counting MACs put the meta device's placeholders back for good in a module reached by
    two names (torch.func's weight tying swapped it once per name): prepare() then failed on a
    meta tensor, or training did, or a shared BatchNorm silently lost its values."""
    torch.manual_seed(0)
    model = _ReachedTwice()
    x = torch.randn(1, 3, 4, 8, 8)
    expected = model(x)
    macs = {"stem": 3 * 27 * 8 * 256, "conv": 2 * 8 * 27 * 8 * 256}
    assert conv_macs(model, (3, 4, 8, 8)) == macs
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    pruner = Pruner(model, (3, 4, 8, 8), target_rate=1.3, algorithm="magnitude", exclude=["stem"])
    pruner.prepare()
    pruner.prune()
    assert model(x).device.type == "cpu" and torch.isfinite(model(x)).all()
    assert (model.conv.weight == 0).any()
    # Either name excludes it (the second was "matches no conv"): nothing is left to prune.
    with pytest.raises(ValueError, match="the model has no prunable Conv3d layer"):
        Pruner(_ReachedTwice(), (3, 4, 8, 8), target_rate=1.3, exclude=["stem", "again"]).prepare()
    # Either name bounds it (the second was "not a prunable layer").
    model = _ReachedTwice()
    bounds = {"again": (0.9, 1.0)}
    bounded = Pruner(model, (3, 4, 8, 8), target_rate=1.2, layer_bounds=bounds)
    bounded.prepare().prune()
    assert (model.conv.weight != 0).double().mean() >= 0.9
    twice = {"again": (0.9, 1.0), "conv": (0.5, 1.0)}
    with pytest.raises(ValueError, match="layer_bounds bounds 'conv' twice, by two names"):
        Pruner(_ReachedTwice(), (3, 4, 8, 8), target_rate=1.3, layer_bounds=twice).prepare()


def _three_convs() -> torch.nn.Sequential:
    conv = torch.nn.Conv3d
    return torch.nn.Sequential(
        conv(3, 8, 3, padding=1), torch.nn.ReLU(), conv(8, 8, 3, padding=1), torch.nn.ReLU(),
        conv(8, 8, 3, padding=1),
    )  # fmt: skip


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.nn.utils.weight_norm's
@pytest.mark.parametrize(
    "reparametrize",
    [
        torch.nn.utils.weight_norm,
        torch.nn.utils.spectral_norm,
        torch.nn.utils.parametrizations.weight_norm,
    ],
)
def test_a_conv_that_computes_its_weight_is_refused_by_name(reparametrize):
    """prepare() failed on a meta tensor (weight_norm, spectral_norm) or prune() with a
    TypeError about weight_orig (a parametrization); excluded, the conv stays as it is."""
    model = _three_convs()
    reparametrize(model[2])
    with pytest.raises(ValueError, match=r"conv '2' computes its weight .* or exclude the conv"):
        Pruner(model, (3, 4, 8, 8), target_rate=1.5, algorithm="magnitude").prepare()
    pruner = Pruner(model, (3, 4, 8, 8), target_rate=1.2, algorithm="magnitude", exclude=["2"])
    pruner.prepare().prune()
    assert model(torch.zeros(1, 3, 4, 8, 8)).isfinite().all()


def test_convs_that_share_one_weight_are_refused():
    """Each conv got a mask of its own on the one weight: the report and the weights
    disagreed, and the export failed on the weight it could not place. An excluded conv
    holding it would take the other's mask in place."""
    model = _three_convs()
    model[4].weight = model[2].weight
    for exclude in ([], ["4"]):
        with pytest.raises(ValueError, match=r"conv '2' shares its weight tensor with '4\.weight'"):
            Pruner(model, (3, 4, 8, 8), target_rate=1.2, exclude=exclude).prepare()
    pruner = Pruner(model, (3, 4, 8, 8), target_rate=1.1, algorithm="magnitude", exclude=["2", "4"])
    pruner.prepare().prune()
    pruner.prepare()  # again after prune(): its weight_orig is its own
    assert not (model[2].weight == 0).any()


def test_a_conv_whose_bias_alone_is_computed_is_pruned():
    class Doubled(torch.nn.Module):
        def forward(self, bias: torch.Tensor) -> torch.Tensor:
            return 2 * bias

    model = _three_convs()
    torch.nn.utils.parametrize.register_parametrization(model[2], "bias", Doubled())
    Pruner(model, (3, 4, 8, 8), target_rate=1.5, algorithm="magnitude").prepare().prune()
    assert (model[2].weight == 0).any()


def test_a_conv_replaced_after_prepare_is_an_error():
    """A replaced conv would be reported pruned while the model runs the new, dense one."""
    model = torch.nn.Sequential(torch.nn.Conv3d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv3d(8, 8, 3))
    pruner = Pruner(model, SHAPE, target_rate=1.5, algorithm="magnitude").prepare()
    model[2] = torch.nn.Conv3d(8, 8, 3)
    with pytest.raises(RuntimeError, match=r"layer '2' is no longer the model's module"):
        pruner.prune()


WRAPPERS = [
    (torch.compile, r"model\._orig_mod"),
    (torch.nn.DataParallel, r"model\.module"),
    (torch.optim.swa_utils.AveragedModel, r"model\.module"),
]


@pytest.mark.parametrize(("wrap", "hint"), WRAPPERS, ids=["compile", "data_parallel", "averaged"])
def test_a_wrapped_model_is_refused_with_the_module_to_pass(wrap, hint, tmp_path):
    with pytest.raises(ValueError, match=f"give the Pruner the module itself .*{hint}"):
        Pruner(wrap(_tiny()), SHAPE, target_rate=2.0)
    with pytest.raises(ValueError, match=f"give export_onnx the module itself .*{hint}"):
        export_onnx(wrap(_tiny()), tmp_path / "m.onnx", SHAPE)
    assert not (tmp_path / "m.onnx").exists()


def test_a_masked_model_is_copied_between_a_training_forward_and_the_step():
    """An EMA or best-model snapshot is taken mid-step, where copy.deepcopy refuses torch's
    masked weight (no graph leaf)."""
    model = _tiny()
    pruner = Pruner(model, SHAPE, target_rate=2.0).prepare()
    pruner.prune()
    model(torch.randn(2, *SHAPE)).sum().backward()
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(model)
    snapshot = deepcopy_model(model)
    x = torch.randn(1, *SHAPE)
    torch.testing.assert_close(snapshot.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_prune_inside_inference_mode_leaves_a_model_that_trains():
    """An evaluation block is where a loop may call prune(): masks made there were inference
    tensors, which the next backward could not save."""
    model = _tiny()
    pruner = Pruner(model, SHAPE, target_rate=2.0).prepare()
    with torch.inference_mode():
        pruner.prune()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, *SHAPE)).sum().backward()
    pruner.fine_tune_step(optimizer)
    for layer in pruner.layers:
        mask = layer.conv.weight_mask
        assert not mask.is_inference()
        assert (layer.conv.weight_orig[mask == 0] == 0).all()


@pytest.mark.parametrize(
    ("saved_with", "change", "message"),
    [
        ({}, {"exclude": ["features.0"]}, r"layers \['features\.0'\] saved but not prunable here"),
        (
            {"exclude": ["features.0"]},
            {},
            r"layers \['features\.0'\] prunable here but not saved \(another exclude\?\)",
        ),
        ({}, {"group": (4, 4)}, r"group \[8, 4\] saved, \[4, 4\] here"),
        ({}, {"scheme": "vanilla"}, r"scheme 'kgs' saved, 'vanilla' here"),
    ],
    ids=["exclude", "exclude-saved", "group", "scheme"],
)
def test_a_state_of_another_pruner_is_refused_naming_the_difference(saved_with, change, message):
    """Either way round: a state without a layer would leave it unpruned and unpenalised."""
    saved = Pruner(_tiny(), SHAPE, target_rate=2.0, **saved_with).prepare()
    saved.prune()
    other = Pruner(_tiny(), SHAPE, **{"target_rate": 2.0, **change}).prepare()
    with pytest.raises(ValueError, match=message):
        other.load_state_dict(saved.state_dict())


def test_a_mask_of_the_wrong_shape_names_its_layer():
    state = Pruner(_tiny(), SHAPE, target_rate=2.0).prepare().state_dict()
    pruner = Pruner(_tiny(), SHAPE, target_rate=2.0).prepare()
    pruner.prune()
    name = pruner.layers[0].name
    state["masks"] = {name: torch.ones(1, 1, 1, 1, 1)}
    with pytest.raises(ValueError, match=rf"saved mask for '{re.escape(name)}': mask shape"):
        pruner.load_state_dict(state)


def test_fine_tune_step_takes_a_grad_scaler():
    """Under a GradScaler the step is the scaler's (unscaled, skipped on inf), the zeros held."""
    model = _tiny()
    pruner = Pruner(model, SHAPE, target_rate=2.0).prepare()
    pruner.prune()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(2, *SHAPE)
    scaler.scale(model(x).square().mean()).backward()
    pruner.fine_tune_step(optimizer, scaler)
    scaler.update()
    after = [p.detach() for p in model.parameters()]
    change = max(float((p - b).abs().max()) for p, b in zip(after, before, strict=True))
    assert 0 < change < 1  # stepped on unscaled gradients (scaled ones move weights by ~100)
    for layer in pruner.layers:
        assert torch.equal(layer.conv.weight == 0, layer.conv.weight_mask == 0)


def test_flops_exponent_divides_scores_by_unit_cost():
    """With every unit of equal norm, exponent 1 ranks units by their MACs alone: the conv on
    the 8x larger plane loses units first; exponent 0 scores all units alike."""
    model = torch.nn.Sequential(
        torch.nn.Conv3d(4, 8, 3, padding=1),  # 8x8x8 outputs: costly units
        torch.nn.Conv3d(8, 8, 3, stride=2, padding=1),  # 4x4x4 outputs: cheap units
    )
    with torch.no_grad():
        for conv in model:
            conv.weight.fill_(1.0)
    shape = (4, 8, 8, 8)
    flat = Pruner(model, shape, target_rate=1.5, algorithm="magnitude").prepare()
    assert all(torch.allclose(s, torch.ones_like(s)) for s in flat.scores().values())
    pruner = Pruner(model, shape, target_rate=1.5, algorithm="magnitude", flops_exponent=1.0)
    pruner.prepare()
    for layer in pruner.layers:
        expected = 1.0 / layer.cost_weight.double()
        torch.testing.assert_close(pruner.scores()[layer.name], expected)
    keep = pruner.plan()
    assert keep["0"].float().mean() < keep["1"].float().mean() == 1.0


def test_a_state_from_before_its_layout_was_kept_is_checked_by_its_shapes():
    saved = Pruner(_tiny(), SHAPE, target_rate=2.0, group=(4, 4)).prepare()
    saved.prune()
    state = saved.state_dict()
    del state["layout"]
    pruner = Pruner(_tiny(), SHAPE, target_rate=2.0).prepare()
    with pytest.raises(ValueError, match=r"penalty weights for 'features\.0' have shape"):
        pruner.load_state_dict(state)
    assert not any(is_masked(layer.conv) for layer in pruner.layers)  # nothing half-loaded
    same = Pruner(_tiny(), SHAPE, target_rate=2.0, group=(4, 4)).prepare()
    same.load_state_dict(state)
    assert same.report() == saved.report()


def test_a_layer_pruned_away_whole_has_no_rate():
    """Its rate is infinite, printed as gone and written as null (JSON has no infinity), not
    its MACs over one."""
    report = PruningReport(
        [LayerReport("a", "kgs", (8, 4), 0, 27, 5_308_416, 0)], 5_308_416 * 2, 5_308_416, 2.0
    )
    assert report.layers[0].rate == float("inf") and report.rate == 2.0
    assert report.format_table().splitlines()[1].endswith("  gone")
    assert json.loads(json.dumps(report.to_dict()))["layers"][0]["rate"] is None


def test_the_table_rows_add_up_to_the_total_with_a_layer_excluded():
    """An excluded conv counts in the total as dense: its own row says so."""
    report = Pruner(_tiny(), SHAPE, target_rate=1.5, exclude=["features.0"]).prepare().prune()
    lines = report.format_table().splitlines()
    assert lines[-2].startswith("other convs (not pruned)")
    rows = [line.split() for line in lines[1:-1]]
    before, after = (sum(float(row[-3 + i]) for row in rows) for i in (0, 1))
    assert before == pytest.approx(report.conv_macs_before / 1e6, abs=0.02)
    assert after == pytest.approx(report.conv_macs_after / 1e6, abs=0.02)


def test_a_model_in_training_mode_whose_last_map_is_one_voxel_is_counted():
    """The MAC count runs one sample: BatchNorm in training mode refused it (no statistics over
    one value per channel), though the model trains on larger batches. Its mode is kept."""
    model = _tiny().train()
    model.features[0].eval()  # mixed modes: each module gets its own back
    modes = {name: module.training for name, module in model.named_modules()}
    pruner = Pruner(model, (3, 2, 4, 4), target_rate=1.2).prepare()
    assert pruner.prune().rate >= 1.2
    assert {name: module.training for name, module in model.named_modules()} == modes
