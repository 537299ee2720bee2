"""Checking and loading what users pass to :func:`muvi.generate`: videos and style prompts."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from muvi import video as video_io

PathLike = Union[str, Path]


def load_video_frames(video, *, fps: Optional[float], duration: Optional[float], target_fps: float,
                      max_duration: float) -> tuple[torch.Tensor, float, str]:
    """A video path or a frames tensor → (uint8 frames (F, 3, H, W) at ``target_fps``,
    duration in seconds, a name for messages)."""
    if isinstance(video, (str, Path)):
        source = str(video)
        src_fps, total = video_io.video_info(video)
        length = total / src_fps
        duration = _check_duration(duration, length, max_duration, source)
        return video_io.read_frames(video, target_fps, duration=duration), duration, source
    if isinstance(video, np.ndarray):
        video = torch.from_numpy(video)
    if not isinstance(video, torch.Tensor):
        raise TypeError(f"video must be a file path or a frames tensor, got {type(video).__name__}")
    source = "<tensor>"
    if fps is None or not fps > 0:
        raise ValueError("a frames tensor needs its frame rate: pass fps=… (frames per second)")
    frames = _frames_layout(video)
    duration = _check_duration(duration, frames.shape[0] / fps, max_duration, source)
    count = video_io.duration_frames(duration, target_fps)
    return video_io.resample_frames(frames, fps, target_fps, count), duration, source


def _frames_layout(video: torch.Tensor) -> torch.Tensor:
    """Accept (F, 3, H, W) or (F, H, W, 3), uint8 in [0, 255] or float in [0, 1]."""
    if video.dim() != 4 or 3 not in (video.shape[1], video.shape[-1]):
        raise ValueError(f"a frames tensor must be (frames, 3, height, width) or (frames, height, "
                         f"width, 3); got shape {tuple(video.shape)}")
    if video.shape[0] == 0:
        raise ValueError("the frames tensor has zero frames")
    if video.shape[1] != 3:
        video = video.permute(0, 3, 1, 2)
    if video.dtype != torch.uint8:
        if not video.is_floating_point():
            raise ValueError(f"frames must be uint8 or float, got {video.dtype}")
        if video.min() < 0 or video.max() > 1:
            raise ValueError("float frames must lie in [0, 1] (or pass uint8 frames in [0, 255])")
        video = (video * 255).round().to(torch.uint8)
    return video.contiguous()


def _check_duration(duration: Optional[float], length: float, max_duration: float, source: str) -> float:
    if duration is None:
        duration = length
        if duration > max_duration:
            raise ValueError(f"{source}: the video lasts {length:.1f} s, longer than this model's limit "
                             f"of {max_duration:.0f} s; pass duration=… to score a part of it")
        return duration
    duration = float(duration)
    if not duration > 0:
        raise ValueError(f"duration must be positive, got {duration}")
    if duration > max_duration:
        raise ValueError(f"duration {duration:.1f} s is longer than this model's limit of {max_duration:.0f} s")
    if duration > length + 1e-6:
        raise ValueError(f"{source}: duration {duration:.2f} s is longer than the video ({length:.2f} s)")
    return duration


def load_prompt(prompt, sample_rate: Optional[int], target_rate: int) -> torch.Tensor:
    """A style prompt (audio path, or mono waveform with its sample rate) → (N,) at ``target_rate``."""
    if isinstance(prompt, (str, Path)):
        from muvi.data.audio_io import load_audio

        wave = load_audio(prompt, target_rate)
    else:
        if isinstance(prompt, np.ndarray):
            prompt = torch.from_numpy(prompt)
        if not isinstance(prompt, torch.Tensor) or not prompt.is_floating_point():
            raise TypeError("prompt_audio must be an audio file path or a float waveform")
        if prompt.dim() == 2 and 1 in prompt.shape:
            prompt = prompt.reshape(-1)
        if prompt.dim() != 1:
            raise ValueError(f"prompt waveform must be mono (N,), got shape {tuple(prompt.shape)}")
        wave = prompt.float()
        rate = target_rate if sample_rate is None else int(sample_rate)
        if rate != target_rate:
            import torchaudio.functional as AF

            wave = AF.resample(wave, rate, target_rate)
    if wave.numel() == 0:
        raise ValueError("the style prompt is empty")
    return wave
