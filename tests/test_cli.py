"""The `muvi generate` command on a tiny random release: muxing, audio output, bad input."""
import subprocess
import sys

import av
import pytest

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
