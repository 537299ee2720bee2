"""Contrastive music–visual model (paper section 3.2): the adaptor's pre-training and SIM.

The visual side is the visual adaptor over frozen video-encoder tokens; the audio side is a
frozen AudioMAE whose token grid is averaged over frequency, resampled to the video frame rate
and passed through a learnable head. Similarity is position-aware: cosine similarity of the
two sequences at each time step, averaged over time. The loss is CLIP's symmetric cross-entropy
with a learnable temperature (initialised at 0.07), with extra constructed negatives (temporal
shifts, random replacements, silence) added to the music candidates of each video.

The frozen encoders are kept out of :class:`ContrastiveModel` (its checkpoint holds only what
learns); :func:`frozen_video_tokens` and :func:`frozen_music_features` run them without
gradients, and :class:`SimilarityScorer` bundles all three for the SIM metric.

Shapes: B batch, T frames at the video rate, D width, E audio-encoder width, K extra negatives,
F video frames, N samples, (N', h, w, E') video-encoder tokens.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from muvi.checkpoint import load_strict, load_weights, read_state_dict, save_weights
from muvi.config import Config
from muvi.models.adaptor import AdaptorConfig, VisualAdaptor, resample_time

logger = logging.getLogger(__name__)

#: File names inside a trained contrastive folder (the recipe's ``final/``).
WEIGHTS_NAME, CONFIG_NAME, ENCODERS_NAME = "contrastive.safetensors", "contrastive.json", "contrastive_encoders.json"


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


# ----------------------------------------------------------------------------- frozen encoders

def frozen_video_tokens(encoder: nn.Module, frames: torch.Tensor, max_batch: Optional[int] = None) -> torch.Tensor:
    """uint8 frames (B, F, 3, H, W) at the frame rate → video-encoder tokens (B, N', h, w, E'),
    without gradients. Frames not at the encoder's size are resized and centre-cropped."""
    from muvi.video import encoder_input, resize_center_crop

    size = encoder.config.image_size
    if frames.shape[-2:] != (size, size):
        b = frames.shape[0]
        frames = resize_center_crop(frames.flatten(0, 1), size).unflatten(0, (b, -1))
    with torch.no_grad():
        return encoder.encode(encoder_input(frames, encoder.normalize), max_batch=max_batch)


def frozen_music_features(encoder: nn.Module, waveforms: torch.Tensor, sample_rate: int, fps: float,
                          num_frames: int) -> torch.Tensor:
    """Waveforms (B, N) → AudioMAE features at the frame rate (B, T, E), without gradients.

    Always fp32 (autocast off): the log-mel front end loses too much in bf16, and AudioMAE costs
    little next to the video encoder.
    """
    with torch.no_grad(), torch.autocast(device_type=waveforms.device.type, enabled=False):
        return encoder.frame_features(waveforms.float(), sample_rate, fps, num_frames)


# ----------------------------------------------------------------------------- SIM

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
        tokens = frozen_video_tokens(self.video_encoder, frames[None, :t].to(self.device), self.max_batch)
        feats = frozen_music_features(self.audio_encoder, wave[None].to(self.device), sample_rate, fps, t)
        video = self.model.video_embedding(tokens, t)
        audio = self.model.audio_embedding(feats, t)
        return float(self.model.similarity(video, audio)[0])

    def similarity(self, video_path: str, waveform, sample_rate: int) -> float:
        from muvi.video import read_frames

        frames = read_frames(video_path, self.model.config.frame_rate, size=self.video_encoder.config.image_size)
        return self.score(frames, waveform, sample_rate)

    def save_pretrained(self, directory: Union[str, Path], *, video_source: Optional[str] = None,
                        audio_source: Optional[str] = None) -> None:
        """Write ``contrastive.safetensors`` + ``contrastive.json`` (the learnt model) and
        ``contrastive_encoders.json`` (where the frozen encoders come from).

        A source is a spec the encoder loaders accept (``muvi.pipeline.load_video_encoder``,
        ``muvi.models.music_encoder.load_audio_encoder``): a checkpoint path or a packaged name
        such as ``efficientnet-lite0`` or ``musicnn``. An encoder without one (random weights) is
        saved beside as ``contrastive_{video,audio}_encoder.{safetensors,json}``, so SIM stays
        reproducible.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_weights(self.model, directory / WEIGHTS_NAME)
        self.model.config.to_json(directory / CONFIG_NAME)
        record = {}
        for side, encoder, source in (("video", self.video_encoder, video_source),
                                      ("audio", self.audio_encoder, audio_source)):
            kind = _encoder_kind(encoder)
            if source is None:
                save_weights(encoder, directory / f"contrastive_{side}_encoder.safetensors")
                encoder.config.to_json(directory / f"contrastive_{side}_encoder.json")
            elif Path(source).is_file():
                source = str(Path(source).resolve())
            record[f"{side}_encoder"] = {"kind": kind, "source": source, "config": encoder.config.to_dict()}
        (directory / ENCODERS_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], *, video_encoder: EncoderArg = None,
                        audio_encoder: EncoderArg = None, device: Union[str, torch.device] = "cpu"
                        ) -> "SimilarityScorer":
        """Load a folder written by :meth:`save_pretrained` (a run's ``final/``; a run folder works too).

        Each encoder: a module, a spec (path or packaged name), or None for the file saved in
        the folder or, failing that, the source recorded at training time.
        """
        directory = Path(directory)
        if not (directory / WEIGHTS_NAME).is_file() and (directory / "final" / WEIGHTS_NAME).is_file():
            directory = directory / "final"
        if not (directory / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
        model = ContrastiveModel(ContrastiveConfig.from_json(directory / CONFIG_NAME))
        load_weights(model, directory / WEIGHTS_NAME, source=CONFIG_NAME)
        record_path = directory / ENCODERS_NAME
        record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
        encoders = [_resolve_encoder(side, arg, directory, record.get(f"{side}_encoder", {}))
                    for side, arg in (("video", video_encoder), ("audio", audio_encoder))]
        return cls(model, *encoders).to(device)


def _encoder_kinds() -> dict:
    """kind → (module class, config class, load(path, config) for a file saved beside)."""
    from muvi.eval.musicnn import Musicnn, MusicnnConfig
    from muvi.models.audiomae import AudioMAEConfig, AudioMAEEncoder, load_audiomae_encoder
    from muvi.models.frame_encoder import FrameEncoder, FrameEncoderConfig, load_frame_encoder
    from muvi.models.music_encoder import MusicnnFrameEncoder
    from muvi.models.videomae import VideoMAEConfig, VideoMAEEncoder, load_videomae_encoder

    def load_musicnn(path, config):
        encoder = MusicnnFrameEncoder(Musicnn(config))
        load_strict(encoder, read_state_dict(path), source=str(path))
        return encoder

    return {"videomae": (VideoMAEEncoder, VideoMAEConfig, load_videomae_encoder),
            "efficientnet-lite": (FrameEncoder, FrameEncoderConfig, load_frame_encoder),
            "audiomae": (AudioMAEEncoder, AudioMAEConfig, load_audiomae_encoder),
            "musicnn": (MusicnnFrameEncoder, MusicnnConfig, load_musicnn)}


def _encoder_kind(encoder: nn.Module) -> str:
    for kind, (module_cls, _, _) in _encoder_kinds().items():
        if isinstance(encoder, module_cls):
            return kind
    raise TypeError(f"no saving rule for a {type(encoder).__name__} encoder")


def _resolve_encoder(side: str, arg: EncoderArg, directory: Path, record: dict) -> nn.Module:
    from muvi.models.music_encoder import load_audio_encoder
    from muvi.pipeline import load_video_encoder

    def from_spec(spec: str) -> nn.Module:
        return load_video_encoder(spec)[0] if side == "video" else load_audio_encoder(spec)[0]

    if isinstance(arg, nn.Module):
        return arg
    if arg is not None:
        return from_spec(str(arg))
    saved = directory / f"contrastive_{side}_encoder.safetensors"
    kind = record.get("kind", "videomae" if side == "video" else "audiomae")  # older folders: the paper's
    if saved.is_file():
        _, config_cls, load = _encoder_kinds()[kind]
        return load(saved, config_cls.from_json(saved.with_suffix(".json")))
    source = record.get("source", record.get("path"))
    if source and (Path(source).is_file() or not any(c in source for c in "/\\")):
        return from_spec(source)
    raise FileNotFoundError(f"{directory}: no {side} encoder saved and the one recorded at training time "
                            f"({source}) is not there; pass {side}_encoder=PATH")


def load_similarity_model(path: Union[str, Path], **kwargs) -> SimilarityScorer:
    """What ``python -m muvi.eval --contrastive PATH`` loads: :meth:`SimilarityScorer.from_pretrained`."""
    return SimilarityScorer.from_pretrained(path, **kwargs)
