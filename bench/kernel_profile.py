"""Where each sparse layer's time goes, from perf's cpu-clock samples over the built library.

Halide names each parallel loop body after its loop (``..._par_for_output_s0_y_yo_task`` is a
task of output rows, ``..._flat_...`` the padded input copy). Inside the body that holds the
FMAs, the samples on the entry loop (the innermost loops around the FMAs) are the work the
pattern asks for; the rest of that body is the per-chunk accumulator passes and the output
transpose. What this script shows outside the entry loop is what a layout or schedule change can
still win; the entry loop's own speed (its FLOPs per second of its samples' share of the CPU
time, against the FMA peak) is to be set beside its ceiling in C, ``bench/inner_loop_ceiling.py``.

    python bench/kernel_profile.py                          # the layers below at 26 % kept
    python bench/kernel_profile.py --layers c3d:conv3b --kept 0.5 --out /tmp/p.md

Needs Linux ``perf`` (software cpu-clock events: no hardware counters) and an x86 host.
Writes bench/results/kernel_profile.md (``--out`` changes it).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

# perf report -n: percent, samples, shared object, [.] (user) or [k] (kernel), symbol.
REPORT_LINE = re.compile(r"^\s*([0-9.]+)%\s+([0-9]+)\s+(\S+)\s+\[(.)\]\s+(\S+)")
ANNOTATE_LINE = re.compile(r"^\s*([0-9.]+)\s*:\s*([0-9a-f]+):\s*(\S+)\s*(.*)$")
BRANCH_TARGET = re.compile(r"^([0-9a-f]+)\b")
# perf record -p starts sampling a moment after it is spawned: calls before that are lost.
PERF_ATTACH_SECONDS = 0.5


# The sparse benchmark's layers, C3D's first layer (3 input channels: the output write and
# transpose dominate) and its last (7x7 planes: the flat blocks round up the most).
PROFILED_LAYERS = (
    "c3d:conv1",
    "c3d:conv2",
    "c3d:conv3b",
    "c3d:conv4b",
    "c3d:conv5b",
    "r2plus1d_18:layer2.1.conv1.0.0",
    "r2plus1d_18:layer2.1.conv1.0.3",
)


def _args(argv: list[str] | None) -> argparse.Namespace:
    from common import (
        bench_parser,
        clip_arg,
        group_arg,
        kept_fraction,
        positive_int,
        positive_seconds,
        writable_report,
    )
    from sparse_layers import PATTERNS, checked_layers

    parser = bench_parser(__doc__)
    parser.add_argument(
        "--layers", default=",".join(PROFILED_LAYERS), help="model:conv names, comma-separated"
    )
    parser.add_argument(
        "--kept", type=kept_fraction, default=0.26, help="kept fraction of KGS units, in (0, 1]"
    )
    parser.add_argument(
        "--pattern",
        choices=PATTERNS,
        default="kgs_balanced",
        help="the sparse pattern, as in sparse_layers.py",
    )
    parser.add_argument("--group", type=group_arg, default=(8, 4), help="kernel group gM,gN")
    parser.add_argument("--clip", type=clip_arg, default=(16, 112, 112), help="model input T,H,W")
    parser.add_argument(
        "--threads", type=positive_int, default=2, help="CPU threads of the layer's calls"
    )
    parser.add_argument(
        "--seconds", type=positive_seconds, default=3.0, help="seconds of calls sampled"
    )
    parser.add_argument(
        "--out",
        type=writable_report(),
        default=BENCH_DIR / "results" / "kernel_profile.md",
        help="markdown report (the default path is the committed one)",
    )
    args = parser.parse_args(argv)
    args.layer_entries = checked_layers(parser, args, 1)
    return args


def sample_calls(call: Any, seconds: float, data: Path) -> tuple[int, float, float]:
    """perf attached to this process while it calls ``call`` for ``seconds``; the call count,
    the seconds they took and the CPU seconds of the process's threads meanwhile."""
    call()
    perf = subprocess.Popen(
        [
            "perf",
            "record",
            "-q",
            "-e",
            "cpu-clock",
            "-F",
            "4000",
            "-p",
            str(os.getpid()),
            "-o",
            str(data),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    calls = 0
    try:
        time.sleep(PERF_ATTACH_SECONDS)
        started, cpu_started = time.perf_counter(), time.process_time()
        while calls == 0 or time.perf_counter() - started < seconds:
            call()
            calls += 1
        elapsed = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
    finally:
        perf.send_signal(signal.SIGINT)
        _, err = perf.communicate(timeout=120)
    if perf.returncode not in (0, -signal.SIGINT) or not data.exists():
        raise SystemExit(f"perf record failed: {err.decode().strip()}")
    return calls, elapsed, cpu_seconds


def symbol_samples(data: Path, library: str) -> tuple[dict[str, int], int]:
    """Samples per symbol of the shared object ``library``, and all the process's samples."""
    text = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso,symbol", "--stdio",
         "-n"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout  # fmt: skip
    samples: dict[str, int] = {}
    every = 0
    for line in text.splitlines():
        if match := REPORT_LINE.match(line):
            every += int(match.group(2))
            if match.group(3) == library:
                samples[match.group(5)] = samples.get(match.group(5), 0) + int(match.group(2))
    return samples, every


def annotate(data: Path, symbol: str) -> list[tuple[int, float, str, str]]:
    """(address, percent of the symbol's samples, mnemonic, operands) per instruction."""
    text = subprocess.run(
        ["perf", "annotate", "-i", str(data), "--stdio", "-s", symbol],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = []
    for line in text.splitlines():
        match = ANNOTATE_LINE.match(line)
        if match:
            pct, addr, mnemonic, operands = match.groups()
            rows.append((int(addr, 16), float(pct), mnemonic, operands))
    return rows


def entry_loop_share(rows: list[tuple[int, float, str, str]]) -> float | None:
    """Share of a body's samples inside the innermost loops that hold its FMAs: every backward
    conditional jump spans a loop; those with FMAs and no smaller FMA loop inside count."""
    fmas = [a for a, _, m, _ in rows if m.startswith("vfmadd")]
    if not fmas:
        return None
    loops = []
    for addr, _, mnemonic, operands in rows:
        target = BRANCH_TARGET.match(operands)
        if mnemonic.startswith("j") and mnemonic != "jmp" and target:
            start = int(target.group(1), 16)
            if start < addr and any(start <= f <= addr for f in fmas):
                loops.append((start, addr))
    innermost = [
        (s, e)
        for s, e in loops
        if not any(
            (s2, e2) != (s, e) and s <= s2 and e2 <= e and any(s2 <= f <= e2 for f in fmas)
            for s2, e2 in loops
        )
    ]
    return sum(p for a, p, _, _ in rows if any(s <= a <= e for s, e in innermost))


def useful_share(spec: Any, schedule: dict[str, Any]) -> float:
    """Output positions over the positions the entry loop computes, from the build's host
    schedule (its manifest entry): tasks of whole rows (the last shifted inwards) cut into
    flat blocks, padding columns and the last block's tail included; copied quads, every row in
    blocks (the last shifted inwards); quads read in place, the flattened plane in blocks (the
    last shifted inwards); with the padding masked, runs of blocks over the whole output."""
    from rt3d_halide.generators.layout import FlatLayout, MaskedLayout
    from rt3d_halide.generators.sparse_choice import useful_positions

    rows, x_tile = schedule["task_rows"], schedule["x_tile"]
    _, out_h, out_w = spec.out_size
    if schedule["input_layout"] == "interleaved":
        computed = -(-out_h * out_w // x_tile) * x_tile
    elif schedule["input_layout"] == "interleaved_copy":
        computed = -(-out_h // rows) * rows * -(-out_w // x_tile) * x_tile
    else:
        masked = schedule.get("padding") == "masked"
        layout = MaskedLayout.of(spec) if masked else FlatLayout.of(spec)
        return useful_positions(spec, layout, (1, rows, 1), x_tile)
    return out_h * out_w / computed


def executed_macs(
    weight: Any, spec: Any, schedule: dict[str, Any], group: tuple[int, int]
) -> float:
    """The MACs a sample's entry loops run, on the positions they compute that are useful: per
    group of gM filters, every lane of each entry its KGS units keep (the planar kernel's
    entries are (input channel, tap); the quads' four input channels at a tap), and per output frame
    only the taps whose input frame lies in the clip where the schedule skips the temporal
    padding (the quads read in place always do). Unlike the manifest's nominal counts, which
    count the taps on the padding."""
    import numpy as np
    from rt3d_halide.generators.baking import frame_taps_inside, kept_entries
    from rt3d_halide.generators.conv3d_quads import QUAD, quad_start

    g_m = group[0]
    kept = kept_entries(np.asarray(weight, np.float32), group)  # the baked lists' entries
    channels, per_entry = kept.shape[1], 1
    if schedule["input_layout"] in ("interleaved", "interleaved_copy"):
        per_entry = QUAD  # each entry's quad: four channels from quad_start, as plan_quads
        quads = np.zeros_like(kept)
        for channel, start in enumerate(quad_start(np.arange(channels), channels)):
            quads[:, start] |= kept[:, channel]
        kept = quads
    entries = kept.sum(axis=(0, 1, 3, 4))  # per kernel frame
    skips = schedule["input_layout"] == "interleaved" or schedule.get("skip_frame_padding")
    out_t, out_h, out_w = spec.out_size
    frames = frame_taps_inside(spec).sum(axis=0) if skips else np.full(spec.kernel[0], out_t)
    return float(g_m * per_entry * np.dot(entries, frames) * out_h * out_w)


def copy_made(schedule: dict[str, Any]) -> str:
    """Where the layer's input copy runs: its own parallel loop before the tasks, inside each
    task (``task_copy_bytes``: its samples then fall in the task's loop body, with the passes
    and output), or nowhere (quads read in place)."""
    if schedule["input_layout"] == "interleaved":
        return "none"
    return "in each task" if schedule.get("copy_per_task") else "before the tasks"


def host_schedule(model: Any) -> dict[str, Any]:
    """The one layer's schedule as the build recorded it (one host target)."""
    (schedule,) = model.manifest["functions"][0]["schedules"].values()
    return schedule


def profile_layer(
    entry: dict[str, Any], args: argparse.Namespace, group: tuple[int, int], work: Path
) -> dict[str, Any]:
    """Shares of the layer library's samples (percent): entry loop, the rest of the loop body
    holding it, the input copy and everything else (other loop bodies, thread pool); and the
    entry loop's own speed: the FLOPs it runs (:func:`executed_macs`, over the share of the
    positions it computes that are useful) per second of its samples' share of the process's
    CPU time (``time.process_time`` over the sampled calls), over the threads. Taken as its
    share of a call's wall time, that time had also held what the call spends outside the
    library (Python's call, a thread waiting for the other's last task), which understated the
    loop's speed; the share of CPU time does not depend on when perf began sampling."""
    from sparse_layers import Layer

    import rt3d_halide

    layer = Layer(entry, args.threads, work)
    weight, scheme = layer.pruned(args.pattern, args.kept, group, 0)
    built = layer.build(weight, scheme, group, "sparse", "sparse")
    model = rt3d_halide.load(work / "sparse")  # the whole model: perf needs its shared object
    layer.check(model["conv"], weight)  # a wrong kernel's profile would mean nothing
    data = work / "perf.data"
    calls, seconds, cpu_seconds = sample_calls(layer.ours_peer(model["conv"]), args.seconds, data)
    samples, every = symbol_samples(data, model.shared_object.name)
    total = sum(samples.values())
    if total == 0:
        raise SystemExit(f"{entry['label']}: no samples landed in {model.shared_object.name}")
    row = {
        "layer": entry["label"],
        "kept_fraction": built["sparsity"]["kept_fraction"],
        "calls": calls,
        "useful_positions": 100 * useful_share(layer.spec, host_schedule(model)),
        "entry_loop": 0.0,
        "loop_body_rest": 0.0,
        "input_copy": 0.0,
        "copy_made": copy_made(host_schedule(model)),
        "other": 0.0,
    }
    for symbol, count in samples.items():
        share = 100 * count / total
        loop = entry_loop_share(annotate(data, symbol)) if "par_for" in symbol else None
        if loop is not None:
            row["entry_loop"] += share * loop / 100
            row["loop_body_rest"] += share * (100 - loop) / 100
        elif "_flat_" in symbol or "_padded_" in symbol:  # the planar or the quads' copy
            row["input_copy"] += share
        else:
            row["other"] += share
    row["ms_per_call"] = 1e3 * seconds / calls
    # The loop's CPU time per call, over the threads: comparable with the peak probe's rate on
    # the same threads.
    loop_cpu_seconds = cpu_seconds * total / every * row["entry_loop"] / 100
    loop_seconds = loop_cpu_seconds / calls / args.threads
    macs = executed_macs(weight, layer.spec, host_schedule(model), group)
    loop_flops = 2 * macs * layer.spec.input_shape()[0] / (row["useful_positions"] / 100)
    row["entry_loop_flops"] = loop_flops / loop_seconds if loop_seconds else 0.0
    return row


COLUMNS = {
    "layer": "layer",
    "kept_fraction": "kept",
    "useful_positions": "useful positions %",
    "entry_loop": "entry loop %",
    "loop_body_rest": "accumulator passes + output %",
    "input_copy": "input copy %",
    "copy_made": "copy made",
    "other": "other %",
    "calls": "calls sampled",
    "ms_per_call": "ms per call",
    "entry_loop_of_peak": "entry loop % of peak",
}


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    if platform.machine() not in ("x86_64", "AMD64"):
        # The entry loop is found by its x86 FMA instructions in perf's annotation: elsewhere
        # every sample would count as "other".
        raise SystemExit(f"this profile reads x86 code; this host is {platform.machine()}")
    if shutil.which("perf") is None:
        raise SystemExit("perf not found: install linux-perf (Debian) to profile")
    from common import invocation, machine_info, markdown_table, measure_fma_peak, set_threads

    set_threads(args.threads)
    group = args.group
    rows = []
    # Probed before and after the layers, the higher kept (as sparse_layers.py does: a probe
    # at the start of a run has read half the peak).
    first_peak = measure_fma_peak(args.threads)
    with tempfile.TemporaryDirectory(prefix="rt3d-profile-") as tmp:
        for i, entry in enumerate(args.layer_entries):
            row = profile_layer(entry, args, group, Path(tmp) / f"l{i}")
            rows.append(row)
            print(
                ", ".join(
                    row[key] if isinstance(row[key], str) else f"{title} {row[key]:.3g}"
                    for key, title in COLUMNS.items()
                    if key in row
                ),
                flush=True,
            )
    peak = max(first_peak, measure_fma_peak(args.threads))
    for row in rows:
        row["entry_loop_of_peak"] = 100 * row.pop("entry_loop_flops") / peak
    machine, run = machine_info(args.threads), invocation("kernel_profile.py")
    text = [
        "# Where a sparse layer's time goes (perf cpu-clock samples)",
        "",
        f"Command: `{run['command']}` ({run['date']}); {machine['cpu']}, {args.threads} threads, "
        f"{args.pattern} {group[0]},{group[1]} at {args.kept} kept, {args.seconds} s of calls "
        "per layer.",
        "",
        "Shares of the samples in the layer's library. *Useful positions*: output positions "
        "over the positions the entry loop computes (padding columns between rows, blocks "
        "rounded up); the entry loop's share includes that waste. A copy made in each task "
        "runs inside the task's loop body: its samples count with the passes and output. "
        "*Entry loop % of peak*: the FLOPs the entry loop runs (every lane of a group's kept "
        "entries, four channels per quad, no tap on the temporal padding where the code skips "
        "it; over the useful positions' share) per second of its samples' share of the "
        "process's CPU time, over the threads, against the FMA peak probe on "
        f"the same threads ({peak / 1e9:.0f} GFLOP/s): to compare with the loop's ceiling in C "
        "(`bench/inner_loop_ceiling.py`, one core), times taken under perf's sampling.",
        "",
        markdown_table(list(COLUMNS.values()), [[r[k] for k in COLUMNS] for r in rows]),
        "",
    ]
    args.out.write_text("\n".join(text))


if __name__ == "__main__":
    main()
