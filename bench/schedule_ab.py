"""Sparse schedule knobs against each other, paired: how schedule changes are measured.

A knob change moves a layer's time by a few percent, less than this machine's drift between runs,
so each layer is pruned once (one pattern, kept fraction and group), built with the real build
once per ``--variants`` entry (``--sparse-schedule`` JSON; ``{}`` the family's defaults),
checked against float64 torch, and every build timed interleaved in one process with torch's
dense conv3d. Reported per layer and variant: the schedule the build chose, time, the median
per-round ratio against the first variant's time, and the fraction of the FLOPs rate over torch.
``--both-ways`` builds the variants again in reversed order and reports the geometric mean of
the two orders' ratios: a check on what the order of the builds does
(``common.interleaved_samples``).

    python bench/schedule_ab.py --layers c3d:conv2 --kept 0.167 --pattern kgs_unbalanced \\
        --variants '{};{"chunk_pass_cycles": 2}' --rounds 11 --both-ways \\
        --out bench/results/ab_pass_cycles
    python bench/schedule_ab.py --layers c3d:conv4b --variants '{};{"output_tile": 0}' \\
        --shrink 4 --rounds 2 --out /tmp/ab                     # a quick check

Writes bench/results/schedule_ab.{json,md} (``--out`` changes the stem).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))


def canonical_knobs(text: str) -> str:
    """A ``--variants`` entry as its canonical JSON (the build's ``--sparse-schedule``)."""
    from rt3d_halide.pruning.config import json_object

    return json.dumps(json_object(text), sort_keys=True)


def _args(argv: list[str] | None) -> argparse.Namespace:
    from common import group_arg
    from paired import compared_list, paired_parser, parse_paired

    def add_variants(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--variants",
            type=compared_list(canonical_knobs, "variants"),
            required=True,
            help="';'-separated JSON objects of sparse schedule knobs; the first is the reference",
        )

    parser = paired_parser(__doc__, "schedule_ab", add_variants)
    parser.add_argument("--group", type=group_arg, default=(8, 4), help="kernel group gM,gN")
    return parse_paired(parser, argv)


def prepare_layer(
    entry: dict[str, Any], args: argparse.Namespace, work: Path
) -> Callable[[], dict[str, Any]]:
    """Every variant's build of one layer, checked; returned, what times them interleaved with
    torch (:func:`paired.checked_builds`)."""
    from paired import Build, checked_builds
    from sparse_layers import Layer

    layer = Layer(entry, args.threads, work / entry["label"].replace(":", "_"))
    weight, scheme = layer.pruned(args.pattern, args.kept, args.group, 0)
    if not weight.any():
        raise SystemExit(f"{entry['label']}: {args.pattern} at {args.kept:.3g} kept leaves nothing")
    builds = [
        Build(variant, {"variant": variant}, weight, scheme, args.group, variant)
        for variant in args.variants
    ]
    return checked_builds(layer, entry["label"], builds, args.rounds, args.both_ways)


def schedule_differences(rows: list[dict[str, Any]]) -> list[str]:
    """Per row, the chosen schedule's fields that some other row's schedule does not share."""
    keys = sorted({key for row in rows for key in row["schedule"]})
    varying = [k for k in keys if len({json.dumps(r["schedule"].get(k)) for r in rows}) > 1]
    return [
        ", ".join(f"{k} {row['schedule'].get(k)}" for k in varying) or "the same" for row in rows
    ]


def report(result: dict[str, Any], out: Path) -> None:
    """``out``.json (every number) and ``out``.md (the table a reader compares)."""
    from common import markdown_table, write_json
    from paired import paired_ratio_text

    write_json(out.with_suffix(".json"), result)
    m = result["machine"]
    table = [
        [
            layer["layer"],
            f"`{row['variant']}`",
            chosen,
            row["sparsity"]["kept_fraction"],
            row["seconds"] * 1e3,
            row["time_vs_first"],
            row["fraction_of_rate"],
        ]
        for layer in result["layers"]
        for row, chosen in zip(layer["rows"], schedule_differences(layer["rows"]), strict=True)
    ]
    text = [
        "# Sparse schedule knobs, paired",
        "",
        f"Command: `{result['command']}` ({result['date']}).",
        "",
        f"Machine: {m['cpu']}, {m['threads_used']} threads; clip {result['clip']}"
        + (f" (H and W divided by {result['shrink']})" if result["shrink"] > 1 else "")
        + f", pattern {result['pattern']} at {result['kept']:.3g} kept, group "
        f"{result['group'][0]}x{result['group'][1]}. Per layer, every variant's library "
        f"(`--sparse-schedule`) and torch's dense conv3d (the faster layout) ran interleaved over "
        f"{result['rounds']} rounds; 'time / first' is {paired_ratio_text(result, 'variant')} "
        "(below 1: faster), 'of rate' the speedup over torch divided by the "
        "FLOPs rate (dense MACs / kept MACs); 'schedule' the chosen schedule's fields that differ "
        "between the variants (the manifest's `schedules`; 'the same' where none does).",
        "",
        markdown_table(
            ["layer", "variant", "schedule", "kept", "ms", "time / first", "of rate"], table
        ),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(text))
    print("\n".join(text))


def main(argv: list[str] | None = None) -> None:
    """Times every layer's variants; a bad knob ends the run naming it, before any timing."""
    args = _args(argv)
    from paired import run_layers

    settings = {"pattern": args.pattern, "kept": args.kept, "group": list(args.group)}
    run_layers(
        "schedule_ab.py", args, settings, lambda e, work: prepare_layer(e, args, work), report
    )


if __name__ == "__main__":
    main()
