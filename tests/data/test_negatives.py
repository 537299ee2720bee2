"""Contrastive negatives on real music with a known beat grid.

Music: Bach chorales from the music21 corpus rendered with a General-MIDI soundfont by
``muvi.data.midi.render_midi``, which also returns the exact beat times from the MIDI tempo map.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from muvi.data.negatives import (
    beat_cycle_frames,
    equal_power_gains,
    make_negative,
    random_replacement_negative,
    temporal_shift_negative,
    valid_shifts,
)

SR, FPS = 24000, 10.0
# (corpus file, beats per minute of its MIDI rendering): 120 BPM gives a whole 5-frame cycle,
# 76 and 96 BPM fractional cycles (7.89 and 6.25 frames).
PIECES = {"bwv101.7.mxl": 120.0, "bwv1.6.mxl": 76.0, "bwv112.5.mxl": 96.0}


@pytest.fixture(scope="module")
def chorales() -> dict[str, tuple[torch.Tensor, float]]:
    """name -> (12 s mono waveform, true beat cycle in video frames)."""
    from muvi.data.midi import corpus_midi_files, render_midi

    files = {p.name: p for p in corpus_midi_files("bach")}
    out = {}
    for name, bpm in PIECES.items():
        wave, beats = render_midi(files[name], SR, duration=12.0)
        cycle = float(np.median(np.diff(beats))) * FPS
        assert cycle == pytest.approx(FPS * 60.0 / bpm, rel=1e-3)  # the grid we think it has
        out[name] = (torch.from_numpy(wave), cycle)
    return out


def _phase_distance(shifts: np.ndarray, cycle: float) -> np.ndarray:
    """Distance, in beats, from each shift's beat phase to the nearest of 0, 1/2 and 1."""
    phase = np.mod(np.abs(shifts) / cycle, 1.0)
    return np.minimum.reduce([phase, np.abs(phase - 0.5), 1.0 - phase])


def test_beat_cycle_matches_the_known_grid(chorales):
    for name, (wave, cycle) in chorales.items():
        estimate = beat_cycle_frames(wave, SR, FPS)
        assert estimate == pytest.approx(cycle, rel=0.02), name


def test_shifts_avoid_whole_beats_and_half_beat_zones(chorales):
    zone = 0.125
    for name, (wave, cycle) in chorales.items():
        estimate = beat_cycle_frames(wave, SR, FPS)
        num_frames = round(wave.shape[0] * FPS / SR)
        shifts = valid_shifts(num_frames, estimate, zone=zone)
        assert len(shifts) >= 12 and np.array_equal(shifts, -shifts[::-1])
        assert np.all((np.abs(shifts) > 0) & (np.abs(shifts) < num_frames))
        assert np.abs(shifts).max() <= 4 * estimate  # the default bound of 4 beats
        # Exactly the integers whose beat phase lies in (1/8, 3/8) or (5/8, 7/8) of the cycle.
        every = np.arange(-num_frames + 1, num_frames)
        every = every[(every != 0) & (np.abs(every) <= 4 * estimate)]
        expected = every[_phase_distance(every, estimate) > zone]
        assert np.array_equal(shifts, expected), name
        # And on the TRUE grid: never a whole beat, never near a half beat (a 1% tempo error
        # over 4 beats moves the phase by at most 0.04).
        assert _phase_distance(shifts, cycle).min() > zone - 0.04, name
        unbounded = valid_shifts(num_frames, estimate, zone=zone, max_beats=None)
        assert unbounded.max() == num_frames - 1 or _phase_distance(np.array([num_frames - 1]), estimate)[0] <= zone
        assert not np.any(np.isclose(np.mod(shifts, cycle), 0.0) | np.isclose(np.mod(shifts, cycle), cycle))
    # 120 BPM at 10 fps: 5-frame beats; only 1 and 4 frames (mod 5) are far from beats and off-beats.
    assert set(np.mod(valid_shifts(40, 5.0), 5)) == {1, 4}
    assert len(valid_shifts(40, 2.0)) == 0  # 2-frame beats: every integer shift is a beat or half-beat
    with pytest.raises(ValueError):
        valid_shifts(40, 5.0, zone=0.3)


def test_temporal_shift_is_circular_with_a_soft_seam(chorales):
    wave, _ = chorales["bwv101.7.mxl"]
    shift, seam = 3 * 2400, 240
    out = temporal_shift_negative(wave, shift, seam_samples=seam)
    rolled = torch.cat([wave[-shift:], wave[:-shift]])
    assert out.shape == wave.shape
    torch.testing.assert_close(out[:shift - seam], rolled[:shift - seam], rtol=0, atol=0)
    torch.testing.assert_close(out[shift + seam:], rolled[shift + seam:], rtol=0, atol=0)
    assert out[shift - 2:shift + 2].abs().max() < 0.02 * wave.abs().max()  # dip at the seam
    back = temporal_shift_negative(wave, -shift, seam_samples=0)
    torch.testing.assert_close(back, torch.cat([wave[shift:], wave[:shift]]), rtol=0, atol=0)


def test_equal_power_gains():
    fade_out, fade_in = equal_power_gains(2400, dtype=torch.float64)
    torch.testing.assert_close(fade_out ** 2 + fade_in ** 2, torch.ones(2400, dtype=torch.float64))
    assert fade_out[0] > 0.999 and fade_in[-1] > 0.999 and torch.all(torch.diff(fade_in) > 0)
    torch.testing.assert_close(fade_out, fade_in.flip(0))


def test_replacement_margins_lengths_and_joins(chorales):
    music, _ = chorales["bwv101.7.mxl"]
    other, _ = chorales["bwv1.6.mxl"]
    n, fade = music.shape[0], 2400
    for seed in range(20):
        rng = np.random.default_rng(seed)
        out, (a, b) = random_replacement_negative(music, other, rng, SR, min_frac=0.2, max_frac=0.5,
                                                  margin=0.05, crossfade_seconds=0.1)
        assert math.ceil(0.2 * n) <= b - a <= math.floor(0.5 * n)
        assert a >= 0.05 * n and b <= 0.95 * n
        assert torch.equal(out[:a], music[:a]) and torch.equal(out[b:], music[b:])
        # The core is a contiguous stretch of the other music, and the joins use the gains.
        core = out[a + fade:b - fade]
        starts = [int(o) for o in torch.nonzero(other == core[0]).flatten()
                  if torch.equal(other[o:o + core.shape[0]], core)]
        assert len(starts) == 1
        insert = other[starts[0] - fade:starts[0] - fade + (b - a)]
        assert torch.equal(core, insert[fade:-fade])
        g_out, g_in = equal_power_gains(fade)
        torch.testing.assert_close(out[a:a + fade], g_out * music[a:a + fade] + g_in * insert[:fade])
        torch.testing.assert_close(out[b - fade:b], g_out * insert[-fade:] + g_in * music[b - fade:b])


def test_crossfade_keeps_power_across_a_join(chorales):
    """Two different pieces scaled to equal power over the join: the output keeps that power,
    where a linear crossfade would dip to about 2/3 of it."""
    x, _ = chorales["bwv101.7.mxl"]
    y, _ = chorales["bwv112.5.mxl"]
    fade, length = SR, int(0.4 * x.shape[0])
    ratios, linear = [], []
    for seed in range(8):
        # The segment position depends only on lengths and the seed, so a first call finds it.
        probe = y[:length]  # other music exactly one segment long: it is inserted from its start
        _, (a, _) = random_replacement_negative(x, probe, np.random.default_rng(seed), SR,
                                                min_frac=0.4, max_frac=0.4, crossfade_seconds=1.0)
        xs = x / x[a:a + fade].pow(2).mean().sqrt()
        ys = probe / probe[:fade].pow(2).mean().sqrt()
        out, (a2, _) = random_replacement_negative(xs, ys, np.random.default_rng(seed), SR,
                                                   min_frac=0.4, max_frac=0.4, crossfade_seconds=1.0)
        assert a2 == a
        ratios.append(float(out[a:a + fade].pow(2).mean()))
        t = (torch.arange(fade) + 0.5) / fade
        linear.append(float(((1 - t) * xs[a:a + fade] + t * ys[:fade]).pow(2).mean()))
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.05) and max(abs(r - 1) for r in ratios) < 0.15
    assert np.mean(linear) == pytest.approx(2 / 3, abs=0.07)


def test_make_negative_kinds_and_silence_fallback(chorales):
    music, cycle = chorales["bwv101.7.mxl"]
    other, _ = chorales["bwv1.6.mxl"]
    shifted = make_negative(music, SR, FPS, other, np.random.default_rng(0), kind="shift")
    assert shifted.kind == "shift" and _phase_distance(np.array([shifted.shift_frames]), cycle)[0] > 0.1
    rolled = torch.roll(music, shifted.shift_frames * 2400)
    seam = (shifted.shift_frames * 2400) % music.shape[0]
    offset = torch.arange(music.shape[0]) - seam
    away = (offset < -240) | (offset >= 240)  # outside the default 10 ms dip on each side of the seam
    assert torch.equal(shifted.waveform[away], rolled[away])
    replaced = make_negative(music, SR, FPS, other, np.random.default_rng(0), kind="replace")
    assert replaced.kind == "replace" and replaced.segment is not None
    kinds = {make_negative(music, SR, FPS, other, np.random.default_rng(s), kind="any",
                           beat_cycle=cycle).kind for s in range(12)}
    assert kinds == {"shift", "replace"}
    # Same seed, same negative.
    again = make_negative(music, SR, FPS, other, np.random.default_rng(0), kind="replace")
    assert torch.equal(again.waveform, replaced.waveform)
    # Too short to track beats and no other music: silence.
    short = music[: int(0.4 * SR)]
    silent = make_negative(short, SR, FPS, None, np.random.default_rng(0), kind="any")
    assert silent.kind == "silence" and silent.waveform.shape == short.shape and not silent.waveform.any()
    # Other music too short to fill the replaced segment: silence for that kind.
    fallback = make_negative(music, SR, FPS, other[:SR], np.random.default_rng(0), kind="replace")
    assert fallback.kind == "silence"
    assert beat_cycle_frames(torch.zeros(SR * 4), SR, FPS) is None
    # Beats too fast for any whole-frame shift at 10 fps (2-frame cycle, 300 BPM) and no other music.
    fast = make_negative(music, SR, FPS, None, np.random.default_rng(0), kind="any", beat_cycle=2.0)
    assert fast.kind == "silence"
