"""Sparse Conv3d speed against the FLOPs pruning rate (issue 4, section 4).

For each layer, pattern (KGS balanced, KGS unbalanced, vanilla) and kept fraction, the layer is
pruned to that pattern, built with the real build (``--kernel sparse``) and timed interleaved
against our dense code (``--kernel dense``, built once per layer on the unpruned weights: its
time does not depend on them) and PyTorch's dense conv3d (oneDNN) on the same pruned weights and
input, in both of torch's layouts (NCDHW and channels_last_3d; "torch" is the faster).
Reported per row: FLOPs rate (dense MACs / kept MACs), speedup over torch and over our dense
code, achieved fraction of the rate (target >= 0.9), effective GFLOP/s and fraction of the
machine's FMA peak, torch's fraction of that peak, build time and library size. The fraction of
the rate is our GFLOP/s per useful FLOP over torch's dense GFLOP/s, so per layer the report also
gives the medians of both fractions of peak, what the target asks of ours (0.9 x torch's) and the
layer with nothing pruned on the sparse kernel against torch, and a line through each row's time
over torch's in the kept fraction (:func:`time_line`): the fixed part that pruning does not
shrink, and the part per kept entry.
Per layer, the kept fraction at which sparse code stops beating our dense code (the break-even of
``rt3d_halide.kernel_choice``'s dense-fallback rule) is fitted from each row's sparse over dense
time and the unpruned layer's. Every library is built and checked first; then ``--passes`` passes
time all rows, each row's peers interleaved over ``--rounds`` rounds, and each peer keeps its
fastest pass's median.

Each pattern keeps the nearest it can to a ``--kept`` fraction, and at least one unit: balanced
KGS the same whole number of kernel locations in every group (a 3x1x1 kernel keeps 1/3, 2/3 or
all), vanilla whole groups. A row that keeps as many units as an earlier row of its layer and
pattern (balanced KGS at a sixth and a quarter of a 3x1x1 kernel: 1 of 3 locations) is not
measured again; the report names, per layer, the fractions balanced KGS ran at another fraction
and the rows not measured again.

    python bench/sparse_layers.py --rounds 11 --passes 3 --out bench/results/sparse_layers_avx512
        # the committed AVX-512 results, about 12 minutes on 2 cores
    python bench/sparse_layers.py --layers c3d:conv4b --kept 0.5 --patterns kgs_balanced \\
        --shrink 2 --rounds 3 --passes 1 --out /tmp/quick   # a quick check

Writes bench/results/sparse_layers.{json,md,png} (``--out`` changes the stem).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

DEFAULT_LAYERS = (
    "c3d:conv2",
    "c3d:conv3b",
    "c3d:conv4b",
    "r2plus1d_18:layer2.1.conv1.0.0",  # 1x3x3
    "r2plus1d_18:layer2.1.conv1.0.3",  # 3x1x1
)
PATTERNS = ("kgs_balanced", "kgs_unbalanced", "vanilla")
DEFAULT_KEPT = (1 / 2, 1 / 3, 1 / 4, 1 / 6)
TARGET_RATE_FRACTION = 0.9


def add_layer_args(parser: argparse.ArgumentParser) -> None:
    """The flags that pick the layers and their size (``--layers``, ``--clip``, ``--shrink``:
    :func:`find_layers`), shared with ``group_shapes.py``."""
    from common import clip_arg, positive_int

    parser.add_argument("--layers", default=",".join(DEFAULT_LAYERS), help="model:conv names")
    parser.add_argument("--clip", type=clip_arg, default=(16, 112, 112), help="model input T,H,W")
    parser.add_argument(
        "--shrink",
        type=positive_int,
        default=1,
        help="divide each layer's H and W by this (quick checks; the models need a full clip)",
    )


def pattern_names(text: str) -> list[str]:
    """An argparse type for comma-separated sparse patterns (:data:`PATTERNS`); '' for none."""
    names = text.split(",") if text else []
    unknown = [name for name in names if name not in PATTERNS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown pattern {unknown[0]!r}; choose from {', '.join(PATTERNS)}"
        )
    return names


def add_row_args(parser: argparse.ArgumentParser) -> None:
    """The flags that pick the rows (layers, patterns, kept fractions, group, clip), shared with
    ``opencl_gpu.py prepare``."""
    from common import group_arg, kept_fractions

    add_layer_args(parser)
    parser.add_argument(
        "--patterns",
        type=pattern_names,
        default=list(PATTERNS),
        help=f"sparse patterns, comma-separated, of {', '.join(PATTERNS)} ('' for none)",
    )
    parser.add_argument(
        "--kept",
        type=kept_fractions,
        default=list(DEFAULT_KEPT),
        help="kept fractions of KGS units, comma-separated, each in (0, 1] ('' for none); each "
        "pattern keeps the nearest it can and at least one unit (balanced KGS: whole kernel "
        "locations per group; vanilla: whole groups)",
    )
    parser.add_argument("--group", type=group_arg, default=(8, 4), help="kernel group gM,gN")


def _args(argv: list[str] | None) -> argparse.Namespace:
    from common import add_out_arg, add_timing_args, bench_parser

    parser = bench_parser(__doc__)
    add_row_args(parser)
    add_timing_args(parser, rounds=7, each="row", passes=True)
    add_out_arg(parser, "sparse_layers", ".json", ".md", ".png")
    args = parser.parse_args(argv)
    if not args.patterns or not args.kept:
        parser.error("--patterns and --kept need at least one value each")
    args.layer_entries = checked_layers(parser, args, args.shrink)
    return args


def checked_layers(
    parser: argparse.ArgumentParser, args: argparse.Namespace, shrink: int
) -> list[dict[str, Any]]:
    """``--layers`` found (:func:`find_layers`) before any work (the peak probe, the builds):
    an unknown layer, or a ``shrink`` that leaves a layer no output, ends the script with
    argparse's one line and exit status 2."""
    from common import as_argument_error

    return as_argument_error(parser, lambda: find_layers(args.layers.split(","), args.clip, shrink))


def find_layers(names: list[str], clip: tuple[int, int, int], shrink: int) -> list[dict[str, Any]]:
    """Each ``model:conv`` of ``names`` traced at ``clip``, its H and W divided by ``shrink``;
    SystemExit naming the layer where it is unknown or ``shrink`` leaves it too small."""
    from common import model_conv_shapes

    by_model: dict[str, dict[str, dict[str, Any]]] = {}
    found = []
    for full in names:
        model, _, conv = full.partition(":")
        if model not in by_model:
            try:
                by_model[model] = {e["name"]: e for e in model_conv_shapes(model, clip)}
            except ValueError as exc:
                raise SystemExit(f"{full}: {exc} (layers are model:conv, as c3d:conv2)") from None
        if conv not in by_model[model]:
            raise SystemExit(f"{full}: no such conv (have {sorted(by_model[model])})")
        found.append(_shrunk({**by_model[model][conv], "label": full}, shrink))
    return found


def _shrunk(entry: dict[str, Any], shrink: int) -> dict[str, Any]:
    """``entry`` with its H and W divided by ``shrink``; SystemExit naming the layer, and the
    most it takes, where that leaves no input plane or no output (C3D conv4b's 14x14 plane at
    --shrink 16: the build failed with a ValueError that named no layer, after the peak probe).
    """
    from common import to_spec

    t, h, w = entry["in_size"]

    def divided(by: int) -> dict[str, Any] | None:
        shrunk = {**entry, "in_size": (t, h // by, w // by)}
        if min(h, w) // by < 1:
            return None
        try:
            to_spec(shrunk, "conv")
        except ValueError:
            return None
        return shrunk

    shrunk = divided(shrink)
    if shrunk is None:
        tried = range(1, min(shrink, min(h, w) + 1))  # past the plane's side, nothing is left
        most = max((by for by in tried if divided(by) is not None), default=None)
        kernel = "x".join(map(str, entry["kernel"]))
        raise SystemExit(
            f"{entry['label']}: --shrink {shrink} leaves its {h}x{w} input plane "
            f"{h // shrink}x{w // shrink}, too small for its {kernel} kernel"
            + (f" (it takes --shrink {most} at most)" if most else "")
        )
    return shrunk


def pattern_units(
    pattern: str, kept: float, shape: tuple[int, ...], group: tuple[int, int], seed: int
):  # -> np.ndarray (P, Q, Kd, Kh, Kw) of bool
    """A kept-unit mask whose kept fraction is ``kept``: the nearest achievable for balanced
    (whole kernel locations per group) and vanilla (whole groups), statistically for
    unbalanced; each keeps at least one unit (a vanilla layer of 288 groups at kept 0.001 kept
    none: an all-zero weight, and a FLOPs rate of its dense MACs)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    p, q = -(-shape[0] // group[0]), -(-shape[1] // group[1])
    locations = int(np.prod(shape[2:]))
    if pattern == "vanilla":
        chosen = rng.permutation(p * q) < max(1, round(kept * p * q))
        units = np.repeat(chosen.reshape(p, q, 1), locations, axis=2)
    elif pattern == "kgs_balanced":
        per_group = max(1, round(kept * locations))
        order = rng.random((p, q, locations)).argsort(axis=2)
        units = order < per_group
    elif pattern == "kgs_unbalanced":
        # Output groups keep different amounts (0.25x to 1.75x the target), the paper's
        # unbalanced pruning; then the global fraction is brought back to the target.
        rates = np.clip(kept * rng.uniform(0.25, 1.75, (p, 1, 1)), 0, 1)
        scores = rng.random((p, q, locations)) / np.maximum(rates, 1e-9)
        threshold = np.quantile(scores, kept)
        units = scores <= threshold
    else:
        raise SystemExit(f"unknown pattern {pattern!r}; choose from {PATTERNS}")
    return units.reshape(p, q, *shape[2:])


def distinct_rows(
    patterns: list[str], kept_list: list[float], shape: tuple[int, ...], group: tuple[int, int]
) -> tuple[list[tuple[int, str, float, Any]], list[dict[str, Any]]]:
    """The rows to measure, (kept index, pattern, kept, units), and those not measured again: a
    row keeping as many units as an earlier one of its pattern (balanced KGS: the same
    locations per group) would count one pattern twice in the medians and the fits."""
    kept_by: dict[tuple[str, int], float] = {}
    rows, not_measured = [], []
    for pattern in patterns:
        for ki, kept in enumerate(kept_list):
            units = pattern_units(pattern, kept, shape, group, ki)
            key = (pattern, int(units.sum()))
            if key in kept_by:
                not_measured.append(
                    {"pattern": pattern, "target_kept": kept, "same_as_target_kept": kept_by[key]}
                )
                continue
            kept_by[key] = kept
            rows.append((ki, pattern, kept, units))
    return rows, not_measured


class Layer:
    """One layer's input and the torch peer; builds per (pattern, kept) on demand."""

    def __init__(self, entry: dict[str, Any], threads: int, work: Path) -> None:
        import numpy as np
        import torch
        from common import to_spec

        self.entry, self.work = entry, work
        work.mkdir(parents=True, exist_ok=True)
        self.spec = to_spec(entry, "conv")
        rng = np.random.default_rng(0)
        self.dense_weight = rng.standard_normal(self.spec.weight_shape).astype(np.float32) * 0.05
        self.bias = rng.standard_normal(self.spec.out_channels).astype(np.float32)
        self.x = rng.standard_normal(self.spec.input_shape()).astype(np.float32)
        self.out = np.empty(self.spec.output_shape(), np.float32)
        torch.set_num_threads(threads)

    def build(
        self,
        weight,
        scheme: str,
        group: tuple[int, int],
        kernel: str,
        tag: str,
        sparse_schedule: str = "",
    ):
        from common import build_conv_layer

        import rt3d_halide

        built = build_conv_layer(
            self.spec,
            weight,
            self.bias,
            self.work,
            tag,
            sparsity=(scheme, group),
            kernel=kernel,
            sparse_schedule=sparse_schedule,
        )
        return {
            "fn": rt3d_halide.load(built["dir"])["conv"],
            "build_seconds": built["seconds"],
            "library_bytes": built["library_bytes"],
            "sparsity": built["function"]["sparsity"],
            "schedules": built["function"]["schedules"],
        }

    def pruned(self, pattern: str, kept: float, group: tuple[int, int], seed: int):
        """(weight, scheme): the layer's dense weights pruned to ``pattern`` at ``kept``
        (:func:`pattern_units`), and the scheme the build declares for it."""
        units = pattern_units(pattern, kept, self.spec.weight_shape, group, seed)
        return self.masked(pattern, units, group)

    def masked(self, pattern: str, units, group: tuple[int, int]):
        """(weight, scheme): the layer's dense weights keeping the units ``units`` of
        ``pattern`` (:func:`pattern_units`)."""
        import numpy as np
        from rt3d_halide.pruning.patterns import unit_mask_to_weight_mask

        mask = unit_mask_to_weight_mask(units, self.spec.weight_shape, group)
        weight = np.where(mask, self.dense_weight, 0).astype(np.float32)
        return weight, "vanilla" if pattern == "vanilla" else "kgs"

    def ours_peer(self, fn):
        return lambda: fn(self.x, out=self.out)

    def check(self, fn, weight) -> float:
        """Relative error against float64 torch; a wrong kernel stops the run
        (:func:`common.checked_error`). The output buffer is shared by every build of the layer,
        so it is poisoned first: an element a build leaves unwritten would otherwise hold the
        last build's right answer."""
        import numpy as np
        from common import checked_error

        self.out.fill(np.nan)
        fn(self.x, out=self.out)
        return checked_error(self.entry["label"], self.out, self.x, weight, self.bias, self.spec)


# The layer's fitted line (time_line), as the result file keeps it.
FIT_KEYS = ("time_vs_torch_fixed", "time_vs_torch_per_kept")


def layer_points(
    rows: list[dict[str, Any]],
    unpruned: dict[str, Any],
    x_key: str,
    ratio: Callable[[dict[str, float]], float],
) -> list[tuple[float, float]]:
    """(each row's ``x_key``, ``ratio`` of its times), and the unpruned layer's at its own (a
    kept fraction of 1; a sparse fraction past 1 where gM does not divide the filters and the
    padded lanes are computed): the points the layer's lines are fitted through."""
    points = [(r[x_key], ratio(r["seconds"])) for r in rows]
    return [*points, (unpruned[f"unpruned_{x_key}"], ratio(unpruned["unpruned_seconds"]))]


def break_even(rows: list[dict[str, Any]], unpruned: dict[str, Any]) -> float | None:
    """:func:`common.break_even` through the layer's rows' sparse over dense time."""
    from common import break_even as fitted

    def ratio(seconds: dict[str, float]) -> float:
        return seconds["ours_sparse"] / seconds["ours_dense"]

    return fitted(layer_points(rows, unpruned, "sparse_fraction", ratio))


def time_line(
    rows: list[dict[str, Any]], unpruned: dict[str, Any]
) -> tuple[float | None, float | None]:
    """(fixed, per kept): the least-squares line through each row's sparse time over torch's
    dense time against its kept fraction, and the unpruned layer's at 1, so that time ~ (fixed +
    per kept x kept) x torch's time; (None, None) when it cannot be fitted. 'of rate' at kept k
    is then k / (fixed + per kept x k): the fixed part (costs that pruning does not shrink: the
    input copy, the output, the per-list and per-chunk passes) caps it as k falls."""
    from common import line_through, torch_best

    def ratio(seconds: dict[str, float]) -> float:
        return seconds["ours_sparse"] / torch_best(seconds)

    return line_through(layer_points(rows, unpruned, "kept_fraction", ratio)) or (None, None)


def unpruned_point(item: dict[str, Any]) -> dict[str, Any]:
    """The layer with nothing pruned, on the sparse kernel, against torch's dense conv and our
    dense code: the efficiency of the kernel's loops before pruning (the pruned rows' median has
    mostly lain below it: the costs per block and per list that pruning does not shrink weigh
    more as fewer entries are kept), and the break-even fit's point at its own sparse fraction
    (1, or past 1 where padded lanes are computed)."""
    from common import torch_best

    seconds, sparsity = item["seconds"], item["built"]["sparsity"]
    return {
        "unpruned_kept_fraction": sparsity["kept_fraction"],
        "unpruned_sparse_fraction": sparsity["sparse_fraction"],
        "unpruned_seconds": seconds,
        "unpruned_pass_seconds": item["pass_seconds"],
        "unpruned_sparse_vs_torch": torch_best(seconds) / seconds["ours_sparse"],
        "unpruned_relative_error": item["error"],
    }


def row_result(item: dict[str, Any]) -> dict[str, Any]:
    """A pruned row's report from its best timings (:func:`time_items`)."""
    from common import kept_macs_and_rate, torch_best

    seconds, sp = item["seconds"], item["built"]["sparsity"]
    kept_macs, rate = kept_macs_and_rate(sp)
    torch_seconds = torch_best(seconds)
    vs_torch = torch_seconds / seconds["ours_sparse"]
    return {
        "layer": item["layer"].entry["label"],
        "pattern": item["pattern"],
        "target_kept": item["kept"],
        "kept_fraction": sp["kept_fraction"],
        "sparse_fraction": sp["sparse_fraction"],
        "balanced": sp["balanced"],
        "flops_rate": rate,
        "seconds": seconds,
        "pass_seconds": item["pass_seconds"],
        "speedup_vs_torch": vs_torch,
        "speedup_vs_our_dense": seconds["ours_dense"] / seconds["ours_sparse"],
        "fraction_of_rate_vs_torch": vs_torch / rate,
        "sparse_gflops": 2 * kept_macs / seconds["ours_sparse"] / 1e9,
        "torch_gflops": 2 * sp["dense_macs_per_sample"] / torch_seconds / 1e9,
        "build_seconds": item["built"]["build_seconds"],
        "library_bytes": item["built"]["library_bytes"],
        "relative_error": item["error"],
    }


def time_items(items: list[dict[str, Any]], rounds: int, passes: int) -> None:
    """Each item's peers (its sparse library, the layer's dense one, torch in both layouts)
    timed in ``passes`` passes over all items (:func:`common.time_in_passes`): each item gets
    ``pass_seconds`` (every pass's medians) and ``seconds`` (each peer's fastest)."""
    from common import fastest_pass, time_in_passes, torch_conv_peers

    def peer_factory(item: dict[str, Any]) -> Callable[[], dict[str, Callable[[], Any]]]:
        layer = item["layer"]
        return lambda: {
            "ours_sparse": layer.ours_peer(item["built"]["fn"]),
            "ours_dense": layer.ours_peer(item["dense_fn"]),
            **torch_conv_peers(layer.x, item["weight"], layer.bias, layer.spec),
        }

    def progress(number: int, index: int, seconds: dict[str, float]) -> None:
        item = {**items[index], "seconds": seconds, "pass_seconds": [seconds]}
        if item["pattern"] is not None:
            print(f"pass {number}/{passes}: {summary_line(row_result(item))}", flush=True)

    timed = time_in_passes([peer_factory(item) for item in items], rounds, passes, progress)
    for item, pass_seconds in zip(items, timed, strict=True):
        item["pass_seconds"] = pass_seconds
        item["seconds"] = fastest_pass(pass_seconds)


def summary_line(row: dict[str, Any]) -> str:
    rate, vs_torch = row["flops_rate"], row["speedup_vs_torch"]
    return (
        f"{row['layer']} {row['pattern']} kept {row['kept_fraction']:.3f}: "
        f"{vs_torch:.2f}x torch (rate {rate:.2f}x, {vs_torch / rate:.0%} of it), "
        f"{row['sparse_gflops']:.0f} GFLOP/s"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from common import invocation, machine_info, measure_fma_peak

    from rt3d_halide.kernel_choice import SPARSE_BREAK_EVEN_KEPT

    clip = args.clip
    group = args.group
    kept_list = args.kept
    patterns = args.patterns
    peak = measure_fma_peak(args.threads)
    per_layer: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []  # (dense build, items)
    with tempfile.TemporaryDirectory(prefix="rt3d-sparse-bench-") as tmp:
        # A fresh compile cache: the reported build times are real compiles, not cache hits
        # (the first layer's dense build also compiles the Halide runtime).
        os.environ["RT3D_HALIDE_CACHE"] = str(Path(tmp) / "cache")
        # Every library is built, loaded and checked first; the timing passes follow.
        for li, entry in enumerate(args.layer_entries):
            layer = Layer(entry, args.threads, Path(tmp) / f"l{li}")
            dense = layer.build(layer.dense_weight, "dense", group, "dense", "dense")
            dense["error"] = layer.check(dense["fn"], layer.dense_weight)
            shared = {"layer": layer, "dense_fn": dense["fn"]}
            unpruned_build = layer.build(layer.dense_weight, "kgs", group, "sparse", "unpruned")
            error = layer.check(unpruned_build["fn"], layer.dense_weight)
            what = {"pattern": None, "kept": 1.0, "weight": layer.dense_weight}
            items = [{**shared, **what, "built": unpruned_build, "error": error}]
            shape = layer.spec.weight_shape
            measured, not_measured = distinct_rows(patterns, kept_list, shape, group)
            for ki, pattern, kept, units in measured:
                weight, scheme = layer.masked(pattern, units, group)
                sparse = layer.build(weight, scheme, group, "sparse", f"{pattern}-{ki}")
                error = layer.check(sparse["fn"], weight)
                what = {"pattern": pattern, "kept": kept, "weight": weight}
                items.append({**shared, **what, "built": sparse, "error": error})
            per_layer.append((dense, items, not_measured))
        all_items = [item for _, items, _ in per_layer for item in items]
        time_items(all_items, args.rounds, args.passes)
    rows: list[dict[str, Any]] = []
    layers: list[dict[str, Any]] = []
    for dense, (unpruned_item, *row_items), not_measured in per_layer:
        layer_rows = [row_result(item) for item in row_items]
        unpruned = unpruned_point(unpruned_item)
        dense_seconds = float(np.median([r["seconds"]["ours_dense"] for r in layer_rows]))
        layer = unpruned_item["layer"]
        layers.append(
            {
                "layer": layer.entry["label"],
                "dense_build_seconds": dense["build_seconds"],
                "dense_library_bytes": dense["library_bytes"],
                "dense_relative_error": dense["error"],
                "dense_seconds": dense_seconds,
                "break_even_kept_fraction": break_even(layer_rows, unpruned),
                **dict(zip(FIT_KEYS, time_line(layer_rows, unpruned), strict=True)),
                **unpruned,
                "kernel_size": list(layer.spec.kernel),
                "not_measured": not_measured,
            }
        )
        rows += layer_rows
    # Measured again at the end: a 0.5 s window at the start once caught the shared machine at
    # half speed (103 against 206 GFLOP/s a minute later).
    peak = max(peak, measure_fma_peak(args.threads))
    for row in rows:
        row["fraction_of_fma_peak"] = row["sparse_gflops"] * 1e9 / peak
        row["torch_fraction_of_fma_peak"] = row["torch_gflops"] * 1e9 / peak
    median_keys = (
        "fraction_of_rate_vs_torch",
        "fraction_of_fma_peak",
        "torch_fraction_of_fma_peak",
    )
    for entry in layers:
        own = [r for r in rows if r["layer"] == entry["layer"]]
        for key in median_keys:
            entry[f"median_{key}"] = float(np.median([r[key] for r in own]))
    return {
        **invocation("sparse_layers.py"),
        "machine": machine_info(args.threads),
        "fma_peak_gflops": peak / 1e9,
        "clip": list(clip),
        "shrink": args.shrink,
        "rounds": args.rounds,
        "passes": args.passes,
        "group": list(group),
        "rule_break_even_kept_fraction": SPARSE_BREAK_EVEN_KEPT,
        "target_fraction_of_rate": TARGET_RATE_FRACTION,
        "rows": rows,
        "layers": layers,
    }


def report(result: dict[str, Any], stem: Path) -> None:
    from common import SETTLE_SECONDS, markdown_table, write_json

    write_json(stem.with_suffix(".json"), result)
    rows = [
        [
            r["layer"],
            r["pattern"],
            r["kept_fraction"],
            r["flops_rate"],
            r["speedup_vs_torch"],
            r["fraction_of_rate_vs_torch"],
            r["speedup_vs_our_dense"],
            r["sparse_gflops"],
            r["fraction_of_fma_peak"],
            r["torch_fraction_of_fma_peak"],
            r["build_seconds"],
            r["library_bytes"] // 1024,
        ]
        for r in result["rows"]
    ]
    headers = [
        "layer",
        "pattern",
        "kept",
        "FLOPs rate",
        "vs torch",
        "of rate",
        "vs our dense",
        "GFLOP/s",
        "of peak",
        "torch of peak",
        "build s",
        "lib KiB",
    ]
    layers = [
        [
            entry["layer"],
            _kept_cell(entry["break_even_kept_fraction"]),
            entry["dense_seconds"] * 1e3,
        ]
        for entry in result["layers"]
    ]
    target = result["target_fraction_of_rate"]
    of_rate = sorted(r["fraction_of_rate_vs_torch"] for r in result["rows"])
    reached = sum(f >= target for f in of_rate)
    shrink = result.get("shrink", 1)
    shrunk = (
        f" (H and W divided by {shrink}: small planes, where torch runs far below its peak, so "
        "these rows do not compare with full-size runs)"
        if shrink > 1
        else ""
    )
    medians = [
        [
            entry["layer"],
            entry["median_fraction_of_rate_vs_torch"],
            entry["unpruned_sparse_vs_torch"],
            entry["median_torch_fraction_of_fma_peak"],
            entry["median_fraction_of_fma_peak"],
            target * entry["median_torch_fraction_of_fma_peak"],
            *("-" if entry[key] is None else entry[key] for key in FIT_KEYS),
        ]
        for entry in result["layers"]
    ]
    text = [
        "# Sparse Conv3d layers: speedup against the FLOPs pruning rate",
        "",
        f"Command: `{result['command']}` ({result['date']}).",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['threads_used']} threads, "
        f"FMA peak {result['fma_peak_gflops']:.0f} GFLOP/s; clip {result['clip']}{shrunk}, "
        f"group {result['group']}. Target: 'of rate' >= {result['target_fraction_of_rate']}. "
        "'vs torch': against the faster of torch's NCDHW and channels_last_3d runs. Times: "
        f"per peer, the fastest of {result['passes']} passes' medians of {result['rounds']} "
        f"interleaved rounds, every timed call after {SETTLE_SECONDS * 1e3:.0f} ms of the same "
        "peer's calls (bench/common.py).",
        "",
        markdown_table(headers, rows),
        "",
        *_kept_notes(result),
        f"All {len(of_rate)} rows: a median {statistics.median(of_rate):.3g} of the rate "
        f"({of_rate[0]:.3g}-{of_rate[-1]:.3g}); {reached} reach the target {target}.",
        "",
        "Per layer, medians over its rows. 'of rate' is our sparse code's GFLOP/s per useful FLOP "
        "over torch's dense GFLOP/s, so reaching the target asks our sparse code for "
        f"{target} x torch's fraction of the FMA peak. 'unpruned, x torch': the layer with "
        "nothing pruned on the sparse kernel against torch, timed apart from the rows: the "
        "kernel's efficiency before pruning. 'fixed' and 'per kept': a least-squares line "
        "through each row's time over torch's dense time (and the unpruned layer's, at 1) in "
        "the kept fraction k, time ~ (fixed + per kept x k) x torch's time; 'of rate' at k is "
        "k / (fixed + per kept x k), so the fixed part (costs that pruning does not shrink: the "
        "input copy, the output, the passes per list and per chunk) caps it as k falls, and "
        f"{target} of the rate at a sixth kept asks fixed <= (1/{target} - per kept) / 6 (no "
        f"fixed part at all where per kept is over 1/{target}).",
        "",
        markdown_table(
            [
                "layer",
                "of rate",
                "unpruned, x torch",
                "torch of peak",
                "ours of peak",
                f"{target} of rate needs",
                "fixed",
                "per kept",
            ],
            medians,
        ),
        "",
        "Break-even kept fraction (where a line through each row's sparse over dense time, and "
        "the unpruned layer's, reaches 1; '> 1': sparse code wins even unpruned; the build's "
        f"rule uses {result['rule_break_even_kept_fraction']}):",
        "",
        markdown_table(["layer", "break-even kept", "our dense ms"], layers),
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(text))
    plot(result, stem.with_suffix(".png"))


def _kept_notes(result: dict[str, Any]) -> list[str]:
    """Lines (and a blank one) naming, per layer, the ``--kept`` fractions a pattern ran at
    another fraction (balanced KGS) or kept as many units of as an earlier one (not measured
    again); none where every row ran at its fraction. Made from the result file alone, so that
    a report rewritten from it says the same."""
    lines = []
    for entry in result["layers"]:
        own = [r for r in result["rows"] if r["layer"] == entry["layer"]]
        skipped = entry.get("not_measured", [])
        balanced = _balanced_note(entry, own, skipped)
        if balanced:
            lines.append(f"- {entry['layer']}: {balanced}.")
        lines += [
            f"- {entry['layer']}: {s['pattern']} at {_fraction(s['target_kept'])} keeps as many "
            f"units as at {_fraction(s['same_as_target_kept'])}: measured once."
            for s in skipped
            if s["pattern"] != "kgs_balanced"
        ]
    if not lines:
        return []
    head = (
        "Kept fractions a pattern cannot follow ('kept' above is the fraction each row ran at; "
        "a row keeping as many units as an earlier row of its pattern is not measured again):"
    )
    return [head, "", *lines, ""]


def _balanced_note(
    entry: dict[str, Any], rows: list[dict[str, Any]], skipped: list[dict[str, Any]]
) -> str | None:
    """What balanced KGS ran at on the layer of ``entry`` where it could not follow a kept
    fraction: it keeps a whole number of the kernel's locations in every group (1, 2 or 3 of a
    3x1x1 kernel's 3), so 1/2 ran at 2/3, and 1/4 and 1/6 rounded to the 1/3 row."""
    if "kernel_size" not in entry:  # a result file from before the key
        return None
    locations = math.prod(entry["kernel_size"])
    kept_of = {r["target_kept"]: r["kept_fraction"] for r in rows if r["pattern"] == "kgs_balanced"}

    def at(kept: float) -> str:
        return f"{round(kept * locations)}/{locations} ({kept:.3g})"

    off = [f"{_fraction(t)} ran at {at(k)}" for t, k in kept_of.items() if abs(k - t) > 1e-6]
    parts = [", ".join(off)] if off else []
    for first, kept in kept_of.items():
        same = [
            s["target_kept"]
            for s in skipped
            if s["pattern"] == "kgs_balanced" and s["same_as_target_kept"] == first
        ]
        if same:
            one = len(same) == 1
            parts.append(
                f"{_listed(same)} {'is' if one else 'are'} not expressible: "
                f"{'it rounds' if one else 'they round'} to {at(kept)} too, measured once (the "
                f"row of {_fraction(first)})"
            )
    if not parts:
        return None
    if locations == 1:
        choices = "1"
    elif locations <= 4:
        choices = ", ".join(map(str, range(1, locations))) + f" or {locations}"
    else:
        choices = f"1 to {locations}"
    shape = "x".join(map(str, entry["kernel_size"]))
    return (
        f"balanced KGS keeps {choices} of its {shape} kernel's {locations} locations in every "
        "group: " + "; ".join(parts)
    )


def _fraction(kept: float) -> str:
    """A kept fraction as a reader passed it: 1/6 rather than 0.167 where it is one."""
    from fractions import Fraction

    near = Fraction(kept).limit_denominator(24)
    return str(near) if abs(float(near) - kept) < 1e-9 else f"{kept:.3g}"


def _listed(kepts: list[float]) -> str:
    names = [_fraction(k) for k in kepts]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _kept_cell(kept: float | None) -> Any:
    """A fitted break-even past 1 only says that sparse code wins unpruned: the line is
    extrapolated there, so the report does not quote the number; none fitted is "-", as in
    the fit's columns."""
    if kept is None:
        return "-"
    return "> 1" if kept > 1 else kept


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for pattern, marker in zip(PATTERNS, "os^", strict=True):
        rows = [r for r in result["rows"] if r["pattern"] == pattern]
        if rows:
            ax.scatter(
                [r["flops_rate"] for r in rows],
                [r["speedup_vs_torch"] for r in rows],
                marker=marker,
                label=pattern,
            )
    top = max([r["flops_rate"] for r in result["rows"]] + [1.0]) * 1.1
    ax.plot([0, top], [0, top], "k--", linewidth=1, label="speedup = FLOPs rate")
    ax.plot(
        [0, top],
        [0, TARGET_RATE_FRACTION * top],
        "k:",
        linewidth=1,
        label=f"{TARGET_RATE_FRACTION} x rate",
    )
    ax.set_xlabel("FLOPs pruning rate (dense MACs / kept MACs)")
    ax.set_ylabel("speedup over torch dense conv3d")
    ax.set_title("Sparse Conv3d layers, batch 1, " + f"{result['machine']['threads_used']} threads")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    from common import require_matplotlib, set_threads

    require_matplotlib()
    set_threads(args.threads)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report(result, args.out)
    print(f"wrote {args.out}.{{json,md,png}}")


if __name__ == "__main__":
    main()
