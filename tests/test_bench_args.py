"""The benchmark scripts' command lines: a wrong argument ends the script with argparse's one
line (exit 2) before any build or timing, since a bad ``--out`` found after a run throws the run
away. The scripts themselves are timed by hand, not here (no timing in tests)."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_refused(proc: subprocess.CompletedProcess, message: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr.splitlines()[-1]


@pytest.mark.parametrize(
    ("script", "out", "written"),
    [
        ("kernel_profile.py", "report.md", "report.md"),
        ("sparse_layers.py", "run", "run.png"),
        ("schedule_ab.py", "run", "run.json"),
    ],
)
def test_out_naming_a_directory_is_refused(tmp_path, script, out, written) -> None:
    (tmp_path / written).mkdir()
    extra = ["--variants", '{};{"task_rows": 2}'] if script == "schedule_ab.py" else []
    proc = run_bench(script, *extra, "--out", str(tmp_path / out))
    assert_refused(proc, f"{tmp_path / written} is a directory, not a report file")


def test_out_folder_that_cannot_be_made_is_refused(tmp_path) -> None:
    (tmp_path / "file").write_text("")
    proc = run_bench("group_shapes.py", "--out", str(tmp_path / "file" / "run"))
    assert_refused(proc, f"cannot write to {tmp_path / 'file'}")


def test_out_that_is_a_read_only_report_is_refused(tmp_path, monkeypatch) -> None:
    """Root writes read-only files (as CI runs): the permission check is made to say no."""
    import argparse

    monkeypatch.syspath_prepend(str(BENCH))
    import common

    (tmp_path / "run.md").write_text("")
    monkeypatch.setattr(common.os, "access", lambda path, mode: Path(path).suffix != ".md")
    with pytest.raises(argparse.ArgumentTypeError, match=r"run\.md: not writable"):
        common.writable_report((".json", ".md"))(str(tmp_path / "run"))
    common.writable_report((".json",))(str(tmp_path / "run"))


def test_out_stem_with_a_suffix_of_its_own_is_refused(tmp_path, monkeypatch) -> None:
    """with_suffix would replace '.167' and write ab_0.json: another run's, or a committed,
    report. One of the files written, named whole, stands for its stem."""
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    assert common.writable_report((".json", ".md"))(str(tmp_path / "run.md")) == tmp_path / "run"
    out = str(tmp_path / "ab_0.167")
    proc = run_bench("schedule_ab.py", "--variants", '{};{"task_rows": 2}', "--out", out)
    assert_refused(proc, "is a stem, and its '.167' would be replaced")
    assert "ab_0.json, ab_0.md" in proc.stderr
    proc = run_bench("kernel_profile.py", "--layers", "nosuch:conv", "--out", out)
    assert "would be replaced" not in proc.stderr  # a file name, not a stem: any suffix


@pytest.mark.parametrize("out", [".", "", "..", "results/"])
def test_out_naming_a_folder_is_refused(out) -> None:
    assert_refused(run_bench("group_shapes.py", "--out", out), "names a folder, not a report file")


def test_temporal_quads_takes_known_models_and_runnable_targets() -> None:
    import halide as hl

    foreign = "x86-64-linux" if hl.get_host_target().arch == hl.TargetArch.ARM else "arm-64-linux"
    assert_refused(run_bench("temporal_quads.py", "--model", "nosuch"), "invalid choice: 'nosuch'")
    assert_refused(
        run_bench("temporal_quads.py", "--target", foreign),
        f"'{foreign}' does not run on this machine",
    )
    assert_refused(
        run_bench("temporal_quads.py", "--target", "x86-64-linux-nosuch"),
        "unknown Halide target 'x86-64-linux-nosuch'",
    )
    assert_refused(
        run_bench("temporal_quads.py", "--target", "host-opencl"),
        "'host-opencl' has a GPU feature: the in-place quads are CPU code",
    )


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("x86-64-linux-arm_dot_prod", "is incompatible with the Target's architecture"),
        ("x86-64-linux-avx512", "plain 'avx512' crashes Halide 21's LLVM"),
        ("host,host", "target 'host' is listed twice"),
        ("x86-64-linux-sse41,x86-64-linux", "name one target, not a list"),
    ],
)
def test_bench_targets_take_the_builds_checks(target, message) -> None:
    """What the build refuses with one line, a benchmark's --target refuses too, before any
    build: another architecture's feature and plain avx512 ended in a traceback (Halide's own
    error, or the build's, raised mid-run), and a target list was called unknown."""
    assert_refused(run_bench("temporal_quads.py", "--target", target), message)


def test_a_bench_target_comes_back_as_the_build_reads_it(monkeypatch) -> None:
    """parse_target strips the spaces around a target, hl.Target does not: " host" passed the
    check and then failed in Halide's parser, a traceback."""
    monkeypatch.syspath_prepend(str(BENCH))
    from common import runnable_target

    assert runnable_target(" host ") == "host"


def test_conv_layers_checks_the_beam_and_traces_only_the_models_named(monkeypatch) -> None:
    """A clip C3D's classifier cannot take still fits R(2+1)D-18's layers."""
    monkeypatch.syspath_prepend(str(BENCH))
    from conv_layers import layer_list

    assert_refused(
        run_bench("conv_layers.py", "--adams-beam", "0"),
        "argument --adams-beam: needs a positive integer, not '0'",
    )
    layers = layer_list((8, 32, 32), ("r2plus1d_18",))
    assert {entry["model"] for entry in layers} == {"r2plus1d_18"}
    with pytest.raises(SystemExit, match=r"--clip 8,32,32 does not fit c3d"):
        layer_list((8, 32, 32))


TYPO = "error: no layer 'c3d.conv3x'"


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--adams-layers", "c3d.conv3x"], TYPO),
        (["--layers", "c3d.conv3a", "--adams-layers", "c3d.conv3x"], TYPO),
        # A clip C3D cannot take: its default Adams layer, not run, is not traced either.
        (["--clip", "8,32,32", "--layers", "r2plus1d_18.layer1.0.conv1.0.0"], "timing"),
    ],
)
def test_conv_layers_refuses_an_unknown_adams_layer(monkeypatch, capsys, argv, said) -> None:
    """A typo among the Adams layers is refused before any timing (argparse's line, exit 2),
    with --layers or without; the default Adams layer of a model --layers leaves out is not
    checked (nor traced)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import common
    import conv_layers

    def timing(threads, seconds=0.5):
        raise SystemExit("timing")

    monkeypatch.setattr(common, "measure_fma_peak", timing)
    monkeypatch.setattr(common, "require_matplotlib", lambda: None)
    with pytest.raises(SystemExit) as stopped:
        conv_layers.main(argv)
    if said == "timing":
        assert stopped.value.code == "timing"
    else:
        assert stopped.value.code == 2 and said in capsys.readouterr().err


@pytest.mark.parametrize(
    ("script", "argv", "said"),
    [
        (
            "schedule_ab.py",
            ["--variants", '{};{"x_vectors": 2}', "--layers", "c3d:nope"],
            "c3d:nope: no such conv",
        ),
        ("group_shapes.py", ["--layers", "c3d:nope"], "c3d:nope: no such conv"),
        ("kernel_profile.py", ["--layers", "c3d:nope"], "c3d:nope: no such conv"),
        ("kernel_profile.py", ["--seconds", "inf"], "needs a positive, finite number"),
        ("c3d_stack.py", ["--seed", "-1"], "--seed: needs a non-negative integer, not '-1'"),
        ("temporal_quads.py", ["--model", "c3d"], "c3d has no temporal-only Kx1x1 conv"),
        ("conv_layers.py", ["--clip", "1,1,1"], "--clip 1,1,1 does not fit"),
    ],
)
def test_a_bad_argument_found_after_parsing_is_argparses_line_too(script, argv, said) -> None:
    """These ended in exit status 1 (an unknown layer after kernel_profile's peak probe, a
    negative seed as a traceback after the pruning), where the scripts promise argparse's."""
    assert_refused(run_bench(script, *argv), said)


def test_conv_layers_checks_every_peer_it_times(monkeypatch) -> None:
    """onnxruntime's and Adams2019's outputs are checked as ours is (torch is the reference);
    an unwritten output fails."""
    import numpy as np
    import torch

    monkeypatch.syspath_prepend(str(BENCH))
    from common import to_spec
    from conv_layers import LayerPeers, layer_list

    entry = layer_list((8, 32, 32), ("r2plus1d_18",))[-1]
    peers = object.__new__(LayerPeers)
    peers.spec = spec = to_spec(entry, "conv")
    rng = np.random.default_rng(0)
    peers.weight = rng.standard_normal(spec.weight_shape).astype(np.float32)
    peers.bias = None
    peers.x = rng.standard_normal(spec.input_shape()).astype(np.float32)
    peers.x_ort = peers.x.transpose(0, 4, 1, 2, 3)
    right = torch.nn.functional.conv3d(
        torch.from_numpy(peers.x_ort), torch.from_numpy(peers.weight), None, spec.stride,
        spec.pads_begin, spec.dilation,
    ).numpy()  # fmt: skip
    peers.out = np.empty(spec.output_shape(), np.float32)
    peers.adams_out = np.empty(spec.output_shape(), np.float32)

    def ours(x, out):
        out[...] = right.transpose(0, 2, 3, 4, 1)

    def adams():
        peers.adams_out[...] = right.transpose(0, 2, 3, 4, 1)

    peers.ours, peers.adams = ours, adams
    peers.ort = types.SimpleNamespace(run=lambda names, feeds: [right])
    assert peers.check("layer") < 1e-5
    peers.ort = types.SimpleNamespace(run=lambda names, feeds: [right * 1.01])
    with pytest.raises(SystemExit, match=r"layer \(onnxruntime\): relative error 0\.01"):
        peers.check("layer")
    peers.ort = types.SimpleNamespace(run=lambda names, feeds: [right])
    peers.adams = lambda: None  # writes nothing: the last call's right output must not pass
    with pytest.raises(SystemExit, match=r"layer \(Adams2019\): relative error nan"):
        peers.check("layer")


def test_cpu_only_scripts_refuse_a_cpu_they_cannot_read(monkeypatch) -> None:
    """inner_loop_ceiling's binaries would die of an illegal instruction, kernel_profile would
    count every sample as 'other'."""
    import halide as hl

    monkeypatch.syspath_prepend(str(BENCH))
    import inner_loop_ceiling
    import kernel_profile

    avx2 = hl.Target("x86-64-linux-avx-avx2-f16c-fma-sse41")
    monkeypatch.setattr(hl, "get_host_target", lambda: avx2)
    assert inner_loop_ceiling.missing_isa_features("avx2") == []
    assert inner_loop_ceiling.missing_isa_features("avx512") == ["AVX512"]
    with pytest.raises(SystemExit, match="--isa avx512 needs AVX512, which this CPU lacks"):
        inner_loop_ceiling.main(["--isa", "avx512"])
    monkeypatch.setattr(hl, "get_host_target", lambda: hl.Target("arm-64-linux"))
    assert inner_loop_ceiling.missing_isa_features("avx2") == ["an x86 CPU"]
    monkeypatch.setattr(kernel_profile.shutil, "which", lambda name: "/usr/bin/perf")
    monkeypatch.setattr(kernel_profile.platform, "machine", lambda: "aarch64")
    with pytest.raises(SystemExit, match="this profile reads x86 code; this host is aarch64"):
        kernel_profile.main(["--layers", "c3d:conv2"])


def test_sparse_layers_takes_known_layers_and_a_shrink_they_survive() -> None:
    """Refused before the peak probe and the builds (a shrink that left C3D conv4b a 0x0
    plane failed in the build with a ValueError naming no layer)."""
    assert_refused(
        run_bench("sparse_layers.py", "--layers", "c3d:conv4b", "--shrink", "16"),
        "c3d:conv4b: --shrink 16 leaves its 14x14 input plane 0x0, too small for its 3x3x3 "
        "kernel (it takes --shrink 14 at most)",
    )
    assert_refused(run_bench("sparse_layers.py", "--layers", "c3d:nosuch"), "c3d:nosuch: no such")


def test_kernel_profile_takes_known_patterns() -> None:
    assert_refused(run_bench("kernel_profile.py", "--pattern", "kgs"), "invalid choice: 'kgs'")


def test_opencl_measure_checks_its_bundle_and_numbers(tmp_path) -> None:
    json_out = str(tmp_path / "m.json")
    proc = run_bench("opencl_gpu.py", "measure", "--bundle", str(tmp_path), "--json", json_out)
    assert_refused(proc, "lacks plan.json and arrays.npz")
    (tmp_path / "plan.json").write_text("{}")
    (tmp_path / "arrays.npz").write_bytes(b"")
    proc = run_bench(
        "opencl_gpu.py", "measure", "--bundle", str(tmp_path), "--json", json_out,
        "--min-seconds", "-1",
    )  # fmt: skip
    assert_refused(proc, "a positive, finite number of seconds")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "cannot read"),
        ("not json", "is not JSON"),
        ('{"rows": []}', "has no rows and layers"),
    ],
)
def test_opencl_report_checks_what_measure_wrote(tmp_path, text, message) -> None:
    path = tmp_path / "measured.json"
    if text is not None:
        path.write_text(text)
    proc = run_bench("opencl_gpu.py", "report", str(path), "--out", str(tmp_path / "r"))
    assert_refused(proc, message)


def test_opencl_prepare_checks_variants_and_patterns(tmp_path) -> None:
    bundle = str(tmp_path / "b")
    assert_refused(
        run_bench("opencl_gpu.py", "prepare", "--bundle", bundle, "--variants", "{bad"),
        "argument --variants: not JSON",
    )
    assert_refused(
        run_bench("opencl_gpu.py", "prepare", "--bundle", bundle, "--variant-patterns", "foo"),
        "unknown pattern 'foo'",
    )


def test_conv_layers_takes_either_spelling_of_a_layer(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    from conv_layers import layer_label

    assert layer_label("c3d:conv2") == layer_label("c3d.conv2") == "c3d.conv2"
    assert layer_label("r2plus1d_18:layer1.0.conv1.0.0") == "r2plus1d_18.layer1.0.conv1.0.0"
    proc = run_bench("conv_layers.py", "--layers", "c3d:nosuch", "--no-memory")
    assert proc.returncode != 0 and "no layer 'c3d.nosuch'" in proc.stderr


def test_opencl_variants_give_sparse_rows_no_dense_lanes(monkeypatch) -> None:
    """The committed tiles and old-order variants set lanes, which sparse OpenCL code took and
    ignored (it runs the group's gM lanes) and now refuses: their sparse rows build without it."""
    monkeypatch.syspath_prepend(str(BENCH))
    import opencl_gpu

    assert opencl_gpu._sparse_knobs('{"lanes": 16, "x_per_thread": 4}') == '{"x_per_thread": 4}'


def test_a_report_with_a_plot_needs_matplotlib_before_it_times(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    with pytest.raises(SystemExit, match=r"needs matplotlib: pip install -e '\.\[bench\]'"):
        common.require_matplotlib()


def test_kernel_profile_reads_each_symbols_sample_count(monkeypatch) -> None:
    """perf report -n's lines (percent, samples, object, [.] or [k], symbol): the entry loop's
    speed is its samples' share of the process's CPU time, so the library's symbols and every
    sample of the process are counted."""
    monkeypatch.syspath_prepend(str(BENCH))
    import kernel_profile

    text = "\n".join(
        [
            "# Samples: 6K of event 'cpu-clock'",
            "    73.28%          4446  liblayer.so        [.] layer_conv_par_for_output_s0_task",
            "     6.63%           402  libother.so        [.] blas_thread_server",
            "     2.01%           122  liblayer.so        [.] layer_conv_par_for_flat_s0_frame",
            "     1.34%            81  [kernel.kallsyms]  [k] clear_page_erms",
            "     0.50%            30  liblayer.so        [.] layer_conv_par_for_output_s0_task",
        ]
    )
    commands = []

    def run(command, **_):
        commands.append(command)
        return types.SimpleNamespace(stdout=text)

    monkeypatch.setattr(kernel_profile.subprocess, "run", run)
    samples, every = kernel_profile.symbol_samples(Path("perf.data"), "liblayer.so")
    assert samples == {
        "layer_conv_par_for_output_s0_task": 4476,
        "layer_conv_par_for_flat_s0_frame": 122,
    }
    assert every == 4446 + 402 + 122 + 81 + 30
    assert "-n" in commands[0]  # the samples column the lines are read by
