"""Unpruned Conv3d layers of C3D and R(2+1)D-18: ours against PyTorch, onnxruntime, Adams2019.

Reproduce (about 15 minutes on 2 cores). Adams2019 runs only on the layers named, with a narrow
beam: its default beam (32) did not finish one C3D layer in 8 minutes on this 2-core machine.

    python bench/conv_layers.py --threads 2 --adams-layers c3d.conv3a --adams-beam 4

Every conv of C3D and every distinct conv shape of R(2+1)D-18 at a 3x16x112x112 clip, batch 1.
Shapes come from the pruning subpackage's model definitions (traced on the meta device), so they are
the networks the project prunes. Writes bench/results/conv_layers.{json,md,png}.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from common import model_conv_shapes, set_threads, to_spec  # noqa: E402

MODELS = ("c3d", "r2plus1d_18")


def layer_list(
    clip: tuple[int, int, int], models: tuple[str, ...] = MODELS
) -> list[dict[str, Any]]:
    """C3D's convs, then R(2+1)D-18's distinct shapes (with how often each occurs), of those of
    ``models`` (only they are traced: a clip may fit one model and not the other)."""
    layers = []
    if "c3d" in models:
        layers = [{**e, "model": "c3d", "count": 1} for e in model_conv_shapes("c3d", clip)]
    distinct: dict[tuple, dict[str, Any]] = {}
    for entry in model_conv_shapes("r2plus1d_18", clip) if "r2plus1d_18" in models else ():
        key = tuple(v for k, v in entry.items() if k != "name")
        if key in distinct:
            distinct[key]["count"] += 1
        else:
            distinct[key] = {**entry, "model": "r2plus1d_18", "count": 1}
    return layers + list(distinct.values())


class LayerPeers:
    """The same layer, weights and input prepared for every peer, each peer's output checked
    (:meth:`check`)."""

    def __init__(
        self, entry: dict[str, Any], work: Path, threads: int, adams_beam: int | None
    ) -> None:
        import numpy as np
        import onnxruntime as ort
        import torch
        from common import build_conv_layer

        import rt3d_halide

        self.spec = to_spec(entry, "conv")
        rng = np.random.default_rng(0)
        self.weight = rng.standard_normal(self.spec.weight_shape).astype(np.float32) * 0.05
        # A conv without one (R(2+1)D-18's) gets none: the generators refuse a bias it lacks.
        bias = rng.standard_normal(self.spec.out_channels).astype(np.float32)
        self.bias = bias if self.spec.has_bias else None
        self.x = rng.standard_normal(self.spec.input_shape()).astype(np.float32)
        built = build_conv_layer(self.spec, self.weight, self.bias, work, "layer")
        model_path = built["model"]  # for onnxruntime
        self.build_seconds = built["seconds"]
        self.library_bytes = built["library_bytes"]
        self.function = built["function"]  # the build's kernel and schedule choice
        self.ours = rt3d_halide.load(built["dir"])["conv"]
        self.out = np.empty(self.spec.output_shape(), np.float32)

        self.x_ncdhw = torch.from_numpy(self.x).permute(0, 4, 1, 2, 3).contiguous()

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.ort = ort.InferenceSession(
            str(model_path), options, providers=["CPUExecutionProvider"]
        )
        self.x_ort = self.x_ncdhw.numpy()
        self.adams = None
        self.adams_out = np.empty(self.spec.output_shape(), np.float32)
        if adams_beam is not None:
            self.adams = _adams_callable(
                self.spec, self.weight, self.bias, threads, adams_beam, self.x, self.adams_out
            )

    def peers(self) -> dict[str, Any]:
        from common import torch_conv_peers

        peers = {
            "ours": lambda: self.ours(self.x, out=self.out),
            **torch_conv_peers(self.x, self.weight, self.bias, self.spec),
            "onnxruntime": lambda: self.ort.run(None, {"x": self.x_ort}),
        }
        if self.adams is not None:
            peers["adams2019"] = self.adams
        return peers

    def check(self, label: str) -> float:
        """Our relative error against float64 torch; a wrong peer stops the run
        (:func:`common.checked_error`): onnxruntime and Adams2019 are checked too (torch is the
        reference). Outputs are poisoned first."""
        import numpy as np
        from common import checked_error

        def error(name: str, out: np.ndarray) -> float:
            return checked_error(name, out, self.x, self.weight, self.bias, self.spec)

        self.out.fill(np.nan)
        self.ours(self.x, out=self.out)
        ours = error(label, self.out)
        (ort_out,) = self.ort.run(None, {"x": self.x_ort})
        error(f"{label} (onnxruntime)", ort_out.transpose(0, 2, 3, 4, 1))
        if self.adams is not None:
            self.adams_out.fill(np.nan)
            self.adams()
            error(f"{label} (Adams2019)", self.adams_out)
        return ours


def _adams_callable(spec, weight, bias, threads: int, beam: int, x, out):
    """Halide's Adams2019 autoscheduler on our algorithm (same weights baked), JIT-compiled: a
    call reads ``x`` and writes ``out`` (NTHWC arrays, as our kernels take them)."""
    import halide as hl
    import numpy as np
    from rt3d_halide.generators.conv3d_dense import DenseConv3dGenerator

    hl.load_plugin(str(Path(hl.install_dir()) / "lib64" / "libautoschedule_adams2019.so"))
    target = hl.get_host_target()
    params = hl.AutoschedulerParams(
        "Adams2019", {"parallelism": str(threads), "beam_size": str(beam)}
    )
    with tempfile.TemporaryDirectory() as tmp:
        arrays = Path(tmp) / "w.npz"
        np.savez(arrays, weight=weight, **({} if bias is None else {"bias": bias}))
        with hl.GeneratorContext(target, params):
            gen = DenseConv3dGenerator({"spec": spec.to_json(), "weights": str(arrays)})
            pipeline = gen._build_pipeline()
            pipeline.apply_autoscheduler(target, params)
            args = [
                gen._get_input_parameter(a.name)._to_argument()
                for a in gen._get_arginfos()
                if a.dir == hl.ArgInfoDirection.Input
            ]
            fn = pipeline.compile_to_callable(args, target)
    x_buffer, out_buffer = hl.Buffer(x), hl.Buffer(out)
    return lambda: fn(x_buffer, out_buffer)


PEAK_RSS_SNIPPET = """
import sys, json, pathlib, tempfile
sys.path.insert(0, {bench!r})
from common import set_threads
from conv_layers import LayerPeers, _status_kib
set_threads({threads})
entry = json.loads({entry!r})
entry = {{k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()}}
with tempfile.TemporaryDirectory() as tmp:
    fn = LayerPeers(entry, pathlib.Path(tmp), {threads}, None).peers()[{peer!r}]
    fn()
    before = _status_kib("VmRSS")
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    fn()
    peak = _status_kib("VmHWM")
print(json.dumps({{"peak_rss_growth_kib": peak - before}}))
"""


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory(entry: dict[str, Any], peer: str, threads: int) -> float:
    """MiB a call's peak RSS rises above the RSS before it (second call, fresh process per peer).

    Linux resets the peak (VmHWM) on ``echo 5 > /proc/self/clear_refs``, so what is measured is the
    call's own transient memory: workspace, im2col buffers, temporaries.
    """
    plain = {k: v for k, v in entry.items() if k not in ("model", "count", "name")}
    code = PEAK_RSS_SNIPPET.format(
        bench=str(BENCH_DIR), threads=threads, entry=json.dumps(plain), peer=peer
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_growth_kib"] / 1024


def workspace_bytes(layer: LayerPeers, threads: int) -> int:
    """Our extra memory beyond input and output, by the kernel the build chose: dense code's
    per-thread zero-padded input slab; the sparse planar kernel's padded copy and one accumulator
    per thread; the quads' padded copy, or nothing when they read the input in place."""
    import halide as hl
    from rt3d_halide.generators.conv3d_quads import PaddedChannels
    from rt3d_halide.generators.conv3d_sparse import pattern_shares
    from rt3d_halide.generators.schedules import pads_within_rows
    from rt3d_halide.generators.sparse_choice import choose_sparse_schedule, task_blocks
    from rt3d_halide.generators.sparse_schedules import flat_extent

    spec, function = layer.spec, layer.function
    if function["kernel"] == "sparse":
        ((target, described),) = function["schedules"].items()
        if described["input_layout"] == "interleaved":
            return 0
        if described["input_layout"] == "interleaved_copy":
            return 4 * PaddedChannels.of(spec).size
        group = tuple(function["sparsity"]["group"])
        shares = pattern_shares(layer.weight, group)
        sched = choose_sparse_schedule(hl.Target(target), spec, group, "", *shares)
        groups = -(-spec.out_channels // group[0]) // sched.slices
        positions = task_blocks(spec, sched.layout, sched.task_rows, sched.x_tile) * sched.x_tile
        accumulator = group[0] * groups * positions
        return 4 * (flat_extent(spec, sched) + accumulator * threads)
    if not pads_within_rows(spec):
        return 0
    padded_w = spec.in_size[2] + spec.pads_begin[2] + spec.pads_end[2]
    rows = spec.dilation[1] * (spec.kernel[1] - 1) + 1
    frames = spec.dilation[0] * (spec.kernel[0] - 1) + 1
    return 4 * spec.in_channels * padded_w * rows * frames * threads


def layer_label(text: str) -> str:
    """An argparse type for a layer as this report names it, ``model.layer``; ``model:layer``
    (the other scripts' spelling) is taken too."""
    return text.replace(":", ".", 1)


def main(argv: list[str] | None = None) -> None:
    from common import (
        add_out_arg,
        add_timing_args,
        as_argument_error,
        bench_parser,
        clip_arg,
        positive_int,
    )

    parser = bench_parser(__doc__)
    add_timing_args(parser, rounds=7, each="layer")
    parser.add_argument("--clip", type=clip_arg, default=(16, 112, 112), help="model input T,H,W")
    parser.add_argument(
        "--layers",
        nargs="*",
        type=layer_label,
        help="only these, space-separated (model.layer or model:layer, e.g. c3d.conv2), "
        "default all",
    )
    parser.add_argument(
        "--adams-layers",
        nargs="*",
        type=layer_label,
        default=["c3d.conv3a"],
        help="layers that also get Halide's Adams2019 autoscheduler (minutes each here); "
        "only those among --layers run",
    )
    parser.add_argument("--adams-beam", type=positive_int, default=4, help="Adams2019 beam_size")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-RSS subprocesses")
    add_out_arg(parser, "conv_layers", ".json", ".md", ".png")
    args = parser.parse_args(argv)
    set_threads(args.threads)

    import torch

    torch.set_num_threads(args.threads)
    from common import (
        invocation,
        machine_info,
        measure_fma_peak,
        require_matplotlib,
        torch_best,
        write_json,
    )

    models = MODELS
    if args.layers:
        named = tuple(m for m in MODELS if any(label.startswith(f"{m}.") for label in args.layers))
        models = named or MODELS  # no known model named: every layer's name for the refusal
    layers = as_argument_error(parser, lambda: layer_list(args.clip, models))  # a --clip misfit
    labels = {f"{entry['model']}.{entry['name']}" for entry in layers}
    # Every Adams layer of a traced model (or of no known model) is checked, then those not
    # among --layers are left out: a typo must not pass as a layer not run.
    not_traced = set(MODELS) - set(models)
    checked = [a for a in args.adams_layers or () if a.split(".")[0] not in not_traced]
    unknown = sorted((set(args.layers or ()) | set(checked)) - labels)
    if unknown:
        parser.error(
            f"no layer {unknown[0]!r} (R(2+1)D-18's repeated shapes go by their first name); "
            f"choose from {', '.join(sorted(labels))}"
        )
    adams_layers = [a for a in args.adams_layers or () if not args.layers or a in args.layers]
    require_matplotlib()
    peak = measure_fma_peak(args.threads)
    print(f"FMA peak on {args.threads} threads: {peak / 1e9:.1f} GFLOP/s", flush=True)
    rows: list[dict[str, Any]] = []
    for entry in layers:
        label = f"{entry['model']}.{entry['name']}"
        if args.layers and label not in args.layers:
            continue
        with tempfile.TemporaryDirectory(prefix="rt3d-bench-") as tmp:
            beam = args.adams_beam if label in adams_layers else None
            layer = LayerPeers(entry, Path(tmp), args.threads, beam)
            err = layer.check(label)
            times = time_peers(layer, args.rounds)
        flops = 2.0 * layer.spec.macs()
        torch_ms = torch_best(times)
        row = {
            "layer": label,
            "count_in_model": entry["count"],
            "shape": _shape_text(entry),
            "gmacs": layer.spec.macs() / 1e9,
            "ms": {k: v * 1e3 for k, v in times.items()},
            "gflops_ours": flops / times["ours"] / 1e9,
            "peak_fraction_ours": flops / times["ours"] / peak,
            "speedup_vs_torch": torch_ms / times["ours"],
            "speedup_vs_onnxruntime": times["onnxruntime"] / times["ours"],
            "rel_error_vs_float64": err,
            "build_seconds": layer.build_seconds,
            "library_bytes": layer.library_bytes,
            "kernel": layer.function["kernel"],
            "workspace_bytes_ours": workspace_bytes(layer, args.threads),
        }
        if "adams2019" in times:
            row["speedup_vs_adams2019"] = times["adams2019"] / times["ours"]
        if not args.no_memory:
            row["peak_rss_growth_mib"] = {
                p: peak_memory(entry, p, args.threads) for p in ("ours", "torch", "onnxruntime")
            }
        rows.append(row)
        print(
            f"{label:28s} {row['gmacs']:6.2f} GMAC  ours {row['ms']['ours']:8.2f} ms "
            f"({row['gflops_ours']:5.1f} GFLOP/s, {100 * row['peak_fraction_ours']:4.1f}% peak)  "
            f"x{row['speedup_vs_torch']:.2f} vs torch  x{row['speedup_vs_onnxruntime']:.2f} vs ort",
            flush=True,
        )
    result = {
        "benchmark": "conv_layers",
        **invocation("conv_layers.py"),
        "machine": machine_info(args.threads),
        "adams2019": {"layers": adams_layers, "beam_size": args.adams_beam},
        "fma_peak_gflops": peak / 1e9,
        "clip": list(args.clip),
        "chosen_layers": args.layers or None,
        "layers": rows,
        "summary": summarize(rows),
    }
    write_json(args.out.with_suffix(".json"), result)
    write_report(result, args.out)
    print(f"wrote {args.out}.json/.md/.png")


def time_peers(layer: LayerPeers, rounds: int) -> dict[str, float]:
    from common import time_interleaved

    return time_interleaved(layer.peers(), rounds=rounds, warmup=1)


def _shape_text(entry: dict[str, Any]) -> str:
    k = "x".join(map(str, entry["kernel"]))
    s = "" if entry["stride"] == (1, 1, 1) else " s" + "x".join(map(str, entry["stride"]))
    t, h, w = entry["in_size"]
    return f"{entry['in_channels']}->{entry['out_channels']} k{k}{s} @{t}x{h}x{w}"


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from common import torch_best

    summary: dict[str, Any] = {}
    for model in ("c3d", "r2plus1d_18"):
        mine = [r for r in rows if r["layer"].startswith(model + ".")]
        if not mine:
            continue
        ours = sum(r["ms"]["ours"] * r["count_in_model"] for r in mine)
        torch_ms = sum(torch_best(r["ms"]) * r["count_in_model"] for r in mine)
        ort_ms = sum(r["ms"]["onnxruntime"] * r["count_in_model"] for r in mine)
        summary[model] = {
            "ours_ms": ours,
            "torch_ms": torch_ms,
            "onnxruntime_ms": ort_ms,
            "speedup_vs_torch": torch_ms / ours,
            "speedup_vs_onnxruntime": ort_ms / ours,
            "min_layer_speedup_vs_torch": min(r["speedup_vs_torch"] for r in mine),
        }
    return summary


def write_report(result: dict[str, Any], out: Path) -> None:
    from common import markdown_table

    rows = result["layers"]
    headers = [
        "layer",
        "shape",
        "kernel",
        "GMAC",
        "ours ms",
        "torch ms",
        "torch CL ms",
        "ort ms",
        "GFLOP/s",
        "% peak",
        "x torch",
        "x ort",
        "x Adams",
        "workspace KiB",
        "peak RSS MiB ours/torch/ort",
    ]
    table_rows = []
    for r in rows:
        mem = r.get("peak_rss_growth_mib")
        table_rows.append(
            [
                r["layer"] + (f" (x{r['count_in_model']})" if r["count_in_model"] > 1 else ""),
                r["shape"],
                r["kernel"],
                r["gmacs"],
                r["ms"]["ours"],
                r["ms"]["torch"],
                r["ms"]["torch_channels_last"],
                r["ms"]["onnxruntime"],
                r["gflops_ours"],
                100 * r["peak_fraction_ours"],
                r["speedup_vs_torch"],
                r["speedup_vs_onnxruntime"],
                r.get("speedup_vs_adams2019", "-"),
                r["workspace_bytes_ours"] / 1024,
                "/".join(f"{mem[p]:.0f}" for p in ("ours", "torch", "onnxruntime")) if mem else "-",
            ]
        )
    summary_rows = [
        [
            m,
            s["ours_ms"],
            s["torch_ms"],
            s["onnxruntime_ms"],
            s["speedup_vs_torch"],
            s["speedup_vs_onnxruntime"],
            s["min_layer_speedup_vs_torch"],
        ]
        for m, s in result["summary"].items()
    ]
    text = [
        "# Unpruned Conv3d layers: rt3d-halide vs PyTorch (oneDNN), onnxruntime, Adams2019",
        "",
        f"Command: `{result['command']}` ({result['date']}).",
        f"Machine: {result['machine']['cpu']}, {result['machine']['threads_used']} threads, "
        f"measured FMA peak {result['fma_peak_gflops']:.1f} GFLOP/s.",
        f"Clip 3x{'x'.join(map(str, result['clip']))}, batch 1. Medians of interleaved rounds. "
        "'x torch' is against the faster of torch's NCDHW and channels_last_3d runs. "
        "'kernel' is the build's choice for an unpruned layer (dense tiling; the sparse kernel "
        "for temporal-only Kx1x1 layers on AVX2 and NEON, see `rt3d_halide/kernel_choice.py`). "
        "Workspace is our only memory beyond input and output (dense: the per-thread "
        "zero-padded input slab; sparse: its padded input copy and per-thread accumulators, "
        "none when it reads the input in place; weights are constants in the library). "
        "'x torch', 'x ort' and 'x Adams' are speedups, the peer's time over ours. 'peak RSS "
        "MiB': how far one call's peak resident memory rises above the memory before it, "
        "per peer in a fresh process (its second call): the call's own temporaries, 0 when "
        "under 1 MiB.",
        "",
        markdown_table(headers, table_rows),
        "",
        (
            "Sums over the layers --layers chose, not whole models"
            if result.get("chosen_layers")
            else "Whole-model sums"
        )
        + " (each distinct R(2+1)D shape weighted by how often it occurs):",
        "",
        markdown_table(
            ["model", "ours ms", "torch ms", "ort ms", "x torch", "x ort", "worst layer x torch"],
            summary_rows,
        ),
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(text))
    clip = "x".join(str(v) for v in result["clip"])
    plot(rows, out.with_suffix(".png"), result["fma_peak_gflops"], clip)


def plot(rows: list[dict[str, Any]], path: Path, peak_gflops: float, clip: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["layer"].replace("r2plus1d_18.", "r21d.") for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.5 * len(rows)), 4.5))
    xs = range(len(rows))
    width = 0.27
    from common import TORCH_LAYOUTS

    best = {"torch": lambda ms: min(ms[name] for name in TORCH_LAYOUTS)}
    for i, peer in enumerate(("ours", "torch", "onnxruntime")):
        time_of = best.get(peer, lambda ms, peer=peer: ms[peer])
        gflops = [2 * r["gmacs"] / (time_of(r["ms"]) / 1e3) for r in rows]
        ax.bar([x + (i - 1) * width for x in xs], gflops, width, label=peer)
    ax.axhline(peak_gflops, color="k", ls="--", lw=1, label="FMA peak")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("GFLOP/s (dense)")
    ax.set_title(f"Dense Conv3d, batch 1, {clip} clip (torch: the faster layout)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
