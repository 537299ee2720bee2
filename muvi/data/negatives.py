"""The constructed negatives of MuVi's contrastive pre-training (paper section 3.2).

Besides the other pairs of a batch, every positive (video, music) pair gets music made
*asynchronous* with its own video, so the adaptor must learn rhythm rather than timbre:

- temporal shift: the clip's music moved in time by a whole number of video frames that is
  neither a whole-beat multiple (which a steady tempo would hide) nor near a half-beat multiple
  (which would line beats up with off-beats: "backbeat sync");
- random replacement: an inner stretch of the music replaced by another pair's music, 5% of the
  length left untouched at both ends, equal-power crossfades at the two joins;
- silence, where neither can be built (too short to track beats, no valid shift, no other music
  long enough).

Decisions (the paper's formulas were lost from its text; these are ours):
- The beat cycle ``T_b`` comes from the *minimum* tempo along the clip (the paper's wording), read
  from the local tempo at each beat of the package's tracker (:mod:`muvi.data.beats`: Ellis's
  dynamic programme with a time-varying, fractional beat period, 8 s autocorrelation windows,
  30-240 BPM).
- Excluded zones: a shift ``s`` is valid iff its distance to the nearest multiple of ``T_b / 2`` is
  more than ``zone * T_b`` (default ``zone = 1/8``): the shift's beat phase then lies in
  (1/8, 3/8) or (5/8, 7/8), at least an eighth of a beat away from both on-beat and off-beat
  alignment. Shifts go either way, with ``0 < |s| < num_frames`` and at most ``max_beats``
  (default 4) beats, so that a small error in the estimated tempo cannot add up, over many
  beats, to a shift that lands on a beat after all.
- The shift is circular inside the clip (the clip is all the music a training item has, and the
  negative must carry the same content as the positive, only out of sync). The wrap-around seam is
  softened by a short raised-cosine dip (default 10 ms each side) so no click marks it.
- Replacement lengths default to 20-50% of the clip; other music is read from a random position
  of the other clip; crossfades (default 100 ms) lie inside the replaced segment, so the 5%
  margins stay bit-exact.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional

import numpy as np
import torch

from muvi.data.beats import BeatTrackerConfig, track_beats_and_tempo

logger = logging.getLogger(__name__)

KINDS = ("shift", "replace")


def _as_numpy(waveform) -> np.ndarray:
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().cpu().numpy()
    wave = np.asarray(waveform, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"expected a mono waveform (N,), got shape {wave.shape}")
    return wave


def track_beats(waveform, sample_rate: int, *, min_bpm: float = 30.0,
                max_bpm: float = 240.0) -> tuple[np.ndarray, np.ndarray]:
    """(beat times in s, BPM at each beat) from the package's tracker (:mod:`muvi.data.beats`)."""
    wave = _as_numpy(waveform)
    return track_beats_and_tempo(wave, sample_rate, BeatTrackerConfig(min_bpm=min_bpm, max_bpm=max_bpm))


def beat_cycle_frames(waveform, sample_rate: int, fps: float, *, min_beats: int = 3,
                      min_bpm: float = 30.0, max_bpm: float = 240.0) -> Optional[float]:
    """Beat cycle ``T_b`` in video frames (may be fractional) from the clip's minimum tempo.

    Returns None where the clip gives too few beats to trust (short, silent or beatless).
    """
    times, bpm = track_beats(waveform, sample_rate, min_bpm=min_bpm, max_bpm=max_bpm)
    if len(times) < min_beats or not np.all(np.isfinite(bpm)) or bpm.min() <= 0:
        return None
    return float(fps * 60.0 / bpm.min())


def valid_shifts(num_frames: int, beat_cycle: float, *, zone: float = 0.125,
                 max_beats: Optional[float] = 4.0) -> np.ndarray:
    """All integer shifts ``s`` (frames, both signs) with ``0 < |s| < num_frames`` and
    ``|s| <= max_beats * beat_cycle`` whose distance to the nearest multiple of
    ``beat_cycle / 2`` exceeds ``zone * beat_cycle``. Sorted; may be empty.

    ``max_beats`` bounds the shift because an error in the estimated cycle grows with every
    beat the shift spans (a 1% tempo error puts a 12-beat shift 0.12 beats off, onto the zones
    it was meant to avoid) and real tempos drift; None allows the whole clip.
    """
    if not 0 <= zone < 0.25:
        raise ValueError(f"zone must lie in [0, 0.25), got {zone}")
    if not beat_cycle or not beat_cycle > 0:
        return np.zeros(0, dtype=np.int64)
    s = np.arange(1, max(1, int(num_frames)), dtype=np.int64)
    if max_beats is not None:
        s = s[s <= max_beats * beat_cycle]
    half = beat_cycle / 2.0
    distance = np.abs(s - half * np.round(s / half))
    s = s[distance > zone * beat_cycle]
    return np.concatenate([-s[::-1], s])


def temporal_shift_negative(music: torch.Tensor, shift: int, seam_samples: int = 240) -> torch.Tensor:
    """``music`` (…, N) delayed circularly by ``shift`` samples (advanced when negative).

    ``out[n] = music[(n - shift) mod N]`` except within ``seam_samples`` of the wrap-around
    seam, where a raised-cosine dip to zero and back hides the splice.
    """
    n = music.shape[-1]
    out = torch.roll(music, shifts=int(shift), dims=-1)
    seam = int(shift) % n
    m = min(int(seam_samples), seam, n - seam)
    if seam and m > 0:
        ramp = 0.5 - 0.5 * torch.cos(torch.pi * (torch.arange(m, dtype=music.dtype, device=music.device) + 0.5) / m)
        out[..., seam - m:seam] = out[..., seam - m:seam] * ramp.flip(0)
        out[..., seam:seam + m] = out[..., seam:seam + m] * ramp
    return out


def equal_power_gains(n: int, *, dtype=torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fade_out, fade_in) = (cos θ, sin θ), θ rising across ``n`` samples from 0 to π/2
    (sampled at sample centres): the squared gains sum to 1 at every sample."""
    theta = (torch.arange(n, dtype=torch.float64) + 0.5) * (math.pi / 2) / max(n, 1)
    return torch.cos(theta).to(dtype=dtype, device=device), torch.sin(theta).to(dtype=dtype, device=device)


def random_replacement_negative(music: torch.Tensor, other_music: torch.Tensor, rng: np.random.Generator,
                                sample_rate: int, *, min_frac: float = 0.2, max_frac: float = 0.5,
                                margin: float = 0.05, crossfade_seconds: float = 0.1,
                                ) -> Optional[tuple[torch.Tensor, tuple[int, int]]]:
    """Replace ``music[a:b]`` (mono (N,)) by a stretch of ``other_music`` with equal-power joins.

    ``b - a`` lies in ``[min_frac, max_frac] * N``; ``[0, margin*N)`` and ``[(1-margin)*N, N)``
    stay untouched. The crossfades of ``crossfade_seconds`` lie inside ``[a, b)``. Returns
    ``(waveform, (a, b))``, or None where the clip or the other music is too short.
    """
    if not 0 < min_frac <= max_frac < 1 or not 0 <= margin < 0.5:
        raise ValueError(f"need 0 < min_frac <= max_frac < 1 and 0 <= margin < 0.5, "
                         f"got {min_frac}, {max_frac}, {margin}")
    n = music.shape[-1]
    if other_music is None or music.dim() != 1 or other_music.dim() != 1:
        return None
    fade = max(1, int(round(crossfade_seconds * sample_rate)))
    lo, hi = math.ceil(margin * n), math.floor((1.0 - margin) * n)
    shortest = max(math.ceil(min_frac * n), 2 * fade + 1)
    longest = min(math.floor(max_frac * n), hi - lo, other_music.shape[-1])
    if longest < shortest:
        return None
    length = int(rng.integers(shortest, longest + 1))
    a = int(rng.integers(lo, hi - length + 1))
    b = a + length
    o = int(rng.integers(0, other_music.shape[-1] - length + 1))
    insert = other_music[o:o + length].to(music.dtype)
    fade_out, fade_in = equal_power_gains(fade, dtype=music.dtype, device=music.device)
    out = music.clone()
    out[a:a + fade] = fade_out * music[a:a + fade] + fade_in * insert[:fade]
    out[a + fade:b - fade] = insert[fade:length - fade]
    out[b - fade:b] = fade_out * insert[length - fade:] + fade_in * music[b - fade:b]
    return out, (a, b)


@dataclasses.dataclass
class NegativeSample:
    """A constructed negative: its music and how it was made."""

    waveform: torch.Tensor          # same shape as the positive's music
    kind: str                       # "shift", "replace" or "silence"
    shift_frames: Optional[int] = None
    segment: Optional[tuple[int, int]] = None  # replaced samples [a, b)


def make_negative(music: torch.Tensor, sample_rate: int, fps: float, other_music: Optional[torch.Tensor],
                  rng: np.random.Generator, kind: str = "any", *, zone: float = 0.125,
                  max_beats: Optional[float] = 4.0,
                  min_frac: float = 0.2, max_frac: float = 0.5, margin: float = 0.05,
                  crossfade_seconds: float = 0.1, seam_seconds: float = 0.01,
                  beat_cycle: Optional[float] = None) -> NegativeSample:
    """Build one negative for mono ``music`` (N,): ``kind`` is "shift", "replace" or "any"
    (a random one of those that can be built). Silence where the asked kind(s) cannot be built.

    ``beat_cycle`` (frames) skips beat tracking when the caller already knows it.
    """
    if kind not in KINDS + ("any",):
        raise ValueError(f"kind must be one of {KINDS + ('any',)}, got {kind!r}")
    candidates = list(KINDS) if kind == "any" else [kind]
    rng.shuffle(candidates)
    for choice in candidates:
        if choice == "shift":
            cycle = beat_cycle if beat_cycle is not None else beat_cycle_frames(music, sample_rate, fps)
            num_frames = int(round(music.shape[-1] * fps / sample_rate))
            shifts = valid_shifts(num_frames, cycle, zone=zone, max_beats=max_beats) if cycle else np.zeros(0)
            if len(shifts):
                s = int(rng.choice(shifts))
                wave = temporal_shift_negative(music, int(round(s * sample_rate / fps)),
                                               seam_samples=int(round(seam_seconds * sample_rate)))
                return NegativeSample(wave, "shift", shift_frames=s)
        else:
            built = random_replacement_negative(music, other_music, rng, sample_rate, min_frac=min_frac,
                                                max_frac=max_frac, margin=margin,
                                                crossfade_seconds=crossfade_seconds)
            if built is not None:
                return NegativeSample(built[0], "replace", segment=built[1])
    logger.debug("no %s negative possible for a clip of %d samples; using silence", kind, music.shape[-1])
    return NegativeSample(torch.zeros_like(music), "silence")
