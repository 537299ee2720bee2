"""musicnn as a frame-level music encoder (muvi.encoders.music_frames), on real rendered music.

Its per-frame features are tied to the TF-checked port: over one musicnn patch their mean is the
network's own mean pool. Time alignment: a hop-aligned delay of the audio moves the features by
exactly that many output frames."""
import pytest
import soundfile as sf
import torch

from muvi.encoders.music_frames import MusicnnFrameEncoder, bucket_means
from muvi.encoders.musicnn import MusicnnEmbedder
from muvi.hub import load_encoder

from conftest import render_chorales


def load_audio_encoder(spec):
    return load_encoder(spec, "audio")

SR = 16000
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def encoder() -> MusicnnFrameEncoder:
    enc, source = load_audio_encoder("musicnn")
    assert source == "musicnn:MSD_musicnn"
    return enc


@pytest.fixture(scope="module")
def chorale(tmp_path_factory) -> torch.Tensor:
    folder = render_chorales(tmp_path_factory.mktemp("music"), SR, [("c.wav", 2, 12.0)])
    wave, sr = sf.read(folder / "c.wav", dtype="float32")
    assert sr == SR
    return torch.from_numpy(wave)


def test_bucket_means_average_each_output_span_and_hold_past_the_end():
    w = bucket_means(num_source=7, source_rate=4.0, fps=2.0, num_frames=5)  # centres 0, .25, ..., 1.5 s
    assert torch.allclose(w[0], torch.tensor([0.5, 0.5, 0, 0, 0, 0, 0]))
    assert torch.allclose(w[1], torch.tensor([0, 0, 0.5, 0.5, 0, 0, 0]))
    assert torch.allclose(w[3], torch.tensor([0, 0, 0, 0, 0, 0, 1.0]))  # [1.5, 2): only frame 6
    assert torch.allclose(w[4], torch.tensor([0, 0, 0, 0, 0, 0, 1.0]))  # past the end: the nearest
    assert torch.allclose(w.sum(1), torch.ones(5))


def test_mean_over_one_patch_is_the_networks_mean_pool(encoder, chorale):
    embedder = MusicnnEmbedder(encoder.network)
    wave = chorale[: (embedder.patch_frames - 1) * 256]  # exactly one 187-frame patch
    pooled = embedder.outputs(wave.numpy(), SR).mean_pool[0]
    frames = encoder.frame_features(wave[None], SR, fps=1 / 3.0, num_frames=1)[0, 0]  # one 3 s bucket
    assert frames.shape == (753,) == (encoder.config.hidden_size,)
    torch.testing.assert_close(frames, pooled, rtol=1e-5, atol=1e-5)


def test_features_follow_the_audio_in_time(encoder, chorale):
    fps, delay_frames = 10.0, 4
    delay = int(delay_frames / fps * SR)  # 6400 samples = 25 musicnn hops: hop-aligned
    a = encoder.frame_features(chorale[None], SR, fps, 120)
    b = encoder.frame_features(torch.cat([torch.zeros(delay), chorale])[None], SR, fps, 124)
    assert a.shape == (1, 120, 753) and b.shape == (1, 124, 753)
    inner = slice(30, 90)  # clear of both clips' edges (the longest convolution spans 2 s)
    shifted = b[:, inner.start + delay_frames: inner.stop + delay_frames]
    torch.testing.assert_close(shifted, a[:, inner], rtol=1e-4, atol=1e-4)
    # ... and they do move: without the shift the frames differ
    assert (b[:, inner] - a[:, inner]).abs().mean() > 10 * (shifted - a[:, inner]).abs().mean()


def test_batch_of_two_equals_each_alone_and_other_rates_resample(encoder, chorale):
    clips = torch.stack([chorale[:4 * SR], chorale[4 * SR:8 * SR]])
    both = encoder.frame_features(clips, SR, 10.0, 40)
    torch.testing.assert_close(both[1:], encoder.frame_features(clips[1], SR, 10.0, 40), rtol=1e-4, atol=1e-4)
    import librosa

    at_24k = torch.from_numpy(librosa.resample(clips[0].numpy(), orig_sr=SR, target_sr=24000))
    resampled = encoder.frame_features(at_24k, 24000, 10.0, 40)  # resampled back to 16 kHz inside
    assert torch.nn.functional.cosine_similarity(resampled, both[:1], dim=-1).mean() > 0.99


def test_specs_and_errors(tmp_path):
    enc, source = load_audio_encoder("tiny")  # an AudioMAE preset: random weights, nothing to record
    assert source is None and enc.config.hidden_size > 0 and not enc.training
    with pytest.raises(FileNotFoundError, match="'nope.pth' is neither a file"):
        load_audio_encoder("nope.pth")
    with pytest.raises(FileNotFoundError, match="no musicnn checkpoint 'XYZ'"):
        load_audio_encoder("musicnn:XYZ")
    enc, _ = load_audio_encoder("musicnn:MTT_musicnn")
    assert enc.config.num_classes == 50 and not enc.train().training  # stays frozen
    with pytest.raises(ValueError, match="mono waveform"):
        enc.frame_features(torch.zeros(1, 2, 16000), SR, 10.0, 10)
