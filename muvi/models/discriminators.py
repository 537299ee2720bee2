"""GAN discriminators and losses for training the vocoder and (optionally) the mel VAE.

Shapes: B batch, N waveform samples, p period, C channels, M mel bins, T mel frames.

- :class:`MultiPeriodDiscriminator` and :class:`MultiScaleDiscriminator`: HiFi-GAN's MPD
  (periods 2, 3, 5, 7, 11) and MSD (3 scales, the first with spectral norm) of Kong et al.
  (2020), with the module names of the jik876/hifi-gan release (``discriminators.N.convs.M``,
  ``discriminators.N.conv_post``, ``meanpools.N``). Sizes come from
  :class:`HiFiGANDiscriminatorConfig` so that tests can use tiny ones.
- :class:`PatchDiscriminator`: LDM's patch discriminator (``NLayerDiscriminator``, Isola et al.
  2017) over the log-mel seen as a one-channel image, for the VAE's optional adversarial term.
  GroupNorm replaces LDM's BatchNorm so that a score never depends on the rest of the batch
  (real and fake share one forward pass, and ranks see different batches).

They exist only for training, so weight norm / spectral norm are applied at construction
(torch's ``parametrizations`` API: ``parametrizations.weight.original0/1`` and ``.original``
plus ``parametrizations.weight.0._u/_v``). :func:`convert_release_discriminator_state` renames
the release's old-API keys (``weight_g``/``weight_v``, ``weight_orig``/``weight_u``/``weight_v``)
so its discriminators can warm-start ours: they see waveforms, not mels, so the mel settings
do not matter.

:func:`multi_resolution_stft_loss` is Parallel WaveGAN's auxiliary loss (Yamamoto et al. 2020):
spectral convergence plus log-magnitude L1 at several STFT resolutions, the short ones
(240-sample windows, hop 50) fine enough in time to see a pulse per 256-sample mel frame,
which the vocoder's own mel loss (1024-sample windows) averages away.

Every discriminator returns ``(scores, feature_maps)``: per sub-discriminator a flattened score
tensor (B, n) and the list of its layer outputs (the last is the score map before flattening),
which the feature-matching loss compares between real and generated audio.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from muvi.config import Config

Scores = list[torch.Tensor]
FeatureMaps = list[list[torch.Tensor]]


@dataclasses.dataclass
class HiFiGANDiscriminatorConfig(Config):
    """Sizes of the MPD and MSD; the defaults are those of the HiFi-GAN V1 release.

    ``period_channels``: output channels of the MPD's convs (all strided by ``period_stride``
    along time except the last). ``scale_*``: per conv of each MSD scale.
    """

    periods: tuple[int, ...] = (2, 3, 5, 7, 11)
    period_channels: tuple[int, ...] = (32, 128, 512, 1024, 1024)
    period_kernel_size: int = 5
    period_stride: int = 3
    num_scales: int = 3
    scale_channels: tuple[int, ...] = (128, 128, 256, 512, 1024, 1024, 1024)
    scale_kernel_sizes: tuple[int, ...] = (15, 41, 41, 41, 41, 41, 5)
    scale_strides: tuple[int, ...] = (1, 2, 2, 4, 4, 1, 1)
    scale_groups: tuple[int, ...] = (1, 4, 16, 16, 16, 16, 1)
    leaky_relu_slope: float = 0.1

    PRESETS = {
        "v1": {},
        "tiny": {"period_channels": (8, 16, 32, 32, 32),
                 "scale_channels": (16, 16, 32, 32, 32, 32, 32)},
    }

    def __post_init__(self) -> None:
        for name in ("periods", "period_channels", "scale_channels", "scale_kernel_sizes",
                     "scale_strides", "scale_groups"):
            setattr(self, name, tuple(getattr(self, name)))
        n = len(self.scale_channels)
        if not len(self.scale_kernel_sizes) == len(self.scale_strides) == len(self.scale_groups) == n:
            raise ValueError("scale_channels, scale_kernel_sizes, scale_strides and scale_groups "
                             "must have the same length")
        widths = (1,) + self.scale_channels
        for c_in, c_out, g in zip(widths[1:], widths[1:][1:], self.scale_groups[1:]):
            if c_in % g or c_out % g:
                raise ValueError(f"MSD conv {c_in}->{c_out} channels is not divisible by groups {g}")
        if self.num_scales < 1 or not self.periods:
            raise ValueError("need at least one period and one scale")


def _conv_stack(x: torch.Tensor, convs: nn.ModuleList, conv_post: nn.Module,
                slope: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Leaky-ReLU convolutions then the score conv: (flattened scores, every layer's output as a
    feature map for the feature-matching loss)."""
    fmaps = []
    for conv in convs:
        x = F.leaky_relu(conv(x), slope)
        fmaps.append(x)
    x = conv_post(x)
    fmaps.append(x)
    return x.flatten(1), fmaps


class PeriodDiscriminator(nn.Module):
    """Waveform (B, 1, N) folded to (B, 1, N / p, p); 2D convs with kernels (k, 1) along time."""

    def __init__(self, period: int, config: HiFiGANDiscriminatorConfig):
        super().__init__()
        self.period, self.slope = period, config.leaky_relu_slope
        k, pad = config.period_kernel_size, (config.period_kernel_size - 1) // 2
        widths = (1,) + config.period_channels
        last = len(config.period_channels) - 1
        self.convs = nn.ModuleList(
            parametrizations.weight_norm(nn.Conv2d(c_in, c_out, (k, 1), (1 if i == last else config.period_stride, 1),
                                                   padding=(pad, 0)))
            for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])))
        self.conv_post = parametrizations.weight_norm(nn.Conv2d(widths[-1], 1, (3, 1), padding=(1, 0)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, c, n = x.shape
        if n % self.period:  # reflect-pad the tail to a whole number of periods, as released
            x = F.pad(x, (0, self.period - n % self.period), mode="reflect")
        x = x.view(b, c, -1, self.period)  # (B, 1, N / p, p)
        return _conv_stack(x, self.convs, self.conv_post, self.slope)


class ScaleDiscriminator(nn.Module):
    """Waveform (B, 1, N) → strided grouped 1D convs → score map (B, 1, ~N / prod(strides))."""

    def __init__(self, config: HiFiGANDiscriminatorConfig, spectral: bool):
        super().__init__()
        norm = parametrizations.spectral_norm if spectral else parametrizations.weight_norm
        self.slope = config.leaky_relu_slope
        widths = (1,) + config.scale_channels
        self.convs = nn.ModuleList(
            norm(nn.Conv1d(c_in, c_out, k, s, groups=g, padding=(k - 1) // 2))
            for c_in, c_out, k, s, g in zip(widths[:-1], widths[1:], config.scale_kernel_sizes,
                                            config.scale_strides, config.scale_groups))
        self.conv_post = norm(nn.Conv1d(widths[-1], 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return _conv_stack(x, self.convs, self.conv_post, self.slope)


def _as_channel(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return x.unsqueeze(1)
    if x.dim() != 3 or x.shape[1] != 1:
        raise ValueError(f"expected a waveform (B, N) or (B, 1, N), got {tuple(x.shape)}")
    return x


class MultiPeriodDiscriminator(nn.Module):
    """One :class:`PeriodDiscriminator` per period: waveform (B, N) → (scores, feature maps)."""

    def __init__(self, config: HiFiGANDiscriminatorConfig):
        super().__init__()
        self.config = config
        self.discriminators = nn.ModuleList(PeriodDiscriminator(p, config) for p in config.periods)

    def forward(self, x: torch.Tensor) -> tuple[Scores, FeatureMaps]:
        x = _as_channel(x)
        outs = [d(x) for d in self.discriminators]
        return [s for s, _ in outs], [f for _, f in outs]


class MultiScaleDiscriminator(nn.Module):
    """:class:`ScaleDiscriminator` on the waveform, then on ×2 and ×4 average-pooled copies.

    The first scale uses spectral norm (Kong et al. 2020, section 2.3), the others weight norm.
    """

    def __init__(self, config: HiFiGANDiscriminatorConfig):
        super().__init__()
        self.config = config
        self.discriminators = nn.ModuleList(ScaleDiscriminator(config, spectral=i == 0)
                                            for i in range(config.num_scales))
        self.meanpools = nn.ModuleList(nn.AvgPool1d(4, 2, padding=2) for _ in range(config.num_scales - 1))

    def forward(self, x: torch.Tensor) -> tuple[Scores, FeatureMaps]:
        x = _as_channel(x)
        scores, fmaps = [], []
        for i, d in enumerate(self.discriminators):
            if i:
                x = self.meanpools[i - 1](x)
            s, f = d(x)
            scores.append(s)
            fmaps.append(f)
        return scores, fmaps


# ----------------------------------------------------------------------------- mel patches

@dataclasses.dataclass
class PatchDiscriminatorConfig(Config):
    """LDM's patch discriminator sizes (``ndf`` 64, 3 layers) for a one-channel mel image."""

    channels: int = 64
    num_layers: int = 3
    norm_groups: int = 32
    leaky_relu_slope: float = 0.2

    PRESETS = {"ldm": {}, "tiny": {"channels": 8, "num_layers": 2, "norm_groups": 4}}

    def __post_init__(self) -> None:
        for n in range(1, self.num_layers + 1):
            if (self.channels * min(2 ** n, 8)) % self.norm_groups:
                raise ValueError(f"width {self.channels * min(2 ** n, 8)} is not divisible by "
                                 f"norm_groups {self.norm_groups}")


class PatchDiscriminator(nn.Module):
    """log-mel (B, M, T) → patch scores (B, 1, M', T'); each score sees a ~70×70 receptive field
    at 3 layers (fewer layers: smaller patches). Layout of LDM's ``NLayerDiscriminator``
    (``main.N`` indices), GroupNorm for BatchNorm, N(0, 0.02) conv init as there."""

    def __init__(self, config: PatchDiscriminatorConfig):
        super().__init__()
        self.config = config
        c, slope = config.channels, config.leaky_relu_slope
        layers: list[nn.Module] = [nn.Conv2d(1, c, 4, 2, 1), nn.LeakyReLU(slope)]
        width = c
        for n in range(1, config.num_layers + 1):
            out = c * min(2 ** n, 8)
            stride = 2 if n < config.num_layers else 1  # the last hidden layer keeps the size
            layers += [nn.Conv2d(width, out, 4, stride, 1, bias=False),
                       nn.GroupNorm(config.norm_groups, out), nn.LeakyReLU(slope)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.main:
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.dim() != 3:
            raise ValueError(f"expected a log-mel (B, M, T), got {tuple(mel.shape)}")
        return self.main(mel.unsqueeze(1))


# ----------------------------------------------------------------------------- losses

def lsgan_discriminator_loss(real: Scores, fake: Scores) -> torch.Tensor:
    """Σ_d mean((1 - D_d(y))²) + mean(D_d(ŷ)²) (least-squares GAN, as HiFi-GAN)."""
    return sum(torch.mean((1 - r.float()) ** 2) + torch.mean(f.float() ** 2) for r, f in zip(real, fake))


def lsgan_generator_loss(fake: Scores) -> torch.Tensor:
    """Σ_d mean((1 - D_d(ŷ))²)."""
    return sum(torch.mean((1 - f.float()) ** 2) for f in fake)


def feature_matching_loss(real: FeatureMaps, fake: FeatureMaps) -> torch.Tensor:
    """Σ over sub-discriminators and layers of mean |φ(y) − φ(ŷ)| (real maps detached).

    HiFi-GAN weights this by 2 inside its loss; here the weight is the caller's (``fm_weight``).
    """
    return sum(torch.mean(torch.abs(r.detach().float() - g.float()))
               for rd, gd in zip(real, fake) for r, g in zip(rd, gd))


# Parallel WaveGAN's three resolutions (n_fft, hop, window), the auraloss default too.
STFT_RESOLUTIONS = ((1024, 120, 600), (2048, 240, 1200), (512, 50, 240))


def multi_resolution_stft_loss(y_hat: torch.Tensor, y: torch.Tensor,
                               resolutions: Sequence[Sequence[int]] = STFT_RESOLUTIONS,
                               eps: float = 1e-8) -> torch.Tensor:
    """Mean over resolutions of ‖|Y| − |Ŷ|‖_F / ‖|Y|‖_F + mean |log |Y| − log |Ŷ||.

    ``y_hat``, ``y``: waveforms (B, N) or (B, 1, N); per resolution a periodic Hann window of
    ``window`` samples centred in ``n_fft`` (``torch.stft``, centred frames, reflect padding),
    magnitudes ``sqrt(max(re² + im², eps))``. The spectral-convergence norms run over the whole
    batch, as in Parallel WaveGAN and auraloss (equal to ``auraloss.freq.MultiResolutionSTFTLoss``
    with its defaults)."""
    y_hat, y = y_hat.reshape(-1, y_hat.shape[-1]).float(), y.reshape(-1, y.shape[-1]).float()
    total = y_hat.new_zeros(())
    for n_fft, hop, window in resolutions:
        win = torch.hann_window(window, device=y.device)
        mag_hat, mag = (torch.view_as_real(torch.stft(s, n_fft, hop, window, win, return_complex=True))
                        .square().sum(-1).clamp(min=eps).sqrt() for s in (y_hat, y))
        convergence = torch.linalg.norm(mag - mag_hat) / torch.linalg.norm(mag)
        total = total + convergence + F.l1_loss(mag_hat.log(), mag.log())
    return total / len(resolutions)


def hinge_discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """LDM's hinge loss: ½ (mean relu(1 − D(x)) + mean relu(1 + D(x̂)))."""
    return 0.5 * (F.relu(1.0 - real.float()).mean() + F.relu(1.0 + fake.float()).mean())


def hinge_generator_loss(fake: torch.Tensor) -> torch.Tensor:
    return -fake.float().mean()


# ----------------------------------------------------------------------------- release weights

def convert_release_discriminator_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an MPD or MSD state dict of the jik876/hifi-gan release (``do_XXXXXXXX['mpd']`` /
    ``['msd']``, old ``torch.nn.utils`` weight/spectral norm) to this module's parametrization keys.

    Old weight norm stores ``weight_g``/``weight_v``; old spectral norm stores ``weight_orig``
    and the power-iteration vectors ``weight_u``/``weight_v`` (so ``weight_v`` means the
    direction under weight norm but the right singular vector under spectral norm: which one is
    decided by the presence of ``weight_orig`` in the same module).
    """
    spectral = {k[: -len("weight_orig")] for k in state if k.endswith("weight_orig")}
    renames = {
        False: {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"},
        True: {"weight_orig": "parametrizations.weight.original", "weight_u": "parametrizations.weight.0._u",
               "weight_v": "parametrizations.weight.0._v"},
    }
    out = {}
    for key, value in state.items():
        prefix, _, name = key.rpartition(".")
        prefix = prefix + "." if prefix else ""
        out[prefix + renames[prefix in spectral].get(name, name)] = value
    return out


def num_parameters(modules: Sequence[nn.Module]) -> int:
    """Trainable parameters of several modules together (spectral-norm u/v are buffers)."""
    return sum(p.numel() for m in modules for p in m.parameters())
