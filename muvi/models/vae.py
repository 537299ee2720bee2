"""The 1D mel VAE: the LDM autoencoder (Rombach et al., 2022) rebuilt with 1D convolutions.

Shapes: B batch, M mel bins (``mel_channels``), T mel frames (80 per second),
Z latent channels, L = ceil(T / 8) latent frames (10 per second), C conv width.

Mel frames are the sequence axis and mel bins are the input channels. The encoder and decoder
follow LDM's ``Encoder``/``Decoder`` (GroupNorm + SiLU residual blocks, a stride-2 conv to go
down, nearest-neighbour ×2 + conv to go up, a middle of two residual blocks) with the attention
layers removed, so the cost is linear in length and any length works (paper section 3.1).
Submodule names mirror LDM's (``encoder.down.N.block.M``, ``decoder.up.N.upsample.conv``, ...).

Note that GroupNorm takes its statistics over the whole sequence, as in LDM, so outputs are
not strictly local in time even without attention.

With ``mel_noise`` the VAE also keeps a model of its residual ``mel − reconstruct(mel)`` on
training music (:func:`estimate_mel_noise`): per mel bin its standard deviation
``mel_noise_std`` and its frame-to-frame (lag-1) correlation ``mel_noise_corr``. The decoder gives
the mean of the mel; :meth:`MelVAE.sample_mel` adds a draw of that residual instead, a Gaussian
AR(1) process per bin with that spread and correlation. Why: a HiFi-GAN has no noise input, and
given a mel without a real mel's fluctuation from frame to frame its output repeats with the
hop (a pulse per mel frame: a line at 86 Hz for 22.05 kHz and hop 256); a drawn mel removes it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from muvi.config import Config


@dataclasses.dataclass
class VAEConfig(Config):
    """Sizes of the mel VAE. Time compression is 2 ** (len(channel_mult) - 1) (8 by default)."""

    mel_channels: int = 160
    channels: int = 256
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = 2
    latent_channels: int = 8
    dropout: float = 0.0
    norm_groups: int = 32
    mel_noise: bool = False   # keep ``mel_noise_std``/``_corr`` for :meth:`MelVAE.sample_mel`
    decoder_channels: int | None = None  # the decoder's base width; None: ``channels`` (LDM's one width)

    PRESETS = {
        "base": {},
        "tiny": {"channels": 16, "channel_mult": (1, 1, 2, 2), "num_res_blocks": 1, "norm_groups": 4},
    }

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        for width in {base * m for m in self.channel_mult for base in (self.channels, self.decoder_width)}:
            if width % self.norm_groups:
                raise ValueError(f"width {width} is not divisible by norm_groups {self.norm_groups}")

    @property
    def decoder_width(self) -> int:
        return self.channels if self.decoder_channels is None else self.decoder_channels

    @property
    def time_compression(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


class DiagonalGaussian:
    """A diagonal Gaussian posterior q(z | mel) over latents (B, Z, L), as in LDM.

    ``logvar`` is clamped to [-30, 20] (LDM's bounds) so that ``exp`` stays finite early in
    training. ``kl()`` is KL(q || N(0, I)) summed over channels and frames: shape (B,).
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> torch.Tensor:
        return torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                            dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self) -> torch.Tensor:
        return 0.5 * (self.mean.square() + self.var - 1.0 - self.logvar).sum(dim=(1, 2))


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv3 → GroupNorm → SiLU → dropout → conv3, plus a (1×1) skip."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv1d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (nn.Conv1d(in_channels, out_channels, 1)
                             if in_channels != out_channels else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class Downsample(nn.Module):
    """Halve the length with a stride-2 conv; LDM pads one sample on the right first."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1)))


class Upsample(nn.Module):
    """Double the length: nearest-neighbour repeat, then a conv (avoids transposed-conv checkerboards)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """LDM's middle block without its attention layer: two residual blocks."""

    def __init__(self, channels: int, groups: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups, dropout)
        self.block_2 = ResnetBlock(channels, channels, groups, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class Encoder(nn.Module):
    """mel (B, M, T) with T a multiple of the compression → moments (B, 2Z, T / 8)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv1d(cfg.mel_channels, cfg.channels, 3, padding=1)
        self.down = nn.ModuleList()
        width = cfg.channels
        for level, out_width in enumerate(widths):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(width, out_width, cfg.norm_groups, cfg.dropout))
                width = out_width
            stage.downsample = Downsample(width) if level != len(widths) - 1 else nn.Identity()
            self.down.append(stage)
        self.mid = MidBlock(width, cfg.norm_groups, cfg.dropout)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, width, eps=1e-6)
        self.conv_out = nn.Conv1d(width, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """latent (B, Z, L) → mel (B, M, 8L). ``up[i]`` mirrors ``down[i]``, run from the deepest level."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.decoder_width * m for m in cfg.channel_mult]
        width = widths[-1]
        self.conv_in = nn.Conv1d(cfg.latent_channels, width, 3, padding=1)
        self.mid = MidBlock(width, cfg.norm_groups, cfg.dropout)
        stages = []
        for level in reversed(range(len(widths))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(width, widths[level], cfg.norm_groups, cfg.dropout))
                width = widths[level]
            stage.upsample = Upsample(width) if level != 0 else nn.Identity()
            stages.insert(0, stage)
        self.up = nn.ModuleList(stages)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, width, eps=1e-6)
        self.conv_out = nn.Conv1d(width, cfg.mel_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class MelVAE(nn.Module):
    """Log-mel (B, M, T) ↔ latent (B, Z, ceil(T / 8)), with a KL-regularised Gaussian posterior.

    Any T: ``encode`` pads the mel on the right (replicating the last frame) to a multiple of
    the compression; ``forward`` trims the reconstruction back to T. ``decode`` always returns
    8 · L frames; trim it yourself when the original length is known.

    ``latent_mean``/``latent_std`` are persistent buffers (saved with the weights) holding
    per-channel statistics of the latents; ``normalize`` maps latents to roughly unit scale
    for the DiT and ``denormalize`` undoes it before decoding. They default to 0 and 1 until
    set from data with :func:`estimate_latent_stats` and :meth:`set_latent_stats`.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.register_buffer("latent_mean", torch.zeros(config.latent_channels))
        self.register_buffer("latent_std", torch.ones(config.latent_channels))
        if config.mel_noise:
            self.register_buffer("mel_noise_std", torch.zeros(config.mel_channels))
            self.register_buffer("mel_noise_corr", torch.zeros(config.mel_channels))

    @property
    def time_compression(self) -> int:
        return self.config.time_compression

    def num_latent_frames(self, num_mel_frames: int) -> int:
        return math.ceil(num_mel_frames / self.time_compression)

    def encode(self, mel: torch.Tensor) -> DiagonalGaussian:
        if mel.dim() != 3 or mel.shape[1] != self.config.mel_channels:
            raise ValueError(f"expected mel (B, {self.config.mel_channels}, T), got {tuple(mel.shape)}")
        extra = -mel.shape[-1] % self.time_compression
        if extra:
            mel = F.pad(mel, (0, extra), mode="replicate")
        return DiagonalGaussian.from_moments(self.encoder(mel))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 3 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"expected latent (B, {self.config.latent_channels}, L), got {tuple(z.shape)}")
        return self.decoder(z)

    def reconstruct(self, mel: torch.Tensor) -> torch.Tensor:
        """The deterministic reconstruction of mel (B, M, T): the posterior mean decoded, cut to T."""
        return self.decode(self.encode(mel).mean)[..., : mel.shape[-1]]

    def sample_mel(self, mel: torch.Tensor, noise: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """A decoded mel (B, M, T) plus ``scale · mel_noise_std`` times ``noise`` (white standard
        normal, the mel's shape) made an AR(1) process along frames with ``mel_noise_corr`` (unit
        variance from the first frame): a draw of the mel instead of its mean. Without
        ``mel_noise`` (or at scale 0) the mel itself."""
        if not self.config.mel_noise or scale == 0:
            return mel
        if noise.shape != mel.shape:
            raise ValueError(f"noise {tuple(noise.shape)} for a mel {tuple(mel.shape)}")
        a = self.mel_noise_corr.float().clamp(-0.99, 0.99).view(1, -1)
        innovation = (1 - a * a).sqrt()
        noise = noise.float()  # the recursion in fp32 under a half-precision pipeline too
        frames = [noise[..., 0]]
        for t in range(1, noise.shape[-1]):
            frames.append(a * frames[-1] + innovation * noise[..., t])
        residual = torch.stack(frames, dim=-1)
        return mel + (scale * self.mel_noise_std.to(mel.dtype)).view(1, -1, 1) * residual.to(mel.dtype)

    @torch.no_grad()
    def set_mel_noise(self, std: torch.Tensor, corr: torch.Tensor) -> None:
        if not self.config.mel_noise:
            raise ValueError("this VAE keeps no mel noise: build it with mel_noise=True")
        if std.shape != self.mel_noise_std.shape or not torch.all(std >= 0):
            raise ValueError(f"mel_noise_std must be {tuple(self.mel_noise_std.shape)} and non-negative")
        if corr.shape != self.mel_noise_corr.shape or not torch.all(corr.abs() <= 1):
            raise ValueError(f"mel_noise_corr must be {tuple(self.mel_noise_corr.shape)} and within [-1, 1]")
        self.mel_noise_std.copy_(std)
        self.mel_noise_corr.copy_(corr)

    def forward(self, mel: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Training pass: (reconstruction (B, M, T), posterior), decoding a posterior sample."""
        posterior = self.encode(mel)
        recon = self.decode(posterior.sample(generator=generator))
        return recon[..., : mel.shape[-1]], posterior

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1)  # broadcast over (B, Z, L)
        return self.latent_mean.to(z.dtype).view(shape), self.latent_std.to(z.dtype).view(shape)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z)
        return z * std + mean

    @torch.no_grad()
    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        if mean.shape != self.latent_mean.shape or std.shape != self.latent_std.shape:
            raise ValueError(f"latent stats must have shape {tuple(self.latent_mean.shape)}")
        if not torch.all(std > 0):
            raise ValueError("latent_std must be positive")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)


@torch.no_grad()
def estimate_latent_stats(latents: torch.Tensor | Iterable[torch.Tensor]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (population, fp32) of latents, over every batch item and frame.

    ``latents`` is one (B, Z, L) tensor or an iterable of (B, Z, L) or (Z, L) tensors whose
    lengths may differ (e.g. a loop over a dataset); sums are accumulated in float64.
    """
    if isinstance(latents, torch.Tensor):
        latents = [latents]
    count, total, total_sq = 0, None, None
    for z in latents:
        z = z.detach().double()
        if z.dim() == 2:
            z = z.unsqueeze(0)
        if z.dim() != 3:
            raise ValueError(f"expected latents (B, Z, L) or (Z, L), got {tuple(z.shape)}")
        flat = z.transpose(0, 1).reshape(z.shape[1], -1)  # (Z, B·L)
        s, sq = flat.sum(dim=1), flat.square().sum(dim=1)
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += flat.shape[1]
    if not count:
        raise ValueError("no latent frames given")
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    return mean.float(), var.sqrt().float()


@torch.no_grad()
def encode_music_posterior(wave: torch.Tensor, mel: nn.Module, vae: nn.Module, *,
                           chunk_seconds: float = 600.0, context_seconds: float = 10.0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Waveform (S,) at the mel's rate → posterior (mean, logvar), each float32 (T, C) on the CPU.

    Files up to ``chunk_seconds`` are encoded whole, exactly as ``vae.encode`` sees a training
    segment. Longer ones go in chunks of ``chunk_seconds`` with ``context_seconds`` of extra mel
    on each side whose latents are dropped: memory stays bounded, the convolutions see their
    full receptive field, and chunk joins fall on latent-frame boundaries. Only the GroupNorm
    statistics then differ slightly from a whole-file pass (they span one window, not the file).
    """
    device = next(vae.parameters()).device
    spec = mel(wave.to(device)[None])  # (1, M, frames)
    step = vae.config.time_compression
    latents = math.ceil(spec.shape[-1] / step)
    rate = mel.config.frames_per_second / step  # latent frames per second
    chunk = max(1, int(chunk_seconds * rate))
    if latents <= chunk:
        post = vae.encode(spec)
        return post.mean[0].T.float().cpu(), post.logvar[0].T.float().cpu()
    context = int(math.ceil(context_seconds * rate))
    means, logvars = [], []
    for a in range(0, latents, chunk):
        b = min(a + chunk, latents)
        lo, hi = max(0, a - context), min(latents, b + context)
        post = vae.encode(spec[..., lo * step: hi * step])
        keep = slice(a - lo, b - lo)
        means.append(post.mean[0, :, keep])
        logvars.append(post.logvar[0, :, keep])
    return torch.cat(means, 1).T.float().cpu(), torch.cat(logvars, 1).T.float().cpu()


def with_mel_noise(vae: MelVAE) -> MelVAE:
    """A copy of ``vae`` built with ``mel_noise`` (still zero: :meth:`MelVAE.set_mel_noise`), with
    the same weights and latent statistics, in eval mode."""
    noisy = MelVAE(dataclasses.replace(vae.config, mel_noise=True))
    state = {k: v for k, v in vae.state_dict().items() if not k.startswith("mel_noise_")}
    zeros = torch.zeros(vae.config.mel_channels)
    noisy.load_state_dict({**state, "mel_noise_std": zeros, "mel_noise_corr": zeros})  # strict: every key
    return noisy.eval()


@torch.no_grad()
def estimate_mel_noise(vae: MelVAE, mels: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bin std and lag-1 correlation (population, fp32) of ``mel − vae.reconstruct(mel)`` over
    every frame of ``mels``: (M, T) or (B, M, T) log-mels of training music, lengths free. The
    correlation pairs frames t and t + 1 of the same item only; sums are float64."""
    sums = None  # Σr, Σr², Σ r_t r_t+1, Σ r_t, Σ r_t+1 over pairs; frames, pairs
    for mel in mels:
        mel = mel if mel.dim() == 3 else mel[None]
        r = (mel - vae.reconstruct(mel)).double().transpose(0, 1)  # (M, B, T)
        head, tail = r[..., :-1], r[..., 1:]
        part = [t.reshape(r.shape[0], -1).sum(1) for t in (r, r * r, head * tail, head, tail)]
        part += [r[0].numel(), head[0].numel()]
        sums = part if sums is None else [x + y for x, y in zip(sums, part)]
    if sums is None or not sums[6]:
        raise ValueError("no pair of mel frames to estimate the mel noise from")
    total, square, cross, head, tail, n, m = sums
    var = (square / n - (total / n) ** 2).clamp_min(0)
    cov = cross / m - (head / m) * (tail / m)
    corr = torch.where(var > 0, cov / var.clamp_min(1e-30), torch.zeros_like(var)).clamp(-1, 1)
    return var.sqrt().float(), corr.float()
