"""The generators' own command line (``python -m rt3d_halide.generators``) and what it reads:
the layer spec and the weights file are checked, since they come from a user's command line as
well as from the build."""

from __future__ import annotations

import json
import subprocess
import sys

import halide as hl
import numpy as np
import pytest
from rt3d_halide.generators.__main__ import USAGE, check_inputs
from rt3d_halide.generators.baking import load_layer
from rt3d_halide.generators.conv3d_dense import DenseConv3dGenerator
from rt3d_halide.generators.conv3d_sparse import SparseConv3dGenerator, layer_group
from rt3d_halide.generators.spec import Conv3dSpec

SPEC = Conv3dSpec("layer", 4, 8, (4, 6, 6), (3, 3, 3), pads_begin=(1, 1, 1), pads_end=(1, 1, 1))


def run_generators(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rt3d_halide.generators", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_names_every_generator_parameter() -> None:
    proc = run_generators("--help")
    assert proc.returncode == 0 and proc.stdout == USAGE
    with hl.GeneratorContext(hl.get_host_target()):
        for generator in (DenseConv3dGenerator, SparseConv3dGenerator):
            params = list(generator()._gp_dict)  # Halide keeps them there, not on the class
            assert params and all(f"  {n} " in USAGE for n in params), params


@pytest.mark.parametrize(
    ("drop", "named"), [("-g", "-g GENERATOR"), ("-o", "-o DIR"), ("target=", "target=TARGET")]
)
def test_a_missing_flag_is_named(tmp_path, drop, named) -> None:
    args = ["-g", "rt3d_conv3d_dense", "-o", str(tmp_path), "target=host"]
    args = [a for i, a in enumerate(args) if not a.startswith(drop) and args[i - 1] != drop]
    proc = run_generators(*args)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1] == f"error: missing {named}"


def test_the_runtime_alone_needs_no_generator(tmp_path) -> None:
    proc = run_generators("-r", "halide_runtime", "-o", str(tmp_path), "target=host")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "halide_runtime.a").is_file()


@pytest.mark.parametrize(
    ("generator", "params", "message"),
    [
        ("rt3d_conv3d_sparse", ["dense_families=bogus"], "dense_families ['bogus']: the families"),
        ("rt3d_conv3d_sparse", ["group=8"], "group must be 'gM,gN'"),
        ("rt3d_conv3d_sparse", ['schedule={"vector_lanes": 0}'], "sparse knob vector_lanes"),
        (
            "rt3d_conv3d_sparse",
            ["target=arm-64-android", "dense_families=arm", 'dense_schedule={"bogus": 1}'],
            "bogus",
        ),
        ("rt3d_conv3d_dense", ['schedule={"bogus": 1}'], "bogus"),
        ("rt3d_conv3d_dense", ["weights="], "the generator needs its weights"),
        # Halide printed its whole usage, or a parameter's refusal with its stack frames.
        ("rt3d_conv3d_dense", ["target=arm64-android"], "'arm64-android' is not a Halide target"),
        ("rt3d_conv3d_sparse", ["target=host,bogus"], "'bogus' is not a Halide target"),
        ("rt3d_conv3d_dense", ["group=8,4", "bogus=1"], "takes no parameter group, bogus"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, generator, params, message) -> None:
    """Checked before Halide runs the generator: raised inside it, the error came as
    "Unhandled exception: ValueError: ..." followed by pybind11's stack frames."""
    np.savez(tmp_path / "w.npz", weight=np.ones(SPEC.weight_shape, np.float32))
    args = {"target": "host", "spec": SPEC.to_json(), "weights": str(tmp_path / "w.npz")}
    args |= dict(param.split("=", 1) for param in params)
    proc = run_generators(
        "-g", generator, "-o", str(tmp_path), "-e", "stmt", *(f"{k}={v}" for k, v in args.items())
    )
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr


def test_halides_own_dotted_parameters_and_values_holding_equals_are_taken(tmp_path) -> None:
    """autoscheduler.name is Halide's, not the generator's (checked by its first part), and a
    value is everything after the first '=' (a folder named a=b)."""
    (tmp_path / "a=b").mkdir()
    weights = tmp_path / "a=b" / "w.npz"
    np.savez(weights, weight=np.ones(SPEC.weight_shape, np.float32))
    check_inputs(["-g", "rt3d_conv3d_dense", "-o", str(tmp_path), "target=host",
                  f"spec={SPEC.to_json()}", f"weights={weights}",
                  "autoscheduler.name=Adams2019", "autoscheduler.parallelism=2"])  # fmt: skip


def test_a_spec_field_of_another_json_type_is_one_error_line(tmp_path) -> None:
    spec = json.dumps({**json.loads(SPEC.to_json()), "stride": None})
    proc = run_generators("-g", "rt3d_conv3d_dense", "-o", str(tmp_path), "target=host",
                          f"spec={spec}", "weights=w.npz")  # fmt: skip
    assert proc.stderr == "error: stride needs 3 integers (t, h, w), got None\n"


def test_a_flag_halide_does_not_know_is_left_to_halide(tmp_path) -> None:
    """Not read as a flag swallowing the next argument (which named -o's folder missing)."""
    proc = run_generators("-g", "rt3d_conv3d_dense", "-e=stmt", "-o", str(tmp_path), "target=host")
    assert proc.returncode == 1 and "Unknown flag: -e=stmt" in proc.stderr, proc.stderr


def test_a_missing_output_folder_is_named(tmp_path) -> None:
    out = tmp_path / "out"
    proc = run_generators("-r", "halide_runtime", "-o", str(out), "target=host")
    assert proc.returncode == 2
    assert proc.stderr == f"error: -o '{out}': no such folder (Halide does not make it)\n"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"relu": "false"}, "relu must be true or false"),
        ({"has_bias": 1}, "has_bias must be true or false"),
        ({"in_size": [4.5, 6, 6]}, r"in_size needs 3 integers"),
        ({"out_channels": 8.0}, "out_channels must be an integer"),
        ({"padding": [1, 1, 1]}, r"unknown \['padding'\]"),
        ({"in_channels": True}, "in_channels must be an integer"),
        ({"stride": [1, 1, 1, 1]}, r"stride needs 3 integers"),
    ],
)
def test_a_spec_of_the_wrong_types_is_refused(change, message) -> None:
    data = {**SPEC.__dict__, **change}
    with pytest.raises(ValueError, match=message):
        Conv3dSpec.from_dict(data)


def test_a_spec_that_is_no_json_says_it_takes_the_text() -> None:
    with pytest.raises(ValueError, match=r"spec '/tmp/layer.json': not JSON .* not a file"):
        Conv3dSpec.from_json("/tmp/layer.json")


def _weight(nan: bool = False) -> np.ndarray:
    weight = np.ones(SPEC.weight_shape, np.float32)
    weight[0, 0, 0, 0, 0] = np.nan if nan else 1.0
    return weight


@pytest.mark.parametrize(
    ("arrays", "has_bias", "message"),
    [
        ({"weight": _weight(), "bias": np.ones(8)}, False, "holds a bias; the spec: has_bias"),
        ({"weight": _weight(), "bias": np.ones(7)}, True, r"bias shape \(7,\) != \(8,\)"),
        ({"weight": _weight(), "bias": np.full(8, np.nan)}, True, "the bias holds NaN or Inf"),
        ({"weight": _weight(nan=True)}, True, "the weight holds NaN or Inf"),
        ({"kernel": _weight()}, True, "holds no 'weight' array"),
    ],
)
def test_a_weights_file_that_disagrees_with_the_spec_is_refused(
    tmp_path, arrays, has_bias, message
) -> None:
    spec = Conv3dSpec.from_dict({**SPEC.__dict__, "has_bias": has_bias})
    np.savez(tmp_path / "w.npz", **arrays)
    with pytest.raises(ValueError, match=message):
        load_layer(spec.to_json(), str(tmp_path / "w.npz"))


def test_numpy_numbers_in_a_spec_are_taken_as_pythons() -> None:
    spec = Conv3dSpec("l", np.int64(4), np.int32(8), np.array([4, 6, 6]), (3, 3, 3), relu=np.True_)
    assert Conv3dSpec.from_json(spec.to_json()) == spec and spec.relu is True
    with pytest.raises(ValueError, match=r"missing \['in_channels'"):
        Conv3dSpec.from_dict({"name": "l"})


def test_a_weights_path_that_is_no_npz_is_refused(tmp_path) -> None:
    (tmp_path / "w.txt").write_text("weights")
    np.save(tmp_path / "w.npy", _weight())
    for path, message in (
        ("", "needs its weights"),
        (str(tmp_path / "w.txt"), "not a readable"),
        (str(tmp_path / "w.npy"), "a .npy array, not an .npz"),
    ):
        with pytest.raises(ValueError, match=message):
            load_layer(SPEC.to_json(), path)


def test_a_group_that_contradicts_the_weights_file_is_refused() -> None:
    """The build passes the group in the weights file; a group= of another shape on the
    command line overrode it silently."""
    with pytest.raises(
        ValueError, match=r"group=4,4 contradicts the weights file's group \(8, 4\)"
    ):
        layer_group("4,4", {"group": np.array([8, 4])})
    assert layer_group("8,4", {"group": np.array([8, 4])}) == (8, 4)
    assert layer_group("", {}) == (8, 4)
