"""Beat-alignment plots: reference vs generated beats over time, with the video's motion curve.

Why: BHS and F1 are averages; a plot shows *where* the generated beats drift, double or miss,
and whether they follow the cuts and motion of the video (the point of a video soundtrack).

The motion/cut curve is the frame-difference energy of the video decoded at 10 FPS (the rate
muvi's visual encoder sees): mean absolute grey-level change between consecutive sampled
frames, on small frames so long videos stay cheap; cuts show as sharp peaks. It is drawn in a
strip under the beats, on the same time axis. Figures are drawn
with matplotlib's object API on the Agg canvas (no pyplot, no global figure state, no display).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from muvi.eval.beats import match_beats

logger = logging.getLogger(__name__)


def motion_curve(video_path: str | Path, fps: float = 10.0, width: int = 64, height: int = 36,
                 chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Frame-difference energy of a video sampled at ``fps``.

    Returns:
        ``(times, energy)``: float64 ``(K,)`` each; ``energy[k]`` is the mean absolute grey-level
        difference (0-255 scale, frames resized to ``width`` x ``height``) between the frames at
        ``times[k - 1]`` and ``times[k]``; ``energy[0] = 0``.
    """
    import decord

    reader = decord.VideoReader(str(video_path), width=width, height=height, num_threads=1)
    native_fps = float(reader.get_avg_fps())
    count = len(reader)
    if count == 0 or native_fps <= 0:
        raise ValueError(f"{video_path}: no decodable frames")
    duration = count / native_fps
    times = np.arange(0.0, duration, 1.0 / fps)
    indices = np.minimum(np.round(times * native_fps).astype(np.int64), count - 1)
    grey = []
    for start in range(0, len(indices), chunk):
        frames = reader.get_batch(indices[start:start + chunk].tolist()).asnumpy().astype(np.float64)
        grey.append(frames @ np.array([0.299, 0.587, 0.114]))  # (k, H, W)
    grey = np.concatenate(grey)
    energy = np.zeros(len(times))
    energy[1:] = np.abs(np.diff(grey, axis=0)).mean(axis=(1, 2))
    return times, energy


def plot_beats(reference_beats: np.ndarray, generated_beats: np.ndarray, out_png: str | Path, *,
               duration: float | None = None, motion: tuple[np.ndarray, np.ndarray] | None = None,
               tolerance: float = 0.1, label: str | None = None, reference_name: str = "reference",
               dpi: int = 100) -> Path:
    """Save a PNG of reference (top row) and generated (bottom row) beats over time.

    Matched beats (one-to-one within ``tolerance``, as BHS counts them) are drawn green and
    joined by a line; unmatched ones red. ``motion`` = ``(times, energy)`` from
    :func:`motion_curve` is drawn in a strip below on the same time axis. ``label`` (e.g. the
    clip name) starts the title; ``reference_name`` names the top row (e.g. "video cuts").
    """
    from matplotlib.figure import Figure

    ref = np.asarray(reference_beats, dtype=np.float64)
    gen = np.asarray(generated_beats, dtype=np.float64)
    pairs = match_beats(ref, gen, tolerance)
    ref_hit = np.zeros(len(ref), bool)
    gen_hit = np.zeros(len(gen), bool)
    ref_hit[pairs[:, 0]] = True
    gen_hit[pairs[:, 1]] = True
    if duration is None:
        ends = [x.max() for x in (ref, gen) if x.size] + ([motion[0].max()] if motion is not None else [])
        duration = max(ends) + 0.5 if ends else 1.0

    width = max(6.0, min(duration * 0.6, 24.0))
    if motion is None:
        fig = Figure(figsize=(width, 3.0), dpi=dpi)
        ax = fig.add_subplot(1, 1, 1)
    else:
        fig = Figure(figsize=(width, 4.0), dpi=dpi)
        ax, strip = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        times, energy = motion
        strip.fill_between(times, 0.0, np.asarray(energy, dtype=np.float64), color="0.5", step="mid")
        strip.set_ylabel("motion", fontsize=8)
        strip.set_yticks([])
        strip.set_xlabel("time (s)")
    for beats, hit, (lo, hi) in ((ref, ref_hit, (1.05, 1.95)), (gen, gen_hit, (0.05, 0.95))):
        ax.vlines(beats[hit], lo, hi, colors="tab:green", linewidth=1.5, zorder=2)
        ax.vlines(beats[~hit], lo, hi, colors="tab:red", linewidth=1.5, zorder=2)
    for i, j in pairs:
        ax.plot([ref[i], gen[j]], [1.05, 0.95], color="tab:green", linewidth=0.8, zorder=1)
    ax.set_xlim(-0.1, duration)  # a beat at 0 s stays visible
    ax.set_ylim(0.0, 2.0)
    ax.set_yticks([0.5, 1.5], labels=[f"generated ({len(gen)})", f"{reference_name} ({len(ref)})"])
    if motion is None:
        ax.set_xlabel("time (s)")
    hits = len(pairs)
    title = (f"{hits} beats matched within {tolerance * 1000:.0f} ms: BHS {100 * hits / max(len(ref), 1):.1f}%, "
             f"precision {100 * hits / max(len(gen), 1):.1f}%")
    ax.set_title(f"{label}: {title}" if label else title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png", metadata={"Software": None})
    return out_png
