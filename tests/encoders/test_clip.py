"""CLIP ViT frame encoder: equivalence with transformers, OpenAI and transformers key names,
strict loading through muvi.hub, and its tokens through the visual adaptor."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import muvi
from muvi import hub
from muvi.checkpoint import CheckpointError
from muvi.encoders.clip import CLIPEncoder, CLIPEncoderConfig, load_clip_encoder
from muvi.encoders.frames import VideoFeatures, encode_frames, encode_video_file
from muvi.models.adaptor import AdaptorConfig, VisualAdaptor
from muvi.video import read_frames

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**overrides) -> CLIPEncoderConfig:
    return CLIPEncoderConfig.preset("tiny", **overrides)


def _hf_vision_config(cfg: CLIPEncoderConfig, hidden_act: str) -> dict:
    return dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp_hidden_size, num_hidden_layers=cfg.depth,
                num_attention_heads=cfg.num_heads, num_channels=cfg.in_channels, image_size=cfg.image_size,
                patch_size=cfg.patch_size, hidden_act=hidden_act, layer_norm_eps=cfg.layer_norm_eps)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (biases and LayerNorms too: their init values hide mapping errors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            elif p.ndim <= 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)


def _hf_vision(cfg: CLIPEncoderConfig, hidden_act: str, seed: int = 1) -> transformers.CLIPVisionModel:
    hf_cfg = transformers.CLIPVisionConfig(**_hf_vision_config(cfg, hidden_act), attn_implementation="eager")
    model = transformers.CLIPVisionModel(hf_cfg).eval()
    _randomise(model, seed)
    return model


def _hub_layout(state: dict) -> dict:
    """The published files' names: transformers 4.x nested CLIPVisionModel's tower under
    ``vision_model.`` (5.x's own state dict and save_pretrained have no prefix)."""
    return {k if k.startswith("vision_model.") else f"vision_model.{k}": v for k, v in state.items()}


def _images(cfg: CLIPEncoderConfig, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)


def _openai_state(hf_state: dict, depth: int) -> dict:
    """A full OpenAI CLIP state dict: the vision tower written out by hand from clip/model.py's
    names (q, k, v stacked into in_proj), plus a text tower and the projections to be ignored."""
    src = {k.removeprefix("vision_model."): v for k, v in hf_state.items()}
    width = src["post_layernorm.weight"].shape[0]
    out = {"visual.conv1.weight": src["embeddings.patch_embedding.weight"],
           "visual.class_embedding": src["embeddings.class_embedding"],
           "visual.positional_embedding": src["embeddings.position_embedding.weight"],
           "visual.proj": torch.randn(width, 16)}
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for kind in ("weight", "bias"):
            out[f"visual.{ours}.{kind}"] = src[f"{theirs}.{kind}"]
    for i in range(depth):
        hf, oa = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{oa}attn.in_proj_{kind}"] = torch.cat([src[f"{hf}self_attn.{p}_proj.{kind}"] for p in "qkv"])
            for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{oa}{ours}.{kind}"] = src[f"{hf}{theirs}.{kind}"]
    text = {"token_embedding.weight": torch.randn(50, 16), "positional_embedding": torch.randn(7, 16),
            "transformer.resblocks.0.attn.in_proj_weight": torch.randn(48, 16), "ln_final.weight": torch.ones(16),
            "text_projection": torch.randn(16, 16), "logit_scale": torch.tensor(4.6),
            "input_resolution": torch.tensor(32), "context_length": torch.tensor(7), "vocab_size": torch.tensor(50)}
    return {**out, **text}


@pytest.fixture(scope="module")
def hf_quick():
    return _hf_vision(_tiny(), "quick_gelu")


def _assert_matches_hf(ours: CLIPEncoder, hf: torch.nn.Module, images: torch.Tensor) -> None:
    with torch.no_grad():
        ref = hf(pixel_values=images)
        hidden = ours(images)
        torch.testing.assert_close(hidden, ref.last_hidden_state, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.pool(hidden), ref.pooler_output, atol=1e-5, rtol=1e-5)


def test_parameter_names_are_the_openai_names_without_visual():
    cfg = _tiny()
    names = set(CLIPEncoder(cfg).state_dict())
    expected = {"conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias",
                "ln_post.weight", "ln_post.bias"}
    for i in range(cfg.depth):
        expected |= {f"transformer.resblocks.{i}.{n}" for n in (
            "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
            "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias",
            "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")}
    assert names == expected
    b16 = CLIPEncoderConfig.preset("b16")
    assert (b16.hidden_size, b16.depth, b16.num_heads, b16.patch_size, b16.image_size, b16.grid_size,
            b16.activation, b16.layer_norm_eps, b16.tubelet_size) == (768, 12, 12, 16, 224, 14, "quick_gelu", 1e-5, 1)
    # transformers imports lazily, and a module imported under the meta device keeps meta constants
    # (torchaudio's kaldi EPSILON, which AudioMAE's fbank then fails on): resolve the class first
    hf_model, hf_config = transformers.CLIPVisionModel, transformers.CLIPVisionConfig
    with torch.device("meta"):  # ViT-B/16 has transformers' parameter count, without building it for real
        ours = sum(p.numel() for p in CLIPEncoder(b16).parameters())
        theirs = sum(p.numel() for p in hf_model(hf_config(**_hf_vision_config(b16, "quick_gelu"))).parameters())
    assert ours == theirs == 85_799_424


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_matches_transformers(hf_quick, tmp_path, hidden_act):
    """quick_gelu: a Hub-style ``vision_model.*`` state dict alone (the activation assumed, as every
    OpenAI model has it); gelu: a save_pretrained folder (no prefix), whose config.json gives it."""
    cfg = _tiny()
    if hidden_act == "quick_gelu":
        hf, path = hf_quick, tmp_path / "pytorch_model.bin"
        torch.save(_hub_layout(hf.state_dict()), path)
    else:
        hf, path = _hf_vision(cfg, "gelu", seed=2), tmp_path / "model.safetensors"
        hf.save_pretrained(tmp_path)
        assert "encoder.layers.0.self_attn.q_proj.weight" in load_file(str(path))
    encoder, source = hub.load_encoder(path, "video")
    assert isinstance(encoder, CLIPEncoder) and source == str(path.resolve())
    assert encoder.config == dataclasses.replace(cfg, activation=hidden_act)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    images = _images(cfg, 3)
    _assert_matches_hf(encoder, hf, images)
    if hidden_act == "gelu":  # the activation matters: the wrong one is visibly off
        wrong = load_clip_encoder(path, dataclasses.replace(cfg, activation="quick_gelu"))
        with torch.no_grad():
            assert not torch.allclose(wrong(images), encoder(images), atol=1e-3)


def test_openai_names_load_the_same_weights(hf_quick, tmp_path, caplog):
    cfg = _tiny()
    torch.save(_hub_layout(hf_quick.state_dict()), tmp_path / "hf.bin")
    torch.save(_openai_state(hf_quick.state_dict(), cfg.depth), tmp_path / "openai.pt")
    with caplog.at_level(logging.INFO, logger="muvi.encoders.clip"):
        openai, _ = hub.load_encoder(tmp_path / "openai.pt", "video")
    assert "dropping 10 tensors" in caplog.text and "text tower" in caplog.text
    from_hf = load_clip_encoder(tmp_path / "hf.bin")
    assert openai.config == from_hf.config == cfg
    hf_state = from_hf.state_dict()
    assert all(torch.equal(v, hf_state[k]) for k, v in openai.state_dict().items())
    _assert_matches_hf(openai, hf_quick, _images(cfg, 2, seed=3))
    # OpenAI's files hold fp16 weights: they load into the fp32 encoder.
    half = {k: v.half() if v.is_floating_point() else v for k, v in _openai_state(hf_quick.state_dict(), 2).items()}
    torch.save(half, tmp_path / "openai16.pt")
    for key, value in load_clip_encoder(tmp_path / "openai16.pt").state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, hf_state[key].half().float()), key


def test_clip_model_checkpoint_ignores_the_text_tower(tmp_path, caplog):
    cfg = _tiny(activation="gelu", layer_norm_eps=1e-6)
    text = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=7, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    hf = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=text, vision_config=_hf_vision_config(cfg, "gelu"), projection_dim=8)).eval()
    _randomise(hf, seed=5)
    hf.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert {"text_model.embeddings.token_embedding.weight", "visual_projection.weight", "logit_scale"} <= keys
    with caplog.at_level(logging.INFO, logger="muvi.encoders.clip"):
        encoder, _ = hub.load_encoder(tmp_path / "model.safetensors", "video")
    assert "text tower" in caplog.text and "joint image-text space" in caplog.text
    assert encoder.config == cfg  # activation and eps from config.json's vision_config
    _assert_matches_hf(encoder, hf.vision_model, _images(cfg, 2))


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")  # making the TorchScript archive
def test_bad_checkpoints_name_the_file_and_keys(hf_quick, tmp_path):
    cfg = _tiny()
    state = _hub_layout(hf_quick.state_dict())

    renamed, layer = dict(state), "vision_model.encoder.layers.1.mlp"
    renamed[f"{layer}.fc3.weight"] = renamed.pop(f"{layer}.fc1.weight")
    torch.save(renamed, tmp_path / "renamed.bin")
    with pytest.raises(CheckpointError) as err:
        hub.load_encoder(tmp_path / "renamed.bin", "video")
    first, *rest = str(err.value).splitlines()
    assert first == f"{tmp_path / 'renamed.bin'} does not match CLIPEncoder:"
    assert "missing keys (1): transformer.resblocks.1.mlp.c_fc.weight" in rest[0]
    assert "unexpected keys (1): vision_model.encoder.layers.1.mlp.fc3.weight" in rest[1]

    short = dict(state, **{"vision_model.encoder.layers.0.mlp.fc2.weight": torch.zeros(cfg.hidden_size, 8)})
    save_file(short, str(tmp_path / "short.safetensors"))
    with pytest.raises(CheckpointError, match=r"short\.safetensors does not match CLIPEncoder:\n.*shape mismatches "
                                              r"\(1\): transformer\.resblocks\.0\.mlp\.c_proj\.weight: checkpoint "
                                              r"\(128, 8\) vs model \(128, 512\)"):
        load_clip_encoder(tmp_path / "short.safetensors")

    no_k = {k: v for k, v in state.items() if "layers.0.self_attn.k_proj" not in k}
    torch.save(no_k, tmp_path / "no_k.bin")
    with pytest.raises(CheckpointError, match=r"missing keys \(2\): transformer\.resblocks\.0\.attn\.in_proj_bias, "
                                              r"transformer\.resblocks\.0\.attn\.in_proj_weight"):
        load_clip_encoder(tmp_path / "no_k.bin")

    def one_line(call, match: str) -> None:
        with pytest.raises(CheckpointError, match=match) as err:
            call()
        assert "\n" not in str(err.value)

    torch.save({"head.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    one_line(lambda: load_clip_encoder(tmp_path / "other.pt"), r"other\.pt: not a CLIP ViT checkpoint")
    resnet = {"visual.conv1.weight": torch.zeros(4, 3, 3, 3), "visual.layer1.0.conv1.weight": torch.zeros(4, 4, 1, 1)}
    torch.save(resnet, tmp_path / "rn50.pt")
    one_line(lambda: hub.load_encoder(tmp_path / "rn50.pt", "video"), r"rn50\.pt: a ResNet CLIP")
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "ViT-B-16.pt")
    with pytest.warns(UserWarning, match="TorchScript"):  # torch's own, before it refuses
        one_line(lambda: hub.load_encoder(tmp_path / "ViT-B-16.pt", "video"),
                 r"ViT-B-16\.pt: a TorchScript archive, which is not read.*torch\.jit\.load")


def test_tokens_go_through_the_adaptor_to_the_latent_rate():
    """uint8 frames → the one frame pipeline → per-frame (h, w) grids and CLS tokens → the adaptor's
    CLS-queried attention (and CLS-only) aggregation → (B, T, D) at the latent rate."""
    cfg = _tiny()
    torch.manual_seed(0)
    encoder = CLIPEncoder(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    frames = torch.randint(0, 256, (2, 5, 3, 40, 48), dtype=torch.uint8, generator=gen)  # resized and cropped
    tokens = encode_frames(encoder, frames, max_batch=3)
    assert tokens.shape == (2, 5, cfg.grid_size, cfg.grid_size, cfg.hidden_size)
    small = torch.nn.functional.interpolate(frames.flatten(0, 1).float(), size=(32, 38), mode="bilinear",
                                            antialias=True).round().clamp(0, 255)[..., 3:35].unflatten(0, (2, 5))
    grid, cls = encoder.encode_with_cls(encoder.normalize(small / 255))
    torch.testing.assert_close(tokens, grid)
    with torch.no_grad():  # tokens are last_hidden_state[:, 1:] as a grid; CLS is pooler_output
        hidden = encoder(encoder.normalize(small[1, 4] / 255)[None])
    torch.testing.assert_close(grid[1, 4], hidden[0, 1:].reshape(cfg.grid_size, cfg.grid_size, -1))
    torch.testing.assert_close(cls[1, 4], encoder.pool(hidden)[0])
    assert cls.shape == (2, 5, cfg.hidden_size)
    for aggregation in ("attention", "cls"):
        adaptor = VisualAdaptor(AdaptorConfig(encoder_dim=cfg.hidden_size, width=64, aggregation=aggregation))
        cond = adaptor(grid, num_frames=10, cls=cls)  # 5 frames at 10 FPS → 10 latent frames
        assert cond.shape == (2, 10, 64) and torch.isfinite(cond).all()
        with pytest.raises(ValueError, match="needs the encoder's CLS tokens"):
            adaptor(grid, num_frames=10)


def test_frame_pipeline_gives_the_cls_tokens_too():
    """encode_frames / encode_video_file with ``with_cls``: encode_with_cls's (tokens, cls) after the
    one frame pipeline; the video file windowed as one pass (muvi's bundled clip, 5.28 s)."""
    torch.manual_seed(0)
    encoder = CLIPEncoder(_tiny()).eval()
    path = Path(muvi.__file__).parent / "assets" / "sample.mp4"
    frames = read_frames(path, 10.0, duration=2.0, size=32)  # uint8 (20, 3, 32, 32)
    features = encode_frames(encoder, frames[None], max_batch=7, with_cls=True)
    assert isinstance(features, VideoFeatures)
    with torch.no_grad():
        grid, cls = encoder.encode_with_cls(encoder.normalize(frames.float() / 255)[None])
    torch.testing.assert_close(features.tokens, grid)
    torch.testing.assert_close(features.cls, cls)
    torch.testing.assert_close(encode_frames(encoder, frames[None]), grid)  # tokens alone by default
    whole = encode_video_file(path, encoder, num_frames=20, window_seconds=64.0, with_cls=True)
    windowed = encode_video_file(path, encoder, num_frames=20, window_seconds=0.7, max_batch=3, with_cls=True)
    assert windowed.cls.shape == (20, 128) and windowed.cls.device.type == "cpu"
    for got in (whole, windowed):
        torch.testing.assert_close(got.tokens, grid[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.cls, cls[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(encode_video_file(path, encoder, num_frames=20, window_seconds=0.7), windowed.tokens)


def test_tubelet_averages_frames_and_batching_does_not_matter():
    torch.manual_seed(0)
    per_frame = CLIPEncoder(_tiny()).eval()
    pairs = CLIPEncoder(_tiny(tubelet_size=2)).eval()
    pairs.load_state_dict(per_frame.state_dict())
    frames = per_frame.normalize(torch.rand(1, 5, 3, 32, 32))
    grid, cls = per_frame.encode_with_cls(frames, max_batch=None)
    grid2, cls2 = pairs.encode_with_cls(frames, max_batch=2)
    assert grid2.shape[1] == cls2.shape[1] == 3  # ceil(5 / 2)
    torch.testing.assert_close(grid2[:, 1], grid[:, 2:4].mean(1))
    torch.testing.assert_close(cls2[:, 2], cls[:, 4])  # the odd last frame alone
    torch.testing.assert_close(per_frame.encode(frames, max_batch=1), grid)


def test_config_and_inputs_are_checked():
    mean = torch.tensor(transformers.utils.constants.OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(transformers.utils.constants.OPENAI_CLIP_STD).view(3, 1, 1)
    frames = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(CLIPEncoder(_tiny()).normalize(frames), (frames - mean) / std)
    with pytest.raises(ValueError, match="activation must be one of"):
        _tiny(activation="gelu_new")
    with pytest.raises(ValueError, match="expects images of shape"):
        CLIPEncoder(_tiny())(torch.zeros(1, 3, 224, 224))
