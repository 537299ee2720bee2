"""HiFi-GAN's MPD/MSD and LDM's mel patch discriminator: shapes, norms, sizes, release keys, losses."""
from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from muvi.checkpoint import load_strict
from muvi.models.discriminators import (
    HiFiGANDiscriminatorConfig,
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
    PatchDiscriminator,
    PatchDiscriminatorConfig,
    convert_release_discriminator_state,
    feature_matching_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    multi_resolution_stft_loss,
    num_parameters,
)

logger = logging.getLogger(__name__)
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.*is deprecated:FutureWarning")

TINY = HiFiGANDiscriminatorConfig.preset("tiny")


def _conv_out(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


@pytest.mark.parametrize("length", [2400, 2401, 3333, 8400])
def test_period_discriminator_shapes(length):
    torch.manual_seed(0)
    mpd = MultiPeriodDiscriminator(TINY)
    scores, fmaps = mpd(torch.randn(2, length))
    assert len(scores) == len(fmaps) == len(TINY.periods)
    k, pad = TINY.period_kernel_size, (TINY.period_kernel_size - 1) // 2
    for p, s, f in zip(TINY.periods, scores, fmaps):
        rows = math.ceil(length / p)  # the tail is reflect-padded to whole periods
        assert len(f) == len(TINY.period_channels) + 1
        for i, c in enumerate(TINY.period_channels):
            stride = 1 if i == len(TINY.period_channels) - 1 else TINY.period_stride
            rows = _conv_out(rows, k, stride, pad)
            assert f[i].shape == (2, c, rows, p)
        assert f[-1].shape == (2, 1, rows, p)
        assert s.shape == (2, rows * p)


@pytest.mark.parametrize("length", [2400, 2401, 3333])
def test_scale_discriminator_shapes(length):
    torch.manual_seed(0)
    msd = MultiScaleDiscriminator(TINY)
    scores, fmaps = msd(torch.randn(2, 1, length))
    assert len(scores) == len(fmaps) == TINY.num_scales
    n = length
    for scale, (s, f) in enumerate(zip(scores, fmaps)):
        if scale:
            n = _conv_out(n, 4, 2, 2)  # AvgPool1d(4, 2, padding=2)
        m = n
        assert len(f) == len(TINY.scale_channels) + 1
        for i, (c, k, st) in enumerate(zip(TINY.scale_channels, TINY.scale_kernel_sizes, TINY.scale_strides)):
            m = _conv_out(m, k, st, (k - 1) // 2)
            assert f[i].shape == (2, c, m)
        assert s.shape == (2, m) and f[-1].shape == (2, 1, m)


def test_spectral_norm_on_the_first_scale_only_and_weight_norm_elsewhere():
    mpd, msd = MultiPeriodDiscriminator(TINY), MultiScaleDiscriminator(TINY)

    def kinds(module):
        convs = [m for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
        assert convs and all(parametrize.is_parametrized(c, "weight") for c in convs)
        return {type(c.parametrizations.weight[0]).__name__ for c in convs}

    assert all(kinds(d) == {"_WeightNorm"} for d in mpd.discriminators)
    assert kinds(msd.discriminators[0]) == {"_SpectralNorm"}
    assert all(kinds(d) == {"_WeightNorm"} for d in msd.discriminators[1:])
    # Release module names (jik876/hifi-gan models.py).
    names = set(dict(msd.named_modules())) | set(dict(mpd.named_modules()))
    assert {"discriminators.4.convs.4", "discriminators.4.conv_post", "meanpools.1",
            "discriminators.2.convs.6"} <= names


def _expected_parameters(cfg: HiFiGANDiscriminatorConfig) -> int:
    """Counted from the architecture: conv weight + bias, plus g (one per output channel) under
    weight norm; spectral norm adds buffers only."""
    def conv(c_in, c_out, k, groups=1, wn=True):
        return c_out * (c_in // groups) * k + c_out + (c_out if wn else 0)

    period = sum(conv(a, b, cfg.period_kernel_size) for a, b in
                 zip((1,) + cfg.period_channels, cfg.period_channels)) + conv(cfg.period_channels[-1], 1, 3)
    total = len(cfg.periods) * period
    for scale in range(cfg.num_scales):
        wn = scale != 0
        total += sum(conv(a, b, k, g, wn) for a, b, k, g in
                     zip((1,) + cfg.scale_channels, cfg.scale_channels, cfg.scale_kernel_sizes, cfg.scale_groups))
        total += conv(cfg.scale_channels[-1], 1, 3, 1, wn)
    return total


def test_parameter_counts_v1_and_tiny():
    for cfg in (HiFiGANDiscriminatorConfig(), TINY):
        mpd, msd = MultiPeriodDiscriminator(cfg), MultiScaleDiscriminator(cfg)
        total = num_parameters([mpd, msd])
        assert total == _expected_parameters(cfg)
        logger.warning("MPD %d + MSD %d = %d parameters (%s)", num_parameters([mpd]),
                       num_parameters([msd]), total, "v1" if cfg == HiFiGANDiscriminatorConfig() else "tiny")
    # The V1 release sizes: 41.1M (MPD) and 29.6M (MSD).
    v1 = HiFiGANDiscriminatorConfig()
    assert num_parameters([MultiPeriodDiscriminator(v1)]) == 41_105_770
    assert num_parameters([MultiScaleDiscriminator(v1)]) == 29_618_821


def _release_copy(module: nn.Module) -> nn.Module:
    """The same weights in the release's layout: old-API weight_norm / spectral_norm."""
    old = copy.deepcopy(module)
    for m in list(old.modules()):
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and parametrize.is_parametrized(m, "weight"):
            spectral = type(m.parametrizations.weight[0]).__name__ == "_SpectralNorm"
            if spectral:
                u = m.parametrizations.weight[0]._u.clone()
                v = m.parametrizations.weight[0]._v.clone()
                raw = m.parametrizations.weight.original.detach().clone()
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            if spectral:
                m.weight = nn.Parameter(raw)
                torch.nn.utils.spectral_norm(m)
                m.weight_u.copy_(u)
                m.weight_v.copy_(v)
            else:
                torch.nn.utils.weight_norm(m)
    return old


@pytest.mark.parametrize("cls", [MultiPeriodDiscriminator, MultiScaleDiscriminator])
def test_release_layout_converts_and_scores_alike(cls):
    torch.manual_seed(1)
    ours = cls(TINY)
    with torch.no_grad():  # non-trivial g and bias values
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    release = _release_copy(ours).eval()
    keys = set(release.state_dict())
    assert any(k.endswith("weight_g") for k in keys)
    if cls is MultiScaleDiscriminator:
        assert {"discriminators.0.convs.0.weight_orig", "discriminators.0.convs.0.weight_u",
                "discriminators.0.convs.0.weight_v", "discriminators.1.convs.0.weight_v"} <= keys
    fresh = cls(TINY)
    load_strict(fresh, convert_release_discriminator_state(release.state_dict()), source="release")
    fresh.eval()
    x = torch.randn(2, 1, 3000)
    with torch.no_grad():
        (s_old, f_old), (s_new, f_new) = release(x), fresh(x)
    for a, b in zip(s_old, s_new):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for fa, fb in zip(f_old, f_new):
        for a, b in zip(fa, fb):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_patch_discriminator_shapes_and_batch_independence():
    cfg = PatchDiscriminatorConfig.preset("tiny")
    torch.manual_seed(0)
    disc = PatchDiscriminator(cfg)
    mel = torch.randn(3, 160, 80)
    out = disc(mel)
    m, t = 160, 80
    for _n in range(cfg.num_layers):  # stride-2 layers: the first conv and all but the last hidden one
        m, t = _conv_out(m, 4, 2, 1), _conv_out(t, 4, 2, 1)
    m, t = _conv_out(m, 4, 1, 1), _conv_out(t, 4, 1, 1)  # last hidden layer, stride 1
    m, t = _conv_out(m, 4, 1, 1), _conv_out(t, 4, 1, 1)  # output conv
    assert out.shape == (3, 1, m, t)
    # A score depends on its own example only (GroupNorm, not BatchNorm).
    torch.testing.assert_close(disc(mel[1:2]), out[1:2], rtol=1e-5, atol=1e-6)
    assert "main.0.weight" in disc.state_dict()


def test_losses_match_their_formulas():
    real = [torch.tensor([[0.5, 1.0]]), torch.tensor([[2.0]])]
    fake = [torch.tensor([[0.0, -1.0]]), torch.tensor([[1.0]])]
    # D: mean((1-r)^2) + mean(f^2) per discriminator.
    expected_d = (0.25 + 0.0) / 2 + (0.0 + 1.0) / 2 + 1.0 + 1.0
    assert lsgan_discriminator_loss(real, fake).item() == pytest.approx(expected_d)
    assert lsgan_generator_loss(fake).item() == pytest.approx((1.0 + 4.0) / 2 + 0.0)
    fr = [[torch.ones(2, 3), torch.zeros(4)]]
    fg = [[torch.zeros(2, 3), torch.full((4,), 2.0)]]
    assert feature_matching_loss(fr, fg).item() == pytest.approx(1.0 + 2.0)
    assert hinge_discriminator_loss(torch.tensor([0.5, 2.0]), torch.tensor([-2.0, 0.0])).item() == \
        pytest.approx(0.5 * ((0.5 + 0.0) / 2 + (0.0 + 1.0) / 2))
    assert hinge_generator_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(-2.0)
    # Feature matching never trains the discriminator through its real maps.
    r = torch.ones(3, requires_grad=True)
    g = torch.zeros(3, requires_grad=True)
    feature_matching_loss([[r]], [[g]]).backward()
    assert r.grad is None and g.grad is not None


def test_multi_resolution_stft_loss_equals_auraloss_on_real_music(tmp_path):
    """Value and gradient equal auraloss 0.4.0's MultiResolutionSTFTLoss (Parallel WaveGAN's
    resolutions) on a rendered Bach chorale against a copy with a pulse per 256 samples, the
    vocoder's frame-rate buzz; the pulses cost more at the short resolution than a level change."""
    import soundfile as sf
    from auraloss.freq import MultiResolutionSTFTLoss

    from conftest import render_chorales

    music = render_chorales(tmp_path, 22050, [("c.wav", 0, 1.5)])
    y = torch.from_numpy(sf.read(music / "c.wav", dtype="float32")[0])[None]
    pulses = torch.zeros_like(y)
    pulses[:, ::256] = 0.3 * y.abs().max()
    y_hat = (y + pulses).requires_grad_(True)
    ours = multi_resolution_stft_loss(y_hat, y)
    ours.backward()
    grad, y_hat.grad = y_hat.grad.clone(), None
    theirs = MultiResolutionSTFTLoss()(y_hat[:, None], y[:, None])
    theirs.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, y_hat.grad, rtol=1e-4, atol=1e-9)
    assert multi_resolution_stft_loss(y, y).item() == 0.0

    short = ((512, 50, 240),)
    buzz = multi_resolution_stft_loss(y + pulses, y, short)
    quieter = multi_resolution_stft_loss(0.7 * y, y, short)
    assert buzz > quieter > 0
