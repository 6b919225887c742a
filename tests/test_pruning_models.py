"""Models and MAC counting against the published figures."""

import pytest
import torch
from rt3d_halide.pruning import count_macs
from rt3d_halide.pruning.flops import conv_macs, layer_macs
from rt3d_halide.pruning.models import C3D, R2Plus1D18, Tiny3DCNN, build_model

torch.set_num_threads(1)
CLIP = (3, 16, 112, 112)


def _on_meta(factory):
    with torch.device("meta"):
        return factory()


def test_c3d_matches_the_paper():
    model = _on_meta(C3D)
    assert count_macs(model, CLIP, convs_only=True) == 38_496_632_832
    assert round(count_macs(model, CLIP) / 1e9, 1) == 38.5
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 78.4
    records = {r.name: r for r in layer_macs(model, CLIP)}
    assert records["conv2"].macs == 64 * 128 * 27 * 16 * 56 * 56
    assert records["fc6"].weight_shape == (4096, 8192)
    per_conv = conv_macs(model, CLIP)
    assert len(per_conv) == 8 and "fc6" not in per_conv
    assert per_conv["conv2"] == records["conv2"].macs
    assert sum(per_conv.values()) == 38_496_632_832


def test_r2plus1d_18_matches_torchvision():
    model = _on_meta(lambda: R2Plus1D18(num_classes=400))
    assert round(count_macs(model, CLIP) / 1e9, 1) == 40.5
    # torchvision's documented r2plus1d_18 figures: 31,505,325 parameters, 40.52 GFLOPS.
    assert sum(p.numel() for p in model.parameters()) == 31_505_325
    keys = list(model.state_dict())
    assert len(keys) == 224
    for key in [
        "stem.0.weight",
        "stem.1.running_var",
        "stem.3.weight",
        "layer1.0.conv1.0.0.weight",
        "layer1.0.conv1.0.1.num_batches_tracked",
        "layer1.0.conv1.0.3.weight",
        "layer1.0.conv1.1.weight",
        "layer1.0.conv2.0.3.weight",
        "layer2.0.downsample.0.weight",
        "layer2.0.downsample.1.running_mean",
        "layer4.1.conv2.1.bias",
        "fc.weight",
        "fc.bias",
    ]:
        assert key in keys
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["stem.0.weight"] == (45, 3, 1, 7, 7)
    assert shapes["layer1.0.conv1.0.0.weight"] == (144, 64, 1, 3, 3)
    assert shapes["layer2.0.conv1.0.0.weight"] == (230, 64, 1, 3, 3)
    assert shapes["layer4.1.conv2.0.3.weight"] == (512, 1152, 3, 1, 1)


def test_small_models_run_and_scale():
    x = torch.randn(2, 3, 8, 32, 32)
    assert Tiny3DCNN(num_classes=5)(x).shape == (2, 5)
    small = C3D(num_classes=7, width=0.125, fc_width=32, clip_shape=(16, 32, 32))
    assert small(torch.randn(2, 3, 16, 32, 32)).shape == (2, 7)
    assert small.conv5b.out_channels == 64
    with_bn = C3D(num_classes=7, width=0.125, fc_width=32, clip_shape=(16, 32, 32), batch_norm=True)
    assert (
        with_bn(torch.randn(2, 3, 16, 32, 32)).shape == (2, 7) and with_bn.bn5b.num_features == 64
    )
    assert R2Plus1D18(num_classes=3).eval()(x).shape == (2, 3)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet50", 10)
    with pytest.raises(
        ValueError, match="'r2plus1d_18' takes no argument 'width'; its arguments: none"
    ):
        build_model("r2plus1d_18", 10, width=0.125)
    with pytest.raises(ValueError, match="'widht'; its arguments: batch_norm, clip_shape, dropout"):
        build_model("c3d", 10, widht=0.5)
    with pytest.raises(ValueError, match="too small"):
        C3D(clip_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="input_shape"):
        count_macs(Tiny3DCNN(), (2, 3, 8, 16, 16))


def test_grouped_convs_and_linears_over_positions_count_what_they_compute():
    """A grouped conv reads in_channels / groups per filter; a Linear on a rank-3 tensor runs
    once per leading position (counted once, and as the whole input's channels, the FLOPs
    target and the report were off)."""
    grouped = torch.nn.Sequential(torch.nn.Conv3d(4, 8, 3, padding=1, groups=2))
    assert count_macs(grouped, (4, 2, 2, 2)) == 8 * 2 * 27 * 8
    conv = torch.nn.Conv3d(3, 4, 1)
    per_position = torch.nn.Sequential(conv, torch.nn.Flatten(2), torch.nn.Linear(8, 5))
    assert count_macs(per_position, (3, 2, 2, 2)) == 4 * 3 * 8 + 4 * 8 * 5


class _PerFrame(torch.nn.Module):
    """A per-frame Conv2d and Linear on the clip's frames folded into the batch axis, as
    (2+1)D and hybrid designs run them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv3d(3, 8, 3, padding=1)
        self.frame = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        n, c, t, h, w = x.shape
        x = self.frame(x.transpose(1, 2).reshape(n * t, c, h, w))
        return self.head(x.mean((2, 3))).reshape(n, t, 5).mean(1)


def test_layers_on_frames_folded_into_the_batch_count_every_frame():
    """A conv's MACs were counted from its output's second axis on: one on 4 frames folded
    into the batch counted a quarter of its work, and the pruner's FLOPs target missed (a
    2x target took 1.7x off)."""
    per_frame = _PerFrame()
    assert conv_macs(per_frame, (3, 4, 6, 6)) == {
        "stem": 8 * 3 * 27 * 4 * 36,
        "frame": 4 * 16 * 8 * 9 * 36,
    }
    convs = 8 * 3 * 27 * 4 * 36 + 4 * 16 * 8 * 9 * 36
    assert count_macs(per_frame, (3, 4, 6, 6)) == convs + 4 * 16 * 5
    records = {r.name: r for r in layer_macs(per_frame, (3, 4, 6, 6))}
    assert records["frame"].output_volume == 4 * 36
