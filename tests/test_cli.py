"""The `muvi generate` command on a tiny random release: muxing, audio output, bad input."""
import subprocess
import sys

import av
import pytest
import torch

from muvi import cli


@pytest.fixture(scope="module")
def release(tiny_release_dir):
    return tiny_release_dir


def packets(path):
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.video[0]) if p.size]


def test_writes_video_with_music_and_untouched_video_stream(release, tmp_path):
    out = tmp_path / "with_music.mp4"
    code = cli.main(["generate", str(cli.bundled_sample_video()), "-o", str(out), "--model", str(release),
                     "--duration", "2.5", "--steps", "2", "--seed", "0", "--device", "cpu", "-q"])
    assert code == 0 and out.is_file()
    with av.open(str(out)) as c:
        audio = c.streams.audio[0]
        assert audio.codec_context.sample_rate == 24000
        decoded = sum(f.samples for f in c.decode(audio))
    # AAC adds encoder priming/padding of at most two 1024-sample frames.
    assert 2.5 * 24000 <= decoded <= 2.5 * 24000 + 2048
    # --duration shorter than the video cuts the picture there too (packets copied untouched).
    with av.open(str(cli.bundled_sample_video())) as c:
        stream = c.streams.video[0]
        kept = [bytes(p) for p in c.demux(stream) if p.size and p.pts * stream.time_base < 2.5]
    assert packets(out) == kept and len(kept) == 63  # frames at 0, 0.04, …, 2.48 s


def test_audio_output(release, tmp_path):
    out = tmp_path / "music.flac"
    assert cli.main(["generate", "-o", str(out), "--model", str(release), "--duration", "1",
                     "--steps", "2", "--device", "cpu", "-q"]) == 0
    import soundfile as sf

    data, sr = sf.read(str(out))
    assert sr == 24000 and len(data) == 24000


def test_mel_noise_sets_how_far_the_mel_is_drawn(tiny_release_dir, tmp_path, monkeypatch):
    """``--mel-noise S`` overrides the release's ``mel_noise_scale`` for a VAE with mel noise:
    the draw is made at S, and at 0 not at all (the mean mel, the paper's decode)."""
    import shutil

    from muvi.hub import load_component, save_component
    from muvi.models.vae import MelVAE, with_mel_noise

    release = tmp_path / "release"
    shutil.copytree(tiny_release_dir, release)
    noisy = with_mel_noise(load_component(release, "vae"))
    noisy.set_mel_noise(torch.full((noisy.config.mel_channels,), 0.5), torch.full((noisy.config.mel_channels,), 0.9))
    save_component(noisy, release, "vae")
    scales, real = [], MelVAE.sample_mel
    monkeypatch.setattr(MelVAE, "sample_mel", lambda self, mel, noise, scale=1.0: scales.append(scale)
                        or real(self, mel, noise, scale))
    for i, extra in enumerate(([], ["--mel-noise", "1.5"], ["--mel-noise", "0"])):
        scales.clear()
        assert cli.main(["generate", "-o", str(tmp_path / f"{i}.wav"), "--model", str(release), "--duration", "1",
                         "--steps", "2", "--seed", "0", "--device", "cpu", "-q", *extra]) == 0
        assert scales == [[0.5], [1.5], []][i]



def test_loudness_masters_to_the_given_target_or_not_at_all(tiny_release_dir, tmp_path, monkeypatch):
    """``--loudness L`` masters the output to L LUFS whatever the release says; ``--loudness off``
    leaves the vocoder's level (the release here sets -30)."""
    import json
    import shutil

    import muvi.pipeline

    release = tmp_path / "release"
    shutil.copytree(tiny_release_dir, release)
    config = json.loads((release / "config.json").read_text())
    config["pipeline"]["loudness_lufs"] = -30.0
    (release / "config.json").write_text(json.dumps(config))
    targets, real = [], muvi.pipeline.master
    monkeypatch.setattr(muvi.pipeline, "master", lambda wave, rate, target: targets.append(target)
                        or real(wave, rate, target))
    for i, extra in enumerate(([], ["--loudness", "-40"], ["--loudness", "off"])):
        targets.clear()
        assert cli.main(["generate", "-o", str(tmp_path / f"{i}.wav"), "--model", str(release), "--duration", "1",
                         "--steps", "2", "--seed", "0", "--device", "cpu", "-q", *extra]) == 0
        assert targets == [[-30.0], [-40.0], []][i]

@pytest.mark.parametrize("argv,message", [
    (["generate", "missing.mp4"], "video not found: missing.mp4"),
    (["generate", "-o", "x.xyz"], "unknown output type"),
    (["generate", "--duration", "-1"], "--duration -1.0: must be > 0"),
    (["generate", "--steps", "0"], "--steps 0: must be between 1"),
])
def test_bad_input_exits_non_zero_with_one_line(release, tmp_path, capsys, argv, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli.main(argv + ["--model", str(release), "--device", "cpu", "-q"])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("muvi: error:") and message in err and "\n" not in err


def test_never_overwrites(release, tmp_path, capsys):
    out = tmp_path / "exists.wav"
    out.write_bytes(b"keep me")
    assert cli.main(["generate", "-o", str(out), "--model", str(release), "--device", "cpu", "-q"]) != 0
    assert out.read_bytes() == b"keep me"
    video = tmp_path / "clip.mp4"
    video.write_bytes(cli.bundled_sample_video().read_bytes())
    assert cli.main(["generate", str(video), "-o", str(video), "--model", str(release), "--overwrite",
                     "--device", "cpu", "-q"]) != 0
    assert video.read_bytes() == cli.bundled_sample_video().read_bytes()
    assert "is an input" in capsys.readouterr().err


def test_console_script_is_installed(release, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "muvi.cli", "generate", str(tmp_path / "nope.mp4"),
                           "--model", str(release)], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0


# ----------------------------------------------------------------------------- batches, options

def test_version_and_plain_help(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"muvi {cli.version()}"
    for command in ("generate", "demo"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out
        assert "``" not in text and ":func:" not in text and ":class:" not in text, text
    assert cli.plain("see :func:`muvi.generate` and ``muvi demo``, :class:`~muvi.pipeline.MuviPipeline`") == \
        "see muvi.generate and muvi demo, muvi.pipeline.MuviPipeline"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Three short videos in a folder (cut from the sample by muvi's own muxer, packets
    copied), beside a file that is not a video."""
    from muvi.mux import mux_audio

    folder = tmp_path_factory.mktemp("clips")
    import numpy as np

    for name, seconds in (("a", 1.5), ("b", 1.5), ("c", 2.5)):
        mux_audio(cli.bundled_sample_video(), np.zeros(int(seconds * 24000), np.float32), 24000,
                  folder / f"{name}.mp4", duration=seconds)
    (folder / "notes.txt").write_text("not a video")
    return folder


def test_a_folder_in_one_call_equals_each_video_alone(release, clips, tmp_path, monkeypatch):
    import soundfile as sf

    from muvi.pipeline import MuviPipeline

    loads = []
    original = MuviPipeline.from_pretrained.__func__
    monkeypatch.setattr(MuviPipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or original(cls, *a, **k)))
    out = tmp_path / "out"
    code = cli.main(["generate", str(clips), "-o", str(out), "--audio-out", "--model", str(release), "--steps", "2",
                     "--seed", "3", "--device", "cpu", "-q"])
    assert code == 0 and len(loads) == 1  # one model load for the whole folder
    assert sorted(p.name for p in out.iterdir()) == ["a_muvi.mp4", "a_muvi.wav", "b_muvi.mp4", "b_muvi.wav",
                                                     "c_muvi.mp4", "c_muvi.wav"]
    for name, seconds in (("a", 1.5), ("c", 2.5)):
        alone = tmp_path / f"{name}_alone.wav"
        assert cli.main(["generate", str(clips / f"{name}.mp4"), "-o", str(alone), "--model", str(release),
                         "--steps", "2", "--seed", "3", "--device", "cpu", "-q"]) == 0
        batched, rate = sf.read(out / f"{name}_muvi.wav", dtype="float32")
        single, _ = sf.read(alone, dtype="float32")
        assert rate == 24000 and batched.shape == single.shape
        assert batched.shape[0] / rate == pytest.approx(seconds, abs=0.05)  # as long as the clip plays
        # a and b went through the networks together: the same music up to float rounding
        assert abs(batched - single).max() <= 1e-4 * abs(single).max() + 1e-7
        with av.open(str(out / f"{name}_muvi.mp4")) as c:
            assert c.streams.audio and c.streams.video


def test_batch_arguments_are_checked_before_the_model_loads(release, clips, tmp_path, capsys):
    def error(*args):
        assert cli.main(["generate", *map(str, args), "--model", str(release), "--device", "cpu", "-q"]) == 2
        return capsys.readouterr().err.strip()

    assert error(clips, "-o", tmp_path / "x.mp4").endswith("with several videos, -o is a folder, not a .mp4 file")
    (tmp_path / "file").write_text("")
    assert error(clips, "-o", tmp_path / "file").endswith("with several videos, -o is a folder (this is a file)")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"{empty}: no videos in this folder" in error(empty)
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.mkv").write_bytes((clips / "a.mp4").read_bytes())
    assert "would both be written to" in error(clips / "a.mp4", other / "a.mkv", "-o", tmp_path / "o")
    assert error(clips / "a.mp4", "-o", tmp_path / "a.wav", "--audio-out").endswith("is audio already")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    message = error(clips / "a.mp4", bad, "-o", tmp_path / "o2")
    assert "bad.mp4" in message and message.count("\n") == 0
    assert not (tmp_path / "o2").exists()  # nothing was made


def test_generate_takes_a_list_and_batches_it(release, clips):
    import muvi
    from muvi.pipeline import MuviPipeline

    pipe = MuviPipeline.from_pretrained(release)
    videos = [clips / "a.mp4", clips / "b.mp4", clips / "c.mp4"]
    outs = muvi.generate(videos, model=pipe, num_steps=2, seed=[1, 2, 3], progress=False)
    assert [o.duration for o in outs] == pytest.approx([1.5, 1.5, 2.5], abs=0.05)
    for video, seed, out in zip(videos, (1, 2, 3), outs):
        alone = muvi.generate(video, model=pipe, num_steps=2, seed=seed, progress=False)
        assert out.waveform.shape == alone.waveform.shape
        assert (out.waveform - alone.waveform).abs().max() <= 1e-5 * alone.waveform.abs().max()
    # where the music is made, each item of a batch follows its own seed, as alone
    cond = torch.randn(2, 15, pipe.dit.config.width, generator=torch.Generator().manual_seed(0))
    together = pipe.sample_latent(cond, num_steps=2, seed=[1, 2])
    apart = torch.cat([pipe.sample_latent(cond[i:i + 1], num_steps=2, seed=s) for i, s in enumerate((1, 2))])
    assert torch.allclose(together, apart, atol=1e-5) and not torch.allclose(together[0], together[1], atol=0.1)
    with pytest.raises(muvi.MuviError, match="2 seeds for 3 videos"):
        muvi.generate(videos, model=pipe, seed=[1, 2])
