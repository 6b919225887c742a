"""The torch-free pattern contract shared with the build driver."""

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rt3d_halide.pruning.patterns import (
    SPARSITY_METADATA_KEY,
    check_onnx_sparsity,
    inferred_scheme,
    is_balanced,
    kept_groups,
    kept_units,
    parse_sparsity_metadata,
    sparsity_metadata,
    unit_mask_to_weight_mask,
    validate_pattern,
)


@st.composite
def masked_layers(draw):
    m, n = draw(st.integers(1, 19)), draw(st.integers(1, 11))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(3))
    group = (draw(st.sampled_from([1, 2, 4, 8])), draw(st.sampled_from([1, 2, 4])))
    p, q = -(-m // group[0]), -(-n // group[1])
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    units = rng.random((p, q, *kernel)) < draw(st.floats(0.0, 1.0))
    # Weights bounded away from zero, so only the mask makes zeros.
    weight = rng.choice([-1.0, 1.0], size=(m, n, *kernel)) * rng.uniform(0.1, 1.0, (m, n, *kernel))
    return weight.astype(np.float32), units, group


@settings(max_examples=60, deadline=None)
@given(masked_layers())
def test_pattern_from_zeros_equals_mask(layer):
    weight, units, group = layer
    masked = weight * unit_mask_to_weight_mask(units, weight.shape, group)
    assert np.array_equal(kept_units(masked, group), units)
    assert np.array_equal(kept_groups(masked, group), units.any(axis=(2, 3, 4)))
    pattern = validate_pattern(masked, "kgs", group)
    assert pattern.units.shape == units.shape
    assert pattern.kept_fraction == pytest.approx(units.mean())


def test_padding_of_last_group_truncates_to_real_channels():
    weight = np.zeros((10, 5, 1, 1, 1), np.float32)
    weight[9, 4] = 1.0  # only weight of group (p=1, q=1), which holds 2x1 real channels
    units = kept_units(weight, (8, 4))
    assert units.shape == (2, 2, 1, 1, 1)
    assert units[:, :, 0, 0, 0].tolist() == [[False, False], [False, True]]
    mask = unit_mask_to_weight_mask(units, weight.shape, (8, 4))
    assert mask.shape == weight.shape and mask.sum() == 2 * 1


def test_vanilla_rejects_partially_pruned_group_and_accepts_whole_groups():
    weight = np.ones((8, 8, 3, 3, 3), np.float32)
    weight[:8, :4] = 0.0  # whole group (0, 0) removed: vanilla
    assert validate_pattern(weight, "vanilla", (8, 4)).summary()["kept_groups"] == 1
    weight[:8, 4:, 1, 1, 1] = 0.0  # one column of group (0, 1): KGS, not vanilla
    with pytest.raises(ValueError, match=r"declared vanilla.*\(p=0, q=1\) keeps 26 of 27"):
        validate_pattern(weight, "vanilla", (8, 4), name="w")
    assert validate_pattern(weight, "kgs", (8, 4)).summary()["kept_units"] == 27 * 2 - 27 - 1
    assert validate_pattern(weight, "dense", (8, 4)).scheme == "dense"
    weight[:8, 4:] = 0.0
    weight[:8, 4:, 2, 0, 1] = 1.0  # one column left: still partial
    with pytest.raises(ValueError, match=r"\(p=0, q=1\) keeps 1 of 27"):
        validate_pattern(weight, "vanilla", (8, 4), name="w")


@pytest.mark.parametrize(
    ("weight", "scheme", "group", "message"),
    [
        (np.ones((4, 4, 3, 3)), "kgs", (4, 4), "rank 5"),
        (np.full((4, 4, 1, 1, 1), np.nan), "kgs", (4, 4), "NaN"),
        (np.ones((4, 4, 1, 1, 1)), "blocky", (4, 4), "unknown sparsity scheme"),
        (np.ones((4, 4, 1, 1, 1)), "kgs", (0, 4), "positive integers"),
        (np.ones((4, 4, 1, 1, 1)), "kgs", (4.5, 4), "positive integers"),
        (np.ones((4, 4, 1, 1, 1)), "kgs", (4, 4, 4), "positive integers"),
    ],
)
def test_bad_input_is_a_clear_value_error(weight, scheme, group, message):
    with pytest.raises(ValueError, match=rf"^layer1\.weight: .*{message}"):
        validate_pattern(weight, scheme, group, name="layer1.weight")


def test_undeclared_conv_is_inferred_as_the_build_infers_it(tmp_path):
    """check_onnx_sparsity reads a conv the metadata leaves out as the build does: kgs 8x4 when a
    whole unit is zero, else dense."""
    import onnx
    import onnx_factory as F

    weights = F.two_conv_weights()
    weights["conv_b.weight"][:, 4:, 0, 1, 2] = 0.0  # one whole 8x4 unit (4 filters, truncated)
    metadata = F.sparsity_metadata({"conv_a.weight": {"scheme": "dense", "group": [8, 4]}})
    path = tmp_path / "m.onnx"
    onnx.save(F.two_conv_model(weights=weights, metadata=metadata), str(path))
    patterns = check_onnx_sparsity(path)
    assert patterns["conv_a.weight"].scheme == "dense"
    assert patterns["conv_b.weight"].scheme == "kgs"
    assert patterns["conv_b.weight"].units.sum() == patterns["conv_b.weight"].units.size - 1
    assert inferred_scheme(weights["conv_a.weight"]) == "dense"


def test_an_undeclared_conv_with_nan_weights_is_refused_naming_it(tmp_path):
    """A declared conv's bad weights were refused naming it, an inferred one's not."""
    import onnx
    import onnx_factory as F

    weights = F.two_conv_weights()
    weights["conv_b.weight"][0, 0, 0, 0, 0] = np.nan
    path = tmp_path / "m.onnx"
    onnx.save(F.two_conv_model(weights=weights), str(path))
    with pytest.raises(ValueError, match=r"^conv_b\.weight: weight contains NaN"):
        check_onnx_sparsity(path)


def test_a_declared_group_past_the_layer_is_read_clipped_as_the_build_reads_it(tmp_path):
    """Past the layer a group holds the same units clipped to it; taken whole, a huge one
    asked numpy for its padding (a ValueError naming no layer)."""
    import onnx
    import onnx_factory as F

    metadata = F.sparsity_metadata({"conv_a.weight": {"scheme": "kgs", "group": [2**62, 1]}})
    path = tmp_path / "m.onnx"
    onnx.save(F.two_conv_model(metadata=metadata), str(path))
    assert check_onnx_sparsity(path)["conv_a.weight"].group == (8, 1)


def test_metadata_round_trip_and_rejections():
    text = sparsity_metadata({"a.weight": ("kgs", (8, 4)), "b.weight": ("dense", (4, 4))})
    assert json.loads(text) == {
        "version": 1,
        "layers": {
            "a.weight": {"scheme": "kgs", "group": [8, 4]},
            "b.weight": {"scheme": "dense", "group": [4, 4]},
        },
    }
    assert parse_sparsity_metadata(text) == {
        "a.weight": ("kgs", (8, 4)),
        "b.weight": ("dense", (4, 4)),
    }
    with pytest.raises(ValueError, match="version"):
        parse_sparsity_metadata('{"version": 2, "layers": {}}')
    with pytest.raises(ValueError, match="version"):  # JSON's true is no version 1
        parse_sparsity_metadata('{"version": true, "layers": {}}')
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_sparsity_metadata("{")
    with pytest.raises(ValueError, match="exactly 'scheme' and 'group'"):
        parse_sparsity_metadata('{"version": 1, "layers": {"a": {"scheme": "kgs"}}}')
    # A bad scheme or group names its layer, as every metadata error does.
    for entry, message in [
        ('{"scheme": "foo", "group": [8, 4]}', "unknown sparsity scheme"),
        ('{"scheme": "kgs", "group": [0, 4]}', "group"),
    ]:
        with pytest.raises(ValueError, match=f"layer 'conv_x.weight': .*{message}"):
            parse_sparsity_metadata(f'{{"version": 1, "layers": {{"conv_x.weight": {entry}}}}}')
    assert SPARSITY_METADATA_KEY == "rt3d.sparsity"


def test_patterns_module_imports_without_torch():
    code = (
        "import sys, rt3d_halide.pruning.patterns, rt3d_halide.pruning as p; "
        "p.check_onnx_sparsity; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_training_and_export_import_without_halide():
    """A GPU training machine needs torch, not Halide's compiler: the top package loads its
    runtime (and Halide) on first use."""
    code = (
        "import sys, rt3d_halide.pruning.train, rt3d_halide.pruning.export; "
        "assert 'halide' not in sys.modules, 'halide was imported'; "
        "from rt3d_halide import load; assert 'halide' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_balanced_means_every_group_keeps_as_many_locations():
    units = np.ones((2, 2, 1, 1, 2), bool)
    assert is_balanced(units)
    units[1, 0, 0, 0, 0] = False  # one group keeps 1 location, the others 2
    assert not is_balanced(units)
    assert is_balanced(np.zeros((0, 2, 1, 1, 2), bool))
