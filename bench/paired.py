"""Builds of one layer timed side by side with torch: how group_shapes.py and schedule_ab.py
compare group shapes and schedule knobs. A change of a few percent is below this machine's drift
between runs, so every build of a layer runs in the same rounds, and each is reported as its
median per-round time ratio against the first build."""

from __future__ import annotations

import argparse
import dataclasses
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
    add_out_arg(parser, name)
    return parser


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
    """``seconds``: each build's median; ``vs_first``: its median per-round time ratio against
    the first build (rounds run side by side, so the ratio cancels the machine's drift, which
    separate runs do not); ``torch_seconds``: torch's median (the faster layout); ``rounds``:
    every peer's seconds per round, builds and torch's layouts, from which the report's
    ratios can be recomputed."""

    seconds: dict[str, float]
    vs_first: dict[str, float]
    torch_seconds: float
    rounds: dict[str, list[float]]


def paired_against_first(ours: dict[str, Callable[[], Any]], layer: Any, rounds: int) -> Paired:
    """``ours`` (builds of one layer) and torch's dense conv3d of ``layer`` interleaved over
    ``rounds``."""
    from common import interleaved_samples, torch_best, torch_conv_peers

    peers = {**ours, **torch_conv_peers(layer.x, layer.dense_weight, layer.bias, layer.spec)}
    samples = interleaved_samples(peers, rounds)
    medians = {name: statistics.median(times) for name, times in samples.items()}
    first = samples[next(iter(ours))]
    ratios = {
        name: statistics.median([a / b for a, b in zip(samples[name], first, strict=True)])
        for name in ours
    }
    return Paired({name: medians[name] for name in ours}, ratios, torch_best(medians), samples)


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


def checked_builds(
    layer: Any, label: str, builds: list[Build], rounds: int
) -> Callable[[], dict[str, Any]]:
    """Every build of ``layer`` (a :class:`sparse_layers.Layer`), made and checked against
    float64 torch now; returned, what times them interleaved with torch later: a report row per
    build."""
    from common import kept_macs_and_rate

    peers, rows = {}, []
    for index, build in enumerate(builds):
        tag = f"b{index}"  # a directory name, which a variant's JSON is not
        built = layer.build(
            build.weight, build.scheme, build.group, "sparse", tag, build.sparse_schedule
        )
        error = layer.check(built["fn"], build.weight)
        (schedule,) = built["schedules"].values()
        rows.append(
            {
                **build.row,
                "sparsity": built["sparsity"],
                "schedule": schedule,
                "relative_error": error,
            }
        )
        peers[build.name] = layer.ours_peer(built["fn"])
        print(f"{label} {build.name}: built, error {error:.2g}", flush=True)

    def timed() -> dict[str, Any]:
        paired = paired_against_first(peers, layer, rounds)
        for row, name in zip(rows, peers, strict=True):
            _, rate = kept_macs_and_rate(row["sparsity"])
            row.update(
                seconds=paired.seconds[name],
                time_vs_first=paired.vs_first[name],
                fraction_of_rate=paired.torch_seconds / paired.seconds[name] / rate,
                round_seconds=paired.rounds[name],
            )
        torch_rounds = {name: s for name, s in paired.rounds.items() if name not in peers}
        return {
            "layer": label,
            "torch_seconds": paired.torch_seconds,
            "torch_round_seconds": torch_rounds,
            "rows": rows,
        }

    return timed


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
    from sparse_layers import find_layers

    from rt3d_halide.errors import BuildError

    set_threads(args.threads)
    result: dict[str, Any] = {
        **invocation(script),
        "machine": machine_info(args.threads),
        "clip": list(args.clip),
        "shrink": args.shrink,
        **settings,
        "rounds": args.rounds,
        "layers": [],
    }
    with tempfile.TemporaryDirectory(prefix="rt3d-paired-") as tmp:
        timers = []
        for entry in find_layers(args.layers.split(","), args.clip, args.shrink):
            try:
                timers.append(prepare_layer(entry, Path(tmp)))
            except BuildError as exc:
                raise SystemExit(f"error: {entry['label']}: {exc}") from None
        result["layers"] = [timed() for timed in timers]
    report(result, args.out)
    print(f"wrote {args.out}.{{json,md}}")
