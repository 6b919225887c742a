"""Recipe of ``c3d_small_kgs.onnx``, the build's embedded default model (needs the pruning extra).

``python3 -m rt3d_halide.models.make_default`` trains C3D at 1/8 width on the synthetic
motion-video dataset, prunes it with reweighted KGS regularization (8x4 kernel groups, one
whole-model target of 3x fewer conv MACs, conv1 kept dense) and fine-tunes it with the masks
held, all with :mod:`rt3d_halide.pruning`, then exports the ONNX file the build reads. So the first
thing a newcomer builds is what the project is for: sparse code from a KGS-pruned 3D CNN. About
90 s on 2 cores; deterministic from ``--seed`` up to torch's own kernel ordering.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from rt3d_halide.pruning import (
    Pruner,
    SyntheticMotionVideos,
    build_model,
    export_onnx,
    phase_step,
)
from rt3d_halide.pruning.config import MAX_SEED

CLIP = (16, 32, 32)
CLASSES = 8
DEFAULT_OUT = Path(__file__).with_name("c3d_small_kgs.onnx")


def _epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    pruner: Pruner | None = None,
    phase: str = "dense",
) -> float:
    model.train()
    total = 0.0
    for step, (x, y) in enumerate(loader):
        loss = phase_step(F.cross_entropy(model(x), y), optimizer, pruner, phase)
        if phase == "regularize" and step % 8 == 7:
            pruner.reweight()
        total += loss.item()
    return total / len(loader)


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    right = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return right / len(loader.dataset)


def make_default(out: Path, seed: int = 0, epochs: int = 6) -> str:
    torch.manual_seed(seed)
    train = DataLoader(
        SyntheticMotionVideos(768, num_classes=CLASSES, clip_shape=CLIP, seed=seed),
        batch_size=32,
        shuffle=True,
    )
    val = DataLoader(
        SyntheticMotionVideos(256, num_classes=CLASSES, clip_shape=CLIP, seed=seed + 1),
        batch_size=64,
    )
    model = build_model(
        "c3d", CLASSES, width=1 / 8, fc_width=128, clip_shape=CLIP, batch_norm=True, dropout=0.2
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    for epoch in range(epochs):
        print(f"dense epoch {epoch + 1}/{epochs}: loss {_epoch(model, train, optimizer):.3f}")
        schedule.step()
    dense = accuracy(model, val)
    pruner = Pruner(
        model,
        (3, *CLIP),
        target_rate=3.0,
        scheme="kgs",
        group=(8, 4),
        algorithm="reweighted",
        exclude=["conv1"],
        # The paper's 5e-4 assumes C3D's full-size weights; at 1/8 width it swamps the loss.
        strength=1e-5,
    ).prepare()
    optimizer = torch.optim.SGD(model.parameters(), lr=2e-3, momentum=0.9, weight_decay=5e-4)
    print(f"regularize: loss {_epoch(model, train, optimizer, pruner, 'regularize'):.3f}")
    report = pruner.prune()
    for epoch in range(epochs // 2):
        loss = _epoch(model, train, optimizer, pruner, "finetune")
        print(f"fine-tune epoch {epoch + 1}/{epochs // 2}: loss {loss:.3f}")
    pruner.finalize()
    pruned = accuracy(model, val)
    export_onnx(model, out, (1, 3, *CLIP))
    return (
        f"{out.name}: dense top-1 {dense:.3f}, KGS-pruned top-1 {pruned:.3f} at "
        f"{report.rate:.2f}x fewer conv MACs\n{report.format_table()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python3 -m rt3d_halide.models.make_default",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="ONNX file to write (the default replaces the package's embedded model)",
    )
    parser.add_argument(
        "--seed",
        type=_at_least(0, below=MAX_SEED),
        default=0,
        help="seed of the data and the weights, below 2**63 (as the training CLI's)",
    )
    parser.add_argument(
        "--epochs", type=_at_least(2), default=6, help="dense epochs (half as many fine-tune)"
    )
    parser.add_argument("--threads", type=_at_least(1), default=2, help="torch CPU threads")
    args = parser.parse_args()
    _check_writable(parser, args.out)
    torch.set_num_threads(args.threads)
    print(make_default(args.out, args.seed, args.epochs))


def _at_least(least: int, below: int | None = None) -> Callable[[str], int]:
    """An argparse type for an integer of at least ``least`` (fewer than 2 epochs leave no
    fine-tuning epoch) and, given, below ``below`` (torch's seed overflowed past 2**64 with a
    traceback)."""

    def integer(text: str) -> int:  # argparse names the type by it
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"must be below {below}, got {value}")
        return value

    return integer


def _check_writable(parser: argparse.ArgumentParser, out: Path) -> None:
    """Before training: a folder that is not there, or cannot be written, ended the run after
    it. The file is written over only at the end."""
    folder = out.parent
    if out.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        why = "is a directory" if out.is_dir() else f"{folder} is no folder this user can write"
        parser.error(f"--out {out}: {why}")


if __name__ == "__main__":
    main()
