"""Halide target strings: validation, the kind of code each one gets (x86, ARM or OpenCL; the
schedule families of :mod:`rt3d_halide.generators.schedules` refine them), and what runs here.

A build target may be one Halide target or a comma list (a multi-target library with a runtime
dispatch wrapper, best target first, as Halide's generators expect).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import halide as hl

from .errors import BuildError

KNOWN_EXAMPLES = "host, host-opencl, arm-64-android, arm-64-android-opencl, arm-64-linux"
SUPPORTED_OS = (hl.TargetOS.Linux, hl.TargetOS.Android)


@dataclasses.dataclass(frozen=True)
class BuildTarget:
    """What the user asked for, and each Halide target in it."""

    text: str
    targets: tuple[hl.Target, ...]

    @property
    def first(self) -> hl.Target:
        return self.targets[0]

    @property
    def families(self) -> list[str]:
        return [family_of(t) for t in self.targets]

    @property
    def falls_back_from_opencl(self) -> bool:
        """An OpenCL target first (the runtime has OpenCL, :meth:`runtime_target`) and a CPU
        target last: the library can run its CPU code where no OpenCL device is found
        (``rt3d_opencl_fallback.h``)."""
        families = self.families
        return families[0] == "opencl" and families[-1] != "opencl"

    def runtime_target(self) -> hl.Target:
        """What the one Halide runtime is compiled for: the first target without the CPU
        features some other target of the list lacks (the runtime runs on every CPU the library
        dispatches to, its last target's included), with OpenCL where any target has it."""
        runtime = self.first
        for name in CPU_FEATURES:
            if not all(_has(t, name) for t in self.targets):
                runtime = runtime.without_feature(getattr(hl.TargetFeature, name))
        if any(t.has_feature(hl.TargetFeature.OpenCL) for t in self.targets):
            runtime = runtime.with_feature(hl.TargetFeature.OpenCL)
        # strict_float is the layers' arithmetic; Halide's runtime refuses to be built with it.
        return runtime.without_feature(hl.TargetFeature.StrictFloat)

    def generator_target(self) -> str:
        """The generator's ``target=`` value: every target without its own runtime copy, and
        CPU targets without Halide's bounds query, so that there a buffer with a NULL host
        pointer is an error (-34) where the query returned 0 and computed nothing (a dropped
        frame's NULL input beside a real output kept the last frame's result unawares).
        OpenCL code keeps the query: it reads and writes its buffers on the GPU alone, so
        without the query Halide checks no host pointer and ran the kernels on an
        uninitialised device buffer, returning 0 with garbage in the output."""
        return ",".join(_generator_target(t).to_string() for t in self.targets)


def _generator_target(target: hl.Target) -> hl.Target:
    target = target.with_feature(hl.TargetFeature.NoRuntime)
    if family_of(target) == "opencl":
        return target
    return target.with_feature(hl.TargetFeature.NoBoundsQuery)


# What family_of gives a target the build takes (the kernel rules' families; the schedules'
# knob families, generators.schedules.FAMILIES, split x86 by ISA).
TARGET_FAMILIES = ("opencl", "arm", "x86")


def family_of(target: hl.Target) -> str:
    if target.has_gpu_feature():
        return TARGET_FAMILIES[0]
    if target.arch == hl.TargetArch.ARM:
        return TARGET_FAMILIES[1]
    if target.arch == hl.TargetArch.X86:
        return TARGET_FAMILIES[2]
    return "unsupported"


# Features that name instructions the CPU must have (not code-generation options).
CPU_FEATURES = (
    "SSE41", "AVX", "AVX2", "AVXVNNI", "FMA", "FMA4", "F16C", "AVX512", "AVX512_KNL",
    "AVX512_Skylake", "AVX512_Cannonlake", "AVX512_SapphireRapids", "AVX512_Zen4", "AVX512_Zen5",
    "AVX10_1", "X86APX", "ARMv7s", "ARMDotProd", "ARMFp16", "SVE", "SVE2", "VSX",
    "POWER_ARCH_2_07", "RVV",
)  # fmt: skip
# The features Halide 21's runtime checks before it dispatches to a target (src/runtime's
# x86_cpu_features.cpp and aarch64_cpu_features.cpp): a target that needs only others (avxvnni,
# the Zen AVX-512 flavours) is taken on any CPU with the rest.
DISPATCH_CHECKED = {
    hl.TargetArch.X86: (
        "SSE41", "AVX", "F16C", "FMA", "AVX2", "AVX512", "AVX512_KNL", "AVX512_Skylake",
        "AVX512_Cannonlake", "AVX512_SapphireRapids",
    ),
    hl.TargetArch.ARM: ("ARMDotProd", "ARMFp16", "ARMv7s", "SVE", "SVE2"),
}  # fmt: skip
# Left out: the armv8.Xa levels, which Halide 21's host detection never reports (a build naming
# one would be refused on every ARM machine).
# What a CPU feature implies, as Halide's code generator reads them: host detection on a Sapphire
# Rapids sets only its own AVX-512 flavour, yet code for avx512_zen4 runs there.
IMPLIED_FEATURES = {
    "AVX512_Zen5": ("AVX512_Zen4",),
    "AVX512_SapphireRapids": ("AVX512_Zen4",),
    "AVX512_Zen4": ("AVX512_Cannonlake",),
    "AVX512_Cannonlake": ("AVX512_Skylake",),
    "AVX512_Skylake": ("AVX512",),
    "AVX512": ("AVX2", "FMA"),
    # Halide's runtime reports AVX2 only where the CPU has F16C too; every AVX2 CPU has FMA.
    "AVX2": ("AVX", "F16C", "FMA"),
    "AVX": ("SSE41",),
    "SVE2": ("SVE",),
}


def _has(target: hl.Target, name: str) -> bool:
    """Whether ``target`` has the TargetFeature called ``name``."""
    return target.has_feature(getattr(hl.TargetFeature, name))


def feature_name(name: str) -> str:
    """A TargetFeature as Halide spells it in target strings (``ARMDotProd``: arm_dot_prod)."""
    feature = getattr(hl.TargetFeature, name)
    return hl.Target("x86-64-linux").with_feature(feature).to_string().rsplit("-", 1)[-1]


def _named_features(target: hl.Target, names: Sequence[str]) -> set[str]:
    return {n for n in names if _has(target, n)}


def _cpu_features(target: hl.Target) -> set[str]:
    """``target``'s CPU features and everything they imply."""
    found = _named_features(target, CPU_FEATURES)
    pending = list(found)
    while pending:
        for implied in IMPLIED_FEATURES.get(pending.pop(), ()):
            if implied not in found:
                found.add(implied)
                pending.append(implied)
    return found


def missing_cpu_features(target: hl.Target, host: hl.Target | None = None) -> list[str]:
    """The CPU features ``target``'s code uses that ``host`` (default: this machine) lacks,
    as Halide spells them in target strings."""
    have = _cpu_features(host or hl.get_host_target())
    return [feature_name(n) for n in CPU_FEATURES if _has(target, n) and n not in have]


def platform_of(target: hl.Target) -> str:
    """Its architecture, bit width and OS (``x86-64-linux``): what the targets of one library
    share, and what a host must be to run its code."""
    return f"{target.arch.name.lower()}-{target.bits}-{target.os.name.lower()}"


# Features Halide 21's multi-target library needs set alike on all its targets (its
# ``must_match_features``; it refused ``host-debug,x86-64-linux`` only once every layer had
# compiled, in a traceback).
SAME_IN_EVERY_TARGET = (
    "ASAN",
    "CPlusPlusMangling",
    "Debug",
    "MSAN",
    "NoRuntime",
    "SanitizerCoverage",
    "TSAN",
    "UserContext",
)

# GPU APIs other than OpenCL, which no schedule targets.
OTHER_GPU_APIS = ("CUDA", "Metal", "D3D12Compute", "Vulkan", "WebGPU")

# Features that change the generated function's C signature or symbol name, which the build's
# header declares as ``int <fn>(halide_buffer_t *, halide_buffer_t *)`` with C linkage: built,
# the app's call crashed (user_context adds a first argument) or failed to link (mangled names).
SIGNATURE_FEATURES = ("UserContext", "CPlusPlusMangling")


def target_list_problem(
    parts: list[str], targets: list[hl.Target], set_by_caller: Sequence[str] = ()
) -> str | None:
    """What Halide refuses in one library of several targets (``parts`` as written, each
    parsed): a target listed twice, one of another architecture, bit width or OS than the
    first, or one that sets a feature of :data:`SAME_IN_EVERY_TARGET` otherwise than the first
    (but those the caller sets on every target itself, ``set_by_caller``); None when it takes
    the list."""
    seen: dict[str, str] = {}
    for part, target in zip(parts, targets, strict=True):
        key = target.to_string()
        if key in seen:
            also = "" if seen[key] == part else f" (also as {seen[key]!r})"
            return f"target {part!r} is listed twice{also}"
        seen[key] = part
    for part, target in zip(parts[1:], targets[1:], strict=True):
        if platform_of(target) != platform_of(targets[0]):
            return (
                f"target {part!r}: every target of one library must share {parts[0]!r}'s "
                "architecture, bit width and OS; build the others separately"
            )
        for name in SAME_IN_EVERY_TARGET:
            if name not in set_by_caller and _has(target, name) != _has(targets[0], name):
                return (
                    f"target {part!r}: the feature {feature_name(name)!r} must be set alike on "
                    f"every target of one library, as on {parts[0]!r}"
                )
    return None


def runs_here(target: hl.Target) -> bool:
    """Whether the host runtime can load and call code for ``target`` (PoCL gives OpenCL here)."""
    if platform_of(target) != platform_of(hl.get_host_target()):
        return False
    return not target.has_gpu_feature() or target.has_feature(hl.TargetFeature.OpenCL)


def halide_target(text: str) -> hl.Target | None:
    """The target ``text`` names, or None when it is no target string Halide knows; one Halide
    knows but cannot make (a feature of another architecture, a missing driver) raises
    ValueError with Halide's first line."""
    try:
        if not hl.Target.validate_target_string(text):
            return None
        return hl.Target(text)
    except hl.HalideError as exc:
        raise ValueError(str(exc).strip().splitlines()[0]) from exc


def parse_target(text: str) -> BuildTarget:
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise BuildError(f"empty target in {text!r}; examples: {KNOWN_EXAMPLES}")
    targets = []
    for part in parts:
        if "jit" in part.split("-"):  # bare 'jit' is no target string Halide parses
            raise BuildError(f"target {part!r}: jit compiles in-process; a build writes libraries")
        try:
            target = halide_target(part)
        except ValueError as exc:
            raise BuildError(f"target {part!r}: {exc}") from exc
        if target is None:
            raise BuildError(f"unknown Halide target {part!r}; examples: {KNOWN_EXAMPLES}")
        if target.has_feature(hl.TargetFeature.AVX512) and not _names_avx512_flavour(target):
            # Halide 21 aborts inside LLVM on the bare feature (see
            # shared/reference/halide21-notes.md beside this repository).
            raise BuildError(
                f"target {part!r}: plain 'avx512' crashes Halide 21's LLVM; name a flavour such as "
                "'avx512_skylake' or 'avx512_zen4', or use 'host'"
            )
        changed = [feature_name(n) for n in SIGNATURE_FEATURES if _has(target, n)]
        if changed:
            raise BuildError(
                f"target {part!r}: {', '.join(changed)} would change the functions' C signature "
                "or symbol names, which the build's header declares as int <fn>(halide_buffer_t "
                "*input, halide_buffer_t *output) with C linkage; leave it out"
            )
        family = family_of(target)
        if family == "unsupported" or target.bits != 64:
            raise BuildError(f"target {part!r}: only 64-bit x86 and ARM CPUs and OpenCL GPUs")
        other_apis = [feature_name(n) for n in OTHER_GPU_APIS if _has(target, n)]
        if other_apis or (target.has_gpu_feature() and not _has(target, "OpenCL")):
            # Beside OpenCL too (arm-64-android-opencl-cuda), which API the code would take
            # is Halide's pick, not the schedule's.
            raise BuildError(
                f"target {part!r}: the only GPU API with a schedule is OpenCL"
                + (f" (drop {', '.join(other_apis)})" if other_apis else "")
            )
        sve = target.has_feature(hl.TargetFeature.SVE) or target.has_feature(hl.TargetFeature.SVE2)
        if sve and "vector_bits_" not in target.to_string():  # written only when not 0
            # Halide 21 fails inside the generator otherwise.
            raise BuildError(
                f"target {part!r}: SVE code needs the vector length the device has: add "
                f"vector_bits_<N>, e.g. '{part}-vector_bits_128'"
            )
        if target.os not in SUPPORTED_OS:
            # The library is merged as an ELF archive (BSD archives name members otherwise) and
            # the tests run Linux code only.
            raise BuildError(f"target {part!r}: only Linux and Android targets are supported")
        targets.append(target)
    build = BuildTarget(",".join(parts), tuple(targets))
    _check_target_list(parts, build)
    return build


def _check_target_list(parts: list[str], build: BuildTarget) -> None:
    """One multi-target library holds code for one architecture, bit width and OS, each target
    once (Halide's rules, checked here before any compile starts), and every target of it can
    be the one its dispatch runs."""
    targets = build.targets
    # The build adds no_runtime to every target itself (BuildTarget.generator_target).
    if problem := target_list_problem(parts, targets, set_by_caller=("NoRuntime",)):
        raise BuildError(problem)
    for j, (part, target) in enumerate(zip(parts, targets, strict=True)):
        for earlier, before in zip(parts[:j], targets[:j], strict=True):
            if _shadows(before, target, build.falls_back_from_opencl):
                checked = DISPATCH_CHECKED[before.arch]
                raise BuildError(
                    f"target {part!r} would never run: the library runs the first target whose "
                    f"checked CPU features the device has ({_spelled(checked)}; not a GPU), and "
                    f"{earlier!r}, listed before it, is taken wherever {part!r} can run; list "
                    "the more specific target first, an OpenCL one before its CPU fallback"
                    + _unchecked_hint(before, checked)
                )


def _spelled(names: Sequence[str]) -> str:
    return ", ".join(feature_name(n) for n in names)


def _unchecked_hint(target: hl.Target, checked: Sequence[str]) -> str:
    """Where ``target`` names features the dispatch does not check (``avx512_zen4`` alone), the
    checked ones they imply, which the target string must name too."""
    features = _cpu_features(target)
    implied = [n for n in checked if n in features and not _has(target, n)]
    unchecked = [n for n in CPU_FEATURES if _has(target, n) and n not in checked]
    if not (implied and unchecked):
        return ""
    return (
        f"; the dispatch does not check {_spelled(unchecked)}: name what it implies too "
        f"({_spelled(implied)})"
    )


def _shadows(before: hl.Target, later: hl.Target, fallback: bool) -> bool:
    """Whether every device that can run ``later`` picks ``before`` first: Halide's dispatch
    takes the first target whose features its runtime checks (:data:`DISPATCH_CHECKED`) the
    CPU has, so ``before`` wins where those features are all among ``later``'s and what they
    imply. In a list from an OpenCL target to a CPU one (``fallback``,
    :attr:`BuildTarget.falls_back_from_opencl`) the library can be told to skip its OpenCL
    targets where no OpenCL device is found, so they shadow no CPU target."""
    if fallback and family_of(before) == "opencl" and family_of(later) != "opencl":
        return False
    return _named_features(before, DISPATCH_CHECKED[before.arch]) <= _cpu_features(later)


AVX512_FLAVOURS = (
    "AVX512_Skylake",
    "AVX512_Cannonlake",
    "AVX512_SapphireRapids",
    "AVX512_Zen4",
    "AVX512_Zen5",
)


def _names_avx512_flavour(target: hl.Target) -> bool:
    return any(_has(target, flavour) for flavour in AVX512_FLAVOURS)
