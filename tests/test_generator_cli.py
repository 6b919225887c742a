"""The generators' own command line (``python -m rt3d_halide.generators``) and what it reads:
the layer spec and the weights file are checked, since they come from a user's command line as
well as from the build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import halide as hl
import numpy as np
import pytest
from conftest import require_tools
from conv_harness import RUNNER_SOURCE, ConvCase, assert_matches, random_case_data, reference
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


def test_the_runtime_of_a_target_list_may_be_an_object_and_a_library(tmp_path) -> None:
    """Only a generator's target list needs exactly one of them: Halide writes both for -r."""
    proc = run_generators("-r", "rt", "-o", str(tmp_path), "-e", "object,static_library",
                          "target=x86-64-linux,x86-64-linux-avx2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "rt.a").is_file() and (tmp_path / "rt.o").is_file()


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
        # Halide's compile_multitarget refused these with its own error, exit status 1.
        (
            "rt3d_conv3d_dense",
            ["target=x86-64-linux,arm-64-linux"],
            "'arm-64-linux': every target of one library must share 'x86-64-linux''s",
        ),
        ("rt3d_conv3d_dense", ["target=host,host"], "target 'host' is listed twice"),
        (
            "rt3d_conv3d_dense",
            ["target=x86-64-linux,x86-64-linux-no_runtime-sse41"],
            "the feature 'no_runtime' must be set alike on every target",
        ),
        # Halide's Target() threw: a traceback, exit status 1.
        ("rt3d_conv3d_dense", ["target=x86-64-linux-arm_dot_prod"], "arm_dot_prod is incompatible"),
        ("rt3d_conv3d_sparse", ["target=arm-64-android-opencl,arm-64-android"], "-e stmt: a list"),
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


def test_each_target_of_a_list_is_checked_not_only_the_first(tmp_path) -> None:
    """A multi-target library's later targets may take other code (here the ARM CPU gets the
    dense kernel, which has no knob 'bogus'): checked for the first target alone, the bad knob
    surfaced inside Halide as "Unhandled exception" and its stack frames."""
    np.savez(tmp_path / "w.npz", weight=np.ones(SPEC.weight_shape, np.float32))
    args = ["-g", "rt3d_conv3d_sparse", "-o", str(tmp_path), f"spec={SPEC.to_json()}",
            f"weights={tmp_path / 'w.npz'}", "dense_families=arm",
            'dense_schedule={"bogus": 1}']  # fmt: skip
    check_inputs([*args, "target=arm-64-android-opencl"])  # OpenCL runs the sparse kernel
    with pytest.raises(ValueError, match=r"unknown schedule knobs \['bogus'\]; arm64-neon"):
        check_inputs([*args, "target=arm-64-android-opencl,arm-64-android"])


@pytest.mark.parametrize(
    ("emits", "refused"),
    [("static_library,c_header", False), ("object", False), ("object,static_library", True)],
)
def test_a_list_of_targets_takes_exactly_one_library_emit(tmp_path, emits, refused) -> None:
    np.savez(tmp_path / "w.npz", weight=np.ones(SPEC.weight_shape, np.float32))
    args = ["-g", "rt3d_conv3d_sparse", "-o", str(tmp_path), "-e", emits,
            f"spec={SPEC.to_json()}", f"weights={tmp_path / 'w.npz'}",
            "target=arm-64-android-opencl,arm-64-android"]  # fmt: skip
    if refused:
        with pytest.raises(ValueError, match="exactly one of object and static_library"):
            check_inputs(args)
    else:
        check_inputs(args)


def test_a_layer_halides_autoscheduler_schedules_computes_what_torch_does(tmp_path) -> None:
    """autoscheduler=NAME is Halide's parameter, let through by the check: the dense generator
    then hands the autoscheduler its plain algorithm (one block of every output channel) and
    applies no schedule of its own. Adams2019's code, run natively, matches torch."""
    compiler = os.environ.get("CXX", "g++")
    require_tools(compiler)
    case = ConvCase(3, 5, (3, 5, 6), pads_begin=(1, 1, 1), pads_end=(1, 0, 1))
    x, weight, bias = random_case_data(case)
    np.savez(tmp_path / "w.npz", weight=weight, bias=bias)
    plugin = Path(hl.install_dir()) / "lib64" / "libautoschedule_adams2019.so"
    proc = run_generators("-g", "rt3d_conv3d_dense", "-p", str(plugin), "-o", str(tmp_path),
                          "-f", "conv", "-e", "static_library,c_header,schedule", "target=host",
                          f"spec={case.spec().to_json()}", f"weights={tmp_path / 'w.npz'}",
                          "autoscheduler=Adams2019", "autoscheduler.beam_size=1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "generated by Adams2019" in (tmp_path / "conv.schedule.h").read_text()
    (tmp_path / "functions.inc").write_text('{"conv", conv},\n')
    runner, out_shape = tmp_path / "run_layer", (1, *case.out_size, case.out_channels)
    include = Path(hl.install_dir()) / "include"
    subprocess.run([compiler, "-std=c++17", "-O1", '-DMODEL_HEADER="conv.h"', f"-I{tmp_path}",
                    f"-I{include}", str(RUNNER_SOURCE), str(tmp_path / "conv.a"), "-lpthread",
                    "-ldl", "-o", str(runner)], check=True)  # fmt: skip
    x.tofile(tmp_path / "in.bin")
    dims = [*map(str, x.shape), *map(str, out_shape)]
    subprocess.run([runner, "conv", tmp_path / "in.bin", tmp_path / "out.bin", *dims], check=True)
    out = np.fromfile(tmp_path / "out.bin", np.float32).reshape(out_shape)
    assert_matches(out, reference(case, x, weight, bias), case, "x86 (Adams2019)")


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


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        # 2048 x 1024 x 1022 fits; padded to 1024 wide it is 2^31.
        ({"in_channels": 2048, "in_size": (1, 1024, 1022), "kernel": (1, 1, 3),
          "pads_begin": (0, 0, 1), "pads_end": (0, 0, 1)}, "the padded input's elements"),
        ({"out_channels": 2048, "in_size": (1, 1024, 1024)}, r"output of 2048 x \(1, 1024, 1024\)"),
        ({"stride": (1, 1, 2**31)}, r"past 2\^31 - 1 \(a value"),
    ],
)  # fmt: skip
def test_a_layer_past_halides_32_bit_indexing_is_refused(fields, message) -> None:
    """Halide indexes a buffer in 32 bits: past it the generator failed inside Halide or numpy.
    Each check (the padded input, the output, one value) refuses on the shapes alone; nothing
    is allocated."""
    data = {"name": "l", "in_channels": 1, "out_channels": 1, "in_size": (1, 1, 1),
            "kernel": (1, 1, 1), **fields}  # fmt: skip
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
