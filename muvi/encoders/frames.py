"""Running the frozen encoders: the one frame pipeline (resize → standardise → encode) that
inference, feature extraction, contrastive training and SIM all use, and music features.

Shapes: B videos, F frames at the encoder's rate, (N, h, w, E) token steps × patch grid × width.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from muvi.video import encoder_input, probe_video, read_frames, resize_center_crop


@torch.no_grad()
def encode_frames(encoder: nn.Module, frames: torch.Tensor, max_batch: Optional[int] = None) -> torch.Tensor:
    """uint8 frames (B, F, 3, H, W) → tokens (B, N, h, w, E) on the encoder's device, without
    gradients. Frames not at the encoder's size are resized and centre-cropped; they are
    standardised in chunks on the encoder's device. ``max_batch``: clips encoded at once
    (None: the encoder's default)."""
    size = encoder.config.image_size
    if frames.shape[-2:] != (size, size):
        b = frames.shape[0]
        frames = resize_center_crop(frames.flatten(0, 1), size).unflatten(0, (b, -1))
    device = next(encoder.parameters()).device
    x = encoder_input(frames, encoder.normalize, device)
    return encoder.encode(x) if max_batch is None else encoder.encode(x, max_batch=max_batch)


@torch.no_grad()
def encode_video_file(path: str | os.PathLike, encoder: nn.Module, *, fps: float = 10.0,
                      num_frames: Optional[int] = None, window_seconds: float = 64.0,
                      max_batch: Optional[int] = 32) -> torch.Tensor:
    """Tokens (N, h, w, E) float32 on the CPU of the first ``num_frames`` frames at ``fps``
    (default: the whole video), N = ceil(num_frames / tubelet).

    Decoding goes in windows of about ``window_seconds`` (a multiple of the encoder's clip) so
    long videos never sit in memory whole. The result equals one ``encoder.encode`` over the
    whole video: clips never straddle a window start, and a final window shorter than one clip
    is read together with the clip before it so that it gets the same last-clip treatment.
    """
    cfg = encoder.config
    info = probe_video(path)
    if num_frames is None:
        num_frames = int(round(info.duration * fps))
    clip = cfg.num_frames
    window = max(1, int(window_seconds * fps) // clip) * clip
    out = []
    for start in range(0, num_frames, window):
        stop, first = min(start + window, num_frames), start
        if stop - start < clip and start > 0:
            first, drop = start - clip, cfg.steps_per_clip
        else:
            drop = 0
        frames = read_frames(path, fps, start=first / fps, duration=(stop - first) / fps, size=cfg.image_size,
                             info=info)
        out.append(encode_frames(encoder, frames[None], max_batch)[0, drop:].float().cpu())
    return torch.cat(out)


def encode_music(encoder: nn.Module, waveforms: torch.Tensor, sample_rate: int, fps: float,
                 num_frames: int) -> torch.Tensor:
    """Waveforms (B, N) → frozen music features at the frame rate (B, T, E), without gradients.

    Always fp32 (autocast off): the log-mel front ends lose too much in bf16, and the audio
    encoder costs little next to the video encoder.
    """
    with torch.no_grad(), torch.autocast(device_type=waveforms.device.type, enabled=False):
        return encoder.frame_features(waveforms.float(), sample_rate, fps, num_frames)
