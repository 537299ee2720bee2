"""Footage for the corpus's edits: shots cut from source videos and stills, and the picture of
an edit drawn from them (``muvi.data.corpus`` decides where the cuts and accents go).

* :func:`split_footage` cuts a source video into shots at its own cuts (:func:`detect_cuts`, on
  :func:`frame_signatures`), keeping the last ``heldout_fraction`` apart for held-out pairs;
  :func:`load_footage` / :func:`load_still` read sources at a given short side;
* :func:`plan_shots` assigns one shot per segment between the edit's cuts (never the same source
  twice in a row) with a slow pan/zoom, a playback speed and an optional mirror; still
  photographs become shots through a Ken Burns pan/zoom;
* :func:`render_frames` draws the plan at the corpus frame rate, with the accents (zoom punches,
  white flashes) on their frames.

Shapes: F frames, H×W pixels.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclasses.dataclass
class Shot:
    """One shot: ``frames`` (F, H, W, 3) uint8 (F = 1 for a still), the source it came from."""

    source: str
    frames: np.ndarray
    fps: float                 # source frame rate; 0 for a still
    span: tuple[int, int]      # [first, last) frame in the source file

    @property
    def is_still(self) -> bool:
        return self.fps == 0


def frame_signatures(frames: np.ndarray, size: int = 16) -> torch.Tensor:
    """(F, 3*size*size) colour thumbnails, each channel less its mean, all divided by the
    frame's spread: a blend towards white (a flash) or a gain leaves a signature unchanged."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().permute(0, 3, 1, 2)
    x = F.adaptive_avg_pool2d(x, size)
    x = x - x.mean(dim=(2, 3), keepdim=True)
    x = x.flatten(1)
    return x / (x.std(dim=1, keepdim=True) + 2.0)


def detect_cuts(frames: np.ndarray, threshold: float = 0.45, ratio: float = 2.5, window: int = 4) -> list[int]:
    """Frames that start a new shot. The change of :func:`frame_signatures` from the previous
    frame must exceed ``threshold`` and ``ratio`` times the median change over ``window``
    frames on either side, so steady fast motion (a pan) is not taken for a cut. Unrelated
    pictures differ by about 1; flashes leave no trace; a zoom punch can register (it is a
    sudden change of the picture, the point of an accent)."""
    if len(frames) < 2:
        return []
    sig = frame_signatures(frames)
    diff = (sig[1:] - sig[:-1]).abs().mean(dim=1).numpy()
    out = []
    for k, d in enumerate(diff):
        around = np.concatenate([diff[max(0, k - window):k], diff[k + 1:k + 1 + window]])
        if d > threshold and (not len(around) or d > ratio * float(np.median(around))):
            out.append(k + 1)
    return out


def _fit_short_side(image, short: int):
    from PIL import Image

    scale = short / min(image.size)
    if scale >= 1:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.BILINEAR)


def load_footage(path: str | Path, short_side: int) -> tuple[np.ndarray, float]:
    """All frames of a video, (F, H, W, 3) uint8, shrunk so the short side is at most
    ``short_side``, and its frame rate."""
    import decord
    from PIL import Image

    reader = decord.VideoReader(str(path), num_threads=1)
    frames = reader.get_batch(list(range(len(reader)))).asnumpy()
    out = np.stack([np.asarray(_fit_short_side(Image.fromarray(f), short_side)) for f in frames])
    return out, float(reader.get_avg_fps())


def load_still(path: str | Path, short_side: int) -> np.ndarray:
    """A photograph as a one-frame (1, H, W, 3) uint8 array (grey images become RGB)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(_fit_short_side(image.convert("RGB"), short_side))[None]


def split_footage(source: str, frames: np.ndarray, fps: float, *, heldout_fraction: float = 0.25,
                  min_seconds: float = 0.5, threshold: float = 0.5) -> tuple[list[Shot], list[Shot]]:
    """Cut a source video into shots at detected cuts and at the held-out boundary: shots in
    the last ``heldout_fraction`` of the video go to the held-out pool. Shots shorter than
    ``min_seconds`` are dropped. Returns (training shots, held-out shots)."""
    total = len(frames)
    boundary = int(round(total * (1.0 - heldout_fraction)))
    edges = sorted({0, total, boundary, *detect_cuts(frames, threshold)})
    train, heldout = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        if (b - a) / fps >= min_seconds:
            (train if b <= boundary else heldout).append(Shot(source, frames[a:b], fps, (a, b)))
    return train, heldout


# ----------------------------------------------------------------------------- the picture

def plan_shots(cut_frames: Sequence[int], num_frames: int, fps: float, pool: Sequence[Shot],
               rng: np.random.Generator, *, video_weight: float = 2.0) -> list[dict]:
    """One segment per shot between cuts: which pool shot, where in it, how fast, the crop's
    start and end (``[scale of the largest crop, x, y]`` with x, y in the free range) and a
    mirror flag. Consecutive segments never share a source, so every cut changes the picture.
    Stills pan and zoom further than video (Ken Burns), but slowly, as a camera move would."""
    weights = np.array([1.0 if s.is_still else video_weight for s in pool])
    edges = [0, *cut_frames, num_frames]
    plan, previous = [], None
    for a, b in zip(edges[:-1], edges[1:]):
        p = weights * np.array([s.source != previous for s in pool])
        if p.sum() == 0:
            raise ValueError("the shot pool needs at least two sources")
        index = int(rng.choice(len(pool), p=p / p.sum()))
        shot = pool[index]
        lo, zoom_rate, pan_rate = (0.5, 0.12, 0.2) if shot.is_still else (0.7, 0.05, 0.1)  # per second
        seconds = (b - a) / fps
        s0, x0, y0 = rng.uniform(lo, 1.0), rng.random(), rng.random()
        s1, x1, y1 = (float(np.clip(v + rng.uniform(-1, 1) * rate * seconds, low, 1.0))
                      for v, rate, low in ((s0, zoom_rate, lo), (x0, pan_rate, 0.0), (y0, pan_rate, 0.0)))
        plan.append({"shot": index, "source": shot.source, "span": list(shot.span),
                     "frame_start": a, "frame_stop": b,
                     "offset": round(float(rng.uniform(0, len(shot.frames) - 1)), 6),
                     "speed": round(float(rng.uniform(0.6, 1.4)), 6), "flip": bool(rng.random() < 0.5),
                     "rect0": [round(float(v), 6) for v in (s0, x0, y0)],
                     "rect1": [round(v, 6) for v in (s1, x1, y1)]})
        previous = shot.source
    return plan


def _crop_box(src_w: int, src_h: int, aspect: float, scale: float, fx: float, fy: float):
    """(x0, y0, x1, y1) of a crop with the output ``aspect``, ``scale`` of the largest one."""
    h_max = min(src_h, src_w / aspect)
    h = h_max * scale
    w = h * aspect
    x0, y0 = fx * (src_w - w), fy * (src_h - h)
    return (x0, y0, x0 + w, y0 + h)


def render_frames(plan: Sequence[dict], pool: Sequence[Shot], accents: Sequence[dict], fps: float,
                  width: int, height: int) -> np.ndarray:
    """Draw the planned edit: (F, height, width, 3) uint8. Video shots play from ``offset`` at
    ``speed`` (bouncing back at the shot's ends); crops glide from ``rect0`` to ``rect1``. A zoom
    punch narrows the crop by 12 %, a flash blends 55 % towards white, both decaying
    exponentially (time constants 0.15 s and 0.1 s) from their frame."""
    from PIL import Image

    num_frames = plan[-1]["frame_stop"]
    k = np.arange(num_frames)[:, None]
    zoom_at = np.array([a["frame"] for a in accents if a["kind"] == "zoom"])[None]
    flash_at = np.array([a["frame"] for a in accents if a["kind"] == "flash"])[None]
    zoom = 1.0 + (0.12 * np.where(k >= zoom_at, np.exp(-(k - zoom_at) / (0.15 * fps)), 0)).sum(1)
    flash = np.clip((0.55 * np.where(k >= flash_at, np.exp(-(k - flash_at) / (0.1 * fps)), 0)).sum(1), 0, 0.8)
    out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for seg in plan:
        shot = pool[seg["shot"]]
        n = len(shot.frames)
        length = seg["frame_stop"] - seg["frame_start"]
        for i in range(length):
            u = i / max(1, length - 1)
            if shot.is_still:
                src = shot.frames[0]
            else:
                pos = seg["offset"] + seg["speed"] * i / fps * shot.fps
                period = 2 * (n - 1)
                pos = pos % period if period else 0.0
                src = shot.frames[int(pos if pos <= n - 1 else period - pos)]
            f = seg["frame_start"] + i
            scale, fx, fy = (a + (b - a) * u for a, b in zip(seg["rect0"], seg["rect1"]))
            box = _crop_box(src.shape[1], src.shape[0], width / height, scale / zoom[f], fx, fy)
            image = Image.fromarray(src).resize((width, height), Image.BILINEAR, box=box)
            frame = np.asarray(image)[:, ::-1] if seg["flip"] else np.asarray(image)
            if flash[f] > 0:
                frame = frame * (1.0 - flash[f]) + 255.0 * flash[f]
            out[f] = np.clip(np.round(frame), 0, 255).astype(np.uint8) if flash[f] > 0 else frame
    return out
