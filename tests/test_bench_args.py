"""The benchmark scripts' command lines: a wrong argument ends the script with argparse's one
line (exit 2) before any build or timing, since a bad ``--out`` found after a run throws the run
away. The scripts themselves are timed by hand, not here (no timing in tests)."""

from __future__ import annotations

import subprocess
import sys
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
    assert_refused(proc, "a positive number of seconds")


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
