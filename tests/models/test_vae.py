"""MelVAE: shapes for any length, the Gaussian posterior, latent statistics, architecture."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from muvi.models.vae import DiagonalGaussian, MelVAE, VAEConfig, estimate_latent_stats, estimate_mel_noise

logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def tiny() -> MelVAE:
    torch.manual_seed(0)
    return MelVAE(VAEConfig.preset("tiny", mel_channels=20)).eval()


@pytest.mark.parametrize("length", [1, 7, 8, 9, 37, 80])
def test_shapes_any_length(tiny, length):
    mel = torch.randn(2, 20, length)
    with torch.no_grad():
        post = tiny.encode(mel)
        recon, post2 = tiny(mel, generator=torch.Generator().manual_seed(0))
    frames = -(-length // 8)
    assert post.mean.shape == post.logvar.shape == post.std.shape == (2, 8, frames)
    assert tiny.num_latent_frames(length) == frames
    assert recon.shape == mel.shape
    torch.testing.assert_close(post2.mean, post.mean, rtol=0, atol=0)
    assert tiny.decode(post.mean).shape == (2, 20, 8 * frames)


def test_padding_replicates_last_frame(tiny):
    mel = torch.randn(1, 20, 13)
    padded = torch.cat([mel, mel[..., -1:].expand(1, 20, 3)], dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(tiny.encode(mel).mean, tiny.encode(padded).mean, rtol=0, atol=0)
        torch.testing.assert_close(tiny.encode(padded).mean,
                                   tiny.encoder(padded).chunk(2, dim=1)[0], rtol=0, atol=0)


def test_encode_decode_lengths_consistent(tiny):
    z = torch.randn(3, 8, 5)
    with torch.no_grad():
        mel = tiny.decode(z)
        assert mel.shape == (3, 20, 40)
        assert tiny.encode(mel).mean.shape == z.shape
    with pytest.raises(ValueError):
        tiny.decode(torch.randn(1, 4, 5))
    with pytest.raises(ValueError):
        tiny.encode(torch.randn(1, 19, 16))


def test_no_attention_only_convs_and_norms(tiny):
    allowed = (nn.Conv1d, nn.GroupNorm, nn.Dropout, nn.Identity, nn.ModuleList)
    leaves = [m for m in tiny.modules() if not list(m.children())]
    assert leaves and all(isinstance(m, allowed) for m in leaves), {type(m) for m in leaves}
    assert not any("attn" in name or "attention" in name.lower() for name, _ in tiny.named_modules())
    assert any(name.endswith("mid.block_2") for name, _ in tiny.named_modules())


def _expected_params(cfg: VAEConfig) -> int:
    """Parameter count of the LDM layout written out by hand (1D, no attention)."""
    def conv(i, o, k):
        return i * o * k + o

    def norm(c):
        return 2 * c

    def resnet(i, o):
        return norm(i) + conv(i, o, 3) + norm(o) + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)

    widths = [cfg.channels * m for m in cfg.channel_mult]
    n = conv(cfg.mel_channels, cfg.channels, 3)
    c = cfg.channels
    for level, w in enumerate(widths):
        for _ in range(cfg.num_res_blocks):
            n, c = n + resnet(c, w), w
        if level < len(widths) - 1:
            n += conv(c, c, 3)
    n += 2 * resnet(c, c) + norm(c) + conv(c, 2 * cfg.latent_channels, 3)
    n += conv(cfg.latent_channels, c, 3) + 2 * resnet(c, c)
    for level in reversed(range(len(widths))):
        for _ in range(cfg.num_res_blocks + 1):
            n, c = n + resnet(c, widths[level]), widths[level]
        if level > 0:
            n += conv(c, c, 3)
    return n + norm(c) + conv(c, cfg.mel_channels, 3)


@pytest.mark.parametrize("preset", ["base", "tiny"])
def test_parameter_count(preset):
    cfg = VAEConfig.preset(preset)
    with torch.device("meta"):  # no memory or init time for the 290M-parameter base model
        model = MelVAE(cfg)
    count = sum(p.numel() for p in model.parameters())
    logger.info("MelVAE %s: %d parameters", preset, count)
    print(f"MelVAE {preset}: {count:,} parameters")
    assert count == _expected_params(cfg)
    assert model.time_compression == 8
    if preset == "base":
        assert count == 290_375_600


def test_kl_matches_torch_distributions():
    zero = DiagonalGaussian(torch.zeros(2, 8, 5), torch.zeros(2, 8, 5))
    torch.testing.assert_close(zero.kl(), torch.zeros(2), rtol=0, atol=0)
    g = torch.Generator().manual_seed(1)
    mean, logvar = torch.randn(2, 8, 5, generator=g), torch.randn(2, 8, 5, generator=g)
    post = DiagonalGaussian(mean, logvar)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, torch.exp(0.5 * logvar)),
        torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))).sum(dim=(1, 2))
    torch.testing.assert_close(post.kl(), ref, rtol=1e-5, atol=1e-5)
    assert DiagonalGaussian(mean, torch.full_like(mean, 100.0)).logvar.max() == 20.0


def test_sample_reproducible_with_generator():
    g = torch.Generator().manual_seed(2)
    post = DiagonalGaussian(torch.randn(2, 8, 5, generator=g), torch.randn(2, 8, 5, generator=g))
    a = post.sample(torch.Generator().manual_seed(7))
    b = post.sample(torch.Generator().manual_seed(7))
    c = post.sample(torch.Generator().manual_seed(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    noise = torch.randn(2, 8, 5, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, post.mean + post.std * noise)


def test_forward_trains():
    torch.manual_seed(0)
    model = MelVAE(VAEConfig.preset("tiny", mel_channels=20, dropout=0.1))
    mel = torch.randn(2, 20, 21)
    recon, post = model(mel)
    (recon - mel).abs().mean().add(1e-6 * post.kl().mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_latent_stats_normalize_and_state_dict(tiny):
    g = torch.Generator().manual_seed(3)
    chunks = [torch.randn(2, 8, n, generator=g) * 3 + 1 for n in (4, 9)] + [torch.randn(8, 6, generator=g)]
    mean, std = estimate_latent_stats(iter(chunks))
    flat = torch.cat([c.reshape(-1, 8, c.shape[-1]).transpose(0, 1).reshape(8, -1) for c in chunks], dim=1)
    torch.testing.assert_close(mean, flat.mean(dim=1))
    torch.testing.assert_close(std, flat.std(dim=1, unbiased=False))
    _, s1 = estimate_latent_stats(chunks[0])
    torch.testing.assert_close(s1, chunks[0].transpose(0, 1).reshape(8, -1).std(dim=1, unbiased=False))

    model = MelVAE(VAEConfig.preset("tiny", mel_channels=20))
    model.set_latent_stats(mean, std)
    z = chunks[1]
    normed = model.normalize(z)
    torch.testing.assert_close(model.denormalize(normed), z)
    all_normed = model.normalize(flat.unsqueeze(0))[0]  # every frame the stats came from
    torch.testing.assert_close(all_normed.mean(1), torch.zeros(8), rtol=0, atol=1e-5)
    torch.testing.assert_close(all_normed.std(1, unbiased=False), torch.ones(8), rtol=0, atol=1e-5)
    state = model.state_dict()
    assert "latent_mean" in state and "latent_std" in state
    fresh = MelVAE(VAEConfig.preset("tiny", mel_channels=20))
    torch.testing.assert_close(fresh.normalize(z), z)  # defaults: identity
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.normalize(z), normed)
    with pytest.raises(ValueError):
        model.set_latent_stats(mean, -std)


def test_config_round_trip():
    cfg = VAEConfig.preset("tiny")
    assert VAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        VAEConfig(channels=20, norm_groups=32)


def test_mel_noise_is_the_residual_spread_and_correlation_and_sample_mel_draws_it(monkeypatch):
    """Known answers: on residuals that are AR(1) processes with given std and lag-1 correlation
    (a VAE whose reconstruction is zero), the estimate recovers both; a draw of sample_mel, fed
    back, recovers the parameters it was drawn with; with correlation 0 it is mean + std · noise."""
    torch.manual_seed(0)
    vae = MelVAE(VAEConfig.preset("tiny", mel_channels=4, mel_noise=True)).eval()
    std = torch.tensor([0.5, 1.0, 2.0, 0.0])
    corr = torch.tensor([0.9, 0.5, 0.0, 0.0])
    assert torch.equal(vae.mel_noise_std, torch.zeros(4)) and torch.equal(vae.mel_noise_corr, torch.zeros(4))
    vae.set_mel_noise(std, corr)
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(3, 4, 4000, generator=g) - 4
    draws = [vae.sample_mel(mean[:2], torch.randn(2, 4, 4000, generator=g)),
             vae.sample_mel(mean[2:], torch.randn(1, 4, 4000, generator=g))[0]]  # (B, M, T) and (M, T)
    with pytest.raises(ValueError, match="no pair of mel frames"):
        estimate_mel_noise(vae, [torch.zeros(4, 1)])
    monkeypatch.setattr(MelVAE, "reconstruct", lambda self, mel: mean[: mel.shape[0]] if mel.dim() == 3 and
                        mel.shape[0] == 2 else mean[2:3])
    got_std, got_corr = estimate_mel_noise(vae, iter(draws))
    torch.testing.assert_close(got_std, std, rtol=0.05, atol=0.01)
    torch.testing.assert_close(got_corr[:3], corr[:3], rtol=0, atol=0.03)
    assert got_corr[3] == 0  # no spread: no correlation

    vae.set_mel_noise(std, torch.zeros(4))
    eps = torch.randn(3, 4, 40, generator=g)
    short = mean[..., :40]
    torch.testing.assert_close(vae.sample_mel(short, eps), short + std.view(1, -1, 1) * eps)
    torch.testing.assert_close(vae.sample_mel(short, eps, 0.5), short + 0.5 * std.view(1, -1, 1) * eps)
    assert vae.sample_mel(mean, eps, 0.0) is mean
    with pytest.raises(ValueError, match="noise"):
        vae.sample_mel(mean, eps[..., :5])
    with pytest.raises(ValueError, match="non-negative"):
        vae.set_mel_noise(-std, corr)
    with pytest.raises(ValueError, match=r"within \[-1, 1\]"):
        vae.set_mel_noise(std, corr + 1)

    plain = MelVAE(VAEConfig.preset("tiny", mel_channels=4))  # the default keeps none (older files load)
    assert not any(k.startswith("mel_noise") for k in plain.state_dict()) and plain.sample_mel(mean, eps) is mean
    with pytest.raises(ValueError, match="mel_noise=True"):
        plain.set_mel_noise(std, corr)
