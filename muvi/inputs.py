"""Checking what users pass to :func:`muvi.generate` and ``muvi generate``, before any heavy work.

:func:`check_request` looks at every argument and input file (numbers, the video's streams and
timing, the style prompt, the device) and returns a :class:`Request` that the pipeline runs
without further checks; everything wrong is an :class:`~muvi.errors.InputError` with a
one-line message naming the argument or file. It runs before a model is loaded, so a bad call
fails at once. Arguments are spelled as the caller spells them: ``duration=`` from Python,
``--duration`` from the command line (``names``).

The number and file checks import neither torch nor the models; the device check and tensors
do.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import numbers
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

from muvi.config import RELEASE_FORMAT
from muvi.errors import InputError, InputTypeError, MissingFileError, OutputError, OutputExistsError, one_line
from muvi.media import VideoInfo, probe_video

PathLike = Union[str, Path]

#: how :func:`muvi.generate` spells its arguments in messages (``cfg_scale=nan``)
API_NAMES = {k: k for k in ("video", "cfg_scale", "num_steps", "seed", "duration", "prompt_audio",
                            "prompt_sample_rate", "prompt_scale", "fps", "device", "method", "model")}

MAX_CFG_SCALE = 100.0   # far past any useful guidance; larger values only blow the output up
MAX_STEPS = 10_000
MAX_SEED = 2 ** 63 - 1
MAX_FPS = 1000.0


@dataclasses.dataclass(frozen=True)
class ModelLimits:
    """What the checks need to know of a release: read from its ``config.json`` alone."""

    sample_rate: int = 24000
    max_duration: Optional[float] = None  # None: any length (long videos are scored window by window)
    video_fps: float = 10.0
    default_cfg_scale: float = 4.0
    default_prompt_scale: float = 0.0

    @classmethod
    def from_release(cls, folder: PathLike, name: str = "model") -> "ModelLimits":
        """The limits of a release folder, without reading any weights."""
        folder = Path(folder)
        path = folder / "config.json"
        if not folder.is_dir():
            raise MissingFileError(f"{_arg(name, folder)}: no such model folder")
        if not path.is_file():
            raise MissingFileError(f"{_arg(name, folder)}: not a muvi model folder (no config.json)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if raw.get("format_version") != RELEASE_FORMAT:
                raise ValueError(f"release format {raw.get('format_version')!r}, but this muvi reads format "
                                 f"{RELEASE_FORMAT}; "
                                 f"export the release again with recipes/export.py")
            pipe = raw["pipeline"]
            mel = json.loads((folder / "mel.json").read_text(encoding="utf-8"))["config"]
            return cls(sample_rate=int(mel.get("sample_rate", cls.sample_rate)),
                       max_duration=None if pipe.get("max_duration") is None else float(pipe["max_duration"]),
                       video_fps=float(pipe.get("video_fps", cls.video_fps)),
                       default_cfg_scale=float(pipe.get("default_cfg_scale", cls.default_cfg_scale)),
                       default_prompt_scale=float(pipe.get("default_prompt_scale", cls.default_prompt_scale)))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            from muvi.config import ConfigError

            raise ConfigError(f"{path}: not a readable muvi config ({type(err).__name__}: {err})") from None


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked generation request: every field is valid for the model it was checked against."""

    video: Any                     # a Path, or uint8 frames (F, 3, H, W) at ``fps``
    source: str                    # the video's name in messages and outputs
    duration: float                # seconds of music from the start of the video
    cfg_scale: float
    num_steps: int
    seed: Optional[int]
    method: str
    device: str
    fps: Optional[float] = None    # frames tensors only
    info: Optional[VideoInfo] = None
    prompt: Any = None             # float32 mono waveform at the model's rate, or None
    prompt_scale: float = 0.0      # guidance on the prompt (used only with one)


def check_request(video, *, cfg_scale=None, num_steps=25, seed=None, duration=None,
                  prompt_audio=None, prompt_sample_rate=None, fps=None, device=None,
                  method: str = "euler", prompt_scale=None, limits: ModelLimits = ModelLimits(),
                  names: Mapping[str, str] = API_NAMES, check_device: bool = True) -> Request:
    """Check every argument of a generation call against ``limits`` and return the request.

    Order: numbers, the video (packets and one decoded frame), the prompt's header; then what
    needs torch: the solver name, the device, the prompt's samples (they must be finite).
    Raises :class:`~muvi.errors.InputError`.
    """
    scale = limits.default_cfg_scale if cfg_scale is None else check_real(
        cfg_scale, names["cfg_scale"], low=0.0, high=MAX_CFG_SCALE)
    prompt_scale = limits.default_prompt_scale if prompt_scale is None else check_real(
        prompt_scale, names["prompt_scale"], low=0.0, high=MAX_CFG_SCALE)
    steps = check_int(num_steps, names["num_steps"], low=1, high=MAX_STEPS)
    seed = None if seed is None else check_int(seed, names["seed"], low=0, high=MAX_SEED)
    if duration is not None:
        duration = check_real(duration, names["duration"], low=0.0, low_open=True)
    if prompt_sample_rate is not None:
        prompt_sample_rate = check_int(prompt_sample_rate, names["prompt_sample_rate"], low=1, high=10 ** 6)

    info = frames = None
    if isinstance(video, (str, os.PathLike)):
        info = probe_video(video)
        source, length = str(video), info.duration
    else:
        frames = frames_tensor(video, names["video"])
        fps = check_real(fps, names["fps"], low=0.0, low_open=True, high=MAX_FPS,
                         missing="a frames tensor needs its frame rate: pass fps=… (frames per second)")
        source, length = "<tensor>", frames.shape[0] / fps
    duration = check_duration(duration, length, limits.max_duration, source, names["duration"])
    if isinstance(prompt_audio, (str, os.PathLike)):  # from its header first: no decoding yet
        _check_prompt_length(_prompt_file_seconds(Path(prompt_audio), names["prompt_audio"]), duration,
                             str(prompt_audio))

    # What needs torch: the solver, the device, and the prompt's samples (finite?).
    method = check_method(method, names["method"])
    device = resolve_device(device, names["device"]) if check_device else (device or "cpu")
    prompt = None
    if prompt_audio is not None:
        prompt = load_prompt(prompt_audio, prompt_sample_rate, limits.sample_rate, names["prompt_audio"])
        _check_prompt_length(prompt.shape[-1] / limits.sample_rate, duration,
                             _prompt_name(prompt_audio, names))
    return Request(video=Path(video) if info is not None else frames, source=source, duration=duration,
                   cfg_scale=scale, num_steps=steps, seed=seed, method=method, device=device,
                   fps=None if info is not None else fps, info=info, prompt=prompt, prompt_scale=prompt_scale)


# ----------------------------------------------------------------------------- numbers

def _arg(name: str, value: Any) -> str:
    """An argument as its caller wrote it: ``--steps 0`` or ``num_steps=0``."""
    if name.startswith("-"):
        return f"{name} {value}"
    return f"{name}={str(value) if isinstance(value, Path) else repr(value)}"


def check_real(value, name: str, *, low: Optional[float] = None, high: Optional[float] = None,
               low_open: bool = False, missing: Optional[str] = None) -> float:
    """A finite real number (not a bool or a string) in ``[low, high]`` (``(low, high]``)."""
    if value is None and missing:
        raise InputError(missing)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{_arg(name, value)}: must be a number, not {type(value).__name__}")
    raw, value = value, float(value)
    if not math.isfinite(value):
        raise InputError(f"{_arg(name, raw)}: must be a finite number")
    if low is not None and (value <= low if low_open else value < low):
        raise InputError(f"{_arg(name, raw)}: must be {'>' if low_open else '>='} {low:g}")
    if high is not None and value > high:
        raise InputError(f"{_arg(name, raw)}: must be at most {high:g}")
    return value


def check_int(value, name: str, *, low: int, high: int) -> int:
    """An integer (not a bool, float or string) in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputTypeError(f"{_arg(name, value)}: must be an integer, not {type(value).__name__}")
    value = int(value)
    if not low <= value <= high:
        raise InputError(f"{_arg(name, value)}: must be between {low} and {high}")
    return value


def check_method(method, name: str) -> str:
    from muvi.flow import ADAPTIVE_METHODS, FIXED_STEP_METHODS

    known = FIXED_STEP_METHODS + ADAPTIVE_METHODS
    if not isinstance(method, str) or method not in known:
        raise InputError(f"{_arg(name, method)}: unknown ODE method; choose from {', '.join(known)}")
    return method


def check_duration(duration: Optional[float], length: float, max_duration: Optional[float], source: str,
                   name: str = "duration") -> float:
    """Seconds to score: all of the video by default; never past its end or the model's limit
    (``max_duration``; None: no limit)."""
    flag = name if name.startswith("-") else f"{name}=…"
    if max_duration is None:
        max_duration = math.inf
    if duration is None:
        if length > max_duration + 1e-6:
            raise InputError(f"{source}: the video lasts {length:.1f} s, longer than this model's limit "
                             f"of {max_duration:.0f} s; pass {flag} to score a part of it")
        return length
    if duration > max_duration + 1e-6:
        raise InputError(f"{_arg(name, duration)}: longer than this model's limit of {max_duration:.0f} s")
    if duration > length + 1e-6:
        raise InputError(f"{_arg(name, duration)}: longer than the video {source} ({length:.2f} s)")
    return duration


# ----------------------------------------------------------------------------- device

def resolve_device(device, name: str = "device") -> str:
    """``None`` → CUDA when available, else CPU; anything else must exist on this machine."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise InputError(f"{_arg(name, device)}: must be a device name such as cpu or cuda")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise InputError(f"{_arg(name, device)}: unknown device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu":
        return "cpu"
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{_arg(name, device)}: CUDA is not available on this machine "
                             f"(no GPU found); use cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise InputError(f"{_arg(name, device)}: this machine has {count} CUDA device(s)")
        return str(parsed)
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"{_arg(name, device)}: MPS is not available on this machine; use cpu")
        return "mps"
    raise InputError(f"{_arg(name, device)}: unsupported device type; use cpu, cuda or mps")


# ----------------------------------------------------------------------------- tensors

def frames_tensor(video, name: str = "video"):
    """A frames tensor (F, 3, H, W) or (F, H, W, 3), uint8 in [0, 255] or float in [0, 1] →
    contiguous uint8 (F, 3, H, W)."""
    import torch

    if isinstance(video, np.ndarray):
        video = torch.from_numpy(video)
    if not isinstance(video, torch.Tensor):
        raise InputTypeError(f"{name}: must be a file path or a frames tensor, not {type(video).__name__}")
    if video.dim() != 4 or 3 not in (video.shape[1], video.shape[-1]):
        raise InputError(f"{name}: a frames tensor must be (frames, 3, height, width) or (frames, height, "
                         f"width, 3); got shape {tuple(video.shape)}")
    if video.shape[0] == 0:
        raise InputError(f"{name}: the frames tensor has zero frames")
    if video.shape[1] != 3:
        video = video.permute(0, 3, 1, 2)
    if video.dtype != torch.uint8:
        if not video.is_floating_point():
            raise InputError(f"{name}: frames must be uint8 or float, not {video.dtype}")
        if not torch.isfinite(video).all():
            raise InputError(f"{name}: the frames tensor holds NaN or infinite values")
        if video.min() < 0 or video.max() > 1:
            raise InputError(f"{name}: float frames must lie in [0, 1] (or pass uint8 frames in [0, 255])")
        video = (video * 255).round().to(torch.uint8)
    return video.contiguous()


def load_prompt(prompt, sample_rate: Optional[int], target_rate: int, name: str = "prompt_audio"):
    """A style prompt (audio path, or mono float waveform at ``sample_rate``, default the model's)
    → finite float32 (N,) at ``target_rate``."""
    import torch

    if isinstance(prompt, (str, os.PathLike)):
        wave = _read_prompt_file(Path(prompt), target_rate, name)
        where = str(prompt)
    else:
        where = name
        if isinstance(prompt, np.ndarray):
            prompt = torch.from_numpy(prompt)
        if not isinstance(prompt, torch.Tensor) or not prompt.is_floating_point():
            raise InputTypeError(f"{name}: must be an audio file path or a float waveform, "
                             f"not {type(prompt).__name__}")
        if prompt.dim() == 2 and 1 in prompt.shape:
            prompt = prompt.reshape(-1)
        if prompt.dim() != 1:
            raise InputError(f"{name}: the prompt waveform must be mono (N,), got shape {tuple(prompt.shape)}")
        wave = prompt.float().cpu()
        rate = target_rate if sample_rate is None else int(sample_rate)
        if rate != target_rate and wave.numel():
            import torchaudio.functional as AF

            if not torch.isfinite(wave).all():  # before resampling spreads it
                raise InputError(f"{where}: the style prompt holds NaN or infinite samples")
            wave = AF.resample(wave, rate, target_rate)
    if wave.numel() == 0:
        raise InputError(f"{where}: the style prompt is empty")
    if not torch.isfinite(wave).all():
        raise InputError(f"{where}: the style prompt holds NaN or infinite samples")
    return wave.contiguous()


def _read_prompt_file(path: Path, target_rate: int, name: str):
    from muvi.data.audio_io import load_audio

    _check_prompt_file(path, name)
    with _decoding(path):
        return load_audio(path, target_rate)


def _prompt_file_seconds(path: Path, name: str) -> float:
    from muvi.data.audio_io import audio_duration

    _check_prompt_file(path, name)
    with _decoding(path):
        return audio_duration(path)


def _check_prompt_file(path: Path, name: str) -> None:
    if not path.exists():
        raise MissingFileError(f"{_arg(name, path)}: style prompt not found")
    if not path.is_file() or not os.access(path, os.R_OK):
        raise InputError(f"{path}: the style prompt is not a readable file")


@contextlib.contextmanager
def _decoding(path: Path):
    """Decoder errors as one InputError naming the prompt file."""
    from muvi.data.audio_io import MediaReadError

    try:
        yield
    except (MediaReadError, ValueError, RuntimeError) as err:
        reason = one_line(err).replace(str(path), "").strip(": ")
        raise InputError(f"{path}: not a decodable audio file ({reason})") from None


def _check_prompt_length(seconds: float, duration: float, where: str) -> None:
    if seconds > duration + 1e-6:
        raise InputError(f"{where}: the style prompt lasts {seconds:.2f} s, longer than the output "
                         f"({duration:.2f} s); give a shorter prompt")


def _prompt_name(prompt, names: Mapping[str, str]) -> str:
    return str(prompt) if isinstance(prompt, (str, os.PathLike)) else names["prompt_audio"]


# ----------------------------------------------------------------------------- outputs

def check_output(path: PathLike, *, inputs: list[PathLike], overwrite: bool, name: str = "output") -> Path:
    """An output path that may be written: not any input (by path or by file identity), not
    existing unless ``overwrite``, and inside a folder that exists or can be made, writable."""
    path = Path(path)
    for item in inputs:
        item = Path(item)
        if _same_file(path, item):
            raise OutputError(f"{_arg(name, path)}: is an input ({item}); choose another output")
        if item.is_dir() and path.resolve().is_relative_to(item.resolve()):
            raise OutputError(f"{_arg(name, path)}: lies inside the input folder {item}")
    if path.is_dir():
        raise OutputError(f"{_arg(name, path)}: is a folder; give a file name")
    if path.exists() and not overwrite:
        flag = "--overwrite" if name.startswith("-") else "overwrite=True"
        raise OutputExistsError(f"{path} exists; pass {flag} to replace it")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"{_arg(name, path)}: {folder} is not a folder")
    try:  # a real write: permission bits do not tell (root, read-only mounts, /proc)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise OutputError(f"{_arg(name, path)}: the folder {folder} is not writable ({err.strerror})") from None
    return path


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        try:
            return os.path.samefile(a, b)
        except OSError:
            pass
    return a.resolve() == b.resolve()
