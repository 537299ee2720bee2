"""Audio samples written while a recipe trains (``sample_every``): a fixed clip, its mel turned
back into sound by a vocoder or, without one, by Griffin-Lim, and the WAV writer.

A sample is for listening to how training goes, not for scoring: Griffin-Lim's phase is rough
(a metallic, phasey sound even from a true mel), so a VAE or DiT sample says the most when
``sample_vocoder`` names a trained vocoder. Every sample is deterministic: a fixed clip,
fixed seeds, no draw from the global random state (training stays bit-identical with samples
on or off).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from muvi.config import ConfigError
from muvi.models.mel import MelConfig, MelSpectrogram

logger = logging.getLogger(__name__)


def write_wav(path: str | Path, waveform: torch.Tensor, sample_rate: int) -> Path:
    """Mono 16-bit PCM WAV, written atomically (a reader never sees half a file)."""
    import soundfile as sf

    from muvi.media import write_atomically

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = waveform.detach().float().cpu().reshape(-1).clamp(-1.0, 1.0).numpy()
    write_atomically(path, lambda tmp: sf.write(str(tmp), data, sample_rate, subtype="PCM_16", format="WAV"))
    return path


def music_clip(path: str | Path, sample_rate: int, seconds: float, multiple: int = 1) -> torch.Tensor:
    """The first ``seconds`` of a music file at ``sample_rate``, cut to a multiple of
    ``multiple`` samples (whole mel or latent frames): float32 (N,)."""
    from muvi.data.audio_io import load_audio

    wave = load_audio(path, sample_rate, duration=seconds)
    usable = wave.shape[0] // multiple * multiple
    if usable == 0:
        raise ConfigError(f"sample clip {path}: shorter than {multiple} samples")
    return wave[:usable]


@torch.no_grad()
def griffin_lim(logmel: torch.Tensor, melspec: MelSpectrogram, n_iter: int = 32) -> torch.Tensor:
    """A log-mel (M, T) of ``melspec`` back to a waveform (T · hop,) without a vocoder: the
    least-squares linear magnitude under the filterbank (negative bins set to 0, as torchaudio's
    ``InverseMelScale`` does), then torchaudio's Griffin-Lim from a zero phase (deterministic)."""
    import torchaudio.functional as AF

    cfg = melspec.config
    basis = melspec.mel_basis.double().cpu()                  # (M, F)
    mel = logmel.detach().double().cpu().exp()                # (M, T)
    magnitude = torch.linalg.lstsq(basis, mel, driver="gelsd").solution.clamp_min(0.0)  # (F, T)
    frames = magnitude.shape[-1]
    # torchaudio's STFT is centred (T frames for (T - 1) · hop samples); the half-frame shift
    # against muvi's own framing does not matter to the ear.
    wave = AF.griffinlim(magnitude.float(), torch.hann_window(cfg.win_length), cfg.n_fft, cfg.hop_length,
                         cfg.win_length, power=1.0, n_iter=n_iter, momentum=0.99,
                         length=(frames - 1) * cfg.hop_length, rand_init=False)
    return torch.nn.functional.pad(wave, (0, cfg.hop_length))


def check_folder_mel(folder: str | Path, mel_config: MelConfig, what: str) -> None:
    """Refuse ``folder`` (a run's ``final/`` or a release) when its ``mel`` component, if it has
    one, is not ``mel_config``: what it holds was trained on other log-mels."""
    from muvi.hub import load_component

    if (Path(folder) / "mel.json").is_file():
        theirs = load_component(folder, "mel", types=("mel",)).config
        if theirs != mel_config:
            changed = sorted(k for k, v in mel_config.to_dict().items() if theirs.to_dict().get(k) != v)
            raise ConfigError(f"{what}: trained on other mels than these (differs in {changed})")


def load_vocoder(folder: str | Path, mel_config: MelConfig) -> nn.Module:
    """The ``vocoder`` component of ``folder`` (a vocoder run's ``final/`` or a release), for
    log-mels made with ``mel_config`` (checked against the folder's ``mel`` when it has one)."""
    from muvi.hub import load_component

    folder = Path(folder)
    vocoder = load_component(folder, "vocoder", types=("hifigan",), frozen=True)
    check_folder_mel(folder, mel_config, f"sample_vocoder {folder}")
    if vocoder.config.num_mels != mel_config.n_mels:
        raise ConfigError(f"sample_vocoder {folder}: takes {vocoder.config.num_mels} mel bins, not {mel_config.n_mels}")
    return vocoder


@torch.no_grad()
def mel_to_audio(logmel: torch.Tensor, melspec: MelSpectrogram, vocoder: Optional[nn.Module] = None) -> torch.Tensor:
    """A log-mel (M, T) → waveform (T · hop,): through ``vocoder`` when given, else Griffin-Lim."""
    if vocoder is None:
        return griffin_lim(logmel, melspec)
    device = next(vocoder.parameters()).device
    return vocoder(logmel[None].float().to(device))[0].reshape(-1).cpu()
