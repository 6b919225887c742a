"""One configuration for dense training, pruning and fine-tuning (JSON or TOML file and flags)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

# torch.manual_seed takes up to 2**64 - 1 (the shuffles' seeds, derived from it, wrap there),
# numpy any size; the validation data's seed is the training data's plus a constant.
MAX_SEED = 2**63

# torch.set_num_threads took 4096 here and crashed the process (a segfault) at 100000.
MAX_THREADS = 4096

# Knobs of the synthetic data alone: a folder dataset's classes and clips are its folders'.
SYNTHETIC_ONLY = ("num_classes", "train_samples", "val_samples")


@dataclass
class TrainConfig:
    """Every knob of ``python -m rt3d_halide.pruning.train``; flags are the field names."""

    output: str = "runs/prune"
    model: str = "tiny"
    model_args: dict[str, Any] = field(default_factory=dict)
    # "synthetic", or the root of a UCF101-style folder of decoded frames
    data: str = "synthetic"
    val_data: str = ""
    frame_glob: str = "*"
    num_classes: int = 8
    train_samples: int = 2048
    val_samples: int = 512
    clip_shape: list[int] = field(default_factory=lambda: [16, 32, 32])
    seed: int = 0
    batch_size: int = 32
    workers: int = 0
    threads: int = 0
    device: str = "cpu"
    deterministic: bool = False
    dense_epochs: int = 10
    dense_lr: float = 5e-3
    init_from: str = ""
    reg_epochs: int = 3
    reweight_every: int = 0  # steps; 0 = reweight 4 times per regularization phase
    finetune_epochs: int = 3
    prune_lr: float = 2e-4
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheme: str = "kgs"
    group: list[int] = field(default_factory=lambda: [8, 4])
    algorithm: str = "reweighted"
    target_rate: float = 3.6
    balanced: bool = False
    exclude: list[str] = field(default_factory=list)
    min_keep: float = 0.05
    strength: float = 5e-4
    eps: float = 1e-6
    flops_exponent: float = 0.0
    distill: bool = False
    distill_alpha: float = 0.5
    temperature: float = 4.0
    checkpoint_every: int = 50  # steps
    export: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        """Every value checked before any training: a bad one found in a later phase would
        also be refused on the rerun that fixes it (the checkpoint holds the old config)."""
        for f in fields(self):
            setattr(self, f.name, _checked_type(f.name, f.type, getattr(self, f.name)))
        names = {"dense_epochs", "reg_epochs", "finetune_epochs", "reweight_every", "workers"}
        for name in (*sorted(names), "threads", "weight_decay", "strength"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        positive = (
            *("batch_size", "checkpoint_every", "dense_lr", "prune_lr", "temperature", "eps"),
            *(("train_samples", "val_samples") if self.data == "synthetic" else ()),
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.seed < MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if self.threads > MAX_THREADS:
            raise ValueError(
                f"threads must be <= {MAX_THREADS} (torch crashes far past it), got {self.threads}"
            )
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.distill_alpha <= 1:
            raise ValueError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if len(self.clip_shape) != 3:
            raise ValueError(f"clip_shape needs 3 values (T, H, W), got {list(self.clip_shape)}")
        if min(self.clip_shape) < 1:  # folder data resizes frames to it (a traceback there)
            raise ValueError(f"clip_shape must be (T, H, W) positive, got {self.clip_shape}")
        if len(self.group) != 2:
            raise ValueError(f"group needs 2 values (gM, gN), got {list(self.group)}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.data == "synthetic" and self.val_data:
            raise ValueError("val_data is for a folder dataset; synthetic data makes its own")
        if self.data == "synthetic" and self.frame_glob != "*":
            raise ValueError("frame_glob is for a folder dataset, not synthetic data")
        if self.data != "synthetic":
            # Taken silently, they were recorded in the run's config (its report claimed 101
            # classes of a 2-class dataset), and a rerun without them could not resume.
            given = [
                f.name
                for f in fields(self)
                if f.name in SYNTHETIC_ONLY and getattr(self, f.name) != f.default
            ]
            if given:
                raise ValueError(
                    f"{', '.join(given)}: for synthetic data; a folder dataset's classes and "
                    "clips are its folders'"
                )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _checked_type(name: str, annotation: str, value: Any) -> Any:
    """``value`` as the field's type, or a ValueError naming the field: a config file's
    ``"balanced": "false"`` (a truthy string) must not run balanced pruning. What means the
    same is converted: any integer or real number (numpy's too) for int and float fields, a
    tuple for a list, a path for a string."""
    if annotation == "bool":
        ok = isinstance(value, bool | np.bool_)
        value = bool(value) if ok else value
    elif annotation in ("int", "float"):
        kind = numbers.Integral if annotation == "int" else numbers.Real
        ok = isinstance(value, kind) and not isinstance(value, bool | np.bool_)
        value = (int if annotation == "int" else float)(value) if ok else value
        # A NaN learning rate trains every phase in NaN (ints have no NaN, and some are too
        # large for a float).
        ok = ok and (annotation == "int" or math.isfinite(value))
    elif annotation == "str":
        text = os.fspath(value) if isinstance(value, os.PathLike) else value
        ok = isinstance(text, str)
        value = text if ok else value
    elif annotation.startswith("list["):
        item = numbers.Integral if annotation == "list[int]" else str
        ok = isinstance(value, list | tuple) and all(
            isinstance(v, item) and not isinstance(v, bool | np.bool_) for v in value
        )
        value = [int(v) if item is numbers.Integral else v for v in value] if ok else value
    else:
        ok = isinstance(value, dict)
    if not ok:
        raise ValueError(f"{name} must be {_TYPE_NAMES[annotation]}, got {value!r}")
    return value


_TYPE_NAMES = {
    "int": "an integer",
    "float": "a finite number",
    "str": "a string",
    "bool": "true or false",
    "list[int]": "a list of integers",
    "list[str]": "a list of strings",
    "dict[str, Any]": "a JSON object",
}


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")  # TOML's and JSON's, whatever the locale's
    except OSError as err:
        raise ValueError(f"--config {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"--config {path}: not UTF-8 text ({err.reason})") from err
    try:
        suffix = path.suffix.lower()  # prune.TOML too, as a case-blind file system shows it
        if suffix == ".toml":
            values = tomllib.loads(text)
        elif suffix == ".json":
            values = json.loads(text)
        else:
            raise ValueError(f"config file must be .toml or .json, got {path}")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: {err}") from err
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config is a table of keys (a JSON object), not {values!r}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known, key=str)
    if unknown:
        key = unknown[0]
        spelled = str(key).replace("-", "_")
        hint = f" (keys use underscores: {spelled!r})" if spelled in known else ""
        raise ValueError(f"{path}: unknown config key {key!r}{hint}")
    return values


def json_object(text: str) -> dict[str, Any]:
    """A JSON object flag (``--model-args``; the benchmarks' ``--variants``): argparse's own
    message for a json.loads failure says only "invalid loads value"."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc} in {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"needs a JSON object, got {text!r}")
    return value


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


# What each flag does, for --help (every TrainConfig field has one; docs/pruning.md has more).
FLAG_HELP = {
    "output": "directory for checkpoint.pt, final.pt, report.json and model.onnx",
    "model": "c3d, r2plus1d_18 or tiny",
    "model_args": "constructor arguments of the model, e.g. '{\"width\": 0.25}'",
    "data": "'synthetic' (moving sprites) or the root of class/clip folders of decoded frames",
    "val_data": "validation frame-folder root (with a folder --data)",
    "frame_glob": "frame files read in each clip folder of a folder dataset, by name "
    "(case-sensitive), e.g. 'img_*' for mmaction2's rawframes",
    "num_classes": "classes of the synthetic data",
    "train_samples": "synthetic training clips",
    "val_samples": "synthetic validation clips",
    "clip_shape": "clip frames, height, width (T H W)",
    "seed": "seed of the data, the initial weights and the shuffling",
    "batch_size": "clips per step (per process under torchrun)",
    "workers": "data-loading processes",
    "threads": f"torch CPU threads, at most {MAX_THREADS}; 0 leaves torch's choice",
    "device": "where the model trains: cpu, cuda or cuda:N (one process; torchrun runs on CPUs)",
    "deterministic": "on a GPU, cuDNN's deterministic kernels without TF32: a run and its resume "
    "repeat bit for bit (slower)",
    "dense_epochs": "epochs of plain training before pruning",
    "dense_lr": "SGD learning rate of the dense phase",
    "init_from": "start from these weights (a state_dict, or a checkpoint's model; a classifier "
    "of another class count starts new); with --dense-epochs 0 no dense training runs",
    "reg_epochs": "epochs of training with the sparsity penalty",
    "reweight_every": (
        "steps between reweightings of the penalty; 0: at the phase's start and its first three "
        "quarters"
    ),
    "finetune_epochs": "epochs of masked fine-tuning after pruning",
    "prune_lr": "SGD learning rate of the regularize and fine-tune phases",
    "momentum": "SGD momentum",
    "weight_decay": "SGD weight decay",
    "scheme": "kgs (kernel-group structured) or vanilla (whole kernel groups)",
    "group": "kernel group: output channels gM, input channels gN",
    "algorithm": "reweighted (RT3D), group_lasso or magnitude (no penalty)",
    "target_rate": "factor by which the conv MACs must drop (excluded layers count as dense)",
    "balanced": "every kernel group of a layer keeps as many units (kgs only)",
    "exclude": "layers (names or globs) left dense",
    "min_keep": "least fraction of its MACs each pruned layer keeps",
    "strength": "penalty strength",
    "eps": "reweighting's epsilon: P = 1 / (||W||^2 + eps)",
    "flops_exponent": "selection ranks units by (norm / layer RMS) / cost^exponent; 0: by the "
    "relative norm alone",
    "distill": "fine-tune against the dense model's outputs too",
    "distill_alpha": "share of the distillation term (the rest is cross-entropy)",
    "temperature": "distillation temperature",
    "checkpoint_every": "steps between checkpoints (and at each epoch's end)",
    "export": "write model.onnx for rt3d_halide.build at the end",
    "progress": "progress bars on stderr",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m rt3d_halide.pruning.train",
        description="Dense training, FLOPs-targeted structured pruning and masked fine-tuning.",
    )
    parser.add_argument("--config", help="TOML or JSON file; flags override its values")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        shown = json.dumps(default) if isinstance(default, dict | list | bool) else repr(default)
        text = f"{FLAG_HELP[f.name]} (default: {shown})"
        if isinstance(default, bool):
            parser.add_argument(flag, type=_parse_bool, metavar="BOOL", help=text)
        elif isinstance(default, dict):
            parser.add_argument(flag, type=json_object, metavar="JSON", help=text)
        elif isinstance(default, list):
            item = str if f.name == "exclude" else int
            parser.add_argument(flag, type=item, nargs="*" if item is str else "+", help=text)
        else:
            parser.add_argument(flag, type=type(default), help=text)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    config = args.pop("config", None)
    if config == "":
        raise ValueError("--config: an empty path (leave the flag out for none)")
    values = load_config_file(config) if config else {}
    values.update({k: v for k, v in args.items() if v is not None})
    return TrainConfig(**values)
