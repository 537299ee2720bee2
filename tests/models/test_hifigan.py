"""HiFiGANGenerator against transformers' SpeechT5HifiGan, and loading release-format checkpoints."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from muvi.checkpoint import CheckpointError
from muvi.models.hifigan import HiFiGANConfig, HiFiGANGenerator, fold_weight_norm, load_hifigan_generator

logger = logging.getLogger(__name__)

# The release used the old weight-norm API, deprecated in torch but still what its files contain.
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.*is deprecated:FutureWarning")


def _randomize(module: nn.Module, seed: int) -> None:
    """Shared random weights of a realistic scale (default inits hide bias and scale bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in module.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            scale = 0.05 if p.dim() == 1 else 1.0 / fan_in ** 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _speecht5(cfg: HiFiGANConfig):
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    hf_cfg = SpeechT5HifiGanConfig(
        model_in_dim=cfg.num_mels, sampling_rate=24000,
        upsample_initial_channel=cfg.upsample_initial_channel,
        upsample_rates=list(cfg.upsample_rates), upsample_kernel_sizes=list(cfg.upsample_kernel_sizes),
        resblock_kernel_sizes=list(cfg.resblock_kernel_sizes),
        resblock_dilation_sizes=[list(d) for d in cfg.resblock_dilation_sizes],
        leaky_relu_slope=cfg.leaky_relu_slope, normalize_before=False)
    return SpeechT5HifiGan(hf_cfg).eval()


def _from_speecht5(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SpeechT5 names → release names: upsampler.N → ups.N; its mel mean/scale buffers are dropped."""
    return {k.replace("upsampler.", "ups.", 1): v for k, v in state.items() if k not in ("mean", "scale")}


@pytest.mark.parametrize("preset,num_mels,frames", [("tiny", 24, 11), ("v1-24k", 160, 3)])
def test_matches_speecht5_hifigan(preset, num_mels, frames):
    cfg = HiFiGANConfig.preset(preset, num_mels=num_mels)
    ref = _speecht5(cfg)
    _randomize(ref, seed=0)
    ours = HiFiGANGenerator(cfg).eval()
    ours.load_state_dict(_from_speecht5(ref.state_dict()), strict=True)
    mel = torch.randn(2, num_mels, frames, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(mel.transpose(1, 2))  # SpeechT5 takes (B, T, M)
        got = ours(mel)
        single = ours(mel[0])
    assert expected.shape[-1] > frames * 300  # the reference keeps the transposed convs' extra tail
    assert got.shape == (2, frames * 300)
    # Not saturated by tanh, so the comparison is meaningful.
    assert 0.05 < expected.abs().mean() < 0.9
    torch.testing.assert_close(got, expected[:, : frames * 300], rtol=0, atol=2e-6)
    torch.testing.assert_close(single, got[0], rtol=0, atol=2e-6)


@pytest.mark.parametrize("preset", ["v1-24k", "tiny"])
def test_parameter_count_and_hop(preset):
    cfg = HiFiGANConfig.preset(preset)
    with torch.device("meta"):
        model = HiFiGANGenerator(cfg)
    count = sum(p.numel() for p in model.parameters())
    logger.info("HiFiGANGenerator %s: %d parameters", preset, count)
    print(f"HiFiGANGenerator {preset}: {count:,} parameters")
    assert model.hop_length == 300
    if preset == "v1-24k":
        assert count == 74_975_851
        assert model.conv_pre.in_channels == 160 and model.conv_pre.out_channels == 1200


@pytest.mark.parametrize("frames", [1, 2, 9])
def test_output_length_exact(frames):
    model = HiFiGANGenerator(HiFiGANConfig.preset("tiny", num_mels=8)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 8, frames)).shape == (1, frames * 300)


def _release_checkpoint(cfg: HiFiGANConfig, seed: int) -> tuple[nn.Module, dict]:
    """A jik876-style generator: old-API weight norm on every conv, magnitudes moved off ‖v‖."""
    plain = HiFiGANGenerator(cfg)
    _randomize(plain, seed)
    normed = copy.deepcopy(plain).eval()
    for m in normed.modules():
        if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
            torch.nn.utils.weight_norm(m)  # the API the release used: weight_g / weight_v
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in normed.named_parameters():
            if name.endswith("weight_g"):  # otherwise g = ‖v‖ and ignoring g would go unnoticed
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
    return normed, normed.state_dict()


def test_loads_release_weight_norm_checkpoint(tmp_path):
    cfg = HiFiGANConfig.preset("tiny", num_mels=16)
    normed, state = _release_checkpoint(cfg, seed=3)
    assert any(k.endswith("ups.0.weight_g") for k in state)
    assert state["ups.0.weight_g"].shape == (cfg.upsample_initial_channel, 1, 1)  # dim 0 of (C_in, C_out, k)
    path = tmp_path / "g_02500000"
    torch.save({"generator": state}, path)
    model = load_hifigan_generator(path, cfg)
    assert not any("weight_g" in k or "parametrizations" in k for k in model.state_dict())
    mel = torch.randn(2, 16, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(mel), normed(mel), rtol=0, atol=2e-6)


def test_new_parametrization_round_trip(tmp_path):
    """apply_weight_norm (new API) → perturb g → state dict → load folds it; remove_weight_norm agrees."""
    cfg = HiFiGANConfig.preset("tiny", num_mels=16)
    model = HiFiGANGenerator(cfg).eval()
    _randomize(model, seed=5)
    model.apply_weight_norm()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("original0"):
                p.mul_(1.3)
    state = model.state_dict()
    assert "conv_pre.parametrizations.weight.original1" in state
    torch.save(state, tmp_path / "train.pt")
    loaded = load_hifigan_generator(tmp_path / "train.pt", cfg)
    mel = torch.randn(1, 16, 5, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = model(mel)
        torch.testing.assert_close(loaded(mel), expected, rtol=0, atol=2e-6)
        model.remove_weight_norm()
        assert set(model.state_dict()) == set(loaded.state_dict())
        torch.testing.assert_close(model(mel), expected, rtol=0, atol=2e-6)


def test_plain_safetensors_and_mismatch_errors(tmp_path):
    from safetensors.torch import save_file

    cfg = HiFiGANConfig.preset("tiny", num_mels=16)
    model = HiFiGANGenerator(cfg)
    save_file(model.state_dict(), str(tmp_path / "g.safetensors"))
    loaded = load_hifigan_generator(tmp_path / "g.safetensors", cfg)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="conv_pre.weight"):
        load_hifigan_generator(tmp_path / "g.safetensors", HiFiGANConfig.preset("tiny", num_mels=80))
    _, state = _release_checkpoint(cfg, seed=7)
    del state["conv_post.weight_v"]
    with pytest.raises(CheckpointError, match="conv_post"):
        fold_weight_norm(state)


def test_fold_matches_torch_weight_norm():
    for conv in (nn.Conv1d(6, 4, 3), nn.ConvTranspose1d(6, 4, 5, stride=2)):
        expected = conv.weight.detach().clone()
        torch.nn.utils.weight_norm(conv)
        with torch.no_grad():
            conv.weight_g.mul_(2.0)
        conv(torch.randn(1, 6, 8))  # recompute the weight from g and v
        state = fold_weight_norm({k: v.detach() for k, v in conv.state_dict().items()})
        torch.testing.assert_close(state["weight"], conv.weight.detach())
        torch.testing.assert_close(state["weight"], 2 * expected)


def test_config_round_trip(tmp_path):
    cfg = HiFiGANConfig.preset("tiny", num_mels=80)
    cfg.to_json(tmp_path / "config.json")
    assert HiFiGANConfig.from_json(tmp_path / "config.json") == cfg
    with pytest.raises(ValueError):
        HiFiGANConfig(upsample_rates=(5, 5), upsample_kernel_sizes=(16, 8, 8))
