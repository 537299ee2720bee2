"""Beat-synchronisation metrics (BCS, BHS, and a robust P/R/F1 mode) and the tracker check.

The beat tracker itself lives in :mod:`muvi.data.beats` (one tracker for the negatives, the
corpus and these metrics) and is re-exported here.

Metrics. Per clip, with a one-to-one matching of reference and generated beats within 100 ms
(maximum bipartite matching, :func:`match_beats`):

- literal mode, as the paper reports it: BCS = #generated / #reference and BHS = #matched /
  #reference, per clip, averaged over clips, in percent. BCS rewards *more* beats (a generator
  producing beats at twice the tempo scores BCS = 200 and an inflated BHS: every reference beat
  can find a partner among twice as many candidates), and both move with tempo-octave errors of
  the tracker;
- robust mode: precision = matched / generated, recall = matched / reference (= BHS),
  F1 = 2 matched / (generated + reference), both pooled over all beats of all clips and as a
  per-clip mean, plus the pooled beat-count ratio. Doubling the beats halves precision, so F1
  exposes what BCS/BHS reward.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from muvi.data.beats import BeatTrackerConfig, track_beats

__all__ = ["BeatTrackerConfig", "track_beats", "match_beats", "beat_counts", "f_measure", "octave_f_measure",
           "beat_metrics", "BEAT_METRICS", "check_tracker_on_midi"]

logger = logging.getLogger(__name__)


def match_beats(reference: np.ndarray, estimated: np.ndarray, tolerance: float = 0.1) -> np.ndarray:
    """One-to-one matching of beats within ``tolerance`` seconds (inclusive), maximising the count.

    Solved as an assignment problem: a pair within the tolerance is worth 1 plus a tie-break of
    less than ``1 / max(len)`` that prefers closer pairs, so the number of pairs is always the
    maximum bipartite matching (the same count as ``mir_eval.util.match_events``).

    Returns:
        int array ``(K, 2)`` of (reference index, estimated index), sorted by reference index.
    """
    from scipy.optimize import linear_sum_assignment

    ref = np.asarray(reference, dtype=np.float64).ravel()
    est = np.asarray(estimated, dtype=np.float64).ravel()
    if ref.size == 0 or est.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    dist = np.abs(ref[:, None] - est[None, :])
    hit = dist <= tolerance
    tie = 0.5 / max(ref.size, est.size)
    gain = np.where(hit, 1.0 + tie * (1.0 - dist / tolerance), 0.0)
    rows, cols = linear_sum_assignment(gain, maximize=True)
    keep = hit[rows, cols]
    return np.stack([rows[keep], cols[keep]], axis=1).astype(np.int64)


def beat_counts(reference: np.ndarray, generated: np.ndarray, tolerance: float = 0.1) -> tuple[int, int, int]:
    """``(#reference, #generated, #matched)`` for one clip."""
    return int(len(reference)), int(len(generated)), int(len(match_beats(reference, generated, tolerance)))


def f_measure(reference: np.ndarray, estimated: np.ndarray, tolerance: float = 0.07) -> float:
    """Beat F-measure with a ``tolerance`` window (mir_eval's definition, default 70 ms).

    Unlike ``mir_eval.beat.f_measure`` no beats before 5 s are discarded: our clips are short.
    Returns 0 when either list is empty (as mir_eval does).
    """
    if len(reference) == 0 or len(estimated) == 0:
        return 0.0
    matched = len(match_beats(reference, estimated, tolerance))
    return 2.0 * matched / (len(reference) + len(estimated))


def octave_f_measure(reference: np.ndarray, estimated: np.ndarray, tolerance: float = 0.07) -> float:
    """:func:`f_measure` allowing a tempo-octave error: the best against the reference grid, its
    doubled grid (half-beats added) and either half of it (every other beat)."""
    reference = np.asarray(reference, dtype=np.float64)
    doubled = np.sort(np.concatenate([reference, (reference[:-1] + reference[1:]) / 2]))
    return max(f_measure(g, estimated, tolerance) for g in (reference, doubled, reference[::2], reference[1::2]))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _nanmean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    valid = ~np.isnan(x)
    count = valid.sum(axis=axis)
    total = np.where(valid, x, 0.0).sum(axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


#: Beat metrics computed by :func:`beat_metrics`, all in percent.
BEAT_METRICS = ("bcs", "bhs", "beat_precision", "beat_recall", "beat_f1",
                "beat_precision_clip", "beat_recall_clip", "beat_f1_clip", "beat_count_ratio")


def beat_metrics(counts: np.ndarray) -> dict[str, np.ndarray]:
    """All beat metrics, in percent, from per-clip counts.

    Args:
        counts: ``(..., N, 3)`` array of (#reference, #generated, #matched) per clip; leading
            axes (e.g. bootstrap replicates) are kept, so one call scores all replicates.

    Literal (paper): ``bcs`` = mean over clips of generated/reference, ``bhs`` = mean over clips
    of matched/reference. Robust: ``beat_precision``/``beat_recall``/``beat_f1`` pooled over all
    beats, ``*_clip`` the per-clip means, ``beat_count_ratio`` = pooled generated/reference.
    A clip where a ratio is undefined (no reference or no generated beats) is left out of that
    per-clip mean; a metric undefined for every clip is NaN.
    """
    counts = np.asarray(counts, dtype=np.float64)
    ref, gen, hit = counts[..., 0], counts[..., 1], counts[..., 2]
    tot_ref, tot_gen, tot_hit = ref.sum(-1), gen.sum(-1), hit.sum(-1)
    out = {
        "bcs": _nanmean(_ratio(gen, ref)),
        "bhs": _nanmean(_ratio(hit, ref)),
        "beat_precision": _ratio(tot_hit, tot_gen),
        "beat_recall": _ratio(tot_hit, tot_ref),
        "beat_f1": _ratio(2 * tot_hit, tot_ref + tot_gen),
        "beat_precision_clip": _nanmean(_ratio(hit, gen)),
        "beat_recall_clip": _nanmean(_ratio(hit, ref)),
        "beat_f1_clip": _nanmean(_ratio(2 * hit, ref + gen)),
        "beat_count_ratio": _ratio(tot_gen, tot_ref),
    }
    return {k: 100.0 * v for k, v in out.items()}


def check_tracker_on_midi(pieces: Sequence, tempo_scales: Sequence[float] = (0.8, 1.0, 1.25),
                          duration: float = 20.0, sample_rate: int = 24000, tolerance: float = 0.07,
                          config: BeatTrackerConfig | None = None) -> list[dict]:
    """Tracker F-measure against the exact beat grid of MIDI pieces rendered at several tempi.

    ``pieces`` are anything :func:`muvi.data.midi.render_midi` accepts (corpus paths, PrettyMIDI).
    Each result row holds the piece, the tempo scale, the grid's tempo, the counts and the
    F-measure within ``tolerance`` (70 ms as in mir_eval), plus the F-measure allowing the
    tracker to run at double or half the grid's tempo (a tempo-octave error).
    """
    from muvi.data.midi import load_midi, render_midi

    rows = []
    for piece in pieces:
        pm = load_midi(piece)
        for scale in tempo_scales:
            audio, grid = render_midi(pm, sample_rate=sample_rate, tempo_scale=scale, duration=duration)
            beats = track_beats(audio, sample_rate, config)
            rows.append({
                "piece": pm.name or str(piece),
                "tempo_scale": float(scale),
                "grid_bpm": float(60.0 / np.median(np.diff(grid))) if len(grid) > 1 else float("nan"),
                "n_grid": int(len(grid)),
                "n_tracked": int(len(beats)),
                "f_measure": f_measure(grid, beats, tolerance),
                "f_measure_octave": octave_f_measure(grid, beats, tolerance),
            })
    return rows
