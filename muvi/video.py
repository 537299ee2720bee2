"""Reading videos into frames at a fixed rate, and preparing them for a video encoder.

Shapes: F frames, H×W pixels.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VideoError(ValueError):
    """A video that cannot be used, with the file named in the message."""


def video_info(path: str | Path) -> tuple[float, int]:
    """(frame rate, number of frames) of a video file, with clear errors."""
    reader = _open(path)
    return float(reader.get_avg_fps()), len(reader)


def read_frames(path: str | Path, fps: float = 10.0, *, start: float = 0.0,
                duration: Optional[float] = None, size: Optional[int] = None) -> torch.Tensor:
    """Decode ``path`` at ``fps`` frames per second from ``start`` for ``duration`` seconds.

    Frame ``k`` is the source frame shown at time ``start + k / fps`` (the frame whose display
    interval contains it). ``duration=None`` reads to the end. With ``size`` the frames are
    resized (short side) and centre-cropped to ``size``×``size``. Returns uint8 (F, 3, H, W).
    """
    reader = _open(path)
    src_fps, total = float(reader.get_avg_fps()), len(reader)
    if not src_fps > 0:
        raise VideoError(f"{path}: the video stream reports no frame rate")
    length = total / src_fps
    if duration is None:
        duration = length - start
    count = int(round(duration * fps))
    if start < 0 or count <= 0 or start >= length:
        raise VideoError(f"{path}: nothing to read from {start:.2f} s for {duration:.2f} s "
                         f"(the video lasts {length:.2f} s)")
    times = start + np.arange(count) / fps
    index = np.minimum(np.floor(times * src_fps + 1e-6).astype(np.int64), total - 1)
    try:
        frames = reader.get_batch(index.tolist()).asnumpy()  # (F, H, W, 3) uint8
    except Exception as err:  # decord raises its own DECORDError types
        raise VideoError(f"{path}: failed to decode frames ({err})") from None
    out = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
    return resize_center_crop(out, size) if size else out


def resize_center_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (F, 3, H, W) so the short side is ``size`` (bilinear, antialiased), crop the centre."""
    h, w = frames.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    dtype = frames.dtype
    x = F.interpolate(frames.float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[..., top:top + size, left:left + size]
    return x.round().clamp(0, 255).to(dtype) if dtype == torch.uint8 else x


def standardize(frames: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Frames scaled to [0, 1], (…, C, H, W) → ``(x - mean) / std`` per channel (the encoders'
    ``normalize``)."""
    mean = torch.tensor(mean, device=frames.device, dtype=frames.dtype).view(-1, 1, 1)
    std = torch.tensor(std, device=frames.device, dtype=frames.dtype).view(-1, 1, 1)
    return (frames - mean) / std


def resample_frames(frames: torch.Tensor, src_fps: float, fps: float, count: Optional[int] = None) -> torch.Tensor:
    """Pick frames of a (F, …) tensor at ``fps`` by the same rule as :func:`read_frames`."""
    total = frames.shape[0]
    if count is None:
        count = int(round(total / src_fps * fps))
    index = np.minimum(np.floor(np.arange(count) / fps * src_fps + 1e-6).astype(np.int64), total - 1)
    return frames[torch.from_numpy(index)]


def _open(path: str | Path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video not found: {path}")
    if path.is_dir():
        raise VideoError(f"{path}: is a directory, not a video file")
    import decord

    try:
        reader = decord.VideoReader(str(path), num_threads=1)
    except Exception as err:
        raise VideoError(f"{path}: not a readable video (no decodable video stream: "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if len(reader) == 0:
        raise VideoError(f"{path}: the video stream has zero frames")
    return reader


def duration_frames(duration: float, rate: float) -> int:
    """Frames at ``rate`` covering ``duration`` seconds (rounded up)."""
    return max(1, math.ceil(duration * rate - 1e-9))
