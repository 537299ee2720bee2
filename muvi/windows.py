"""Music of any length from a model trained on windows of a fixed length.

A video longer than the model's window is scored window by window. Each window after the
first is conditioned on its own stretch of video and continues the music before it by
in-context learning: the previous window's last ``context`` latent frames are its clean prefix
(the paper's partial denoising, section 4.3, as a style prompt is given), and it generates
``window - context`` new frames. The first ``crossfade`` of those repeat the end of the previous
window, so the two waveforms overlap there and are joined with an equal-power crossfade
(:func:`crossfade_into`: the level neither dips nor bumps, whether the two versions of those
seconds are unrelated or, as they mostly are, nearly the same).

Times are in latent frames; :func:`plan_windows` lays the windows out and
:func:`crossfade_into` joins one window's waveform into the output.

    window 0   [──────────── W ────────────)
    window 1                  [─ C ─)[X)[──── W − C − X ────)
                              context  └ overlap, crossfaded
"""
from __future__ import annotations

import dataclasses
import math

import torch


@dataclasses.dataclass(frozen=True)
class Window:
    """One window: it generates latent frames ``[start, stop)``, the first ``overlap`` of them
    also made by the window before; its clean prefix is the previous output's frames
    ``[start - context, start)``."""

    index: int
    start: int
    stop: int
    context: int = 0
    overlap: int = 0

    @property
    def frames(self) -> int:
        return self.stop - self.start


def plan_windows(total: int, window: int, context: int, crossfade: int) -> list[Window]:
    """Windows covering ``total`` latent frames: one window of ``min(total, window)`` frames
    when it fits, else the first of ``window`` frames and each next one starting ``crossfade``
    before the previous end, with ``context`` frames of prefix (``context + frames <= window``).

    Each window after the first adds ``window - context - crossfade`` frames (the last one what
    is left), so ``ceil((total - window) / (window - context - crossfade)) + 1`` windows."""
    if total < 1:
        raise ValueError(f"nothing to generate ({total} latent frames)")
    if window < 1 or context < 0 or crossfade < 0:
        raise ValueError(f"window {window}, context {context} and crossfade {crossfade} frames must be "
                         f"a positive window and non-negative context and crossfade")
    if window - context - crossfade < 1:
        raise ValueError(f"a window of {window} latent frames leaves nothing new after {context} frames of "
                         f"context and {crossfade} of crossfade")
    windows = [Window(0, 0, min(total, window))]
    while windows[-1].stop < total:
        start = windows[-1].stop - crossfade
        windows.append(Window(len(windows), start, min(total, start + window - context), context, crossfade))
    return windows


def equal_power_gains(samples: int, *, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(fade out, fade in) over ``samples``: ``cos`` and ``sin`` of a quarter turn, sampled at
    sample centres, so ``out**2 + in**2 == 1`` everywhere and neither gain is exactly 0 or 1."""
    phase = (torch.arange(samples, device=device, dtype=torch.float64) + 0.5) / samples * (math.pi / 2)
    return phase.cos().to(dtype), phase.sin().to(dtype)


def crossfade_into(out: torch.Tensor, piece: torch.Tensor, start: int, overlap: int, *,
                   correlated: bool = True) -> None:
    """Write ``piece`` (N,) into ``out`` (M,) from sample ``start``: its first ``overlap``
    samples crossfaded with what ``out`` holds there, the rest copied; the part of ``piece``
    past the end of ``out`` is dropped.

    The crossfade keeps the power constant: cos/sin gains, which do so for unrelated signals,
    divided by ``sqrt(1 + 2·ρ·cos·sin)`` where ρ (clamped to [0, 1]) is the correlation of the
    two signals over the overlap, so that two nearly equal signals (as two windows' versions of
    the same seconds are) are not 3 dB louder in the middle; ``correlated=False`` takes ρ = 0,
    the plain equal-power law."""
    stop = min(out.shape[-1], start + piece.shape[-1])
    piece = piece[..., :stop - start]
    overlap = min(overlap, piece.shape[-1])
    if overlap:
        old, new = out[..., start:start + overlap], piece[..., :overlap]
        fade_out, fade_in = equal_power_gains(overlap, device=out.device, dtype=out.dtype)
        if correlated:
            rho = correlation(old, new)
            norm = (1 + 2 * rho * fade_out * fade_in).rsqrt()
            fade_out, fade_in = fade_out * norm, fade_in * norm
        out[..., start:start + overlap] = old * fade_out + new * fade_in
    out[..., start + overlap:stop] = piece[..., overlap:]


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two equal-length signals, clamped to [0, 1] (0 when one is constant)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float((a.square().sum() * b.square().sum()).sqrt())
    return 0.0 if den == 0 else min(1.0, max(0.0, float((a * b).sum()) / den))


def join_report(waveform: torch.Tensor, sample_rate: int, start: int, stop: int, *,
                frame_seconds: float = 0.01, around_seconds: float = 1.0, edge_seconds: float = 0.002) -> dict:
    """How a join over samples ``[start, stop)`` (a crossfade; ``start == stop`` for a cut)
    sounds, from a mono waveform (N,):

    - ``level_db``: the median 10 ms frame level across the join against the median level of
      the ``around_seconds`` either side (a gap or a cancelling crossfade is far below 0; a
      crossfade of two nearly equal signals, equal power, is up to 3 dB above);
    - ``click``: the largest sample-to-sample step within ``edge_seconds`` of either end of
      the join against the 99th percentile step of the same surroundings (a jump in the
      waveform is many times 1; a step inside ordinary music is about 1 or less).
    """
    x = waveform.detach().double().cpu()
    around, frame = int(around_seconds * sample_rate), max(1, int(frame_seconds * sample_rate))
    lo, hi = max(0, start - around), min(x.shape[-1], stop + around)
    seg = x[lo:hi]
    usable = seg.shape[-1] // frame * frame
    rms = seg[:usable].reshape(-1, frame).pow(2).mean(1).sqrt()
    first, last = (start - lo) // frame, min(rms.shape[0] - 1, max(start - lo, stop - lo - 1) // frame)
    outside = torch.cat([rms[:first], rms[last + 1:]])
    around_level = (outside if outside.numel() else rms).median().clamp_min(1e-12)
    level = 20 * torch.log10(rms[first:last + 1].median().clamp_min(1e-12) / around_level)
    steps = seg.diff().abs()
    edge = max(1, int(edge_seconds * sample_rate))
    near = torch.cat([steps[max(0, e - lo - edge):e - lo + edge] for e in {start, stop}])
    typical = torch.quantile(steps, 0.99).clamp_min(1e-12)
    return {"level_db": float(level), "click": float(near.max() / typical)}
