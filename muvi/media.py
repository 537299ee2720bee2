"""What a media file holds, read without torch, and writing output files safely.

:func:`probe_video` reads a video's streams and timing from its packets (decoding one frame to
prove the codec works), so the input checks of :mod:`muvi.inputs` run in well under a second,
before anything heavy is imported. :func:`write_atomically` is how every output file is
written: complete or not at all, never over an input.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from muvi.errors import InputError, MissingFileError, one_line

#: audio output suffix -> libsndfile format
AUDIO_FORMATS = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG"}
#: video output suffix -> (FFmpeg muxer, audio codec of the music)
VIDEO_FORMATS = {".mp4": ("mp4", "aac"), ".m4v": ("mp4", "aac"), ".mov": ("mov", "aac"),
                 ".mkv": ("matroska", "aac")}


class VideoError(InputError):
    """A video that cannot be used, with the file named in the message."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` reads from a file without decoding more than one frame."""

    path: Path
    width: int
    height: int
    duration: float       # seconds from the first frame shown to the last frame gone
    start_time: float     # presentation time of the first frame in the file's clock (s)
    frame_rate: float     # average frames per second (frames / duration)
    num_frames: int
    codec: str
    rotation: int         # degrees counter-clockwise the picture is turned for display
    variable_rate: bool   # frame intervals differ by more than 5 %


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Check that ``path`` is a readable video and read its timing.

    The packets of the video stream are read (not decoded) for their timestamps, and the first
    frame is decoded to prove the codec works. Every problem is a :class:`VideoError` (or
    :class:`~muvi.errors.MissingFileError`) whose one-line message names the file.
    """
    import av

    path = _check_file(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams}) or ["no streams"]
                raise VideoError(f"{path}: no video stream (the file holds {', '.join(kinds)})")
            stream = container.streams.video[0]
            spans = [(p.pts if p.pts is not None else p.dts, p.duration or 0)
                     for p in container.demux(stream) if p.size and (p.pts is not None or p.dts is not None)]
            if not spans:
                raise VideoError(f"{path}: the video stream has zero frames")
            codec, time_base = stream.codec_context.name, stream.time_base
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        with av.open(str(path)) as container:
            first = _first_frame(container, container.streams.video[0], path)
            width, height, rotation = first.width, first.height, int(first.rotation or 0)
    except (VideoError, MissingFileError):
        raise
    except Exception as err:  # FFmpeg's errors, or a file PyAV cannot open at all
        raise VideoError(f"{path}: not a readable video ({_reason(err)})") from None
    if time_base is None:
        raise VideoError(f"{path}: the video stream has no time base")
    pts = np.array(sorted(p for p, _ in spans), dtype=np.int64)
    gaps = np.diff(pts)
    last_duration = max(p + d for p, d in spans) - pts[-1]
    if last_duration <= 0:  # containers that do not store packet durations
        last_duration = int(np.median(gaps)) if len(gaps) else (
            round(1 / (float(rate) * float(time_base))) if rate else 1)
    duration = float((pts[-1] + last_duration - pts[0]) * time_base)
    if not duration > 0:
        raise VideoError(f"{path}: the video stream has no duration")
    # Intervals that differ by more than a tick and 5 % (rounded time bases wobble by a tick).
    variable = bool(len(gaps) > 1 and (gaps.max() - gaps.min()) > max(1, 0.05 * np.median(gaps)))
    return VideoInfo(path=path, width=width, height=height, duration=duration,
                     start_time=float(pts[0] * time_base), frame_rate=len(pts) / duration,
                     num_frames=len(pts), codec=codec, rotation=rotation, variable_rate=variable)


def _reason(err: Exception) -> str:
    """FFmpeg's own words for an error (``Invalid data found when processing input``), without
    the error number and file name PyAV adds; any other error's first line."""
    return getattr(err, "strerror", None) or one_line(err)


def _first_frame(container, stream, path: Path):
    for frame in container.decode(stream):
        return frame
    raise VideoError(f"{path}: no frame of the video stream could be decoded")


def _check_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"video not found: {path}")
    if path.is_dir():
        raise VideoError(f"{path}: is a directory, not a video file")
    if not os.access(path, os.R_OK):
        raise VideoError(f"{path}: not readable (permission denied)")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: the file is empty")
    return path




def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` into a new temporary file beside ``path`` (a unique name made by
    ``tempfile``, so never an existing file), then rename it over ``path`` (mode 0644 less the
    umask). The temporary file is removed on every error path."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".part{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o644 & ~mask)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def unused_path(path: Path) -> Path:
    """``path``, or ``stem-1.suffix``, ``stem-2.suffix``, …: the first that does not exist."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate
