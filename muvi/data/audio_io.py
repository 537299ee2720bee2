"""Reading audio of any common format, at any rate, as float32 torch tensors.

libsndfile (via ``soundfile``) reads the uncompressed and open formats (wav, flac, ogg/opus,
mp3, aiff, ...) quickly and with exact sample seeking; everything else -- aac/m4a and the audio
track of video containers (mp4, mkv, webm, mov, avi) -- is decoded with FFmpeg through PyAV.
Resampling is always done by torchaudio's windowed-sinc resampler so every file reaches the model
through the same filter, whatever decoder produced it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from muvi.errors import MissingFileError, MuviError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Extensions libsndfile is tried on first; anything else goes straight to FFmpeg.
SOUNDFILE_EXTENSIONS = frozenset({".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3",
                                  ".aif", ".aiff", ".au", ".caf", ".w64", ".rf64"})
#: Extensions treated as audio when a folder is scanned.
AUDIO_EXTENSIONS = SOUNDFILE_EXTENSIONS | frozenset({".m4a", ".aac", ".wma", ".mka", ".ac3"})


class MediaReadError(MuviError, RuntimeError):
    """A media file exists but cannot be decoded (corrupt, unsupported, or no audio stream)."""


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise MissingFileError(f"media file not found: {path}")


def stream_duration(path: Path, kind: str, error: type[Exception], unreadable: str) -> float:
    """Seconds of the first ``kind`` ("audio" or "video") stream, from FFmpeg's view of the
    container headers (no decoding): the stream's own duration, else (video) frames / rate,
    else the container's.

    Every failure raises ``error``: no such stream, no stated duration, or any other read error
    with the message ``unreadable.format(path=path, err=err)``.
    """
    import av
    try:
        with av.open(str(path)) as container:
            streams = container.streams.audio if kind == "audio" else container.streams.video
            if not streams:
                raise error(f"{path}: no {kind} stream")
            stream = streams[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            if kind == "video" and stream.frames and stream.average_rate:
                return stream.frames / float(stream.average_rate)
            if container.duration is not None:
                return container.duration / av.time_base
    except error:
        raise
    except Exception as err:
        raise error(unreadable.format(path=path, err=err)) from err
    raise error(f"{path}: the container does not state the {kind} duration")


def audio_duration(path: str | os.PathLike) -> float:
    """Duration in seconds of the first audio stream, from the headers only (no decoding)."""
    path = Path(path)
    _check_exists(path)
    if path.suffix.lower() in SOUNDFILE_EXTENSIONS:
        import soundfile as sf
        try:
            info = sf.info(str(path))
            if info.samplerate > 0 and info.frames > 0:
                return info.frames / info.samplerate
        except Exception as err:  # fall through to FFmpeg, which reads more variants
            logger.debug("soundfile could not read the header of %s (%s); trying PyAV", path, err)
    return stream_duration(path, "audio", MediaReadError, "cannot read audio header of {path}: {err}")


def _read_soundfile(path: Path, offset: float, duration: Optional[float]) -> tuple[np.ndarray, int]:
    import soundfile as sf
    with sf.SoundFile(str(path)) as f:
        rate = f.samplerate
        start = min(int(round(offset * rate)), f.frames)
        f.seek(start)
        frames = -1 if duration is None else int(round(duration * rate))
        data = f.read(frames, dtype="float32", always_2d=True)  # (n, C)
    return np.ascontiguousarray(data.T), rate


def _read_pyav(path: Path, offset: float, duration: Optional[float]) -> tuple[np.ndarray, int]:
    import av
    try:
        container = av.open(str(path))
    except Exception as err:
        raise MediaReadError(f"cannot open {path}: {err}") from err
    with container:
        if not container.streams.audio:
            raise MediaReadError(f"{path}: no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        if not rate:
            raise MediaReadError(f"{path}: the audio stream has no sample rate")
        # Planar float keeps (C, n) layout whatever the codec's native sample format is.
        resampler = av.AudioResampler(format="fltp")
        if offset > 0:
            # Seeks to the last keyframe at or before the offset; the exact start is trimmed below.
            container.seek(int(offset / stream.time_base), stream=stream)
        end = None if duration is None else offset + duration
        chunks: list[np.ndarray] = []
        first_time: Optional[float] = None
        try:
            for frame in container.decode(stream):
                if first_time is None:
                    first_time = float(frame.time) if frame.time is not None else 0.0
                if end is not None and frame.time is not None and frame.time > end:
                    break
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
        except av.error.FFmpegError as err:
            raise MediaReadError(f"cannot decode audio of {path}: {err}") from err
    if not chunks:
        return np.zeros((1, 0), dtype=np.float32), rate
    data = np.concatenate(chunks, axis=1).astype(np.float32, copy=False)  # (C, n)
    # Decoding started at first_time (a keyframe before the offset, or a negative time for codec
    # priming samples); drop what lies before the requested offset.
    skip = max(0, int(round((offset - (first_time or 0.0)) * rate)))
    data = data[:, skip:]
    if duration is not None:
        data = data[:, : int(round(duration * rate))]
    return data, rate


def load_audio(path: str | os.PathLike, sample_rate: int, mono: bool = True, offset: float = 0.0,
               duration: Optional[float] = None) -> torch.Tensor:
    """Decode ``duration`` seconds (all if None) from ``offset`` and resample to ``sample_rate``.

    Returns float32 ``(N,)`` when ``mono`` (channels averaged), else ``(C, N)``. When the file
    ends early the result is shorter than requested rather than padded, so callers can see it.
    """
    import torch
    import torchaudio.functional as AF

    path = Path(path)
    _check_exists(path)
    if offset < 0 or (duration is not None and duration < 0):
        raise ValueError(f"offset and duration must be >= 0, got {offset}, {duration}")
    data = rate = None
    if path.suffix.lower() in SOUNDFILE_EXTENSIONS:
        try:
            data, rate = _read_soundfile(path, offset, duration)
        except Exception as err:
            logger.debug("soundfile could not read %s (%s); trying PyAV", path, err)
    if data is None:
        data, rate = _read_pyav(path, offset, duration)
    wave = torch.from_numpy(data)
    if mono:
        wave = wave.mean(dim=0)
    if rate != sample_rate and wave.shape[-1] > 0:
        wave = AF.resample(wave, int(rate), int(sample_rate))
        if duration is not None:
            wave = wave[..., : int(round(duration * sample_rate))]
    return wave.contiguous()

