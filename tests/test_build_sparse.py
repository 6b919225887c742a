"""The build picks dense or sparse code per Conv from the declared or inferred pattern.

Covers: metadata and inferred schemes, the break-even rule and the ``--kernel`` flag, the manifest's
per-layer record, per-layer results of a pruned model against torch, and the refusals (pattern
contradicting its scheme, a group that does not fit, a malformed entry) with exit status 2 and no
output directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import halide as hl
import numpy as np
import onnx
import onnx_factory as F
import pytest
import torch
from conftest import require_opencl
from conv_harness import AVX2_TARGET, AVX512_TARGET
from rt3d_halide.generators.schedules import ARM64_NEON, X86_AVX2, X86_AVX512
from rt3d_halide.pruning.patterns import (
    SPARSITY_METADATA_KEY,
    sparsity_metadata,
    unit_mask_to_weight_mask,
)

import rt3d_halide
from rt3d_halide import build as rt3d_build
from rt3d_halide.build import build
from rt3d_halide.errors import BuildError
from rt3d_halide.kernel_choice import (
    GPU_SPARSE_BREAK_EVEN_KEPT,
    SPARSE_BREAK_EVEN_KEPT,
    choose_layer_kernel,
)
from rt3d_halide.onnx_import import plan_model
from rt3d_halide.targets import parse_target

# Vector lanes by CPU schedule family: the host may have AVX2, AVX-512 or NEON.
VECTOR_LANES = {k.family: k.vector_lanes for k in (X86_AVX2, X86_AVX512, ARM64_NEON)}

CLIP = (1, 8, 4, 6, 6)  # NCDHW of F.two_conv_model


def _pruned(weight: np.ndarray, group: tuple[int, int], keep: float, seed: int) -> np.ndarray:
    """KGS-pruned copy of ``weight``: each unit kept with probability ``keep``."""
    rng = np.random.default_rng(seed)
    g_m, g_n = group
    p, q = -(-weight.shape[0] // g_m), -(-weight.shape[1] // g_n)
    units = rng.random((p, q, *weight.shape[2:])) < keep
    units.reshape(p, q, -1)[:, :, 0] = True  # every group keeps something
    return np.where(unit_mask_to_weight_mask(units, weight.shape, group), weight, 0.0).astype(
        np.float32
    )


def _vanilla_violating(weight: np.ndarray, group: tuple[int, int]) -> np.ndarray:
    """Kernel group (0, 0) loses one kernel location only: KGS, not vanilla."""
    out = weight.copy()
    out[: group[0], : group[1], 0, 0, 0] = 0
    return out


def _model(tmp_path: Path, metadata: dict | None = None, **weights: np.ndarray) -> Path:
    named = {f"{k}.weight": v for k, v in weights.items()}
    model = F.two_conv_model(
        mid=8, cout=8, weights=named, metadata=F.sparsity_metadata(metadata) if metadata else None
    )
    return F.save(model, tmp_path / "model.onnx")


def _functions(out: Path) -> dict[str, dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {f["node"]: f for f in manifest["functions"]}


def _assert_one_conv_matches(
    out: Path, weight: np.ndarray, pads: list[int], x_shape: tuple[int, ...]
) -> None:
    """The built ``bad_conv`` of ``F.one_conv_model`` (no bias) against float64 torch, its
    output poisoned with NaN."""
    x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
    ref = torch.nn.functional.conv3d(
        torch.from_numpy(x).double().permute(0, 4, 1, 2, 3),
        torch.from_numpy(weight).double(),
        padding=tuple(pads[:3]),
    ).permute(0, 2, 3, 4, 1)
    got = rt3d_halide.load(out)["bad_conv"](x, out=np.full(ref.shape, np.nan, np.float32))
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-4)


def _conv_a_reference(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    xt = torch.from_numpy(x).double().permute(0, 4, 1, 2, 3)
    out = torch.nn.functional.conv3d(
        xt, torch.from_numpy(weight).double(), torch.from_numpy(bias).double(), padding=1
    )
    return out.clamp_min(0).permute(0, 2, 3, 4, 1).numpy()


def test_auto_picks_sparse_for_a_pruned_layer_and_matches_torch(tmp_path: Path) -> None:
    base = F.two_conv_weights(mid=8, cout=8)
    wa = _pruned(base["conv_a.weight"], (4, 1), keep=0.3, seed=1)
    meta = {"conv_a.weight": {"scheme": "kgs", "group": [4, 1]}}
    out = build(_model(tmp_path, meta, conv_a=wa), "host", tmp_path / "out", jobs=1, quiet=True)
    functions = _functions(out)
    a, b = functions["conv_a"], functions["conv_b"]
    assert a["kernel"] == "sparse" and "break-even" in a["kernel_reason"]
    assert a["sparsity"]["scheme"] == "kgs" and a["sparsity"]["group"] == [4, 1]
    assert a["sparsity"]["source"] == "metadata"
    kept = a["sparsity"]["kept_fraction"]
    assert 0 < kept <= SPARSE_BREAK_EVEN_KEPT
    assert a["sparsity"]["sparse_macs_per_sample"] == round(kept * a["macs_per_sample"])
    assert a["sparsity"]["dense_macs_per_sample"] == a["macs_per_sample"]
    assert b["kernel"] == "dense" and b["sparsity"]["scheme"] == "dense"
    assert b["sparsity"]["source"] == "inferred"
    assert a["schedules"] and all("lanes" in s for s in a["schedules"].values())

    x = np.random.default_rng(0).standard_normal((1, 4, 6, 6, 8)).astype(np.float32)
    got = rt3d_halide.load(out)["conv_a"](x, out=np.full((1, 4, 6, 6, 8), np.nan, np.float32))
    ref = _conv_a_reference(x, wa, base["conv_a.bias"])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_pattern_is_inferred_without_metadata(tmp_path: Path) -> None:
    base = F.two_conv_weights(mid=8, cout=8)
    wa = _pruned(base["conv_a.weight"], (8, 4), keep=0.25, seed=2)
    out = build(_model(tmp_path, conv_a=wa), "host", tmp_path / "out", jobs=1, quiet=True)
    a = _functions(out)["conv_a"]
    assert a["sparsity"]["scheme"] == "kgs" and a["sparsity"]["group"] == [8, 4]
    assert a["sparsity"]["source"] == "inferred"
    assert a["kernel"] == "sparse"


def test_low_sparsity_falls_back_to_dense_unless_forced(tmp_path: Path) -> None:
    base = F.two_conv_weights(mid=8, cout=8)
    wa = _pruned(base["conv_a.weight"], (4, 1), keep=0.9, seed=3)
    meta = {"conv_a.weight": {"scheme": "kgs", "group": [4, 1]}}
    model = _model(tmp_path, meta, conv_a=wa)
    auto = _functions(build(model, "host", tmp_path / "auto", jobs=1, quiet=True))["conv_a"]
    assert auto["sparsity"]["kept_fraction"] > SPARSE_BREAK_EVEN_KEPT
    assert auto["kernel"] == "dense" and "dense code is faster" in auto["kernel_reason"]

    forced = build(model, "host", tmp_path / "sparse", jobs=1, quiet=True, kernel="sparse")
    assert {f["kernel"] for f in _functions(forced).values()} == {"sparse"}
    assert _functions(forced)["conv_a"]["kernel_reason"] == "--kernel sparse"
    manifest = json.loads((forced / "manifest.json").read_text())
    assert manifest["executed_macs_per_sample"] < manifest["total_macs_per_sample"]
    dense = build(model, "host", tmp_path / "dense", jobs=1, quiet=True, kernel="dense")
    assert {f["kernel"] for f in _functions(dense).values()} == {"dense"}


@pytest.mark.parametrize(
    ("keep", "target", "expected"),
    [
        (0.6, "host", "sparse"),
        (0.6, "host-opencl", "dense"),  # above the OpenCL line, below the CPU one
        (0.25, "host-opencl", "sparse"),
    ],
    ids=["cpu", "opencl", "opencl-low"],
)
def test_opencl_builds_break_even_lower(
    tmp_path: Path, keep: float, target: str, expected: str
) -> None:
    """Every target OpenCL: the rule's line is GPU_SPARSE_BREAK_EVEN_KEPT, named in the reason
    and the manifest; the sparse code built matches the float64 reference (on PoCL where the
    build has an OpenCL target)."""
    base = F.two_conv_weights(mid=8, cout=8)
    wa = _pruned(base["conv_a.weight"], (4, 1), keep=keep, seed=5)
    meta = {"conv_a.weight": {"scheme": "kgs", "group": [4, 1]}}
    out = build(_model(tmp_path, meta, conv_a=wa), target, tmp_path / "out", jobs=1, quiet=True)
    line = GPU_SPARSE_BREAK_EVEN_KEPT if target == "host-opencl" else SPARSE_BREAK_EVEN_KEPT
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sparse_break_even_fraction"] == line
    a = _functions(out)["conv_a"]
    kept = a["sparsity"]["sparse_fraction"]
    assert (kept <= line) == (expected == "sparse")
    assert a["kernel"] == expected and f"break-even {line}" in a["kernel_reason"]
    if expected == "dense":
        return
    if "opencl" in target:
        require_opencl()
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 6, 8)).astype(np.float32)
    got = rt3d_halide.load(out)["conv_a"](x, out=np.full((1, 4, 6, 6, 8), np.nan, np.float32))
    ref = _conv_a_reference(x, wa, base["conv_a.bias"])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_multi_target_builds_choose_the_kernel_per_target(tmp_path: Path) -> None:
    """host-opencl,host at 0.6 kept: the OpenCL code dense (above its line), the host code sparse
    (below the CPU one), in one library; the manifest, header and reason say which runs where.
    Run here the library takes the OpenCL target (PoCL) and matches the float64 reference (the
    host code's result is checked by test_artifacts' fallback test)."""
    require_opencl()
    base = F.two_conv_weights(mid=8, cout=8)
    wa = _pruned(base["conv_a.weight"], (4, 1), keep=0.6, seed=5)
    meta = {"conv_a.weight": {"scheme": "kgs", "group": [4, 1]}}
    model = _model(tmp_path, meta, conv_a=wa)
    out = build(model, "host-opencl,host", tmp_path / "out", jobs=1, quiet=True, keep_assembly=True)
    manifest = json.loads((out / "manifest.json").read_text())
    gpu, cpu = manifest["halide_targets"]
    # Each target's code is the kernel the manifest names: only the CPU's holds baked entries.
    listings = sorted((out / "asm").glob("*conv_a-*.s"))
    assert len(listings) == 2
    for asm in listings:
        assert ("_wsparse" in asm.read_text()) != ("opencl" in asm.name), asm.name
    assert manifest["sparse_break_even_by_target"] == {
        gpu: GPU_SPARSE_BREAK_EVEN_KEPT,
        cpu: SPARSE_BREAK_EVEN_KEPT,
    }
    assert manifest["sparse_break_even_fraction"] == GPU_SPARSE_BREAK_EVEN_KEPT
    a = _functions(out)["conv_a"]
    assert a["kernel"] == "per_target"
    assert a["target_kernels"] == {gpu: "dense", cpu: "sparse"}
    assert a["kernel_reason"].startswith("opencl: dense, ")
    assert "x86: sparse, " in a["kernel_reason"]
    assert "family" in a["schedules"][gpu] and "lanes" in a["schedules"][cpu]
    # The first target's kernels count: conv_a runs dense there.
    assert manifest["executed_macs_per_sample"] == manifest["total_macs_per_sample"]
    executed = manifest["executed_macs_per_sample_by_target"]
    assert executed[gpu] == manifest["total_macs_per_sample"] > executed[cpu]
    # A CPU-only sparse knob is checked where sparse code runs, not against the GPU's knobs.
    knob = '{"x_vectors": 2}'
    again = build(
        model, "host-opencl,host", tmp_path / "knob", jobs=1, quiet=True, sparse_schedule=knob
    )
    sched = _functions(again)["conv_a"]["schedules"][cpu]
    assert sched["x_tile"] == 2 * VECTOR_LANES[sched["family"]]
    header = (out / manifest["header"]).read_text()
    assert f"dense on {gpu}, sparse on {cpu} Conv3d" in header
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 6, 8)).astype(np.float32)
    got = rt3d_halide.load(out)["conv_a"](x, out=np.full((1, 4, 6, 6, 8), np.nan, np.float32))
    ref = _conv_a_reference(x, wa, base["conv_a.bias"])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_a_per_target_layer_is_keyed_by_its_dense_schedule(tmp_path: Path, monkeypatch) -> None:
    """A layer dense on OpenCL and sparse on the CPU takes --schedule as a generator param:
    built again with other OpenCL threads, it was served the code cached for the first ones."""
    monkeypatch.setenv("RT3D_HALIDE_CACHE", str(tmp_path / "cache"))
    base = F.two_conv_weights(mid=8, cout=8)
    wa = _pruned(base["conv_a.weight"], (4, 1), keep=0.6, seed=5)
    model = _model(tmp_path, {"conv_a.weight": {"scheme": "kgs", "group": [4, 1]}}, conv_a=wa)
    entries = []
    for threads in (4, 16):
        schedule = json.dumps({"opencl": {"threads_x": threads}})
        out = build(model, "host-opencl,host", tmp_path / f"t{threads}", jobs=1, quiet=True,
                    schedule=schedule)  # fmt: skip
        assert _functions(out)["conv_a"]["kernel"] == "per_target"
        entries.append(len(list((tmp_path / "cache" / "layers").glob("*/*conv_a.a"))))
    assert entries == [1, 2]


@pytest.mark.parametrize(("target", "expected"), [("host-opencl", "dense"), ("host", "sparse")])
def test_opencl_builds_keep_rgb_stems_dense(tmp_path: Path, target: str, expected: str) -> None:
    """A 3-channel stem pruned well below either line: dense on an OpenCL-only build (the sparse
    kernel lost there at every kept fraction), sparse on a CPU one."""
    weight = _pruned(F.conv_weight(8, 3), (8, 1), keep=0.2, seed=6)
    meta = sparsity_metadata({"w": ("kgs", (8, 1))})
    onnx_model = F.one_conv_model(weight, [1, 3, 4, 6, 6], {"pads": [1] * 6})
    onnx.helper.set_model_props(onnx_model, {SPARSITY_METADATA_KEY: meta})
    out = build(F.save(onnx_model, tmp_path / "s.onnx"), target, tmp_path / "b", jobs=1, quiet=True)
    function = _functions(out)["bad_conv"]
    assert function["sparsity"]["sparse_fraction"] <= GPU_SPARSE_BREAK_EVEN_KEPT
    assert function["kernel"] == expected
    if expected == "dense":
        assert "3 input channels (< 4)" in function["kernel_reason"]


def test_padded_group_kept_and_sparse_fractions_differ(tmp_path: Path) -> None:
    """A 16-filter group on 24 filters: the kept fraction counts real weights, the sparse
    fraction (what the rule weighs) also the 8 lanes padding the last group that the code
    computes."""
    base = F.two_conv_weights(mid=24, cout=8)
    group = (16, 4)
    wa = _pruned(base["conv_a.weight"], group, keep=0.7, seed=4)
    meta = F.sparsity_metadata({"conv_a.weight": {"scheme": "kgs", "group": list(group)}})
    weights = {"conv_a.weight": wa, "conv_b.weight": base["conv_b.weight"]}
    model = F.two_conv_model(mid=24, cout=8, weights=weights, metadata=meta)
    model = F.save(model, tmp_path / "m.onnx")
    a = _functions(build(model, "host", tmp_path / "out", jobs=1, quiet=True))["conv_a"]
    padded = np.zeros((32, *wa.shape[1:]), np.float32)
    padded[:24] = wa
    units = padded.reshape(2, 16, 2, 4, -1).any(axis=(1, 3))  # (p, q, location)
    dense = 24 * 2 * 27  # per unit of 4 input channels at one location
    kept = float((units * np.array([16, 8])[:, None, None]).sum() / dense)
    sparse = float(units.sum() * 16 / dense)
    sparsity = a["sparsity"]
    assert sparsity["group"] == [16, 4]
    assert sparsity["kept_fraction"] == pytest.approx(kept, abs=1e-6)
    assert sparsity["sparse_fraction"] == pytest.approx(sparse, abs=1e-6)
    assert kept <= SPARSE_BREAK_EVEN_KEPT < sparse
    assert a["kernel"] == "dense"
    assert "plus the lanes padding the last group" in a["kernel_reason"]


def test_a_declared_group_past_the_layer_is_clipped_to_it(tmp_path: Path) -> None:
    """Past the layer a group holds the same units as clipped to it (as the exporter writes
    it); taken whole, a huge one asked numpy for its padding, and any computed padding lanes."""
    base = F.two_conv_weights(mid=8, cout=8)
    wa = _pruned(base["conv_a.weight"], (8, 1), keep=0.5, seed=5)
    meta = {"conv_a.weight": {"scheme": "kgs", "group": [2**62, 1]}}
    out = build(_model(tmp_path, meta, conv_a=wa), "host", tmp_path / "out", jobs=1, quiet=True)
    sparsity = _functions(out)["conv_a"]["sparsity"]
    assert sparsity["group"] == [8, 1]
    assert sparsity["sparse_fraction"] == pytest.approx(sparsity["kept_fraction"], abs=1e-6)


def test_vanilla_layer_builds_sparse(tmp_path: Path) -> None:
    base = F.two_conv_weights(mid=8, cout=8)
    wa = base["conv_a.weight"].copy()
    wa[4:, 1:] = 0  # kernel groups (1, 1) and (1, 2) of group 4x1 removed whole
    wa[:4, :2] = 0
    meta = {"conv_a.weight": {"scheme": "vanilla", "group": [4, 1]}}
    out = build(_model(tmp_path, meta, conv_a=wa), "host", tmp_path / "out", jobs=1, quiet=True)
    a = _functions(out)["conv_a"]
    assert a["kernel"] == "sparse" and a["sparsity"]["scheme"] == "vanilla"
    # Filters 0-3 keep input channels 2-7, filters 4-7 channel 0 (of 8).
    assert a["sparsity"]["kept_fraction"] == pytest.approx((6 / 8 + 1 / 8) / 2)


BAD_SPARSITY = {
    "kgs-pattern-declared-vanilla": (
        lambda w: _vanilla_violating(w, (4, 1)),
        {"scheme": "vanilla", "group": [4, 1]},
        r"node 'conv_a': conv_a\.weight: declared vanilla with group \(4, 1\)",
    ),
    "group-larger-than-layer": (
        lambda w: w,
        {"scheme": "kgs", "group": [16, 16]},
        r"node 'conv_a': conv_a\.weight: declared kgs group \[16, 16\] does not fit the layer",
    ),
    "unknown-scheme": (
        lambda w: w,
        {"scheme": "blocky", "group": [4, 1]},
        r"node 'conv_a': rt3d\.sparsity entry for 'conv_a\.weight': unknown sparsity scheme",
    ),
    "bad-group": (
        lambda w: w,
        {"scheme": "kgs", "group": [4, 0]},
        r"node 'conv_a': rt3d\.sparsity entry .* group must be two positive integers",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SPARSITY))
def test_bad_sparsity_is_a_clear_error(tmp_path: Path, case: str) -> None:
    change, entry, message = BAD_SPARSITY[case]
    wa = change(F.two_conv_weights(mid=8, cout=8)["conv_a.weight"])
    model = _model(tmp_path, {"conv_a.weight": entry}, conv_a=wa)
    with pytest.raises(BuildError, match=message):
        build(model, "host", tmp_path / "out", jobs=1, quiet=True)
    assert not (tmp_path / "out").exists()


def test_cli_bad_pattern_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wa = _vanilla_violating(F.two_conv_weights(mid=8, cout=8)["conv_a.weight"], (4, 1))
    model = _model(tmp_path, {"conv_a.weight": {"scheme": "vanilla", "group": [4, 1]}}, conv_a=wa)
    argv = ["--model", str(model), "--out", str(tmp_path / "out"), "--quiet"]
    assert rt3d_build.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: node 'conv_a'")
    assert not (tmp_path / "out").exists()


def test_cli_kernel_flag_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        rt3d_build.main(["--kernel", "fastest"])
    assert exc.value.code == 2
    assert "--kernel" in capsys.readouterr().err


@pytest.mark.parametrize(("scheme", "group"), [("kgs", (8, 4)), ("vanilla", (4, 4))])
def test_model_exported_by_the_pruner_matches_torch_per_layer(
    tmp_path: Path, scheme: str, group: tuple[int, int]
) -> None:
    """A Tiny3DCNN pruned and exported by the pruning subpackage: every built layer equals the
    exported (BatchNorm-folded) torch layer, and the pruned layers get sparse code."""
    from onnx import numpy_helper
    from rt3d_halide.pruning import export_onnx
    from rt3d_halide.pruning.groups import LayerSparsity
    from rt3d_halide.pruning.groups import unit_mask_to_weight_mask as torch_mask
    from rt3d_halide.pruning.masks import set_mask
    from rt3d_halide.pruning.models import Tiny3DCNN

    torch.manual_seed(0)
    model = Tiny3DCNN()
    for name, conv in model.named_modules():
        if isinstance(conv, torch.nn.Conv3d) and name != "features.0":
            spec = LayerSparsity(scheme, group)
            units = torch.rand(spec.unit_shape(tuple(conv.weight.shape))) < 0.3
            set_mask(conv, torch_mask(units, conv.weight.shape, spec), spec)
    model.eval()
    path = export_onnx(model, tmp_path / "tiny.onnx", (1, 3, 8, 16, 16))
    out = build(path, "host", tmp_path / "out", jobs=1, quiet=True)

    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i).copy() for i in graph.initializer}
    built = rt3d_halide.load(out)
    manifest = json.loads((out / "manifest.json").read_text())
    kernels = {f["weight"]["onnx_initializer"]: f["kernel"] for f in manifest["functions"]}
    assert kernels == {
        "features.0.weight": "dense",  # the unpruned RGB stem
        "features.4.weight": "sparse",
        "features.8.weight": "sparse",
    }
    stem = next(
        f for f in manifest["functions"] if f["weight"]["onnx_initializer"] == "features.0.weight"
    )
    assert stem["sparsity"]["scheme"] == "dense" and "scheme dense" in stem["kernel_reason"]
    rng = np.random.default_rng(0)
    for f in manifest["functions"]:
        spec = f["spec"]
        x = rng.standard_normal([1, *f["input"]["shape"][1:]]).astype(np.float32)
        weight = inits[f["weight"]["onnx_initializer"]]
        conv = next(n for n in graph.node if n.name == f["node"])
        bias = inits[conv.input[2]] if len(conv.input) > 2 else None
        got = built[f["name"]](x, out=np.full([1, *f["output"]["shape"][1:]], np.nan, np.float32))
        ref = torch.nn.functional.conv3d(
            torch.from_numpy(x).double().permute(0, 4, 1, 2, 3),
            torch.from_numpy(weight).double(),
            None if bias is None else torch.from_numpy(bias).double(),
            spec["stride"],
            spec["pads_begin"],
            spec["dilation"],
        )
        if f["fused_relu"]:
            ref = ref.clamp_min(0)
        ref = ref.permute(0, 2, 3, 4, 1).numpy()
        # Every element, not the norm alone (one dropped tap moves one output).
        scale = float(np.abs(ref).max())
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * scale, err_msg=f["node"])


@pytest.mark.parametrize(
    ("kernel", "pads", "expected"),
    [
        ((3, 1, 1), [1, 0, 0, 1, 0, 0], "sparse"),  # temporal-only: the in-place quads
        ((1, 1, 1), [0, 0, 0, 0, 0, 0], "dense"),  # pointwise: no clear winner, dense
        ((3, 3, 3), [1, 1, 1, 1, 1, 1], "dense"),
    ],
    ids=["3x1x1", "1x1x1", "3x3x3"],
)
def test_unpruned_temporal_layers_take_the_quad_kernel(
    tmp_path: Path, kernel: tuple[int, int, int], pads: list[int], expected: str
) -> None:
    """An unpruned 3x1x1 conv of 10 input channels (not a multiple of four) gets the sparse
    kernel's in-place quads by the build's rule on AVX2 (whatever the host), and still matches
    the float64 reference; an unpruned 1x1x1 or 3x3x3 conv keeps dense code."""
    weight = F.conv_weight(12, 10, kernel)
    clip = [1, 10, 3, 14, 14]
    model = F.save(F.one_conv_model(weight, clip, {"pads": pads}), tmp_path / "t.onnx")
    out = build(model, AVX2_TARGET, tmp_path / "b", jobs=1, quiet=True)
    (function,) = json.loads((out / "manifest.json").read_text())["functions"]
    assert function["kernel"] == expected
    if expected == "sparse":
        assert "temporal-only 3x1x1" in function["kernel_reason"]
        (schedule,) = function["schedules"].values()
        assert schedule["input_layout"] == "interleaved"
    _assert_one_conv_matches(out, weight, pads, (1, 3, 14, 14, 10))


@pytest.mark.parametrize(
    ("target", "plane", "expected"),
    [
        (AVX2_TARGET, (7, 7), "sparse"),
        (AVX2_TARGET, (28, 28), "sparse"),
        (AVX512_TARGET, (14, 14), "dense"),
        (AVX512_TARGET, (28, 28), "dense"),
        (f"{AVX512_TARGET},{AVX2_TARGET}", (14, 14), "dense"),  # decided for the family
    ],
    ids=["avx2-7x7", "avx2-28x28", "avx512-14x14", "avx512-28x28", "both-14x14"],
)
def test_avx512_keeps_the_temporal_rule_off(
    tmp_path: Path, target: str, plane: tuple[int, int], expected: str
) -> None:
    """On AVX-512 an unpruned temporal-only conv keeps dense code, which beat the in-place quads
    there, and the manifest says why; AVX2 gives it the quads at every plane size. An AVX-512
    and AVX2 library decides once for its CPU code (built for those targets, not run)."""
    weight = F.conv_weight(8, 8, (3, 1, 1))
    model = F.one_conv_model(weight, [1, 8, 3, *plane], {"pads": [1, 0, 0, 1, 0, 0]})
    out = build(F.save(model, tmp_path / "t.onnx"), target, tmp_path / "b", jobs=1, quiet=True)
    function = _functions(out)["bad_conv"]
    assert function["kernel"] == expected
    reason = function["kernel_reason"]
    if expected == "sparse":
        assert reason.startswith("temporal-only 3x1x1 kernel")
    else:
        assert reason.endswith(
            "temporal-only, but the in-place quads lose to dense code unpruned on x86-avx512"
        )


def test_temporal_rule_follows_what_every_target_runs(tmp_path: Path) -> None:
    """The rule holds only where every target's sparse schedule reads quads in place: not under
    an override that forces the planar copy, not for a GPU target (no quads there); and a
    pattern of half-filled quads (8x2 units, every other pair of channels) is sparse only by its
    kept fraction, on the planar copy."""
    weight = F.conv_weight(12, 8, (3, 1, 1))
    clip, pads = [1, 8, 5, 3, 7], {"pads": [1, 0, 0, 1, 0, 0]}
    model = F.save(F.one_conv_model(weight, clip, pads), tmp_path / "t.onnx")
    planar = '{"input_layout": "planar"}'
    forced = build(model, AVX2_TARGET, tmp_path / "f", jobs=1, quiet=True, sparse_schedule=planar)
    assert _functions(forced)["bad_conv"]["kernel"] == "dense"
    gpu = build(model, "host-opencl", tmp_path / "g", jobs=1, quiet=True)
    assert _functions(gpu)["bad_conv"]["kernel"] == "dense"

    half = weight.copy()
    half[:, 2:4] = half[:, 6:8] = 0.0
    onnx_model = F.one_conv_model(half, clip, pads)
    meta = sparsity_metadata({"w": ("kgs", (8, 2))})
    onnx.helper.set_model_props(onnx_model, {SPARSITY_METADATA_KEY: meta})
    out = build(F.save(onnx_model, tmp_path / "h.onnx"), AVX2_TARGET, tmp_path / "h", quiet=True)
    function = _functions(out)["bad_conv"]
    assert function["kernel"] == "sparse" and "break-even" in function["kernel_reason"]
    (schedule,) = function["schedules"].values()
    assert schedule["input_layout"] == "planar"


def test_a_per_target_temporal_layer_schedules_its_cpu_code_for_its_pattern(
    tmp_path: Path,
) -> None:
    """Dense on OpenCL, sparse quads on the CPU: the CPU schedule weighs the layer's pattern
    as a CPU-only build's does (the per-target choice carried the shares of dense code, and the
    manifest named a schedule the pattern would not get)."""
    from rt3d_halide.generators.conv3d_sparse import pattern_shares
    from rt3d_halide.generators.sparse_choice import choose_sparse_schedule
    from rt3d_halide.generators.spec import Conv3dSpec

    weight = _pruned(F.conv_weight(32, 32, (3, 1, 1)), (4, 1), keep=0.5, seed=5)
    model = F.one_conv_model(weight, [1, 32, 4, 14, 14], {"pads": [1, 0, 0, 1, 0, 0]})
    meta = sparsity_metadata({"w": ("kgs", (4, 1))})
    onnx.helper.set_model_props(model, {SPARSITY_METADATA_KEY: meta})
    out = build(F.save(model, tmp_path / "t.onnx"), "host-opencl,host", tmp_path / "b", quiet=True)
    function = _functions(out)["bad_conv"]
    gpu, cpu = json.loads((out / "manifest.json").read_text())["halide_targets"]
    assert function["target_kernels"] == {gpu: "dense", cpu: "sparse"}
    spec = Conv3dSpec(name=function["name"], in_channels=32, out_channels=32, in_size=(4, 14, 14),
                      kernel=(3, 1, 1), stride=(1, 1, 1), dilation=(1, 1, 1), pads_begin=(1, 0, 0),
                      pads_end=(1, 0, 0), has_bias=False, relu=False)  # fmt: skip
    shares = pattern_shares(weight, (4, 1))
    expected = choose_sparse_schedule(hl.Target(cpu), spec, (4, 1), "", *shares).describe()
    assert function["schedules"][cpu] == json.loads(json.dumps(expected))


def test_pruned_temporal_layers_keep_the_quads_on_avx512(tmp_path: Path) -> None:
    """With the unpruned rule off on AVX-512, a pruned temporal-only conv still gets sparse code
    by its kept fraction, read in place as quads (which beat the planar copy there when pruned),
    and the reason carries no note about the rule."""
    weight = F.conv_weight(12, 8, (3, 1, 1))
    weight[:, 4:8] = 0.0  # every group keeps one unit of four input channels: whole quads
    onnx_model = F.one_conv_model(weight, [1, 8, 5, 3, 7], {"pads": [1, 0, 0, 1, 0, 0]})
    meta = sparsity_metadata({"w": ("kgs", (8, 4))})
    onnx.helper.set_model_props(onnx_model, {SPARSITY_METADATA_KEY: meta})
    out = build(F.save(onnx_model, tmp_path / "p.onnx"), AVX512_TARGET, tmp_path / "p", quiet=True)
    function = _functions(out)["bad_conv"]
    assert function["kernel"] == "sparse"
    assert function["kernel_reason"].endswith("<= break-even 0.8")
    (schedule,) = function["schedules"].values()
    assert schedule["input_layout"] == "interleaved"


@pytest.mark.parametrize(
    ("cin", "kernel", "plane", "target", "expected"),
    [
        (64, (1, 3, 3), (14, 14), "host-opencl", "sparse"),
        (64, (1, 3, 3), (20, 14), "host-opencl", "sparse"),
        (63, (1, 3, 3), (14, 14), "host-opencl", "dense"),  # fewer channels than the reach
        (64, (1, 3, 3), (14, 13), "host-opencl", "dense"),  # a narrower output plane
        (64, (1, 1, 1), (14, 14), "host-opencl", "dense"),  # no spatial taps: pointwise
        (64, (3, 1, 1), (14, 14), "host-opencl", "dense"),  # no spatial taps: temporal-only
        (64, (1, 3, 3), (14, 14), "host-opencl,host", "per_target"),  # the CPU code dense
        (64, (1, 3, 3), (14, 14), "host", "dense"),
    ],
    ids=["reach", "20x14", "63-channels", "14x13", "1x1x1", "3x1x1", "with-cpu", "cpu"],
)
def test_opencl_builds_give_large_plane_convs_the_sparse_kernel_unpruned(
    tmp_path: Path,
    cin: int,
    kernel: tuple[int, int, int],
    plane: tuple[int, int],
    target: str,
    expected: str,
) -> None:
    """An unpruned conv with spatial taps takes the sparse kernel on an OpenCL target at 64
    input channels and a 14x14 output plane, and dense code just below either, without spatial
    taps or on a CPU target (one library: per target); the sparse one matches the float64
    reference (PoCL)."""
    weight = F.conv_weight(8, cin, kernel)
    pads = [k // 2 for k in kernel] * 2
    model = F.one_conv_model(weight, [1, cin, 3, *plane], {"pads": pads})
    out = build(F.save(model, tmp_path / "p.onnx"), target, tmp_path / "b", jobs=1, quiet=True)
    function = _functions(out)["bad_conv"]
    assert function["kernel"] == expected
    if expected == "dense":
        return
    h, w = plane
    reason = f"OpenCL, 3x3 taps over 64 channels, output plane {h}x{w}"
    assert reason in function["kernel_reason"]
    require_opencl()
    _assert_one_conv_matches(out, weight, pads, (1, 3, h, w, cin))


def test_opencl_rule_needs_the_measured_schedule(tmp_path: Path) -> None:
    """Not under an override that puts channel groups on neighbouring work-items or reads the
    input in place, nor for a group whose channels are no OpenCL vector (3x4): the rule was
    measured on none of them."""
    weight = F.conv_weight(8, 64, (1, 3, 3))
    clip, pads = [1, 64, 3, 14, 14], {"pads": [0, 1, 1, 0, 1, 1]}
    model = F.save(F.one_conv_model(weight, clip, pads), tmp_path / "o.onnx")
    for i, knobs in enumerate(['{"x_threads_inner": false}', '{"input_layout": "in_place"}']):
        out = build(
            model, "host-opencl", tmp_path / f"o{i}", jobs=1, quiet=True, sparse_schedule=knobs
        )
        assert _functions(out)["bad_conv"]["kernel"] == "dense"

    onnx_model = F.one_conv_model(weight, clip, pads)
    meta = sparsity_metadata({"w": ("kgs", (3, 4))})
    onnx.helper.set_model_props(onnx_model, {SPARSITY_METADATA_KEY: meta})
    path = F.save(onnx_model, tmp_path / "g.onnx")
    function = _functions(build(path, "host-opencl", tmp_path / "g", jobs=1, quiet=True))
    assert function["bad_conv"]["kernel"] == "dense"
    assert "break-even" in function["bad_conv"]["kernel_reason"]


def _reason(
    tmp_path: Path, weight: np.ndarray, clip: list[int], target: str, meta: str = "", **options
) -> str:
    """The kernel and reason ``build`` would give a one-conv model's layer (no compile);
    ``meta``: its ``rt3d.sparsity`` metadata."""
    model = F.one_conv_model(weight, clip, {"pads": [1, 0, 0, 1, 0, 0]})
    if meta:
        onnx.helper.set_model_props(model, {SPARSITY_METADATA_KEY: meta})
    (layer,) = plan_model(F.save(model, tmp_path / "t.onnx")).layers
    kernel, sparse_schedule = options.get("kernel", "auto"), options.get("sparse_schedule", "")
    choice = choose_layer_kernel(layer, kernel, sparse_schedule, parse_target(target).targets)
    return f"{choice.kernel}: {choice.reason}"


@pytest.mark.parametrize(
    ("channels", "target", "options", "why"),
    [
        (3, AVX2_TARGET, {}, "its 3 input channels are fewer than a quad's 4"),
        (5, AVX2_TARGET, {}, "its quads would multiply 38% zeros (at most 25% for the quads)"),
        (8, "host-opencl", {}, "the GPU schedule has no quads"),
        (
            8,
            AVX2_TARGET,
            {"sparse_schedule": '{"input_layout": "planar"}'},
            "--sparse-schedule gives it the planar input layout",
        ),
        (
            8,
            AVX2_TARGET,
            {"sparse_schedule": '{"task_rows": -1}'},
            "its --sparse-schedule is not valid for it",
        ),
    ],
    ids=["3-channels", "5-channels", "opencl", "override", "bad-override"],
)
def test_dense_temporal_layers_say_why_not_quads(
    tmp_path: Path, channels: int, target: str, options: dict, why: str
) -> None:
    """An unpruned temporal-only conv that keeps dense code names the quad rule's first failed
    condition: a 5-channel conv's quads ([0, 4) and [1, 5)) would hold 5 of 8 entries."""
    weight = F.conv_weight(8, channels, (3, 1, 1))
    reason = _reason(tmp_path, weight, [1, channels, 3, 6, 6], target, **options)
    assert reason == f"dense: scheme dense (inferred); temporal-only, but {why}"


@pytest.mark.parametrize(
    ("zero", "held", "fix"),
    [
        # torch's ln_structured(dim=0) and (dim=1), then unstructured: every other weight.
        (lambda w: w[::2], " (8 of 16 whole filters)", "remove the pruned filters from the model"),
        (
            lambda w: w[:, 1::2],
            " (4 of 8 whole input channels)",
            "remove the pruned input channels from the model",
        ),
        (lambda w: w.reshape(-1)[::2], "", ""),
    ],
    ids=["filters", "channels", "unstructured"],
)
def test_zeros_outside_whole_units_are_named(tmp_path: Path, zero, held: str, fix: str) -> None:
    """A pruned model whose zeros form no whole KGS unit (filter, channel or unstructured
    pruning) builds dense code, and the reason says that its zeros are computed, not that the
    layer was never pruned; a trained dense layer gets no note."""
    weight = F.conv_weight(16, 8, (3, 3, 3))
    assert "zero" not in _reason(tmp_path, weight, [1, 8, 4, 6, 6], AVX2_TARGET)
    zero(weight)[...] = 0.0
    fraction = float(np.mean(weight == 0))
    fixes = f"{fix}, or " if fix else ""
    assert _reason(tmp_path, weight, [1, 8, 4, 6, 6], AVX2_TARGET) == (
        f"dense: scheme dense (inferred); {fraction:.0%} of its weights are zero{held} but they "
        f"fill no whole 8x4 unit: computed as dense ({fixes}prune to a KGS pattern: "
        "docs/pruning.md)"
    )


def test_the_break_even_line_itself_takes_sparse_code(tmp_path: Path) -> None:
    """A layer whose sparse code runs exactly the break-even share (4 of 5 kernel locations)
    gets sparse code: the rule is 'at most', as the manifest says."""
    weight = F.conv_weight(8, 4, (1, 1, 5))
    weight[..., 2] = 0.0
    assert SPARSE_BREAK_EVEN_KEPT == 0.8
    reason = _reason(tmp_path, weight, [1, 4, 2, 6, 6], AVX2_TARGET)
    assert reason == "sparse: sparse code's MACs 0.800 of dense <= break-even 0.8"


def test_four_input_channels_are_enough_for_sparse_opencl_code(tmp_path: Path) -> None:
    """The OpenCL rule keeps convs of fewer than 4 input channels dense: 4 is not fewer."""
    weight = F.conv_weight(8, 4, (3, 3, 3))
    weight[..., 1:, :, :] = 0.0  # 9 of 27 locations kept: a third
    reason = _reason(tmp_path, weight, [1, 4, 4, 6, 6], "host-opencl")
    assert reason == "sparse: sparse code's MACs 0.333 of dense <= break-even 0.4"


def test_zeros_of_a_layer_declared_dense_are_named(tmp_path: Path) -> None:
    """Whole KGS units zero in a layer the metadata declares dense: the reason says the
    declaration keeps them computed."""
    weight = F.conv_weight(16, 8, (3, 3, 3))
    weight[:8, :4] = 0.0  # one whole group: 27 units of 8x4
    meta = sparsity_metadata({"w": ("dense", (8, 4))})
    assert _reason(tmp_path, weight, [1, 8, 4, 6, 6], AVX2_TARGET, meta) == (
        "dense: scheme dense (metadata); 25% of its weights are zero, filling 27 whole 8x4 units, "
        "but the rt3d.sparsity metadata declares it dense: computed (declare it kgs to skip them)"
    )


def test_a_model_pruned_away_whole_builds_and_says_so(tmp_path: Path, capsys) -> None:
    """Every weight pruned: the output is the bias, and the closing line says no MACs are
    left (rather than dividing by them)."""
    weight = np.zeros((8, 4, 3, 3, 3), np.float32)
    bias = np.ones(8, np.float32)
    model = F.one_conv_model(weight, [1, 4, 2, 6, 6], {"pads": [1] * 6}, bias=bias)
    build(F.save(model, tmp_path / "t.onnx"), AVX2_TARGET, tmp_path / "b", jobs=1)
    err = capsys.readouterr().err
    assert "t: 1 of 1 conv layer sparse, every conv weight pruned, no conv MACs left" in err
    (conv,) = rt3d_halide.load(tmp_path / "b").values()
    x = np.random.default_rng(0).standard_normal((1, 2, 6, 6, 4)).astype(np.float32)
    out = np.full((1, 2, 6, 6, 8), np.nan, np.float32)
    conv(x, out=out)
    assert np.array_equal(out, np.ones_like(out))


@pytest.mark.parametrize(
    ("kernel", "says"),
    [
        ("dense", "0 of 1 conv layer sparse, as many conv MACs as dense code (46,656 of 46,656"),
        ("sparse", "1 of 1 conv layer sparse, 1.33x more conv MACs than dense code (62,208 of"),
    ],
)
def test_the_closing_line_says_more_where_sparse_code_runs_more(
    tmp_path: Path, capsys, kernel: str, says: str
) -> None:
    """An unpruned 6-filter conv forced onto sparse code computes 8x4 groups' padding lanes:
    more MACs than dense code, and the line says so rather than '0.75x fewer'."""
    model = F.one_conv_model(F.conv_weight(6, 4, (3, 3, 3)), [1, 4, 2, 6, 6], {"pads": [1] * 6})
    build(F.save(model, tmp_path / "t.onnx"), AVX2_TARGET, tmp_path / "b", jobs=1, kernel=kernel)
    assert says in capsys.readouterr().err


def test_a_group_that_does_not_divide_the_channels_counts_only_its_own(tmp_path: Path) -> None:
    """The last group of 4 input channels holds 2 of 6: counted whole, an unpruned layer's
    kept fraction was 4/3, and the break-even rule weighed that."""
    model = F.save(
        F.one_conv_model(F.conv_weight(4, 6, (1, 1, 1)), [1, 6, 2, 3, 3]), tmp_path / "m"
    )
    (layer,) = plan_model(model).layers
    assert layer.sparsity.group[1] == 4 and layer.sparsity.kept_fraction == 1.0


def test_an_unbalanced_pattern_is_recorded_as_unbalanced(tmp_path: Path) -> None:
    """The manifest's ``balanced`` was never seen false."""
    base = F.two_conv_weights(mid=8, cout=8)
    wa = base["conv_a.weight"].copy()
    wa[4:, :, 0] = 0  # the second group of filters drops its first kernel frame
    meta = {"conv_a.weight": {"scheme": "kgs", "group": [4, 1]}}
    a, b = plan_model(_model(tmp_path, meta, conv_a=wa)).layers
    assert a.sparsity.describe()["balanced"] is False
    assert b.sparsity.describe()["balanced"] is True


def test_families_that_agree_on_the_kernel_build_it_for_every_target(tmp_path: Path) -> None:
    """OpenCL and the CPU both take sparse code here, for reasons of their own: the layer is
    sparse, not per target (which sends it through the per-family generator path)."""
    weight = F.conv_weight(16, 16, (3, 3, 3))
    weight[:, :, 1:] = 0
    model = F.one_conv_model(weight, [1, 16, 4, 8, 8], {"pads": [1] * 6})
    model = F.save(model, tmp_path / "m.onnx")
    (layer,) = plan_model(model).layers
    targets = [parse_target("host-opencl").targets[0], parse_target("host").targets[0]]
    choice = choose_layer_kernel(layer, "auto", "", targets)
    assert choice.kernel == "sparse", choice
    assert "opencl: sparse" in choice.reason and "x86: sparse" in choice.reason
