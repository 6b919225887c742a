"""The benchmark reports' arithmetic: ``bench/sparse_layers.py``'s ``main`` (its argument
parsing, ``run`` and ``report``) and ``bench/c3d_stack.py``'s summary and report, run on made-up
seconds. Nothing is timed (the timing is stubbed) and nothing is compiled: a stub build returns a
library that computes the conv with torch and the manifest's sparsity entry from the build's own
``layer_sparsity``, and the libraries are checked as in a real run. The plot is stubbed
(matplotlib is no test dependency; the script asks for it before any work).

The made-up seconds at kept fraction k: our sparse code 0.8 x (0.02 + k), torch 1.0 (NCDHW) and
0.8 (channels-last, the faster), our dense code 0.9; each peer's fastest of two passes. So the
line of sparse over torch's time in k has fixed part 0.02 and 1.0 per kept, 'of rate' is
k / (0.02 + k), and the sparse over dense line reaches 1 past kept 1."""

from __future__ import annotations

import collections
import itertools
import json
import os
import re
import statistics
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

# R(2+1)D-18's first block at a 16x112x112 clip, H and W divided by 8: 64 -> 144 channels on a
# 1x3x3 kernel (9 locations) and 144 -> 64 on 3x1x1 (3), 16x7x7 planes; 18x16 and 8x36 groups
# of 8x4 (288 each, no partial group), so each row's sparse fraction is its kept fraction.
SPATIAL = "r2plus1d_18:layer1.0.conv1.0.0"
TEMPORAL = "r2plus1d_18:layer1.0.conv1.0.3"
DENSE_MACS = {SPATIAL: 144 * 64 * 9 * 16 * 7 * 7, TEMPORAL: 64 * 144 * 3 * 16 * 7 * 7}
GROUPS = 288
KEPT = (1 / 2, 1 / 3, 1 / 4, 1 / 6)
FIXED, PER_KEPT, TORCH_BEST, TORCH_NCDHW, OUR_DENSE = 0.02, 1.0, 0.8, 1.0, 0.9
PEAK = 100e9  # the larger of the stubbed probe's two answers
BUILD_SECONDS, LIBRARY_BYTES = 0.5, 40 * 1024


def made_up_seconds(kept: float) -> dict[str, float]:
    return {
        "ours_sparse": TORCH_BEST * (FIXED + PER_KEPT * kept),
        "ours_dense": OUR_DENSE,
        "torch": TORCH_NCDHW,
        "torch_channels_last": TORCH_BEST,
    }


# Pass 1 slows our code, pass 2 torch: each peer's fastest pass is another pass.
PASS_FACTORS = (
    {"ours_sparse": 1.0, "ours_dense": 1.3, "torch": 1.0, "torch_channels_last": 1.2},
    {"ours_sparse": 1.1, "ours_dense": 1.0, "torch": 1.4, "torch_channels_last": 1.0},
)


class FakeLibrary:
    """A built conv: torch's conv3d on the weights it was built from (times ``error``)."""

    called: FakeLibrary | None = None  # the sparse library last run

    def __init__(self, layer: Any, weight: np.ndarray, kernel: str, kept: float, error: float):
        self.layer, self.weight, self.kernel, self.kept = layer, weight * error, kernel, kept

    def __call__(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        import torch

        spec = self.layer.spec
        result = torch.nn.functional.conv3d(
            torch.from_numpy(x).permute(0, 4, 1, 2, 3),
            torch.from_numpy(self.weight),
            torch.from_numpy(self.layer.bias),
            spec.stride,
            spec.pads_begin,
            spec.dilation,
        )
        out[...] = result.permute(0, 2, 3, 4, 1).numpy()
        if self.kernel == "sparse":
            FakeLibrary.called = self
        return out


def stub_build(dense_error: float = 1.0):
    """``Layer.build`` without a compile: the manifest's sparsity entry from the build's own
    ``layer_sparsity``, its schedule the ``--sparse-schedule`` it was given; our dense library
    computes with its weights times ``dense_error``."""

    def build(self, weight, scheme, group, kernel, tag, sparse_schedule=""):
        from rt3d_halide.onnx_import import ConvLayer, layer_sparsity

        conv = ConvLayer(self.spec, "conv", "w", weight, self.bias, "x", "y")
        declared = {"scheme": scheme, "group": list(group)}
        sparsity = layer_sparsity(conv, declared).describe()
        error = dense_error if kernel == "dense" else 1.0
        library = FakeLibrary(self, weight, kernel, sparsity["kept_fraction"], error)
        return {
            "fn": library,
            "build_seconds": BUILD_SECONDS,
            "library_bytes": LIBRARY_BYTES,
            "sparsity": sparsity,
            "schedules": {"x86": json.loads(sparse_schedule)} if sparse_schedule else {},
        }

    return build


def stub_time_interleaved():
    """Each peer run once (no timing), and answered with :func:`made_up_seconds` at the kept
    fraction of the sparse library run, times its pass's factors."""
    passes: dict[int, int] = {}

    def time_interleaved(peers, rounds, warmup=1):
        FakeLibrary.called = None
        for fn in peers.values():
            fn()
        library = FakeLibrary.called
        assert library is not None
        number = passes[id(library)] = passes.get(id(library), 0) + 1
        factors = PASS_FACTORS[number - 1]
        return {name: s * factors[name] for name, s in made_up_seconds(library.kept).items()}

    return time_interleaved


def run_sparse_layers(mp: pytest.MonkeyPatch, out: Path, *argv: str, dense_error: float = 1.0):
    """``sparse_layers.main`` with the stubs; (result JSON, report .md, plot paths)."""
    import torch

    mp.syspath_prepend(str(BENCH))
    import common
    import sparse_layers

    # run() and set_threads() set these for the run; they are restored after it.
    for name in ("RT3D_HALIDE_CACHE", "HL_NUM_THREADS", "OMP_NUM_THREADS"):
        mp.setenv(name, os.environ.get(name, "unset"))
    threads = torch.get_num_threads()
    peaks = iter([PEAK / 2, PEAK])
    plots: list[Path] = []
    mp.setattr(common, "measure_fma_peak", lambda threads, seconds=0.5: next(peaks))
    mp.setattr(common, "time_interleaved", stub_time_interleaved())
    mp.setattr(common, "require_matplotlib", lambda: None)
    mp.setattr(sparse_layers, "plot", lambda result, path: plots.append(path))
    mp.setattr(sparse_layers.Layer, "build", stub_build(dense_error))
    try:
        sparse_layers.main([*argv, "--rounds", "1", "--passes", "2", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.with_suffix(".json").read_text())
    return result, out.with_suffix(".md").read_text(), plots


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict[str, Any], str, list[Path], Path]:
    out = tmp_path_factory.mktemp("sparse_layers") / "run"
    with pytest.MonkeyPatch.context() as mp:
        result, md, plots = run_sparse_layers(
            mp,
            out,
            *("--layers", f"{SPATIAL},{TEMPORAL}", "--shrink", "8"),
            *("--patterns", "kgs_balanced,vanilla", "--kept", ",".join(map(repr, KEPT))),
        )
    return result, md, plots, out


def cell(value: Any) -> str:
    """How the report writes a number (bench/common.py's markdown_table)."""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def table_rows(md: str, first_header: str, columns: int) -> list[list[str]]:
    """The rows of the report's table whose header starts ``| first_header |``."""
    lines = md.splitlines()
    start = next(
        i
        for i, line in enumerate(lines)
        if line.startswith(f"| {first_header} |") and line.count("|") == columns + 1
    )
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_rows_follow_from_the_made_up_seconds(report) -> None:
    result, _, _, _ = report
    assert result["fma_peak_gflops"] == pytest.approx(PEAK / 1e9)  # the larger probe
    assert result["rows"]
    for row in result["rows"]:
        k, macs = row["kept_fraction"], DENSE_MACS[row["layer"]]
        sparse = TORCH_BEST * (FIXED + PER_KEPT * k)
        assert row["seconds"] == pytest.approx(made_up_seconds(k))  # each peer's fastest pass
        assert len(row["pass_seconds"]) == 2
        assert row["sparse_fraction"] == pytest.approx(k)
        assert row["flops_rate"] == pytest.approx(1 / k)
        assert row["speedup_vs_torch"] == pytest.approx(TORCH_BEST / sparse)
        assert row["speedup_vs_our_dense"] == pytest.approx(OUR_DENSE / sparse)
        assert row["fraction_of_rate_vs_torch"] == pytest.approx(k / (FIXED + PER_KEPT * k))
        assert row["sparse_gflops"] == pytest.approx(2 * k * macs / sparse / 1e9)
        assert row["torch_gflops"] == pytest.approx(2 * macs / TORCH_BEST / 1e9)
        assert row["fraction_of_fma_peak"] == pytest.approx(2 * k * macs / sparse / PEAK)
        assert row["torch_fraction_of_fma_peak"] == pytest.approx(2 * macs / TORCH_BEST / PEAK)
        assert row["build_seconds"] == BUILD_SECONDS
        assert row["library_bytes"] == LIBRARY_BYTES
        assert 0 <= row["relative_error"] < 1e-5


def test_each_layer_fits_the_made_up_line(report) -> None:
    result, _, _, _ = report
    assert [entry["layer"] for entry in result["layers"]] == [SPATIAL, TEMPORAL]
    for entry in result["layers"]:
        own = [r for r in result["rows"] if r["layer"] == entry["layer"]]
        assert entry["time_vs_torch_fixed"] == pytest.approx(FIXED, abs=1e-9)
        assert entry["time_vs_torch_per_kept"] == pytest.approx(PER_KEPT)
        # sparse / dense = 0.8 (0.02 + k) / 0.9 reaches 1 at k = 1.105: "> 1" in the report
        expected = (1 - TORCH_BEST * FIXED / OUR_DENSE) / (TORCH_BEST * PER_KEPT / OUR_DENSE)
        assert entry["break_even_kept_fraction"] == pytest.approx(expected)
        assert entry["dense_seconds"] == pytest.approx(OUR_DENSE)
        assert entry["unpruned_seconds"] == pytest.approx(made_up_seconds(1.0))
        assert entry["unpruned_sparse_vs_torch"] == pytest.approx(1 / (FIXED + PER_KEPT))
        for key in ("fraction_of_rate_vs_torch", "fraction_of_fma_peak"):
            median = statistics.median(r[key] for r in own)
            assert entry[f"median_{key}"] == pytest.approx(median)
        assert entry["dense_build_seconds"] == BUILD_SECONDS


def test_the_unpruned_point_sits_at_its_own_sparse_fraction(monkeypatch) -> None:
    """Where gM does not divide the filters the padded lanes are computed, and the unpruned
    layer's share of the dense MACs is past 1 (1.25 here): placed at 1, it bent the break-even
    line. Rows and the unpruned layer lie on sparse / dense = 0.2 + 0.6 x share."""
    monkeypatch.syspath_prepend(str(BENCH))
    import sparse_layers

    def point(share: float) -> dict[str, float]:
        return {"ours_sparse": 0.2 + 0.6 * share, "ours_dense": 1.0}

    rows = [{"sparse_fraction": s, "seconds": point(s)} for s in (0.25, 0.5)]
    unpruned = {"unpruned_sparse_fraction": 1.25, "unpruned_seconds": point(1.25)}
    assert sparse_layers.break_even(rows, unpruned) == pytest.approx((1 - 0.2) / 0.6)


def test_the_report_says_what_the_result_file_holds(report) -> None:
    result, md, plots, out = report
    assert plots == [out.with_suffix(".png")]
    # The arguments main() was given, not pytest's command line.
    command = "python bench/sparse_layers.py --layers " + f"{SPATIAL},{TEMPORAL} --shrink 8"
    assert result["command"].startswith(command) and f"--out {out}" in result["command"]
    assert f"Command: `{result['command']}`" in md
    keys = (
        "kept_fraction",
        "flops_rate",
        "speedup_vs_torch",
        "fraction_of_rate_vs_torch",
        "speedup_vs_our_dense",
        "sparse_gflops",
        "fraction_of_fma_peak",
        "torch_fraction_of_fma_peak",
        "build_seconds",
    )
    table = table_rows(md, "layer", 12)
    assert len(table) == len(result["rows"])
    for cells, row in zip(table, result["rows"], strict=True):
        expected = [row["layer"], row["pattern"], *(cell(row[k]) for k in keys)]
        assert cells == [*expected, str(LIBRARY_BYTES // 1024)]
    of_rate = sorted(
        k / (FIXED + PER_KEPT * k) for k in (r["kept_fraction"] for r in result["rows"])
    )
    reached = sum(f >= 0.9 for f in of_rate)
    assert (
        f"All {len(of_rate)} rows: a median {statistics.median(of_rate):.3g} of the rate "
        f"({of_rate[0]:.3g}-{of_rate[-1]:.3g}); {reached} reach the target 0.9."
    ) in md
    medians = table_rows(md, "layer", 8)
    for cells, entry in zip(medians, result["layers"], strict=True):
        assert cells[0] == entry["layer"]
        assert cells[1] == cell(entry["median_fraction_of_rate_vs_torch"])
        assert cells[2] == cell(1 / (FIXED + PER_KEPT))
        assert cells[6:] == [cell(FIXED), cell(PER_KEPT)]
    assert table_rows(md, "layer", 3) == [[SPATIAL, "> 1", "900"], [TEMPORAL, "> 1", "900"]]


def test_balanced_rows_that_repeat_a_kept_count_are_measured_once(report) -> None:
    """Balanced KGS keeps a whole number of a kernel's locations per group: on 9 locations a
    quarter and a sixth both keep 2, on 3 a third, a quarter and a sixth all keep 1."""
    result, _, _, _ = report
    balanced = {
        layer: [
            r["kept_fraction"]
            for r in result["rows"]
            if r["layer"] == layer and r["pattern"] == "kgs_balanced"
        ]
        for layer in (SPATIAL, TEMPORAL)
    }
    # (the manifest keeps 6 decimals)
    assert balanced[SPATIAL] == pytest.approx([4 / 9, 3 / 9, 2 / 9], abs=1e-6)
    assert balanced[TEMPORAL] == pytest.approx([2 / 3, 1 / 3], abs=1e-6)
    vanilla = [r["kept_fraction"] for r in result["rows"] if r["pattern"] == "vanilla"]
    assert vanilla == pytest.approx(list(KEPT) * 2, abs=1e-6)  # 144, 96, 72, 48 of 288 groups
    skipped = {e["layer"]: e["not_measured"] for e in result["layers"]}
    assert skipped[SPATIAL] == [
        {"pattern": "kgs_balanced", "target_kept": 1 / 6, "same_as_target_kept": 1 / 4}
    ]
    assert skipped[TEMPORAL] == [
        {"pattern": "kgs_balanced", "target_kept": k, "same_as_target_kept": 1 / 3}
        for k in (1 / 4, 1 / 6)
    ]


def test_the_report_names_the_kept_fractions_balanced_kgs_cannot_express(report) -> None:
    _, md, _, _ = report
    assert (
        f"- {SPATIAL}: balanced KGS keeps 1 to 9 of its 1x3x3 kernel's 9 locations in every "
        "group: 1/2 ran at 4/9 (0.444), 1/4 ran at 2/9 (0.222); 1/6 is not expressible: it "
        "rounds to 2/9 (0.222) too, measured once (the row of 1/4)."
    ) in md
    assert (
        f"- {TEMPORAL}: balanced KGS keeps 1, 2 or 3 of its 3x1x1 kernel's 3 locations in "
        "every group: 1/2 ran at 2/3 (0.667); 1/4 and 1/6 are not expressible: they round to "
        "1/3 (0.333) too, measured once (the row of 1/3)."
    ) in md


def test_vanilla_keeps_a_group_at_any_kept_fraction(tmp_path) -> None:
    """round(0.001 x 288 groups) is 0: an all-zero weight, and a FLOPs rate of the layer's
    dense MACs (65028096 on R(2+1)D's layer1 1x3x3 conv at a full clip)."""
    with pytest.MonkeyPatch.context() as mp:
        result, md, _ = run_sparse_layers(
            mp,
            tmp_path / "run",
            *("--layers", SPATIAL, "--shrink", "8", "--patterns", "vanilla"),
            *("--kept", "0.001,0.002"),
        )
    assert [r["kept_fraction"] for r in result["rows"]] == pytest.approx([1 / GROUPS], abs=1e-6)
    assert result["rows"][0]["flops_rate"] == pytest.approx(GROUPS, rel=1e-4)  # 6 decimals
    (entry,) = result["layers"]
    assert entry["not_measured"] == [
        {"pattern": "vanilla", "target_kept": 0.002, "same_as_target_kept": 0.001}
    ]
    assert f"- {SPATIAL}: vanilla at 0.002 keeps as many units as at 0.001: measured once." in md


@pytest.mark.parametrize("shape", [(144, 64, 1, 3, 3), (8, 4, 3, 1, 1), (20, 9, 3, 3, 3)])
@pytest.mark.parametrize("pattern", ["vanilla", "kgs_balanced", "kgs_unbalanced"])
def test_every_pattern_keeps_a_unit(monkeypatch, shape, pattern) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    from sparse_layers import pattern_units

    for kept in (1e-6, 0.01, 0.2):
        assert pattern_units(pattern, kept, shape, (8, 4), 0).sum() >= 1


def test_our_dense_library_is_checked_and_its_error_reported(report) -> None:
    result, _, _, _ = report
    for entry in result["layers"]:
        assert 0 <= entry["dense_relative_error"] < 1e-5


def test_our_dense_library_is_checked_before_it_is_timed(tmp_path) -> None:
    """A dense library 1 % off stops the run, as a wrong sparse one does."""
    with pytest.MonkeyPatch.context() as mp, pytest.raises(SystemExit) as stopped:
        run_sparse_layers(
            mp,
            tmp_path / "run",
            *("--layers", TEMPORAL, "--shrink", "8", "--patterns", "vanilla", "--kept", "0.5"),
            dense_error=1.01,
        )
    message = rf"{re.escape(TEMPORAL)}: relative error \S+ against float64 torch"
    assert re.match(message, str(stopped.value))
    assert not (tmp_path / "run.json").exists()


def test_a_build_that_leaves_its_output_unwritten_fails_its_check(monkeypatch, tmp_path) -> None:
    """Every build of a layer writes into one buffer: after a right build, one that writes
    nothing must not pass on the values the right one left there."""
    monkeypatch.syspath_prepend(str(BENCH))
    from sparse_layers import Layer, find_layers

    (entry,) = find_layers([TEMPORAL], (16, 112, 112), 8)
    layer = Layer(entry, 1, tmp_path)
    weight, _ = layer.pruned("vanilla", 0.5, (8, 4), 0)
    assert layer.check(FakeLibrary(layer, weight, "sparse", 0.5, 1.0), weight) < 1e-5
    with pytest.raises(SystemExit, match="relative error nan against float64 torch"):
        layer.check(lambda x, out: out, weight)


def test_paired_runs_build_every_layer_before_timing_any(monkeypatch, tmp_path) -> None:
    """A knob the second layer refuses ends schedule_ab before the first layer is timed (its
    timing would be thrown away)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import paired
    import schedule_ab
    import sparse_layers

    from rt3d_halide.errors import BuildError

    built: list[str] = []
    stub = stub_build()

    def build(self, weight, scheme, group, kernel, tag, sparse_schedule=""):
        if self.entry["label"] == TEMPORAL and sparse_schedule != "{}":
            raise BuildError("an interleaved input needs a 1x1 spatial kernel")
        built.append(self.entry["label"])
        library = stub(self, weight, scheme, group, kernel, tag, sparse_schedule)
        return {**library, "schedules": {"x86": {"task_rows": 2}}}

    def timed(*args):
        raise AssertionError("a layer was timed before every layer was built")

    monkeypatch.setattr(sparse_layers.Layer, "build", build)
    monkeypatch.setattr(paired, "paired_rounds", timed)
    argv = ["--layers", f"{SPATIAL},{TEMPORAL}", "--shrink", "8", "--rounds", "1"]
    argv += ["--variants", '{};{"task_rows": 2}', "--out", str(tmp_path / "ab")]
    with pytest.raises(SystemExit, match=f"error: {re.escape(TEMPORAL)}: an interleaved"):
        schedule_ab.main(argv)
    assert built == [SPATIAL, SPATIAL, TEMPORAL]
    assert not (tmp_path / "ab.json").exists()


def test_paired_reports_keep_every_round_so_their_ratios_can_be_recomputed(
    monkeypatch, tmp_path
) -> None:
    """The JSON holds each build's and torch's seconds per round: 'time / first' is the median
    of per-round ratios, which the medians alone do not give."""
    monkeypatch.syspath_prepend(str(BENCH))
    import common
    import schedule_ab
    import sparse_layers

    def samples(peers, rounds, warmup=1):
        assert rounds == 3
        for fn in peers.values():
            fn()
        made_up = ([1.0, 2.0, 4.0], [1.5, 1.0, 4.4], [3.0, 2.5, 2.0], [2.0, 3.5, 1.8])
        return dict(zip(peers, made_up, strict=True))

    monkeypatch.setattr(sparse_layers.Layer, "build", stub_build())
    monkeypatch.setattr(common, "interleaved_samples", samples)
    argv = ["--layers", SPATIAL, "--shrink", "8", "--rounds", "3"]
    argv += ["--variants", '{};{"task_rows": 2}', "--out", str(tmp_path / "ab")]
    schedule_ab.main(argv)
    (layer,) = json.loads((tmp_path / "ab.json").read_text())["layers"]
    first, second = (row["round_seconds"] for row in layer["rows"])
    assert (first, second) == ([1.0, 2.0, 4.0], [1.5, 1.0, 4.4])
    ratio = statistics.median(b / a for a, b in zip(first, second, strict=True))
    assert layer["rows"][1]["time_vs_first"] == pytest.approx(ratio) == 1.1
    assert statistics.median(second) / statistics.median(first) != pytest.approx(ratio)
    torch_rounds = layer["torch_round_seconds"]
    assert sorted(torch_rounds.values()) == [[2.0, 3.5, 1.8], [3.0, 2.5, 2.0]]
    assert layer["torch_seconds"] == min(map(statistics.median, torch_rounds.values())) == 2.0


def test_paired_runs_both_ways_take_the_geometric_mean_of_the_two_orders(
    monkeypatch, tmp_path
) -> None:
    """--both-ways builds the variants again in reversed order, so that each sits as early as
    the other on average (a later build tends to read faster), and reports the geometric mean
    of each order's ratio against the first variant."""
    monkeypatch.syspath_prepend(str(BENCH))
    import common
    import schedule_ab
    import sparse_layers

    built: list[str] = []
    stub = stub_build()

    def build(self, weight, scheme, group, kernel, tag, sparse_schedule=""):
        built.append(sparse_schedule)
        return stub(self, weight, scheme, group, kernel, tag, sparse_schedule)

    def samples(peers, rounds, warmup=1):
        for fn in peers.values():
            fn()
        made_up = {
            "{}": [1.0, 1.0, 1.0],
            '{"task_rows": 2}': [0.9, 0.8, 0.85],
            '{"task_rows": 2} (reversed)': [1.0, 1.1, 1.0],
            "{} (reversed)": [1.0, 1.0, 1.0],
        }
        assert list(peers)[:4] == list(made_up)
        return {**made_up, "torch": [2.0] * 3, "torch_channels_last": [1.5] * 3}

    monkeypatch.setattr(sparse_layers.Layer, "build", build)
    monkeypatch.setattr(common, "interleaved_samples", samples)
    argv = ["--layers", SPATIAL, "--shrink", "8", "--rounds", "3", "--both-ways"]
    argv += ["--variants", '{};{"task_rows": 2}', "--out", str(tmp_path / "ab")]
    schedule_ab.main(argv)
    assert built == ["{}", '{"task_rows": 2}', '{"task_rows": 2}', "{}"]
    result = json.loads((tmp_path / "ab.json").read_text())
    assert result["both_ways"] is True
    (layer,) = result["layers"]
    first, second = layer["rows"]
    assert second["time_vs_first_each_way"] == pytest.approx([0.85, 1.0])
    assert second["time_vs_first"] == pytest.approx((0.85 * 1.0) ** 0.5)
    assert first["time_vs_first"] == pytest.approx(1.0)
    assert second["seconds"] == pytest.approx(statistics.median([0.9, 0.8, 0.85, 1.0, 1.1, 1.0]))
    assert (
        "in the given order and again reversed by `--both-ways`" in (tmp_path / "ab.md").read_text()
    )


def test_opencl_prepare_plans_every_layers_rows(monkeypatch, tmp_path) -> None:
    """plan.json holds one row per built function, of every layer (the layer loop's pattern
    rows once shadowed the plan's, which then failed to be written as JSON)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import opencl_gpu

    built: list[str] = []

    def build(spec, weight, bias, scheme, group, kernel, knobs, tag, work):
        (work / tag).mkdir()
        built.append(tag)
        sparsity = {"kept_fraction": 1.0, "sparse_fraction": 1.0, "dense_macs_per_sample": 1}
        return {
            "dir": work / tag,
            "function": f"{tag}_conv",
            "sparsity": sparsity,
            "schedule": {},
            "seconds": 0.0,
            "library_bytes": 0,
        }

    monkeypatch.setattr(opencl_gpu, "_build", build)
    monkeypatch.setattr(opencl_gpu, "_link_timer", lambda builds, work: work / "timer")
    monkeypatch.setattr(opencl_gpu, "_compress", lambda path, to: to.write_bytes(b""))
    bundle = tmp_path / "bundle"
    layers = ["--layers", f"{SPATIAL},{TEMPORAL}", "--shrink", "8"]
    rows = ["--patterns", "kgs_balanced,vanilla", "--kept", "0.5,0.25"]
    opencl_gpu.main(["prepare", "--bundle", str(bundle), *layers, *rows])
    plan = json.loads((bundle / "plan.json").read_text())
    assert [row["function"] for row in plan["rows"]] == [f"{tag}_conv" for tag in built]
    assert {row["layer_index"] for row in plan["rows"]} == {0, 1}


def test_opencl_report_of_a_layer_whose_dense_row_was_wrong(monkeypatch, tmp_path) -> None:
    """measure moves a wrong row to wrong_rows; the report shows '-' where that layer's rows
    would be compared with it, and the other layer as usual."""
    monkeypatch.syspath_prepend(str(BENCH))
    import opencl_gpu

    def row(index: int, pattern: str, kept: float, seconds: float) -> dict[str, Any]:
        sparsity = {"kept_fraction": kept, "sparse_fraction": kept, "dense_macs_per_sample": 1e9}
        function = f"l{index}_{pattern}_{kept}"
        return {"layer_index": index, "layer": f"layer{index}", "pattern": pattern, "knobs": ""} | {
            "function": function,
            "sparsity": sparsity,
            "seconds": seconds,
        }

    shapes = {"input_shape": [1, 4, 8, 8, 16], "output_shape": [1, 4, 8, 8, 32]}
    layers = [
        {"layer": f"layer{i}", "kernel": [3, 3, 3], "torch_fp32_seconds": 0.01, **shapes}
        for i in range(2)
    ]
    measured = {"command": "measure", "date": "today", "gpu": "g", "driver": "d", "rounds": 1}
    result = {
        "command": "prepare",
        "date": "today",
        "target": "host-opencl",
        "clip": [16, 112, 112],
        "shrink": 4,
        "group": [8, 4],
        "measured": measured | {"torch": "t", "torch_device": "cuda", "cudnn": 1},
        "layers": layers,
        "rows": [
            row(0, "kgs_balanced", 0.5, 0.004),
            row(1, "dense", 1.0, 0.008),
            row(1, "vanilla", 0.5, 0.005),
            row(1, "vanilla", 0.25, 0.003),
        ],
        "wrong_rows": [row(0, "dense", 1.0, 0.01)],
    }
    path = tmp_path / "measured.json"
    path.write_text(json.dumps(result))
    opencl_gpu.main(["report", str(path), "--out", str(tmp_path / "r")])
    md = (tmp_path / "r.md").read_text()
    assert "clip [16, 112, 112] (H and W divided by 4), group [8, 4]." in md
    assert "| layer0 | - | 10 | nan | - | - |" in md
    assert "| layer1 | 8 | 10 | nan | 0.8 | 0.733 |" in md  # median of 1.6 / 2 and 2.67 / 4
    assert "| layer0 | kgs_balanced | 0.5 | 2 | 4 | - | - | 2.5 | 250 |" in md
    assert "| layer1 | vanilla | 0.25 | 4 | 3 | 2.67 | 0.667 | 3.33 | 167 |" in md
    assert "| layer1 | 3x3x3 | 16 | 8x8 | 8 | > 0.5 |" in md and "| layer0 | 3x3x3" not in md
    assert "Wrong output, not reported above: l0_dense_1.0." in md


# c3d_stack: three convs, the first unpruned; torch's best GFLOP/s on conv2 (100), conv3 at
# 80 (within 75 % of it), conv1 at 20.
STACK = [
    # name, kernel, kept, dense GMACs, ours s, torch NCDHW s, torch channels-last s
    ("conv1", "dense", 1.0, 0.5, 0.040, 0.050, 0.060),
    ("conv2", "sparse", 0.25, 2.0, 0.010, 0.040, 0.050),
    ("conv3", "sparse", 0.5, 1.0, 0.020, 0.030, 0.025),
]


def stack_rows(c3d_stack) -> list[dict[str, Any]]:
    rows = []
    for name, kernel, kept, gmacs, ours, ncdhw, channels_last in STACK:
        schedule = {"input_layout": "ndhwc", "padding": "copy"} if kernel == "sparse" else {}
        sparsity = {"kept_fraction": kept} if kernel == "sparse" else {}
        fn = types.SimpleNamespace(
            entry={"kernel": kernel, "schedules": {"s": schedule}, "sparsity": sparsity}
        )
        layer = {
            "entry": {"name": name},
            "fn": fn,
            "spec": types.SimpleNamespace(macs=lambda gmacs=gmacs: gmacs * 1e9),
            "error": 1e-7,
        }
        times = {"ours": ours, "torch": ncdhw, "torch_channels_last": channels_last}
        rows.append(c3d_stack.layer_row(layer, times))
    return rows


def test_c3d_stack_summary_and_report(monkeypatch, tmp_path) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    import c3d_stack

    rows = stack_rows(c3d_stack)
    assert [r["torch_dense_ms"] for r in rows] == pytest.approx([50, 40, 25])
    assert [r["speedup_vs_torch_dense"] for r in rows] == pytest.approx([1.25, 4, 1.25])
    summary = c3d_stack.stack_summary(rows)
    assert [r["torch_gflops"] for r in rows] == pytest.approx([20, 100, 80])
    assert summary["flops_rate"] == pytest.approx(3.5 / (0.5 + 0.5 + 0.5))
    assert summary["ours_ms"] == pytest.approx(70)
    assert summary["torch_dense_ms"] == pytest.approx(115)
    assert summary["speedup_vs_torch_dense"] == pytest.approx(115 / 70)
    assert summary["fraction_of_rate"] == pytest.approx(115 / 70 / (3.5 / 1.5))
    assert summary["pruned_layers_speedup"] == pytest.approx(65 / 30)
    assert summary["torch_near_best_layers"] == ["conv2", "conv3"]
    assert summary["torch_near_best_speedup"] == pytest.approx(65 / 30)
    assert summary["torch_near_best_flops_rate"] == pytest.approx(3.0 / 1.0)
    assert summary["torch_near_best_fraction_of_rate"] == pytest.approx(65 / 30 / 3.0)

    result = {
        "command": "python bench/c3d_stack.py",
        "date": "2000-01-01",
        "commit": "0000000",
        "machine": {"cpu": "a CPU", "threads_used": 2},
        "pruning_report": "the pruner's table",
        "rounds": 3,
        "passes": 2,
        "layers": rows,
        "summary": summary,
    }
    c3d_stack.report(result, tmp_path / "stack")
    written = json.loads((tmp_path / "stack.json").read_text())
    assert written["summary"] == summary and written["layers"] == rows
    md = (tmp_path / "stack.md").read_text()
    table = table_rows(md, "layer", 10)
    assert table == [
        [r["layer"], r["kernel"], r["input_layout"], r["padding"]]
        + [cell(r[k]) for k in ("kept_fraction", "dense_gmacs", "ours_ms", "torch_dense_ms")]
        + [cell(r["torch_gflops"]), cell(r["speedup_vs_torch_dense"])]
        for r in rows
    ]
    assert table[0][:4] == ["conv1", "dense", "-", "-"]
    assert (
        "Stack: FLOPs rate 2.33x; ours 70 ms vs torch dense 115 ms = **1.64x** (70 % of the "
        "FLOPs rate). The pruned layers alone (all but the unpruned conv1): 2.17x. On the convs "
        "torch runs at 75% or more of its best GFLOP/s here (conv2, conv3): 2.17x, 72% of their "
        "3.00x FLOPs rate."
    ) in md
    assert "the fastest of 2 passes' medians of 3 interleaved rounds" in md
    assert "a CPU, 2 threads" in md


def test_c3d_stack_input_follows_the_seed(monkeypatch, tmp_path) -> None:
    """``--seed`` says it seeds the weights and the input: the input was default_rng(0) always
    (the committed runs, at the default seed 0, keep their input)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import c3d_stack
    import common

    import rt3d_halide

    entry = {
        "name": "conv5b",
        "in_channels": 4,
        "out_channels": 8,
        "in_size": (2, 3, 3),
        "kernel": (3, 3, 3),
        "stride": (1, 1, 1),
        "dilation": (1, 1, 1),
        "pads": (1, 1, 1),
        "bias": True,
    }
    weight = np.random.default_rng(5).standard_normal((8, 4, 3, 3, 3)).astype(np.float32)
    bias = np.zeros(8, np.float32)
    spec = common.to_spec(entry, "conv")

    def fake_build(spec, weight, bias, work, tag, **options):
        return {"dir": work, "function": {}}

    def fake_load(path):
        layer = types.SimpleNamespace(spec=spec, bias=bias)
        return {"conv": FakeLibrary(layer, weight, "dense", 1.0, 1.0)}

    monkeypatch.setattr(common, "build_conv_layer", fake_build)
    monkeypatch.setattr(rt3d_halide, "load", fake_load)
    inputs = {s: c3d_stack.build_layer(entry, weight, bias, tmp_path, s)["x"] for s in (0, 1)}
    shape = spec.input_shape()
    for seed, x in inputs.items():
        expected = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        assert np.array_equal(x, expected)


def test_kernel_profile_counts_the_fmas_the_entry_loop_runs(monkeypatch) -> None:
    """Every lane of a group's kept entries, four channels per quad, and no tap on the temporal
    padding where the code skips it (C3D conv4b: 4 frames, padding 1)."""
    monkeypatch.syspath_prepend(str(BENCH))
    from common import to_spec
    from kernel_profile import executed_macs
    from sparse_layers import find_layers

    (entry,) = find_layers(["c3d:conv4b"], (16, 112, 112), 8)
    spec = to_spec(entry, "conv")
    dense = spec.macs()
    planar = {"input_layout": "planar", "skip_frame_padding": True}
    weight = np.ones(spec.weight_shape)
    assert executed_macs(weight, spec, planar, (8, 4)) == dense * 10 / 12
    assert executed_macs(weight, spec, {**planar, "skip_frame_padding": False}, (8, 4)) == dense
    weight[:, :, 0] = 0  # the first kernel frame pruned: 4 + 3 of 12 frame taps left
    weight[:4] = 0  # half of the first group's filters: its lanes still run
    assert executed_macs(weight, spec, planar, (8, 4)) == dense * 7 / 12
    one = np.zeros(spec.weight_shape)
    one[0, 1, 1, 1, 1] = 1  # a quad of 4 channels x 8 lanes at the middle frame, every frame
    positions = spec.out_size[0] * spec.out_size[1] * spec.out_size[2]
    for layout in ("interleaved", "interleaved_copy"):
        schedule = {"input_layout": layout, "skip_frame_padding": True}
        assert executed_macs(one, spec, schedule, (8, 4)) == 4 * 8 * positions


@pytest.mark.parametrize("layout", ["planar", "interleaved"])
def test_kernel_profile_counts_what_the_baked_plans_run(monkeypatch, layout) -> None:
    """Against the generator's own quad plan and frame taps, on a temporal kernel with stride,
    dilation and padding, 10 input channels (the last quad overlaps the one before), 12
    filters (a partial group) and 8x2 units with pruned weights inside kept ones."""
    monkeypatch.syspath_prepend(str(BENCH))
    from kernel_profile import executed_macs
    from rt3d_halide.generators.baking import frame_taps_inside, kept_entries
    from rt3d_halide.generators.conv3d_quads import plan_quads
    from rt3d_halide.generators.spec import Conv3dSpec

    spec = Conv3dSpec("t", 10, 12, (9, 3, 4), (3, 1, 1), (2, 1, 1), (2, 1, 1), (2, 0, 0), (1, 0, 0))
    group = (8, 2)
    weight = np.random.default_rng(0).standard_normal(spec.weight_shape).astype(np.float32)
    weight *= np.random.default_rng(1).random(spec.weight_shape) < 0.3  # zeros inside units
    frames = frame_taps_inside(spec).sum(axis=0)  # per kernel frame, the output frames it runs
    positions = spec.out_size[1] * spec.out_size[2]
    schedule = {"input_layout": layout, "skip_frame_padding": True}
    if layout == "interleaved":
        taps = plan_quads(weight, group).taps  # (first channel, kd, kh, kw) per quad
        expected = 8 * 4 * frames[taps[:, 1]].sum() * positions
    else:
        kept = kept_entries(weight, group)
        expected = 8 * (kept.sum(axis=(0, 1, 3, 4)) @ frames) * positions
        nonzero = np.stack([(weight[p : p + 8] != 0).any(axis=0) for p in (0, 8)])
        assert (kept & ~nonzero).any()  # entries the lists run whose group's weights are all 0
    assert executed_macs(weight, spec, schedule, group) == expected
    unskipped = {"input_layout": "planar", "skip_frame_padding": False}
    if layout == "planar":
        every_frame = 8 * kept_entries(weight, group).sum() * spec.out_size[0] * positions
        assert executed_macs(weight, spec, unskipped, group) == every_frame


@pytest.mark.parametrize("count", [2, 3, 4, 5, 6, 9])
def test_interleaved_calls_balance_which_peer_follows_which(monkeypatch, count: int) -> None:
    """Over a whole cycle of rounds every peer's timed call follows every other peer's call
    equally often, the joins between rounds and the warm-up included: in a fixed order, or one
    shifted a peer further each round, the first build ran right after torch's convs every
    round, and identical builds paired that way timed the later ones 1-6 % faster."""
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    monkeypatch.setattr(common, "SETTLE_SECONDS", 0.0)
    calls: list[str] = []
    names = "abcdefghi"[:count]
    peers = {name: (lambda name=name: calls.append(name)) for name in names}
    cycle = max(count - 1, 1)
    samples = common.interleaved_samples(peers, rounds=2 * cycle, warmup=1)
    assert {name: len(times) for name, times in samples.items()} == dict.fromkeys(names, 2 * cycle)
    warmup, timed = calls[:count], calls[count + 1 :: 2]  # each timed call follows one settling
    rounds = ["".join(timed[i : i + count]) for i in range(0, len(timed), count)]
    assert sorted(warmup) == list(names) and all(sorted(r) == list(names) for r in rounds)
    assert rounds[:cycle] == rounds[cycle:]
    before = [warmup[-1], *timed]  # what ran just before each timed call (and its settling)
    follows = collections.Counter(itertools.pairwise(before[: cycle * count + 1]))
    assert follows == {(a, b): 1 for a in names for b in names if a != b}


@pytest.mark.parametrize("count", [3, 4, 5, 6, 7])
def test_the_williams_fallback_balances_followers_within_rounds(monkeypatch, count) -> None:
    """Past the search's budget the rounds fall back to a Williams design."""
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    monkeypatch.setattr(common, "BALANCED_CYCLE_STEPS", 0)
    rows = common.balanced_orders(count)
    assert rows == common.williams_orders(count)
    assert all(sorted(row) == list(range(count)) for row in rows)
    follows = collections.Counter(pair for row in rows for pair in itertools.pairwise(row))
    times = 2 if count % 2 else 1
    assert follows == {(a, b): times for a in range(count) for b in range(count) if a != b}


def test_torchs_channels_last_peer_holds_its_weight_channels_last(monkeypatch) -> None:
    """Given the NCDHW weight, every channels-last call copied it first (C3D conv4b alone: 38-43
    against 28 ms on the Intel Xeon), a cost a model converted to channels_last_3d never pays."""
    monkeypatch.syspath_prepend(str(BENCH))
    import common
    import torch
    from rt3d_halide.generators.spec import Conv3dSpec

    spec = Conv3dSpec("t", 4, 8, (3, 5, 5), (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 1, 1))
    weights: dict[str, Any] = {}
    conv3d = torch.nn.functional.conv3d

    def recording(inp, weight, *args):
        layout = "cl" if inp.is_contiguous(memory_format=torch.channels_last_3d) else "ncdhw"
        weights[layout] = weight
        return conv3d(inp, weight, *args)

    monkeypatch.setattr(torch.nn.functional, "conv3d", recording)
    x = np.random.default_rng(0).standard_normal((1, 3, 5, 5, 4), dtype=np.float32)
    weight = np.random.default_rng(1).standard_normal(spec.weight_shape, dtype=np.float32)
    for run in common.torch_conv_peers(x, weight, None, spec).values():
        run()
    assert weights["ncdhw"].is_contiguous()
    assert weights["cl"].is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(weights["cl"], weights["ncdhw"])
