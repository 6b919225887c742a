"""``python -m rt3d_halide.pruning.train``: dense training, pruning and masked fine-tuning.

Three phases run from one config: ``dense`` (plain training, from ``--init-from`` weights if given),
``regularize`` (loss + the pruner's penalty, reweighted periodically), then hard pruning to the
MAC target and ``finetune`` (masked, optionally distilled from the dense model). A checkpoint is
written every ``--checkpoint-every`` steps and at every epoch end; rerunning the same command
resumes from it, on the same device or another (``--device`` may change between runs). Under
``torchrun`` (gloo backend on CPU) each rank trains on its shard; masks and penalty weights are
broadcast from rank 0. ``--device cuda`` trains on one GPU in one process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import inspect
import itertools
import json
import math
import os
import shlex
import signal
import sys
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..errors import Stopped, handled_by, listing, stopped_by
from .checkpoint import load_checkpoint, replace_atomically, save_checkpoint, write_refused
from .config import SYNTHETIC_ONLY, TrainConfig, parse_config
from .data import SyntheticMotionVideos, VideoFolder
from .data.folder import LAYOUT
from .distill import distillation_loss
from .export import export_onnx
from .masks import deepcopy_model
from .models import MODELS, build_model
from .patterns import clipped_group
from .pruner import PHASES, Pruner, phase_step
from .report import PruningReport, json_rate

CHECKPOINT = "checkpoint.pt"
# Settings a resume may change: where and how the run works, not what it computes (a device or
# cuDNN's deterministic mode changes float rounding only).
RUNTIME_KEYS = {
    "output", "threads", "workers", "progress", "checkpoint_every", "export", "device",
    "deterministic",
}  # fmt: skip


@dataclass
class TrainResult:
    model: nn.Module
    pruner: Pruner
    report: PruningReport
    history: list[dict[str, Any]]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")


def _join_process_group(announce: bool) -> None:
    """The command line's join of torchrun's (or the environment's) process group.

    The wait for the other ranks runs in gloo's C++, where a Python signal handler never runs:
    SIGTERM, SIGHUP and Ctrl-C kept a rank waiting for ranks that never came (a ``WORLD_SIZE``
    left in the environment) for gloo's 30 minutes. They take their default action meanwhile
    (nothing is made yet), unless ignored (nohup) or set outside Python, and in the main thread
    only (where handlers are set). A library caller's :func:`run` joins with the caller's own
    handlers in place."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        return
    with handled_by(signal.SIG_DFL, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if announce and os.environ.get("RANK", "0") == "0":
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            print(f"waiting for the {world} ranks at {where}...", file=sys.stderr, flush=True)
        _init_distributed()


def _device(config: TrainConfig, world: int) -> torch.device:
    """``--device``, checked against this torch and this machine before any work."""
    device = torch.device(config.device)
    if device.type == "cpu":
        return device
    if world > 1:
        raise ValueError(
            f"--device {config.device} trains in one process; under torchrun the ranks train "
            "on CPUs (leave --device cpu), or run one process on one GPU"
        )
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device {config.device}: this torch ({torch.__version__}) sees no CUDA GPU"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"--device {config.device}: this machine has {torch.cuda.device_count()} CUDA "
            f"GPU(s), numbered from 0"
        )
    return device


@contextlib.contextmanager
def exact_cuda_kernels() -> Iterator[None]:
    """cuDNN's deterministic convolutions in full float32 (no TF32) inside the block, torch's
    settings again after it: a GPU run and its resume repeat bit for bit, and a GPU run stays
    within float32 rounding of the CPU's. Slower. Not ``torch.use_deterministic_algorithms``:
    max_pool3d has no deterministic CUDA backward, though a pool whose windows do not overlap
    (all of ours) gives each input one gradient."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.deterministic, cudnn.benchmark = True, False
    cudnn.allow_tf32 = matmul.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved


def _on_cpu(value: Any) -> Any:
    """``value`` with every tensor in it copied to the CPU: a file written on a GPU machine
    loads with plain ``torch.load(..., weights_only=True)`` on one without it."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_on_cpu(item) for item in value)
    return value


def _datasets(config: TrainConfig) -> tuple[Dataset, Dataset]:
    if config.data == "synthetic":
        common = {"num_classes": config.num_classes, "clip_shape": config.clip_shape}
        train = SyntheticMotionVideos(config.train_samples, seed=config.seed, **common)
        val = SyntheticMotionVideos(config.val_samples, seed=config.seed + 1_000_003, **common)
        return train, val
    try:
        found = Path(config.data).is_dir()
    except OSError as err:  # a name too long
        raise ValueError(f"--data {config.data}: {err.strerror}") from err
    if not found:
        what = "not a folder" if Path(config.data).exists() else "no such folder"
        raise ValueError(f"--data {config.data}: {what} (a dataset folder, or synthetic)")
    if not config.val_data:
        raise ValueError("a folder dataset needs --val-data (a second folder of the same layout)")
    folder = {
        "clip_len": config.clip_shape[0],
        "frame_size": config.clip_shape[1:],
        "frame_glob": config.frame_glob,
    }
    # Listing every clip's frames takes a while on a large dataset or network storage.
    _say(config, _world()[0], f"reading the clip folders of {config.data} and {config.val_data}")
    train, val = VideoFolder(config.data, **folder), VideoFolder(config.val_data, **folder)
    # A training class without clips is one the model can never learn (a failed frame
    # extraction, usually). Validation may lack clips of a class: its folders must match.
    unlearnable = sorted(set(train.classes) - {train.classes[label] for _, label in train.samples})
    if unlearnable:
        raise ValueError(
            f"--data {config.data}: class folders without clips {unlearnable}; add their clips "
            "or remove the folders (and the same folders from --val-data)"
            + train.layout_hint(unlearnable)
        )
    if len(train.classes) < 2:
        # Cross-entropy over one class is zero whatever the weights: nothing would be learned,
        # and pruning would follow the penalty alone (synthetic data asks for 2 classes too).
        raise ValueError(
            f"--data {config.data}: one class folder {train.classes}; a classifier needs at "
            f"least two (the layout is {LAYOUT})"
        )
    if val.classes != train.classes:
        # Labels are indices into the sorted class folders: another set would score nonsense.
        extra, missing = (
            sorted(set(val.classes) - set(train.classes)),
            sorted(set(train.classes) - set(val.classes)),
        )
        # Printed alike, names of one word in two Unicode forms (macOS writes NFD) left the
        # user two lists that looked the same.
        alike = [
            (a, b)
            for a in extra
            for b in missing
            if unicodedata.normalize("NFC", a) == unicodedata.normalize("NFC", b)
        ]
        hint = ""
        if alike:
            hint = (
                f"; {alike[0][0]!a} (in --val-data) and {alike[0][1]!a} (in --data) are one "
                "name in two Unicode forms: give both folders one"
            )
        raise ValueError(
            f"--val-data {config.val_data} has other classes than --data {config.data}: "
            f"only in --val-data {extra}, only in --data {missing} (a class without validation "
            f"clips takes an empty folder){hint}"
        )
    # A frame format that does not read (or frames of different sizes) fails now, not at the
    # first validation after an epoch's training: each folder's first clip is read.
    for dataset in (train, val):
        if len(dataset):
            dataset[0]
    return train, val


def _shard(length: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """This rank's indices for an epoch: the same permutation on every rank, split by rank."""
    rank, world = _world()
    if shuffle:
        # torch takes seeds below 2**64: the same shuffles as before for every seed below it.
        generator = torch.Generator().manual_seed((seed * 100_003 + epoch) % 2**64)
        order = torch.randperm(length, generator=generator).tolist()
    else:
        order = list(range(length))
    per_rank = length // world if shuffle else math.ceil(length / world)
    return order[rank::world][:per_rank]


def _batches(
    dataset: Dataset, indices: list[int], config: TrainConfig, skip: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=indices[skip * config.batch_size :],
        num_workers=config.workers,
        pin_memory=config.device != "cpu",  # then copied to the GPU without a wait
        generator=torch.Generator().manual_seed(0),  # leave the global RNG to the model
        worker_init_fn=_leave_stops_to_the_run,
    )
    yield from loader


def _leave_stops_to_the_run(_worker: int) -> None:
    """A DataLoader worker ends quietly (exit status 0) on SIGTERM and SIGHUP, as torch's own
    handler ends it on its parent's SIGTERM, while the main process turns the signal into a
    stop. ``timeout``, a cluster's preemption and a closed terminal signal the whole process
    group: torch's handler ended the worker by the signal itself where another process sent
    it, and the run's stop message came with torch's "DataLoader worker is killed by signal"
    traceback. (Ignored instead, a worker outliving its loader kept the process from exiting:
    multiprocessing ends its children at exit by SIGTERM.)"""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _exit_quietly)


def _exit_quietly(_signum: int, _frame: object) -> None:
    os._exit(0)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, config: TrainConfig) -> float:
    """Top-1 accuracy over the whole dataset, summed across ranks."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64)
    device = next(model.parameters()).device
    indices = _shard(len(dataset), 0, 0, shuffle=False)
    # A bar of its own: a real validation set (thousands of clips) took minutes in silence.
    batches = tqdm(
        _batches(dataset, indices, config),
        total=math.ceil(len(indices) / config.batch_size),
        desc="validation",
        leave=False,
        disable=not config.progress or _world()[0] != 0,
        file=sys.stderr,
    )
    for x, y in batches:
        predicted = model(x.to(device, non_blocking=True)).argmax(1).cpu()
        counts += torch.tensor([(predicted == y).sum().item(), len(y)])
    if _world()[1] > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    return float(counts[0] / counts[1])


def _build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    return build_model(config.model, num_classes, **_model_args(config))


def _model_args(config: TrainConfig) -> dict[str, Any]:
    """The configured model's arguments, sized for ``--clip-shape`` where its constructor takes
    a clip shape (C3D's classifier depends on it): the data and the model cannot disagree.
    report.json records them, as ``final.pt`` needs them to be built again."""
    args = dict(config.model_args)
    if "num_classes" in args:  # the data's: a second value would be a TypeError in the call
        raise ValueError(
            "--model-args num_classes: the classes come from the data (--num-classes for "
            "synthetic data, the class folders of --data)"
        )
    model_class = MODELS.get(config.model)  # an unknown name: build_model's error
    if model_class is not None and "clip_shape" in inspect.signature(model_class).parameters:
        given = args.setdefault("clip_shape", config.clip_shape)
        if list(given) != list(config.clip_shape):
            raise ValueError(
                f"--model-args clip_shape {list(given)} contradicts --clip-shape "
                f"{config.clip_shape}; give it once, as --clip-shape"
            )
    return args


def _load_initial_weights(model: nn.Module, path: str) -> str:
    """``--init-from``: a state_dict, or a checkpoint holding one under ``model``. A classifier
    of another class count (Kinetics-400 weights fine-tuned on a dataset's own classes) starts
    new, as fine-tuning does: the note returned says so ("" when all loaded)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:  # bad input; an OSError while training is not
        raise ValueError(f"--init-from: {err}") from err
    except Exception as err:  # torch.load's errors on a file of another kind vary with it
        raise ValueError(f"--init-from {path}: not a torch state_dict or checkpoint") from err
    state = saved.get("model", saved) if isinstance(saved, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"--init-from {path}: holds no state_dict")
    # A checkpoint written after pruning holds masked convs (weight_orig, weight_mask): the
    # weights they stand for are the product.
    for key in [k for k in state if k.endswith(".weight_orig")]:
        stem = key.removesuffix("_orig")
        if f"{stem}_mask" in state:
            state[stem] = state.pop(key) * state.pop(f"{stem}_mask")
    note = _new_classifier(model, state, path)
    # Found here, not as a "diverged" first step whose advice was to lower a rate (after the
    # classifier a new class count replaces; float32, which float8 weights need).
    for key, tensor in state.items():
        floating = torch.is_tensor(tensor) and tensor.is_floating_point()
        if floating and not torch.isfinite(tensor.float()).all():
            raise ValueError(f"--init-from {path}: {key} holds NaN or infinite values")
    misfit = f"--init-from {path}: its weights do not fit the {type(model).__name__} model"
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # mis-shaped tensors
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith("size mismatch")), lines[0])
        raise ValueError(f"{misfit} ({detail}){_built_as(path)}") from err
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"it lacks the model's {listing([repr(key) for key in missing])}")
        if unexpected:
            tensors = "tensor" if len(unexpected) == 1 else "tensors"
            parts.append(
                f"it holds {len(unexpected)} {tensors} the model has no place for, "
                f"such as {unexpected[0]!r}"
            )
        raise ValueError(f"{misfit}: {', and '.join(parts)}{_built_as(path)}")
    return note


def _built_as(path: str) -> str:
    """What a run's report.json beside ``path`` says its model was built as, for an error about
    tensors the model has no place for or of other shapes (a run with another --model, other
    --model-args or --clip-shape is the likely cause): the sentence to append, or a hint where
    there is no report."""
    report = Path(path).parent / "report.json"
    try:
        built = json.loads(report.read_text())["model"]
        name, args = built["name"], json.dumps(built["args"])
    except (OSError, ValueError, KeyError, TypeError):
        return "; was it trained with another --model, --model-args or --clip-shape?"
    return f"; {report} says its model was built as {name} with args {args}"


def _new_classifier(model: nn.Module, state: dict[str, Any], path: str) -> str:
    """Where the saved classifier (the model's last Linear) has another number of outputs and
    is otherwise the same shape, or is not saved at all (a backbone alone, as self-supervised
    weights ship), ``state`` takes the model's own, freshly initialised, in its place: the note
    saying so, or "". Any other tensor the state lacks is still refused by the load."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        return ""
    name, classifier = linears[-1]
    own = {f"{name}.{k}": v.detach().clone() for k, v in classifier.named_parameters()}
    if state and not any(key in state for key in own):
        why = f"it holds no {name} (a backbone alone)"
    else:
        weight, bias = state.get(f"{name}.weight"), state.get(f"{name}.bias")
        if not isinstance(weight, torch.Tensor) or weight.shape == classifier.weight.shape:
            return ""
        if weight.ndim != 2 or weight.shape[1] != classifier.in_features:
            return ""  # a model of another shape: load_state_dict names the mismatch
        if classifier.bias is not None and (not isinstance(bias, torch.Tensor) or bias.ndim != 1):
            return ""
        state.pop(f"{name}.bias", None)
        outputs = f"{weight.shape[0]} outputs (classes), the model {classifier.out_features}"
        why = f"its {name} has {outputs}"
    state.update(own)
    return f"note: --init-from {path}: {why}: {name} starts from new weights, the rest is loaded"


# Settings that name files: a checkpoint records them absolute, so that a resume may spell them
# another way (relative, absolute, from another directory).
PATH_KEYS = ("data", "val_data", "init_from")


def _absolute(key: str, value: object) -> object:
    """A file setting as an absolute path ("synthetic" data and unset settings as they are)."""
    if key not in PATH_KEYS or not isinstance(value, str) or value in ("", "synthetic"):
        return value
    return os.path.realpath(value)


def _config_record(config: TrainConfig) -> dict[str, Any]:
    """The config a checkpoint keeps, its file settings absolute."""
    return {key: _absolute(key, value) for key, value in config.to_dict().items()}


def _same_setting(key: str, saved: object, given: object) -> bool:
    """Whether a resume's setting is the checkpoint's. A checkpoint from before file settings
    were recorded absolute holds them as given, read here from this directory."""
    return _absolute(key, saved) == _absolute(key, given)


def _padded_groups_note(pruner: Pruner) -> str:
    """The report counts the MACs the kept units hold; sparse code computes a whole group of gM
    filters per kept entry, so where gM does not divide a pruned layer's filters the build runs
    more MACs than the report says (its closing line and manifest count them)."""
    g_m = pruner.spec.group[0]
    padded = []
    for layer in pruner.layers:
        kept = pruner.kept_units(layer)
        # A layer pruned away whole computes nothing; one kept whole gets dense code; one of
        # fewer filters than gM is exported with its group clipped to them, padding none.
        filters = layer.conv.out_channels
        exported = clipped_group(pruner.spec.group, tuple(layer.conv.weight.shape))[0]
        if filters % exported and bool(kept.any()) and not bool(kept.all()):
            padded.append(f"{layer.name} ({filters})")
    if not padded:
        return ""
    return (
        f"note: {g_m} does not divide the filters of {listing(padded, shown=3)}: their sparse code "
        f"computes whole groups of {g_m}, so the build runs more conv MACs than counted above "
        f"(widths that are multiples of {g_m} avoid it)"
    )


def _check_writable(output: Path) -> None:
    """Before any training: a checkpoint that cannot be written would end the first epoch."""
    if output.is_symlink() and not output.exists():
        raise ValueError(f"--output {output}: a symlink to nothing ({os.readlink(output)})")
    for name in (CHECKPOINT, "final.pt", "report.json", "model.onnx"):
        if (output / name).is_dir():  # found only when written, after the training
            raise ValueError(f"--output {output}: {name} there is a directory")
    where = output if output.exists() else next(p for p in output.absolute().parents if p.exists())
    probe = where / f".write-check-{os.getpid()}"
    try:  # a directory made and removed: nothing is left behind if the run stops before it
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise ValueError(f"--output {output}: cannot write in {where} ({exc.strerror})") from exc


def _make_pruner(model: nn.Module, config: TrainConfig) -> Pruner:
    return Pruner(
        model,
        (3, *config.clip_shape),
        target_rate=config.target_rate,
        scheme=config.scheme,
        group=config.group,
        algorithm=config.algorithm,
        balanced=config.balanced,
        exclude=config.exclude,
        min_keep=config.min_keep,
        strength=config.strength,
        eps=config.eps,
        flops_exponent=config.flops_exponent,
    )


@dataclass
class _Parts:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    pruner: Pruner
    teacher: nn.Module | None
    run: dict[str, Any]  # what a resume must find again (:func:`_run_record`)


def _save(
    path: Path,
    parts: _Parts,
    resume_at: tuple[int, int, int, bool],
    history: list[dict[str, Any]],
    config: TrainConfig,
) -> None:
    """Everything a resume needs; tensors and plain containers only (weights_only-loadable)."""
    if _world()[0] != 0:
        return
    phase, epoch, step, started = resume_at
    gpu = _model_device(parts)
    state = {"phase": phase, "epoch": epoch, "step": step, "started": started} | {
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict() if started else None,
        "scheduler": parts.scheduler.state_dict() if started else None,
        "pruner": parts.pruner.state_dict() if parts.pruner.layers else None,
        "teacher": parts.teacher.state_dict() if parts.teacher is not None else None,
        "history": history,
        "config": _config_record(config),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(gpu) if gpu is not None else None,
        "run": parts.run,
    }
    save_checkpoint(_on_cpu(state), path)


def _run_record(train_set: Any, world: int) -> dict[str, Any]:
    """What the saved step and schedule count in: the processes sharing each epoch, the clips
    and the class folders (the model's outputs, in order); the config does not hold them."""
    return {"world": world, "clips": len(train_set), "classes": getattr(train_set, "classes", None)}


def _check_run(saved: dict[str, Any] | None, now: dict[str, Any], path: Path) -> None:
    """A resume whose processes or data differ from the checkpoint's would skip the wrong
    steps, anneal over the wrong count, or relabel the classes: refused, naming what changed
    (a checkpoint of an earlier version holds no record)."""
    what = {
        "world": "processes (torchrun's --nproc-per-node)",
        "clips": "training clips",
        "classes": "class folders",
    }
    changed = [
        f"{what[key]} {saved[key]}, not {now[key]}"
        for key in what
        if saved is not None and key in saved and saved[key] != now[key]
    ]
    if changed:
        raise ValueError(
            f"{path} was written by another run ({'; '.join(changed)}); resume it as it ran, "
            "or give another --output (or delete the checkpoint) to start over"
        )


def _model_device(parts: _Parts) -> torch.device | None:
    """The model's GPU, whose random state a checkpoint keeps too; None on the CPU."""
    device = next(parts.model.parameters()).device
    return device if device.type == "cuda" else None


def _finite_loss(
    loss: torch.Tensor, phase: str, epoch: int, step: int, config: TrainConfig
) -> float:
    """The loss's value; a run stops at NaN or inf: its weights would stay NaN in every later
    step, and the export at the end would refuse them."""
    value = loss.item()
    if math.isfinite(value):
        return value
    flag = "--dense-lr" if phase == "dense" else "--prune-lr"
    penalty = " or --strength" if phase == "regularize" else ""
    raise ValueError(
        f"training diverged: the {phase} loss became {value} at epoch {epoch + 1}, step "
        f"{step + 1}; lower {flag} ({_lr(config, phase):g}){penalty} and start again with "
        "another --output (its checkpoints hold this config)"
    )


def _lr(config: TrainConfig, phase: str) -> float:
    return config.dense_lr if phase == "dense" else config.prune_lr


def _epochs(config: TrainConfig, phase: str) -> int:
    return {
        "dense": config.dense_epochs,
        "regularize": config.reg_epochs,
        "finetune": config.finetune_epochs,
    }[phase]


def _reweight_now(done: int, total_steps: int, config: TrainConfig) -> bool:
    """After step ``done`` (from 1) of the regularization phase: every ``reweight_every`` steps,
    or (0) at each of its first three quarters (every step of a shorter phase), the start's
    reweighting (``prepare``) making four. Never after its last step, which no step of the
    penalty follows: the fourth quarter's reweighting there changed nothing."""
    if done >= total_steps:
        return False
    if config.reweight_every:
        return done % config.reweight_every == 0
    return done * 4 // total_steps > (done - 1) * 4 // total_steps


def run(config: TrainConfig) -> TrainResult:
    """Run (or resume) all phases; returns the finalized model and the pruning report."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    _init_distributed()
    rank, world = _world()
    device = _device(config, world)
    exact = config.deterministic and device.type == "cuda"
    with exact_cuda_kernels() if exact else contextlib.nullcontext():
        return _train(config, device, rank, world)


def _misfit(state: dict[str, Any], param: torch.Tensor) -> str | None:
    """The first of ``state``'s per-element tensors whose shape is not ``param``'s, by key."""
    return next(
        (
            key
            for key, value in state.items()
            if torch.is_tensor(value) and value.ndim and value.shape != param.shape
        ),
        None,
    )


def _fits(state: dict[str, Any], param: torch.Tensor) -> bool:
    return _misfit(state, param) is None


def _fit_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Puts back, or refuses, a loaded optimizer state whose tensors do not fit the parameters
    they landed on.

    Optimizer state maps parameters by position. Earlier versions put each masked conv's weight
    after its bias, so their fine-tuning checkpoints load with those two states crossed (the
    weight's momentum on the bias): a neighbouring pair whose states fit each other's parameter
    is swapped back. Any other misfit would fail inside the optimizer's first step.
    """
    state = optimizer.state
    for group in optimizer.param_groups:
        params = group["params"]
        for first, second in itertools.pairwise(params):
            a, b = state.get(first, {}), state.get(second, {})
            crossed = not _fits(a, first) and not _fits(b, second)
            if crossed and _fits(a, second) and _fits(b, first):
                state[first], state[second] = b, a
        for param in params:
            key = _misfit(state.get(param, {}), param)
            if key is not None:
                raise ValueError(
                    f"{path}: its optimizer state does not fit the model (a {key} of shape "
                    f"{tuple(state[param][key].shape)} for a parameter of shape "
                    f"{tuple(param.shape)}); delete the checkpoint to start over"
                )


def _train(config: TrainConfig, device: torch.device, rank: int, world: int) -> TrainResult:
    output = Path(config.output)
    torch.manual_seed(config.seed)
    try:
        if output.exists() and not output.is_dir():
            raise ValueError(f"--output {output}: exists and is not a directory")
        _check_writable(output)
    except OSError as exc:  # a name too long, a folder it may not enter
        raise ValueError(f"--output {output}: {exc.strerror or exc}") from exc
    train_set, val_set = _datasets(config)
    with _output_lock(output, rank):
        return _train_into(output, train_set, val_set, config, device, rank, world)


LOCK_FILE = ".lock"


@contextlib.contextmanager
def _output_lock(output: Path, rank: int) -> Iterator[None]:
    """Holds --output for this run: two runs there at once wrote one checkpoint by turns (a
    resume then went on from the other's state) and reported each other's files as their own.
    Rank 0 holds it (a POSIX lock, which the DataLoader's forked workers do not share, so it goes
    with the process however that ends) and tells the other ranks whether it got it. A file
    system without locks (some network ones) runs unlocked. A run that fails before writing
    anything leaves no --output."""
    if rank != 0:
        if not _rank0_says(True):
            raise ValueError(f"--output {output}: another run is writing there (rank 0 says)")
        yield
        return
    made = list(itertools.takewhile(lambda p: not p.exists(), [output, *output.parents]))
    lock = output / LOCK_FILE
    try:
        output.mkdir(parents=True, exist_ok=True)
        if lock.is_symlink() or (lock.exists() and not lock.is_file()):
            raise ValueError(f"--output {output}: {LOCK_FILE} there is not a file")
        held = open(lock, "a+")  # noqa: SIM115 (held until the run ends, below)
    except BaseException:
        _rank0_says(False)
        raise
    with held:
        try:
            _lock(held, output)
        except BaseException:
            _rank0_says(False)
            raise
        _rank0_says(True)
        try:
            yield
        except BaseException:
            if made and list(output.iterdir()) == [lock]:
                with contextlib.suppress(OSError):
                    lock.unlink()
                    for directory in made:
                        directory.rmdir()
            raise


def _rank0_says(ok: bool) -> bool:
    """Rank 0's ``ok`` on every rank (as given where there is one process)."""
    if _world()[1] == 1:
        return ok
    flag = torch.tensor([int(ok)])
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _lock(held: Any, output: Path) -> None:
    """Takes the lock file's lock and writes this process into it, for a second run to name."""
    try:
        fcntl.lockf(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            return  # no locks on this file system
        held.seek(0)
        owner = held.read().strip() or "another process"
        raise ValueError(
            f"--output {output}: another run is writing there ({owner}); wait for it to end or "
            "give another --output"
        ) from None
    held.seek(0)
    held.truncate()
    held.write(f"pid {os.getpid()}\n")
    held.flush()


def _train_into(
    output: Path,
    train_set: Dataset,
    val_set: Dataset,
    config: TrainConfig,
    device: torch.device,
    rank: int,
    world: int,
) -> TrainResult:
    checkpoint_path = output / CHECKPOINT
    num_classes = getattr(train_set, "num_classes", config.num_classes)
    model = _build_model(config, num_classes).to(device)
    pruner = _make_pruner(model, config)
    state = load_checkpoint(checkpoint_path)
    record = _run_record(train_set, world)
    if state is not None:
        _check_run(state.get("run"), record, checkpoint_path)
        # A setting added since the checkpoint was written ran as its default there.
        saved = {**TrainConfig().to_dict(), **state["config"]}
        # The synthetic data's own settings do nothing to a folder run: a checkpoint written
        # before they were refused with one may have recorded them.
        unused = SYNTHETIC_ONLY if config.data != "synthetic" else ()
        changed = sorted(
            key
            for key, value in config.to_dict().items()
            if key not in (*RUNTIME_KEYS, *unused) and not _same_setting(key, saved.get(key), value)
        )
        if changed:
            raise ValueError(
                f"{checkpoint_path} was written with a different config: {changed}; rerun "
                "with the same settings to resume it, or give another --output (or delete the "
                "checkpoint) to start over"
            )
    teacher: nn.Module | None = None
    history: list[dict[str, Any]] = []
    start = (0, 0, 0, False)  # phase index, epoch, step within epoch, phase started
    if state is not None:
        start = (state["phase"], state["epoch"], state["step"], state["started"])
        history = list(state["history"])
        if state["pruner"] is not None:
            pruner.prepare()
            pruner.load_state_dict(state["pruner"])
        model.load_state_dict(state["model"])
        if state["teacher"] is not None:
            teacher = _build_model(config, num_classes).to(device)
            teacher.load_state_dict(state["teacher"])
            teacher.eval()
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        if rank == 0:  # with or without progress bars: where the rerun goes on from
            print(f"resuming {checkpoint_path}: {_resume_point(config, start)}", file=sys.stderr)
    else:
        if config.init_from:
            note = _load_initial_weights(model, config.init_from)
            if note and not config.dense_epochs:
                note += " (untrained: with --dense-epochs 0 it goes into pruning as it is)"
            if note and rank == 0:
                print(note, file=sys.stderr, flush=True)
        # A target the scheme and bounds cannot reach fails now, not after the dense and
        # regularization phases: a dry run of the selection on a copy (it only weighs costs).
        _say(config, rank, f"checking that {config.target_rate}x fewer conv MACs is reachable")
        _make_pruner(deepcopy_model(model), config).prepare().plan()
    forward = DistributedDataParallel(model) if world > 1 else model
    steps_per_epoch = len(train_set) // world // config.batch_size + bool(
        len(train_set) // world % config.batch_size
    )

    for phase_index, phase in enumerate(PHASES):
        if phase_index < start[0]:
            continue
        resumed = phase_index == start[0] and start[3]
        epochs = _epochs(config, phase)
        if not resumed:
            if phase == "regularize":
                pruner.prepare()
                if config.distill:
                    teacher = deepcopy_model(model).eval()
            if phase == "finetune":
                if not pruner.layers:
                    pruner.prepare()
                _say(config, rank, f"pruning to {config.target_rate}x fewer conv MACs")
                report = pruner.prune()
                history.append(
                    {"phase": "pruned", "val_acc": evaluate(model, val_set, config)}
                    | {"conv_macs": report.conv_macs_after, "rate": json_rate(report.rate)}
                )
        optimizer = torch.optim.SGD(
            model.parameters(),
            lr=_lr(config, phase),
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        total_steps = max(1, epochs * steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        if resumed:
            optimizer.load_state_dict(state["optimizer"])
            _fit_optimizer_state(optimizer, checkpoint_path)
            scheduler.load_state_dict(state["scheduler"])
        first_epoch = start[1] if resumed else 0

        parts = _Parts(model, optimizer, scheduler, pruner, teacher, record)

        for epoch in range(first_epoch, epochs):
            skip = start[2] if resumed and epoch == first_epoch else 0
            model.train()
            indices = _shard(len(train_set), epoch + 1000 * phase_index, config.seed, True)
            bar = tqdm(
                _batches(train_set, indices, config, skip),
                total=steps_per_epoch,
                initial=skip,
                desc=f"{phase} {epoch + 1}/{epochs}",
                disable=not config.progress or rank != 0,
                file=sys.stderr,
            )
            for step, (x, y) in enumerate(bar, start=skip):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                logits = forward(x)
                if phase == "finetune" and teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(x)
                    loss = distillation_loss(
                        logits,
                        teacher_logits,
                        y,
                        temperature=config.temperature,
                        alpha=config.distill_alpha,
                    )
                else:
                    loss = F.cross_entropy(logits, y)
                # Before the step too: under torchrun the gradients' all-reduce would spread
                # one rank's NaN into every rank's weights while theirs kept finite losses
                # (rank 0 would then checkpoint them); the rank raising here stops the run.
                _finite_loss(loss, phase, epoch, step, config)
                loss = phase_step(loss, optimizer, pruner, phase)
                value = _finite_loss(loss, phase, epoch, step, config)
                scheduler.step()
                done = epoch * steps_per_epoch + step + 1
                if phase == "regularize" and _reweight_now(done, total_steps, config):
                    pruner.reweight()
                bar.set_postfix(loss=f"{value:.3f}")
                if done % config.checkpoint_every == 0:
                    _save(
                        checkpoint_path,
                        parts,
                        (phase_index, epoch, step + 1, True),
                        history,
                        config,
                    )
            accuracy = evaluate(model, val_set, config)
            history.append({"phase": phase, "epoch": epoch + 1, "val_acc": accuracy})
            if rank == 0 and config.progress:
                print(f"{phase} epoch {epoch + 1}: val acc {accuracy:.4f}", file=sys.stderr)
            _save(checkpoint_path, parts, (phase_index, epoch + 1, 0, True), history, config)
        _save(checkpoint_path, parts, (phase_index + 1, 0, 0, False), history, config)

    report = pruner.finalize()
    history.append({"phase": "final", "val_acc": evaluate(model, val_set, config)})
    if rank == 0:
        summary = {
            "report": report.to_dict(),
            "history": history,
            "config": config.to_dict(),
            # The model's output index -> class: a folder dataset's class folders, sorted.
            "classes": getattr(train_set, "classes", None),
            # What models.build_model takes to build final.pt's model again.
            "model": {
                "name": config.model,
                "num_classes": num_classes,
                "args": _model_args(config),
            },
        }
        text = json.dumps(summary, indent=2)
        replace_atomically(output / "report.json", lambda partial: partial.write_text(text))
        save_checkpoint({"model": _on_cpu(model.state_dict())}, output / "final.pt")
        if config.export:
            _export(model, output / "model.onnx", config.clip_shape)
        print(report.format_table())
        if note := _padded_groups_note(pruner):
            print(note)
        for entry in history:
            if entry["phase"] in ("pruned", "final") or entry.get("epoch") == _epochs(
                config, entry["phase"]
            ):
                print(f"{entry['phase']:<10} val acc {entry['val_acc']:.4f}")
        written = "model.onnx, " if config.export else ""
        print(f"wrote {written}final.pt and report.json to {output}")
        if config.export:
            onnx_path = output / "model.onnx"
            print(
                f"build it: python3 -m rt3d_halide.build {shlex.quote(str(onnx_path))} "
                f"--name {config.model} --target arm-64-android"
            )
    return TrainResult(model, pruner, report, history)


def _resume_point(config: TrainConfig, start: tuple[int, int, int, bool]) -> str:
    """Where a checkpoint's run goes on, in words (``start``: phase index, epoch, step within
    it, whether the phase had started)."""
    phase_index, epoch, step, started = start
    if phase_index >= len(PHASES):
        return "every phase is done; its files are written again"
    phase, epochs = PHASES[phase_index], _epochs(config, PHASES[phase_index])
    if not started:
        return f"at the start of the {phase} phase"
    if epoch >= epochs:
        return f"at the end of the {phase} phase"
    if step == 0:
        return f"at the start of {phase} epoch {epoch + 1} of {epochs}"
    return f"{phase} epoch {epoch + 1} of {epochs}, after step {step}"


def _say(config: TrainConfig, rank: int, text: str) -> None:
    """A progress line for a step that runs for a while without a bar (the unit selection
    weighs every unit of the model)."""
    if rank == 0 and config.progress:
        print(f"{text}...", file=sys.stderr, flush=True)


def _error_line(err: ValueError) -> str:
    """The error's own line: a DataLoader worker's error comes wrapped with its traceback
    ("Caught ValueError in DataLoader worker process 0. Original Traceback ..."), its own
    message last."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if last.startswith(f"{type(err).__name__}: ") else last


def _export(model: nn.Module, path: Path, clip_shape: Sequence[int]) -> None:
    """:func:`export_onnx`, whose refused write (a full disk) is bad input as
    :func:`replace_atomically`'s is: the export leaves ``path`` as it was."""
    try:
        export_onnx(model, path, (1, 3, *clip_shape))
    except OSError as err:
        raise write_refused(path, err) from err


def main(argv: list[str] | None = None) -> int:
    config: TrainConfig | None = None
    try:
        try:
            config = parse_config(argv)
        except OSError as err:  # a --config file that cannot be read
            raise ValueError(str(err)) from err
        _join_process_group(announce=config.progress)
        with stopped_by(signal.SIGTERM, signal.SIGHUP):
            run(config)
        if dist.is_available() and dist.is_initialized():
            # Rank 0 writes the report and exports after training: the others wait for it
            # before the process group goes (one aborted in the teardown now and then).
            dist.barrier()
    except ValueError as err:
        print(f"error: {_error_line(err)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Stopped) as stop:
        if _world()[0] == 0:  # under torchrun every rank gets the signal
            how = f"stopped by {stop.signal.name}" if isinstance(stop, Stopped) else "interrupted"
            checkpoint = None if config is None else Path(config.output) / CHECKPOINT
            if checkpoint is not None and checkpoint.is_file():
                where = f"it goes on from {checkpoint}"
            else:
                where = "no checkpoint was written yet: it starts over"
            print(f"\n{how}: rerun the same command to resume ({where})", file=sys.stderr)
        return 128 + stop.signal if isinstance(stop, Stopped) else 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
