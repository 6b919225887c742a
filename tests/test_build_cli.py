"""The build's command line: help, defaults, progress, the layer cache, schedules and --jobs."""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import json
import marshal
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import halide as hl
import numpy as np
import onnx_factory as F
import pytest
from conftest import run_build_cli
from rt3d_halide.generators.schedules import choose_schedule
from rt3d_halide.generators.spec import Conv3dSpec

from rt3d_halide import compile as compile_module
from rt3d_halide.archive import _members
from rt3d_halide.build import _parser, build
from rt3d_halide.compile import cache_root
from rt3d_halide.errors import BuildError, stopped_by

DEFAULT_MODEL = "c3d_small_kgs"
DEFAULT_LAYERS = [
    f"{DEFAULT_MODEL}_{conv}"
    for conv in ("conv1", "conv2", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b")
]
PROGRESS = re.compile(
    r"^\s*\[(\d+)/(\d+)\] (\w+): (dense|sparse|per target), "
    r"(cached|compiled in [\d.]+ s) \((.+)\)$"
)


def _progress(stderr: str) -> dict[str, str]:
    """Layer -> 'cached' / 'compiled' from the progress lines."""
    found = {}
    for line in stderr.splitlines():
        m = PROGRESS.match(line)
        if m:
            found[m.group(3)] = m.group(5).split()[0]
    return found


def _changed_objects(before: Path, after: Path) -> set[str]:
    """The library members (one object per layer and target, and a wrapper) that differ
    between two builds of one model: a manifest can say a schedule changed where the code did
    not."""
    library = json.loads((before / "manifest.json").read_text())["library"]
    old, new = (dict(_members(out / library)[0]) for out in (before, after))
    assert old.keys() == new.keys()
    return {name for name in old if old[name] != new[name]}


def test_help_documents_every_flag_and_target_family(tmp_path: Path) -> None:
    proc = run_build_cli("--help", cwd=tmp_path, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps lines
    flags = [s for a in _parser()._actions for s in a.option_strings if s.startswith("--")]
    assert set(flags) >= {"--model", "--target", "--out", "--name", "--jobs", "--schedule"}
    assert {"--keep-assembly", "--quiet", "--help"} <= set(flags)
    for flag in flags:
        assert flag in text
    for family in [
        "arm-64-android",
        "arm-64-android-opencl",
        "arm-64-linux",
        "host",
        "host-opencl",
    ]:
        assert re.search(rf"(?<![\w-]){re.escape(family)}(?![\w-])", text), family
    assert "comma" in text and "build/<target>" in text
    assert not (tmp_path / "build").exists()


@pytest.fixture(scope="module")
def default_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """``python -m rt3d_halide.build`` with no flags at all, in an empty directory."""
    cwd = tmp_path_factory.mktemp("cwd")
    cache = tmp_path_factory.mktemp("cache")
    proc = run_build_cli(cwd=cwd, cache=cache)
    assert proc.returncode == 0, proc.stderr
    return cwd, cache, proc.stderr


def test_default_model_builds_into_build_host(default_build: tuple[Path, Path, str]) -> None:
    cwd, _, _ = default_build
    assert sorted(p.name for p in cwd.iterdir()) == ["build"]
    assert sorted(p.name for p in (cwd / "build").iterdir()) == ["host"]
    out = cwd / "build" / "host"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"] == DEFAULT_MODEL and manifest["target"] == "host"
    assert [f["name"] for f in manifest["functions"]] == DEFAULT_LAYERS
    for rel in [
        f"include/{DEFAULT_MODEL}.h",
        "include/HalideRuntime.h",
        "include/HalideBuffer.h",
        f"lib/lib{DEFAULT_MODEL}.a",
        "lib/libhalide_runtime.a",
        f"lib/cmake/{DEFAULT_MODEL}/{DEFAULT_MODEL}Config.cmake",
    ]:
        assert (out / rel).is_file(), rel
    assert not (out / "asm").exists()


def test_progress_line_per_layer_on_stderr(default_build: tuple[Path, Path, str]) -> None:
    cwd, _, stderr = default_build
    lines = [line for line in stderr.splitlines() if PROGRESS.match(line)]
    assert len(lines) == len(DEFAULT_LAYERS), stderr
    total = str(len(DEFAULT_LAYERS))
    total_layers = len(DEFAULT_LAYERS)
    assert sorted(int(PROGRESS.match(line).group(1)) for line in lines) == list(
        range(1, len(DEFAULT_LAYERS) + 1)
    )
    assert all(PROGRESS.match(line).group(2) == total for line in lines)
    assert _progress(stderr) == dict.fromkeys(DEFAULT_LAYERS, "compiled")
    assert f"{total} conv layers" in stderr
    # Each line says which kernel the layer got and why, as the manifest records it.
    manifest = json.loads((cwd / "build" / "host" / "manifest.json").read_text())
    said = {m.group(3): (m.group(4), m.group(6)) for m in map(PROGRESS.match, lines)}
    recorded = {f["name"]: (f["kernel"], f["kernel_reason"]) for f in manifest["functions"]}
    assert said == recorded
    assert {kernel for kernel, _ in said.values()} == {"dense", "sparse"}
    # A closing line says what pruning bought, as the manifest counts it.
    sparse = sum(f["kernel"] == "sparse" for f in manifest["functions"])
    executed, dense = manifest["executed_macs_per_sample"], manifest["total_macs_per_sample"]
    assert (
        f"{DEFAULT_MODEL}: {sparse} of {total_layers} conv layers sparse, {dense / executed:.2f}x "
        f"fewer conv MACs than dense code ({executed:,} of {dense:,} per clip)"
    ) in stderr.splitlines()


def test_the_closing_line_counts_each_target_of_a_list() -> None:
    """A GPU target and its CPU fallback may run different kernels: each gets its count."""
    from rt3d_halide.build import _summary
    from rt3d_halide.targets import parse_target

    target = parse_target("host-opencl, host")
    gpu, cpu = (t.to_string() for t in target.targets)
    manifest = {
        "model": "m",
        "functions": [
            {"target_kernels": {gpu: "dense", cpu: "sparse"}},
            {"target_kernels": {gpu: "dense", cpu: "dense"}},
        ],
        "total_macs_per_sample": 1000,
        "executed_macs_per_sample_by_target": {gpu: 1000, cpu: 400},
    }
    assert _summary(manifest, target) == (
        "m: 0 of 2 conv layers sparse on host-opencl, as many conv MACs as dense code "
        "(1,000 of 1,000 per clip); 1 of 2 sparse on host, 2.50x fewer conv MACs than dense "
        "code (400 of 1,000 per clip)"
    )


def test_rebuild_unchanged_is_cached_and_identical(default_build: tuple[Path, Path, str]) -> None:
    cwd, cache, _ = default_build
    out = cwd / "build" / "host"
    before = (out / "lib" / f"lib{DEFAULT_MODEL}.a").read_bytes()
    header = (out / "include" / f"{DEFAULT_MODEL}.h").read_text()
    proc = run_build_cli("--jobs", "1", cwd=cwd, cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert _progress(proc.stderr) == dict.fromkeys(DEFAULT_LAYERS, "cached")
    assert (out / "lib" / f"lib{DEFAULT_MODEL}.a").read_bytes() == before
    assert (out / "include" / f"{DEFAULT_MODEL}.h").read_text() == header
    # The old tree was replaced, not left next to the new one.
    assert sorted(p.name for p in (cwd / "build").iterdir()) == ["host"]


def _one_layer_build(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], out: str
) -> tuple[bytes, dict[str, str]]:
    """A one-conv model built into ``out``: the library's bytes and the progress per layer."""
    model = tmp_path / "m.onnx"
    if not model.exists():
        F.save(F.one_conv_model(F.conv_weight(4, 8), [1, 8, 4, 6, 6]), model)
    built = build(model, "host", tmp_path / out, jobs=1)
    return (built / "lib" / "libm.a").read_bytes(), _progress(capsys.readouterr().err)


def test_a_rebuild_says_which_files_it_removed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build replaces an earlier one whole: files the new one does not write go with it,
    and the build names them, --quiet or not (it silences progress, not news of your files)."""
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    _one_layer_build(tmp_path, capsys, "out")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "out" / "lib" / "extra.a").write_bytes(b"")
    (tmp_path / "out" / "mine" / "empty").mkdir(parents=True)
    (tmp_path / "out" / "linked").symlink_to(tmp_path / "out" / "lib", target_is_directory=True)
    build(tmp_path / "m.onnx", "host", tmp_path / "out", jobs=1, quiet=True)
    out = tmp_path / "out"
    said = f"m: removed with the earlier build in {out}/: lib/extra.a, linked, mine/, notes.txt\n"
    assert capsys.readouterr().err == said
    assert not (out / "notes.txt").exists() and not (out / "lib" / "extra.a").exists()
    assert (out / "lib").is_dir() and not (out / "mine").exists()
    build(tmp_path / "m.onnx", "host", out, jobs=1)
    assert "removed with" not in capsys.readouterr().err  # nothing was dropped this time


def _member_ends(data: bytes) -> list[int]:
    """Where each member of an archive ends, its padding byte included."""
    ends, pos = [], 8
    while pos < len(data):
        size = int(data[pos + 48 : pos + 58])
        pos += 60 + size + (size & 1)
        ends.append(pos)
    return ends


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) * 2 // 3],
        lambda data: data[: _member_ends(data)[0]],  # the symbol index alone
        lambda data: b"!<arcX>\n" + data[8:],
        lambda data: data[: 8 + 58] + b"XX" + data[8 + 60 :],  # the index header's fmag
    ],
    ids=["two-thirds", "index-only", "magic", "fmag"],
)
def test_a_truncated_cache_entry_is_compiled_again(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    damage: Callable[[bytes], bytes],
) -> None:
    """An entry cut short (a crash, a full disk) or with a damaged magic or member header is
    not served: it would link truncated. A cut at a member boundary leaves every header whole,
    and was served: the merge then failed every build with KeyError."""
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    first, _ = _one_layer_build(tmp_path, capsys, "a")
    (entry,) = (tmp_path / "cache" / "layers").glob("*/m_bad_conv.a")
    entry.write_bytes(damage(entry.read_bytes()))
    again, progress = _one_layer_build(tmp_path, capsys, "b")
    assert progress == {"m_bad_conv": "compiled"} and again == first


def test_a_multi_target_entry_cut_after_any_member_is_compiled_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry with an object per target, cut after some of them: its symbol index still
    names the lost ones (the check read only the first offset the index lists)."""
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    model = F.save(F.one_conv_model(F.conv_weight(4, 8), [1, 8, 4, 6, 6]), tmp_path / "m.onnx")
    target = "x86-64-linux-avx2-avx-f16c-fma-sse41,x86-64-linux-sse41"
    first = (build(model, target, tmp_path / "a", jobs=1) / "lib" / "libm.a").read_bytes()
    capsys.readouterr()
    (entry,) = (tmp_path / "cache" / "layers").glob("*/m_bad_conv.a")
    data = entry.read_bytes()
    cuts = _member_ends(data)[:-1]
    assert len(cuts) >= 4  # the index, the names, a wrapper and an object per target
    for cut in cuts:
        entry.write_bytes(data[:cut])
        again = build(model, target, tmp_path / "b", jobs=1)
        assert _progress(capsys.readouterr().err) == {"m_bad_conv": "compiled"}, cut
        assert (again / "lib" / "libm.a").read_bytes() == first


@pytest.mark.parametrize("size", [b"-60", b"-61", b"+1", b"x"])
def test_a_member_size_that_is_not_digits_is_damage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, size: bytes
) -> None:
    """A size of -60 never moved the reading past its member's header: a damaged cache entry
    hung every build of that layer."""
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    first, _ = _one_layer_build(tmp_path, capsys, "a")
    (entry,) = (tmp_path / "cache" / "layers").glob("*/m_bad_conv.a")
    data = bytearray(entry.read_bytes())
    data[8 + 48 : 8 + 58] = size.ljust(10)  # the first member's size field
    entry.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt member header at byte 8"):
        _members(entry)
    again, progress = _one_layer_build(tmp_path, capsys, "b")
    assert progress == {"m_bad_conv": "compiled"} and again == first


@pytest.mark.parametrize("lost", ["library", "assembly"])
def test_a_cache_entry_missing_a_file_is_compiled_again(
    lost: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry without its library kept every later build from writing it (the rename onto
    it failed); one without its assembly was served, and --keep-assembly shipped no asm/."""
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    model = F.save(F.one_conv_model(F.conv_weight(4, 8), [1, 8, 4, 6, 6]), tmp_path / "m.onnx")
    first = build(model, "host", tmp_path / "a", jobs=1, quiet=True, keep_assembly=True)
    (entry,) = (tmp_path / "cache" / "layers").glob("*/m_bad_conv.a")
    for path in entry.parent.glob("*.a" if lost == "library" else "*.s"):
        path.unlink()
    again = build(model, "host", tmp_path / "b", jobs=1, keep_assembly=True)
    assert _progress(capsys.readouterr().err) == {"m_bad_conv": "compiled"}
    assert (again / "lib" / "libm.a").read_bytes() == (first / "lib" / "libm.a").read_bytes()
    assert [p.name for p in (again / "asm").iterdir()] == ["m_bad_conv.s"]


def test_directories_killed_builds_left_go_once_stale(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build killed outright (SIGKILL) leaves its compile directories in the cache and its
    staging directory beside --out; a later build removes those no build can still be using:
    older than any compile takes, and for staging, of a process that is gone."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(cache))
    _one_layer_build(tmp_path, capsys, "out")
    gone = 2**22 + 1  # above Linux's pid_max default: no such process
    stale = {
        cache / "layers" / ".tmp-killed": True,
        cache / "layers" / ".tmp-recent": False,
        cache / "runtime" / ".tmp-killed": True,  # swept with the runtime cached too
        tmp_path / f".rt3d_halide-tmp-{gone}-0a1b2c3d": True,
        tmp_path / f".rt3d_halide-tmp-{gone}-recent00": False,
        tmp_path / f".rt3d_halide-tmp-{os.getpid()}-running0": False,
    }
    old = time.time() - compile_module.STALE_SECONDS - 60
    for path in stale:
        (path / "out").mkdir(parents=True)
        if "recent" not in path.name:
            os.utime(path, (old, old))
    _one_layer_build(tmp_path, capsys, "out")
    assert {path: path.exists() for path in stale} == {p: not s for p, s in stale.items()}


# Makes every generator the build starts sleep first (the build process itself runs on): a
# compile that outlasts the test unless the build ends it.
SLOW_GENERATORS = """
import sys, time
if sys.argv[0] == "-c" and any(arg.endswith("generators") for arg in sys.argv):
    time.sleep(120)
"""


def test_sigterm_ends_the_build_its_generators_and_what_it_made(tmp_path: Path) -> None:
    """CI's cancel sends SIGTERM to the build alone: it ended at once, leaving its generators
    running (up to the compile timeout) and its directories in the cache."""
    model = F.save(F.one_conv_model(F.conv_weight(4, 8), [1, 8, 4, 6, 6]), tmp_path / "m.onnx")
    cache, out, hook = tmp_path / "cache", tmp_path / "out", tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_GENERATORS)
    path = os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = subprocess.Popen(
        [sys.executable, "-m", "rt3d_halide.build", str(model), "--out", str(out)],
        env={**os.environ, "RT3D_HALIDE_CACHE": str(cache), "PYTHONPATH": path},
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not (generators := _children(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert generators, "no generator started"
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert time.monotonic() - signalled < 60, "the build waited for its sleeping generator"
    assert (proc.returncode, stderr.splitlines()[-1]) == (143, "stopped by SIGTERM")
    assert [pid for pid in generators if Path(f"/proc/{pid}").exists()] == []
    assert list((cache / "layers").glob(".tmp-*")) == []
    assert not out.exists()


def test_a_signal_ignored_on_purpose_stays_ignored() -> None:
    """nohup ignores SIGHUP for its command: a build or training run under it went on when the
    terminal closed, and must still."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with stopped_by(signal.SIGTERM, signal.SIGHUP):
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_failed_layer_lets_the_running_compiles_finish_and_a_stop_ends_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer's failure ended its siblings' compiles too (their work lost to the cache), and a
    stop while the build then waited for them did not end them (up to the compile timeout)."""
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    generator = (
        "import pathlib, sys, time\n"
        "name = sys.argv[sys.argv.index('-f') + 1]\n"
        # 'bad' fails once its sibling runs (started after it, it had not now and then).
        "time.sleep(0.5) if name == 'bad' else None\n"
        "sys.exit('bad layer') if name == 'bad' else time.sleep(len(name) - 4)\n"
        f"pathlib.Path({str(tmp_path)!r}, name).write_text('done')\n"
    )
    command = [sys.executable, "-c", generator]
    monkeypatch.setattr(compile_module, "_generator_command", lambda: command)

    said: list[tuple[float, str]] = []

    def compile_all(*names: str) -> None:
        jobs = [
            compile_module.LayerJob("g", name, "{}", {"weight": np.zeros(1, np.float32)}, "host")
            for name in names
        ]
        compile_module.compile_layers(
            jobs, parallel=2, say=lambda line: said.append((time.monotonic(), line))
        )

    # 'sleep...' runs 4 s beside 'bad'; 'next' waits for a free worker, which comes after the
    # failure: it must not start. The build says at once why it waits (it was silent).
    started = time.monotonic()
    with pytest.raises(BuildError, match="bad layer"):
        compile_all("bad", "sleep...", "next")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["sleep..."]
    ((when, line),) = said
    assert line == (
        "  a layer failed: waiting for the 1 compile running beside it, for the cache "
        "(Ctrl-C ends them); its error follows"
    )
    assert when - started < 3.5, "said only once the running compile had ended"

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, 2.0)  # Ctrl-C while the build waits for 'sleeps...'
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            compile_all("bad", "sleeps" + "." * 60)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 30, "the stop waited for the running compile"


def test_an_interrupt_while_waiting_on_a_generator_ends_it() -> None:
    """Ctrl-C reaching the thread that waits on a generator (the runtime's compile waits in the
    build's main thread): the process's context manager then waits a quarter second at most, and
    the generator ran on, orphaned, to its end."""
    started: list[subprocess.Popen[str]] = []

    class Recorded(compile_module.Compiles):
        def start(self, cmd: list[str]) -> subprocess.Popen[str]:
            started.append(super().start(cmd))
            return started[-1]

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            compile_module._run(["sleep", "60"], "a compile", Recorded())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    (proc,) = started
    try:
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        proc.kill()  # what a failing run left


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            found += [int(child) for child in task.read_text().split()]
    return found


@pytest.mark.parametrize(
    "name", ["HL_LLVM_ARGS", "HL_PERMIT_FAILED_UNROLL", "HL_RUNTIME_DROP_FUNCS"]
)
def test_each_code_generation_setting_changes_the_cache_key(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HL_PERMIT_FAILED_UNROLL compiles a loop where the unroll failed and HL_RUNTIME_DROP_FUNCS
    leaves functions out of the runtime: neither was in the key. The names are listed here, not
    read from CODEGEN_ENVIRONMENT, so one dropped from it is noticed."""
    monkeypatch.delenv(name, raising=False)
    before = compile_module._generator_fingerprint()
    monkeypatch.setenv(name, "1")
    assert compile_module._generator_fingerprint() != before


def test_a_halide_from_elsewhere_is_keyed_by_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key named Halide by pip's version string, whatever halide the generators imported:
    a source build of Halide 21 on the import path shared pip's entries. pip's is keyed by the
    digests in its RECORD, which name libHalide's."""
    assert "libHalide.so,sha256=" in compile_module.halide_identity()
    pip_identity = compile_module.halide_identity()
    pip_key = compile_module._generator_fingerprint()
    other = tmp_path / "halide"
    other.mkdir()
    (other / "__init__.py").write_text("")
    (other / "libHalide.so").write_bytes(b"a build")
    spec = importlib.machinery.ModuleSpec("halide", None, origin=str(other / "__init__.py"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    identity = compile_module.halide_identity()
    assert compile_module._generator_fingerprint() != pip_key
    # Bytecode the generators' subprocess writes there is no other Halide (a build refused
    # itself as changed meanwhile).
    (other / "__pycache__").mkdir()
    (other / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"bytecode")
    assert compile_module.halide_identity() == identity
    (other / "libHalide.so").write_bytes(b"another build")
    assert len({pip_identity, identity, compile_module.halide_identity()}) == 3
    assert "libHalide.so" in identity


def test_a_change_during_the_build_is_not_cached_under_the_old_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key's fingerprint is taken when the build starts, and each compile reads the sources
    when it runs: an edit or a git pull during a long build stored the new code under the old
    key, served again once the edit was undone."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(cache))
    monkeypatch.delenv("HL_PERMIT_FAILED_UNROLL", raising=False)
    run = compile_module._run

    def run_then_change(*args: object, **kwargs: object) -> None:
        run(*args, **kwargs)  # type: ignore[arg-type]
        monkeypatch.setenv("HL_PERMIT_FAILED_UNROLL", "1")

    monkeypatch.setattr(compile_module, "_run", run_then_change)
    with pytest.raises(BuildError, match="changed while the build ran"):
        _one_layer_build(tmp_path, capsys, "a")
    assert [entry for entry in cache.glob("*/*") if not entry.name.startswith(".tmp-")] == []
    monkeypatch.setattr(compile_module, "_run", run)
    monkeypatch.delenv("HL_PERMIT_FAILED_UNROLL")
    _, progress = _one_layer_build(tmp_path, capsys, "a")
    assert progress == {"m_bad_conv": "compiled"}


def test_an_editors_lock_link_among_the_generators_is_no_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Emacs links a dangling ``.#NAME.py`` beside a file being edited: hashed, it ended the
    build (or its recheck after a compile) with a FileNotFoundError traceback."""
    (tmp_path / "conv.py").write_text("")
    (tmp_path / ".#conv.py").symlink_to(tmp_path / "user@host.1234")
    monkeypatch.setattr(compile_module, "GENERATOR_DIR", tmp_path)
    assert compile_module.hashed_sources()[0] == tmp_path / "conv.py"
    fingerprint = compile_module._generator_fingerprint()

    def vanished() -> str:
        raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "conv.py"))

    monkeypatch.setattr(compile_module, "_generator_fingerprint", vanished)
    with pytest.raises(BuildError, match="changed while the build ran"):
        compile_module._check_unchanged(fingerprint)


def _package_copy(root: Path) -> list[Path]:
    """A copy of the modules the generators' subprocess imports, laid out as installed (the
    checkout maps generators/ and pruning/ into the package): the copy's sources, as
    :func:`~rt3d_halide.compile.hashed_sources` lists this package's."""
    package = Path(compile_module.__file__).resolve().parent
    copied = []
    for source in compile_module.hashed_sources():
        if source.parent == compile_module.GENERATOR_DIR:
            place = root / "rt3d_halide" / "generators" / source.name
        elif source.parent.name == "pruning":
            place = root / "rt3d_halide" / "pruning" / source.name
        else:
            place = root / "rt3d_halide" / source.relative_to(package)
        place.parent.mkdir(parents=True, exist_ok=True)
        place.write_bytes(source.read_bytes())
        copied.append(place)
    return copied


@pytest.mark.parametrize("write_bytecode", [True, False])
def test_the_generators_run_the_sources_the_key_hashes_not_older_bytecode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_bytecode: bool
) -> None:
    """Python runs a module's .pyc when the source's size and modification time (whole seconds)
    match the ones it recorded, whether or not it may write bytecode: a same-size edit within a
    second, or sources copied with their times kept, ran the earlier code under the new key.
    Every module the subprocess imports from this package is one the key hashes."""
    if write_bytecode:
        monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    else:
        monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    sources = _package_copy(tmp_path)
    main = tmp_path / "rt3d_halide" / "generators" / "__main__.py"
    text = main.read_bytes()
    earlier = b"print('earlier code')"
    earlier += b" " * (len(text) - len(earlier))
    code = compile(earlier, str(main), "exec")
    stat = main.stat()
    header = (int(stat.st_mtime) & 0xFFFFFFFF, stat.st_size & 0xFFFFFFFF)
    pyc = Path(importlib.util.cache_from_source(str(main)))
    pyc.parent.mkdir(exist_ok=True)
    pyc.write_bytes(
        importlib.util.MAGIC_NUMBER
        + b"\0\0\0\0"
        + b"".join(value.to_bytes(4, "little") for value in header)
        + marshal.dumps(code)
    )
    listing = (
        "import atexit, json, sys\n"
        "atexit.register(lambda: print(json.dumps(sorted(\n"
        "    m.__file__ for n, m in list(sys.modules.items())\n"
        "    if n.split('.')[0] == 'rt3d_halide' and getattr(m, '__file__', None)))))\n"
    )
    command = [
        sys.executable,
        "-P",
        "-c",
        listing + compile_module.GENERATOR_LAUNCH,
        json.dumps([str(tmp_path)]),
        str(main.parent),
        "--help",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    usage, imported = done.stdout.rstrip().rsplit("\n", 1)
    assert "earlier code" not in done.stdout
    assert usage.startswith("usage: python3 -m rt3d_halide.generators")
    assert {Path(name).resolve() for name in json.loads(imported)} <= set(sources)


def test_llvm_arguments_are_part_of_the_cache_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """HL_LLVM_ARGS changes the generated code: a layer compiled with it is not served to a
    build without it."""
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    _one_layer_build(tmp_path, capsys, "a")
    monkeypatch.setenv("HL_LLVM_ARGS", "-align-all-functions=8")
    _, progress = _one_layer_build(tmp_path, capsys, "b")
    assert progress == {"m_bad_conv": "compiled"}


def test_the_generators_come_from_this_package_not_the_working_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build run inside another checkout compiles this package's generators (a generator
    subprocess started with ``-m`` put the working directory first on its path)."""
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "checkout" / "rt3d_halide" / "generators"
    other.mkdir(parents=True)
    (other.parent / "__init__.py").write_text("")
    (other / "__init__.py").write_text("")
    (other / "__main__.py").write_text("raise SystemExit('the checkout in the working directory')")
    monkeypatch.chdir(tmp_path / "checkout")
    _, progress = _one_layer_build(tmp_path, capsys, "a")
    assert progress == {"m_bad_conv": "compiled"}


def test_a_path_object_on_the_import_path_does_not_stop_a_compile(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """sys.path may hold entries that are not strings (imports skip them): the generators'
    subprocess is handed the others."""
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "path", [*sys.path, tmp_path / "not-a-string"])
    _, progress = _one_layer_build(tmp_path, capsys, "a")
    assert progress == {"m_bad_conv": "compiled"}


def test_generators_from_elsewhere_than_the_keyed_ones_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache key hashes this process's generator sources: a subprocess that imported
    generators from another place must fail, not cache their code under that key."""
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(compile_module, "GENERATOR_DIR", tmp_path / "elsewhere")
    with pytest.raises(BuildError, match=r"generators imported from .*, not .*elsewhere"):
        _one_layer_build(tmp_path, capsys, "a")
    assert not list((tmp_path / "cache" / "layers").glob("*/*.a"))


def test_quiet_silences_progress(default_build: tuple[Path, Path, str]) -> None:
    cwd, cache, _ = default_build
    proc = run_build_cli("--quiet", "--jobs", "1", cwd=cwd, cache=cache)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout == ""
    assert (cwd / "build" / "host" / "manifest.json").is_file()


def test_the_same_overrides_spelled_otherwise_are_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The cache keyed the overrides' text: other spacing, key order, or '{}' for none
    compiled every layer again."""
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    model = F.save(F.two_conv_model(), tmp_path / "two.onnx")
    spelled = [
        ('{"reduction_unroll": 1, "parallel": true}', ""),
        ('{ "parallel" : true ,"reduction_unroll":1 }', "{}"),
    ]
    for i, (schedule, sparse_schedule) in enumerate(spelled):
        build(model, "host", tmp_path / f"b{i}", jobs=1, schedule=schedule,
              sparse_schedule=sparse_schedule)  # fmt: skip
    said = capsys.readouterr().err.split("two: 2 conv layers")
    assert _progress(said[1]) == dict.fromkeys(["two_conv_a", "two_conv_b"], "compiled")
    assert _progress(said[2]) == dict.fromkeys(["two_conv_a", "two_conv_b"], "cached")


def test_changing_weights_recompiles_only_that_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    model = F.save(F.two_conv_model(), tmp_path / "two.onnx")
    out = build(model, "host", tmp_path / "b", jobs=1)
    first = capsys.readouterr().err
    assert _progress(first) == {"two_conv_a": "compiled", "two_conv_b": "compiled"}
    lib_before = (out / "lib" / "libtwo.a").read_bytes()

    changed = F.conv_weight(4, 8, (1, 3, 3), seed=99)
    F.save(F.two_conv_model(weights={"conv_b.weight": changed}), model)
    build(model, "host", out, jobs=1)
    second = capsys.readouterr().err
    assert _progress(second) == {"two_conv_a": "cached", "two_conv_b": "compiled"}

    members_before = dict(_members_of(lib_before, tmp_path / "before.a"))
    members_after = dict(_members(out / "lib" / "libtwo.a")[0])
    assert members_after.keys() == members_before.keys()
    changed_members = {n for n in members_after if members_after[n] != members_before[n]}
    assert changed_members and all(n.startswith("two_conv_b") for n in changed_members)


def _members_of(data: bytes, path: Path) -> list[tuple[str, bytes]]:
    path.write_bytes(data)
    return _members(path)[0]


def test_the_manifest_records_padding_that_differs_at_the_ends(tmp_path: Path) -> None:
    """Every other test model pads both ends alike: pads_end written from pads_begin passed."""
    weight = F.conv_weight(4, 8)
    model = F.one_conv_model(weight, [1, 8, 4, 6, 6], {"pads": [0, 0, 0, 1, 1, 1]})
    out = build(F.save(model, tmp_path / "m.onnx"), "host", tmp_path / "out", jobs=1, quiet=True)
    spec = json.loads((out / "manifest.json").read_text())["functions"][0]["spec"]
    assert (spec["pads_begin"], spec["pads_end"]) == ([0, 0, 0], [1, 1, 1])


def _spec_of(manifest: dict, index: int) -> Conv3dSpec:
    fn = manifest["functions"][index]
    s = fn["spec"]
    return Conv3dSpec(
        name=fn["name"],
        in_channels=s["in_channels"],
        out_channels=s["out_channels"],
        in_size=tuple(s["in_size"]),
        kernel=tuple(s["kernel"]),
        stride=tuple(s["stride"]),
        dilation=tuple(s["dilation"]),
        pads_begin=tuple(s["pads_begin"]),
        pads_end=tuple(s["pads_end"]),
        has_bias=s["bias"],
        relu=fn["fused_relu"],
    )


def test_schedule_override_changes_manifest_and_still_computes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rt3d_halide

    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    # 16 output channels, 10 wide: every family's default tile differs from a 4-wide one.
    weight = F.conv_weight(16, 8, (1, 3, 3))  # 8 input channels: dense code (build's rule)
    model = F.save(
        F.one_conv_model(weight, [1, 8, 2, 4, 10], {"pads": [0, 1, 1, 0, 1, 1]}),
        tmp_path / "s.onnx",
    )
    override = '{"register_tiles": [[1, 4]]}'
    out = build(model, "host", tmp_path / "b", jobs=1, quiet=True, schedule=override)
    manifest = json.loads((out / "manifest.json").read_text())
    (target,) = manifest["halide_targets"]
    described = manifest["functions"][0]["schedules"][target]
    default = choose_schedule(hl.Target(target), _spec_of(manifest, 0)).describe()
    assert described["x_tile"] == 4
    assert described != default
    plain = build(model, "host", tmp_path / "plain", jobs=1, quiet=True)
    (changed,) = _changed_objects(plain, out)
    assert "bad_conv" in changed

    x = np.random.default_rng(1).standard_normal((2, 2, 4, 10, 8)).astype(np.float32)
    poisoned = np.full((*x.shape[:4], weight.shape[0]), np.nan, np.float32)
    got = rt3d_halide.load(out)["bad_conv"](x, out=poisoned)
    # Reference: the same conv in float64 numpy (zero pad H and W by 1).
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
    ref = np.zeros(got.shape)
    for dh in range(3):
        for dw in range(3):
            patch = xp[:, :, dh : dh + 4, dw : dw + 10, :]
            ref += np.einsum("nthwc,mc->nthwm", patch, weight[:, :, 0, dh, dw].astype(np.float64))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("option", "text", "pattern"),
    [
        ("schedule", '{"bogus_knob": 3}', r"unknown schedule knobs \['bogus_knob'\]"),
        ("schedule", "{not json", r"--schedule .* is not valid JSON"),
        ("schedule", '{"register_tiles": "x"}', r"--schedule .*layer 'conv_a'"),
        ("schedule", '{"vector_lanes": 0}', r"--schedule .*'conv_a'.*vector_lanes must be a posit"),
        ("sparse_schedule", '{"bogus_knob": 3}', r"unknown schedule knobs \['bogus_knob'\]"),
        ("sparse_schedule", "[1", r"--sparse-schedule .* is not valid JSON"),
        ("sparse_schedule", '{"x_vectors": -1}', r"--sparse-schedule .*x_vectors must be an int"),
        ("sparse_schedule", '{"input_layout": "diagonal"}', r"input_layout must be one of"),
        (
            "sparse_schedule",
            '{"input_layout": "interleaved"}',
            r"--sparse-schedule .*'conv_a'.*interleaved input needs a 1x1 spatial kernel",
        ),
        ("schedule", '{"opencl": {"threads_x": 4}}', r"no target of this build is opencl"),
        ("schedule", '{"opencl": {}, "lanes": 4}', r"mix family keys \['opencl'\] with knobs"),
        ("sparse_schedule", '{"arm64-neon": 3}', r"arm64-neon schedule overrides must be a JSON"),
    ],
)
def test_bad_schedule_is_a_clear_build_error(
    option: str, text: str, pattern: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    model = F.save(F.two_conv_model(), tmp_path / "two.onnx")
    kernel = "sparse" if option == "sparse_schedule" else "auto"
    with pytest.raises(BuildError, match=pattern) as info:
        build(model, "host", tmp_path / "b", jobs=1, quiet=True, kernel=kernel, **{option: text})
    assert "Traceback" not in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "b").exists()
    # Refused before any generator ran.
    assert not (tmp_path / "cache" / "layers").exists()


def test_sparse_schedule_override_reaches_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    model = F.save(F.two_conv_model(), tmp_path / "two.onnx")
    override = '{"x_vectors": 1, "lanes": 2, "chunk_bytes": 64, "input_layout": "planar"}'
    out = build(
        model, "host", tmp_path / "b", jobs=1, quiet=True, kernel="sparse",
        sparse_schedule=override,
    )  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    (described,) = manifest["functions"][0]["schedules"].values()
    assert described["lanes"] == 2 and described["x_tile"] in (8, 16)  # one vector
    assert described["chunk_channels"] >= 1
    plain = build(model, "host", tmp_path / "plain", jobs=1, quiet=True, kernel="sparse")
    changed = _changed_objects(plain, out)
    assert any("conv_a" in name for name in changed), changed


def test_per_family_overrides_reach_each_target_of_a_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's phone library (OpenCL first, the ARM CPU as fallback): CPU and OpenCL knobs
    differ, so each family takes its own object, and the manifest shows both applied."""
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    weight = F.conv_weight(16, 8, (1, 3, 3))  # 8 input channels: dense code on both
    model = F.save(
        F.one_conv_model(weight, [1, 8, 2, 4, 10], {"pads": [0, 1, 1, 0, 1, 1]}),
        tmp_path / "s.onnx",
    )
    overrides = '{"arm64-neon": {"register_tiles": [[1, 4]]}, "opencl": {"threads_x": 4}}'
    target = "arm-64-android-opencl,arm-64-android"
    out = build(model, target, tmp_path / "b", jobs=1, quiet=True, schedule=overrides)
    manifest = json.loads((out / "manifest.json").read_text())
    schedules = manifest["functions"][0]["schedules"]
    gpu, cpu = (schedules[t] for t in manifest["halide_targets"])
    assert gpu["family"] == "opencl" and gpu["work_group"]["x_threads"] == 4
    assert cpu["family"] == "arm64-neon" and cpu["x_tile"] == 4
    # Each family's object takes its own override and no other.
    plain = build(model, target, tmp_path / "plain", jobs=1, quiet=True)
    gpu_only = '{"opencl": {"threads_x": 4}}'
    opencl = build(model, target, tmp_path / "opencl", jobs=1, quiet=True, schedule=gpu_only)
    gpu_object, cpu_object = sorted(_changed_objects(plain, out), key=lambda n: "opencl" not in n)
    assert gpu_object.endswith("-opencl.o") and not cpu_object.endswith("-opencl.o")
    assert _changed_objects(plain, opencl) == {gpu_object}


def test_default_out_uses_the_target_as_parsed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spaces around a target (a shell variable, a copied line) do not reach the path."""
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    model = F.save(F.one_conv_model(F.conv_weight(4, 8), [1, 8, 4, 4, 4]), tmp_path / "m.onnx")
    out = build(model, " host ", jobs=1, quiet=True)
    assert out == Path("build") / "host"
    assert json.loads((out / "manifest.json").read_text())["target"] == "host"


@pytest.mark.parametrize("xdg", ["", "relative/cache"])
def test_cache_ignores_an_empty_or_relative_xdg_cache_home(
    xdg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the XDG spec says; an empty value had put the cache in the working directory."""
    monkeypatch.delenv("RT3D_HALIDE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    assert cache_root() == Path.home() / ".cache" / "rt3d_halide"
    monkeypatch.setenv("XDG_CACHE_HOME", "/var/cache/me")
    assert cache_root() == Path("/var/cache/me/rt3d_halide")


def test_cli_unknown_schedule_knob(tmp_path: Path) -> None:
    model = F.save(F.two_conv_model(), tmp_path / "two.onnx")
    proc = run_build_cli(
        "--model", str(model), "--schedule", '{"bogus_knob": 1}', cwd=tmp_path, cache=tmp_path
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "bogus_knob" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "build").exists()


def test_model_as_the_first_argument(tmp_path: Path) -> None:
    """``python -m rt3d_halide.build model.onnx`` builds it, as ``--model`` does; both at once is
    a usage error."""
    model = F.save(F.two_conv_model(), tmp_path / "two.onnx")
    proc = run_build_cli(str(model), "--quiet", cwd=tmp_path, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "build" / "host" / "manifest.json").read_text())
    assert manifest["model"] == "two"
    proc = run_build_cli(str(model), "--model", str(model), cwd=tmp_path, cache=tmp_path)
    assert proc.returncode == 2 and "give the model once" in proc.stderr
    proc = run_build_cli(str(model), "--name", " ", cwd=tmp_path, cache=tmp_path)
    assert proc.returncode == 2 and "--name: empty" in proc.stderr


def test_a_name_that_is_no_c_identifier_is_said_as_changed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--name`` names C symbols and files: a name that is not a C identifier is changed into
    one, and the build says so, --quiet or not, since the header and functions carry the
    changed name."""
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    model = F.save(F.one_conv_model(F.conv_weight(4, 8), [1, 8, 4, 6, 6]), tmp_path / "m.onnx")
    out = build(model, "host", tmp_path / "out", name="3d net", jobs=1, quiet=True)
    assert "model name '3d net' is 'l3d_net' in C" in capsys.readouterr().err
    assert (out / "include" / "l3d_net.h").is_file()
    build(model, "host", tmp_path / "out2", name="net", jobs=1)
    assert "model name" not in capsys.readouterr().err
    # The file's stem names the model by default: changed, it is said too.
    build(model.rename(tmp_path / "ü.onnx"), "host", tmp_path / "out4", jobs=1, quiet=True)
    assert "model name 'ü' is 'layer' in C" in capsys.readouterr().err
    with pytest.raises(BuildError, match="--name: empty"):
        build(model, "host", tmp_path / "out3", name="", jobs=1)


def test_a_function_renamed_for_a_clash_is_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layers ``a.b`` and ``a_b`` both become ``<model>_a_b`` in C: the second takes a trailing
    ``_``, which an app calling the function by the README's rule did not hear of."""
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    model = F.two_conv_model()
    renames = {"conv_a.weight": "a.b.weight", "conv_b.weight": "a_b.weight"}
    for tensor in model.graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
    build(F.save(model, tmp_path / "m.onnx"), "host", tmp_path / "out", jobs=1, quiet=True)
    said = capsys.readouterr().err
    assert "note: node 'conv_b' is function 'm_a_b_', not 'm_a_b': that name, or a" in said
    assert said.count("note:") == 1


def test_jobs_2_gives_the_same_library_as_jobs_1(tmp_path: Path, monkeypatch) -> None:
    model = F.save(F.two_conv_model(mid=5, cout=6), tmp_path / "two.onnx")
    libraries = {}
    for jobs in (1, 2):
        # Separate caches, so that the second build really compiles.
        monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / f"cache{jobs}"))
        out = build(model, "host", tmp_path / f"b{jobs}", jobs=jobs, quiet=True)
        libraries[jobs] = out / "lib" / "libtwo.a"
    members = {jobs: _members(path) for jobs, path in libraries.items()}
    assert [n for n, _ in members[1][0]] == [n for n, _ in members[2][0]]
    assert members[1][1] == members[2][1]
    assert libraries[1].read_bytes() == libraries[2].read_bytes()


def test_a_strict_float_target_builds_and_runs(tmp_path: Path, monkeypatch) -> None:
    """strict_float is the layers' arithmetic; Halide's runtime refuses to be built with it, so
    the build leaves it out of the runtime (the whole build failed there)."""
    import torch

    import rt3d_halide

    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    weight = F.conv_weight(4, 8)
    model = F.save(F.one_conv_model(weight, [1, 8, 4, 6, 6]), tmp_path / "m.onnx")
    out = build(model, "host-strict_float", tmp_path / "out", jobs=1, quiet=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert "strict_float" not in manifest["runtime_target"]
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 6, 8)).astype(np.float32)
    y = rt3d_halide.load(out)["bad_conv"](x)
    ncdhw = torch.from_numpy(x).double().permute(0, 4, 1, 2, 3)
    expected = torch.nn.functional.conv3d(ncdhw, torch.from_numpy(weight).double())
    np.testing.assert_allclose(y, expected.permute(0, 2, 3, 4, 1).numpy(), rtol=1e-5, atol=1e-5)


def test_jobs_default_to_the_cpus_this_process_may_use(monkeypatch, tmp_path) -> None:
    """Under taskset or a container's cpuset, not the machine's count."""
    from rt3d_halide import build as build_module

    monkeypatch.setattr(build_module.os, "sched_getaffinity", lambda pid: {3, 5}, raising=False)
    monkeypatch.setattr(build_module.os, "cpu_count", lambda: 64)
    assert build_module.usable_cpus() == 2
    given: list[int] = []

    def compile_layers(jobs_list, jobs, *rest):
        given.append(jobs)
        raise KeyboardInterrupt  # enough seen: the build unwinds as from Ctrl-C

    monkeypatch.setattr(build_module, "compile_layers", compile_layers)
    model = F.save(F.one_conv_model(F.conv_weight(4, 3), [1, 3, 4, 6, 6]), tmp_path / "m.onnx")
    with pytest.raises(KeyboardInterrupt):
        build_module.build(model, "host", tmp_path / "out", quiet=True)
    assert given == [2]
