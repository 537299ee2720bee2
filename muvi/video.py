"""Reading videos into frames at a fixed rate, and preparing them for a video encoder.

Frames are chosen by their presentation timestamps: frame ``k`` at rate ``fps`` is the source
frame on screen at ``start + k / fps`` (the last one whose timestamp is at or before it), so a
variable-frame-rate file reads as it plays. A video's length is the span of its timestamps
(first frame shown to last frame gone), not ``frames / average rate``. Decoding streams one
frame at a time through FFmpeg (PyAV) and resizes each chosen frame at once, so memory does not
grow with the source resolution. The display rotation stored in the file is applied.

Shapes: F frames, H×W pixels.
"""
from __future__ import annotations

import math
import os
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from muvi.errors import one_line
from muvi.media import VideoError, VideoInfo, probe_video  # noqa: F401 (re-exported)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: a target time within this of a frame's timestamp counts as that frame's (rounding of time bases)
_EPS = 1e-6


def iter_frames(path: str | os.PathLike, fps: float = 10.0, *, start: float = 0.0,
                duration: Optional[float] = None, size: Optional[int] = None,
                info: Optional[VideoInfo] = None) -> Iterator[torch.Tensor]:
    """Frames of ``path`` at ``fps`` from ``start`` for ``duration`` seconds, one at a time:
    uint8 (3, H, W), or (3, size, size) resized (short side) and centre-cropped with ``size``.

    ``round(duration · fps)`` frames come out (``duration=None``: to the end of the video).
    Only the chosen frames are converted to RGB and resized, one by one.
    """
    import av

    info = info or probe_video(path)
    count = _frame_count(info, fps, start, duration)
    targets = start + np.arange(count) / fps
    scratch: dict = {}  # one float frame reused by every resize (no per-frame HD allocations)
    try:
        with av.open(str(info.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            decoded = _timed_frames(container, stream, info, start)
            current, current_rgb, k = None, None, 0
            for time, frame in decoded:
                while k < count and targets[k] + _EPS < time:
                    if current is None:  # the first frame is on screen from t = 0
                        current = frame
                    if current_rgb is None:
                        current_rgb = _to_tensor(current, info, size, scratch)
                    yield current_rgb
                    k += 1
                if k == count:
                    return
                current, current_rgb = frame, None
    except VideoError:
        raise
    except Exception as err:
        raise VideoError(f"{info.path}: failed to decode frames ({one_line(err)})") from None
    if current is None:
        raise VideoError(f"{info.path}: no frame decoded after {start:.2f} s")
    last = _to_tensor(current, info, size, scratch) if current_rgb is None else current_rgb
    for _ in range(k, count):  # the last frame stays on screen to the end
        yield last


def read_frames(path: str | os.PathLike, fps: float = 10.0, *, start: float = 0.0,
                duration: Optional[float] = None, size: Optional[int] = None,
                info: Optional[VideoInfo] = None) -> torch.Tensor:
    """All of :func:`iter_frames` in one tensor: uint8 (F, 3, H, W), filled as they come."""
    info = info or probe_video(path)
    out = None
    for k, frame in enumerate(iter_frames(path, fps, start=start, duration=duration, size=size, info=info)):
        if out is None:
            out = torch.empty((_frame_count(info, fps, start, duration), *frame.shape), dtype=frame.dtype)
        out[k] = frame
    return out


class FrameStream:
    """Frames from an iterator (:func:`iter_frames`), handed out in ranges of increasing start:
    :meth:`take` ``(i, j)`` gives frames ``i … j-1`` (the last frame repeated past the end) and
    forgets every frame before ``i``. A long video is read once, front to back, and only the
    frames of one window are held."""

    def __init__(self, frames: Iterator[torch.Tensor]):
        self._frames = iter(frames)
        self._buffer: list[torch.Tensor] = []
        self._offset = 0       # index of self._buffer[0]
        self._last: Optional[torch.Tensor] = None
        self.peak = 0          # most frames held at once (for tests and benchmarks)

    def take(self, start: int, stop: int) -> torch.Tensor:
        """uint8 frames ``start … stop-1`` (F, 3, H, W); ``start`` never below an earlier call's."""
        if start < self._offset or stop <= start:
            raise ValueError(f"frames {start}..{stop} asked after frame {self._offset} was handed out")
        drop = min(start - self._offset, len(self._buffer))
        del self._buffer[:drop]
        self._offset += drop
        while self._offset + len(self._buffer) < stop:
            frame = next(self._frames, None)
            if frame is None:  # the video ended: its last frame stays on screen
                break
            self._last = frame
            if self._offset < start:  # a frame before start that nobody asked for
                self._offset += 1
            else:
                self._buffer.append(frame)
        self.peak = max(self.peak, len(self._buffer))
        if self._last is None:
            raise VideoError("no frame decoded")
        have = self._buffer[:stop - start]
        return torch.stack(have + [self._last] * (stop - start - len(have)))


def _frame_count(info: VideoInfo, fps: float, start: float, duration: Optional[float]) -> int:
    """``round(duration · fps)`` frames from ``start`` (to the end when ``duration`` is None)."""
    if duration is None:
        duration = info.duration - start
    count = int(round(duration * fps))
    if start < 0 or count <= 0 or start >= info.duration:
        raise VideoError(f"{info.path}: nothing to read from {start:.2f} s for {duration:.2f} s "
                         f"(the video lasts {info.duration:.2f} s)")
    return count


def _timed_frames(container, stream, info: VideoInfo, start: float):
    """(seconds since the first frame, frame) in presentation order, from a keyframe at or
    before ``start`` (from the beginning when the seek lands late)."""
    base, origin = float(stream.time_base), info.start_time
    if start > 0:
        container.seek(int((origin + start) / base), stream=stream, backward=True)
    previous = None
    for i, frame in enumerate(container.decode(stream)):
        if frame.pts is not None:
            time = frame.pts * base - origin
        else:  # no timestamp: one average frame interval after the previous frame
            time = 0.0 if previous is None else previous + 1 / info.frame_rate
        if i == 0 and start > 0 and time > start + _EPS:  # landed after the start: go back to 0
            container.seek(0, stream=stream)
            yield from _timed_frames(container, stream, info, 0.0)
            return
        previous = time
        yield time, frame


def _to_tensor(frame, info: VideoInfo, size: Optional[int], scratch: dict) -> torch.Tensor:
    """One decoded frame → uint8 (3, H, W), or (3, size, size) as :func:`resize_center_crop`
    gives for uint8 input (the float copy goes into ``scratch["float"]``, reused)."""
    image = frame.to_ndarray(format="rgb24")  # (H, W, 3)
    if info.rotation % 360:
        image = np.rot90(image, k=round(info.rotation / 90) % 4)
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if not size:
        return x.contiguous()
    buf = scratch.get("float")
    if buf is None or buf.shape != x.shape:
        buf = scratch["float"] = torch.empty(x.shape, dtype=torch.float32)
    buf.copy_(x)
    return resize_center_crop(buf[None], size)[0].round().clamp(0, 255).to(torch.uint8)


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


def encoder_input(frames: torch.Tensor, normalize, device=None, chunk: int = 64) -> torch.Tensor:
    """uint8 frames (…, 3, H, W) → ``normalize(frames / 255)`` in float32 on ``device``.

    Computed ``chunk`` frames at a time into one tensor, so a long clip costs one float copy
    instead of the three that ``normalize(frames.float() / 255)`` holds at its peak; the values
    are the same."""
    out = torch.empty(frames.shape, dtype=torch.float32, device=device or frames.device)
    flat_in, flat_out = frames.reshape(-1, *frames.shape[-3:]), out.view(-1, *frames.shape[-3:])
    for i in range(0, flat_in.shape[0], chunk):
        flat_out[i:i + chunk] = normalize(flat_in[i:i + chunk].to(out.device).float() / 255)
    return out


def resample_frames(frames: torch.Tensor, src_fps: float, fps: float, count: Optional[int] = None) -> torch.Tensor:
    """Pick frames of a (F, …) tensor at ``fps``: frame ``k`` is the one on screen at ``k / fps``."""
    return frames[torch.from_numpy(frame_indices(frames.shape[0], src_fps, fps, count))]


def frame_indices(total: int, src_fps: float, fps: float, count: Optional[int] = None) -> np.ndarray:
    """Indices into ``total`` frames at ``src_fps`` of the frames on screen at ``k / fps``."""
    if count is None:
        count = int(round(total / src_fps * fps))
    return np.minimum(np.floor(np.arange(count) / fps * src_fps + 1e-6).astype(np.int64), total - 1)


def duration_frames(duration: float, rate: float) -> int:
    """Frames at ``rate`` covering ``duration`` seconds (rounded up)."""
    return max(1, math.ceil(duration * rate - 1e-9))
