"""Calling a build's generated functions from Python, for tests and benchmarks on this machine.

``rt3d_halide.load(build_dir)`` links the build's static libraries into a shared object once (cached
by content) and calls the functions through ctypes with ``halide_buffer_t`` descriptors, the same
ABI an app uses. Arrays are checked here first (dtype, shape in numpy's axis order, ``out=``),
then by the generated code itself, whose error code and message become a Python exception: a
wrong array never crashes the interpreter.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import math
import operator
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import MANIFEST_FORMAT, read_manifest
from .compile import cache_root

HALIDE_TYPE_FLOAT = 2
MAX_THREADS = 2**31 - 1  # a C int; the Halide runtime itself uses at most 256
HOST_DIRTY = 1


class HalideDimension(ctypes.Structure):
    _fields_ = (
        ("min", ctypes.c_int32),
        ("extent", ctypes.c_int32),
        ("stride", ctypes.c_int32),
        ("flags", ctypes.c_uint32),
    )


class HalideType(ctypes.Structure):
    _fields_ = (("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16))


class HalideBuffer(ctypes.Structure):
    _fields_ = (
        ("device", ctypes.c_uint64),
        ("device_interface", ctypes.c_void_p),
        ("host", ctypes.c_void_p),
        ("flags", ctypes.c_uint64),
        ("type", HalideType),
        ("dimensions", ctypes.c_int32),
        ("dim", ctypes.POINTER(HalideDimension)),
        ("padding", ctypes.c_void_p),
    )


ERROR_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_char_p)


class HalideCallError(RuntimeError):
    """A generated function returned a non-zero Halide error code."""


class _BufferView:
    """A halide_buffer_t over a C-contiguous float32 numpy array (axes reversed, as in Halide).

    The strides are the dense ones of its shape, not numpy's: numpy counts an array as
    C-contiguous whatever the stride of a length-1 axis (``clip[None]`` gives 0), while the
    generated code requires dense strides and refused such arrays."""

    def __init__(self, array: np.ndarray, host_dirty: bool) -> None:
        self.array = array
        dims = list(reversed(array.shape))
        strides = [math.prod(dims[:i]) for i in range(len(dims))]
        self.dims = (HalideDimension * len(dims))(
            *(HalideDimension(0, e, s, 0) for e, s in zip(dims, strides, strict=True))
        )
        self.buf = HalideBuffer(
            device=0,
            device_interface=None,
            host=array.ctypes.data,
            flags=HOST_DIRTY if host_dirty else 0,
            type=HalideType(HALIDE_TYPE_FLOAT, 32, 1),
            dimensions=len(dims),
            dim=self.dims,
            padding=None,
        )


def _link_shared(build_dir: Path, manifest: dict[str, Any]) -> Path:
    libs = [build_dir / manifest["library"], build_dir / manifest["runtime"]]
    # CC may hold arguments (``ccache cc``, ``gcc -m64``), as make and sysconfig take it.
    cc = os.environ.get("CC", "")
    try:
        compiler = shlex.split(cc)
    except ValueError as exc:  # an unbalanced quote
        raise RuntimeError(f"CC={cc!r} does not read as a command: {exc}") from exc
    # The libraries, and the command that links them where CC names one (its flags may change
    # the object); the default cc's object loads again where no compiler is left.
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in libs))
    if compiler:
        digest.update(shlex.join(compiler).encode())
    compiler = compiler or [shutil.which("cc") or shutil.which("gcc") or ""]
    # The model's name only labels the file (the digest names it): a name the build takes, up
    # to the file system's 255 bytes for <model>Config.cmake, would pass them here.
    so = cache_root() / "host" / f"{manifest['model'][:64]}-{digest.hexdigest()[:32]}.so"
    if so.exists():
        return so
    if not compiler[0]:
        raise RuntimeError("loading a build needs a C compiler (cc) to link it into a .so")
    # A directory of its own per link (threads of one process may link the same build at once);
    # the compiler creates the file in it with the usual mode (the umask's), then it moves.
    try:
        so.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=so.parent, prefix=f".{so.stem}-"))
    except OSError as exc:  # a cache path that is a file, no permission, no space
        raise RuntimeError(
            f"the compile cache {cache_root()} cannot hold the linked library ({exc}); set "
            "RT3D_HALIDE_CACHE to a writable directory"
        ) from exc
    tmp = work / so.name
    cmd = [
        *compiler,
        "-shared",
        "-o",
        str(tmp),
        "-Wl,--whole-archive",
        *map(str, libs),
        "-Wl,--no-whole-archive",
        "-lpthread",
        "-ldl",
        "-lm",
    ]
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as exc:  # the compiler could not start
            command = shlex.join(compiler)
            raise RuntimeError(f"linking {build_dir}: cannot run {command}: {exc}") from exc
        if proc.returncode != 0:
            raise RuntimeError(f"linking {build_dir} into a shared object failed:\n{proc.stderr}")
        os.replace(tmp, so)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return so


class LayerFunction:
    """One generated function: ``fn(x)`` or ``fn(x, out=preallocated)``."""

    def __init__(self, model: BuiltModel, entry: dict[str, Any]) -> None:
        self._model = model
        self.entry = entry
        self.name: str = entry["name"]
        self.node: str = entry["node"]
        try:
            self._c_fn = getattr(model._lib, self.name)
        except AttributeError as exc:
            raise ValueError(
                f"{model.build_dir}: the manifest names {self.name!r}, which its library lacks"
            ) from exc
        self._c_fn.argtypes = (ctypes.POINTER(HalideBuffer), ctypes.POINTER(HalideBuffer))
        self._c_fn.restype = ctypes.c_int

    def output_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.entry["output"]["shape"][1:])

    def __call__(
        self, x: np.ndarray, out: np.ndarray | None = None, *, upload_out: bool = False
    ) -> np.ndarray:
        """``upload_out``: on an OpenCL target, copy ``out`` to the device before the call, so
        that elements the code leaves unwritten keep its values there too (a check's NaN
        poison, which otherwise stays on the host: the device buffer starts undefined). One
        more copy per call; CPU code writes ``out`` in place either way."""
        x = _as_activation(x, "input", self.name)
        _check_shape(self.name, "input", x.shape, (x.shape[0], *self.entry["input"]["shape"][1:]))
        if x.shape[0] < 1:
            raise ValueError(f"{self.name}: input holds no sample (batch {x.shape[0]})")
        expected = self.output_shape(x.shape[0])
        if out is None:
            out = np.empty(expected, dtype=np.float32)
        else:
            out = _as_activation(out, "out", self.name)
            _check_shape(self.name, "out", out.shape, expected)
            if not (out.flags.c_contiguous and out.flags.writeable and out.flags.aligned):
                raise ValueError(
                    f"{self.name}: out must be a writeable, aligned, C-contiguous array"
                )
            if np.shares_memory(x, out):
                raise ValueError(f"{self.name}: out must not overlap the input")
        return self._model._invoke(self, x, out, upload_out)

    def __reduce__(self) -> Any:
        raise TypeError(_unpicklable(f"{self.name}: a loaded model's function"))

    def __repr__(self) -> str:
        return (
            f"<{self.name} (ONNX node {self.node}): {self.entry['input']['shape']} -> "
            f"{self.entry['output']['shape']}>"
        )


def _check_shape(fn: str, what: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    """Checked here, in numpy's axis order, before Halide checks it in its own (reversed)."""
    if tuple(shape) != tuple(expected):
        hint = ""
        if what == "input" and tuple(shape[1:]) == (expected[4], *expected[1:4]):
            hint = " (an N, C, T, H, W array? transpose it: x.transpose(0, 2, 3, 4, 1))"
        raise ValueError(
            f"{fn}: {what} must have shape (N, T, H, W, C) = {tuple(expected)}, "
            f"got {tuple(shape)}{hint}"
        )


def _as_activation(array: Any, what: str, fn: str) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{fn}: {what} must be a numpy array, got {type(array).__name__}")
    if array.dtype != np.float32:
        raise TypeError(f"{fn}: {what} must be float32, got {array.dtype}")
    if array.ndim != 5:
        raise ValueError(f"{fn}: {what} must be 5-D (N, T, H, W, C), got shape {array.shape}")
    # Halide assumes aligned floats: an unaligned input is copied, as a strided one is.
    return np.require(array, requirements=("C", "A")) if what == "input" else array


class _SharedLibrary:
    """A loaded shared object and its Halide error handler. The process loads a path once, so
    every model loaded from the same build shares one runtime and one handler slot: the handler
    lives as long as the process (a handler freed with one model while another still called
    into the library crashed the interpreter), and calls into it take turns."""

    def __init__(self, path: Path) -> None:
        self.lib = ctypes.CDLL(str(path))
        self.lock = threading.Lock()
        self.messages: list[str] = []
        self._handler = ERROR_HANDLER(self._on_error)
        self.lib.halide_set_error_handler.argtypes = (ERROR_HANDLER,)
        self.lib.halide_set_error_handler.restype = ctypes.c_void_p
        self.lib.halide_set_error_handler(self._handler)
        for name in ("halide_copy_to_host", "halide_device_free"):
            getattr(self.lib, name).argtypes = (ctypes.c_void_p, ctypes.POINTER(HalideBuffer))
            getattr(self.lib, name).restype = ctypes.c_int
        self.lib.halide_set_num_threads.argtypes = (ctypes.c_int,)
        self.lib.halide_set_num_threads.restype = ctypes.c_int

    def _on_error(self, _user_context: int, message: bytes) -> None:
        self.messages.append(message.decode(errors="replace").strip())


_LIBRARIES: dict[Path, _SharedLibrary] = {}
_LIBRARIES_LOCK = threading.Lock()


def _fresh_locks_after_fork() -> None:
    """A child forked while another thread held one of these locks (a call running, a load)
    inherited it held, by a thread the child does not have: its first call or load waited
    forever. The child has one thread, so no one else holds them there."""
    global _LIBRARIES_LOCK
    _LIBRARIES_LOCK = threading.Lock()
    for shared in _LIBRARIES.values():
        shared.lock = threading.Lock()


os.register_at_fork(after_in_child=_fresh_locks_after_fork)


def _shared_library(path: Path) -> _SharedLibrary:
    with _LIBRARIES_LOCK:
        key = path.resolve()
        if key not in _LIBRARIES:
            _LIBRARIES[key] = _SharedLibrary(key)
        return _LIBRARIES[key]


class BuiltModel(Mapping[str, LayerFunction]):
    """A build directory loaded for calls (:func:`load`); index by function name or ONNX node
    name (``in`` takes either), while iteration gives each function once, by its name, so that
    ``items()`` lists every function without a node name repeating it. The build is checked
    first: a manifest this version reads, its libraries present, made for this machine."""

    def __init__(self, build_dir: str | os.PathLike[str]) -> None:
        # Absolute: the host ops' weights are read at the first run(), maybe after a chdir.
        self.build_dir = Path(build_dir).absolute()
        self.manifest: dict[str, Any] = _checked_manifest(self.build_dir)
        # The build linked into one shared object (cached by content): what a profiler or
        # debugger attached to this process sees the generated code in.
        self.shared_object: Path = _link_shared(self.build_dir, self.manifest)
        self._shared = _shared_library(self.shared_object)
        self._lib = self._shared.lib
        self._functions = {e["name"]: LayerFunction(self, e) for e in self.manifest["functions"]}
        # ONNX node names need not be unique: a name two convs share names neither.
        nodes = collections.Counter(fn.node for fn in self._functions.values())
        self._by_node = {fn.node: fn for fn in self._functions.values() if nodes[fn.node] == 1}
        self._network: Any = None
        # The functions are linked now, the host ops' weights read at the first run(): the
        # file must still be the one of this build then (a rebuild in place mixed the two).
        weights = self.manifest["host_weights"]["file"]
        self.host_weights_stamp = file_stamp(self.build_dir / weights) if weights else None

    def __reduce__(self) -> Any:
        raise TypeError(_unpicklable(f"a loaded model ({self.manifest['model']})"))

    def __repr__(self) -> str:
        def counted(items: Any, what: str) -> str:
            return f"{len(items)} {what}{'' if len(items) == 1 else 's'}"

        return (
            f"<{self.manifest['model']} built for {self.manifest['target']} from "
            f"{self.build_dir}: {counted(self._functions, 'function')}, "
            f"{counted(self.manifest['host_ops'], 'host op')}>"
        )

    def run(self, clip: np.ndarray) -> dict[str, np.ndarray]:
        """The whole network on ``clip`` (float32, in the graph's layout: N, C, T, H, W as torch
        exports a Conv3d model), as ``{output name: array}`` in the graph's layout, as
        onnxruntime gives them. The functions run on this build, the host ops on onnxruntime,
        one node at a time (:mod:`rt3d_halide.network`): a check of the build on one's own
        clips before the app that runs its own host ops exists."""
        from . import network

        expected = self.manifest["model_input"]["shape"]
        if not isinstance(clip, np.ndarray) or clip.dtype != np.float32:
            got = clip.dtype if isinstance(clip, np.ndarray) else type(clip).__name__
            raise TypeError(
                f"{self.manifest['model']}: the clip must be a float32 numpy array, got {got}"
            )
        # The functions take any batch, but a host op may hold the exported one (a Reshape
        # to [1, -1]): a batch the file fixes is the only one it takes.
        # (-1: a dynamic axis as some exporters write it, where ONNX names one)
        fixed = [(i, d) for i, d in enumerate(expected) if isinstance(d, int) and d >= 0]
        if clip.ndim and clip.shape[0] == 0:
            raise ValueError(f"{self.manifest['model']}: the clip holds no sample (batch 0)")
        if clip.ndim != len(expected) or any(clip.shape[i] != d for i, d in fixed):
            hint = ""
            if clip.ndim == len(expected) == 5:
                # Named (dynamic) axes match any size, here as in the check above.
                channels_last = [*expected[2:], expected[1]]
                if all(
                    not isinstance(d, int) or d < 0 or d == got
                    for d, got in zip(channels_last, clip.shape[1:], strict=True)
                ):
                    hint = "; an N, T, H, W, C clip? transpose it: clip.transpose(0, 4, 1, 2, 3)"
            raise ValueError(
                f"{self.manifest['model']}: clip of shape {clip.shape}, the model takes "
                f"{expected} (in the graph's layout; another batch where the file's batch axis "
                f"is named, a dynamic one){hint}"
            )
        if "onnx_opset" not in self.manifest:
            raise ValueError(
                f"{self.build_dir}: built before builds recorded the ONNX opset their host ops "
                "follow; build it again to run the whole model (its functions run as they are)"
            )
        if self._network is None:
            self._network = network.Network(self)
        return self._network.outputs(clip)

    def _invoke(
        self, fn: LayerFunction, x: np.ndarray, out: np.ndarray, upload_out: bool = False
    ) -> np.ndarray:
        inp, res = _BufferView(x, host_dirty=True), _BufferView(out, host_dirty=upload_out)
        shared = self._shared
        with shared.lock:
            shared.messages.clear()
            code = fn._c_fn(ctypes.byref(inp.buf), ctypes.byref(res.buf))
            copy_code = 0
            if code == 0 and res.buf.device:
                copy_code = self._lib.halide_copy_to_host(None, ctypes.byref(res.buf))
            for view in (inp, res):
                if view.buf.device:
                    self._lib.halide_device_free(None, ctypes.byref(view.buf))
            messages = "; ".join(shared.messages)
        if code != 0 or copy_code != 0:
            raise HalideCallError(f"{fn.name}: Halide error {code or copy_code}: {messages}")
        return out

    def set_num_threads(self, threads: int) -> int:
        """Workers of the library's thread pool (0: one per CPU; Halide 21 uses at most 256),
        for every model loaded from this build; returns the previous count, 0 until the pool
        has started (its first parallel call) unless a count was set before. ``HL_NUM_THREADS``
        sets it before the first load; an app calls ``halide_set_num_threads`` the same way."""
        try:
            count = operator.index(threads)
        except TypeError:
            count = -1
        if isinstance(threads, bool) or not 0 <= count <= MAX_THREADS:
            raise ValueError(f"threads must be an integer in [0, {MAX_THREADS}], got {threads!r}")
        with self._shared.lock:
            return int(self._lib.halide_set_num_threads(count))

    def __getitem__(self, name: str) -> LayerFunction:
        if name in self._functions:
            return self._functions[name]
        if name in self._by_node:
            return self._by_node[name]
        shared = [fn.name for fn in self._functions.values() if fn.node == name]
        if shared:
            raise KeyError(
                f"{name!r}: {len(shared)} ONNX nodes have this name; "
                f"take the function by its own name ({', '.join(shared)})"
            )
        raise KeyError(f"{name!r}: not a function or ONNX node of {self.manifest['model']}")

    def __iter__(self) -> Iterator[str]:
        return iter(self._functions)

    def __len__(self) -> int:
        return len(self._functions)


def _unpicklable(what: str) -> str:
    return (
        f"{what} holds its library in this process and cannot be pickled or copied: call "
        "rt3d_halide.load(build_dir) in each process"
    )


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells one version of a file from the next (None: no such file)."""
    try:
        found = path.stat()
    except FileNotFoundError:
        return None
    return found.st_ino, found.st_size, found.st_mtime_ns


def load(build_dir: str | os.PathLike[str]) -> BuiltModel:
    """Loads a build made for this machine (``host``, ``host-opencl``)."""
    return BuiltModel(build_dir)


def _checked_manifest(path: Path) -> dict[str, Any]:
    """The build's manifest, once the build is known to be one this version loads here: a
    missing or foreign file gets an error that names it, not a linker's or ctypes' message."""
    if not (path / "manifest.json").exists():
        raise FileNotFoundError(
            f"{path}: no manifest.json; is this an rt3d_halide build directory?"
        )
    manifest = read_manifest(path)
    if manifest["format"] != MANIFEST_FORMAT:
        raise ValueError(
            f"{path}: manifest format {manifest['format']}, this rt3d_halide reads "
            f"{MANIFEST_FORMAT}; rebuild with this version"
        )
    if not manifest["halide_targets"]:
        raise ValueError(f"{path}: the manifest lists no Halide target")
    for key in ("library", "runtime"):
        if not (path / manifest[key]).is_file():
            raise FileNotFoundError(
                f"{path}: incomplete build, its {manifest[key]} is missing; build it again"
            )
    _check_runs_here(path, manifest)
    return manifest


def _check_runs_here(path: Path, manifest: dict[str, Any]) -> None:
    """A build for another machine (arm-64-android, ...) gets a clear error, not a linker dump;
    one whose code needs CPU features this one lacks, not an illegal instruction at its first
    call. A multi-target library runs the first target whose features the CPU has, else its
    last one unchecked (Halide's dispatch): the last one must fit."""
    import halide as hl

    from .targets import missing_cpu_features, runs_here

    targets = manifest["halide_targets"]
    foreign = [t for t in targets if not runs_here(hl.Target(t))]
    if foreign:
        raise ValueError(
            f"{path}: built for {manifest['target']!r} ({', '.join(foreign)}), which does not run "
            "on this machine; load() takes host or host-opencl builds"
        )
    missing = missing_cpu_features(hl.Target(targets[-1]))
    if missing:
        raise ValueError(
            f"{path}: built for {targets[-1]}, whose code needs CPU features this machine lacks "
            f"({', '.join(missing)}); build with --target host on this machine, or end the "
            "target list with one it has"
        )
