"""Running the generators: one subprocess per layer, a content-addressed cache, parallel jobs.

A subprocess per compile keeps an LLVM assertion in one layer from killing the build and lets it be
reported against that layer. The cache key covers everything that can change the object code: the
generator sources (and the package modules they read), the Halide build, the layer spec, the
weights, the target, the schedule overrides and further generator params.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from . import errors as _errors
from . import generators as _generators
from . import pruning as _pruning
from . import targets as _targets
from .archive import is_whole
from .errors import BuildError
from .pruning import patterns as _patterns

GENERATOR_DIR = Path(_generators.__file__).resolve().parent
# Package modules the generators' subprocess imports besides them: the packages above them, the
# sparse generator's torch-free pattern module and targets.family_of, and what those import.
PACKAGE_MODULES = (
    *(Path(str(module.__file__)).resolve() for module in (_pruning, _patterns, _targets, _errors)),
    Path(__file__).resolve().parent / "__init__.py",
)
COMPILE_TIMEOUT_S = 1800


def halide_identity() -> str:
    """The Halide compiler the generators' subprocess imports, as the cache key sees it.

    pip's halide: its RECORD, which holds the sha256 of libHalide (and with it the LLVM built
    in), since a version string is the same for another build of that version. A Halide from
    elsewhere on the import path (a source build): its files' names, sizes and times.
    """
    from importlib import metadata, util

    spec = util.find_spec("halide")
    if spec is None or spec.origin is None:
        return ""
    origin = Path(spec.origin).resolve()
    with contextlib.suppress(metadata.PackageNotFoundError):
        dist = metadata.distribution("halide")
        record = dist.read_text("RECORD")
        if record and Path(str(dist.locate_file("halide/__init__.py"))).resolve() == origin:
            return f"halide {dist.version}\n{record}"
    package = origin.parent
    # Not bytecode, which the generators' subprocess may write meanwhile.
    files = sorted(
        path
        for path in package.rglob("*")
        if path.is_file()
        and path.suffix != ".pyc"
        and "__pycache__" not in path.relative_to(package).parts
    )
    return "\n".join(
        f"{path.relative_to(package)} {path.stat().st_size} {path.stat().st_mtime_ns}"
        for path in files
    )


def cache_root() -> Path:
    env = os.environ.get("RT3D_HALIDE_CACHE")
    if env:
        return Path(env)
    # An empty (or relative) XDG_CACHE_HOME is to be ignored, as the XDG spec says.
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "rt3d_halide"


# Environment variables that change the code Halide generates: a layer compiled with them must
# not serve a build without them (HL_LLVM_ARGS hands options to LLVM's code generators; the
# others turn a failed unroll into a loop and leave functions out of the runtime).
CODEGEN_ENVIRONMENT = ("HL_LLVM_ARGS", "HL_PERMIT_FAILED_UNROLL", "HL_RUNTIME_DROP_FUNCS")


def hashed_sources() -> list[Path]:
    """The Python sources the cache key hashes: every module the generators' subprocess
    imports from this package. Not hidden files: an editor's lock link (Emacs's dangling
    ``.#conv3d_dense.py`` while a buffer is modified) is no module."""
    modules = [p for p in GENERATOR_DIR.glob("*.py") if not p.name.startswith(".")]
    return [*sorted(modules), *PACKAGE_MODULES]


def _generator_fingerprint() -> str:
    digest = hashlib.sha256(halide_identity().encode())
    for path in hashed_sources():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for name in CODEGEN_ENVIRONMENT:
        digest.update(f"{name}={os.environ.get(name, '')}".encode() + b"\0")
    return digest.hexdigest()


# The generators' subprocess imports them as this process did (its import path, not the working
# directory first, as ``python -m`` would put it: a second checkout there compiled its own code
# under this package's key), and refuses to run generators from anywhere else: the cache key
# hashes this process's generator sources.
#
# It runs the sources the key hashes, not older bytecode: Python takes a module's .pyc when the
# source's size and modification time (in whole seconds) match what the .pyc recorded, so a
# same-size edit within a second, or sources copied with their times kept, ran the earlier code
# under the new key, whether or not bytecode may be written (PYTHONDONTWRITEBYTECODE only stops
# writing it). This package's modules are compiled from their source files there, always (about
# 10 ms a compile); the other packages' bytecode is used as usual.
GENERATOR_LAUNCH = """
import importlib.abc, importlib.machinery, json, pathlib, runpy, sys
sys.path[:0] = json.loads(sys.argv.pop(1))
expected = sys.argv.pop(1)

class FromSource(importlib.machinery.SourceFileLoader):
    def get_code(self, fullname):
        return self.source_to_code(self.get_data(self.path), self.path)

class PackageFromSource(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] != "rt3d_halide":
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if finder is self or find is None else find(name, path, target)
            if spec is not None:
                if type(spec.loader) is importlib.machinery.SourceFileLoader:
                    spec.loader = FromSource(spec.loader.name, spec.loader.path)
                return spec
        return None

sys.meta_path.insert(0, PackageFromSource())
import rt3d_halide.generators as generators
found = str(pathlib.Path(generators.__file__).resolve().parent)
if found != expected:
    sys.exit(f"rt3d_halide.generators imported from {found}, not {expected}")
runpy.run_module("rt3d_halide.generators", run_name="__main__", alter_sys=True)
"""


def _generator_command() -> list[str]:
    # Imports skip entries that are not strings (legal, but not JSON).
    path = json.dumps([entry for entry in sys.path if isinstance(entry, str)])
    return [sys.executable, "-P", "-c", GENERATOR_LAUNCH, path, str(GENERATOR_DIR)]


# Room for Halide's "-<target>.o" beside the base name, inside 255 bytes.
MAX_FILE_BASE = 80
# A file name's bytes beside the base and the longest target of a list: Halide names a list's
# objects "<base>.a-<target>.o" and its assembly "<base>-<target>.s".
TARGET_FILE_AFFIXES = len(".a-") + len(".o")
NAME_MAX = 255
DIGEST_CHARS = 12
# How a cache entry names its files, in every key: entries from before the names were cut
# (<function>.a at any length) are not read as today's.
ENTRY_LAYOUT = f"file_base-{MAX_FILE_BASE}"


@dataclasses.dataclass(frozen=True)
class LayerJob:
    """One generator invocation: a function ``fn_name`` for ``target`` from ``generator``."""

    generator: str
    fn_name: str
    spec_json: str
    arrays: dict[str, np.ndarray]
    target: str
    schedule: str = ""
    emit_assembly: bool = False
    params: tuple[tuple[str, str], ...] = ()  # further generator params, name and value

    @property
    def file_base(self) -> str:
        """The output files' base name: the function's, or for a name that would pass the file
        system's 255 bytes (Halide adds a target to its object files' names) its start and a
        digest of the whole name. The function keeps its whole name. A target list of long
        targets (``host`` spelled out and four features) leaves less than
        :data:`MAX_FILE_BASE`: its objects' names passed 255 bytes ("File name too long")."""
        room = MAX_FILE_BASE
        if "," in self.target:  # a single target's files are <base>.a and <base>.s
            longest = max(len(part) for part in self.target.split(","))
            room = min(room, NAME_MAX - TARGET_FILE_AFFIXES - longest)
        if len(self.fn_name) <= room:
            return self.fn_name
        digest = hashlib.sha256(self.fn_name.encode()).hexdigest()[:DIGEST_CHARS]
        if room <= DIGEST_CHARS + 1:
            return digest
        return f"{self.fn_name[: room - DIGEST_CHARS - 1]}_{digest}"

    def key(self, fingerprint: str) -> str:
        digest = hashlib.sha256()
        parts = (fingerprint, ENTRY_LAYOUT, self.generator, self.fn_name, self.spec_json)
        for part in (*parts, self.target):
            digest.update(part.encode() + b"\0")
        digest.update(self.schedule.encode() + b"\0")
        for name, value in self.params:
            digest.update(f"{name}={value}".encode() + b"\0")
        digest.update(b"asm" if self.emit_assembly else b"")
        for name in sorted(self.arrays):
            array = np.ascontiguousarray(self.arrays[name], dtype=np.float32)
            digest.update(name.encode() + str(array.shape).encode())
            digest.update(array.tobytes())
        return digest.hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class LayerArtifacts:
    fn_name: str
    library: Path
    assembly: tuple[Path, ...]
    seconds: float
    cached: bool


class _Refused(BuildError):
    """A compile not started: the build is ending (a layer failed before it)."""


class Compiles:
    """The generators one build runs at once, which a stop ends together: a SIGTERM to the
    build alone (a CI runner's cancel) reaches none of them, and each would run to its end, up
    to COMPILE_TIMEOUT_S, with the build waiting for it. Once closed (a layer failed) or
    stopped, none starts."""

    def __init__(self) -> None:
        self._running: set[subprocess.Popen[str]] = set()
        self._lock = threading.Lock()
        self._closed = False

    def start(self, cmd: Sequence[str]) -> subprocess.Popen[str]:
        with self._lock:
            if self._closed:
                raise _Refused("the build is ending: no further compile starts")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self._running.add(proc)
            return proc

    def done(self, proc: subprocess.Popen[str]) -> None:
        with self._lock:
            self._running.discard(proc)

    def close(self) -> int:
        """No compile starts after this; those running (their count returned) finish, into
        the cache."""
        with self._lock:
            self._closed = True
            return len(self._running)

    def stop(self) -> None:
        with self._lock:
            self._closed = True
            for proc in self._running:
                proc.kill()


# How long the build's main thread waits at most before it runs Python again: a signal the
# kernel hands to another thread (a pool worker) has its handler run only then. Waits without
# it hung a SIGTERMed build until its running compile ended, now and then.
WAKE_SECONDS = 0.25


def _communicate(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """``proc.communicate()`` in short waits (:data:`WAKE_SECONDS`), up to COMPILE_TIMEOUT_S."""
    deadline = time.monotonic() + COMPILE_TIMEOUT_S
    while True:
        try:
            return proc.communicate(timeout=WAKE_SECONDS)
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                raise


def _run(cmd: Sequence[str], what: str, compiles: Compiles | None = None) -> None:
    compiles = compiles or Compiles()
    with compiles.start(cmd) as proc:
        try:
            stdout, stderr = _communicate(proc)
        except subprocess.TimeoutExpired as exc:
            proc.kill()
            compiles.close()
            raise BuildError(f"{what}: the compile took over {COMPILE_TIMEOUT_S} s") from exc
        except BaseException:
            proc.kill()
            raise
        finally:
            compiles.done(proc)
    if proc.returncode != 0:
        compiles.close()  # here, before this worker takes the next layer
        raise BuildError(
            f"{what}: the generator failed (exit {proc.returncode}):\n"
            + failure_summary(stderr or stdout)
        )


# A Python generator's failure ends in pybind11's "At:" frames, after the exception's own line.
EXCEPTION_LINE = re.compile(r"^(Unhandled exception|Error|[A-Za-z_.]*(Error|Exception))\b.*:")


def failure_summary(output: str, lines: int = 12) -> str:
    """The last ``lines`` lines of a failed compile's output, led by the lines that name the
    exception when they come earlier (the stack frames after them would crowd them out)."""
    text = output.strip().splitlines()
    tail = text[-lines:]
    causes = [line for line in text[:-lines] if EXCEPTION_LINE.match(line.strip())]
    return "\n".join([*causes[-2:], *(["..."] if causes else []), *tail])


def compile_layer(
    job: LayerJob, fingerprint: str, compiles: Compiles | None = None
) -> LayerArtifacts:
    """Compiles one layer, or returns the cached result of an identical earlier compile;
    ``fingerprint`` is :func:`_generator_fingerprint`, taken once per build."""
    started = time.monotonic()
    entry = cache_root() / "layers" / job.key(fingerprint)
    # One assembly file per target of a comma list.
    assembly = len(job.target.split(",")) if job.emit_assembly else 0
    if _cached(entry / f"{job.file_base}.a", assembly):
        return _artifacts_in(entry, job, time.monotonic() - started, cached=True)

    entry.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=entry.parent, prefix=".tmp-") as tmp:
        work = Path(tmp)
        np.savez(work / "arrays.npz", **job.arrays)
        # No per-layer header: the build writes one for the model.
        emit = "static_library" + (",assembly" if job.emit_assembly else "")
        out = work / "out"
        out.mkdir()
        cmd = [
            *_generator_command(),
            "-g",
            job.generator,
            "-o",
            str(out),
            "-f",
            job.fn_name,
            "-n",
            job.file_base,
            "-e",
            emit,
            f"target={job.target}",
            f"spec={job.spec_json}",
            f"weights={work / 'arrays.npz'}",
        ]
        if job.schedule:
            cmd.append(f"schedule={job.schedule}")
        cmd += [f"{name}={value}" for name, value in job.params if value]
        _run(cmd, f"layer {job.fn_name} ({job.target})", compiles)
        _check_unchanged(fingerprint)
        try:
            out.rename(entry)
        except OSError:
            # A concurrent identical compile may have won the race; anything else is an error.
            if not _cached(entry / f"{job.file_base}.a", assembly):
                raise
    return _artifacts_in(entry, job, time.monotonic() - started, cached=False)


def _check_unchanged(fingerprint: str) -> None:
    """Refuses to cache a compile that ran after the sources, Halide or the code generation
    settings the key hashes had changed (taken once per build: a ``git pull`` or an edit during
    a long build stored the new code under the old key, to be served once it was undone)."""
    try:
        changed = _generator_fingerprint() != fingerprint
    except OSError:  # a source file removed or replaced meanwhile
        changed = True
    if changed:
        raise BuildError(
            "the generator sources, Halide or HL_* settings changed while the build ran; "
            "nothing compiled since is cached: run the build again"
        )


def _cached(library: Path, assembly: int = 0) -> bool:
    """Whether the cache holds ``library`` whole, beside ``assembly`` non-empty assembly files.
    An entry cut short (a crash, a full disk, a file removed by hand) is removed, to be
    compiled again rather than served and linked: entries appear whole, in one rename, so one
    lacking its library is no compile in progress, and it would keep the next one's rename out.
    """
    entry = library.parent
    if not entry.exists():
        return False
    if library.exists() and is_whole(library):
        written = [s for s in entry.glob("*.s") if s.stat().st_size > 0]
        if len(written) >= assembly:
            return True
    shutil.rmtree(entry, ignore_errors=True)
    return False


# Temporary directories of compiles (``.tmp-*``) left in the cache by a build that was killed
# outright (SIGKILL, a crash) go once this old: no compile runs so long.
STALE_SECONDS = 2 * COMPILE_TIMEOUT_S


def sweep_candidates(directory: Path, pattern: str) -> list[Path]:
    """The entries of ``directory`` matching ``pattern`` older than :data:`STALE_SECONDS`:
    what killed builds left there, which no running one can still be writing."""
    cutoff = time.time() - STALE_SECONDS
    found = []
    with contextlib.suppress(OSError):
        for path in directory.glob(pattern):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    found.append(path)
    return found


def sweep_stale(directory: Path) -> None:
    """Removes the compile directories killed builds left in ``directory``."""
    for path in sweep_candidates(directory, ".tmp-*"):
        shutil.rmtree(path, ignore_errors=True)


def _artifacts_in(entry: Path, job: LayerJob, seconds: float, cached: bool) -> LayerArtifacts:
    asm = tuple(sorted(entry.glob("*.s")))
    return LayerArtifacts(job.fn_name, entry / f"{job.file_base}.a", asm, seconds, cached)


def compile_runtime(target: str) -> Path:
    """The one Halide runtime an app links, built for ``target``
    (:meth:`~.targets.BuildTarget.runtime_target`)."""
    base = _generator_fingerprint()
    fingerprint = hashlib.sha256((base + target).encode()).hexdigest()[:32]
    entry = cache_root() / "runtime" / fingerprint
    library = entry / "libhalide_runtime.a"
    sweep_stale(entry.parent)
    if _cached(library):
        return library
    entry.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=entry.parent, prefix=".tmp-") as tmp:
        out = Path(tmp) / "out"
        out.mkdir()
        code = (
            "import sys, halide as hl\n"
            "hl.compile_standalone_runtime("
            "{hl.OutputFileType.static_library: sys.argv[1]}, hl.Target(sys.argv[2]))\n"
        )
        command = [sys.executable, "-P", "-c", code, str(out / library.name), target]
        _run(command, f"runtime ({target})")
        _check_unchanged(base)
        try:
            out.rename(entry)
        except OSError:
            if not entry.exists():
                raise
    return library


ProgressFn = Callable[[int, int, LayerArtifacts], None]


Futures = set[concurrent.futures.Future[LayerArtifacts]]


def _wait(futures: Futures, until: str) -> tuple[Futures, Futures]:
    """``concurrent.futures.wait`` in short waits (:data:`WAKE_SECONDS`)."""
    while True:
        finished, pending = concurrent.futures.wait(futures, WAKE_SECONDS, return_when=until)
        if not pending or (finished and until == concurrent.futures.FIRST_COMPLETED):
            return finished, pending


def _shut_down(
    pool: concurrent.futures.ThreadPoolExecutor,
    compiles: Compiles,
    futures: dict[concurrent.futures.Future[LayerArtifacts], int],
) -> None:
    """Waits for the compiles running; a stop meanwhile (the wait after a failed layer takes as
    long as they do) ends them. Those still queued are cancelled, and a cancelled future never
    counts as done for ``concurrent.futures.wait``: waiting for them too hung the build when a
    layer failed with others queued."""
    pool.shutdown(wait=False, cancel_futures=True)
    running = {future for future in futures if not future.cancelled()}
    try:
        if running:
            _wait(running, concurrent.futures.ALL_COMPLETED)
    except BaseException:
        compiles.stop()
        raise
    finally:
        pool.shutdown(wait=True)


def compile_layers(
    jobs: Sequence[LayerJob],
    parallel: int,
    progress: ProgressFn | None = None,
    say: Callable[[str], None] | None = None,
) -> list[LayerArtifacts]:
    """Compiles ``jobs`` on ``parallel`` workers; results keep the order of ``jobs``. ``say``
    hears why a failed build still waits: for the compiles running beside the failed one (up
    to :data:`COMPILE_TIMEOUT_S` each), whose code the rerun then finds cached."""
    fingerprint = _generator_fingerprint()
    sweep_stale(cache_root() / "layers")
    results: list[LayerArtifacts | None] = [None] * len(jobs)
    done = 0
    lock = threading.Lock()
    compiles = Compiles()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel))
    futures: dict[concurrent.futures.Future[LayerArtifacts], int] = {}
    try:
        for i, job in enumerate(jobs):
            futures[pool.submit(compile_layer, job, fingerprint, compiles)] = i
        pending = set(futures)
        while pending:
            finished, pending = _wait(pending, concurrent.futures.FIRST_COMPLETED)
            # The failure that ended the build before the compiles it refused to start.
            for future in sorted(finished, key=lambda f: isinstance(f.exception(), _Refused)):
                index = futures[future]
                results[index] = future.result()
                with lock:
                    done += 1
                    if progress:
                        progress(done, len(jobs), results[index])
    except Exception:
        running = compiles.close()  # a layer failed: the running compiles finish, for the cache
        if say and running:
            s = "s" * (running != 1)
            say(
                f"  a layer failed: waiting for the {running} compile{s} running beside it, "
                "for the cache (Ctrl-C ends them); its error follows"
            )
        raise
    except BaseException:
        compiles.stop()  # stopped (Ctrl-C, a signal): end them
        raise
    finally:
        _shut_down(pool, compiles, futures)
    return [r for r in results if r is not None]
