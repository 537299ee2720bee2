"""`muvi generate X -o out.mp4|out.mkv` on clips of many containers, codecs and frame rates.

Each clip is made here with FFmpeg's encoders through PyAV. The output must be playable (every
video frame and the audio decode), its audio must last the requested duration, and its picture
must be the input's: packet-identical when the container takes the codec, otherwise
transcoded to H.264 with every frame kept at its timestamp and close to the source.
"""
from fractions import Fraction

import av
import numpy as np
import pytest

from muvi import cli
from muvi.media import probe_video

from conftest import make_clip, tiny_release, video_packets

pytestmark = pytest.mark.usefixtures("one_thread")

# (file name, encoder, frame rate, extra make_clip arguments)
CLIPS = [
    ("h264.mp4", "libx264", 12, {}),
    ("mpeg4.mp4", "mpeg4", 29.97, {}),
    ("mpeg4.mkv", "mpeg4", 12.5, {}),
    ("mpeg2.mkv", "mpeg2video", 25, {}),
    ("ffv1.mkv", "ffv1", 12, {}),
    ("h264_audio.mkv", "libx264", 29.97, {"audio": True}),
    ("mpeg4.avi", "mpeg4", 12, {}),
    ("mjpeg.avi", "mjpeg", 1, {"seconds": 3.0}),
    ("cinepak.avi", "cinepak", 12, {}),
    ("msvideo1.avi", "msvideo1", 12, {}),
    ("mpeg1.mpg", "mpeg1video", 25, {}),
    ("mjpeg.mov", "mjpeg", 120, {"seconds": 1.0}),
    ("cinepak.mov", "cinepak", 12, {}),
    ("vp8.webm", "libvpx", 12, {"audio": True}),
    ("vp9.webm", "libvpx-vp9", 29.97, {}),
    ("vp8.ogv", "libvpx", 12, {}),
    ("offset.mp4", "libx264", 12, {"start": 1.0}),
]
# Theora has no encoder in PyAV's FFmpeg build (decoder only), so no .ogv/theora clip is made.


@pytest.fixture(scope="module")
def release(tiny_release_dir):
    return tiny_release_dir


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    return {name: make_clip(root / name, codec, fps, **extra) for name, codec, fps, extra in CLIPS}


def decoded(path):
    """(video frames as RGB arrays with their times, audio samples) of a whole file."""
    with av.open(str(path)) as c:
        frames = [(f.time, f.to_ndarray(format="rgb24")) for f in c.decode(c.streams.video[0])]
    with av.open(str(path)) as c:
        samples = sum(f.samples for f in c.decode(c.streams.audio[0])) if c.streams.audio else 0
        rate = c.streams.audio[0].codec_context.sample_rate if c.streams.audio else None
    return frames, samples, rate


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / max(mse, 1e-12))


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
@pytest.mark.parametrize("name", [c[0] for c in CLIPS])
def test_any_clip_gets_its_music(release, clips, tmp_path, caplog, name, suffix):
    src = clips[name]
    info = probe_video(src)
    out = tmp_path / f"out{suffix}"
    code = cli.main(["generate", str(src), "-o", str(out), "--model", str(release), "--steps", "1",
                     "--seed", "0", "--device", "cpu", "-q"])
    assert code == 0 and out.is_file()
    frames, samples, rate = decoded(out)
    # the music lasts the video (AAC adds at most two 1024-sample frames of priming/padding)
    want = round(info.duration * 24000)
    assert rate == 24000 and want <= samples <= want + 2048
    src_frames, _, _ = decoded(src)
    assert len(frames) == len(src_frames)
    assert probe_video(out).start_time == pytest.approx(info.start_time, abs=1e-3)
    with av.open(str(out)) as c:
        codec = c.streams.video[0].codec_context.name
        audio_start = c.streams.audio[0].start_time * c.streams.audio[0].time_base
    assert float(audio_start) == pytest.approx(info.start_time, abs=0.05)  # music starts with the picture
    transcoded = "transcoding" in caplog.text
    if transcoded:
        assert codec == "h264"
        assert [t for t, _ in frames] == pytest.approx([t for t, _ in src_frames], abs=1e-3)
        worst = min(psnr(a, b) for (_, a), (_, b) in zip(frames, src_frames))
        assert worst > 30, f"transcoded picture too far from the source: {worst:.1f} dB"
    else:
        assert video_packets(out) == video_packets(src)
    # The containers that cannot hold these codecs must have been transcoded, the rest copied.
    expect_transcode = info.codec in {"cinepak", "msvideo1"} or (suffix == ".mp4" and info.codec == "vp8")
    assert transcoded == expect_transcode


def test_variable_frame_rate_gives_music_as_long_as_the_video(release, tmp_path):
    # 14 frames shown for irregular times: 0.05 s … 0.4 s each, 2.35 s in all
    shown = [0.05, 0.05, 0.4, 0.1, 0.3, 0.05, 0.25, 0.1, 0.1, 0.4, 0.2, 0.15, 0.1, 0.1]
    stamps = np.concatenate([[0], np.cumsum(shown)[:-1]])
    src = make_clip(tmp_path / "vfr.mkv", "libx264", fps=10, pts=[round(t * 1000) for t in stamps],
                    time_base=Fraction(1, 1000))
    info = probe_video(src)
    assert info.variable_rate and info.duration == pytest.approx(sum(shown), abs=0.011)
    out = tmp_path / "vfr_music.wav"
    assert cli.main(["generate", str(src), "-o", str(out), "--model", str(tiny_release(tmp_path / "r")),
                     "--steps", "1", "--device", "cpu", "-q"]) == 0
    import soundfile as sf

    assert sf.info(str(out)).frames == round(info.duration * 24000)


def test_an_input_named_like_a_temporary_file_is_never_touched(release, clips, tmp_path, monkeypatch):
    """The old muxer wrote `.x.tmp.mp4` beside `x.mp4` and deleted it: here that is the input."""
    monkeypatch.chdir(tmp_path)
    src = tmp_path / ".x.tmp.mp4"
    src.write_bytes(clips["h264.mp4"].read_bytes())
    before = src.read_bytes()
    assert cli.main(["generate", str(src), "-o", "x.mp4", "--model", str(release), "--steps", "1",
                     "--device", "cpu", "-q"]) == 0
    assert src.read_bytes() == before and (tmp_path / "x.mp4").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".x.tmp.mp4", "x.mp4"]  # no temporary left


def test_music_is_saved_beside_when_the_video_cannot_be_written(release, clips, tmp_path, monkeypatch, capsys):
    import muvi.mux

    def broken(*args, **kwargs):
        raise muvi.mux.MuxError("out.mp4: could not write the video (disk full)")

    monkeypatch.setattr(muvi.mux, "mux_audio", broken)
    (tmp_path / "out.wav").write_bytes(b"somebody's file")
    out = tmp_path / "out.mp4"
    code = cli.main(["generate", str(clips["h264.mp4"]), "-o", str(out), "--model", str(release),
                     "--steps", "1", "--device", "cpu", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "disk full" in err
    saved = tmp_path / "out-1.wav"  # out.wav exists and is left alone
    assert f"the music is saved in {saved}" in err and saved.is_file()
    assert (tmp_path / "out.wav").read_bytes() == b"somebody's file" and not out.exists()
    import soundfile as sf

    assert sf.info(str(saved)).frames == round(probe_video(clips["h264.mp4"]).duration * 24000)


def test_failed_mux_leaves_no_temporary_file(clips, tmp_path):
    from muvi.errors import MuxError
    from muvi.mux import mux_audio

    # The AAC encoder refuses a 7 Hz stream once the output file exists, after the temporary
    # file was made; the picture is not transcoded for it.
    src = tmp_path / "clip.mp4"
    src.write_bytes(clips["h264.mp4"].read_bytes())
    with pytest.raises(MuxError, match="out.mp4: could not write the video"):
        mux_audio(src, np.zeros(24000, np.float32), 7, tmp_path / "out.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_rotation_is_kept_and_applied_to_the_frames(release, tmp_path):
    from muvi.video import read_frames

    plain = make_clip(tmp_path / "plain.mp4", "libx264", 12)
    turned = make_clip(tmp_path / "turned.mov", "mjpeg", 12, rotation=90)
    info = probe_video(turned)
    assert info.rotation == 90
    a, b = read_frames(plain, 10), read_frames(turned, 10)
    assert b.shape[-2:] == a.shape[-2:][::-1]  # the picture as displayed: turned a quarter
    # 90° counter-clockwise: the top-left quadrant (green in every frame) moves to the bottom-left
    assert b[0, 1, -10:, :10].float().mean() > 150 and b[0, 1, :10, :10].float().mean() < 50
    for suffix in (".mp4", ".mkv"):
        out = tmp_path / f"turned_music{suffix}"
        assert cli.main(["generate", str(turned), "-o", str(out), "--model", str(release), "--steps", "1",
                         "--device", "cpu", "-q"]) == 0
        assert probe_video(out).rotation == 90
