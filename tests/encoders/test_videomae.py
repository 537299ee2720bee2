"""VideoMAE V2 encoder: release key names, equivalence with transformers, loading, appendix C."""
from __future__ import annotations

import logging

import pytest
import timm.models.vision_transformer
import torch
import transformers
from safetensors.torch import load_file, save_file

from muvi.checkpoint import CheckpointError
from muvi.encoders.videomae import (
    VideoMAEConfig,
    VideoMAEEncoder,
    convert_hf_videomae_state_dict,
    load_videomae_encoder,
)
from muvi.models.layers import sinusoid_table


def _tiny() -> VideoMAEConfig:
    return VideoMAEConfig.preset("tiny")


def _hf_model(cfg: VideoMAEConfig, seed: int) -> transformers.VideoMAEForVideoClassification:
    """A transformers VideoMAE classifier of our sizes with EVERY parameter random (q/v biases too)."""
    hf_cfg = transformers.VideoMAEConfig(
        image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=cfg.in_channels,
        num_frames=cfg.num_frames, tubelet_size=cfg.tubelet_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.mlp_hidden_size, hidden_act="gelu",
        # transformers defaults to 1e-12; the release (and we) use 1e-6.
        layer_norm_eps=cfg.layer_norm_eps, qkv_bias=True, use_mean_pooling=True, num_labels=5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager")
    model = transformers.VideoMAEForVideoClassification(hf_cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "layernorm" in name or "fc_norm" in name:
                p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    biases = [n for n, p in model.named_parameters() if ("query.bias" in n or "value.bias" in n)
              and p.abs().min() > 0]
    assert len(biases) == 2 * cfg.depth  # q/v biases init to zero: make sure they were randomised
    return model


def _hf_grid(model, clips: torch.Tensor, cfg: VideoMAEConfig) -> torch.Tensor:
    """transformers' last_hidden_state for our (N, C, T, H, W) clips, as an (N, S, h, w, D) grid."""
    with torch.no_grad():
        out = model.videomae(pixel_values=clips.permute(0, 2, 1, 3, 4)).last_hidden_state
    return out.reshape(clips.shape[0], cfg.steps_per_clip, cfg.grid_size, cfg.grid_size, cfg.hidden_size)


def _clips(cfg: VideoMAEConfig, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg.in_channels, cfg.num_frames, cfg.image_size, cfg.image_size, generator=gen)


def _assert_near(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} vs scale {scale:.3g}"


def _release_state(hf_state: dict, depth: int) -> dict:
    """The OpenGVLab release layout, written out by hand from its modeling_finetune.py names."""
    src = {k.removeprefix("videomae."): v for k, v in hf_state.items()}
    out = {"patch_embed.proj.weight": src["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": src["embeddings.patch_embeddings.projection.bias"],
           "fc_norm.weight": src["fc_norm.weight"], "fc_norm.bias": src["fc_norm.bias"],
           "head.weight": src["classifier.weight"], "head.bias": src["classifier.bias"]}
    for i in range(depth):
        hf = f"encoder.layer.{i}."
        att = hf + "attention.attention."
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [src[att + "query.weight"], src[att + "key.weight"], src[att + "value.weight"]], dim=0)
        out[f"blocks.{i}.attn.q_bias"] = src[att + "query.bias"]
        out[f"blocks.{i}.attn.v_bias"] = src[att + "value.bias"]
        for ours, theirs in (("attn.proj", "attention.output.dense"), ("norm1", "layernorm_before"),
                             ("norm2", "layernorm_after"), ("mlp.fc1", "intermediate.dense"),
                             ("mlp.fc2", "output.dense")):
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{kind}"] = src[f"{hf}{theirs}.{kind}"]
    return out


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(transformers classifier with random weights, its save_pretrained safetensors file)."""
    cfg = _tiny()
    model = _hf_model(cfg, seed=1)
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder)
    return model, folder / "model.safetensors"


def test_parameter_names_are_the_release_names_with_a_fused_qkv_bias():
    cfg = _tiny()
    model = VideoMAEEncoder(cfg)
    expected = {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    for i in range(cfg.depth):
        expected |= {f"blocks.{i}.{n}" for n in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
            "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
            "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")}
    assert set(model.state_dict()) == expected
    assert isinstance(model.blocks[0], timm.models.vision_transformer.Block)
    assert model.blocks[0].norm1.eps == 1e-6 and model.blocks[0].mlp.fc1.out_features == cfg.mlp_hidden_size
    assert not model.blocks[0].attn.qkv.bias.any()  # the release's zero-initialised q/v biases, no k bias
    no_bias = VideoMAEEncoder(VideoMAEConfig.preset("tiny", qkv_bias=False))
    assert no_bias.blocks[0].attn.qkv.bias is None
    # The position table is the fixed sinusoid one, kept as an unsaved buffer.
    assert torch.equal(model.pos_embed[0], sinusoid_table(cfg.num_tokens, cfg.hidden_size))
    assert "pos_embed" in dict(model.named_buffers()) and "pos_embed" not in model.state_dict()
    vit_b = VideoMAEConfig.preset("vit-b")
    assert (vit_b.hidden_size, vit_b.depth, vit_b.num_heads, vit_b.patch_size, vit_b.tubelet_size,
            vit_b.num_frames, vit_b.image_size, vit_b.layer_norm_eps) == (768, 12, 12, 16, 2, 16, 224, 1e-6)


@pytest.mark.parametrize("layout", ["classifier-safetensors", "model-no-prefix-pth"])
def test_matches_transformers(hf_pair, tmp_path, layout, caplog):
    """Both bias spellings: save_pretrained writes ``q_bias``/``v_bias`` (the Hub files' names),
    the in-memory 5.x state dict has ``query.bias``/``value.bias``."""
    model, safetensors_path = hf_pair
    cfg = _tiny()
    if layout == "classifier-safetensors":
        path = safetensors_path
        assert "videomae.encoder.layer.0.attention.attention.q_bias" in load_file(str(path))
    else:
        state = {k: v.clone() for k, v in model.videomae.state_dict().items()}  # no "videomae." prefix
        assert "encoder.layer.0.attention.attention.query.bias" in state
        path = tmp_path / "videomae.pth"
        torch.save(state, path)
    with caplog.at_level(logging.INFO, logger="muvi.encoders.videomae"):
        ours = load_videomae_encoder(path, cfg)
    if layout == "classifier-safetensors":
        assert "fc_norm.weight" in caplog.text and "classifier.weight" in caplog.text
    assert not ours.training and not any(p.requires_grad for p in ours.parameters())
    clips = _clips(cfg, 2)
    with torch.no_grad():
        got = ours(clips)
    assert got.shape == (2, cfg.steps_per_clip, cfg.grid_size, cfg.grid_size, cfg.hidden_size)
    _assert_near(got, _hf_grid(model, clips, cfg))


def test_convert_hf_stacks_query_key_value_in_order(hf_pair):
    model, _ = hf_pair
    hf_state = model.state_dict()
    ours = convert_hf_videomae_state_dict(hf_state)
    att = "videomae.encoder.layer.1.attention.attention."
    assert torch.equal(ours["blocks.1.attn.qkv.weight"],
                       torch.cat([hf_state[att + n + ".weight"] for n in ("query", "key", "value")]))
    assert torch.equal(ours["blocks.1.attn.v_bias"], hf_state[att + "value.bias"])
    assert "classifier.weight" in ours and "fc_norm.bias" in ours  # heads keep their names


def test_release_pth_nested_under_module(hf_pair, tmp_path, caplog):
    model, safetensors_path = hf_pair
    cfg = _tiny()
    release = _release_state(model.state_dict(), cfg.depth)
    path = tmp_path / "vit_b_k710_dl_from_giant.pth"
    torch.save({"module": release}, path)
    torch.load(path, weights_only=True)  # the file is loadable the safe way
    with caplog.at_level(logging.INFO, logger="muvi.encoders.videomae"):
        from_release = load_videomae_encoder(path, cfg)
    for name in ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"):
        assert name in caplog.text
    from_hf = load_videomae_encoder(safetensors_path, cfg)
    clips = _clips(cfg, 1, seed=3)
    with torch.no_grad():
        assert torch.equal(from_release(clips), from_hf(clips))


def test_qv_biases_fused_with_a_zero_key_bias_and_muvi_state_round_trips(hf_pair, tmp_path):
    model, _ = hf_pair
    cfg = _tiny()
    release = _release_state(model.state_dict(), cfg.depth)
    torch.save(release, tmp_path / "release.pth")
    loaded = load_videomae_encoder(tmp_path / "release.pth", cfg)
    d = cfg.hidden_size
    for i, block in enumerate(loaded.blocks):
        bias = block.attn.qkv.bias
        assert torch.equal(bias[:d], release[f"blocks.{i}.attn.q_bias"])
        assert not bias[d:2 * d].any()
        assert torch.equal(bias[2 * d:], release[f"blocks.{i}.attn.v_bias"])
    save_file(loaded.state_dict(), str(tmp_path / "muvi.safetensors"))
    again = load_videomae_encoder(tmp_path / "muvi.safetensors", cfg)
    state, state_again = loaded.state_dict(), again.state_dict()
    assert set(state) == set(state_again) and all(torch.equal(state[k], state_again[k]) for k in state)
    clips = _clips(cfg, 1, seed=5)
    with torch.no_grad():
        assert torch.equal(again(clips), loaded(clips))


def test_release_pretraining_layout(hf_pair, tmp_path):
    """Pre-training checkpoints: "encoder." prefixes, an encoder norm and a decoder, under "model"."""
    model, safetensors_path = hf_pair
    cfg = _tiny()
    release = {k: v for k, v in _release_state(model.state_dict(), cfg.depth).items()
               if not k.startswith(("fc_norm", "head"))}
    state = {"encoder." + k: v for k, v in release.items()}
    width = cfg.hidden_size
    state.update({"encoder.norm.weight": torch.ones(width), "encoder.norm.bias": torch.zeros(width),
                  "decoder.blocks.0.attn.qkv.weight": torch.zeros(12, 4), "decoder.head.weight": torch.zeros(3, 4),
                  "encoder_to_decoder.weight": torch.zeros(4, width), "mask_token": torch.zeros(1, 1, 4),
                  "encoder.pos_embed": sinusoid_table(cfg.num_tokens, width)[None]})
    path = tmp_path / "pretrain.pth"
    torch.save({"model": state}, path)
    clips = _clips(cfg, 1, seed=4)
    with torch.no_grad():
        expected = load_videomae_encoder(safetensors_path, cfg)(clips)
        assert torch.equal(load_videomae_encoder(path, cfg)(clips), expected)


def test_bad_checkpoints_name_the_keys(hf_pair, tmp_path):
    model, _ = hf_pair
    cfg = _tiny()
    release = _release_state(model.state_dict(), cfg.depth)

    no_block = {k: v for k, v in release.items() if not k.startswith("blocks.1.")}
    torch.save({"module": no_block}, tmp_path / "no_block.pth")
    with pytest.raises(CheckpointError, match=r"missing keys.*blocks\.1\.attn\.qkv\.weight"):
        load_videomae_encoder(tmp_path / "no_block.pth", cfg)

    wide = VideoMAEEncoder(VideoMAEConfig.preset("tiny", hidden_size=48, num_heads=3)).state_dict()
    save_file(wide, str(tmp_path / "wide.safetensors"))
    mismatch = r"shape mismatches \(26\).*blocks\.0\.attn\.qkv\.weight: checkpoint \(144, 48\) vs model \(96, 32\)"
    with pytest.raises(CheckpointError, match=mismatch):
        load_videomae_encoder(tmp_path / "wide.safetensors", cfg)

    extra = dict(release, **{"blocks.0.attn.k_bias": torch.zeros(cfg.hidden_size)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys.*blocks\.0\.attn\.k_bias"):
        load_videomae_encoder(tmp_path / "extra.pth", cfg)

    learnable = dict(release, pos_embed=torch.randn(1, cfg.num_tokens, cfg.hidden_size))
    torch.save(learnable, tmp_path / "learnable.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys.*pos_embed"):
        load_videomae_encoder(tmp_path / "learnable.pth", cfg)


def test_config_inferred_from_shapes(tmp_path):
    cfg = VideoMAEConfig.preset("tiny", hidden_size=128, num_heads=2, depth=3, mlp_ratio=2.0, patch_size=16)
    torch.manual_seed(0)
    model = VideoMAEEncoder(cfg)
    save_file(model.state_dict(), str(tmp_path / "enc.safetensors"))
    loaded = load_videomae_encoder(tmp_path / "enc.safetensors")
    got = loaded.config
    assert (got.hidden_size, got.depth, got.num_heads, got.patch_size, got.tubelet_size, got.mlp_ratio,
            got.qkv_bias) == (128, 3, 2, 16, 2, 2.0, True)
    # Image size and clip length are not in the weights: the released models' 224 px, 16 frames.
    assert (got.image_size, got.num_frames) == (224, 16)
    # Missing middle block with inferred config: still reported, not silently shortened.
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.1.")}
    save_file(state, str(tmp_path / "holey.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys.*blocks\.1\.norm1\.weight"):
        load_videomae_encoder(tmp_path / "holey.safetensors")


def test_normalize_uses_imagenet_statistics():
    model = VideoMAEEncoder(_tiny())
    frames = torch.rand(2, 3, 3, 4, 4)
    mean = torch.tensor(transformers.utils.constants.IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(transformers.utils.constants.IMAGENET_DEFAULT_STD).view(3, 1, 1)
    torch.testing.assert_close(model.normalize(frames), (frames - mean) / std)


def test_forward_rejects_other_sizes():
    model = VideoMAEEncoder(_tiny())
    with pytest.raises(ValueError, match="expects clips"):
        model(torch.zeros(1, 3, 8, 32, 32))


# ----------------------------------------------------------------------------------------------
# Appendix C: variable-length videos


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return VideoMAEEncoder(_tiny()).eval()


def _video(cfg: VideoMAEConfig, frames: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, frames, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def _clip(encoder, frames: torch.Tensor) -> torch.Tensor:
    """Encode one (1, T, C, H, W) clip directly with forward."""
    return encoder(frames.permute(0, 2, 1, 3, 4))


@torch.no_grad()
def test_appendix_c_37_frames(encoder):
    cfg = encoder.config
    video = _video(cfg, 37, seed=5)
    out = encoder.encode(video)
    assert out.shape == (1, 19, cfg.grid_size, cfg.grid_size, cfg.hidden_size)
    first = torch.cat([_clip(encoder, video[:, :16]), _clip(encoder, video[:, 16:32])], dim=1)
    _assert_near(out[:, :16], first)
    # Odd length: the last frame is repeated once; the tail segment is the LAST 16 frames.
    even = torch.cat([video, video[:, -1:]], dim=1)
    _assert_near(out[:, 16:], _clip(encoder, even[:, -16:])[:, -3:])
    # Not zero padding: a zero-padded tail clip would give different tokens.
    zero_padded = torch.cat([even[:, 32:], torch.zeros_like(even[:, :10])], dim=1)
    assert (out[:, 16:] - _clip(encoder, zero_padded)[:, :3]).abs().max() > 1e-3


@torch.no_grad()
def test_appendix_c_batch_and_chunks(encoder):
    cfg = encoder.config
    videos = torch.cat([_video(cfg, 37, seed=6), _video(cfg, 37, seed=7)])
    together = encoder.encode(videos)
    for i in range(2):
        _assert_near(together[i:i + 1], encoder.encode(videos[i:i + 1]))
    _assert_near(encoder.encode(videos, max_batch=2), together)
    _assert_near(encoder.encode(videos, max_batch=1), together)


@torch.no_grad()
def test_appendix_c_short_and_exact_lengths(encoder):
    cfg = encoder.config
    five = _video(cfg, 5, seed=8)
    out = encoder.encode(five)
    assert out.shape == (1, 3, cfg.grid_size, cfg.grid_size, cfg.hidden_size)
    padded = torch.cat([five, five[:, -1:].expand(-1, 11, -1, -1, -1)], dim=1)
    _assert_near(out, _clip(encoder, padded)[:, :3])

    one = _video(cfg, 1, seed=9)
    assert encoder.encode(one).shape[1] == 1

    thirty_two = _video(cfg, 32, seed=10)
    out = encoder.encode(thirty_two)
    assert out.shape[1] == 16
    _assert_near(out[:, 8:], _clip(encoder, thirty_two[:, 16:]))
