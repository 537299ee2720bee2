"""The inference pipeline: video in, music out.

``MuviPipeline`` holds the frozen video encoder, the visual adaptor, the DiT, the VAE and the
vocoder, and runs them in order (SPEC.md):

video ─10 FPS─▶ encoder ─▶ adaptor ─▶ condition (10 Hz) ─▶ CFG Euler over the DiT ─▶ latent
      ─▶ VAE decoder ─▶ mel (80 frames/s) ─▶ HiFi-GAN ─▶ 24 kHz waveform
(the paper's rates; a release may use another mel, e.g. the bundled demo's 22.05 kHz, hop 256,
for the published HiFi-GAN: the latent and condition rate follow it).

A release folder holds one :mod:`muvi.hub` component per stage (``<name>.json`` + ``<name>.safetensors``)
and ``config.json`` (:class:`PipelineConfig`); every component is built from its config and its
weights loaded strictly.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from muvi import hub
from muvi import video as video_io
from muvi.config import RELEASE_FORMAT, Config, ConfigError, read_json
from muvi.encoders.frames import encode_frames, has_cls
from muvi.errors import GenerationError, InputError, MissingFileError
from muvi.flow import evaluations
from muvi.loudness import TARGET_RANGE, is_target, master
from muvi.memory import page_out_mapped, release_freed_memory
from muvi.models.adaptor import AdaptorConfig, VisualAdaptor
from muvi.models.dit import DiT, DiTConfig
from muvi.models.hifigan import HiFiGANConfig, HiFiGANGenerator
from muvi.models.mel import MelConfig, MelSpectrogram
from muvi.models.v2m import VideoToMusicFlow, noise
from muvi.models.vae import MelVAE, VAEConfig
from muvi.output import GenerationOutput
from muvi.windows import crossfade_into, plan_windows

if TYPE_CHECKING:
    from muvi.inputs import ModelLimits, Request

logger = logging.getLogger(__name__)

FORMAT_VERSION = RELEASE_FORMAT  # 2: a folder of muvi.hub components + config.json (1: one config.json)

#: component name in a release -> the types it may have
COMPONENTS = {"video_encoder": hub.ENCODER_TYPES["video"], "adaptor": ("adaptor",), "dit": ("dit",),
              "vae": ("vae",), "vocoder": ("hifigan",), "mel": ("mel",)}

#: preset name -> preset name per component (for random pipelines: tests and benchmarks).
PRESETS = {
    "tiny": dict(video_encoder="tiny", adaptor="tiny", dit="tiny", vae="tiny", vocoder="tiny"),
    "small": dict(video_encoder="vit-b", adaptor="base", dit="small", vae="base", vocoder="v1-24k"),
    "base": dict(video_encoder="vit-b", adaptor="base", dit="base", vae="base", vocoder="v1-24k"),
    "large": dict(video_encoder="vit-b", adaptor="base", dit="large", vae="base", vocoder="v1-24k"),
}


@dataclasses.dataclass
class PipelineConfig(Config):
    """How the components are wired: rates, the window the DiT was trained on, and limits.

    A video longer than ``window_seconds`` is scored window by window (:mod:`muvi.windows`):
    each next window continues the last ``context_seconds`` of music before it as its clean
    prefix and overlaps it by ``crossfade_seconds``, where the two are crossfaded."""

    video_fps: float = 10.0      # frames per second fed to the video encoder (paper: 10)
    latent_rate: float = 10.0    # latent frames per second (80 mel frames/s ÷ 8)
    max_duration: Optional[float] = None  # longest output in seconds this release accepts (None: any)
    default_cfg_scale: float = 4.0
    default_prompt_scale: float = 0.0  # guidance on a style prompt (muvi.flow.prompt_guided_velocity)
    window_seconds: float = 30.0     # the longest clip the DiT was trained on (paper: 30 s)
    context_seconds: float = 10.0    # prefix of each next window (paper's ICL: ≤ 14 s and ≤ 33 %)
    crossfade_seconds: float = 1.0   # overlap of two windows, joined with an equal-power crossfade
    # a VAE with ``mel_noise`` decodes a draw of the mel, not its mean (MelVAE.sample_mel): its
    # fitted residual's spread times this (0: the mean; 0.5 chosen on the demo's validation
    # pairs); a VAE without it decodes the mean whatever this is
    mel_noise_scale: float = 0.5
    # master every output to this integrated loudness in LUFS (ITU-R BS.1770; muvi.loudness.master:
    # one gain for the whole track and a look-ahead limiter holding the sample peak at -1 dBFS);
    # None: the level as the vocoder makes it (the paper's output)
    loudness_lufs: Optional[float] = None

    def window_frames(self) -> tuple[int, int, int]:
        """(window, context, crossfade) in latent frames, checked for :func:`muvi.windows.plan_windows`."""
        frames = [int(round(s * self.latent_rate)) for s in
                  (self.window_seconds, self.context_seconds, self.crossfade_seconds)]
        window, context, crossfade = frames
        if window < 1 or context < 0 or crossfade < 0 or window - context - crossfade < 1:
            raise ConfigError(f"window_seconds {self.window_seconds}, context_seconds {self.context_seconds} "
                              f"and crossfade_seconds {self.crossfade_seconds} leave no new music per window; "
                              f"the window must be longer than context + crossfade")
        if self.max_duration is not None and not self.max_duration > 0:
            raise ConfigError(f"max_duration {self.max_duration} must be positive (or null: any length)")
        return window, context, crossfade


class MuviPipeline(nn.Module):
    def __init__(self, config: PipelineConfig, video_encoder: nn.Module, adaptor: VisualAdaptor,
                 dit: DiT, vae: MelVAE, vocoder: HiFiGANGenerator, mel: MelSpectrogram):
        super().__init__()
        self.config = config
        self.video_encoder = video_encoder
        self.flow = VideoToMusicFlow(dit, adaptor)  # the objective the DiT was trained with
        self.vae, self.vocoder, self.mel = vae, vocoder, mel
        if mel.config.center:
            raise ConfigError("the pipeline's mel must frame with center=False (T · hop samples give T frames), "
                              "as the VAE and the vocoder were trained")
        hop = self.latent_hop
        if abs(mel.config.sample_rate / hop - config.latent_rate) > 1e-6:
            raise ConfigError(f"latent_rate {config.latent_rate} does not match the mel/VAE setting "
                              f"({mel.config.sample_rate} Hz / {hop} samples per latent frame)")
        config.window_frames()  # a window plan exists
        if config.loudness_lufs is not None and not is_target(config.loudness_lufs):
            raise ConfigError(f"loudness_lufs {config.loudness_lufs} must be {TARGET_RANGE} "
                              f"(or null: no loudness normalisation)")
        if adaptor.needs_cls and not has_cls(video_encoder):
            raise ConfigError(f"the adaptor's {adaptor.config.aggregation!r} aggregation needs the video encoder's "
                              f"CLS tokens, and a {type(video_encoder).__name__} has none (CLIP has)")
        self.eval().requires_grad_(False)
        #: after each stage of a generation, hand back the memory it freed and the pages of its
        #: weights mapped from the release (:func:`muvi.memory.page_out_mapped`): the peak is then
        #: the largest stage, not the sum of all (base preset, 10 s: see the README's benchmark);
        #: the next generation reads them again from the page cache. False keeps them resident.
        self.page_out_weights = True

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_presets(cls, preset: str = "tiny", *, seed: int = 0, video_encoder_type: str = "videomae",
                     **overrides: str) -> "MuviPipeline":
        """A randomly initialised pipeline built from component presets (tests, benchmarks).

        ``video_encoder_type`` is a video encoder type of :mod:`muvi.hub`; the ``video_encoder`` preset name
        is looked up in that encoder's config (e.g. ``video_encoder="efficientnet-lite0"``)."""
        if preset not in PRESETS:
            raise ConfigError(f"unknown pipeline preset {preset!r}; choose from {sorted(PRESETS)}")
        if video_encoder_type not in hub.ENCODER_TYPES["video"]:
            raise ConfigError(f"unknown video_encoder_type {video_encoder_type!r}; "
                              f"known: {sorted(hub.ENCODER_TYPES['video'])}")
        names = {**PRESETS[preset], **overrides}
        torch.manual_seed(seed)
        config = PipelineConfig()
        enc_cfg_cls, enc_cls = hub.TYPES[video_encoder_type].config, hub.TYPES[video_encoder_type].module
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
                "vae": self.vae, "vocoder": self.vocoder, "mel": self.mel}

    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """Write every component (:func:`muvi.hub.save_component`) and ``config.json`` into ``directory``."""
        directory = Path(directory)
        for name, module in self._components().items():
            hub.save_component(module, directory, name)
        config = {"format_version": FORMAT_VERSION, "pipeline": self.config.to_dict()}
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def from_pretrained(cls, model: Union[str, Path], *, device: Union[str, torch.device] = "cpu",
                        torch_dtype: Union[torch.dtype, str, None] = None, revision: Optional[str] = None,
                        cache_dir: Union[str, Path, None] = None, local_files_only: bool = False,
                        token: Union[str, bool, None] = None) -> "MuviPipeline":
        """Build every component of a release and load its weights strictly.

        ``model`` is a release folder or a Hugging Face Hub repo id (``owner/name``), fetched
        into the Hub's cache at ``revision`` (:func:`muvi.release.locate`: ``cache_dir``,
        ``local_files_only`` and ``HF_HUB_OFFLINE=1`` work as in transformers and diffusers).
        ``torch_dtype`` (e.g. ``torch.bfloat16`` or ``"float16"``) stores the networks' weights
        in that type and runs them under autocast to it; the mel front end stays float32.
        Default: float32, as the release is stored."""
        from muvi.release import locate

        directory = locate(model, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                           token=token)
        dtype = _dtype(torch_dtype)
        path = directory / "config.json"
        if not path.is_file():
            raise MissingFileError(f"{directory}: not a muvi model folder (no config.json)")
        raw = read_json(path)
        if raw.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"{path}: release format {raw.get('format_version')!r}, but this muvi reads format "
                              f"{FORMAT_VERSION}; export the release again with recipes/export.py")
        if "pipeline" not in raw:
            raise ConfigError(f"{path}: missing section 'pipeline'")
        config = PipelineConfig.from_dict(raw["pipeline"], source=f"{path} [pipeline]")
        modules = {name: hub.load_component(directory, name, types=types) for name, types in COMPONENTS.items()}
        pipe = cls(config, **modules).to(device)
        return pipe if dtype == torch.float32 else pipe.to_dtype(dtype)

    def to_dtype(self, dtype: Union[torch.dtype, str]) -> "MuviPipeline":
        """Store the networks' weights in ``dtype`` (the mel front end stays float32): stages
        then run under autocast to it."""
        dtype = _dtype(dtype)
        self.to(dtype)
        self.mel.float()  # the STFT and its filterbank in float32 whatever the networks use
        if dtype != torch.float32 and not getattr(self, "_norm_hooks", None):
            # CPU autocast leaves normalisation layers to the input's type, and they refuse a
            # float32 input with half weights: give them their weights' type.
            self._norm_hooks = [m.register_forward_pre_hook(_input_as_weight)
                                for m in self.modules() if isinstance(m, _NORMS)]
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The type the networks' weights are stored in (float32 unless ``torch_dtype`` said otherwise)."""
        return next(self.dit.parameters()).dtype

    def push_to_hub(self, repo_id: str, *, private: Optional[bool] = None, token: Union[str, bool, None] = None,
                    commit_message: str = "Upload muvi release", model_card: Optional[str] = None) -> str:
        """Save this release (float32) and upload it to the Hub repo ``repo_id`` (created if
        needed), with ``model_card`` as its README.md (default: :func:`muvi.release.model_card`).
        Returns the commit's URL."""
        import tempfile

        from muvi.release import model_card as make_card
        from muvi.release import push_folder

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            dtype = self.dtype
            try:
                self.to_dtype(torch.float32).save_pretrained(folder)
            finally:
                self.to_dtype(dtype)
            (folder / "README.md").write_text(model_card or make_card(folder, repo_id=repo_id), encoding="utf-8")
            return push_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)

    @property
    def dit(self) -> DiT:
        return self.flow.dit

    @property
    def adaptor(self) -> VisualAdaptor:
        return self.flow.adaptor

    # ------------------------------------------------------------------ stages
    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    def encode_video(self, frames: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """uint8 frames (F, 3, H, W) at ``video_fps`` → ``(tokens, cls)``
        (:class:`muvi.encoders.frames.VideoFeatures`): encoder tokens (1, N, h, w, E) and the
        encoder's CLS tokens (1, N, E), or None from an encoder without them (VideoMAE)."""
        return encode_frames(self.video_encoder, frames[None], with_cls=True)

    def condition(self, video: Union[torch.Tensor, tuple[torch.Tensor, Optional[torch.Tensor]]],
                  num_frames: int) -> torch.Tensor:
        """``(tokens, cls)`` as :meth:`encode_video` gives them, or tokens (B, N, h, w, E) alone →
        visual condition at the latent rate (B, T, D)."""
        tokens, cls = (video, None) if torch.is_tensor(video) else video
        if cls is None and self.adaptor.needs_cls:
            raise ConfigError(f"the adaptor's {self.adaptor.config.aggregation!r} aggregation needs CLS tokens, "
                              f"which the video encoder ({type(self.video_encoder).__name__}) does not give; "
                              "use a CLIP video encoder, or an adaptor with another aggregation")
        lengths = torch.full((tokens.shape[0],), num_frames, device=tokens.device)
        return self.flow.condition(tokens, lengths, cls=cls)

    def encode_audio(self, waveform: torch.Tensor) -> torch.Tensor:
        """Waveform (N,) at the mel's sample rate → normalised latent (1, T, C) (posterior mean)."""
        mel = self.mel(waveform.to(self.device)[None])
        z = self.vae.encode(mel).mean
        return self.vae.normalize(z).transpose(1, 2)

    def decode_latent(self, latent: torch.Tensor, seed: Union[int, Sequence[int], None] = None) -> torch.Tensor:
        """Normalised latent (B, T, C) → waveform (B, T · samples per latent frame). A VAE with
        ``mel_noise`` decodes a draw of the mel (``mel_noise_scale``), its noise from ``seed``
        (one per item, or one for the batch; None: the global generator) mixed so that it is not
        the stream the sampler's initial noise came from."""
        mel = self.vae.decode(self.vae.denormalize(latent.transpose(1, 2)))
        if self.vae.config.mel_noise and self.config.mel_noise_scale:
            eps = noise(tuple(mel.shape), _mel_seed(seed)).to(mel.device, mel.dtype)
            mel = self.vae.sample_mel(mel, eps, self.config.mel_noise_scale)
        self.stage_done(self.vae)  # before the vocoder's turn
        return self.vocoder(mel)

    @property
    def limits(self) -> "ModelLimits":
        """What input checks need to know of this pipeline (:class:`muvi.inputs.ModelLimits`)."""
        from muvi.inputs import ModelLimits

        return ModelLimits(sample_rate=self.mel.config.sample_rate, max_duration=self.config.max_duration,
                           video_fps=self.config.video_fps, default_cfg_scale=self.config.default_cfg_scale,
                           default_prompt_scale=self.config.default_prompt_scale)

    def generate(self, video, *, fps: Optional[float] = None, cfg_scale: Optional[float] = None,
                 num_steps: int = 25, seed: Optional[int] = None, prompt_audio=None,
                 prompt_sample_rate: Optional[int] = None, duration: Optional[float] = None,
                 method: str = "euler", prompt_scale: Optional[float] = None,
                 progress: bool = True) -> GenerationOutput:
        """Music for ``video``: see :func:`muvi.generate` for the arguments."""
        from muvi.inputs import check_request

        request = check_request(video, fps=fps, cfg_scale=cfg_scale, num_steps=num_steps, seed=seed,
                                prompt_audio=prompt_audio, prompt_sample_rate=prompt_sample_rate,
                                duration=duration, method=method, prompt_scale=prompt_scale,
                                limits=self.limits, check_device=False)
        return self.run(request, progress=progress)

    @torch.no_grad()
    def run(self, request: "Request", *, progress: bool = True) -> GenerationOutput:
        """Music for a request checked by :func:`muvi.inputs.check_request` against this pipeline.

        A video up to ``config.window_seconds`` is one window; a longer one is scored window by
        window (:mod:`muvi.windows`), reading the video once as a stream and decoding each
        window's music as it is made, so memory does not grow with the video's length beyond
        the output waveform itself. The style prompt is the prefix of the first window; window
        ``k`` uses seed ``seed + k``. With a prompt, ``request.prompt_scale`` guides every window
        on its context (the prompt, then the music that carries it on).

        Raises :class:`~muvi.errors.GenerationError` when the waveform is not finite."""
        dtype = self.dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            return self._run(request, progress)

    def _run(self, request: "Request", progress: bool) -> GenerationOutput:
        cfg, rate = self.config, self.mel.config.sample_rate
        duration = request.duration
        total = video_io.duration_frames(duration, cfg.latent_rate)
        windows = plan_windows(total, *cfg.window_frames())
        hop = self.latent_hop
        prefix = None
        if request.prompt is not None:
            prefix = self.encode_audio(request.prompt)
            if prefix.shape[1] > total:
                seconds = request.prompt.shape[-1] / rate
                raise InputError(f"the style prompt lasts {seconds:.2f} s, "
                                 f"longer than the output ({duration:.2f} s); give a shorter prompt")
        frames = self._frame_stream(request)
        out = torch.empty(windows[-1].stop * hop)
        latent = None  # (1, total, C): every window's frames, for the next window's context
        several = len(windows) > 1
        # one bar: over the windows of a long video, else over the stages of its one window
        stages = _StageBar(progress and not several, evaluations(request.method, request.num_steps))
        bar = tqdm(windows, desc="windows", unit="window", disable=not (progress and several))
        for w in bar:
            stages.stage("encoding video")
            first_frame = int(math.floor(w.start / cfg.latent_rate * cfg.video_fps + 1e-6))
            last_frame = video_io.duration_frames(w.stop / cfg.latent_rate, cfg.video_fps)
            cond = self.condition(self.encode_video(frames.take(first_frame, last_frame)), w.frames)
            self.stage_done(self.video_encoder, self.adaptor)  # before the DiT's turn
            stages.step()
            stages.stage("sampling")
            context = prefix if w.index == 0 else latent[:, w.start - w.context:w.start]
            seed = request.seed if request.seed is None or w.index == 0 else (request.seed + w.index) % 2 ** 63
            fresh = self.sample_latent(cond, num_steps=request.num_steps, cfg_scale=request.cfg_scale, seed=seed,
                                       prefix=context, method=request.method, callback=stages.step,
                                       prompt_scale=request.prompt_scale if request.prompt is not None else 0.0)
            self.stage_done(self.dit)
            stages.stage("decoding")
            if latent is None:
                latent = fresh.new_zeros(1, total, fresh.shape[-1])
            latent[:, w.start:w.stop] = fresh
            if w.index == 0:  # the prompt is not part of the output: decode the window alone
                wave = self.decode_latent(fresh, seed)[0]
            else:  # decoded after its context, so the decoder sees the music it continues
                wave = self.decode_latent(torch.cat([context, fresh], dim=1), seed)[0, w.context * hop:]
            crossfade_into(out, wave.float().cpu(), w.start * hop, w.overlap * hop)
            self.stage_done(self.vocoder)
            stages.step()
        stages.close()
        return self._output(request, out[:int(round(duration * rate))])

    @torch.no_grad()
    def run_many(self, requests: Sequence["Request"], *, progress: bool = True,
                 max_batch: int = 8) -> list[GenerationOutput]:
        """Music for several checked requests with this one model, in their order.

        Requests that fit in one window, have no style prompt, and share their length, steps,
        guidance scale and solver go through the networks together, up to ``max_batch`` at a
        time; each item draws its own noise from its own seed, so it gets the music it would
        get alone (equal to :meth:`run` up to the rounding of batched matrix products). The
        others (long videos, prompts) run one by one."""
        window = self.config.window_frames()[0]
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            frames = video_io.duration_frames(r.duration, self.config.latent_rate)
            if r.prompt is None and frames <= window:
                groups.setdefault((frames, r.num_steps, r.cfg_scale, r.method), []).append(i)
        batches = [members[k:k + max_batch] for members in groups.values() if len(members) > 1
                   for k in range(0, len(members), max_batch)]
        alone = sorted(set(range(len(requests))) - {i for batch in batches for i in batch})
        results: list[Optional[GenerationOutput]] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="videos", unit="video", disable=not progress or len(requests) < 2)
        dtype = self.dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            for batch in batches:
                for i, out in zip(batch, self._run_batch([requests[i] for i in batch])):
                    results[i] = out
                bar.update(len(batch))
            for i in alone:
                results[i] = self._run(requests[i], progress and len(requests) == 1)
                bar.update(1)
        bar.close()
        return results

    def _run_batch(self, requests: Sequence["Request"]) -> list[GenerationOutput]:
        """One window each, all of the same length: encoded one by one, sampled and decoded together."""
        cfg, rate = self.config, self.mel.config.sample_rate
        frames = video_io.duration_frames(requests[0].duration, cfg.latent_rate)
        last_frame = video_io.duration_frames(frames / cfg.latent_rate, cfg.video_fps)
        cond = torch.cat([self.condition(self.encode_video(self._frame_stream(r).take(0, last_frame)), frames)
                          for r in requests])
        self.stage_done(self.video_encoder, self.adaptor)
        first = requests[0]
        fresh = self.sample_latent(cond, num_steps=first.num_steps, cfg_scale=first.cfg_scale,
                                   seed=[r.seed for r in requests], method=first.method)
        self.stage_done(self.dit)
        waves = self.decode_latent(fresh, [r.seed for r in requests]).float().cpu()
        self.stage_done(self.vocoder)
        return [self._output(r, waves[i, :int(round(r.duration * rate))].clone()) for i, r in enumerate(requests)]

    def stage_done(self, *components: nn.Module) -> None:
        """A stage that used ``components`` is over: hand back the memory it freed and, with
        :attr:`page_out_weights`, the pages of their weights mapped from the release."""
        release_freed_memory()
        if self.page_out_weights:
            for component in components:
                page_out_mapped(component)

    def _output(self, request: "Request", waveform: torch.Tensor) -> GenerationOutput:
        """The request's music, checked finite, brought to ``config.loudness_lufs`` if set."""
        if not torch.isfinite(waveform).all():
            bad = int((~torch.isfinite(waveform)).sum())
            raise GenerationError(f"{request.source}: the generated audio has {bad} non-finite samples "
                                  f"(NaN or inf); nothing was written. Check the model's weights")
        return GenerationOutput(waveform=self.mastered(waveform), sample_rate=self.mel.config.sample_rate,
                                source=request.source, cfg_scale=request.cfg_scale,
                                num_steps=request.num_steps, seed=request.seed)

    def mastered(self, waveform: torch.Tensor) -> torch.Tensor:
        """A whole track (1-D, on the CPU) brought to ``config.loudness_lufs``, as every output
        is (after its windows are joined); unchanged when the release does not master."""
        if self.config.loudness_lufs is None:
            return waveform
        return torch.from_numpy(master(waveform.numpy(), self.mel.config.sample_rate, self.config.loudness_lufs))

    def _frame_stream(self, request: "Request") -> video_io.FrameStream:
        """The request's frames at ``video_fps`` and the encoder's size, as a stream."""
        fps, size = self.config.video_fps, self.video_encoder.config.image_size
        if request.info is not None:
            return video_io.FrameStream(video_io.iter_frames(request.video, fps, duration=request.duration,
                                                             size=size, info=request.info))
        count = video_io.duration_frames(request.duration, fps)
        index = video_io.frame_indices(request.video.shape[0], request.fps, fps, count)
        return video_io.FrameStream(request.video[int(i)] for i in index)

    @property
    def latent_hop(self) -> int:
        """Waveform samples per latent frame."""
        return self.mel.config.hop_length * 2 ** (len(self.vae.config.channel_mult) - 1)

    def sample_latent(self, cond: torch.Tensor, *, num_steps: int = 25, cfg_scale: float = 4.0,
                      seed: Union[int, Sequence[int], None] = None, prefix: Optional[torch.Tensor] = None,
                      method: str = "euler", progress: bool = False,
                      callback: Optional[Callable[[], object]] = None, prompt_scale: float = 0.0) -> torch.Tensor:
        """Solve the flow ODE for a condition (B, T, D): :meth:`VideoToMusicFlow.sample`."""
        return self.flow.sample(cond, num_steps=num_steps, cfg_scale=cfg_scale, seed=seed, prefix=prefix,
                                method=method, progress=progress, callback=callback, prompt_scale=prompt_scale)


class _StageBar:
    """One progress bar over the stages of one window: reading and encoding the video (one
    step), every velocity evaluation of sampling (one step each; their number is unknown in
    advance for adaptive and multistep solvers), decoding to a waveform (one step)."""

    def __init__(self, enabled: bool, evaluations: Optional[int]):
        total = None if evaluations is None else evaluations + 2
        self.bar = tqdm(total=total, desc="encoding video", unit="step", disable=not enabled, leave=False)

    def stage(self, name: str) -> None:
        self.bar.set_description(name)

    def step(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d)


def _mel_seed(seed: Union[int, Sequence[int], None]) -> Union[int, list, None]:
    """The mel noise's seed for a sampling seed: one step of Knuth's 64-bit LCG (to 63 bits)."""
    if seed is None:
        return None
    if not isinstance(seed, int):
        return [_mel_seed(s) for s in seed]
    return (seed * 6364136223846793005 + 1442695040888963407) % 2 ** 63


def _input_as_weight(module: nn.Module, args: tuple):
    weight = getattr(module, "weight", None)
    if weight is None or not args or not torch.is_tensor(args[0]) or args[0].dtype == weight.dtype:
        return None
    return (args[0].to(weight.dtype), *args[1:])


def _dtype(value: Union[torch.dtype, str, None]) -> torch.dtype:
    """``torch_dtype`` as given (a dtype, its name, or None: float32) → a floating dtype."""
    if value is None:
        return torch.float32
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"torch_dtype {value!r}: not a floating-point torch dtype "
                          f"(use torch.float32, torch.bfloat16 or torch.float16)")
    return dtype
