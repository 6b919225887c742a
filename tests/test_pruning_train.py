"""The training CLI: config, phases, checkpoints, resume, and 2-process torch.distributed."""

import contextlib
import dataclasses
import errno
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import needs_cuda
from rt3d_halide.pruning import Pruner, check_onnx_sparsity
from rt3d_halide.pruning import train as train_module
from rt3d_halide.pruning.checkpoint import load_checkpoint
from rt3d_halide.pruning.config import TrainConfig, parse_config
from rt3d_halide.pruning.train import main, run

torch.set_num_threads(1)

FAST = [
    "--train-samples", "48", "--val-samples", "16", "--num-classes", "4",
    "--clip-shape", "8", "16", "16", "--batch-size", "8", "--threads", "1",
    "--dense-epochs", "1", "--reg-epochs", "1", "--finetune-epochs", "1",
    "--target-rate", "2.0", "--checkpoint-every", "2", "--progress", "false",
]  # fmt: skip
# FAST without the synthetic data's own flags, which a folder dataset refuses.
FOLDER_FAST = [*FAST[6:]]


DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def _config(tmp_path, *extra):
    return parse_config(["--output", str(tmp_path), *FAST, *extra])


def _interrupted(config: TrainConfig, monkeypatch, after: int) -> None:
    """Run ``config`` until its ``after``-th checkpoint is written, then stop it as Ctrl-C does."""
    saves = []
    original = train_module.save_checkpoint

    def interrupting(state, path):
        original(state, path)
        saves.append(state.get("phase"))  # final.pt's state has none
        if len(saves) == after:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", interrupting)
    with pytest.raises(KeyboardInterrupt):
        run(config)
    monkeypatch.setattr(train_module, "save_checkpoint", original)


def test_config_file_and_flags(tmp_path):
    (tmp_path / "c.toml").write_text(
        'model = "c3d"\nmodel_args = { width = 0.125 }\ngroup = [4, 4]\ntarget_rate = 2.6\n'
    )
    config = parse_config(["--config", str(tmp_path / "c.toml"), "--target-rate", "3.6"])
    assert (config.model, config.model_args, config.group) == ("c3d", {"width": 0.125}, [4, 4])
    assert config.target_rate == 3.6
    (tmp_path / "c.json").write_text(json.dumps({"balanced": True, "exclude": ["conv1"]}))
    config = parse_config(["--config", str(tmp_path / "c.json"), "--balanced", "false"])
    assert config.balanced is False and config.exclude == ["conv1"]
    (tmp_path / "c.toml").rename(tmp_path / "C.TOML")  # was "must be .toml or .json"
    assert parse_config(["--config", str(tmp_path / "C.TOML")]).group == [4, 4]
    (tmp_path / "bad.toml").write_text("learning_rate = 1.0\n")
    with pytest.raises(ValueError, match="unknown config key 'learning_rate'"):
        parse_config(["--config", str(tmp_path / "bad.toml")])
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_every_flag_has_help_with_its_default():
    from rt3d_halide.pruning.config import build_parser

    actions = [a for a in build_parser()._actions if a.dest not in ("help", "config")]
    assert {a.dest for a in actions} == {f.name for f in dataclasses.fields(TrainConfig)}
    assert all(a.help and "(default: " in a.help for a in actions)


@pytest.mark.parametrize("device", DEVICES)
def test_full_run_reports_exports_and_checkpoints_load_weights_only(tmp_path, device):
    result = run(_config(tmp_path, "--distill", "true", "--device", device))
    assert result.report.rate >= 2.0
    assert [h["phase"] for h in result.history] == [
        "dense", "regularize", "pruned", "finetune", "final",
    ]  # fmt: skip
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["report"]["rate"] == pytest.approx(result.report.rate)
    assert summary["classes"] is None  # synthetic data: its classes have no names
    patterns = check_onnx_sparsity(tmp_path / "model.onnx")
    assert {p.scheme for p in patterns.values()} == {"kgs"}
    # No map_location: a GPU run's files hold CPU tensors, for a machine without its GPU.
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["phase"] == 3 and state["teacher"] is not None
    assert (state["cuda_rng"] is not None) == (device == "cuda")
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    tensors = [*state["model"].values(), *state["teacher"].values()]
    tensors += [*state["pruner"]["masks"].values(), *state["pruner"]["regularizer"].values()]
    assert {t.device.type for t in [*tensors, *final["model"].values()]} == {"cpu"}


def test_the_teacher_runs_in_eval_mode(tmp_path, monkeypatch):
    """The teacher is the dense model at the start of the regularization, copied: in train mode
    its BatchNorms would normalise by each batch and drift their statistics as it teaches."""
    copies, modes = [], []
    copy, loss = train_module.deepcopy_model, train_module.distillation_loss

    def copying(model):
        copies.append(copy(model))
        return copies[-1]

    def distilling(*args, **kwargs):
        modes.append({module.training for module in copies[-1].modules()})  # the teacher
        return loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "deepcopy_model", copying)
    monkeypatch.setattr(train_module, "distillation_loss", distilling)
    flags = ["--distill", "true", "--export", "false", "--dense-epochs", "0"]
    run(_config(tmp_path, *flags))
    assert modes and all(mode == {False} for mode in modes)


class _RunsCode:
    """Unpickled, creates ``marker``: what a doctored checkpoint could run instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused_unrun(tmp_path):
    """--output may hold a file someone else wrote: checkpoints load weights only, so a pickled
    object's code never runs and the file is named as no checkpoint."""
    marker = tmp_path / "ran"
    torch.save({"config": {}, "payload": _RunsCode(marker)}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="not a checkpoint this run can resume from"):
        load_checkpoint(tmp_path / "checkpoint.pt")
    assert not marker.exists()


# Checkpoints of FAST (6 steps an epoch, one every 2 steps, one at each epoch's and phase's
# end): 4 and 9 end the dense and the regularize epoch; 7 and 12 fall 4 steps into the
# regularize and the finetune phase, where the penalty weights, masks and momentum are loaded.
MID_PHASE = [7, 12]


@pytest.mark.parametrize(
    ("device", "interrupt_after", "extra"),
    [
        *(pytest.param("cpu", n, [], id=f"cpu-{n}") for n in [4, 7, 9, 12]),
        # Two dense epochs, stopped 2 steps into the first: only that epoch skips its first
        # steps on resume, the second runs whole.
        pytest.param("cpu", 1, ["--dense-epochs", "2"], id="cpu-1-of-2-epochs"),
        *(pytest.param("cuda", n, [], marks=needs_cuda, id=f"cuda-{n}") for n in MID_PHASE),
    ],
)
def test_an_interrupted_run_resumes_to_the_same_model(
    tmp_path, monkeypatch, interrupt_after, device, extra
):
    """Seeded, a restart from scratch would end with the same model too: the resumed run must
    also take fewer training steps than the whole run. On a GPU with ``--deterministic``, and
    the first resumed step draws from the random states (CPU and GPU) the checkpoint kept: each
    step draws a CPU random number, as dropout would, so that the CPU state moves as it trains
    (the tiny model draws none)."""
    steps = []
    step = train_module.phase_step

    def counting(*args):
        gpu = torch.cuda.get_rng_state() if device == "cuda" else None
        steps.append((torch.get_rng_state(), gpu))
        torch.rand(())
        return step(*args)

    monkeypatch.setattr(train_module, "phase_step", counting)
    flags = ["--export", "false", "--device", device, "--deterministic", "true", *extra]
    reference = run(_config(tmp_path / "straight", *flags))
    whole = len(steps)
    config = _config(tmp_path / "resumed", *flags)
    _interrupted(config, monkeypatch, interrupt_after)
    steps.clear()
    saved = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    resumed = run(config)
    assert 0 < len(steps) < whole
    assert torch.equal(steps[0][0], saved["rng"])
    if device == "cuda":
        assert torch.equal(steps[0][1], saved["cuda_rng"])
    momentum = [t for state in saved["optimizer"]["state"].values() for t in state.values()]
    assert momentum and {t.device.type for t in momentum} == {"cpu"}
    expected, actual = reference.model.state_dict(), resumed.model.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)
    assert resumed.report == reference.report


def test_an_earlier_versions_crossed_optimizer_state_is_put_back(tmp_path, monkeypatch):
    """Earlier versions put each masked conv's weight after its bias: their fine-tuning
    checkpoints load with the two momenta crossed, which the resume puts back (the run ends as
    a straight one does); a state that fits nothing is refused, not left to fail in SGD."""
    flags = ["--export", "false", "--deterministic", "true"]
    reference = run(_config(tmp_path / "straight", *flags))
    config = _config(tmp_path / "resumed", *flags)
    _interrupted(config, monkeypatch, MID_PHASE[1])
    path = tmp_path / "resumed" / "checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    state = saved["optimizer"]["state"]
    first, second = sorted(state)[:2]
    assert state[first]["momentum_buffer"].shape != state[second]["momentum_buffer"].shape
    state[first], state[second] = state[second], state[first]
    torch.save(saved, path)
    resumed = run(config)
    expected, actual = reference.model.state_dict(), resumed.model.state_dict()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)

    _interrupted(_config(tmp_path / "bad", *flags), monkeypatch, MID_PHASE[1])
    path = tmp_path / "bad" / "checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    saved["optimizer"]["state"][first]["momentum_buffer"] = torch.zeros(7)
    torch.save(saved, path)
    with pytest.raises(ValueError, match=r"optimizer state does not fit the model \(a momentum"):
        run(_config(tmp_path / "bad", *flags))


@needs_cuda
@pytest.mark.parametrize("interrupt_after", MID_PHASE)
def test_a_cpu_run_resumes_on_the_gpu(tmp_path, monkeypatch, interrupt_after):
    """The checkpoint's penalty weights, masks and momentum meet the model on the GPU; the end
    is the CPU's within float32 rounding, with the same pattern."""
    reference = run(_config(tmp_path / "cpu", "--export", "false"))
    _interrupted(_config(tmp_path / "moved", "--export", "false"), monkeypatch, interrupt_after)
    flags = ["--export", "false", "--device", "cuda", "--deterministic", "true"]
    resumed = run(_config(tmp_path / "moved", *flags))
    assert resumed.report == reference.report
    expected, actual = reference.model.state_dict(), resumed.model.state_dict()
    for key in expected:
        assert actual[key].device.type == "cuda", key
        torch.testing.assert_close(actual[key].cpu(), expected[key], rtol=1e-4, atol=1e-5)
        assert torch.equal(actual[key].cpu() == 0, expected[key] == 0), key


def test_deterministic_kernels_hold_inside_the_run_only():
    """``--deterministic`` switches cuDNN's process-wide settings for the run and puts torch's
    back after it, also when the run fails."""
    cudnn = torch.backends.cudnn
    before = (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32)
    with pytest.raises(RuntimeError, match="stop"), train_module.exact_cuda_kernels():
        assert (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32) == (True, False, False)
        assert torch.backends.cuda.matmul.allow_tf32 is False
        raise RuntimeError("stop")
    assert (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32) == before


def test_a_device_this_machine_lacks_is_bad_input(tmp_path, capsys, monkeypatch):
    """Refused before any work, with what torch sees; a device of another kind at parse time;
    a GPU under torchrun (one process per GPU is not built)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--output", str(tmp_path / "n"), *FAST, "--device", "cuda"]) == 2
    assert f"this torch ({torch.__version__}) sees no CUDA GPU" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["--output", str(tmp_path / "n"), *FAST, "--device", "cuda:1"]) == 2
    assert "--device cuda:1: this machine has 1 CUDA GPU(s), numbered from 0" in (
        capsys.readouterr().err
    )
    assert main(["--output", str(tmp_path / "n"), *FAST, "--device", "gpu"]) == 2
    assert "device must be cpu, cuda or cuda:N, got 'gpu'" in capsys.readouterr().err
    monkeypatch.setattr(train_module, "_world", lambda: (0, 2))
    assert main(["--output", str(tmp_path / "n"), *FAST, "--device", "cuda"]) == 2
    assert "under torchrun the ranks train on CPUs" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


def test_a_finished_run_says_what_it_wrote_and_a_changed_config_is_refused(tmp_path, capsys):
    """The steps without a progress bar say what they do, the last lines name the files and
    the build command; rerunning into the same output with another target rate is refused,
    saying how to resume or start over."""
    assert main(["--output", str(tmp_path), *FAST, "--progress", "true"]) == 0
    out, err = capsys.readouterr()
    assert "checking that 2.0x fewer conv MACs is reachable...\n" in err
    assert "pruning to 2.0x fewer conv MACs...\n" in err
    assert f"wrote model.onnx, final.pt and report.json to {tmp_path}" in out
    # The tiny model's 12 and 20 filters leave 8x4 groups padded: the build runs more MACs.
    # Its 6-filter stem is exported with a 6x3 group, which pads nothing.
    assert "note: 8 does not divide the filters of features.4 (12), features.8 (20):" in out
    assert f"python3 -m rt3d_halide.build {tmp_path / 'model.onnx'} --name tiny" in out
    assert main(["--output", str(tmp_path), *FAST, "--target-rate", "3"]) == 2
    err = capsys.readouterr().err
    assert "different config: ['target_rate']" in err and "give another --output" in err


def test_the_largest_seed_trains(tmp_path):
    """The shuffles' seeds derive from it past 2**64, where torch's manual_seed overflowed."""
    assert main(["--output", str(tmp_path), *FAST, "--seed", str(2**63 - 1)]) == 0


def test_main_exits_2_on_bad_input(tmp_path, capsys):
    assert main(["--output", str(tmp_path), *FAST, "--algorithm", "admm"]) == 2
    assert "unknown pruning algorithm" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"balanced": "false"}, "balanced must be true or false, got 'false'"),
        ({"target_rate": "3.6"}, "target_rate must be a finite number"),
        ({"group": 8}, "group must be a list of integers"),
        ({"model_args": 3}, "model_args must be a JSON object"),
        ({"exclude": ["conv1", 2]}, "exclude must be a list of strings"),
        ({"distill_alpha": 2}, r"distill_alpha must be in \[0, 1\]"),
        ({"temperature": 0}, "temperature must be positive"),
        ({"prune_lr": -1}, "prune_lr must be positive"),
        ({"momentum": 1.5}, r"momentum must be in \[0, 1\)"),
        ({"threads": -3}, "threads must be >= 0"),
        ({"threads": 100000}, "threads must be <= 4096"),
        ({"group": [8]}, r"^error: group needs 2 values \(gM, gN\), got \[8\]$"),
        ({"strength": float("nan")}, "strength must be a finite number, got nan"),
        ({"dense_lr": float("inf")}, "dense_lr must be a finite number, got inf"),
        ({"threads": 10**400}, "threads must be <= 4096"),  # no float holds it
        ({"seed": -1}, r"seed must be in \[0, 2\*\*63\), got -1"),  # numpy's error, unnamed
        ({"seed": 2**63}, r"seed must be in \[0, 2\*\*63\)"),
        ({"frame_glob": "img_*"}, "frame_glob is for a folder dataset, not synthetic data"),
    ],
)
def test_config_values_of_the_wrong_type_or_range_are_bad_input(tmp_path, capsys, values, message):
    """Checked before any training (a value found bad in a later phase could not be fixed on
    the rerun: the checkpoint holds the old config)."""
    (tmp_path / "c.json").write_text(json.dumps(values))
    flags = {"--" + key.replace("_", "-") for key in values}  # FAST's would override the file
    fast = [a for i, a in enumerate(FAST) if a not in flags and FAST[i - 1] not in flags]
    argv = ["--output", str(tmp_path / "run"), *fast, "--config", str(tmp_path / "c.json")]
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err, re.M)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flags", "named"),
    [(["--dense-lr", "1e30"], "the dense loss"), (["--strength", "1e38"], "the regularize loss")],
)
def test_a_run_that_diverges_stops_at_once(tmp_path, capsys, flags, named):
    """Its NaN weights would train every later phase for nothing; the export refuses them."""
    assert main(["--output", str(tmp_path / "run"), *FAST, *flags]) == 2
    err = capsys.readouterr().err
    assert f"error: training diverged: {named} became" in err and "at epoch 1, step" in err, err
    assert not (tmp_path / "run" / "model.onnx").exists()


def test_a_nan_data_loss_stops_before_the_step(tmp_path, capsys, monkeypatch):
    """Under torchrun one rank's NaN loss would reach every rank's weights through the
    gradients' all-reduce, where the others' losses stay finite: it stops before the step."""
    steps = []
    monkeypatch.setattr(train_module, "phase_step", lambda *args: steps.append(args))
    monkeypatch.setattr(
        torch.nn.functional, "cross_entropy", lambda logits, y: logits.sum() * float("nan")
    )
    assert main(["--output", str(tmp_path / "run"), *FAST]) == 2
    assert "training diverged: the dense loss became nan at epoch 1, step 1" in (
        capsys.readouterr().err
    )
    assert steps == []


def test_a_clip_shape_of_two_values_is_refused():
    with pytest.raises(ValueError, match=r"^clip_shape needs 3 values \(T, H, W\), got \[8, 16\]$"):
        TrainConfig(clip_shape=(8, 16))


def test_a_config_file_that_does_not_parse_is_named(tmp_path, capsys):
    for name, text in (("c.toml", "target_rate = = 3"), ("c.json", "{target_rate: 3}")):
        (tmp_path / name).write_text(text)
        argv = ["--output", str(tmp_path / "run"), *FAST, "--config", str(tmp_path / name)]
        assert main(argv) == 2
        assert f"error: {tmp_path / name}: " in capsys.readouterr().err
    assert main(["--output", str(tmp_path / "run"), *FAST, "--config", ""]) == 2
    assert "error: --config: an empty path" in capsys.readouterr().err
    # A path that cannot be read said "[Errno 2] No such file or directory: 'nope.toml'".
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe")
    for name, said in (
        ("nope.toml", "No such file or directory"),
        (".", "Is a directory"),
        (str(tmp_path / "binary.toml"), "not UTF-8 text (invalid start byte)"),
    ):
        assert main(["--output", str(tmp_path / "run"), *FAST, "--config", name]) == 2
        assert f"error: --config {name}: {said}\n" in capsys.readouterr().err


def test_config_takes_tuples_paths_and_numpy_numbers(tmp_path):
    """What means the same is converted: the API worked with these before the type checks."""
    config = TrainConfig(
        output=tmp_path / "run",
        clip_shape=(8, 16, 16),
        group=(4, 4),
        exclude=("features.0",),
        target_rate=np.float32(2.0),
        batch_size=np.int64(8),
        balanced=np.bool_(True),
    )
    assert config.output == str(tmp_path / "run") and config.clip_shape == [8, 16, 16]
    assert config.group == [4, 4] and config.exclude == ["features.0"]
    assert type(config.target_rate) is float and type(config.batch_size) is int
    assert config.balanced is True
    (tmp_path / "entry").touch()
    with os.scandir(os.fsencode(tmp_path)) as entries:
        entry = next(entries)
    with pytest.raises(ValueError, match="output must be a string"):  # a bytes path
        TrainConfig(output=entry)


def test_an_unknown_model_is_bad_input(tmp_path, capsys):
    assert main(["--output", str(tmp_path / "run"), *FAST, "--model", "foo"]) == 2
    assert "unknown model 'foo'" in capsys.readouterr().err


def test_a_model_sized_by_clip_shape_follows_the_flag(tmp_path):
    """C3D's classifier depends on the clip: it is built for --clip-shape, not its default."""
    from rt3d_halide.pruning.models import C3D

    result = run(
        _config(tmp_path, "--model", "c3d", "--model-args", '{"width": 0.125}', "--clip-shape",
                "16", "32", "32", "--export", "false", "--dense-epochs", "0", "--reg-epochs",
                "0", "--finetune-epochs", "0")
    )  # fmt: skip
    sized = C3D(4, width=0.125, clip_shape=(16, 32, 32))
    assert result.model.fc6.in_features == sized.fc6.in_features
    assert result.model.fc6.in_features != C3D(4, width=0.125).fc6.in_features
    bad = ["--model", "c3d", "--model-args", '{"width": 0.125, "clip_shape": [4, 16, 16]}']
    with pytest.raises(ValueError, match="contradicts --clip-shape"):
        run(_config(tmp_path / "bad", *bad))


def test_init_from_weights_that_are_not_this_model_are_bad_input(tmp_path, capsys):
    (tmp_path / "text.pt").write_text("not a checkpoint")
    (tmp_path / "junk.pt").write_text("junk\n")  # torch.load: KeyError, not an unpickling error
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    cases = [("text.pt", "not a torch state_dict"), ("junk.pt", "not a torch state_dict")]
    misfit = (
        "model: it lacks the model's 'features.0.weight' and 14 more, and it holds 1 tensor "
        "the model has no place for, such as 'fc.weight'; was it trained with another --model"
    )
    for name, message in [*cases, ("other.pt", misfit)]:
        argv = ["--output", str(tmp_path / "run"), *FAST, "--init-from", str(tmp_path / name)]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "taken").write_text("")
    assert main(["--output", str(tmp_path / "taken"), *FAST]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def _loaded_with_a_new_classifier(tmp_path, state: dict, file: str) -> tuple[torch.nn.Module, str]:
    """A new 4-class model initialised from ``state`` saved as ``file``, and the load's note:
    its classifier stays its own, every other saved tensor is loaded."""
    torch.save(state, tmp_path / file)
    model = train_module._build_model(_config(tmp_path / "b"), 4)
    fresh = model.classifier.weight.detach().clone()
    note = train_module._load_initial_weights(model, str(tmp_path / file))
    assert torch.equal(model.classifier.weight, fresh)
    for name, tensor in state.items():
        if not name.startswith("classifier."):
            assert torch.equal(model.state_dict()[name], tensor), name
    return model, note


def test_init_from_weights_of_another_class_count_keeps_a_new_classifier(tmp_path, capsys):
    """Kinetics-400 weights fine-tuned on a dataset's own classes: every other tensor loads,
    the classifier starts new, and a note says so; any other misfit is still refused."""
    saved = train_module._build_model(_config(tmp_path / "a", "--num-classes", "6"), 6)
    model, note = _loaded_with_a_new_classifier(tmp_path, saved.state_dict(), "six.pt")
    assert note == (
        f"note: --init-from {tmp_path / 'six.pt'}: its classifier has 6 outputs (classes), the "
        "model 4: classifier starts from new weights, the rest is loaded"
    )
    argv = ["--output", str(tmp_path / "run"), *FAST, "--init-from", str(tmp_path / "six.pt")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "its classifier has 6 outputs (classes), the model 4" in err and "untrained" not in err
    untrained = [*argv[:1], str(tmp_path / "untrained"), *argv[2:], "--dense-epochs", "0"]
    assert main(untrained) == 0
    assert "(untrained: with --dense-epochs 0 it goes into pruning as it is)" in (
        capsys.readouterr().err
    )
    wider = saved.state_dict()
    wider["classifier.weight"] = torch.zeros(6, wider["classifier.weight"].shape[1] + 1)
    torch.save(wider, tmp_path / "wider.pt")
    said = r"size mismatch for classifier\.weight.*trained with another --model, --model-args"
    with pytest.raises(ValueError, match=said):
        train_module._load_initial_weights(model, str(tmp_path / "wider.pt"))


def test_init_from_a_backbone_alone_keeps_a_new_classifier(tmp_path):
    """Self-supervised video weights ship without a head: the rest loads and the classifier
    starts new; a backbone that lacks any other tensor is still refused."""
    saved = train_module._build_model(_config(tmp_path / "a"), 4).state_dict()
    backbone = {k: v for k, v in saved.items() if not k.startswith("classifier.")}
    model, note = _loaded_with_a_new_classifier(tmp_path, backbone, "backbone.pt")
    assert note == (
        f"note: --init-from {tmp_path / 'backbone.pt'}: it holds no classifier (a backbone "
        "alone): classifier starts from new weights, the rest is loaded"
    )
    del backbone["features.0.weight"]
    torch.save(backbone, tmp_path / "less.pt")
    with pytest.raises(ValueError, match=r"it lacks the model's 'features\.0\.weight'; was it"):
        train_module._load_initial_weights(model, str(tmp_path / "less.pt"))


def test_init_from_a_run_of_another_width_names_what_its_report_recorded(tmp_path, capsys):
    """A run with --model-args, initialised from without them: the run's report.json says what
    its model was built as."""
    wide = ["--model-args", '{"widths": [8, 16, 24]}']
    assert main(["--output", str(tmp_path / "wide"), *FAST, *wide]) == 0
    capsys.readouterr()
    final = tmp_path / "wide" / "final.pt"
    assert main(["--output", str(tmp_path / "run"), *FAST, "--init-from", str(final)]) == 2
    err = capsys.readouterr().err
    assert "size mismatch for" in err
    assert f"{tmp_path / 'wide' / 'report.json'} says its model was built as tiny with args " in err
    assert 'with args {"widths": [8, 16, 24]}' in err


def test_missing_files_are_bad_input(tmp_path, capsys):
    for flag in ("--config", "--init-from"):
        argv = ["--output", str(tmp_path / "run"), *FAST, flag, str(tmp_path / "nope.toml")]
        assert main(argv) == 2
        assert "nope.toml" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("total", "every", "steps"),
    [(100, 0, [25, 50, 75]), (10, 0, [3, 5, 8]), (3, 0, [1, 2]), (10, 4, [4, 8]), (8, 4, [4])],
)
def test_reweighting_runs_at_each_quarter_unless_a_period_is_given(total, every, steps):
    """Not after the phase's last step: no step of the penalty would follow it."""
    config = TrainConfig(reweight_every=every)
    assert [d for d in range(1, total + 1) if train_module._reweight_now(d, total, config)] == steps


def test_an_unreachable_target_fails_before_training(tmp_path, capsys, monkeypatch):
    """The selection's dry run refuses 100x before the dense phase spends a step."""

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking the target")

    monkeypatch.setattr(train_module, "phase_step", no_training)
    argv = ["--output", str(tmp_path / "run"), *FAST, "--target-rate", "100"]
    assert main(argv) == 2
    assert "target_rate 100 cannot be reached" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@contextlib.contextmanager
def _process_group(rank: int, world: int, store: str) -> Iterator[None]:
    """This process as ``rank`` of a gloo group, one thread each. The ranks meet in a file of
    the test's own (a free port handed over would race with the other gloo test under -n 2).

    Twice in full parallel suites (once in each test; never in over 60 runs of the two alone,
    under load or not) a rank aborted with "terminate called without an active exception", we
    think in gloo's C++ teardown racing the other rank's exit. So a rank that did its work
    meets the other at a barrier, when no collective is left in flight, and leaves without
    tearing gloo down (``os._exit``, its files already closed); a rank that fails raises, and
    spawn reports it."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _distributed_worker(rank: int, world: int, store: str, output: str) -> None:
    with _process_group(rank, world, store):
        config = parse_config(["--output", output, *FAST, "--export", "false"])
        result = run(config)
        pruner = result.pruner
        torch.save(
            {
                "units": {layer.name: pruner.kept_units(layer) for layer in pruner.layers},
                "penalty": pruner.regularizer.state_dict(),
                "model": result.model.state_dict(),
            },
            os.path.join(output, f"rank{rank}.pt"),
        )


def _diverged_pruner_worker(rank: int, world: int, store: str, output: str) -> None:
    """A pruner over weights that differ per rank (seeded by it): only rank 0's broadcasts
    can make the ranks agree."""
    with _process_group(rank, world, store):
        torch.manual_seed(rank)
        model = torch.nn.Sequential(
            torch.nn.Conv3d(4, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 8, 3)
        )
        weight = model[0].weight.detach().clone()
        pruner = Pruner(model, (4, 4, 6, 6), target_rate=2.0, algorithm="reweighted").prepare()
        norms = {layer.name: layer.reference_norm for layer in pruner.layers}
        penalty = {k: v.clone() for k, v in pruner.regularizer.state_dict().items()}
        pruner.prune()
        units = {layer.name: pruner.kept_units(layer) for layer in pruner.layers}
        torch.save(
            {"weight": weight, "norms": norms, "penalty": penalty, "units": units},
            os.path.join(output, f"diverged{rank}.pt"),
        )


def test_ranks_with_different_weights_take_rank_0s_norms_penalties_and_masks(tmp_path):
    """Under DDP the ranks' weights agree anyway; here they differ, so each rank computing
    its own would disagree."""
    store = str(tmp_path / "store")
    mp.spawn(_diverged_pruner_worker, args=(2, store, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"diverged{r}.pt", weights_only=True) for r in range(2)]
    assert not torch.equal(ranks[0]["weight"], ranks[1]["weight"])
    assert ranks[0]["norms"] == ranks[1]["norms"]
    for key in ("penalty", "units"):
        first, second = ranks[0][key], ranks[1][key]
        assert first.keys() == second.keys() and first
        for name in first:
            assert torch.equal(first[name], second[name]), (key, name)
    assert not all(units.all() for units in ranks[0]["units"].values())


def test_two_processes_keep_masks_and_penalties_identical(tmp_path):
    store = str(tmp_path / "store")
    mp.spawn(_distributed_worker, args=(2, store, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["units"].keys() == ranks[1]["units"].keys() and ranks[0]["units"]
    for name in ranks[0]["units"]:
        assert torch.equal(ranks[0]["units"][name], ranks[1]["units"][name])
    assert not all(units.all() for units in ranks[0]["units"].values())  # something was pruned
    assert ranks[0]["penalty"].keys() == ranks[1]["penalty"].keys()
    for name in ranks[0]["penalty"]:
        assert torch.equal(ranks[0]["penalty"][name], ranks[1]["penalty"][name])
    for key, value in ranks[0]["model"].items():
        if "running" not in key and "num_batches" not in key:
            assert torch.equal(value, ranks[1]["model"][key]), key


def _locked_out_worker(rank: int, world: int, store: str, output: str) -> None:
    with _process_group(rank, world, store):
        try:
            run(parse_config(["--output", output, *FAST, "--export", "false"]))
        except ValueError as err:
            Path(output, f"refused{rank}").write_text(str(err))


def test_every_rank_is_refused_an_output_another_run_holds(tmp_path):
    """Rank 0 alone takes the lock: refused, it left the other ranks to die in its next
    broadcast, with a traceback."""
    with _lock_held_elsewhere(tmp_path / "run"):
        store = str(tmp_path / "store")
        mp.spawn(_locked_out_worker, args=(2, store, str(tmp_path / "run")), nprocs=2, join=True)
    for rank in range(2):
        said = (tmp_path / "run" / f"refused{rank}").read_text()
        assert "another run is writing there" in said


def _frame_folders(root, classes):
    for name in classes:
        clip = root / name / "v_01"
        clip.mkdir(parents=True)
        for t in range(2):
            np.save(clip / f"{t}.npy", np.full((16, 16, 3), t, np.uint8))


def test_folder_datasets_must_share_their_classes(tmp_path, capsys):
    """Labels index the sorted class folders: a validation set of other classes would score
    nonsense. Hidden folders (a notebook's checkpoints) are no class."""
    _frame_folders(tmp_path / "train", ["Run", "Walk"])
    _frame_folders(tmp_path / "val", ["Run", "Swim"])
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    argv = ["--output", str(tmp_path / "run"), *FOLDER_FAST, "--data", str(tmp_path / "train")]
    assert main([*argv, "--val-data", str(tmp_path / "val")]) == 2
    err = capsys.readouterr().err
    assert "other classes than --data" in err and "only in --val-data ['Swim']" in err
    assert "only in --data ['Walk'] (a class without validation clips takes an empty folder)" in err
    assert not (tmp_path / "run").exists()


def test_class_names_in_two_unicode_forms_are_told_apart(tmp_path, capsys):
    """'café' in NFC and in NFD printed alike: two lists that looked the same."""
    _frame_folders(tmp_path / "train", ["Run", "caf\u00e9"])
    _frame_folders(tmp_path / "val", ["Run", "cafe\u0301"])
    argv = ["--output", str(tmp_path / "run"), *FOLDER_FAST, *_folder_flags(tmp_path)]
    assert main(argv) == 2
    said = "'cafe\\u0301' (in --val-data) and 'caf\\xe9' (in --data) are one name in two"
    assert said in capsys.readouterr().err


def test_a_training_class_without_clips_is_refused_but_validation_may_lack_one(tmp_path, capsys):
    """An empty training class folder is a class the model never sees (it would still take an
    output); validation folders must match the training ones, so there an empty one is a class
    with no clips to score, and trains."""
    _frame_folders(tmp_path / "train", ["Run", "Walk"])
    _frame_folders(tmp_path / "val", ["Run"])
    (tmp_path / "val" / "Walk").mkdir()
    argv = [*FOLDER_FAST, "--data", str(tmp_path / "train"), "--val-data", str(tmp_path / "val")]
    assert main(["--output", str(tmp_path / "ok"), *argv]) == 0
    assert json.loads((tmp_path / "ok" / "report.json").read_text())["classes"] == ["Run", "Walk"]
    (tmp_path / "train" / "Jump").mkdir()
    (tmp_path / "val" / "Jump").mkdir()
    assert main(["--output", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert "class folders without clips ['Jump']" in err
    assert not (tmp_path / "run").exists()


def test_an_unreadable_validation_frame_fails_before_training(tmp_path, capsys, monkeypatch):
    """Validation first runs after an epoch's training: each folder's first clip is read at
    the start, so a frame format that does not read fails at once."""
    monkeypatch.setattr(train_module, "phase_step", lambda *args: pytest.fail("it trained"))
    _train_and_val_folders(tmp_path)
    (tmp_path / "val" / "Run" / "v_01" / "0.npy").write_bytes(b"not numpy")
    argv = ["--data", str(tmp_path / "train"), "--val-data", str(tmp_path / "val")]
    assert main(["--output", str(tmp_path / "run"), *FOLDER_FAST, *argv]) == 2
    assert "0.npy: cannot read the frame" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_folder_dataset_of_one_class_is_refused(tmp_path, capsys):
    """Cross-entropy over one class is zero whatever the weights: nothing would be learned."""
    for split in ("train", "val"):
        _frame_folders(tmp_path / split, ["Run"])
    argv = ["--data", str(tmp_path / "train"), "--val-data", str(tmp_path / "val")]
    assert main(["--output", str(tmp_path / "run"), *FOLDER_FAST, *argv]) == 2
    assert "one class folder ['Run']; a classifier needs at least two" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--train-samples", "0"], "train_samples must be positive"),
        (["--strength", "nan"], "strength must be a finite number"),
        (["--eps", "inf"], "eps must be a finite number"),
        (["--val-data", "somewhere"], "val_data is for a folder dataset"),
        # Not "a folder dataset needs --val-data", where the folder named is not there.
        (["--data", "nodata"], "--data nodata: no such folder"),
        (["--data", "/dev/null"], "--data /dev/null: not a folder"),
        (["--model-args", "{widths:1}"], "--model-args: not JSON"),
        (["--model-args", "[1]"], "--model-args: needs a JSON object"),
    ],
)
def test_flags_that_cannot_apply_are_named(tmp_path, capsys, flags, message):
    fast = FOLDER_FAST if "--data" in flags else FAST
    with contextlib.suppress(SystemExit):
        assert main(["--output", str(tmp_path / "run"), *fast, *flags]) == 2
    assert message in capsys.readouterr().err


def test_an_output_that_cannot_be_written_fails_before_training(tmp_path, capsys, monkeypatch):
    real_mkdir = Path.mkdir

    def refused(path, *args, **kwargs):
        if path.name.startswith(".write-check-"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refused)
    assert main(["--output", str(tmp_path / "run"), *FAST]) == 2
    assert f"--output {tmp_path / 'run'}: cannot write in {tmp_path}" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_an_output_or_data_name_too_long_is_bad_input(tmp_path, capsys):
    assert main(["--output", str(tmp_path / ("x" * 300)), *FAST]) == 2
    assert "File name too long" in capsys.readouterr().err
    folder = ["--data", str(tmp_path / ("d" * 300)), "--val-data", str(tmp_path)]
    assert main(["--output", str(tmp_path / "run"), *FOLDER_FAST, *folder]) == 2
    assert "File name too long" in capsys.readouterr().err


def test_an_output_that_is_a_dangling_symlink_is_refused(tmp_path, capsys):
    (tmp_path / "run").symlink_to(tmp_path / "gone")
    assert main(["--output", str(tmp_path / "run"), *FAST]) == 2
    assert "a symlink to nothing" in capsys.readouterr().err


def test_init_from_a_checkpoint_written_after_pruning(tmp_path):
    """A checkpoint of the fine-tuning phase holds masked convs: their weights are
    weight_orig x weight_mask, which is what --init-from loads."""
    config = _config(tmp_path / "a")
    result = train_module.run(config)
    checkpoint = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert any(key.endswith(".weight_mask") for key in checkpoint["model"])
    model = train_module._build_model(config, 4)
    train_module._load_initial_weights(model, str(tmp_path / "a" / "checkpoint.pt"))
    want = result.model.state_dict()
    assert model.state_dict().keys() == want.keys()
    for name, got in model.state_dict().items():
        torch.testing.assert_close(got, want[name], msg=name)


def test_a_resume_may_spell_the_data_folder_another_way(tmp_path, capsys, monkeypatch):
    _train_and_val_folders(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["--output", "run", *FOLDER_FAST, "--val-data", "val"]
    assert main([*argv, "--data", "train"]) == 0
    assert main([*argv, "--data", str(tmp_path / "train")]) == 0
    assert main([*argv, "--data", "val"]) == 2  # another folder is another config
    assert "different config: ['data']" in capsys.readouterr().err
    # From another directory, the checkpoint's absolute paths still match.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = ["--output", "../run", *FOLDER_FAST, "--val-data", "../val", "--data", "../train"]
    assert main(again) == 0


def test_a_damaged_checkpoint_or_an_output_file_that_is_a_folder_is_named(tmp_path, capsys):
    """torch.load's traceback advised weights_only=False; a folder in model.onnx's place failed
    after the whole training."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_text("x")
    assert main(["--output", str(tmp_path / "run"), *FAST]) == 2
    assert "checkpoint.pt: not a checkpoint this run can resume from" in capsys.readouterr().err
    torch.save({"model": {}}, tmp_path / "run" / "checkpoint.pt")  # a torch file, not ours
    assert main(["--output", str(tmp_path / "run"), *FAST]) == 2
    assert "checkpoint.pt: not a checkpoint of this training CLI" in capsys.readouterr().err
    (tmp_path / "other" / "model.onnx").mkdir(parents=True)
    assert main(["--output", str(tmp_path / "other"), *FAST]) == 2
    assert "model.onnx there is a directory" in capsys.readouterr().err


def test_a_checkpoint_it_may_not_read_is_not_called_damaged(tmp_path, monkeypatch):
    """A permission error was advised "delete it to start over", which would throw away a
    good checkpoint."""
    from rt3d_halide.pruning import checkpoint as checkpoint_module

    (tmp_path / "checkpoint.pt").write_text("x")

    def refused(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "checkpoint.pt"))

    monkeypatch.setattr(checkpoint_module.torch, "load", refused)
    with pytest.raises(ValueError, match=r"checkpoint\.pt: Permission denied$"):
        checkpoint_module.load_checkpoint(tmp_path / "checkpoint.pt")


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--model-args", '{"num_classes": 3}'], "--model-args num_classes: the classes come from"),
    ],
)
def test_model_args_that_the_data_sets_are_refused(tmp_path, capsys, flags, said):
    assert main(["--output", str(tmp_path / "run"), *FAST, *flags]) == 2
    assert said in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("name", "text", "said"),
    [
        ("c.toml", "target-rate = 2\n", "unknown config key 'target-rate' (keys use underscores"),
        ("c.json", "[1, 2]", "a config is a table of keys (a JSON object), not [1, 2]"),
    ],
)
def test_a_config_key_spelled_as_a_flag_is_pointed_to_its_name(tmp_path, capsys, name, text, said):
    (tmp_path / name).write_text(text)
    argv = ["--output", str(tmp_path / "run"), *FAST, "--config", str(tmp_path / name)]
    assert main(argv) == 2
    assert said in capsys.readouterr().err


def test_an_interrupted_run_says_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "run", interrupted)
    assert main(["--output", str(tmp_path / "run"), *FAST]) == 130
    said = "interrupted: rerun the same command to resume (no checkpoint was written yet: it "
    assert said + "starts over)" in capsys.readouterr().err


def test_sigterm_stops_a_run_that_then_resumes(tmp_path, capsys):
    """A cluster's preemption sends SIGTERM, a closed terminal SIGHUP: the run ended at once,
    saying nothing. It now ends as Ctrl-C does, and the same command resumes."""
    flags = ["--output", str(tmp_path), *FAST, "--finetune-epochs", "40"]  # time to signal it
    argv = [sys.executable, "-m", "rt3d_halide.pruning.train", *flags]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    checkpoint = tmp_path / "checkpoint.pt"
    said = "stopped by SIGTERM: rerun the same command to resume"
    assert f"{said} (it goes on from {checkpoint})" in stderr
    assert not (tmp_path / "final.pt").exists()
    assert main(flags) == 0
    resumed = capsys.readouterr().err.splitlines()[0]
    epoch = r"\w+ epoch \d+ of \d+"
    where = rf"{epoch}, after step \d+|at the start of {epoch}|at the (start|end) of the \w+ phase"
    assert re.fullmatch(rf"resuming {re.escape(str(checkpoint))}: ({where})", resumed), resumed


def test_sigterm_to_the_process_group_stops_data_workers_quietly(tmp_path):
    """``timeout``, a cluster's preemption and a closed terminal signal the whole group: each
    DataLoader worker killed itself by the signal, and the run's stop message was followed by
    torch's 20-line "DataLoader worker ... is killed by signal" traceback."""
    long_epochs = ["--train-samples", "2000", "--dense-epochs", "3", "--checkpoint-every", "5"]
    flags = ["--output", str(tmp_path), *FAST, *long_epochs, "--workers", "2"]
    argv = [sys.executable, "-m", "rt3d_halide.pruning.train", *flags]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not (tmp_path / "checkpoint.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1)  # into the epoch, its workers loading
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "killed by signal" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM: rerun"), stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_a_rank_waiting_for_ranks_that_never_come(tmp_path, signum):
    """gloo waits for the other ranks in C++, where the run's Python handlers never ran: a
    WORLD_SIZE left in the environment kept the run waiting, deaf to SIGTERM and Ctrl-C, for
    gloo's 30 minutes, and it said nothing."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(port)
    flags = ["--output", str(tmp_path / "run"), *FAST, "--progress", "true"]
    argv = [sys.executable, "-m", "rt3d_halide.pruning.train", *flags]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    try:
        said = select.select([proc.stderr], [], [], 120)[0] and proc.stderr.readline()
        time.sleep(1)  # into gloo's wait
        proc.send_signal(signum)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.communicate()
    assert said == f"waiting for the 2 ranks at 127.0.0.1:{port}...\n"
    assert proc.returncode == -signum
    assert not (tmp_path / "run").exists()


# Another process that holds a run's lock on the file it is given, until killed.
LOCK_HOLDER = """
import fcntl, sys, time
held = open(sys.argv[1], "a+")
fcntl.lockf(held, fcntl.LOCK_EX)
held.write("pid 4242\\n")
held.flush()
print("held", flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def _lock_held_elsewhere(output: Path) -> Iterator[None]:
    """``output`` made, and its run lock held by another process (as pid 4242) meanwhile."""
    output.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(output / ".lock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        yield
    finally:
        holder.kill()
        holder.communicate()


def test_a_second_run_into_the_same_output_is_refused(tmp_path, capsys):
    """Two runs there at once wrote one checkpoint by turns, and each reported the other's
    files as its own."""
    with _lock_held_elsewhere(tmp_path / "run"):
        assert main(["--output", str(tmp_path / "run"), *FAST]) == 2
    said = capsys.readouterr().err
    assert "another run is writing there (pid 4242)" in said
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]
    assert main(["--output", str(tmp_path / "run"), *FAST]) == 0  # its lock is gone with it


def test_a_full_disk_is_an_error_line_and_keeps_the_last_outputs(tmp_path, capsys, monkeypatch):
    """torch.save reports a full disk as a failed check of its own (a traceback, exit 1),
    and final.pt was written in place: a rerun stopped there left it empty."""
    argv = ["--output", str(tmp_path / "run"), *FAST]
    assert main(argv) == 0
    final = (tmp_path / "run" / "final.pt").read_bytes()
    real_save = torch.save

    def disk_full(obj, path):
        if Path(path).name == "final.pt.partial":
            Path(path).write_bytes(b"cut short")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")
        return real_save(obj, path)

    monkeypatch.setattr(torch, "save", disk_full)
    assert main(argv) == 2  # a rerun of a finished run writes its outputs again
    assert "error: cannot write " in capsys.readouterr().err
    assert (tmp_path / "run" / "final.pt").read_bytes() == final
    assert not (tmp_path / "run" / "final.pt.partial").exists()


def test_a_full_disk_at_the_export_is_an_error_line_and_keeps_the_last_model(
    tmp_path, capsys, monkeypatch
):
    """The export's own write (onnx's file write) raised its OSError through main: a
    traceback, exit 1, where the checkpoint's and report's writes gave an error line."""
    argv = ["--output", str(tmp_path / "run"), *FAST]
    assert main(argv) == 0
    model = (tmp_path / "run" / "model.onnx").read_bytes()

    def disk_full(module, args, f, **kwargs):
        Path(f).write_bytes(b"cut short")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch.onnx, "export", disk_full)
    assert main(argv) == 2
    said = capsys.readouterr().err
    assert f"error: cannot write {tmp_path / 'run' / 'model.onnx'}: No space left on device" in said
    assert "Traceback" not in said
    assert (tmp_path / "run" / "model.onnx").read_bytes() == model
    assert not (tmp_path / "run" / "model.onnx.partial").exists()


def test_the_printed_build_command_quotes_its_path(tmp_path, capsys):
    assert main(["--output", str(tmp_path / "my run"), *FAST]) == 0
    onnx = shlex.quote(str(tmp_path / "my run" / "model.onnx"))
    assert f"build it: python3 -m rt3d_halide.build {onnx} --name tiny" in capsys.readouterr().out


def test_a_resume_of_other_processes_or_data_is_refused(tmp_path, capsys, monkeypatch):
    """The saved step counts the processes and clips of the run that wrote it, and the outputs
    its class folders: a resume with others skipped the wrong steps or relabelled classes."""
    _train_and_val_folders(tmp_path)
    argv = ["--output", str(tmp_path / "run"), *FOLDER_FAST, *_folder_flags(tmp_path)]
    _interrupted(parse_config(argv), monkeypatch, after=2)
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    assert state["run"] == {"world": 1, "clips": 2, "classes": ["Run", "Walk"]}
    for split in ("train", "val"):
        _frame_folders(tmp_path / split, ["Swim"])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "another run (training clips 2, not 3; class folders ['Run', 'Walk'], not" in err
    for split in ("train", "val"):
        shutil.rmtree(tmp_path / split / "Swim")
    torch.save({**state, "run": {**state["run"], "world": 2}}, path)
    assert main(argv) == 2
    assert "(processes (torchrun's --nproc-per-node) 2, not 1)" in capsys.readouterr().err
    torch.save({key: value for key, value in state.items() if key != "run"}, path)
    assert main(argv) == 0  # an earlier version's checkpoint holds no record


def _train_and_val_folders(root: Path) -> None:
    """``root``'s train/ and val/ folder datasets, of the classes Run and Walk."""
    for split in ("train", "val"):
        _frame_folders(root / split, ["Run", "Walk"])


def _folder_flags(root: Path) -> list[str]:
    return ["--data", str(root / "train"), "--val-data", str(root / "val")]


def test_frame_glob_picks_each_clips_frames_and_an_older_checkpoint_resumes(tmp_path, capsys):
    """mmaction2's rawframes beside their flow frames: refused as a mix of series, then read
    through --frame-glob. A checkpoint written before the flag existed ran with its default."""
    for split in ("train", "val"):
        _frame_folders(tmp_path / split, ["Run", "Walk"])
        for clip in (tmp_path / split).glob("*/v_01"):
            for t in range(2):
                np.save(clip / f"flow_{t}.npy", np.zeros((16, 16, 3), np.uint8))
    argv = ["--output", str(tmp_path / "run"), *FOLDER_FAST, *_folder_flags(tmp_path)]
    assert main(argv) == 2
    assert "frames of 2 series, # (2), flow_# (2)" in capsys.readouterr().err
    assert main([*argv, "--frame-glob", "flow_*"]) == 0
    assert main([*argv, "--frame-glob", "[0-9]*"]) == 2
    assert "different config: ['frame_glob']" in capsys.readouterr().err
    for flow in tmp_path.glob("*/*/v_01/flow_*"):
        flow.unlink()
    old = ["--output", str(tmp_path / "old"), *FOLDER_FAST, *_folder_flags(tmp_path)]
    assert main(old) == 0
    checkpoint = tmp_path / "old" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    del state["config"]["frame_glob"]
    torch.save(state, checkpoint)
    assert main(old) == 0


def test_a_clip_shape_of_zero_is_refused_before_any_frame_is_read(tmp_path, capsys):
    _train_and_val_folders(tmp_path)
    argv = ["--output", str(tmp_path / "run"), *FOLDER_FAST, *_folder_flags(tmp_path)]
    assert main([*argv, "--clip-shape", "8", "0", "16"]) == 2
    assert "clip_shape must be (T, H, W) positive, got [8, 0, 16]" in capsys.readouterr().err


def test_a_worker_error_is_its_own_line(tmp_path, capsys):
    """A DataLoader worker's error comes wrapped with the worker's traceback."""
    _train_and_val_folders(tmp_path)
    (tmp_path / "val" / "Walk" / "v_01" / "1.npy").write_bytes(b"")
    argv = ["--output", str(tmp_path / "run"), *FOLDER_FAST, *_folder_flags(tmp_path)]
    assert main([*argv, "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1.npy: cannot read the frame" in err, err


def test_a_video_beside_its_extracted_frames_is_skipped(tmp_path):
    """UCF101's habit: clip00.avi next to the clip00/ its frames were extracted into."""
    from rt3d_halide.pruning.data import VideoFolder

    _frame_folders(tmp_path, ["Run", "Walk"])
    (tmp_path / "Run" / "v_01.avi").write_bytes(b"video")
    assert len(VideoFolder(tmp_path, clip_len=2)) == 2
    (tmp_path / "Walk" / "v_02.avi").write_bytes(b"video")
    with pytest.raises(ValueError, match=r"v_02\.avi: video files are not decoded here"):
        VideoFolder(tmp_path, clip_len=2)


def test_a_clip_folder_named_like_a_video_is_a_clip(tmp_path):
    """Some extraction scripts name each clip's folder after its video (v_01.mp4/): it was
    refused as a video file."""
    from rt3d_halide.pruning.data import VideoFolder

    _frame_folders(tmp_path, ["Run", "Walk"])
    for clip in tmp_path.glob("*/v_01"):
        clip.rename(clip.with_name("v_01.mp4"))
    assert len(VideoFolder(tmp_path, clip_len=2)) == 2


def test_a_folder_it_may_not_read_is_named(tmp_path, monkeypatch):
    """An unreadable clip or class folder ended in a PermissionError traceback (exit 1)."""
    from pathlib import Path as PathType

    from rt3d_halide.pruning.data import VideoFolder

    _frame_folders(tmp_path, ["Run", "Walk"])
    locked = tmp_path / "Walk" / "v_01"
    listed = PathType.iterdir

    def iterdir(path):
        if path == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return listed(path)

    monkeypatch.setattr(PathType, "iterdir", iterdir)
    with pytest.raises(ValueError, match=r"Walk/v_01: Permission denied"):
        VideoFolder(tmp_path, clip_len=2)


def test_init_from_weights_holding_nan_is_bad_input(tmp_path, capsys):
    """It was run, and called a diverged run whose learning rate should be lowered."""
    state = train_module._build_model(_config(tmp_path / "a"), 8).state_dict()
    state["features.0.weight"][0, 0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    argv = ["--output", str(tmp_path / "run"), *FAST, "--init-from", str(tmp_path / "nan.pt")]
    assert main(argv) == 2
    assert "nan.pt: features.0.weight holds NaN or infinite values" in capsys.readouterr().err


def test_the_folder_scan_and_validation_show_progress(tmp_path, capsys):
    """Both ran in silence: minutes, on a real dataset or network storage."""
    _train_and_val_folders(tmp_path)
    argv = ["--output", str(tmp_path / "run"), *FOLDER_FAST, *_folder_flags(tmp_path)]
    assert main([*argv, "--progress", "true"]) == 0
    said = capsys.readouterr().err
    assert f"reading the clip folders of {tmp_path / 'train'} and {tmp_path / 'val'}..." in said
    assert "\rvalidation: " in said


def test_a_folder_run_whose_checkpoint_recorded_synthetic_settings_resumes(tmp_path):
    """Before they were refused, a folder run could record --num-classes: the rerun without it
    was a "different config", and with it a refusal, so the run could never go on."""
    _train_and_val_folders(tmp_path)
    argv = ["--output", str(tmp_path / "run"), *FOLDER_FAST, *_folder_flags(tmp_path)]
    assert main(argv) == 0
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    checkpoint["config"]["num_classes"] = 101
    torch.save(checkpoint, tmp_path / "run" / "checkpoint.pt")
    assert main(argv) == 0


def test_init_from_float8_weights_is_checked_without_a_traceback(tmp_path):
    """torch.isfinite has no float8_e4m3fn kernel: the NaN check itself raised."""
    model = train_module._build_model(_config(tmp_path / "a"), 8)
    state = {k: v.to(torch.float8_e4m3fn) for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "f8.pt")
    assert train_module._load_initial_weights(model, str(tmp_path / "f8.pt")) == ""


def test_synthetic_data_flags_are_refused_with_a_folder_dataset(tmp_path, capsys):
    """Taken silently, --num-classes 101 was recorded in a 2-class run's report, and the same
    command without it could not resume."""
    _train_and_val_folders(tmp_path)
    argv = ["--output", str(tmp_path / "run"), *FOLDER_FAST, *_folder_flags(tmp_path)]
    assert main([*argv, "--num-classes", "101", "--train-samples", "5000"]) == 2
    said = "num_classes, train_samples: for synthetic data; a folder dataset's classes"
    assert said in capsys.readouterr().err


def test_report_names_the_model_final_pt_builds_again(tmp_path):
    """C3D's classifier is sized for --clip-shape, which the CLI adds to --model-args: the
    report's model_args alone built a model final.pt did not fit."""
    from rt3d_halide.pruning.models import build_model

    argv = ["--output", str(tmp_path / "run"), *FAST, "--model", "c3d", "--dense-epochs", "0"]
    assert main([*argv, "--model-args", '{"width": 0.125}', "--clip-shape", "16", "32", "32"]) == 0
    record = json.loads((tmp_path / "run" / "report.json").read_text())["model"]
    assert record == {
        "name": "c3d",
        "num_classes": 4,
        "args": {"width": 0.125, "clip_shape": [16, 32, 32]},
    }
    model = build_model(record["name"], record["num_classes"], **record["args"])
    model.load_state_dict(torch.load(tmp_path / "run" / "final.pt", weights_only=True)["model"])


def test_a_resume_says_where_it_goes_on(tmp_path):
    config = _config(tmp_path, "--dense-epochs", "2", "--finetune-epochs", "3")
    point = train_module._resume_point
    assert point(config, (0, 1, 4, True)) == "dense epoch 2 of 2, after step 4"
    assert point(config, (0, 1, 0, True)) == "at the start of dense epoch 2 of 2"
    assert point(config, (2, 3, 0, True)) == "at the end of the finetune phase"
    assert point(config, (1, 0, 0, False)) == "at the start of the regularize phase"
    assert point(config, (3, 0, 0, False)) == "every phase is done; its files are written again"
