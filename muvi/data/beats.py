"""The beat tracker: one for the whole package (the negatives of contrastive training, the beat
metrics, the beats of recorded music in the corpus, the app's beat marks).

Ellis (2007) dynamic-programming beat tracking with a time-varying tempo (paper, section 4.1:
"sliding window 8 s, stride 512 frames, BPM range 30-240"), in our reading:

- audio resampled to 22 050 Hz; librosa's onset-strength envelope (median over mel bands) with
  a hop of 512 samples ("stride 512", 23 ms);
- tempo: the onset autocorrelation (librosa's tempogram) over 8 s windows ("sliding window
  8 s"). The *global* tempo is the lag that maximises the mean autocorrelation times librosa's
  default log-normal prior (centre 120 BPM, one octave) bounded to 30-240 BPM, refined to a
  fraction of a frame by a parabola through the peak; the *local* tempo, frame by frame, is the
  peak of the autocorrelation smoothed over 2 s and held within a tenth of an octave of the
  global one, also refined;
- the DP: each beat's best predecessor 1/2 to 2 periods back, penalised by
  ``tightness · log(lag / period)²`` (tightness 100, librosa's), over the onset envelope
  normalised by its standard deviation and smoothed as librosa does; weak leading and trailing
  beats are trimmed (librosa's rule); beat times are moved ``onset_latency`` earlier.

Why not ``librosa.beat.beat_track(bpm=<per-frame tempo>)``, which this module used before
(checked with ``recipes/check_tracker.py`` on MIDI renders with exact beat grids, the
validation set that chose the settings, and on the Frets on Fire songs' charted beats, real
recordings held out for the report):

- librosa rounds the period to whole frames: a 140 BPM song (18.46 frames) is tracked at 143.6
  BPM (18 frames), and the path drifts off the beat and jumps back, again and again; its
  per-frame tempo also jumps between tempo octaves from one window to the next. Here the
  period is fractional and the local tempo cannot leave the global tempo's octave;
- the onset envelope peaks about 38 ms after the note starts (measured on the MIDI renders:
  median offset of the tracked beats from the grid; the charted songs show 47 ms): with the
  70 ms window of the F-measure that lag alone cost a third of the hits at high tempo.

Beat F-measure at 70 ms, MIDI renders 60-220 BPM (24 clips) / Frets on Fire (46 windows of 30 s
from 8 songs): librosa's default ``beat_track`` 0.73 / 0.45; this tracker before (librosa's DP,
per-frame tempo) 0.72 / 0.43; now 0.87 / 0.59 (0.91 / 0.78 allowing a tempo-octave error). Set
by set and tempo band: ``python recipes/check_tracker.py --fof DIR``.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np

from muvi.config import Config

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class BeatTrackerConfig(Config):
    """Settings of the beat tracker (see the module docstring)."""

    analysis_sample_rate: int = 22050
    hop_length: int = 512
    window_seconds: float = 8.0
    min_bpm: float = 30.0
    max_bpm: float = 240.0
    start_bpm: float = 120.0
    std_bpm: float = 1.0            # the prior's deviation, in octaves
    tempo_band: float = 0.1         # the local tempo stays within this many octaves (deviation) of the global
    tempo_smoothing: float = 1.0    # seconds each side over which the local tempo is read
    tightness: float = 100.0
    trim: bool = True
    onset_latency: float = 0.038    # seconds the onset envelope lags the note starts


class _BoundedLogNormalPrior:
    """librosa's default tempo prior (log-normal in BPM), zero outside ``[min_bpm, max_bpm]``."""

    def __init__(self, start_bpm: float, std_bpm: float, min_bpm: float, max_bpm: float):
        self.start_bpm, self.std_bpm, self.min_bpm, self.max_bpm = start_bpm, std_bpm, min_bpm, max_bpm

    def logpdf(self, bpm: np.ndarray) -> np.ndarray:
        bpm = np.asarray(bpm, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = -0.5 * ((np.log2(bpm) - np.log2(self.start_bpm)) / self.std_bpm) ** 2
        return np.where((bpm >= self.min_bpm) & (bpm <= self.max_bpm) & np.isfinite(bpm), out, -np.inf)


def _as_mono(waveform) -> np.ndarray:
    if hasattr(waveform, "detach"):  # a torch tensor
        waveform = waveform.detach().cpu().numpy()
    y = np.asarray(waveform, dtype=np.float32)
    if y.ndim == 2:  # (channels, samples)
        y = y.mean(axis=0)
    if y.ndim != 1:
        raise ValueError(f"expected a waveform (N,) or (channels, N), got shape {y.shape}")
    return y


def onset_envelope(waveform, sample_rate: int, config: BeatTrackerConfig | None = None) -> np.ndarray:
    """librosa's onset strength (median over mel bands) at ``config.hop_length``."""
    import librosa

    config = config or BeatTrackerConfig()
    y = _as_mono(waveform)
    if sample_rate != config.analysis_sample_rate and y.size:
        y = librosa.resample(y, orig_sr=sample_rate, target_sr=config.analysis_sample_rate, res_type="soxr_hq")
    if y.size < 2 * config.hop_length:
        return np.zeros(0, dtype=np.float32)
    return librosa.onset.onset_strength(y=y, sr=config.analysis_sample_rate, hop_length=config.hop_length,
                                        aggregate=np.median)


def _refine(curve: np.ndarray, k: int) -> float:
    """The peak position of ``curve`` near index ``k``, by a parabola through three points,
    kept within half a bin of ``k``: where ``k`` is not a local maximum of ``curve`` (the
    prior chose it) the vertex can lie anywhere (a period of -776 frames was seen on a
    generated clip, and the beat search then divided by zero)."""
    if 1 <= k < len(curve) - 1:
        a, b, c = curve[k - 1], curve[k], curve[k + 1]
        d = a - 2 * b + c
        if d < 0:
            return k + float(np.clip(0.5 * (a - c) / d, -0.5, 0.5))
    return float(k)


def beat_periods(onset: np.ndarray, config: BeatTrackerConfig | None = None) -> np.ndarray:
    """The beat period (fractional frames) at each onset frame: the local tempo."""
    import librosa
    from scipy.ndimage import uniform_filter1d

    config = config or BeatTrackerConfig()
    fps = config.analysis_sample_rate / config.hop_length
    win = int(round(config.window_seconds * fps))
    gram = librosa.feature.tempogram(onset_envelope=onset, sr=config.analysis_sample_rate,
                                     hop_length=config.hop_length, win_length=win)  # (lags, frames)
    lags = np.arange(gram.shape[0], dtype=np.float64)
    with np.errstate(divide="ignore"):
        bpm = 60.0 * fps / lags
    prior = _BoundedLogNormalPrior(config.start_bpm, config.std_bpm, config.min_bpm, config.max_bpm).logpdf(bpm)
    mean = gram.mean(axis=1)
    best = int(np.argmax(np.log1p(1e6 * mean) + prior))
    period = _refine(mean, best)
    with np.errstate(divide="ignore", invalid="ignore"):
        near = -0.5 * (np.log2(lags / period) / config.tempo_band) ** 2
    near = np.where(np.isfinite(near) & np.isfinite(prior), near, -np.inf)
    half = max(0, int(round(config.tempo_smoothing * fps)))
    smooth = uniform_filter1d(gram, size=2 * half + 1, axis=1, mode="nearest") if half else gram
    peaks = np.argmax(np.log1p(1e6 * smooth) + near[:, None], axis=0)
    periods = np.array([_refine(smooth[:, t], int(k)) for t, k in enumerate(peaks)])
    if periods.size != onset.size:  # very short input: one period per onset frame regardless
        periods = np.resize(periods if periods.size else np.array([period]), onset.size)
    return periods


def _local_score(onset: np.ndarray, period: float) -> np.ndarray:
    """librosa's local score: the std-normalised envelope smoothed by a Gaussian of period/32."""
    normed = onset / (onset.std(ddof=1) + 1e-12)
    p = max(1, int(round(period)))
    window = np.exp(-0.5 * (np.arange(-p, p + 1) * 32.0 / p) ** 2)
    return np.convolve(normed, window, "full")[p:p + normed.size]  # "same", also for short input


def _dynamic_program(local: np.ndarray, periods: np.ndarray, tightness: float) -> np.ndarray:
    """Ellis's DP with a fractional, time-varying period; returns the beat frames."""
    n = len(local)
    cum = np.zeros(n)
    back = np.full(n, -1, dtype=np.int64)
    threshold, started = 0.01 * local.max(), False
    for i in range(n):
        p = periods[i]
        lo, hi = max(0, int(np.floor(i - 2 * p))), int(i - np.round(p / 2))
        best = -1
        if hi >= lo:
            candidates = np.arange(lo, hi + 1)
            score = cum[candidates] - tightness * np.log((i - candidates) / p) ** 2
            k = int(np.argmax(score))
            cum[i], best = local[i] + score[k], int(candidates[k])
        else:
            cum[i] = local[i]
        if started or local[i] >= threshold:
            back[i], started = best, True
    # the last beat: the last local maximum of the cumulative score above half their median
    peaks = np.flatnonzero((cum[1:-1] > cum[:-2]) & (cum[1:-1] >= cum[2:])) + 1
    if peaks.size == 0:
        return np.zeros(0, dtype=np.int64)
    tail = int(peaks[cum[peaks] >= 0.5 * np.median(cum[peaks])].max())
    beats = []
    while tail >= 0:
        beats.append(tail)
        tail = int(back[tail])
    return np.asarray(beats[::-1], dtype=np.int64)


def _trim(local: np.ndarray, beats: np.ndarray) -> np.ndarray:
    """librosa's rule: drop leading and trailing beats whose smoothed local score is under half
    the root-mean-square of the local score at the beats."""
    if beats.size == 0:
        return beats
    hann = np.hanning(5)[1:-1]
    smooth = np.convolve(local[beats], hann / hann.sum(), "same")
    threshold = 0.5 * np.sqrt(np.mean(smooth ** 2))
    keep = np.flatnonzero(smooth >= threshold)
    return beats[keep[0]:keep[-1] + 1] if keep.size else beats[:0]


def track_beats_and_tempo(waveform, sample_rate: int,
                          config: BeatTrackerConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(beat times in s, tempo in BPM at each beat) of a mono or ``(channels, N)`` waveform."""
    config = config or BeatTrackerConfig()
    onset = onset_envelope(waveform, sample_rate, config)
    if onset.size < 4 or not np.any(onset > 0):  # silence or too short: no beats
        return np.zeros(0), np.zeros(0)
    periods = beat_periods(onset, config)
    local = _local_score(onset, float(np.median(periods)))
    beats = _dynamic_program(local, periods, config.tightness)
    if config.trim:
        beats = _trim(local, beats)
    fps = config.analysis_sample_rate / config.hop_length
    times = beats / fps - config.onset_latency
    keep = times >= 0
    return times[keep].astype(np.float64), (60.0 * fps / periods[beats])[keep]


def track_beats(waveform, sample_rate: int, config: BeatTrackerConfig | None = None) -> np.ndarray:
    """Beat times in seconds (float64, sorted) of a mono or ``(channels, samples)`` waveform."""
    return track_beats_and_tempo(waveform, sample_rate, config)[0]
