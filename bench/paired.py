"""Builds of one layer timed side by side with torch: how group_shapes.py and schedule_ab.py
compare group shapes and schedule knobs. A change of a few percent is below this machine's drift
between runs, so every build of a layer runs in the same rounds, and each is reported as its
median per-round time ratio against the first build."""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np


def paired_parser(
    doc: str | None, name: str, add_compared: Callable[[argparse.ArgumentParser], None]
) -> argparse.ArgumentParser:
    """The command line of a paired script: its layers, what ``add_compared`` adds (the builds
    compared), ``--pattern`` and ``--kept`` (the one pruned weight every build of a layer
    shares), the timing flags and ``--out`` (default ``results/<name>``)."""
    from common import add_out_arg, add_timing_args, bench_parser, kept_fraction
    from sparse_layers import PATTERNS, add_layer_args

    parser = bench_parser(doc)
    add_layer_args(parser)
    add_compared(parser)
    parser.add_argument(
        "--pattern", default="kgs_balanced", choices=PATTERNS, help="sparse pattern"
    )
    parser.add_argument(
        "--kept", type=kept_fraction, default=1 / 3, help="kept fraction of units, in (0, 1]"
    )
    add_timing_args(parser, rounds=11, each="layer")
    parser.add_argument(
        "--both-ways",
        action="store_true",
        help="build and time every compared item twice, in the given order and reversed, and "
        "report the geometric mean of the two ratios against the first (a check on what the "
        "order of the builds does: bench/common.py's interleaved_samples)",
    )
    add_out_arg(parser, name)
    return parser


def parse_paired(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``argv`` parsed, its ``--layers`` found before any build (``layer_entries``)."""
    from sparse_layers import checked_layers

    args = parser.parse_args(argv)
    args.layer_entries = checked_layers(parser, args, args.shrink)
    return args


def compared_list(parse: Callable[[str], Any], what: str) -> Callable[[str], list]:
    """An argparse type for ';'-separated items (each through ``parse``), at least two (the
    first is the others' reference), none repeated."""

    def items(text: str) -> list:  # argparse names the type by it
        try:
            parsed = [parse(part) for part in (p.strip() for p in text.split(";")) if part]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if len(parsed) < 2:
            raise argparse.ArgumentTypeError(f"needs at least two {what} to compare, ';'-separated")
        if len(set(parsed)) != len(parsed):
            raise argparse.ArgumentTypeError(f"repeats one of its {what}: {text!r}")
        return parsed

    return items


class Paired(NamedTuple):
    """``torch_seconds``: torch's median (the faster layout); ``rounds``: every peer's seconds
    per round, builds and torch's layouts, from which the report's ratios are taken (rounds run
    side by side, so a per-round ratio cancels the machine's drift, which separate runs do
    not)."""

    torch_seconds: float
    rounds: dict[str, list[float]]


def paired_rounds(ours: dict[str, Callable[[], Any]], layer: Any, rounds: int) -> Paired:
    """``ours`` (builds of one layer) and torch's dense conv3d of ``layer`` interleaved over
    ``rounds``."""
    from common import interleaved_samples, torch_best, torch_conv_peers

    peers = {**ours, **torch_conv_peers(layer.x, layer.dense_weight, layer.bias, layer.spec)}
    samples = interleaved_samples(peers, rounds)
    medians = {name: statistics.median(times) for name, times in samples.items()}
    return Paired(torch_best(medians), samples)


@dataclasses.dataclass(frozen=True)
class Build:
    """One build of a layer: its name in the timing and progress, what its report row keeps of
    it, and what the real build gets."""

    name: str
    row: dict[str, Any]
    weight: np.ndarray
    scheme: str
    group: tuple[int, int]
    sparse_schedule: str = ""


REVERSED = " (reversed)"  # the name of a build's second instance, made in reversed order


def checked_builds(
    layer: Any, label: str, builds: list[Build], rounds: int, both_ways: bool = False
) -> Callable[[], dict[str, Any]]:
    """Every build of ``layer`` (a :class:`sparse_layers.Layer`), made and checked against
    float64 torch now; returned, what times them interleaved with torch later: a report row per
    build. ``both_ways``: every build made twice, the second time in reversed order, so that
    each item's two instances sit as early on average as any other's; its 'time / first' is the
    geometric mean of the two ratios, each instance against the first item's of its turn."""
    from common import kept_macs_and_rate, median_ratio

    turns = [builds, builds[::-1]] if both_ways else [builds]
    peers, rows = {}, {}
    for turn, in_order in enumerate(turns):
        for build in in_order:
            tag = f"b{len(peers)}"  # a directory name, which a variant's JSON is not
            built = layer.build(
                build.weight, build.scheme, build.group, "sparse", tag, build.sparse_schedule
            )
            error = layer.check(built["fn"], build.weight)
            (schedule,) = built["schedules"].values()
            row = {**build.row, "sparsity": built["sparsity"], "schedule": schedule}
            previous = rows.get(build.name, {}).get("relative_error", 0.0)  # its first instance's
            row["relative_error"] = max(error, previous)
            rows[build.name] = row
            name = build.name + (REVERSED if turn else "")
            peers[name] = layer.ours_peer(built["fn"])
            print(f"{label} {name}: built, error {error:.2g}", flush=True)
    first = builds[0].name

    def timed() -> dict[str, Any]:
        paired = paired_rounds(peers, layer, rounds)
        for build in builds:
            row, name = rows[build.name], build.name
            _, rate = kept_macs_and_rate(row["sparsity"])
            ways = [median_ratio(paired.rounds, name, first)]
            samples = list(paired.rounds[name])
            if both_ways:
                ways.append(median_ratio(paired.rounds, name + REVERSED, first + REVERSED))
                samples += paired.rounds[name + REVERSED]
                row["round_seconds_reversed"] = paired.rounds[name + REVERSED]
                row["time_vs_first_each_way"] = ways
            seconds = statistics.median(samples)
            row.update(
                seconds=seconds,
                time_vs_first=math.prod(ways) ** (1 / len(ways)),
                fraction_of_rate=paired.torch_seconds / seconds / rate,
                round_seconds=paired.rounds[name],
            )
        torch_rounds = {name: s for name, s in paired.rounds.items() if name not in peers}
        return {
            "layer": label,
            "torch_seconds": paired.torch_seconds,
            "torch_round_seconds": torch_rounds,
            "rows": [rows[build.name] for build in builds],
        }

    return timed


def paired_ratio_text(result: dict[str, Any], item: str) -> str:
    """What a paired report's 'time / first' is, for its text."""
    if result.get("both_ways"):
        return (
            f"the geometric mean of two median per-round ratios against the first {item}'s "
            f"time, the {item}s built and timed in the given order and again reversed by "
            "`--both-ways`"
        )
    return f"the median per-round ratio against the first {item}'s time"


def run_layers(
    script: str,
    args: argparse.Namespace,
    settings: dict[str, Any],
    prepare_layer: Callable[[dict[str, Any], Path], Callable[[], dict[str, Any]]],
    report: Callable[[dict[str, Any], Path], None],
) -> None:
    """Each ``--layers`` entry built and checked by ``prepare_layer`` in a scratch directory,
    then every layer timed (what ``prepare_layer`` returned), then the report: the result holds
    the command, the machine, the layers' size, ``settings`` and the rows. A build the real
    build refuses (a knob the family lacks or a layer cannot take, a bad value) ends the run in
    one line, before any layer is timed."""
    from common import invocation, machine_info, set_threads

    from rt3d_halide.errors import BuildError

    set_threads(args.threads)
    result: dict[str, Any] = {
        **invocation(script),
        "machine": machine_info(args.threads),
        "clip": list(args.clip),
        "shrink": args.shrink,
        **settings,
        "rounds": args.rounds,
        "both_ways": args.both_ways,
        "layers": [],
    }
    with tempfile.TemporaryDirectory(prefix="rt3d-paired-") as tmp:
        timers = []
        for entry in args.layer_entries:
            try:
                timers.append(prepare_layer(entry, Path(tmp)))
            except BuildError as exc:
                raise SystemExit(f"error: {entry['label']}: {exc}") from None
        result["layers"] = [timed() for timed in timers]
    report(result, args.out)
    print(f"wrote {args.out}.{{json,md}}")
