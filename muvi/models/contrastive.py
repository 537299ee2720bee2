"""Contrastive music–visual model (paper section 3.2): the adaptor's pre-training and SIM.

The visual side is the visual adaptor over frozen video-encoder tokens; the audio side is a
frozen AudioMAE whose token grid is averaged over frequency, resampled to the video frame rate
and passed through a learnable head. Similarity is position-aware: cosine similarity of the
two sequences at each time step, averaged over time. The loss is CLIP's symmetric cross-entropy
with a learnable temperature (initialised at 0.07), with extra constructed negatives (temporal
shifts, random replacements, silence) added to the music candidates of each video.

Shapes: B batch, T frames at the video rate, D width, E audio-encoder width, K extra negatives.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from muvi.config import Config
from muvi.models.adaptor import AdaptorConfig, VisualAdaptor, resample_time


@dataclasses.dataclass
class ContrastiveConfig(Config):
    audio_dim: int = 768
    width: int = 1024
    #: the adaptor's settings; its width is forced to ``width``.
    adaptor: dict = dataclasses.field(default_factory=dict)
    init_temperature: float = 0.07
    frame_rate: float = 10.0

    PRESETS = {
        "base": dict(audio_dim=768, width=1024, adaptor=dict(encoder_dim=768)),
        "tiny": dict(audio_dim=32, width=64, adaptor=dict(encoder_dim=32)),
    }

    def adaptor_config(self) -> AdaptorConfig:
        return AdaptorConfig.from_dict({**self.adaptor, "width": self.width}, source="contrastive.adaptor")


class AudioHead(nn.Module):
    """Learnable head over frozen AudioMAE features: (B, T, E) → (B, T, D)."""

    def __init__(self, audio_dim: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(audio_dim, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ContrastiveModel(nn.Module):
    """Trainable parts of the contrastive model: adaptor, audio head and temperature.

    The frozen encoders stay outside (their features are cached or computed by the caller).
    """

    def __init__(self, cfg: ContrastiveConfig):
        super().__init__()
        self.config = cfg
        self.adaptor = VisualAdaptor(cfg.adaptor_config())
        self.audio_head = AudioHead(cfg.audio_dim, cfg.width)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    def video_embedding(self, tokens: torch.Tensor, num_frames: int, cls: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Video-encoder tokens (B, N, H, W, C) → (B, T, D) at the frame rate."""
        return self.adaptor(tokens, num_frames, cls)

    def audio_embedding(self, audio_tokens: torch.Tensor, num_frames: int) -> torch.Tensor:
        """AudioMAE tokens (B, P, F', E) or frequency-averaged (B, P, E) → (B, T, D)."""
        if audio_tokens.dim() == 4:
            audio_tokens = audio_tokens.mean(2)
        return self.audio_head(resample_time(audio_tokens, num_frames))

    @staticmethod
    def similarity(video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """Position-aware similarity of (…, T, D) sequences: mean over T of per-frame cosine."""
        return F.cosine_similarity(video, audio, dim=-1).mean(-1)

    @staticmethod
    def similarity_matrix(video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """(B, T, D) × (M, T, D) → (B, M) position-aware similarities."""
        v, a = F.normalize(video, dim=-1), F.normalize(audio, dim=-1)
        return torch.einsum("btd,mtd->bm", v, a) / video.shape[1]

    def loss(self, video: torch.Tensor, audio: torch.Tensor,
             negatives: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict]:
        """CLIP loss over a batch of pairs, with ``negatives`` (B, K, T, D) per video.

        Video → music: each video's candidates are all B music clips plus its own K constructed
        negatives. Music → video: the B videos. Returns the loss and a few diagnostics.
        """
        b = video.shape[0]
        scale = self.logit_scale.exp().clamp(max=100.0)
        sims = self.similarity_matrix(video, audio)                         # (B, B)
        logits_v = sims
        if negatives is not None and negatives.shape[1]:
            neg = self.similarity(video[:, None], negatives)                  # (B, K)
            logits_v = torch.cat([sims, neg], dim=1)
        target = torch.arange(b, device=video.device)
        loss = 0.5 * (F.cross_entropy(scale * logits_v, target) + F.cross_entropy(scale * sims.T, target))
        stats = {"pos_sim": sims.diagonal().mean().detach(), "temperature": (1 / scale).detach()}
        if negatives is not None and negatives.shape[1]:
            stats["neg_sim"] = neg.mean().detach()
        return loss, stats
