"""Running the frozen encoders: the one frame pipeline (resize → standardise → encode) that
inference, feature extraction, contrastive training and SIM all use, and music features.

An encoder with a class token (CLIP: it has ``encode_with_cls``) also gives one CLS vector per
token step, the query of the adaptor's ``attention`` and ``cls`` aggregations; ``with_cls=True``
returns it beside the patch tokens as :class:`VideoFeatures` (``cls`` None for the others).

Shapes: B videos, F frames at the encoder's rate, (N, h, w, E) token steps × patch grid × width.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional, Union

import torch
from torch import nn

from muvi.video import encoder_input, probe_video, read_frames, resize_center_crop


class VideoFeatures(NamedTuple):
    """What a frozen video encoder gives the adaptor: patch tokens (..., N, h, w, E) and, from
    an encoder with a class token (CLIP), its CLS tokens (..., N, E); None from the others."""

    tokens: torch.Tensor
    cls: Optional[torch.Tensor] = None


def has_cls(encoder: nn.Module) -> bool:
    """Whether ``encoder`` gives CLS tokens (``encode_with_cls``, as :class:`~muvi.encoders.clip.CLIPEncoder`)."""
    return callable(getattr(encoder, "encode_with_cls", None))


@torch.no_grad()
def encode_frames(encoder: nn.Module, frames: torch.Tensor, max_batch: Optional[int] = None, *,
                  with_cls: bool = False) -> Union[torch.Tensor, VideoFeatures]:
    """uint8 frames (B, F, 3, H, W) → tokens (B, N, h, w, E) on the encoder's device, without
    gradients. Frames not at the encoder's size are resized and centre-cropped; they are
    standardised in chunks on the encoder's device. ``max_batch``: clips encoded at once
    (None: the encoder's default). ``with_cls``: :class:`VideoFeatures` instead, with the CLS
    tokens (B, N, E) of an encoder that has them (else None); the tokens are the same."""
    size = encoder.config.image_size
    if frames.shape[-2:] != (size, size):
        b = frames.shape[0]
        frames = resize_center_crop(frames.flatten(0, 1), size).unflatten(0, (b, -1))
    device = next(encoder.parameters()).device
    x = encoder_input(frames, encoder.normalize, device)
    batch = {} if max_batch is None else {"max_batch": max_batch}
    if not with_cls:
        return encoder.encode(x, **batch)
    if has_cls(encoder):
        return VideoFeatures(*encoder.encode_with_cls(x, **batch))
    return VideoFeatures(encoder.encode(x, **batch))


@torch.no_grad()
def encode_video_file(path: str | os.PathLike, encoder: nn.Module, *, fps: float = 10.0,
                      num_frames: Optional[int] = None, window_seconds: float = 64.0,
                      max_batch: Optional[int] = 32, with_cls: bool = False) -> Union[torch.Tensor, VideoFeatures]:
    """Tokens (N, h, w, E) float32 on the CPU of the first ``num_frames`` frames at ``fps``
    (default: the whole video), N = ceil(num_frames / tubelet); ``with_cls``: :class:`VideoFeatures`
    with the CLS tokens (N, E) too (None from an encoder without them).

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
    tokens, cls = [], []
    for start in range(0, num_frames, window):
        stop, first = min(start + window, num_frames), start
        if stop - start < clip and start > 0:
            first, drop = start - clip, cfg.steps_per_clip
        else:
            drop = 0
        frames = read_frames(path, fps, start=first / fps, duration=(stop - first) / fps, size=cfg.image_size,
                             info=info)
        out = encode_frames(encoder, frames[None], max_batch, with_cls=True)
        tokens.append(out.tokens[0, drop:].float().cpu())
        if out.cls is not None:
            cls.append(out.cls[0, drop:].float().cpu())
    features = VideoFeatures(torch.cat(tokens), torch.cat(cls) if cls else None)
    return features if with_cls else features.tokens


def encode_music(encoder: nn.Module, waveforms: torch.Tensor, sample_rate: int, fps: float,
                 num_frames: int) -> torch.Tensor:
    """Waveforms (B, N) → frozen music features at the frame rate (B, T, E), without gradients.

    Always fp32 (autocast off): the log-mel front ends lose too much in bf16, and the audio
    encoder costs little next to the video encoder.
    """
    with torch.no_grad(), torch.autocast(device_type=waveforms.device.type, enabled=False):
        return encoder.frame_features(waveforms.float(), sample_rate, fps, num_frames)
