"""Synthetic motion videos and the UCF101-style frame-folder loader."""

import numpy as np
import pytest
import torch
from PIL import Image
from rt3d_halide.pruning.data import SyntheticMotionVideos, VideoFolder, class_motions, render_clip
from rt3d_halide.pruning.data.synthetic import Motion

torch.set_num_threads(1)


def test_synthetic_clips_are_deterministic_balanced_and_bounded():
    a = SyntheticMotionVideos(16, num_classes=8, clip_shape=(8, 24, 24), seed=3)
    b = SyntheticMotionVideos(16, num_classes=8, clip_shape=(8, 24, 24), seed=3)
    c = SyntheticMotionVideos(16, num_classes=8, clip_shape=(8, 24, 24), seed=4)
    assert torch.equal(a[5][0], b[5][0]) and not torch.equal(a[5][0], c[5][0])
    labels = [a[i][1] for i in range(16)]
    assert sorted(labels) == sorted(list(range(8)) * 2)
    clip = a[0][0]
    assert clip.shape == (3, 8, 24, 24) and clip.dtype == torch.float32
    assert clip.min() >= -0.5 and clip.max() <= 0.5
    with pytest.raises(IndexError):
        a[16]


@pytest.mark.parametrize("speed", [1, 2])
def test_a_clip_played_backwards_is_a_clip_of_the_opposite_direction(speed):
    """So no per-frame (order-blind) model can tell 'left' from 'right'."""
    shape = (8, 20, 20)
    right, left = Motion((0, 1), speed), Motion((0, -1), speed)
    forward, start = render_clip(np.random.default_rng(7), right, shape, noise=0.0)
    end = start + right.velocity() * (shape[0] - 1)
    backward, _ = render_clip(np.random.default_rng(7), left, shape, start=end, noise=0.0)
    np.testing.assert_array_equal(forward[:, ::-1], backward)
    moved = np.abs(forward[:, 1:] - forward[:, :-1]).sum()
    assert moved > 0


def test_single_frames_carry_no_class_signal():
    """Per-frame mean colour and sprite position spread are alike across classes."""
    data = SyntheticMotionVideos(400, num_classes=4, clip_shape=(4, 16, 16), seed=0)
    means = np.zeros((4, 100))
    for i in range(400):
        clip, label = data[i]
        means[label, i // 4] = float(clip[:, 0].mean())
    spread = means.mean(axis=1).max() - means.mean(axis=1).min()
    assert spread < 3 * means.std() / np.sqrt(100)


def test_bad_synthetic_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        class_motions(9)
    with pytest.raises(ValueError, match="num_samples"):
        SyntheticMotionVideos(0)
    with pytest.raises(ValueError, match="clip_shape"):
        SyntheticMotionVideos(4, clip_shape=(8, 16))


def _write_clip(folder, frames, kind, size=(12, 10)):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(len(str(folder)))
    for t in range(frames):
        pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        if kind == "png":
            Image.fromarray(pixels).save(folder / f"{t:05d}.png")
        else:
            np.save(folder / f"{t:05d}.npy", pixels)
            if kind == "NPY":  # an upper-case suffix, as some frame dumpers write
                (folder / f"{t:05d}.npy").rename(folder / f"{t:05d}.NPY")


def test_video_folder_reads_png_and_npy_clips(tmp_path):
    _write_clip(tmp_path / "ApplyEyeMakeup" / "v_01", 20, "png")
    _write_clip(tmp_path / "ApplyEyeMakeup" / "v_02", 5, "npy")
    _write_clip(tmp_path / "Basketball" / "v_01", 16, "png")
    data = VideoFolder(tmp_path, clip_len=8, frame_size=(16, 16))
    assert data.classes == ["ApplyEyeMakeup", "Basketball"] and len(data) == 3
    clip, label = data[0]
    assert clip.shape == (3, 8, 16, 16) and label == 0
    assert clip.min() >= -0.5 and clip.max() <= 0.5
    looped, _ = VideoFolder(tmp_path, clip_len=8)[1]
    assert looped.shape == (3, 8, 12, 10)
    torch.testing.assert_close(looped[:, 0], looped[:, 5])  # 5 frames looped to 8
    raw = np.load(tmp_path / "ApplyEyeMakeup" / "v_02" / "00000.npy")
    torch.testing.assert_close(
        looped[:, 0], torch.from_numpy(raw / 255.0 - 0.5).float().permute(2, 0, 1)
    )
    assert data[2][1] == 1
    # 20 frames, 8 kept: the middle ones (6 to 13), RGB, scaled to [0, 1] and centred.
    middle, _ = VideoFolder(tmp_path, clip_len=8)[0]
    for t, frame in ((0, 6), (7, 13)):
        rgb = np.asarray(Image.open(tmp_path / "ApplyEyeMakeup" / "v_01" / f"{frame:05d}.png"))
        expected = torch.from_numpy(rgb / 255.0 - 0.5).float().permute(2, 0, 1)
        torch.testing.assert_close(middle[:, t], expected)
    # Resizing keeps a flat frame's value.
    still = tmp_path / "still" / "Still" / "v_01"
    still.mkdir(parents=True)
    for t in range(8):
        Image.fromarray(np.full((12, 10, 3), 51, np.uint8)).save(still / f"{t:05d}.png")
    resized, _ = VideoFolder(tmp_path / "still", clip_len=8, frame_size=(16, 16))[0]
    assert resized.shape == (3, 8, 16, 16)
    torch.testing.assert_close(resized, torch.full_like(resized, 51 / 255 - 0.5))
    shouting = tmp_path / "upper"
    _write_clip(shouting / "Run" / "v_01", 4, "NPY")
    clip, _ = VideoFolder(shouting, clip_len=4)[0]
    assert clip.shape == (3, 4, 12, 10)


def test_video_folder_rejects_bad_layouts(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        VideoFolder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class folders"):
        VideoFolder(tmp_path)
    (tmp_path / "Run").mkdir()
    (tmp_path / "Run" / "v_01.avi").write_bytes(b"")
    with pytest.raises(ValueError, match="video files are not decoded"):
        VideoFolder(tmp_path)
    # A video inside a clip folder gets the same hint, not "holds no frames".
    (tmp_path / "Run" / "v_01.avi").unlink()
    (tmp_path / "Run" / "v_01").mkdir()
    (tmp_path / "Run" / "v_01" / "v_01.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match=r"v_01\.mp4: video files are not decoded"):
        VideoFolder(tmp_path)


def test_video_folder_orders_frames_by_number_and_skips_hidden_entries(tmp_path):
    """frame2 plays before frame10; a notebook's .ipynb_checkpoints is no class, .DS_Store no
    clip or frame."""
    clip = tmp_path / "Run" / "v_01"
    clip.mkdir(parents=True)
    for t in range(12):  # frame t is all t
        np.save(clip / f"frame{t}.npy", np.full((4, 4, 3), t, np.uint8))
    (clip / ".frame99.npy").write_bytes(b"junk")
    np.save(clip / "frame01.npy", np.full((4, 4, 3), 1, np.uint8))  # after frame1, by name
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / "Run" / ".DS_Store").mkdir()
    data = VideoFolder(tmp_path, clip_len=13)
    assert data.classes == ["Run"] and len(data) == 1
    assert [p.name for p in data.samples[0][0][:3]] == ["frame0.npy", "frame01.npy", "frame1.npy"]
    played = data[0][0][0, :, 0, 0]
    expected = torch.tensor([0, 1, *range(1, 12)], dtype=torch.float32) / 255.0 - 0.5
    torch.testing.assert_close(played, expected)


def test_float_frames_are_scaled_per_clip(tmp_path):
    """A float clip in [0, 255] whose first frame is dark (at most 1) is [0, 255] throughout;
    a clip mixing PNG and [0, 1] float frames scales each kind as its own."""
    clip = tmp_path / "Run" / "v_01"
    clip.mkdir(parents=True)
    for t, value in enumerate((1.0, 200.0)):
        np.save(clip / f"{t}.npy", np.full((4, 4, 3), value, np.float32))
    mixed = tmp_path / "Run" / "v_02"
    mixed.mkdir()
    Image.fromarray(np.full((4, 4, 3), 255, np.uint8)).save(mixed / "0.png")
    np.save(mixed / "1.npy", np.full((4, 4, 3), 1.0, np.float32))
    data = VideoFolder(tmp_path, clip_len=2)
    torch.testing.assert_close(data[0][0][0, :, 0, 0], torch.tensor([1.0, 200.0]) / 255.0 - 0.5)
    torch.testing.assert_close(data[1][0][0, :, 0, 0], torch.tensor([0.5, 0.5]))


def test_unreadable_and_mismatched_frames_name_their_files(tmp_path):
    _write_clip(tmp_path / "Run" / "v_01", 3, "png")
    (tmp_path / "Run" / "v_01" / "00001.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"00001\.png: cannot read the frame"):
        VideoFolder(tmp_path, clip_len=3)[0]
    (tmp_path / "Run" / "v_01" / "00001.png").unlink()
    (tmp_path / "Run" / "v_01" / "00001.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"00001\.npy: cannot read the frame"):
        VideoFolder(tmp_path, clip_len=3)[0]
    _write_clip(tmp_path / "Walk" / "v_01", 2, "png")
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "Walk" / "v_01" / "00001.png")
    with pytest.raises(ValueError, match=r"v_01: its frames differ in size"):
        VideoFolder(tmp_path, clip_len=2)[1]


def test_sixteen_bit_frames_are_scaled_and_wider_integers_refused(tmp_path):
    """A 16-bit PNG saturated at 255 when converted to RGB; uint16 frames (PNG or .npy) are
    [0, 65535] whatever their values, beside float frames of [0, 255] in the same clip; other
    integers past 255, truth values and empty frames are refused, naming the file."""
    clip = tmp_path / "Run" / "v_01"
    clip.mkdir(parents=True)
    for t, value in enumerate((0, 32768)):
        Image.fromarray(np.full((4, 4), value, np.uint16)).save(clip / f"{t}.png")
    np.save(clip / "2.npy", np.full((4, 4, 3), 65535, np.uint16))
    np.save(clip / "3.npy", np.full((4, 4, 3), 51.0, np.float32))
    frames = VideoFolder(tmp_path, clip_len=4)[0][0]
    expected = torch.tensor([0, 32768 / 65535, 1, 51 / 255]) - 0.5
    torch.testing.assert_close(frames[:, :, 0, 0], expected.expand(3, 4))
    for name, array, said in (
        ("wide", np.full((4, 4, 3), 300, np.int32), r"int32 frames hold 0\.\.255 .* 300\.\.300"),
        ("truth", np.ones((4, 4, 3), bool), "frames are numbers, not bool"),
        ("empty", np.zeros((0, 0, 3), np.uint8), r"a frame must be \(H, W, 3\)"),
        ("two-channel", np.zeros((4, 4, 2), np.uint8), r"a frame .*, or gray \(H, W\) or"),
    ):
        folder = tmp_path / "bad" / name / "Run" / "v_01"
        folder.mkdir(parents=True)
        np.save(folder / "0.npy", array)
        with pytest.raises(ValueError, match=r"0\.npy: " + said):
            VideoFolder(tmp_path / "bad" / name, clip_len=1)[0]


@pytest.mark.parametrize("shape", [(4, 4), (4, 4, 1)])
def test_gray_npy_frames_read_as_gray_png_frames_do(tmp_path, shape):
    """A gray PNG was taken and a gray .npy frame refused."""
    clip = tmp_path / "Run" / "v_01"
    clip.mkdir(parents=True)
    np.save(clip / "0.npy", np.full(shape, 51, np.uint8))
    Image.fromarray(np.full((4, 4), 102, np.uint8)).save(clip / "1.png")
    frames = VideoFolder(tmp_path, clip_len=2)[0][0]
    expected = torch.tensor([51 / 255, 102 / 255]) - 0.5
    torch.testing.assert_close(frames[:, :, 0, 0], expected.expand(3, 2))


def test_a_root_one_level_too_deep_is_told_the_layout(tmp_path):
    """A class folder given as the root holds clip folders of frames where class folders of
    clips belong: the error says the layout rather than only that no clip was found."""
    _write_clip(tmp_path / "Run" / "v_01", 2, "npy")
    with pytest.raises(ValueError, match=r"hold frames themselves.*root/<class>/<clip>/<frames>"):
        VideoFolder(tmp_path / "Run", clip_len=2)
    VideoFolder(tmp_path, clip_len=2)  # the root it should have been


def test_a_clip_folder_of_several_frame_series_is_refused_until_a_glob_picks_one(tmp_path):
    """mmaction2's rawframes folders hold RGB and optical-flow frames side by side: read whole,
    the clip played flow_y frames only, trained on without a word."""
    clip = tmp_path / "Run" / "v_01"
    clip.mkdir(parents=True)
    for t in range(1, 21):
        for prefix, value in (("img_", 10), ("flow_x_", 20), ("flow_y_", 30)):
            Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(clip / f"{prefix}{t:05d}.png")
    said = (
        r"v_01: frames of 3 series, flow_x_# \(20\), flow_y_# \(20\), img_# \(20\) .*-glob.*, "
        r"such as 'flow_x_\*' or 'flow_y_\*' or 'img_\*'"
    )
    with pytest.raises(ValueError, match=said):
        VideoFolder(tmp_path, clip_len=16)
    data = VideoFolder(tmp_path, clip_len=16, frame_glob="img_*")
    assert [p.name for p in data.samples[0][0][:2]] == ["img_00001.png", "img_00002.png"]
    torch.testing.assert_close(data[0][0], torch.full((3, 16, 4, 4), 10 / 255 - 0.5))
    with pytest.raises(ValueError, match=r"v_01 holds no frames named rgb_\* \(\.png"):
        VideoFolder(tmp_path, clip_len=16, frame_glob="rgb_*")
    with pytest.raises(ValueError, match=r"named IMG_\* \(names match case-sensitively: it"):
        VideoFolder(tmp_path, clip_len=16, frame_glob="IMG_*")


def test_a_frame_kept_in_two_formats_is_refused_and_unnumbered_names_may_mix(tmp_path):
    clip = tmp_path / "Run" / "v_01"
    _write_clip(clip, 3, "png")
    np.save(clip / "00001.npy", np.zeros((12, 10, 3), np.uint8))
    with pytest.raises(ValueError, match=r"frame '00001' is there in 2 files \(00001\.npy, 0"):
        VideoFolder(tmp_path, clip_len=3)
    assert len(VideoFolder(tmp_path, clip_len=3, frame_glob="*.png").samples[0][0]) == 3
    stray = tmp_path / "stray" / "Run" / "v_01"
    _write_clip(stray, 1, "npy")
    np.save(stray / "thumb.npy", np.zeros((4, 4, 3), np.uint8))
    said = r"frames of 2 series, # \(1\), thumb \(1\) .* such as '\[0-9\]\*', or keep"
    with pytest.raises(ValueError, match=said):
        VideoFolder(tmp_path / "stray", clip_len=1)
    assert len(VideoFolder(tmp_path / "stray", clip_len=1, frame_glob="[0-9]*")) == 1
    letters = tmp_path / "letters" / "Run" / "v_01"
    letters.mkdir(parents=True)
    for name in ("a", "b", "c"):
        np.save(letters / f"{name}.npy", np.zeros((4, 4, 3), np.uint8))
    assert len(VideoFolder(tmp_path / "letters", clip_len=3).samples[0][0]) == 3


@pytest.mark.parametrize(
    ("values", "scale"),
    [
        ((0.0, 1.02), 1.0),
        ((-0.01, 0.7), 1.0),
        ((-0.05, 1.05), 1.0),  # float32's -0.05 lies a little past -0.05
        ((0.0, 2.0), 255.0),
        ((-3.0, 260.0), 255.0),
    ],
)
def test_float_clips_take_a_resizes_overshoot(tmp_path, values, scale):
    clip = tmp_path / "Run" / "v_01"
    clip.mkdir(parents=True)
    for t, value in enumerate(values):
        np.save(clip / f"{t}.npy", np.full((4, 4, 3), value, np.float32))
    played = VideoFolder(tmp_path, clip_len=2)[0][0][0, :, 0, 0]
    expected = torch.tensor(values, dtype=torch.float32) / scale - 0.5
    torch.testing.assert_close(played, expected)


@pytest.mark.parametrize(
    ("values", "said"),
    [
        ((0.0, 1.5), r"span 0\.\.1\.5, neither \[0, 1\] nor \[0, 255\]"),
        ((-0.5, 0.5), r"span -0\.5\.\.0\.5, neither"),
        ((0.0, 300.0), r"span 0\.\.300, neither"),
        ((0.2, np.nan), r"1\.npy: the frame holds NaN or infinite values"),
        ((0.2, np.inf), r"1\.npy: the frame holds NaN or infinite values"),
    ],
)
def test_float_clips_outside_both_ranges_are_refused(tmp_path, values, said):
    """A [0, 1] clip with one pixel of 1.5 was read as [0, 255] (black); NaN trained on until
    the CLI blamed the learning rate."""
    clip = tmp_path / "Run" / "v_01"
    clip.mkdir(parents=True)
    for t, value in enumerate(values):
        np.save(clip / f"{t}.npy", np.full((4, 4, 3), value, np.float32))
    with pytest.raises(ValueError, match=said):
        VideoFolder(tmp_path, clip_len=2)[0]


def test_an_npz_archive_named_npy_names_its_file(tmp_path):
    clip = tmp_path / "Run" / "v_01"
    clip.mkdir(parents=True)
    with open(clip / "0.npy", "wb") as file:
        np.savez(file, frame=np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"0\.npy: cannot read the frame \(an \.npz archive"):
        VideoFolder(tmp_path, clip_len=1)[0]


@pytest.mark.parametrize(
    ("arguments", "said"),
    [
        ({"clip_len": True}, "clip_len must be a positive integer, got True"),
        ({"clip_len": 4.0}, "clip_len must be a positive integer, got 4.0"),
        ({"frame_size": (16,)}, r"frame_size must be \(H, W\), positive integers, got \(16,\)"),
        ({"frame_size": (0, 0)}, r"frame_size must be \(H, W\), positive integers"),
        ({"frame_glob": ""}, "frame_glob must be a glob of file names, got ''"),
        ({"frame_glob": "v_01/*"}, "frame_glob must be a glob of file names"),
    ],
)
def test_bad_video_folder_arguments_are_refused_up_front(tmp_path, arguments, said):
    _write_clip(tmp_path / "Run" / "v_01", 2, "npy")
    with pytest.raises(ValueError, match=said):
        VideoFolder(tmp_path, **arguments)


@pytest.mark.parametrize(
    ("arguments", "said"),
    [
        ({"seed": -1}, "seed must be a non-negative integer"),  # numpy: only at the first clip
        ({"seed": True}, "seed must be a non-negative integer"),
        ({"seed": 1.5}, "seed must be a non-negative integer"),
        ({"num_samples": 4.5}, "num_samples must be a positive integer, got 4.5"),
        ({"clip_shape": (8.5, 16, 16)}, r"clip_shape must be \(T, H, W\), positive integers"),
    ],
)
def test_bad_synthetic_arguments_are_refused_up_front(arguments, said):
    with pytest.raises(ValueError, match=said):
        SyntheticMotionVideos(**{"num_samples": 4, **arguments})
