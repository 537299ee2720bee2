"""MelSpectrogram against librosa on real music (see conftest.py for the audio's source)."""
from __future__ import annotations

import librosa
import numpy as np
import pytest
import torch

from muvi.models.mel import MelConfig, MelSpectrogram


def _librosa_logmel(wave: np.ndarray, cfg: MelConfig, window="hann", eps: float = 0.0) -> np.ndarray:
    """The HiFi-GAN recipe written with librosa: reflect pad, center=False, |STFT|, mel, log."""
    total = cfg.n_fft - cfg.hop_length
    y = np.pad(wave, (total // 2, total - total // 2), mode="reflect")
    if eps == 0.0:
        mel = librosa.feature.melspectrogram(
            y=y, sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
            win_length=cfg.win_length, window=window, center=False, power=1.0,
            n_mels=cfg.n_mels, fmin=cfg.f_min, fmax=cfg.f_max, htk=False, norm="slaney")
    else:
        spec = np.abs(librosa.stft(y, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
                                   win_length=cfg.win_length, window=window, center=False))
        fb = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels,
                                 fmin=cfg.f_min, fmax=cfg.f_max).astype(wave.dtype)
        mel = fb @ np.sqrt(spec ** 2 + eps)
    return np.log(np.maximum(mel, cfg.log_clamp))


def test_matches_librosa_fp32(real_music_24k):
    wave, sr = real_music_24k
    cfg = MelConfig(magnitude_eps=0.0)
    assert sr == cfg.sample_rate
    ours = MelSpectrogram(cfg)(torch.from_numpy(wave)).numpy()
    ref = _librosa_logmel(wave, cfg)
    assert ours.shape == ref.shape == (cfg.n_mels, len(wave) // cfg.hop_length)
    # The music spans ~11 nats (down to about -10.6), mostly above the clamp; errors are fp32
    # FFT rounding, largest in relative terms for the quietest bins.
    assert ref.max() - ref.min() > 8.0
    np.testing.assert_allclose(np.exp(ours), np.exp(ref), rtol=0, atol=2e-6)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_matches_librosa_fp64_exactly(real_music_24k):
    """In float64, with the same (fp32-rounded) window, the match is exact to rounding."""
    wave = real_music_24k[0].astype(np.float64)
    for eps in (0.0, 1e-9):
        cfg = MelConfig(magnitude_eps=eps)
        mel = MelSpectrogram(cfg).double()
        ours = mel(torch.from_numpy(wave)).numpy()
        ref = _librosa_logmel(wave, cfg, window=mel.window.numpy(), eps=eps)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9)


def test_magnitude_eps_changes_quiet_bins_only(real_music_24k):
    """The HiFi-GAN sqrt(power + 1e-9) default raises quiet bins slightly (< 0.01 nats here)."""
    wave = torch.from_numpy(real_music_24k[0])
    plain = MelSpectrogram(MelConfig(magnitude_eps=0.0))(wave)
    default = MelSpectrogram(MelConfig())(wave)
    diff = (default - plain).abs()
    assert 0 < diff.max() < 1e-2
    assert torch.all(default >= plain - 1e-5)


@pytest.mark.parametrize("num_samples", [451, 600, 7199, 7200, 24000 + 17])
def test_frame_count_and_batching(num_samples):
    cfg = MelConfig()
    mel = MelSpectrogram(cfg)
    g = torch.Generator().manual_seed(num_samples)
    wave = torch.randn(2, num_samples, generator=g) * 0.1
    out = mel(wave)
    assert out.shape == (2, cfg.n_mels, num_samples // cfg.hop_length)
    torch.testing.assert_close(mel(wave[1]), out[1], rtol=0, atol=1e-5)


def test_buffers_not_saved_and_filterbank_is_slaney():
    cfg = MelConfig()
    mel = MelSpectrogram(cfg)
    assert list(mel.state_dict()) == []
    ref = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels,
                              fmin=cfg.f_min, fmax=cfg.f_max, htk=False, norm="slaney")
    np.testing.assert_array_equal(mel.mel_basis.numpy(), ref)
    with pytest.raises(ValueError):
        mel(torch.zeros(cfg.hop_length))  # too short to reflect-pad by 450


def test_silence_hits_the_clamp():
    cfg = MelConfig(magnitude_eps=0.0)
    out = MelSpectrogram(cfg)(torch.zeros(1, 3000))
    torch.testing.assert_close(out, torch.full_like(out, float(np.log(cfg.log_clamp))))


def test_full_precision_under_autocast():
    cfg = MelConfig()
    mel = MelSpectrogram(cfg)
    wave = torch.randn(1, 3000, generator=torch.Generator().manual_seed(0)) * 0.1
    expected = mel(wave)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mel(wave.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, mel(wave.bfloat16().float()), rtol=0, atol=0)
    assert (got - expected).abs().mean() < 0.05  # only the bf16 rounding of the input differs
