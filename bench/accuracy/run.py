"""Accuracy of pruned models on the synthetic motion dataset: the comparison RT3D makes.

    python bench/accuracy/run.py            # ~9 min on one CPU thread; writes results.*

A small C3D-like network (C3D's conv1..conv4b and pools at 1/8 width, BatchNorm, global pooling
instead of fc6/fc7) is trained dense, then pruned to 2.6x and 3.6x fewer conv MACs with each
algorithm (reweighted group lasso, plain group lasso, magnitude) and scheme (vanilla, KGS,
balanced KGS), and fine-tuned with the mask held. Every pruned run gets the same number of
training steps after the dense model: regularization + fine-tuning, or (magnitude) fine-tuning
only. Plain group lasso's strength is calibrated so its initial push on the median unit equals
the reweighted one's, so the comparison is of the reweighting, not of a badly chosen lambda.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rt3d_halide.pruning import Pruner, count_macs, phase_step
from rt3d_halide.pruning.data import SyntheticMotionVideos
from rt3d_halide.pruning.groups import unit_norms
from rt3d_halide.pruning.masks import deepcopy_model
from rt3d_halide.pruning.report import json_rate
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import bench_parser

HERE = Path(__file__).resolve().parent
FULL = {
    "clip": (8, 24, 24),
    "classes": 8,
    "train": 1024,
    "val": 512,
    "dense_epochs": 20,
    "reg_epochs": 3,
    "finetune_epochs": 3,
}
QUICK = FULL | {"train": 64, "val": 32, "dense_epochs": 1, "reg_epochs": 1, "finetune_epochs": 1}
BATCH = 32
RATES = (2.6, 3.6)
SCHEMES = (("vanilla", False), ("kgs", False), ("kgs", True))
ALGORITHMS = ("reweighted", "group_lasso", "magnitude")
GROUP = (4, 4)  # at 1/8 of C3D's widths, the paper's 8x4 groups would be 8x coarser
STRENGTH = 5e-4  # the paper's lambda; --strength overrides
PRUNE_LR = 1e-2


class SmallC3D(nn.Module):
    """C3D's conv1..conv4b with its pools, at 1/8 width, BatchNorm after each conv."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        plan = [("conv1", 3, 8), ("conv2", 8, 16), ("conv3a", 16, 32), ("conv3b", 32, 32)]
        plan += [("conv4a", 32, 64), ("conv4b", 64, 64)]
        pools = {"conv1": (1, 2, 2), "conv2": 2, "conv3b": 2}
        layers: dict[str, nn.Module] = {}
        for name, cin, cout in plan:
            layers[name] = nn.Conv3d(cin, cout, 3, padding=1, bias=False)
            layers[f"bn_{name}"] = nn.BatchNorm3d(cout)
            layers[f"relu_{name}"] = nn.ReLU(inplace=True)
            if name in pools:
                layers[f"pool_{name}"] = nn.MaxPool3d(pools[name])
        self.features = nn.Sequential()
        for name, layer in layers.items():
            self.features.add_module(name, layer)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def _tensors(dataset: SyntheticMotionVideos) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    x, y = data
    correct = sum(
        int((model(x[i : i + 128]).argmax(1) == y[i : i + 128]).sum())
        for i in range(0, len(y), 128)
    )
    return correct / len(y)


def train_epochs(model, data, epochs, optimizer, seed, pruner=None, phase="dense"):
    x, y = data
    steps = epochs * ((len(y) + BATCH - 1) // BATCH)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    reweight_every = max(1, steps // 4)
    step = 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for i in range(0, len(y), BATCH):
            index = order[i : i + BATCH]
            loss = F.cross_entropy(model(x[index]), y[index])
            phase_step(loss, optimizer, pruner, phase)
            scheduler.step()
            step += 1
            if phase == "regularize" and step % reweight_every == 0:
                pruner.reweight()


def calibrate_group_lasso(pruner: Pruner, strength: float) -> None:
    """Make plain group lasso's initial push on the median unit equal the reweighted one's."""
    norms = torch.cat([unit_norms(x.weight.detach(), x.spec).flatten() for x in pruner.layers])
    pruner.regularizer.strength = strength / float(norms.median())


def prune_run(dense: nn.Module, data, val, settings, algorithm, scheme, balanced, rate, seed):
    strength = settings["strength"]
    model = deepcopy_model(dense)
    pruner = Pruner(
        model,
        (3, *settings["clip"]),
        target_rate=rate,
        scheme=scheme,
        group=GROUP,
        balanced=balanced,
        algorithm=algorithm,
        strength=strength,
    ).prepare()
    key = {"algorithm": algorithm, "scheme": scheme, "balanced": balanced, "target_rate": rate}
    try:
        pruner.plan()
    except ValueError as err:  # the scheme's granularity cannot reach the rate within bounds
        return key | {
            "acc": None,
            "acc_after_prune": None,
            "achieved_rate": None,
            "error": str(err),
        }

    def sgd() -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=PRUNE_LR, momentum=0.9, weight_decay=5e-4)

    finetune_epochs = settings["finetune_epochs"]
    if algorithm == "magnitude":
        finetune_epochs += settings["reg_epochs"]
    else:
        if algorithm == "group_lasso":
            calibrate_group_lasso(pruner, strength)
        train_epochs(model, data, settings["reg_epochs"], sgd(), seed, pruner, "regularize")
    pruner.prune()
    pruned_acc = accuracy(model, val)
    train_epochs(model, data, finetune_epochs, sgd(), seed + 1, pruner, "finetune")
    report = pruner.finalize()
    return key | {
        "achieved_rate": json_rate(report.rate),
        "acc_after_prune": pruned_acc,
        "acc": accuracy(model, val),
        "layers": {
            x.name: {
                "kept_units": x.kept_units,
                "total_units": x.total_units,
                "rate": json_rate(x.rate),
            }
            for x in report.layers
        },
    }


def markdown(results: dict) -> str:
    settings = results["settings"]
    clip = "x".join(map(str, settings["clip"]))
    group = "x".join(map(str, settings["group"]))
    lines = [
        "# Pruning accuracy on synthetic motion videos",
        "",
        f"Dense accuracy: **{results['dense_acc']:.3f}** ({settings['classes']} classes, "
        f"{settings['val']} validation clips of {clip}; dense conv MACs "
        f"{results['dense_conv_macs'] / 1e6:.2f} M per clip; group {group}). Top-1 after masked "
        "fine-tuning (in brackets: right after hard pruning) @ achieved conv-MAC reduction.",
        "",
        "| algorithm | scheme | " + " | ".join(f"{r}x" for r in RATES) + " |",
        "|---|---|" + "---|" * len(RATES),
    ]
    for algorithm in ALGORITHMS:
        for scheme, balanced in SCHEMES:
            cells = []
            for rate in RATES:
                run = next(
                    r
                    for r in results["runs"]
                    if (r["algorithm"], r["scheme"], r["balanced"], r["target_rate"])
                    == (algorithm, scheme, balanced, rate)
                )
                cells.append(
                    f"{run['acc']:.3f} ({run['acc_after_prune']:.3f}) @{run['achieved_rate']:.2f}x"
                    if run["acc"] is not None
                    else "unreachable"
                )
            label = scheme + (" balanced" if balanced else "")
            lines.append(f"| {algorithm} | {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Run: `{results['command']}` on {results['machine']}, "
        f"{results['seconds']:.0f} s on 1 thread"
        + (
            " (dense weights loaded from the cache, not trained)."
            if results.get("dense_from_cache")
            else "."
        ),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke run with tiny sizes")
    parser.add_argument(
        "--output",
        type=Path,
        default=HERE,
        help="directory for results.json and results.md",
    )
    parser.add_argument("--strength", type=float, default=STRENGTH, help="penalty lambda")
    parser.add_argument("--dense-cache", type=Path, help="reuse (or save) the dense weights here")
    args = parser.parse_args()
    settings = (QUICK if args.quick else FULL) | {"strength": args.strength}
    torch.set_num_threads(1)
    torch.manual_seed(0)
    start = time.time()
    common = {"num_classes": settings["classes"], "clip_shape": settings["clip"]}
    data = _tensors(SyntheticMotionVideos(settings["train"], seed=0, **common))
    val = _tensors(SyntheticMotionVideos(settings["val"], seed=1, **common))
    dense = SmallC3D(settings["classes"])
    dense_cached = bool(args.dense_cache and args.dense_cache.exists())
    if dense_cached:
        dense.load_state_dict(torch.load(args.dense_cache, weights_only=True))
    else:
        optimizer = torch.optim.AdamW(dense.parameters(), lr=3e-3, weight_decay=1e-4)
        train_epochs(dense, data, settings["dense_epochs"], optimizer, seed=0)
        if args.dense_cache:
            torch.save(dense.state_dict(), args.dense_cache)
    dense_acc = accuracy(dense, val)
    print(f"dense acc {dense_acc:.3f} ({time.time() - start:.0f} s)", flush=True)
    runs = []
    for algorithm in ALGORITHMS:
        for scheme, balanced in SCHEMES:
            for rate in RATES:
                torch.manual_seed(1)
                run = prune_run(
                    dense, data, val, settings, algorithm, scheme, balanced, rate, seed=1
                )
                runs.append(run)
                outcome = (
                    f"acc {run['acc']:.3f} (pruned {run['acc_after_prune']:.3f})"
                    if run["acc"] is not None
                    else f"unreachable: {run['error']}"
                )
                print(
                    f"{algorithm:<12} {scheme:<8} balanced={balanced!s:<5} {rate}x: {outcome} "
                    f"[{time.time() - start:.0f} s]",
                    flush=True,
                )
    results = {
        "settings": settings
        | {
            "clip": list(settings["clip"]),
            "batch": BATCH,
            "group": list(GROUP),
            "prune_lr": PRUNE_LR,
        },
        "dense_acc": dense_acc,
        "dense_conv_macs": count_macs(dense, (3, *settings["clip"]), convs_only=True),
        "runs": runs,
        "seconds": time.time() - start,
        "machine": f"{platform.machine()} {platform.system()}, torch {torch.__version__}",
        "command": shlex.join(["python", "bench/accuracy/run.py", *sys.argv[1:]]),
        "dense_from_cache": dense_cached,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.output / "results.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
