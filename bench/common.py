"""What every benchmark here shares: interleaved timing, the machine's FMA peak, result files.

Peers run in the same process on the same inputs, interleaved round by round (so a slow minute
hurts every peer alike), each timed call after 20 ms of calls of the same peer (not in the wake
of another peer's threads), and each is reported by its median after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rt3d_halide.generators.spec import Conv3dSpec

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class BenchHelpFormatter(
    argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter
):
    """``--help`` shows the module docstring as written (its commands, what it writes) and every
    flag's default."""


# The arguments the script's parser last parsed (None: none yet): what :func:`invocation`
# records, so that a main(argv) called from code states its own arguments, not its caller's.
_parsed_args: list[str] | None = None


class BenchParser(argparse.ArgumentParser):
    """Records the arguments it parses, for :func:`invocation` (subparsers parse through
    ``parse_known_args``: the top-level call records the whole line)."""

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:  # type: ignore[override]
        global _parsed_args
        _parsed_args = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, namespace)


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    return BenchParser(description=doc, formatter_class=BenchHelpFormatter)


def require_matplotlib() -> None:
    """Checked before the timing runs, not after them at the plot (the tables were written and
    the run then ended in a ModuleNotFoundError)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit(
            "error: the report's plot needs matplotlib: pip install -e '.[bench]' (the bench "
            "extra; keep torch==2.13.0)"
        ) from None


def set_threads(threads: int) -> None:
    """Before any runtime starts its pool: Halide, OpenMP (torch, oneDNN) and onnxruntime.

    OpenMP keeps its default wait policy, as a torch user has it: each timed call follows its
    own peer's calls (``SETTLE_SECONDS``), not another peer's spinning workers. Passive waiting
    (the setting here before that) made torch's workers sleep after every parallel region: its
    channels-last conv3d on R(2+1)D-18's 288 -> 128 3x1x1 conv took 2.87-2.91 against 2.72-2.74
    ms in alternate processes (Zen 5, settled), and 2.72-2.82 ms in the sparse-layers and
    temporal-quads runs with passive waiting against 2.53-2.62 ms in those without.
    """
    os.environ["HL_NUM_THREADS"] = str(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def clip_arg(text: str) -> tuple[int, int, int]:
    """``--clip T,H,W`` (the model input's frames, height, width), as every script takes it."""
    try:
        clip = tuple(int(v) for v in text.split(","))
    except ValueError:
        clip = ()
    if len(clip) != 3 or min(clip) < 1:
        raise argparse.ArgumentTypeError(f"needs three positive integers T,H,W, not {text!r}")
    return clip  # type: ignore[return-value]


def model_conv_shapes(model_name: str, clip: tuple[int, int, int]) -> list[dict[str, Any]]:
    """Each Conv3d's static description, traced with forward hooks on the meta device."""
    import torch
    from rt3d_halide.pruning.models import build_model

    model = build_model(model_name, num_classes=101).to("meta").eval()
    found: list[dict[str, Any]] = []

    def hook(module: torch.nn.Conv3d, inputs: tuple[torch.Tensor, ...], _out: Any) -> None:
        _, cin, t, h, w = inputs[0].shape
        found.append(
            {
                "module": module,
                "in_channels": cin,
                "out_channels": module.out_channels,
                "in_size": (t, h, w),
                "kernel": tuple(module.kernel_size),
                "stride": tuple(module.stride),
                "dilation": tuple(module.dilation),
                "pads": tuple(module.padding),
                "bias": module.bias is not None,
            }
        )

    names = {m: n for n, m in model.named_modules()}
    handles = [
        m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv3d)
    ]
    try:
        with torch.no_grad():
            model(torch.empty((1, 3, *clip), device="meta"))
    except RuntimeError as exc:
        shape = ",".join(map(str, clip))
        sys.exit(f"error: --clip {shape} does not fit {model_name}: {exc}".splitlines()[0])
    for h in handles:
        h.remove()
    for entry in found:
        entry["name"] = names[entry.pop("module")]
    return found


def to_spec(entry: dict[str, Any], fn_name: str) -> Conv3dSpec:
    from rt3d_halide.generators.spec import Conv3dSpec

    return Conv3dSpec(
        fn_name,
        entry["in_channels"],
        entry["out_channels"],
        entry["in_size"],
        entry["kernel"],
        entry["stride"],
        entry["dilation"],
        entry["pads"],
        entry["pads"],
        entry["bias"],
        False,
    )


def build_conv_layer(
    spec: Any,
    weight: np.ndarray,
    bias: np.ndarray | None,
    work: Path,
    tag: str,
    *,
    sparsity: tuple[str, tuple[int, int]] | None = None,
    target: str = "host",
    name: str = "layer",
    **options: Any,
) -> dict[str, Any]:
    """One conv (node ``conv``) saved as ``work/<tag>.onnx``, with ``rt3d.sparsity`` metadata
    declaring ``sparsity`` (scheme, group) when given, and built by the real build into
    ``work/<tag>`` (``options``: ``kernel``, ``schedule``, ...): its directory, ONNX model,
    manifest entry, build seconds and library bytes."""
    import onnx
    from rt3d_halide.pruning.patterns import SPARSITY_METADATA_KEY, sparsity_metadata

    from rt3d_halide.build import build
    from rt3d_halide.layer_model import conv_layer_onnx

    metadata = None
    if sparsity is not None:
        metadata = {SPARSITY_METADATA_KEY: sparsity_metadata({"w": sparsity})}
    model = work / f"{tag}.onnx"
    onnx.save(conv_layer_onnx(spec, weight, bias, metadata=metadata), str(model))
    started = time.perf_counter()
    out = build(model, target, work / tag, name=name, quiet=True, **options)
    seconds = time.perf_counter() - started
    manifest = json.loads((out / "manifest.json").read_text())
    (function,) = manifest["functions"]
    return {
        "dir": out,
        "model": model,
        "function": function,
        "seconds": seconds,
        "library_bytes": (out / manifest["library"]).stat().st_size,
    }


# Seconds of untimed calls of a peer before each of its timed calls. A call timed straight after
# another peer's ran slower for a few milliseconds, up to 2.6 times as long on short calls: after
# torch's (its OpenMP workers spin on the cores the next peer needs, and passive waiting removed
# most of it in one harness but not in another), and, once torch had run in the process, after
# another of our libraries. R(2+1)D-18's 3x1x1 conv at a third kept (KGS 8x4, 1.05 ms a call on 2
# threads, Zen 5) took 1.6-2.9 ms for the first four calls after torch's and 1.8-2.6 ms
# alternating with copies of itself and torch; C3D conv2 at a sixth kept, timed straight after
# torch, 14.7 against 10.8-11.2 ms; three rows of one AVX-512 sparse-layers run fell to 33-42 % of
# the rate, where the committed run gives 73-81 %. Settled, four copies of one library and torch
# ran 1.06 ms each. Idling instead (20 ms before each call) let the cores clock down: R(2+1)D-18's
# 1x3x3 conv at 0.44 kept took 9.4 against 4.6 ms, torch 14.7 against 8.4 ms.
SETTLE_SECONDS = 0.02


# Steps the search for a balanced cycle of rounds may take before it settles for the Williams
# design: the cycle is found in milliseconds up to 18 peers; from 19 the budget runs out (about
# a second).
BALANCED_CYCLE_STEPS = 200_000


def balanced_orders(count: int) -> list[list[int]]:
    """Orders of ``count`` peers, one per round, run back to back in a cycle: every peer
    directly follows every other one exactly once per cycle of ``count - 1`` rounds, the joins
    between rounds (and from the last round back to the first) included. Found by a search;
    past ``BALANCED_CYCLE_STEPS`` (more peers than any benchmark here times), a Williams design,
    which balances the followers within rounds only (:func:`williams_orders`).

    Rounds that each start one peer further along a fixed order keep every peer's neighbours:
    with four or more peers, a peer follows the same one in every round but those it starts.
    The Williams design alone left the joins fixed: a peer followed one particular other peer
    at every join it took part in."""
    if count < 3:
        return [list(range(count))]
    total = count * (count - 1)
    sequence, used, steps = [0], set(), 0

    def extend() -> bool:
        nonlocal steps
        steps += 1
        if steps > BALANCED_CYCLE_STEPS:
            return False
        position, last = len(sequence), sequence[-1]
        if position == total:
            return (last, sequence[0]) not in used
        in_round = set(sequence[position - position % count :])
        candidates = [
            peer
            for peer in range(count)
            if peer not in in_round and peer != last and (last, peer) not in used
        ]
        # Peers with the most followers left first: the cycle rarely paints itself into a corner.
        candidates.sort(key=lambda peer: -sum((peer, q) not in used for q in range(count)))
        for peer in candidates:
            used.add((last, peer))
            sequence.append(peer)
            if extend():
                return True
            sequence.pop()
            used.discard((last, peer))
        return False

    if not extend():
        return williams_orders(count)
    return [sequence[i : i + count] for i in range(0, total, count)]


def williams_orders(count: int) -> list[list[int]]:
    """A Williams design: every peer directly follows every other one equally often within the
    rounds (once each over ``count`` rounds, or twice over ``2 * count`` with the mirrored rows
    when ``count`` is odd)."""
    if count < 2:
        return [list(range(count))]
    first = [0]
    for j in range(1, count):
        first.append((j + 1) // 2 if j % 2 else count - j // 2)
    rows = [[(peer + shift) % count for peer in first] for shift in range(count)]
    if count % 2:
        rows += [row[::-1] for row in rows]
    return rows


def interleaved_samples(
    peers: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each peer's call per round, calls interleaved: round ``i`` of two peers ran
    side by side, so their per-round ratio cancels the machine's drift. Each timed call follows
    ``SETTLE_SECONDS`` of calls of the same peer, as in an app that runs its model frame after
    frame, rather than the previous peer's wake.

    Round ``i`` takes the peers in :func:`balanced_orders`' order ``i``, and the untimed
    warm-up in the cycle's last, so that each peer follows each other one equally often, the
    first timed call included (over whole cycles of ``peers - 1`` rounds: the paired scripts'
    11 rounds come close for four to six peers). Settling does not remove all of the previous
    peer's wake. In a fixed order the first peer ran after the last (torch's
    channels-last conv in the paired scripts and sparse_layers) every round: three identical
    builds of one layer, paired (Intel Xeon, 9 rounds, KGS 8x4 unbalanced at a sixth kept, C3D
    conv2, conv3b, conv4b and R(2+1)D-18's 128 -> 288 1x3x3), ran the second and third at
    0.95-1.00 of the first's time (median 0.99), and on R(2+1)D-18's 64 -> 144 1x3x3 at
    0.87-0.94. Rounds that only started one peer further along (2026-11-28, before this design)
    left the first build after torch's convs in every round, and the later builds still read
    1-2 % faster (0.94 on the 64 -> 144 conv); with rounds in a Williams design, balanced within
    rounds only, 0.977-1.018 (median 0.995) over two runs of those five layers; with this cycle,
    the joins balanced too, 0.973-1.003 (median 0.996) in one run."""
    items = list(peers.items())
    orders = balanced_orders(len(items))
    for _ in range(warmup):
        for peer in orders[-1]:
            items[peer][1]()
    samples: dict[str, list[float]] = {name: [] for name in peers}
    for index in range(rounds):
        for peer in orders[index % len(orders)]:
            name, fn = items[peer]
            settled = time.perf_counter() + SETTLE_SECONDS
            fn()
            while time.perf_counter() < settled:
                fn()
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def median_ratio(samples: dict[str, list[float]], name: str, reference: str) -> float:
    """The median per-round time ratio of ``name`` against ``reference`` in
    :func:`interleaved_samples`' rounds."""
    pairs = zip(samples[name], samples[reference], strict=True)
    return statistics.median(a / b for a, b in pairs)


def time_interleaved(
    peers: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds per call of each peer, calls interleaved round-robin."""
    samples = interleaved_samples(peers, rounds, warmup)
    return {name: statistics.median(s) for name, s in samples.items()}


def time_in_passes(
    peer_sets: Sequence[Callable[[], dict[str, Callable[[], Any]]]],
    rounds: int,
    passes: int,
    on_pass: Callable[[int, int, dict[str, float]], None] | None = None,
) -> list[list[dict[str, float]]]:
    """Per set of peers (each made afresh by its callable), the peers' medians
    (:func:`time_interleaved`, ``rounds`` rounds) in each of ``passes`` passes through all sets;
    :func:`fastest_pass` reduces them.

    On this shared 2-core machine a library sometimes ran 20-35 % slower through a whole row of
    the sparse-layers benchmark while torch, in the same rounds, did not (several consecutive
    rows, then gone; reruns of those rows ran at the others' speed). A later pass gives such a
    set a second chance, and every peer the same one. ``on_pass(number, index, seconds)``
    reports each pass's medians."""
    if passes < 1 or rounds < 1:
        raise ValueError(f"passes and rounds must be >= 1, not {passes} and {rounds}")
    timed: list[list[dict[str, float]]] = [[] for _ in peer_sets]
    for number in range(1, passes + 1):
        for index, make in enumerate(peer_sets):
            seconds = time_interleaved(make(), rounds)
            timed[index].append(seconds)
            if on_pass is not None:
                on_pass(number, index, seconds)
    return timed


def fastest_pass(passes: list[dict[str, float]]) -> dict[str, float]:
    """Each peer's fastest median over the passes of :func:`time_in_passes`: interference only
    ever slows a call down."""
    return {name: min(seconds[name] for seconds in passes) for name in passes[0]}


def _checked_number(
    text: str, convert: Callable[[str], Any], ok: Callable[[Any], bool], need: str
) -> Any:
    """``text`` converted, or argparse's error saying what the flag ``need``s."""
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"needs {need}, not {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type for counts (threads, rounds, passes) that must be at least 1."""
    return _checked_number(text, int, lambda v: v >= 1, "a positive integer")


def kept_fraction(text: str) -> float:
    """An argparse type for a kept fraction: in (0, 1] (0 kept nothing, past 1 more than all)."""
    return _checked_number(text, float, lambda v: 0 < v <= 1, "a kept fraction in (0, 1]")


def kept_fractions(text: str) -> list[float]:
    """An argparse type for comma-separated kept fractions, each in (0, 1]; '' for none
    (``opencl_gpu.py prepare``'s runs of ``--variants`` rows alone)."""
    return [kept_fraction(part) for part in text.split(",")] if text else []


def positive_seconds(text: str) -> float:
    """An argparse type for a duration that must be positive and finite ('inf' sampled
    forever)."""
    return _checked_number(
        text, float, lambda v: 0 < v < float("inf"), "a positive, finite number of seconds"
    )


def as_argument_error(parser: argparse.ArgumentParser, call: Callable[[], Any]) -> Any:
    """``call()``, whose one-line refusal (a SystemExit, "error: ..." or not) about what the
    arguments name ends the script as argparse's error line, exit status 2, before any work."""
    try:
        return call()
    except SystemExit as exc:
        parser.error(str(exc.code).removeprefix("error: "))


def seed_arg(text: str) -> int:
    """An argparse type for a seed numpy takes (a negative one failed after the pruning)."""
    return _checked_number(text, int, lambda v: v >= 0, "a non-negative integer")


def group_arg(text: str) -> tuple[int, int]:
    """An argparse type for a kernel group gM,gN."""
    from rt3d_halide.generators.conv3d_sparse import parse_group

    try:
        return parse_group(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def runnable_target(text: str) -> str:
    """An argparse type for one Halide target whose code this machine runs (the scripts time
    it here): the build's own target checks (:func:`rt3d_halide.targets.parse_target`), then
    the checks of loading its library, made before any build."""
    from rt3d_halide.errors import BuildError
    from rt3d_halide.targets import missing_cpu_features, parse_target, runs_here

    try:
        targets = parse_target(text).targets
    except BuildError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if len(targets) > 1:
        raise argparse.ArgumentTypeError(f"{text!r}: name one target, not a list")
    (target,) = targets
    if not runs_here(target):
        raise argparse.ArgumentTypeError(f"{text!r} does not run on this machine")
    missing = missing_cpu_features(target)
    if missing:
        raise argparse.ArgumentTypeError(
            f"{text!r} needs CPU features this machine lacks: {', '.join(missing)}"
        )
    return text.strip()  # as parse_target read it: hl.Target(" host") fails


def add_timing_args(
    parser: argparse.ArgumentParser, rounds: int, each: str, passes: bool = False
) -> None:
    """``--threads`` and ``--rounds`` (timed rounds per ``each``: a row, a layer, a conv), and
    for scripts timing in passes (:func:`time_in_passes`) ``--passes``."""
    parser.add_argument(
        "--threads", type=positive_int, default=2, help="CPU threads (ours and torch)"
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=rounds, help=f"timed rounds per {each} (median)"
    )
    if passes:
        parser.add_argument(
            "--passes",
            type=positive_int,
            default=2,
            help=f"passes over every {each}; each peer keeps its fastest pass's median",
        )


def writable_report(suffixes: tuple[str, ...] = ("",)) -> Callable[[str], Path]:
    """An argparse type for where a report goes: ``--out`` plus each of ``suffixes`` (its stem's
    suffix replaced; "" for the path itself) is a file the script writes. Its folder is made and
    written to now, and each file must be a file it may write, so that a wrong ``--out`` ends
    the script before its builds and timings, not after them. One of the files named whole
    (``run.json``) stands for its stem; a stem with another suffix of its own
    (``opencl_gpu.h200``, ``ab_0.167``) is refused: the suffixes would replace it and write
    other files, a committed report's among them."""

    def report_path(text: str) -> Path:  # argparse names the type by it
        path = Path(text)
        if not path.name or path.name in (".", "..") or text.endswith(("/", os.sep)):
            raise argparse.ArgumentTypeError(f"{text!r} names a folder, not a report file")
        if path.suffix and any(suffixes):
            if path.suffix not in suffixes:
                written = ", ".join(path.stem + suffix for suffix in suffixes)
                raise argparse.ArgumentTypeError(
                    f"{text!r} is a stem, and its {path.suffix!r} would be replaced "
                    f"(the files written would be {written}): give it without a dot"
                )
            path = path.with_suffix("")  # one of the files written, named whole: its stem
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".rt3d-write-probe-"):
                pass
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot write to {path.parent}: {exc}") from None
        for suffix in suffixes:
            target = path.with_suffix(suffix) if suffix else path
            if target.is_dir():
                raise argparse.ArgumentTypeError(f"{target} is a directory, not a report file")
            if target.exists() and not os.access(target, os.W_OK):
                raise argparse.ArgumentTypeError(f"cannot write to {target}: not writable")
        return path

    return report_path


def add_out_arg(parser: argparse.ArgumentParser, name: str, *suffixes: str) -> None:
    """``--out``: the stem of the result files written (``suffixes``, by default .json and .md),
    by default ``results/<name>`` (the committed ones)."""
    suffixes = suffixes or (".json", ".md")
    written = " and ".join(filter(None, [", ".join(suffixes[:-1]), suffixes[-1]]))
    parser.add_argument(
        "--out",
        type=writable_report(suffixes),
        default=RESULTS_DIR / name,
        help=f"stem of the {written} written",
    )


TORCH_LAYOUTS = ("torch", "torch_channels_last")


def torch_conv_peers(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, spec: Any) -> dict:
    """torch's dense conv3d on ``x`` (N, T, H, W, C, as our kernels take it) in both of torch's
    memory layouts, NCDHW (``torch``) and channels_last_3d (``torch_channels_last``).

    oneDNN's speed depends on the layout (C3D conv2: 181 ms NCDHW, 155 ms channels-last in
    bench/results/conv_layers.md), and a
    user would run the faster one: every "x torch" here is against :func:`torch_best`."""
    import torch

    x_ncdhw = torch.from_numpy(x).permute(0, 4, 1, 2, 3).contiguous()
    x_cl = x_ncdhw.to(memory_format=torch.channels_last_3d)
    w_t = torch.from_numpy(weight)
    # A model converted to channels_last_3d holds its weights that way too: given the NCDHW
    # weight, every channels-last call copied it first (28 MB on C3D conv4b, conv5a, conv5b).
    w_cl = w_t.to(memory_format=torch.channels_last_3d)
    b_t = None if bias is None else torch.from_numpy(bias)

    def peer(inp: Any, w: Any) -> Callable[[], Any]:
        def run() -> None:
            with torch.no_grad():
                torch.nn.functional.conv3d(inp, w, b_t, spec.stride, spec.pads_begin, spec.dilation)

        return run

    return {"torch": peer(x_ncdhw, w_t), "torch_channels_last": peer(x_cl, w_cl)}


def torch_best(seconds: dict[str, float]) -> float:
    """The faster of torch's two layouts (:func:`torch_conv_peers`)."""
    return min(seconds[name] for name in TORCH_LAYOUTS)


def error_vs_float64(
    out: np.ndarray, x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, spec: Any
) -> float:
    """Relative L2 error of ``out`` (N, T, H, W, C) against torch's conv3d in float64."""
    import torch

    ref = torch.nn.functional.conv3d(
        torch.from_numpy(x).permute(0, 4, 1, 2, 3).double(),
        torch.from_numpy(weight).double(),
        None if bias is None else torch.from_numpy(bias).double(),
        spec.stride,
        spec.pads_begin,
        spec.dilation,
    )
    ref = ref.permute(0, 2, 3, 4, 1).numpy()
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


# Float32 sums of up to 13824 products (C3D conv4b) stay near 1e-6 of float64's: past this, a
# kernel is wrong, not imprecise.
MAX_RELATIVE_ERROR = 1e-4


def checked_error(
    label: str,
    out: np.ndarray,
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    spec: Any,
) -> float:
    """:func:`error_vs_float64`, stopping the run past ``MAX_RELATIVE_ERROR``: a wrong kernel's
    time would mean nothing."""
    error = error_vs_float64(out, x, weight, bias, spec)
    if not error <= MAX_RELATIVE_ERROR:
        raise SystemExit(
            f"{label}: relative error {error:.3g} against float64 torch "
            f"(more than {MAX_RELATIVE_ERROR:g}); not timing a wrong kernel"
        )
    return error


def kept_macs_and_rate(sparsity: dict[str, Any]) -> tuple[float, float]:
    """(kept MACs per sample, FLOPs rate: dense MACs over kept MACs) of a manifest entry's
    ``sparsity``. Both count kept weights, not the lanes that pad a group."""
    dense_macs = sparsity["dense_macs_per_sample"]
    kept_macs = sparsity["kept_fraction"] * dense_macs
    return kept_macs, dense_macs / max(kept_macs, 1)


def break_even(points: list[tuple[float, float]]) -> float | None:
    """Where a least-squares line through (the sparse code's share of the dense MACs, sparse time /
    our dense time) reaches 1: the manifest's ``sparse_fraction``, which the build's rule
    weighs. Each time is its code's fastest pass (:func:`fastest_pass`), so a slow spell of
    either code in one pass does not skew its ratio. sparse_layers passes the unpruned layer's
    point (share 1, or past 1 where padded lanes are computed), so that the crossing is
    interpolated, not extrapolated from the pruned rows; opencl_gpu has no unpruned sparse row
    and says where its crossing lies outside the shares measured; each row is one point, so a
    share measured by several rows weighs more.
    Above 1: sparse code wins even with nothing pruned. None when the line does not rise (fixed
    costs swamp the kept entries) or fewer than two shares were measured."""
    line = line_through(points)
    if line is None or line[1] <= 0:
        return None
    intercept, slope = line
    return (1 - intercept) / slope


def line_through(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(intercept, slope) of the least-squares line through ``(x, y)`` points; None with fewer
    than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    xs, ys = zip(*points, strict=True)
    slope, intercept = np.polyfit(xs, ys, 1)
    return float(intercept), float(slope)


def measure_fma_peak(threads: int, seconds: float = 0.5) -> float:
    """fp32 FLOP/s of independent FMA chains held in registers, on ``threads`` threads.

    A Halide pipeline keeps 12 vector accumulators per task (enough to cover FMA latency on two
    pipes) and iterates ``acc = acc * a + b``; it is compiled for the host like the layers.
    """
    import halide as hl  # here, not above: the GPU machine runs bench/opencl_gpu.py without it

    target = hl.get_host_target()
    lanes = target.natural_vector_size(hl.Float(32))
    accumulators, iters = 12, 20000
    tasks = threads * 8
    x, t = hl.Var("x"), hl.Var("t")
    r = hl.RDom([hl.Range(0, iters)])
    acc = hl.Func("acc")
    acc[x, t] = hl.f32(x + t) * hl.f32(1e-6)
    acc[x, t] = acc[x, t] * hl.f32(0.999999) + hl.f32(1e-7) + hl.f32(0) * hl.f32(r.x)
    out = hl.Func("out")
    out[x, t] = acc[x, t]
    width = lanes * accumulators
    out.bound(x, 0, width).parallel(t).vectorize(x, lanes).unroll(x)
    acc.compute_at(out, t).store_in(hl.MemoryType.Register)
    acc.vectorize(x, lanes).unroll(x)
    acc.update().reorder(x, r.x).vectorize(x, lanes).unroll(x)
    fn = out.compile_to_callable([], target)
    buf = hl.Buffer(hl.Float(32), [width, tasks])
    os.environ.setdefault("HL_NUM_THREADS", str(threads))
    fn(buf)
    flops = 2.0 * width * tasks * iters
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        fn(buf)
        best = max(best, flops / (time.perf_counter() - start))
    return best


def machine_info(threads: int) -> dict[str, Any]:
    import halide as hl

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads_used": threads,
        "halide_host_target": hl.get_host_target().to_string(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "versions": _versions(("halide", "torch", "onnxruntime")),
    }


def _versions(packages: tuple[str, ...]) -> dict[str, str]:
    """The installed versions of the peers and tools a result depends on (oneDNN comes with
    torch's version)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in packages:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def _commit() -> str:
    """The code measured: the commit of the checkout that the imported rt3d_halide comes from
    (not necessarily this bench/ folder's), marked dirty where its code (results aside) has
    changes, untracked files included; "unknown" outside a checkout of its own."""
    import rt3d_halide

    root = Path(rt3d_halide.__file__).resolve().parent.parent

    def git(*args: str) -> str:
        command = ["git", "-C", str(root), *args]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return "unknown"
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", ".", ":(exclude)bench/results")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def invocation(script: str) -> dict[str, str]:
    """The command that reproduces this run, and its date: every report states both, so a
    reader can rerun it and tell which code it measured."""
    args = sys.argv[1:] if _parsed_args is None else _parsed_args
    return {
        "command": shlex.join(["python", f"bench/{script}", *args]),
        "date": time.strftime("%Y-%m-%d"),
        "commit": _commit(),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
