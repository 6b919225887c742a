"""Sparse Conv3d speed per kernel-group shape: which group to prune with, for speed.

Each layer is pruned to one pattern and kept fraction with every ``--groups`` shape (the same
seed per shape), built with the real build (``--kernel sparse``), checked against float64
torch, and timed interleaved in one process with torch's dense conv3d (oneDNN, the faster of
its two layouts). Reported per layer and group: the kept fraction reached, the accumulator
block's lanes the schedule chose, time, the median per-round ratio against the first group's
time (rounds run side by side, so the ratio cancels the machine's drift, which separate runs of
``sparse_layers.py --group`` do not), and the fraction of the FLOPs rate over torch.

    python bench/group_shapes.py --rounds 15 --out bench/results/group_shapes_avx512
                                                                # the committed AVX-512 run
    python bench/group_shapes.py --layers c3d:conv4b --groups '8,4;16,4' --shrink 4 \\
        --rounds 2 --out /tmp/groups                            # a quick check

Writes bench/results/group_shapes.{json,md} (``--out`` changes the stem).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

DEFAULT_GROUPS = "8,4;4,4;16,4;8,8"


def _args(argv: list[str] | None) -> argparse.Namespace:
    from paired import compared_list, paired_parser, parse_paired
    from rt3d_halide.generators.conv3d_sparse import parse_group

    def add_groups(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--groups",
            type=compared_list(parse_group, "shapes"),
            default=DEFAULT_GROUPS,
            help="';'-separated kernel groups gM,gN; the first is the others' reference",
        )

    return parse_paired(paired_parser(__doc__, "group_shapes", add_groups), argv)


def prepare_layer(
    entry: dict[str, Any], args: argparse.Namespace, work: Path
) -> Callable[[], dict[str, Any]]:
    """Every group's build of one layer, checked; returned, what times them interleaved with
    torch (:func:`paired.checked_builds`)."""
    from paired import Build, checked_builds
    from sparse_layers import Layer

    layer = Layer(entry, args.threads, work / entry["label"].replace(":", "_"))
    builds = []
    for group in args.groups:
        name = f"{group[0]}x{group[1]}"
        weight, scheme = layer.pruned(args.pattern, args.kept, group, 0)  # at least one unit
        builds.append(Build(name, {"group": list(group)}, weight, scheme, group))
    return checked_builds(layer, entry["label"], builds, args.rounds, args.both_ways)


def report(result: dict[str, Any], out: Path) -> None:
    from common import markdown_table, write_json
    from paired import paired_ratio_text

    write_json(out.with_suffix(".json"), result)
    m = result["machine"]
    table = [
        [
            layer["layer"],
            "x".join(map(str, row["group"])),
            row["sparsity"]["kept_fraction"],
            row["schedule"].get("lanes", "-"),
            row["schedule"].get("input_layout", "-"),
            row["seconds"] * 1e3,
            row["time_vs_first"],
            row["fraction_of_rate"],
        ]
        for layer in result["layers"]
        for row in layer["rows"]
    ]
    text = [
        "# Sparse Conv3d speed per kernel-group shape",
        "",
        f"Command: `{result['command']}` ({result['date']}).",
        "",
        f"Machine: {m['cpu']}, {m['threads_used']} threads; clip {result['clip']}"
        + (f" (H and W divided by {result['shrink']})" if result["shrink"] > 1 else "")
        + ", pattern "
        f"{result['pattern']} at {result['kept']:.3g} kept. Per layer, every group's library "
        f"and torch's dense conv3d (the faster layout) ran interleaved over {result['rounds']} "
        f"rounds; 'time / first' is {paired_ratio_text(result, 'group')}, "
        "'of rate' the speedup over torch divided by the FLOPs rate (dense MACs / kept MACs). "
        "'lanes': output channels per accumulator block (a divisor of gM). Vanilla and "
        "unbalanced KGS patterns keep only about the same fraction per group shape: compare "
        "'kept' before 'time / first'.",
        "",
        markdown_table(
            ["layer", "group", "kept", "lanes", "input layout", "ms", "time / first", "of rate"],
            table,
        ),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(text))
    print("\n".join(text))


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    from paired import run_layers

    settings = {"pattern": args.pattern, "kept": args.kept}
    run_layers(
        "group_shapes.py", args, settings, lambda e, work: prepare_layer(e, args, work), report
    )


if __name__ == "__main__":
    main()
