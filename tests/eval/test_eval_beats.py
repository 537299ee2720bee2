"""Beat tracking and beat metrics on real music rendered from MIDI, where the beat grid is exact.

Music: Bach chorales from the music21 corpus (public-domain compositions), rendered with the
TimGM6mb General-MIDI soundfont shipped in pretty_midi, via tinysoundfont (see muvi.data.midi).
"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tinysoundfont")
pytest.importorskip("music21")
pytest.importorskip("pretty_midi")

from muvi.data.midi import corpus_midi_files, load_midi, render_midi  # noqa: E402
from muvi.eval.beats import (  # noqa: E402
    BeatTrackerConfig,
    beat_counts,
    beat_metrics,
    check_tracker_on_midi,
    f_measure,
    match_beats,
    track_beats,
)

SR = 24000
# Steady chorales notated at 120 BPM; at tempo_scale 0.6 they play at 72 BPM (so doubling
# stays inside the tracker's 30-240 BPM range).
PIECES = ("bwv154.8.mxl", "bwv24.6.mxl", "bwv3.6.mxl")


@pytest.fixture(scope="module")
def pieces():
    files = {p.name: p for p in corpus_midi_files("bach")}
    return [load_midi(files[name]) for name in PIECES]


@pytest.fixture(scope="module")
def clips(pieces):
    """(reference 72 BPM, its grid, tempo-doubled 144 BPM) renders of 10 s per piece."""
    out = []
    for piece in pieces:
        ref, grid = render_midi(piece, sample_rate=SR, tempo_scale=0.6, duration=10.0)
        fast, _ = render_midi(piece, sample_rate=SR, tempo_scale=1.2, duration=10.0)
        out.append((ref, grid, fast))
    return out


def test_render_midi_is_real_music_with_exact_grid(pieces):
    audio, beats = render_midi(pieces[0], sample_rate=SR, duration=4.0)
    assert audio.dtype == np.float32 and audio.shape == (4 * SR,)
    assert np.abs(audio).max() == pytest.approx(0.9, rel=1e-5)
    # The grid is the MIDI's own: 120 BPM notated, so a beat every 0.5 s from 0.
    np.testing.assert_allclose(beats, np.arange(8) * 0.5, atol=1e-6)
    fast, fast_beats = render_midi(pieces[0], sample_rate=SR, duration=4.0, tempo_scale=2.0)
    np.testing.assert_allclose(fast_beats, np.arange(16) * 0.25, atol=1e-6)
    # Deterministic, and the rendered energy follows the notes (onsets near beats).
    again, _ = render_midi(pieces[0], sample_rate=SR, duration=4.0)
    np.testing.assert_array_equal(audio, again)


def test_match_beats_is_maximum_matching():
    # Greedy closest-first pairs 0.10 with 0.09 and then cannot place 0.0; the optimum has two pairs.
    pairs = match_beats(np.array([0.0, 0.10]), np.array([0.09, 0.19]), tolerance=0.1)
    assert pairs.tolist() == [[0, 0], [1, 1]]
    assert match_beats(np.array([]), np.array([1.0])).shape == (0, 2)
    assert len(match_beats(np.array([1.0]), np.array([1.0, 1.05]))) == 1  # one-to-one


def test_match_beats_count_equals_mir_eval():
    mir_eval = pytest.importorskip("mir_eval")
    rng = np.random.default_rng(0)
    for _ in range(50):
        ref = np.sort(rng.uniform(0, 10, rng.integers(0, 30)))
        est = np.sort(rng.uniform(0, 10, rng.integers(0, 30)))
        ours = match_beats(ref, est, 0.1)
        assert len(ours) == len(mir_eval.util.match_events(ref, est, 0.1))
        assert np.all(np.abs(ref[ours[:, 0]] - est[ours[:, 1]]) <= 0.1)
        assert len(set(ours[:, 0])) == len(ours) and len(set(ours[:, 1])) == len(ours)


def test_f_measure_equals_mir_eval():
    mir_eval = pytest.importorskip("mir_eval")
    rng = np.random.default_rng(1)
    ref = np.arange(6.0, 20.0, 0.5)
    kept = ref[rng.random(len(ref)) < 0.8]
    est = np.sort(np.concatenate([kept + rng.normal(0, 0.05, len(kept)), rng.uniform(6, 20, 5)]))
    # Beats after 5 s, so mir_eval's trimming of the first 5 s changes nothing.
    assert f_measure(ref, est) == pytest.approx(mir_eval.beat.f_measure(ref, est), abs=1e-12)


def test_beat_metric_definitions():
    counts = np.array([[10, 20, 10], [10, 10, 5]])  # (reference, generated, matched)
    m = beat_metrics(counts)
    assert m["bcs"] == pytest.approx(150.0)  # mean(200, 100)
    assert m["bhs"] == pytest.approx(75.0)  # mean(100, 50)
    assert m["beat_precision"] == pytest.approx(50.0)  # 15 / 30
    assert m["beat_recall"] == pytest.approx(75.0)  # 15 / 20
    assert m["beat_f1"] == pytest.approx(60.0)  # 30 / 50
    assert m["beat_f1_clip"] == pytest.approx(100 * (20 / 30 + 10 / 20) / 2)
    assert m["beat_count_ratio"] == pytest.approx(150.0)
    # A clip without reference beats is left out of the per-clip means, not counted as 0.
    m = beat_metrics(np.array([[10, 10, 10], [0, 5, 0]]))
    assert m["bhs"] == pytest.approx(100.0) and m["beat_precision"] == pytest.approx(100 * 10 / 15)
    # Leading axes (bootstrap replicates) are kept.
    assert beat_metrics(np.stack([counts, counts[::-1]]))["bcs"].shape == (2,)


def test_tracker_f_measure_against_midi_grid(pieces):
    rows = check_tracker_on_midi(pieces[:2], tempo_scales=(0.8, 1.0, 1.25), duration=12.0, sample_rate=SR)
    scores = [r["f_measure"] for r in rows]
    # Measured here: 0.89-0.96 (mean 0.93 over 8 chorales x 3 tempi of 20 s; see the report).
    assert min(scores) > 0.75 and np.mean(scores) > 0.85, rows


@pytest.mark.parametrize("bpm", [140.0, 175.0])
def test_tracker_neither_lags_nor_drifts_at_fast_tempi(pieces, bpm):
    """Pieces notated at 120 BPM played at 140 BPM (a period of 18.46 onset frames, which a
    whole-frame period tracks at 143.6 BPM and drifts) and 175 BPM: the tracked beats lie on
    the grid, not behind it. Before muvi.data.beats (librosa's rounded period, no latency
    compensation) the beats came ~38 ms late."""
    scores, offsets = [], []
    for piece in pieces:
        audio, grid = render_midi(piece, sample_rate=SR, tempo_scale=bpm / 120.0, duration=15.0)
        beats = track_beats(audio, SR)
        scores.append(f_measure(grid, beats))
        nearest = grid[np.abs(grid[None, :] - beats[:, None]).argmin(axis=1)]
        offsets.append(np.median(beats - nearest))
    assert min(scores) > 0.9, scores
    assert np.abs(offsets).max() < 0.015, offsets


def test_identical_music_scores_bhs_100(clips):
    counts = []
    for ref, _, _ in clips:
        beats = track_beats(ref, SR)
        assert len(beats) >= 8
        counts.append(beat_counts(beats, track_beats(ref.copy(), SR)))
    m = beat_metrics(np.array(counts))
    assert m["bhs"] == 100.0 and m["bcs"] == 100.0 and m["beat_f1"] == 100.0


def test_half_beat_shift_lowers_bhs(clips):
    counts = []
    for ref, grid, _ in clips:
        half = int(round(np.median(np.diff(grid)) / 2 * SR))  # 417 ms at 72 BPM, beyond 100 ms
        shifted = np.concatenate([np.zeros(half, np.float32), ref])[:len(ref)]
        counts.append(beat_counts(track_beats(ref, SR), track_beats(shifted, SR)))
    m = beat_metrics(np.array(counts))
    assert m["bhs"] < 30.0, counts
    assert 80.0 < m["bcs"] < 120.0  # same tempo, so the count is not what changed


def test_tempo_doubled_output_separates_literal_and_robust(clips):
    counts = [beat_counts(track_beats(ref, SR), track_beats(fast, SR)) for ref, _, fast in clips]
    m = beat_metrics(np.array(counts))
    # Literal: twice the beats -> BCS ~ 200, and BHS stays high (every reference beat finds a partner).
    assert 170.0 < m["bcs"] < 240.0, counts
    assert m["bhs"] > 85.0, counts
    # Robust: half of the generated beats are spurious -> precision ~ 50, F1 well below BHS.
    assert 35.0 < m["beat_precision"] < 65.0, counts
    assert m["beat_f1"] < m["bhs"] - 20.0


def test_tracker_config_reads_paper_settings():
    c = BeatTrackerConfig()
    assert (c.hop_length, c.window_seconds, c.min_bpm, c.max_bpm) == (512, 8.0, 30.0, 240.0)
    assert BeatTrackerConfig.from_dict(c.to_dict()) == c
    silence = np.zeros(SR * 3, np.float32)
    assert track_beats(silence, SR).size == 0


@pytest.mark.slow  # ~40 s: music21 parses the drawn scores
def test_check_tracker_recipe_reports_each_band(monkeypatch, capsys):
    import runpy
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "recipes" / "check_tracker.py"
    # muvi's tracker only: librosa's beat_track would cost ~40 s of numba compile on a fresh machine
    monkeypatch.setattr("sys.argv", [str(recipe), "--midi-clips", "2", "--seconds", "6", "--only", "muvi"])
    runpy.run_path(str(recipe), run_name="__main__")
    out = capsys.readouterr().out
    assert "MIDI renders: 2 windows" in out and "muvi:" in out and "all " in out


def test_refined_period_stays_within_half_a_bin_of_the_chosen_lag():
    """The prior can choose a lag that is not a local maximum of the tempogram; a parabola
    through a nearly straight run of three points then puts its vertex far away (a period of
    -776 frames on a generated clip, and the beat search divided by zero)."""
    from muvi.data.beats import _refine

    rising = np.array([0.0, 1.0, 2.0 - 1e-9, 3.0])  # k = 1: d = -1e-9, vertex at ~5e8
    assert 0.5 <= _refine(rising, 1) <= 1.5
    peak = np.array([0.0, 2.0, 3.0, 1.0])            # a true maximum at k = 2: vertex inside
    assert _refine(peak, 2) == pytest.approx(2.0 + 0.5 * (2.0 - 1.0) / (2.0 - 6.0 + 1.0))
