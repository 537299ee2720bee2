"""Music-only and video-music datasets that cut random 4-30 s segments on the fly.

MuVi (appendix D) never pre-segments its long files: each time a file is drawn, a fresh random
segment of 4 to 30 s is cut from it, which multiplies the variety of the data. Files shorter than
the minimum are taken whole. Segment starts and lengths are whole frames of ``frame_rate``
(10 Hz: the video rate and the latent rate), so ``music`` always holds exactly
``num_frames * sample_rate / frame_rate`` samples and lines up with the frames.

Items are pure functions of ``(seed, epoch, index, draw)``: pass a
:class:`~muvi.data.sampler.SegmentKey` (what :class:`DurationBalancedBatchSampler` yields), or a
plain int, which uses :meth:`set_epoch`'s epoch and draw 0.
"""
from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from muvi.data.audio_io import AUDIO_EXTENSIONS, MediaReadError, audio_duration, load_audio, stream_duration
from muvi.data.sampler import SegmentKey
from muvi.video import VideoError, read_frames

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mkv", ".webm", ".mov", ".avi", ".mpg", ".mpeg", ".flv"})
PathLike = Union[str, os.PathLike]


def scan_files(folder: Path, extensions: frozenset) -> list[Path]:
    """The files under ``folder`` (recursively) whose suffix, in any case, is one of ``extensions``,
    sorted; FileNotFoundError when there are none."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
    if not files:
        raise FileNotFoundError(f"no files with extensions {sorted(extensions)} under {folder}")
    return files


def draw_aligned_segment(total: int, rng: np.random.Generator, min_frames: int, max_frames: int,
                         align: int = 1, frames: Optional[int] = None) -> tuple[int, int]:
    """(start, length) in frames of a random segment of a ``total``-frame item.

    Length uniform in ``[min_frames, max_frames]`` (``frames`` when given), capped by the item;
    items shorter than ``min_frames`` are taken whole. ``start`` is a multiple of ``align``.
    """
    if total < 1:
        raise ValueError("an item of zero frames has no segment")
    if frames is not None:
        length = min(total, max(1, int(frames)))
    elif total < min_frames:
        length = total
    else:
        length = int(rng.integers(min_frames, min(total, max_frames) + 1))
    start = align * int(rng.integers(0, (total - length) // align + 1))
    return start, length


def draw_segment(length: float, rng: np.random.Generator, min_seconds: float, max_seconds: float,
                 frame_rate: float, seconds: Optional[float] = None) -> tuple[float, float]:
    """(start, end) in seconds of a segment of a ``length``-second file, on the frame grid.

    The length is uniform over whole frames in ``[min_seconds, max_seconds]`` (or ``seconds``
    when given), capped by the file; files shorter than ``min_seconds`` are taken whole.
    """
    total = int(math.floor(length * frame_rate + 1e-6))
    if total < 1:
        raise ValueError(f"a file of {length:.3f} s holds no whole frame at {frame_rate} Hz")
    start, frames = draw_aligned_segment(
        total, rng, math.ceil(min_seconds * frame_rate - 1e-6), math.floor(max_seconds * frame_rate + 1e-6),
        frames=None if seconds is None else int(round(seconds * frame_rate)))
    return start / frame_rate, (start + frames) / frame_rate


def fit_length(wave: torch.Tensor, samples: int, path: Path) -> torch.Tensor:
    """Exactly ``samples`` long: headers can overstate a compressed file's length by a frame."""
    if wave.shape[-1] < samples:
        missing = samples - wave.shape[-1]
        if missing > 0.1 * samples:
            raise MediaReadError(f"{path}: decoded {wave.shape[-1]} samples where the header "
                                 f"promised at least {samples}")
        wave = torch.nn.functional.pad(wave, (0, missing))
    return wave[..., :samples]


def video_duration(path: PathLike) -> float:
    """Duration in seconds of the first video stream, from the container headers."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    return stream_duration(path, "video", VideoError, "{path}: not a readable video ({err})")


def read_video_frames(path: PathLike, start: float, end: float, fps: float = 10.0, size: int = 224) -> torch.Tensor:
    """uint8 (F, 3, size, size): frames at ``start + k / fps`` for ``F = round((end-start)*fps)``.

    The same frames as inference reads (:func:`muvi.video.read_frames`: chosen by timestamp,
    resized so the short side is ``size`` and centre-cropped, one at a time); frames past the
    last one repeat it.
    """
    count = int(round((end - start) * fps))
    if start < 0 or count <= 0:
        raise VideoError(f"{path}: bad segment [{start}, {end}) s at {fps} fps")
    return read_frames(path, fps, start=start, duration=count / fps, size=size)


class KeyedSegmentDataset(Dataset):
    """Keys to seeded random streams, so that items are pure functions of
    ``(seed, epoch, index, draw)``: shared by these datasets and the cached-feature one."""

    #: what an index counts, for the out-of-range message
    unit = "files"

    def __init__(self, min_seconds: float, max_seconds: float, seed: int) -> None:
        if not 0 < min_seconds <= max_seconds:
            raise ValueError(f"need 0 < min_seconds <= max_seconds, got {min_seconds}, {max_seconds}")
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _key(self, key) -> SegmentKey:
        if isinstance(key, SegmentKey):
            return key
        if isinstance(key, (tuple, list)):
            return SegmentKey(*key)
        return SegmentKey(int(key), self.epoch, 0, None)

    def _key_rng(self, key) -> tuple[SegmentKey, np.random.Generator]:
        """The key (an int uses :meth:`set_epoch`'s epoch and draw 0) and its random stream."""
        key = self._key(key)
        if not 0 <= key.index < len(self):
            raise IndexError(f"index {key.index} out of range for {len(self)} {self.unit}")
        return key, np.random.default_rng([self.seed, key.epoch, key.index, key.draw])


class _SegmentDataset(KeyedSegmentDataset):
    """Shared machinery: durations, skipping unreadable files, keys to seeded segments."""

    def __init__(self, sample_rate: int, min_seconds: float, max_seconds: float, frame_rate: float,
                 seed: int) -> None:
        super().__init__(min_seconds, max_seconds, seed)
        self.sample_rate, self.frame_rate = int(sample_rate), float(frame_rate)
        self.min_seconds, self.max_seconds = float(min_seconds), float(max_seconds)
        self.durations: list[float] = []
        self.skipped: list[tuple[str, str]] = []  # (file, reason) left out with skip_unreadable

    def __len__(self) -> int:
        return len(self.durations)

    def segment(self, key) -> tuple[int, float, float]:
        """(index, start, end) of the segment a key stands for."""
        key, rng = self._key_rng(key)
        start, end = draw_segment(self.durations[key.index], rng, self.min_seconds, self.max_seconds,
                                  self.frame_rate, key.seconds)
        return key.index, start, end

    def _music(self, path: Path, start: float, end: float) -> torch.Tensor:
        samples = int(round((end - start) * self.sample_rate))
        return fit_length(load_audio(path, self.sample_rate, offset=start, duration=end - start), samples, path)


class MusicDataset(_SegmentDataset):
    """Random segments of music files: a folder (searched recursively) or a list of files.

    Item: ``{"music": float32 (N,), "start": s, "end": s, "path": str, "index": int}``.
    ``durations`` (seconds, one per file) skips reading the headers, e.g. from a cache index.
    With ``skip_unreadable`` files whose header cannot be read are left out and listed in
    ``self.skipped``; otherwise the first one stops construction with its name in the error.
    """

    def __init__(self, files_or_folder: Union[PathLike, Sequence[PathLike]], sample_rate: int = 24000,
                 min_seconds: float = 4.0, max_seconds: float = 30.0, seed: int = 0, *,
                 frame_rate: float = 10.0, durations: Optional[Sequence[float]] = None,
                 skip_unreadable: bool = False) -> None:
        super().__init__(sample_rate, min_seconds, max_seconds, frame_rate, seed)
        if isinstance(files_or_folder, (str, os.PathLike)) and Path(files_or_folder).is_dir():
            files = scan_files(Path(files_or_folder), AUDIO_EXTENSIONS)
        elif isinstance(files_or_folder, (str, os.PathLike)):
            files = [Path(files_or_folder)]
        else:
            files = [Path(f) for f in files_or_folder]
        if durations is not None and len(durations) != len(files):
            raise ValueError(f"{len(durations)} durations for {len(files)} files")
        self.files: list[Path] = []
        for i, path in enumerate(files):
            try:
                length = float(durations[i]) if durations is not None else audio_duration(path)
                if length * self.frame_rate < 1:
                    raise MediaReadError(f"{path}: too short ({length:.3f} s)")
            except (OSError, MediaReadError) as err:
                if not skip_unreadable:
                    raise
                self.skipped.append((str(path), str(err)))
                logger.warning("skipping unreadable music file: %s", err)
                continue
            self.files.append(path)
            self.durations.append(length)
        if not self.files:
            raise FileNotFoundError("no readable music files")

    def __getitem__(self, key) -> dict:
        index, start, end = self.segment(key)
        path = self.files[index]
        return {"music": self._music(path, start, end), "start": start, "end": end,
                "path": str(path), "index": index}


def _read_pairs(source) -> list[tuple[Path, Path]]:
    """Pairs (video, audio) from a folder of videos, a list, or a CSV of ``video[,audio]`` rows."""
    if isinstance(source, (str, os.PathLike)):
        source = Path(source)
        if source.is_dir():
            return [(p, p) for p in scan_files(source, VIDEO_EXTENSIONS)]
        if source.suffix.lower() == ".csv":
            with open(source, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
            if rows and rows[0][0].strip().lower() == "video":
                rows = rows[1:]  # header
            base = source.parent
            return [(base / r[0].strip(), base / (r[1].strip() if len(r) > 1 and r[1].strip() else r[0].strip()))
                    for r in rows]
        return [(source, source)]
    pairs = []
    for item in source:
        if isinstance(item, (str, os.PathLike)):
            pairs.append((Path(item), Path(item)))
        else:
            video, audio = item
            pairs.append((Path(video), Path(audio if audio is not None else video)))
    return pairs


class VideoMusicDataset(_SegmentDataset):
    """Random segments of (video, music) pairs, with the frames of the segment at ``fps``.

    ``pairs_or_folder``: a folder of videos (each with its own music track), a list of video
    paths and/or ``(video, audio)`` pairs, or a CSV file of ``video,audio`` rows (audio optional,
    paths relative to the CSV; a ``video,audio`` header line is allowed). A pair lasts as long as
    the shorter of its two streams.

    Item: ``{"music": float32 (N,), "frames": uint8 (F, 3, size, size), "start", "end",
    "video_path", "audio_path", "index"}`` with ``F = (end - start) * fps``.
    """

    def __init__(self, pairs_or_folder, sample_rate: int = 24000, min_seconds: float = 4.0,
                 max_seconds: float = 30.0, seed: int = 0, *, fps: float = 10.0, size: int = 224,
                 durations: Optional[Sequence[float]] = None, skip_unreadable: bool = False,
                 with_frames: bool = True) -> None:
        super().__init__(sample_rate, min_seconds, max_seconds, fps, seed)
        self.fps, self.size, self.with_frames = float(fps), int(size), with_frames
        pairs = _read_pairs(pairs_or_folder)
        if durations is not None and len(durations) != len(pairs):
            raise ValueError(f"{len(durations)} durations for {len(pairs)} pairs")
        self.pairs: list[tuple[Path, Path]] = []
        for i, (video, audio) in enumerate(pairs):
            try:
                length = (float(durations[i]) if durations is not None
                          else min(video_duration(video), audio_duration(audio)))
                if length * self.fps < 1:
                    raise MediaReadError(f"{video}: too short ({length:.3f} s)")
            except (OSError, MediaReadError, VideoError) as err:
                if not skip_unreadable:
                    raise
                self.skipped.append((str(video), str(err)))
                logger.warning("skipping unreadable video-music pair: %s", err)
                continue
            self.pairs.append((video, audio))
            self.durations.append(length)
        if not self.pairs:
            raise FileNotFoundError("no readable video-music pairs")

    def __getitem__(self, key) -> dict:
        index, start, end = self.segment(key)
        video, audio = self.pairs[index]
        item = {"music": self._music(audio, start, end), "start": start, "end": end,
                "video_path": str(video), "audio_path": str(audio), "index": index}
        if self.with_frames:
            item["frames"] = read_video_frames(video, start, end, self.fps, self.size)
        return item


def collate_segments(items: list[dict]) -> dict:
    """Stack items of different lengths, zero-padded at the end.

    Adds ``music_lengths`` (samples) and, for video items, ``num_frames``; other keys become lists.
    """
    out: dict = {}
    music = [it["music"] for it in items]
    out["music_lengths"] = torch.tensor([m.shape[-1] for m in music])
    out["music"] = torch.nn.utils.rnn.pad_sequence(music, batch_first=True)
    if "frames" in items[0]:
        frames = [it["frames"] for it in items]
        out["num_frames"] = torch.tensor([f.shape[0] for f in frames])
        out["frames"] = torch.nn.utils.rnn.pad_sequence(frames, batch_first=True)
    for key in items[0]:
        if key not in ("music", "frames"):
            out[key] = [it[key] for it in items]
    return out
