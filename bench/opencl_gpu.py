"""Dense against KGS and vanilla sparse code on a real GPU, through OpenCL (issue 4, section 4).

PoCL runs the OpenCL schedules on this machine's CPU, which says nothing of GPU speed, and the
GPU machine lent to some sessions has no Halide. So the benchmark has three steps:

    python bench/opencl_gpu.py prepare --bundle .gpu/bundle3   # here: build, link one timer
    python3 bench/opencl_gpu.py measure --bundle .gpu/bundle3 --json $OUT/opencl_gpu.json
                                                               # on the GPU machine
    python bench/opencl_gpu.py report opencl_gpu.json          # here: bench/results/opencl_gpu.*

as committed. The knob sweep (``bench/results/opencl_gpu_knobs.md``) was built with ``--patterns
'' --kept '' --variants '{};{"x_threads_inner": true};...'`` (its report quotes the whole
command) and reported with ``--out bench/results/opencl_gpu_knobs``; likewise
``opencl_gpu_old_order``, ``opencl_gpu_unpruned`` and ``opencl_gpu_narrow``, each report quoting
its commands and a note. ``measure --ocl-device-type cpu`` runs the steps on PoCL here, to
check a bundle before spending GPU time.

``prepare`` builds, with the real build, each layer of ``sparse_layers.py`` dense (``--kernel
dense``, unpruned weights) and sparse (``--kernel sparse``) for every pattern and kept fraction,
for ``x86-64-linux-avx2-fma-f16c-sse41-opencl``, and links them with ``opencl_timer.cpp`` into
one executable. Weights are drawn from {-2, -1, 1, 2} x 0.03: what is baked into the code must
travel compressed (the device tool carries 64 MiB), and the values do not change the time.

``measure`` (numpy and torch only) runs the timer: each function's output, poisoned with NaN
before its first call, is checked against torch's float64 conv3d on the masked weights; then all
functions are timed interleaved round by round, device-resident buffers, each sample ended by a
``halide_device_sync``. The peer is torch's dense conv3d on CUDA (cuDNN, ``benchmark`` on) in
float32 with TF32 off, the precision our kernels compute in, in both of torch's layouts (the
faster is reported); TF32 is timed too, for information. cuDNN skips no zeros, so it is timed
once per layer, on the unpruned weights. The bundle carries an ICD loader for machines whose own
would also list other platforms (:func:`_opencl_env`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import lzma
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

TARGET = "x86-64-linux-avx2-fma-f16c-sse41-opencl"
WEIGHT_STEP = 0.03
TIMER_SOURCE = BENCH_DIR / "opencl_timer.cpp"
ICD_LOADER = Path("/usr/lib/x86_64-linux-gnu/libOpenCL.so.1")


def _prepared_bundle(text: str) -> Path:
    """An argparse type for what ``prepare`` wrote, checked before the GPU is touched."""
    bundle = Path(text)
    missing = [name for name in ("plan.json", "arrays.npz") if not (bundle / name).is_file()]
    if missing:
        raise argparse.ArgumentTypeError(
            f"{bundle} lacks {' and '.join(missing)}: not a bundle that 'prepare' wrote"
        )
    return bundle


def _measured_json(text: str) -> Path:
    """An argparse type for what ``measure`` wrote: readable JSON with its rows and layers."""
    path = Path(text)
    try:
        result = json.loads(path.read_text())
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{path} is not JSON: {exc}") from None
    if not isinstance(result, dict) or not {"rows", "layers"} <= result.keys():
        raise argparse.ArgumentTypeError(f"{path} has no rows and layers: not what 'measure' wrote")
    return path


def _knob_objects(text: str) -> list[str]:
    """An argparse type for ``--variants``: ';'-separated JSON objects, each checked now and
    kept as written."""
    from rt3d_halide.pruning.config import json_object

    parts = [part.strip() for part in text.split(";") if part.strip()]
    for part in parts:
        json_object(part)
    return parts


def _args(argv: list[str] | None) -> argparse.Namespace:
    from common import (
        BenchHelpFormatter,
        add_out_arg,
        bench_parser,
        kept_fraction,
        positive_int,
        positive_seconds,
        writable_report,
    )
    from sparse_layers import add_row_args, pattern_names

    parser = bench_parser(__doc__)
    steps = parser.add_subparsers(dest="step", required=True)
    step = functools.partial(steps.add_parser, formatter_class=BenchHelpFormatter)
    prepare = step("prepare", help="build every row and link the timer (here)")
    prepare.add_argument("--bundle", type=Path, required=True, help="directory to write")
    add_row_args(prepare)
    prepare.add_argument(
        "--variants",
        type=_knob_objects,
        default=[],
        help="';'-separated JSON objects of OpenCL schedule knobs (the sparse code's "
        "SparseGpuKnobs), each also built per layer for the --variant-patterns rows at "
        "--variant-kept and, with the knobs dense code has (GpuConvKnobs), for the dense row "
        "(once per distinct set of them)",
    )
    prepare.add_argument(
        "--variant-kept",
        type=kept_fraction,
        default=1 / 3,
        help="kept fraction of the --variants rows, in (0, 1]",
    )
    prepare.add_argument(
        "--variant-patterns",
        type=pattern_names,
        default=["kgs_balanced", "kgs_unbalanced"],
        help="sparse patterns built per --variants entry beside the dense row ('' for none)",
    )
    measure = step("measure", help="check and time on the GPU machine")
    measure.add_argument(
        "--bundle", type=_prepared_bundle, required=True, help="what prepare wrote"
    )
    measure.add_argument(
        "--json", type=writable_report(), required=True, help="result file to write"
    )
    measure.add_argument("--rounds", type=positive_int, default=9, help="timed rounds (median)")
    measure.add_argument(
        "--min-seconds",
        type=positive_seconds,
        default=0.02,
        help="back-to-back calls per sample fill this",
    )
    measure.add_argument(
        "--ocl-device-type",
        default="gpu",
        help="HL_OCL_DEVICE_TYPE for Halide's OpenCL runtime ('cpu' tries the steps with PoCL)",
    )
    report = step("report", help="write bench/results/opencl_gpu.{json,md}")
    report.add_argument("json", type=_measured_json, help="what measure wrote")
    add_out_arg(report, "opencl_gpu")
    report.add_argument("--note", default="", help="a sentence kept in the results (context)")
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> None:
    from common import invocation, to_spec
    from rt3d_halide.pruning.patterns import unit_mask_to_weight_mask
    from sparse_layers import distinct_rows, find_layers, pattern_units

    clip = args.clip
    group = args.group
    bundle: Path = args.bundle
    if not ICD_LOADER.exists():
        raise SystemExit(f"{ICD_LOADER} missing: install ocl-icd-libopencl1 (the bundle takes it)")
    if bundle.exists():
        if any(bundle.iterdir()) and not (bundle / "plan.json").exists():
            raise SystemExit(f"{bundle} exists and holds no bundle: not overwriting it")
        shutil.rmtree(bundle)
    bundle.mkdir(parents=True)
    arrays: dict[str, np.ndarray] = {}
    layers: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    builds: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="rt3d-gpu-bench-") as tmp:
        work = Path(tmp)
        for li, entry in enumerate(find_layers(args.layers.split(","), clip, args.shrink)):
            spec = to_spec(entry, "conv")
            rng = np.random.default_rng(li)
            codes = rng.choice(np.array([-2, -1, 1, 2], np.int8), spec.weight_shape)
            bias = (rng.choice(np.array([-2, -1, 1, 2], np.int8), spec.out_channels)).astype(
                np.float32
            ) * np.float32(WEIGHT_STEP)
            arrays[f"codes{li}"], arrays[f"bias{li}"] = codes, bias
            layers.append(
                {
                    "layer": entry["label"],
                    "input_shape": list(spec.input_shape()),
                    "output_shape": list(spec.output_shape()),
                    "kernel": list(spec.kernel),
                    "stride": list(spec.stride),
                    "pads": list(spec.pads_begin),
                    "dilation": list(spec.dilation),
                }
            )
            dense_weight = codes.astype(np.float32) * np.float32(WEIGHT_STEP)
            variants = [("dense", 1.0, None, "")]
            measured, _ = distinct_rows(args.patterns, args.kept, spec.weight_shape, group)
            variants += [(pattern, kept, units, "") for _, pattern, kept, units in measured]
            varied = [
                (pattern, pattern_units(pattern, args.variant_kept, spec.weight_shape, group, 99))
                for pattern in args.variant_patterns
            ]
            dense_knobs_built = set()
            for knobs in args.variants:
                # A variant whose dense knobs repeat an earlier variant's (a sparse-only knob
                # such as input_layout) builds no second dense row: the bundle must stay small.
                if _dense_knobs(knobs) not in dense_knobs_built:
                    dense_knobs_built.add(_dense_knobs(knobs))
                    variants.append(("dense", 1.0, None, knobs))
                variants += [(p, args.variant_kept, units, knobs) for p, units in varied]
            for vi, (pattern, kept, units, knobs) in enumerate(variants):
                tag = f"l{li}_{vi}_{pattern}"
                if units is None:
                    weight, scheme, kernel = dense_weight, "dense", "dense"
                else:
                    mask = unit_mask_to_weight_mask(units, spec.weight_shape, group)
                    arrays[f"mask_{tag}"] = np.packbits(mask)
                    weight = np.where(mask, dense_weight, 0).astype(np.float32)
                    scheme = "vanilla" if pattern == "vanilla" else "kgs"
                    kernel = "sparse"
                built = _build(spec, weight, bias, scheme, group, kernel, knobs, tag, work)
                builds.append(built["dir"])
                rows.append(
                    {
                        "layer_index": li,
                        "layer": entry["label"],
                        "pattern": pattern,
                        "target_kept": kept,
                        "knobs": knobs,
                        "function": built["function"],
                        "mask": None if units is None else f"mask_{tag}",
                        "sparsity": built["sparsity"],
                        "schedule": built["schedule"],
                        "build_seconds": built["seconds"],
                        "library_bytes": built["library_bytes"],
                    }
                )
                print(f"built {tag} in {built['seconds']:.1f} s", flush=True)
        timer = _link_timer(builds, work)
        _compress(timer, bundle / "opencl_timer.xz")
    np.savez_compressed(bundle / "arrays.npz", **arrays)
    (bundle / "icd").mkdir()
    shutil.copy(ICD_LOADER, bundle / "icd" / ICD_LOADER.name)
    plan = {
        **invocation("opencl_gpu.py"),
        "target": TARGET,
        "clip": list(clip),
        "shrink": args.shrink,
        "group": list(group),
        "layers": layers,
        "rows": rows,
    }
    (bundle / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    print(f"bundle {bundle}: {len(rows)} functions, {size / 2**20:.1f} MiB")


def _build(spec, weight, bias, scheme, group, kernel, knobs, tag, work: Path) -> dict[str, Any]:
    from common import build_conv_layer

    built = build_conv_layer(
        spec,
        weight,
        bias,
        work,
        tag,
        sparsity=(scheme, group),
        target=TARGET,
        name=tag,  # function names unique across the rows linked into one timer
        kernel=kernel,
        schedule=_dense_knobs(knobs) if knobs else "",
        sparse_schedule=_sparse_knobs(knobs) if knobs else "",
    )
    function = built["function"]
    return {
        "dir": built["dir"],
        "function": function["name"],
        "sparsity": function["sparsity"],
        "schedule": next(iter(function["schedules"].values())),
        "seconds": built["seconds"],
        "library_bytes": built["library_bytes"],
    }


def _sparse_knobs(knobs: str) -> str:
    """A ``--variants`` object less ``lanes``, a dense OpenCL knob: sparse code runs the group's
    gM lanes (it took the knob and ignored it, as the committed tiles and old-order variants
    were built; it now refuses any other)."""
    return json.dumps({k: v for k, v in json.loads(knobs).items() if k != "lanes"}, sort_keys=True)


def _dense_knobs(knobs: str) -> str:
    """The knobs of a ``--variants`` object that dense code has: a sparse-only one (such as
    ``input_layout``) leaves the variant's dense row on the dense defaults."""
    from rt3d_halide.generators.schedules import GpuConvKnobs

    fields = {f.name for f in dataclasses.fields(GpuConvKnobs)}
    return json.dumps({k: v for k, v in json.loads(knobs).items() if k in fields}, sort_keys=True)


def _link_timer(builds: list[Path], work: Path) -> Path:
    """One executable holding every row's library and one Halide runtime (the same in all)."""
    manifests = [json.loads((b / "manifest.json").read_text()) for b in builds]
    names = [f["name"] for m in manifests for f in m["functions"]]
    (work / "functions.inc").write_text(
        "".join(f'extern "C" int {n}(halide_buffer_t *, halide_buffer_t *);\n' for n in names)
    )
    (work / "function_table.inc").write_text("".join(f'    {{"{n}", {n}}},\n' for n in names))
    exe = work / "opencl_timer"
    cmd = [
        os.environ.get("CXX", "g++"),
        "-std=c++17",
        "-O2",
        f"-I{work}",
        f"-I{builds[0] / 'include'}",
        str(TIMER_SOURCE),
        *(str(b / m["library"]) for b, m in zip(builds, manifests, strict=True)),
        str(builds[0] / manifests[0]["runtime"]),
        "-static-libstdc++",
        "-static-libgcc",
        "-lpthread",
        "-ldl",
        "-o",
        str(exe),
    ]
    subprocess.run(cmd, check=True)
    return exe


def _compress(path: Path, to: Path) -> None:
    """xz on every core where the tool is here (a bundle's timer is some 300 MB), else lzma."""
    if shutil.which("xz"):
        with to.open("wb") as out:
            subprocess.run(["xz", "-T0", "-6", "-c", str(path)], stdout=out, check=True)
    else:
        to.write_bytes(lzma.compress(path.read_bytes(), preset=6))


def measure(args: argparse.Namespace) -> None:
    import torch
    from common import MAX_RELATIVE_ERROR

    bundle: Path = args.bundle
    plan = json.loads((bundle / "plan.json").read_text())
    with np.load(bundle / "arrays.npz") as npz:  # read once: rows share their layer's codes
        arrays = {name: npz[name] for name in npz.files}
    with tempfile.TemporaryDirectory(prefix="rt3d-gpu-") as tmp:
        work = Path(tmp)
        env = _opencl_env(bundle, args.ocl_device_type, work)
        timer = work / "opencl_timer"
        timer.write_bytes(lzma.decompress((bundle / "opencl_timer.xz").read_bytes()))
        timer.chmod(0o755)
        inputs = []
        for li, layer in enumerate(plan["layers"]):
            x = np.random.default_rng(100 + li).standard_normal(layer["input_shape"])
            inputs.append(x.astype(np.float32))
            inputs[-1].tofile(work / f"in{li}.bin")
        lines = []
        for i, row in enumerate(plan["rows"]):
            layer = plan["layers"][row["layer_index"]]
            paths = [work / f"in{row['layer_index']}.bin", work / f"out{i}.bin"]
            dims = [*layer["input_shape"], *layer["output_shape"]]
            lines.append(" ".join(map(str, [row["function"], *paths, *dims])))
        (work / "plan.txt").write_text("\n".join(lines) + "\n")
        print(f"running {len(lines)} functions, {args.rounds} rounds", flush=True)
        proc = subprocess.run(
            [str(timer), str(work / "plan.txt"), str(args.rounds), str(args.min_seconds)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise SystemExit(f"opencl_timer failed ({proc.returncode})")
        timed = {}
        for text in proc.stdout.splitlines():
            name, calls, *samples = text.split()
            timed[name] = {"calls_per_sample": int(calls), "samples": [float(s) for s in samples]}
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        results, wrong = [], []
        for i, row in enumerate(plan["rows"]):
            layer = plan["layers"][row["layer_index"]]
            weight = _weight(arrays, row)
            out = np.fromfile(work / f"out{i}.bin", np.float32).reshape(layer["output_shape"])
            ref = _reference(inputs[row["layer_index"]], weight, arrays, row, layer, device)
            error = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            times = timed[row["function"]]
            seconds = statistics.median(times["samples"])
            if not error <= MAX_RELATIVE_ERROR:
                # Its time means nothing: reported apart, and the run fails once all is written.
                wrong.append({**row, "relative_error": error})
                print(f"{row['function']}: WRONG, relative error {error:.3g}")
                continue
            results.append({**row, "relative_error": error, "seconds": seconds, **times})
            print(f"{row['function']}: error {error:.2g}, {seconds * 1e3:.3f} ms")
    torch_times = [
        _time_torch(inputs[li], arrays, li, layer, device, args.rounds, args.min_seconds)
        for li, layer in enumerate(plan["layers"])
    ]
    result = {
        **{k: plan[k] for k in ("command", "date", "target", "clip", "shrink", "group")},
        "measured": {
            "command": shlex.join(["python3", "bench/opencl_gpu.py", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d"),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "none (PoCL)",
            "driver": _nvidia_driver() if device.type == "cuda" else "",
            "torch": torch.__version__,
            "torch_device": device.type,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "cpu": platform.processor() or platform.machine(),
            "rounds": args.rounds,
            "min_seconds": args.min_seconds,
        },
        "layers": [{**layer, **t} for layer, t in zip(plan["layers"], torch_times, strict=True)],
        "rows": results,
        "wrong_rows": wrong,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    if wrong:
        names = ", ".join(r["function"] for r in wrong)
        raise SystemExit(f"wrong output (more than {MAX_RELATIVE_ERROR:g} from torch): {names}")


def _opencl_env(bundle: Path, device_type: str, work: Path) -> dict[str, str]:
    """Where the machine has NVIDIA's OpenCL library, the bundle's ICD loader (ocl-icd) with a
    vendor directory naming that library alone.

    Halide's runtime takes the first platform (or the one ``HL_OCL_PLATFORM_NAME`` names) and
    fails when it has no device of the type asked for. The lent H100 machine registers PoCL
    first, and its own loader (Khronos) adds the platforms of ``OCL_ICD_VENDORS`` to those
    registered: every call failed with CL_DEVICE_NOT_FOUND. ocl-icd reads that directory alone.
    Elsewhere, or for another device type, the machine's own loader and registered platforms
    are used.
    """
    env = dict(os.environ, HL_OCL_DEVICE_TYPE=device_type)
    driver = _find_file("libnvidia-opencl.so.1") if device_type == "gpu" else None
    if driver is not None:
        icd = work / "icd"
        icd.mkdir()
        (icd / "nvidia.icd").write_text(f"{driver}\n")
        env["OCL_ICD_VENDORS"] = str(icd)
        env["LD_LIBRARY_PATH"] = f"{(bundle / 'icd').resolve()}:{env.get('LD_LIBRARY_PATH', '')}"
    elif not any(Path("/etc/OpenCL/vendors").glob("*.icd")):
        raise SystemExit("no OpenCL driver: no libnvidia-opencl.so.1 and no registered ICD")
    print(
        "OpenCL:",
        {k: env.get(k) for k in ("LD_LIBRARY_PATH", "OCL_ICD_VENDORS", "HL_OCL_DEVICE_TYPE")},
        flush=True,
    )
    return env


def _find_file(name: str) -> str | None:
    roots = ("/usr/local/nvidia", "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/cuda")
    for root in filter(Path.is_dir, map(Path, roots)):
        for path in root.rglob(name):
            return str(path)
    return None


def _nvidia_driver() -> str:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip()


def _weight(arrays: Any, row: dict[str, Any]) -> np.ndarray:
    li = row["layer_index"]
    codes = arrays[f"codes{li}"]
    weight = codes.astype(np.float32) * np.float32(WEIGHT_STEP)
    if row["mask"] is None:
        return weight
    mask = np.unpackbits(arrays[row["mask"]], count=codes.size).reshape(codes.shape)
    return np.where(mask.astype(bool), weight, 0).astype(np.float32)


def _torch_conv(x, weight, bias, layer):
    import torch

    return torch.nn.functional.conv3d(
        x, weight, bias, tuple(layer["stride"]), tuple(layer["pads"]), tuple(layer["dilation"])
    )


def _reference(x, weight, arrays, row, layer, device) -> np.ndarray:
    """torch's float64 conv3d on the GPU, back in our (N, T, H, W, C) layout."""
    import torch

    xt = torch.from_numpy(x).to(device, torch.float64).permute(0, 4, 1, 2, 3)
    wt = torch.from_numpy(weight).to(device, torch.float64)
    bt = torch.from_numpy(arrays[f"bias{row['layer_index']}"]).to(device, torch.float64)
    with torch.no_grad():
        ref = _torch_conv(xt, wt, bt, layer)
    return ref.permute(0, 2, 3, 4, 1).cpu().numpy()


def _time_torch(x, arrays, li, layer, device, rounds: int, min_seconds: float) -> dict[str, Any]:
    """Median seconds per call of torch's dense conv3d (cuDNN on a GPU), per precision (TF32 on
    a GPU only) and layout."""
    import torch

    torch.backends.cudnn.benchmark = True
    weight = torch.from_numpy(arrays[f"codes{li}"].astype(np.float32) * WEIGHT_STEP).to(device)
    bias = torch.from_numpy(arrays[f"bias{li}"]).to(device)
    x_ncdhw = torch.from_numpy(x).to(device).permute(0, 4, 1, 2, 3).contiguous()
    layouts = {
        "ncdhw": (x_ncdhw, weight),
        "channels_last": (
            x_ncdhw.to(memory_format=torch.channels_last_3d),
            weight.to(memory_format=torch.channels_last_3d),
        ),
    }
    found: dict[str, Any] = {}
    precisions = (False, True) if device.type == "cuda" else (False,)
    for tf32 in precisions:
        torch.backends.cudnn.allow_tf32 = tf32
        for name, (inp, w) in layouts.items():
            with torch.no_grad():
                for _ in range(3):
                    _torch_conv(inp, w, bias, layer)
                _sync(device)
                start = time.perf_counter()
                _torch_conv(inp, w, bias, layer)
                _sync(device)
                calls = max(1, min(1000, round(min_seconds / (time.perf_counter() - start))))
                samples = []
                for _ in range(rounds):
                    start = time.perf_counter()
                    for _ in range(calls):
                        _torch_conv(inp, w, bias, layer)
                    _sync(device)
                    samples.append((time.perf_counter() - start) / calls)
            key = f"torch_{'tf32' if tf32 else 'fp32'}_{name}_seconds"
            found[key] = statistics.median(samples)
        precision = "tf32" if tf32 else "fp32"
        found[f"torch_{precision}_seconds"] = min(
            found[f"torch_{precision}_{name}_seconds"] for name in layouts
        )
    torch.backends.cudnn.allow_tf32 = True
    return found


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def report(args: argparse.Namespace) -> None:
    from common import invocation, kept_macs_and_rate, markdown_table, write_json

    result = json.loads(args.json.read_text())
    if args.note:
        result["note"] = args.note
    result["reported"] = invocation("opencl_gpu.py")
    layers = result["layers"]
    main_rows = [r for r in result["rows"] if not r["knobs"]]
    dense = {r["layer_index"]: r["seconds"] for r in main_rows if r["pattern"] == "dense"}
    for r in result["rows"]:
        sp = r["sparsity"]
        kept_macs, rate = kept_macs_and_rate(sp)
        # A layer whose dense row was wrong (measure moved it to wrong_rows) has no reference.
        reference = dense.get(r["layer_index"])
        vs_dense = None if reference is None else reference / r["seconds"]
        r.update(
            flops_rate=rate,
            speedup_vs_our_dense=vs_dense,
            fraction_of_rate_vs_our_dense=None if vs_dense is None else vs_dense / rate,
            speedup_vs_torch_fp32=layers[r["layer_index"]]["torch_fp32_seconds"] / r["seconds"],
            gflops=2 * kept_macs / r["seconds"] / 1e9,
        )
    write_json(args.out.with_suffix(".json"), result)
    table = [
        [
            r["layer"],
            r["pattern"],
            r["sparsity"]["kept_fraction"],
            r["flops_rate"],
            r["seconds"] * 1e3,
            _or_dash(r["speedup_vs_our_dense"]),
            _or_dash(r["fraction_of_rate_vs_our_dense"]),
            r["speedup_vs_torch_fp32"],
            r["gflops"],
        ]
        for r in main_rows
    ]
    per_layer = [
        [
            layer["layer"],
            _or_dash(dense[i] * 1e3 if i in dense else None),
            layer["torch_fp32_seconds"] * 1e3,
            layer.get("torch_tf32_seconds", float("nan")) * 1e3,
            _or_dash(dense[i] / layer["torch_fp32_seconds"] if i in dense else None),
            _median_or_dash(
                [
                    r["fraction_of_rate_vs_our_dense"]
                    for r in main_rows
                    if r["layer_index"] == i and r["pattern"] != "dense" and i in dense
                ]
            ),
        ]
        for i, layer in enumerate(layers)
    ]
    m = result["measured"]
    text = [
        "# Sparse Conv3d on a GPU through OpenCL: dense against KGS and vanilla",
        "",
        f"Built: `{result['command']}` ({result['date']}), target `{result['target']}`, "
        f"clip {result['clip']}"
        + (f" (H and W divided by {result['shrink']})" if result.get("shrink", 1) > 1 else "")
        + f", group {result['group']}.",
        f"Measured: `{m['command']}` ({m['date']}) on {m['gpu']} (driver {m['driver']}), "
        f"{m['rounds']} interleaved rounds, median; each output checked against float64 torch "
        f"first. Peer 'torch': torch {m['torch']} conv3d on {m['torch_device']} (cuDNN "
        f"{m['cudnn']}), float32 with TF32 off (the faster of NCDHW and channels_last_3d), "
        "dense weights.",
        f"Reported: `{result['reported']['command']}` ({result['reported']['date']}).",
        *([f"Note: {result['note']}"] if result.get("note") else []),
        "",
        markdown_table(
            [
                "layer",
                "pattern",
                "kept",
                "FLOPs rate",
                "ms",
                "vs our dense",
                "of rate",
                "vs torch fp32",
                "GFLOP/s",
            ],
            table,
        ),
        "",
        "'vs our dense' and 'of rate' (that speedup over the FLOPs rate) compare with our own "
        "dense OpenCL code for the same target, 'vs torch fp32' with torch's dense conv3d; "
        "both are speedups, the other's time over the row's (above 1: the row is faster). Per "
        "layer: our dense code against torch as a time ratio ('our dense / torch fp32', above "
        "1: ours is slower), and the median 'of rate' of the layer's sparse rows.",
        "",
        markdown_table(
            [
                "layer",
                "our dense ms",
                "torch fp32 ms",
                "torch TF32 ms",
                "our dense / torch fp32",
                "of rate",
            ],
            per_layer,
        ),
        "",
    ]
    even = break_even_table(layers, main_rows, dense)
    if even:
        text += [
            "Break-even share of the dense MACs per layer (the manifest's `sparse_fraction`; "
            "where a least-squares line through each sparse row's time over our dense time, "
            "every pattern together, reaches 1; '> x': sparse code wins at every share "
            "measured, x the highest ('> 1': even unpruned); '< x': it loses at every share "
            "measured, x the lowest; '-': the time does not fall with the share):",
            "",
            markdown_table(
                ["layer", "kernel", "in channels", "out plane", "our dense ms", "break-even"],
                even,
            ),
            "",
        ]
    if result.get("wrong_rows"):
        names = ", ".join(r["function"] for r in result["wrong_rows"])
        text += [f"Wrong output, not reported above: {names}.", ""]
    variants = [r for r in result["rows"] if r["knobs"]]
    if variants:
        first = variants[0]["knobs"]
        reference = {
            (r["layer_index"], r["pattern"]): r["seconds"] for r in variants if r["knobs"] == first
        }
        text += [
            "Schedule knobs (`--schedule` / `--sparse-schedule` JSON; `{}`: the defaults of the "
            "build that made the bundle), each on the layer's dense row and sparse rows, and the "
            f"time over the first variant's (`{first}`) row of the same layer and pattern:",
            "",
            markdown_table(
                ["layer", "knobs", "pattern", "kept", "ms", "GFLOP/s", "time / first's"],
                [
                    [
                        r["layer"],
                        f"`{r['knobs']}`",
                        r["pattern"],
                        r["sparsity"]["kept_fraction"],
                        r["seconds"] * 1e3,
                        r["gflops"],
                        r["seconds"] / reference.get((r["layer_index"], r["pattern"]), math.nan),
                    ]
                    for r in variants
                ],
            ),
            "",
        ]
    args.out.with_suffix(".md").write_text("\n".join(text))
    print("\n".join(text))


def break_even_table(
    layers: list[dict[str, Any]], rows: list[dict[str, Any]], dense: dict[int, float]
) -> list[list[Any]]:
    """Per layer with sparse rows at two shares or more and a right dense row:
    :func:`common.break_even` of them."""
    from common import break_even

    table = []
    for i, layer in enumerate(layers):
        if i not in dense:
            continue
        points = [
            (r["sparsity"]["sparse_fraction"], r["seconds"] / dense[i])
            for r in rows
            if r["layer_index"] == i and r["pattern"] != "dense"
        ]
        if len({share for share, _ in points}) < 2:
            continue
        share = break_even(points)
        _, _, out_h, out_w, _ = layer["output_shape"]
        table.append(
            [
                layer["layer"],
                "x".join(map(str, layer.get("kernel", ["?"]))),
                layer["input_shape"][-1],
                f"{out_h}x{out_w}",
                dense[i] * 1e3,
                _share_cell(share, [s for s, _ in points]),
            ]
        )
    return table


def _share_cell(share: float | None, measured: list[float]) -> Any:
    """The fitted line is extrapolated past the measured shares: above the highest it only says
    that sparse code wins wherever measured, below the lowest that it loses wherever measured."""
    if share is None:
        return "-"
    if share > max(measured):
        return f"> {max(measured):.3g}"
    return f"< {min(measured):.3g}" if share < min(measured) else share


def _or_dash(value: float | None) -> float | str:
    return "-" if value is None else value


def _median_or_dash(values: list[float]) -> float | str:
    return statistics.median(values) if values else "-"


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    {"prepare": prepare, "measure": measure, "report": report}[args.step](args)


if __name__ == "__main__":
    main()
