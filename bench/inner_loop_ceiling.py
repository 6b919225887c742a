"""The sparse kernel's inner loop alone, in C, on one core: the ceiling of its block shapes.

Each block shape (output channels x vectors of positions) runs a chunk-sized list of entries with
every input in L1 (``inner_loop.c``), against the core's FMA peak (the same FMAs held in
registers, run by every shape's binary; the highest of their medians), interleaved round by
round; once more with every input vector aligned, and once as a layer meets the list: swept over
the blocks of a chunk of input (the family's ``CHUNK_BYTES``), each block reading new lines from
L2. What it answers:
how close to the peak can a kernel that broadcasts one weight per channel and loads its inputs
as vectors get on this CPU, before any cache miss, copy or loop overhead of a real layer? Also
the two in-place kernels of temporal-only layers (R(2+1)D-18's 288-channel 3x1x1 conv, every
group over one block's inputs in L1, 144 KiB of weights streaming from L2): one broadcast input
float per FMA, against four input channels per 16-byte load (``conv3d_quads``), and the same
quads from a quad-blocked copy of the block's inputs (frame, quad, position, 4 channels: one
vector load holds 4 channels of several positions, each output channel's 4 weights are broadcast
instead), with the time of making that copy of the conv's whole input: a layout the generator
does not build, as its copy costs about what its loop saves (docs/speed.md). x86 with gcc: AVX2 and
FMA, or ``--isa avx512`` for the loops in 16-float vectors with AVX-512's 32 registers (the
quads in the generated code's block; the broadcast loop is AVX2 code only).

    python bench/inner_loop_ceiling.py            # writes bench/results/inner_loop.{md,json}
    python bench/inner_loop_ceiling.py --isa avx512 --rounds 9 \\
        --out bench/results/inner_loop_avx512
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from common import invocation, machine_info, markdown_table, write_json  # noqa: E402

# Per ISA: the vector width, gcc's flags and the block shapes (lanes, vectors). AVX2: 12
# accumulators need lanes x vectors = 12 of its 16 registers. AVX-512: the x86 schedules' 8
# channels x 3 vectors fill 24 of 32, beside their neighbours in registers.
ISAS = {
    "avx2": (8, ["-mavx2", "-mfma"], ((4, 3), (4, 2), (8, 1), (2, 5), (2, 6))),
    "avx512": (16, ["-mavx512f", "-mavx2", "-mfma"], ((8, 3), (8, 2), (4, 6), (8, 1), (16, 1))),
}
# Temporal-only modes of inner_loop.c per ISA: (label, FMAs, loads) per entry (broadcast) or per
# quad and group of 8 channels. "blocked" is not a kernel of the generator: quads from a
# quad-blocked copy, the ceiling of that layout (inner_loop.c); mode "copy" times making it.
IN_PLACE = {
    "avx2": {
        "broadcast": ("8 channels as lanes x 14 positions, a broadcast input each", 14, 16),
        "quads": ("2 channels x 4 input channels per vector, 3 positions x 4 accumulators", 12, 8),
        "blocked": (
            "blocked copy: 2 positions x 4 input channels per vector, "
            "2 passes of 4 channels x 3 vectors",
            24,
            16,
        ),
    },
    "avx512": {
        "quads": ("4 channels x 4 input channels per vector, 10 positions x 2 vectors", 20, 13),
        "blocked": (
            "blocked copy: 4 positions x 4 input channels per vector, "
            "2 passes of 4 channels x 6 vectors",
            48,
            22,
        ),
    },
}


def missing_isa_features(isa: str) -> list[str]:
    """The CPU features ``isa``'s code needs that this machine lacks (its binaries would die of
    an illegal instruction)."""
    import halide as hl

    host = hl.get_host_target()
    if host.arch != hl.TargetArch.X86:
        return ["an x86 CPU"]
    needed = [hl.TargetFeature.AVX2, hl.TargetFeature.FMA]
    if isa == "avx512":
        needed.append(hl.TargetFeature.AVX512)
    return [feature.name for feature in needed if not host.has_feature(feature)]


def _build(isa: str, shape: tuple[int, int], tmp: Path) -> Path:
    width, flags, _ = ISAS[isa]
    lanes, vectors = shape
    exe = tmp / f"inner_{lanes}x{vectors}"
    cmd = ["gcc", "-O3", *flags, f"-DWIDTH={width}", f"-DLANES={lanes}", f"-DVECTORS={vectors}"]
    subprocess.run([*cmd, str(BENCH_DIR / "inner_loop.c"), "-o", str(exe)], check=True)
    return exe


def _run(exe: Path, mode: str) -> dict[str, Any]:
    """The binary's JSON line for ``mode``: GFLOP/s and the bytes of the input its loop read, or
    for mode "copy" the milliseconds and bytes of one copy."""
    out = subprocess.run([str(exe), mode], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main(argv: list[str] | None = None) -> None:
    from common import add_out_arg, bench_parser, positive_int

    parser = bench_parser(__doc__)
    parser.add_argument(
        "--rounds", type=positive_int, default=5, help="interleaved rounds (median)"
    )
    parser.add_argument(
        "--isa", choices=sorted(ISAS), default="avx2", help="vector ISA the loop is built for"
    )
    add_out_arg(parser, "inner_loop")
    args = parser.parse_args(argv)
    if shutil.which("gcc") is None:
        sys.exit("error: gcc not found (this benchmark compiles inner_loop.c)")
    missing = missing_isa_features(args.isa)
    if missing:
        sys.exit(f"error: --isa {args.isa} needs {', '.join(missing)}, which this CPU lacks")
    _, _, shapes = ISAS[args.isa]
    in_place_modes = IN_PLACE[args.isa]
    with tempfile.TemporaryDirectory() as tmp:
        exes = {shape: _build(args.isa, shape, Path(tmp)) for shape in shapes}
        samples: dict[tuple[tuple[int, int], str], list[float]] = {}
        input_bytes: dict[str, int] = {}
        copy_ms: list[float] = []
        copy_bytes = swept_bytes = 0
        for round_ in range(args.rounds):
            for shape, exe in exes.items():
                for mode in ("peak", "entries", "aligned", "swept"):
                    result = _run(exe, mode)
                    samples.setdefault((shape, mode), []).append(result["gflops"])
                    if mode == "swept":
                        swept_bytes = result["input_bytes"]
            for mode in in_place_modes:
                result = _run(exes[shapes[0]], mode)
                samples.setdefault(((0, 0), mode), []).append(result["gflops"])
                input_bytes[mode] = result["input_bytes"]
            copy = _run(exes[shapes[0]], "copy")
            copy_ms.append(copy["ms"])
            copy_bytes = copy["bytes"]
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    peak = max(statistics.median(samples[(shape, "peak")]) for shape in shapes)
    swept_kib = swept_bytes / 1024
    rows, records = [], []
    for shape in shapes:
        lanes, vectors = shape
        gflops = statistics.median(samples[(shape, "entries")])
        aligned = statistics.median(samples[(shape, "aligned")])
        swept = statistics.median(samples[(shape, "swept")])
        loads = 1 + vectors + lanes  # offset, inputs, weight broadcasts
        rows.append(
            [
                f"{lanes} x {vectors}",
                lanes * vectors,
                loads,
                gflops,
                100 * gflops / peak,
                100 * aligned / peak,
                100 * swept / peak,
            ]
        )
        records.append(
            {
                "lanes": lanes,
                "vectors": vectors,
                "gflops": gflops,
                "fraction_of_peak": gflops / peak,
                "aligned_fraction_of_peak": aligned / peak,
                "swept_fraction_of_peak": swept / peak,
            }
        )
    headers = ["block (channels x vectors)", "FMAs / entry", "loads / entry", "GFLOP/s", "% peak"]
    table = markdown_table([*headers, "% peak, aligned inputs", "% peak, swept from L2"], rows)
    run = invocation("inner_loop_ceiling.py")
    report = (
        "# The sparse kernel's inner loop alone: ceiling per block shape\n\n"
        f"Command: `{run['command']}` ({run['date']}); {args.isa}, one core, "
        f"{machine_info(1)['cpu']}, inputs in L1 (84 entries over 16 KiB), medians of "
        f"{args.rounds} interleaved rounds. Core FMA peak (registers only): {peak:.1f} GFLOP/s. "
        "'Swept from L2': the same list run over the blocks of a chunk of "
        f"{swept_kib:.0f} KiB, the family's chunk, each block one block further along every "
        "entry's input, so that each reads lines the one before did not (the order of a "
        "layer's entry loop).\n\n"
        f"{table}\n"
    )
    in_place = []
    for mode, (label, fmas, loads) in in_place_modes.items():
        gflops = statistics.median(samples[((0, 0), mode)])
        kib = input_bytes[mode] / 1024
        in_place.append([label, fmas, loads, kib, gflops, 100 * gflops / peak])
        records.append(
            {
                "in_place": mode,
                "gflops": gflops,
                "fraction_of_peak": gflops / peak,
                "input_bytes": input_bytes[mode],
            }
        )
    headers = ["kernel", "FMAs", "loads", "input KiB", "GFLOP/s", "% peak"]
    report += (
        "\nTemporal-only layers: 16 groups of 8 output channels pass over one block's inputs "
        "while 144 KiB of weights stream from L2. FMAs and loads per entry (broadcast) or per "
        "quad and group; 'input KiB': the inputs the loop reads (the blocked copy's: 3 frames "
        "of its block's positions; making the copy is timed apart, below).\n\n"
        f"{markdown_table(headers, in_place)}\n\n"
        "Making the blocked copy, once per call: that conv's whole input "
        f"({copy_bytes / 1e6:.1f} MB, 8 frames of 28 x 28 x 288 channels) took "
        f"{statistics.median(copy_ms):.3f} ms on one core (median; both buffers warm, in L3).\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(report)
    write_json(
        args.out.with_suffix(".json"),
        {
            **run,
            "isa": args.isa,
            "machine": machine_info(1),
            "peak_gflops": peak,
            "blocked_copy_ms": statistics.median(copy_ms),
            "shapes": records,
        },
    )
    print(report)


if __name__ == "__main__":
    main()
