"""recipes/fit_mel_noise.py on a tiny VAE and real music (Bach chorales rendered from MIDI): the
VAE comes back with the same weights and latent statistics and its residual's spread and correlation."""

import pytest
import torch

from muvi.config import ConfigError
from muvi.data.audio_io import load_audio
from muvi.hub import load_component, save_component
from muvi.models.mel import MelConfig, MelSpectrogram
from muvi.models.vae import MelVAE, VAEConfig, estimate_mel_noise

from conftest import load_recipe, render_chorales

recipe = load_recipe("fit_mel_noise")
pytestmark = pytest.mark.usefixtures("one_thread")


def test_fits_the_residual_spread_and_keeps_everything_else(tmp_path):
    (tmp_path / "music").mkdir()
    music = render_chorales(tmp_path / "music", 24000, [(f"c{i}.wav", i, 1.5) for i in range(3)])
    torch.manual_seed(0)
    vae = MelVAE(VAEConfig.preset("tiny"))
    vae.set_latent_stats(torch.randn(8), torch.rand(8) + 0.5)
    save_component(vae, tmp_path / "release", "vae")
    save_component(MelSpectrogram(MelConfig()), tmp_path / "release", "mel")
    (tmp_path / "list.txt").write_text("".join(f"music/c{i}.wav\n" for i in range(3)))

    out = recipe.main(["--vae", str(tmp_path / "release"), "--music", str(tmp_path / "list.txt"),
                       "--out", str(tmp_path / "noisy"), "--seconds", "1.0"])
    noisy = load_component(out, "vae")
    assert noisy.config.mel_noise and load_component(out, "mel").config == MelConfig()
    before, after = vae.state_dict(), noisy.state_dict()
    assert set(after) - set(before) == {"mel_noise_std", "mel_noise_corr"}
    assert all(torch.equal(before[k], after[k]) for k in before)
    melspec = MelSpectrogram(MelConfig())
    with torch.no_grad():
        mels = [melspec(load_audio(music / f"c{i}.wav", 24000, duration=1.0)[None]) for i in range(3)]
    std, corr = estimate_mel_noise(vae.eval(), mels)
    torch.testing.assert_close(noisy.mel_noise_std, std)
    torch.testing.assert_close(noisy.mel_noise_corr, corr)
    assert std.min() > 0 and 0 < corr.median() < 1

    with pytest.raises(ConfigError, match="exists"):
        recipe.main(["--vae", str(tmp_path / "release"), "--music", str(music), "--out", str(out)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no audio files"):
        recipe.main(["--vae", str(tmp_path / "release"), "--music", str(tmp_path / "empty"),
                     "--out", str(tmp_path / "o")])
