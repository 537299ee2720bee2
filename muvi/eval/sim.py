"""SIM (paper section 5): the position-aware similarity of a video and its music, measured with
a trained contrastive model (:class:`muvi.models.contrastive.ContrastiveModel`) and its two
frozen encoders.

A SIM model is a folder of three components (:mod:`muvi.hub`): ``contrastive`` (what learnt),
``video_encoder`` and ``audio_encoder`` (each saved with its weights, or recording the packaged
encoder it is rebuilt from, e.g. ``efficientnet-lite0:tubelet_size=1`` and ``musicnn``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import nn

from muvi import hub
from muvi.encoders.frames import encode_frames, encode_music
from muvi.errors import MissingFileError
from muvi.models.contrastive import ContrastiveModel

EncoderArg = Union[None, str, Path, nn.Module]


class SimilarityScorer(nn.Module):
    """A trained :class:`ContrastiveModel` with its two frozen encoders: the SIM metric.

    ``similarity(video_path, waveform, sample_rate)`` is the position-aware similarity in
    [-1, 1] of the video (read at the model's frame rate) and the music, over the frames both
    cover (the longer one is cut). Everything is frozen and in eval mode. ``max_batch`` bounds
    the video clips encoded at once, so long videos fit in memory.
    """

    def __init__(self, model: ContrastiveModel, video_encoder: nn.Module, audio_encoder: nn.Module,
                 max_batch: int = 16):
        super().__init__()
        self.model, self.video_encoder, self.audio_encoder = model, video_encoder, audio_encoder
        self.max_batch = max_batch
        self.eval().requires_grad_(False)
        cfg = model.config
        if video_encoder.config.hidden_size != cfg.adaptor_config().encoder_dim:
            raise ValueError(f"video encoder width {video_encoder.config.hidden_size} != the adaptor's "
                             f"encoder_dim {cfg.adaptor_config().encoder_dim}")
        if audio_encoder.config.hidden_size != cfg.audio_dim:
            raise ValueError(f"audio encoder width {audio_encoder.config.hidden_size} != audio_dim {cfg.audio_dim}")

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @torch.no_grad()
    def score(self, frames: torch.Tensor, waveform, sample_rate: int) -> float:
        """uint8 frames (F, 3, H, W) at ``config.frame_rate`` and mono music (N,) → SIM."""
        fps = self.model.config.frame_rate
        wave = torch.as_tensor(np.asarray(waveform, dtype=np.float32))
        if wave.dim() == 2:  # (channels, N)
            wave = wave.mean(0)
        if wave.dim() != 1:
            raise ValueError(f"expected mono (N,) or (channels, N) music, got shape {tuple(wave.shape)}")
        t = min(frames.shape[0], int(math.floor(wave.shape[0] * fps / sample_rate + 1e-6)))
        if t < 1:
            raise ValueError(f"video ({frames.shape[0]} frames) and music ({wave.shape[0]} samples at "
                             f"{sample_rate} Hz) share no whole frame at {fps} fps")
        wave = wave[: int(round(t * sample_rate / fps))]
        tokens = encode_frames(self.video_encoder, frames[None, :t], self.max_batch)
        feats = encode_music(self.audio_encoder, wave[None].to(self.device), sample_rate, fps, t)
        video = self.model.video_embedding(tokens, t)
        audio = self.model.audio_embedding(feats, t)
        return float(self.model.similarity(video, audio)[0])

    def similarity(self, video_path: str, waveform, sample_rate: int) -> float:
        from muvi.video import read_frames

        frames = read_frames(video_path, self.model.config.frame_rate, size=self.video_encoder.config.image_size)
        return self.score(frames, waveform, sample_rate)

    def save_pretrained(self, directory: Union[str, Path], *, video_source: Optional[str] = None,
                        audio_source: Optional[str] = None) -> Path:
        """Write the three components into ``directory``. A source is a :func:`muvi.hub.load_encoder`
        spec of a packaged or published encoder (``efficientnet-lite0``, ``musicnn``, a checkpoint
        path): the encoder is then recorded, not copied. An encoder without one (random weights)
        is saved with its weights, so SIM stays reproducible."""
        directory = Path(directory)
        hub.save_component(self.model, directory, "contrastive")
        hub.save_component(self.video_encoder, directory, "video_encoder", source=video_source)
        hub.save_component(self.audio_encoder, directory, "audio_encoder", source=audio_source)
        return directory

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], *, video_encoder: EncoderArg = None,
                        audio_encoder: EncoderArg = None, device: Union[str, torch.device] = "cpu"
                        ) -> "SimilarityScorer":
        """Load a folder written by :meth:`save_pretrained` (a run's ``final/``; a run folder works too).

        Each encoder: a module, a :func:`muvi.hub.load_encoder` spec, or None for the one in the folder.
        """
        directory = Path(directory)
        if not (directory / "contrastive.json").is_file() and (directory / "final" / "contrastive.json").is_file():
            directory = directory / "final"
        if not (directory / "contrastive.json").is_file():
            raise MissingFileError(f"{directory}: not a SIM model (no contrastive.json)")
        model = hub.load_component(directory, "contrastive", types=("contrastive",))
        encoders = []
        for side, arg in (("video", video_encoder), ("audio", audio_encoder)):
            if isinstance(arg, nn.Module):
                encoders.append(arg)
            elif arg is not None:
                encoders.append(hub.load_encoder(arg, side)[0])
            else:
                encoders.append(hub.load_component(directory, f"{side}_encoder", types=hub.ENCODER_TYPES[side],
                                                   frozen=True))
        return cls(model, *encoders).to(device)
