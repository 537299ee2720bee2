"""Pairing generated, reference and video files by name, and reading them for evaluation."""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from muvi.errors import InputError, one_line

logger = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")


def load_events(path: Path) -> np.ndarray:
    """Event times (s) of one video from JSON: a list of times, or an object whose ``cuts`` /
    ``accents`` / ``events`` lists hold times or ``{"time": t}`` entries (the corpus sidecars
    of ``recipes/build_corpus.py``). Sorted, duplicates removed, t = 0 dropped (not an edit)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if isinstance(data, dict):
        lists = [data.get(key, []) for key in ("cuts", "accents", "events")]
        if not all(isinstance(v, list) for v in lists):
            raise ValueError(f"{path}: 'cuts', 'accents' and 'events' must be lists of times")
        items = [e for v in lists for e in v]
    elif isinstance(data, list):
        items = data
    else:
        raise ValueError(f"{path}: expected a list of event times or an object with 'cuts' / 'accents' / "
                         f"'events' lists, got a JSON {type(data).__name__}")
    try:
        times = [float(e["time"] if isinstance(e, dict) else e) for e in items]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: events must be times or {{'time': t}} objects") from None
    times = np.unique(np.round(np.asarray(times, dtype=np.float64), 6))
    return times[times > 0]


class PairingError(InputError):
    """Generated, reference and video files that cannot be paired one-to-one by file name."""


@dataclasses.dataclass(frozen=True)
class Pair:
    name: str
    generated: Path
    reference: Path
    video: Path | None = None


def _names(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


def _index(directory: str | Path, suffixes: tuple[str, ...], role: str) -> dict[str, Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise PairingError(f"{role} directory not found: {directory}")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise PairingError(f"no {role} files ({' '.join(suffixes)}) in {directory}")
    clashes = sorted({p.stem for p in files if sum(q.stem == p.stem for q in files) > 1})
    if clashes:
        raise PairingError(f"{role} files in {directory} share a name with different extensions: "
                           f"{_names(clashes)}")
    return {p.stem: p for p in files}


def pair_files(generated_dir: str | Path, reference_dir: str | Path,
               videos_dir: str | Path | None = None) -> list[Pair]:
    """Pair audio files by stem (``clip7.wav`` with ``clip7.flac``), sorted by name.

    Raises:
        PairingError: a missing or empty directory, a stem used twice in one directory, or any
            file without a partner; the message lists every unmatched name on each side.
    """
    gen = _index(generated_dir, AUDIO_SUFFIXES, "generated")
    ref = _index(reference_dir, AUDIO_SUFFIXES, "reference")
    problems = []
    for side, other, role, partner, where in ((gen, ref, "generated", "reference", reference_dir),
                                              (ref, gen, "reference", "generated file", generated_dir)):
        missing = sorted(set(side) - set(other))
        if missing:
            problems.append(f"{len(missing)} {role} file(s) have no {partner} in {where}: {_names(missing)}")
    videos = _index(videos_dir, VIDEO_SUFFIXES, "video") if videos_dir is not None else None
    if videos is not None:
        missing = sorted(set(gen) & set(ref) - set(videos))
        if missing:
            problems.append(f"{len(missing)} pair(s) have no video in {videos_dir}: {_names(missing)}")
        extra = sorted(set(videos) - set(gen) - set(ref))
        if extra:
            logger.info("ignoring %d video(s) without audio: %s", len(extra), _names(extra))
    if problems:
        raise PairingError("cannot pair files by name:\n  " + "\n  ".join(problems))
    return [Pair(n, gen[n], ref[n], videos[n] if videos is not None else None) for n in sorted(gen)]


def check_audio_file(path: str | Path) -> None:
    """Raise :class:`~muvi.errors.InputError` naming ``path`` unless its header reads as audio
    with samples in it."""
    import soundfile

    try:
        info = soundfile.info(str(path))
    except Exception as err:  # libsndfile's own error type
        raise InputError(f"{path}: not readable audio ({_reason(err, path)})") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise InputError(f"{path}: the audio file holds no samples")


def load_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float32 waveform (channels averaged) and its sample rate; an unreadable or
    non-finite file is an :class:`~muvi.errors.InputError` naming it."""
    import soundfile

    try:
        data, sample_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # libsndfile's own error type
        raise InputError(f"{path}: not readable audio ({_reason(err, path)})") from None
    if not np.isfinite(data).all():
        raise InputError(f"{path}: the audio holds NaN or infinite samples")
    return np.ascontiguousarray(data.mean(axis=1)), int(sample_rate)


def _reason(err: Exception, path: str | Path) -> str:
    """libsndfile's message without the path it repeats."""
    text = one_line(err).replace(f"Error opening {str(path)!r}: ", "").replace(str(path), "")
    return text.strip(" :") or type(err).__name__
