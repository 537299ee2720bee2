"""Contrastive music–visual model (paper section 3.2): the adaptor's pre-training.

The visual side is the visual adaptor over frozen video-encoder tokens; the audio side is a
frozen AudioMAE whose token grid is averaged over frequency, resampled to the video frame rate
and passed through a learnable head. Similarity is position-aware: cosine similarity of the
two sequences at each time step, averaged over time. The loss is CLIP's symmetric cross-entropy
with a learnable temperature (initialised at 0.07), with extra constructed negatives (temporal
shifts, random replacements, silence) added to the music candidates of each video.

The frozen encoders are kept out of :class:`ContrastiveModel` (its checkpoint holds only what
learns): :mod:`muvi.encoders.frames` runs them, and :class:`muvi.eval.sim.SimilarityScorer`
bundles all three for the SIM metric.

Shapes: B batch, T frames at the video rate, D width, E audio-encoder width, K extra negatives,
F video frames, N samples, (N', h, w, E') video-encoder tokens.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from muvi.config import Config
from muvi.models.adaptor import AdaptorConfig, VisualAdaptor, resample_time

logger = logging.getLogger(__name__)


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

    def video_embedding(self, tokens: torch.Tensor, num_frames: int,
                        cls: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Video-encoder tokens (B, N, H, W, C) → (B, T, D) at the frame rate."""
        return self.adaptor(tokens, num_frames, cls)

    def audio_embedding(self, audio_tokens: torch.Tensor, num_frames: int) -> torch.Tensor:
        """AudioMAE tokens (B, P, F', E) or frequency-averaged (B, P, E) → (B, T, D).

        Features already at the frame rate (``AudioMAEEncoder.frame_features``, which places each
        patch at its true time) pass through the resampling unchanged; prefer them.
        """
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

    def loss(self, video: torch.Tensor, audio: torch.Tensor, negatives: Optional[torch.Tensor] = None,
             gather: bool = False) -> tuple[torch.Tensor, dict]:
        """CLIP loss over a batch of pairs, with ``negatives`` (B, K, T, D) per video.

        Video → music: each video's candidates are all the batch's music clips plus its own K
        constructed negatives. Music → video: all the batch's videos. With ``gather`` in a
        distributed run the batch is the GLOBAL one: every process gathers the others' video and
        music embeddings (gradients flow back to their owners) and scores its own rows against
        all of them, so that, after DDP averages the gradients, training sees the loss of the
        whole global batch (the paper's batch of 160 spread over processes). Every process must
        then hold the same B and T. Returns the loss and a few diagnostics.
        """
        b = video.shape[0]
        # Similarities and softmax in fp32 even under bf16 autocast: the logits are scaled by up to 100.
        video, audio = video.float(), audio.float()
        negatives = negatives.float() if negatives is not None else None
        scale = self.logit_scale.exp().clamp(max=100.0)
        dist = torch.distributed
        if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            offset = dist.get_rank() * b                                     # this process's rows
            sims = self.similarity_matrix(video, gather_with_grad(audio))   # (B, world · B)
            sims_a = self.similarity_matrix(audio, gather_with_grad(video))  # music → every video
        else:
            offset, sims = 0, self.similarity_matrix(video, audio)          # (B, B)
            sims_a = sims.T
        logits_v = sims
        if negatives is not None and negatives.shape[1]:
            neg = self.similarity(video[:, None], negatives)                  # (B, K)
            logits_v = torch.cat([sims, neg], dim=1)
        target = torch.arange(offset, offset + b, device=video.device)
        loss = 0.5 * (F.cross_entropy(scale * logits_v, target) + F.cross_entropy(scale * sims_a, target))
        positives = sims[:, offset:offset + b].diagonal()
        stats = {"pos_sim": positives.mean().detach(), "temperature": (1 / scale).detach(),
                 "v2m_accuracy": (logits_v.argmax(1) == target).float().mean().detach()}
        if sims.shape[1] > 1:
            stats["batch_neg_sim"] = ((sims.sum() - positives.sum()) / (sims.numel() - b)).detach()
        if negatives is not None and negatives.shape[1]:
            stats["neg_sim"] = neg.mean().detach()
            stats["neg_sims"] = neg.detach()  # (B, K): lets the caller split by negative kind
        return loss, stats

    def forward(self, video_tokens: torch.Tensor, music_features: torch.Tensor,
                negative_features: Optional[torch.Tensor] = None,
                cls: Optional[torch.Tensor] = None, gather: bool = False) -> tuple[torch.Tensor, dict]:
        """The training step's loss from frozen features, in one call (so DDP sees a forward).

        ``video_tokens`` (B, N', h, w, E'); ``music_features`` (B, T, E) and
        ``negative_features`` (B, K, T, E) at the frame rate, T frames each. ``gather``: see
        :meth:`loss`.
        """
        b, t = music_features.shape[:2]
        video = self.video_embedding(video_tokens, t, cls)
        if negative_features is None or not negative_features.shape[1]:
            return self.loss(video, self.audio_embedding(music_features, t), gather=gather)
        k = negative_features.shape[1]
        audio = self.audio_embedding(torch.cat([music_features, negative_features.flatten(0, 1)]), t)
        return self.loss(video, audio[:b], audio[b:].unflatten(0, (b, k)), gather=gather)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands each process the gradient of its own slice
    summed over every process's loss (an all-reduce, which every backend has, then a slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        dist = torch.distributed
        ctx.rank, ctx.size = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every process's ``x`` concatenated along dim 0 in rank order (same shape on every process),
    differentiable: see :class:`_GatherWithGrad`."""
    return _GatherWithGrad.apply(x)
