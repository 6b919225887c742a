"""Temporal-only convs unpruned: the sparse kernel's in-place quads against our dense code.

On AVX2 and NEON the build gives every temporal-only Kx1x1 conv (K > 1) the sparse kernel, pruned
or not (``rt3d_halide.kernel_choice.quads_beat_dense``): read in place as quads it beats the dense
tiling even with every weight kept; on AVX-512 it does not (``TEMPORAL_QUADS_OFF_FAMILIES``). This
measures that claim on each distinct such conv of a model, with unpruned random weights: both
builds' outputs are checked against float64 torch, then timed interleaved; the ratio is the median
of per-round sparse over dense times (the machine's drift between rounds cancels). torch's dense
conv3d runs in the same rounds for scale.

    python bench/temporal_quads.py --rounds 31    # writes bench/results/temporal_quads.{md,json}
    python bench/temporal_quads.py --rounds 31 --target x86-64-linux-avx2-fma-f16c-sse41 \\
        --out bench/results/temporal_quads_avx2_on_zen5   # AVX2 code on an AVX-512 machine
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

KERNELS = ("dense", "sparse")


def distinct_temporal_convs(model: str, clip: tuple[int, int, int]) -> list[dict[str, Any]]:
    """The model's Kx1x1 convs (K > 1), one per distinct shape, in model order."""
    from common import model_conv_shapes, to_spec
    from rt3d_halide.generators.layout import interleaved_fits

    seen, found = set(), []
    for entry in model_conv_shapes(model, clip):
        spec = to_spec(entry, "conv")
        key = (spec.in_channels, spec.out_channels, spec.in_size, spec.kernel, spec.stride)
        if interleaved_fits(spec) and spec.kernel[0] > 1 and key not in seen:
            seen.add(key)
            found.append(entry)
    return found


def time_conv(entry: dict[str, Any], work: Path, rounds: int, target: str) -> dict[str, Any]:
    import numpy as np
    from common import (
        build_conv_layer,
        checked_error,
        interleaved_samples,
        median_ratio,
        to_spec,
        torch_best,
        torch_conv_peers,
    )

    import rt3d_halide

    spec = to_spec(entry, "conv")
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal(spec.weight_shape) * 0.1).astype(np.float32)
    bias = rng.standard_normal(spec.out_channels).astype(np.float32) if entry["bias"] else None
    x = rng.standard_normal(spec.input_shape()).astype(np.float32)
    peers: dict[str, Any] = {}
    for kernel in KERNELS:
        built = build_conv_layer(spec, weight, bias, work, kernel, kernel=kernel, target=target)
        fn = rt3d_halide.load(built["dir"])["conv"]
        if kernel == "sparse":
            (schedule,) = fn.entry["schedules"].values()
            if schedule["input_layout"] != "interleaved":
                sys.exit(f"error: {entry['name']}: the sparse kernel did not read it in place")
        out = np.full(spec.output_shape(), np.nan, np.float32)
        fn(x, out=out)
        checked_error(f"{entry['name']} ({kernel})", out, x, weight, bias, spec)
        peers[kernel] = lambda fn=fn, out=out: fn(x, out=out)
    peers.update(torch_conv_peers(x, weight, bias, spec))
    samples = interleaved_samples(peers, rounds)
    seconds = {name: statistics.median(s) for name, s in samples.items()}
    return {
        "layer": entry["name"],
        "shape": f"{spec.in_channels}->{spec.out_channels} {'x'.join(map(str, spec.in_size))}"
        f" {spec.kernel[0]}x1x1 stride {spec.stride[0]}",
        "seconds": seconds,
        "sparse_over_dense": median_ratio(samples, "sparse", "dense"),
        "sparse_vs_torch": torch_best(seconds) / seconds["sparse"],
    }


def main(argv: list[str] | None = None) -> None:
    from common import add_out_arg, add_timing_args, bench_parser, clip_arg, runnable_target
    from rt3d_halide.pruning.models import MODELS

    parser = bench_parser(__doc__)
    parser.add_argument(
        "--model",
        default="r2plus1d_18",
        choices=sorted(MODELS),
        help="model whose 3x1x1 convs are timed",
    )
    parser.add_argument("--clip", type=clip_arg, default=(16, 112, 112), help="model input T,H,W")
    add_timing_args(parser, rounds=15, each="conv")

    def cpu_target(text: str) -> str:  # argparse names the type by it
        import halide as hl

        if hl.Target(runnable_target(text)).has_gpu_feature():
            raise argparse.ArgumentTypeError(
                f"{text!r} has a GPU feature: the in-place quads are CPU code"
            )
        return text

    parser.add_argument(
        "--target",
        type=cpu_target,
        default="host",
        help="Halide target of both builds (code this machine runs)",
    )
    add_out_arg(parser, "temporal_quads")
    args = parser.parse_args(argv)
    import halide as hl
    from common import set_threads

    set_threads(args.threads)
    import torch
    from common import invocation, machine_info, markdown_table, write_json

    from rt3d_halide.kernel_choice import temporal_rule_off

    torch.set_num_threads(args.threads)
    clip = args.clip
    convs = distinct_temporal_convs(args.model, clip)
    if not convs:
        parser.error(f"{args.model} has no temporal-only Kx1x1 conv with K > 1")
    target = hl.Target(args.target)
    # What --kernel auto builds for these convs unpruned for this target (the temporal-only rule
    # holds per target family, whatever the conv).
    rule_off = temporal_rule_off([target])
    rows = []
    for entry in convs:
        with tempfile.TemporaryDirectory(prefix="rt3d-bench-") as tmp:
            row = time_conv(entry, Path(tmp), args.rounds, args.target)
        row["auto_unpruned"] = "dense" if rule_off else "sparse"
        rows.append(row)
        ms = {k: v * 1e3 for k, v in row["seconds"].items()}
        print(
            f"{row['layer']:22s} {row['shape']:34s} dense {ms['dense']:7.2f} ms  sparse "
            f"{ms['sparse']:7.2f} ms  ratio {row['sparse_over_dense']:.3f}",
            flush=True,
        )
    ratios = [r["sparse_over_dense"] for r in rows]
    result = {
        "benchmark": "temporal_quads",
        **invocation("temporal_quads.py"),
        "machine": machine_info(args.threads),
        "model": args.model,
        "clip": list(clip),
        "rounds": args.rounds,
        "target": str(target),
        "rows": rows,
        "summary": {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)},
    }
    write_json(args.out.with_suffix(".json"), result)
    table = markdown_table(
        [
            "conv",
            "shape",
            "our dense ms",
            "sparse (quads) ms",
            "sparse / dense",
            "sparse x torch",
            "auto, unpruned",
        ],
        [
            [
                r["layer"],
                r["shape"],
                r["seconds"]["dense"] * 1e3,
                r["seconds"]["sparse"] * 1e3,
                r["sparse_over_dense"],
                r["sparse_vs_torch"],
                r["auto_unpruned"],
            ]
            for r in rows
        ],
    )
    summary = result["summary"]
    auto = sum(r["auto_unpruned"] == "sparse" for r in rows)
    rule = "TEMPORAL_QUADS_OFF_FAMILIES in rt3d_halide/kernel_choice.py"
    off = f"; {rule_off} ({rule})" if rule_off else ""
    text = (
        "# Temporal-only convs unpruned: in-place quads against our dense code\n\n"
        f"Command: `{result['command']}` ({result['date']}); {result['machine']['cpu']}, "
        f"{args.threads} threads, target `{result['target']}`; {args.model} at "
        f"{','.join(map(str, args.clip))}, each distinct "
        "Kx1x1 conv (K > 1) "
        "with unpruned random weights, outputs checked against float64 torch. 'sparse / dense' "
        f"is the median of {args.rounds} per-round ratios (a time ratio: below 1, the quads are "
        "faster); 'sparse x torch' is torch's dense conv3d time over the quads' (a speedup: "
        "above 1, the quads are faster); times are medians.\n\n"
        f"{table}\n\nSparse over dense: {summary['min']:.2f}-{summary['max']:.2f}, median "
        f"{summary['median']:.2f}; {sum(r < 1 for r in ratios)} of {len(ratios)} convs below 1. "
        f"With `--kernel auto` a build for this target gives {auto} of the {len(rows)} convs "
        f"sparse code whatever their pruning ('auto, unpruned'){off}.\n"
    )
    args.out.with_suffix(".md").write_text(text)
    print(f"wrote {args.out}.{{json,md}}")


if __name__ == "__main__":
    main()
