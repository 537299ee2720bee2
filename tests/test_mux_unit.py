"""muvi.mux.mux_audio called directly (tests/test_mux.py covers it through `muvi generate`).

Clips are made with PyAV (conftest.make_clip); the outputs are read back with PyAV: packets,
decoded frames and decoded audio, compared with the source and with the waveform passed in."""
import logging

import av
import numpy as np
import pytest

from muvi import mux
from muvi.errors import InputError, MuxError
from muvi.media import probe_video
from muvi.mux import mux_audio

from conftest import make_clip, video_packets

RATE = 24000


def tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(int(seconds * RATE)) / RATE)).astype(np.float32)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("mux_unit")
    return {"h264": make_clip(root / "h264.mp4", "libx264", 12, 1.5),        # B-frames: reordered packets
            "cinepak": make_clip(root / "cinepak.avi", "cinepak", 12, 1.5),  # mp4 cannot hold cinepak
            "offset": make_clip(root / "offset.mp4", "libx264", 12, 1.5, start=1.0, rotation=90)}


def frames_of(path):
    """(pts in seconds, RGB array) of every decoded video frame."""
    with av.open(str(path)) as c:
        return [(float(f.time), f.to_ndarray(format="rgb24")) for f in c.decode(c.streams.video[0])]


def audio_of(path):
    """(mono samples, sample rate, codec name, start time in s) of the audio stream."""
    with av.open(str(path)) as c:
        assert len(c.streams.audio) == 1, "the music must be the only audio stream"
        stream = c.streams.audio[0]
        frames = list(c.decode(stream))
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
        return samples, stream.codec_context.sample_rate, stream.codec_context.name, float(frames[0].time)


def dominant_frequency(samples, rate):
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)]


def check_music(path, seconds):
    samples, rate, codec, _ = audio_of(path)
    assert codec == "aac" and rate == RATE
    # AAC adds at most two 1024-sample frames of priming / padding
    assert seconds * RATE <= len(samples) <= seconds * RATE + 2048
    assert dominant_frequency(samples, rate) == pytest.approx(440.0, abs=2.0)
    rms = np.sqrt(np.mean(samples[2048:-2048] ** 2))
    assert rms == pytest.approx(0.3 / np.sqrt(2), rel=0.05)


def test_copy_keeps_every_packet(clips, tmp_path, caplog):
    out = tmp_path / "out.mp4"
    with caplog.at_level(logging.INFO, logger="muvi.mux"):
        assert mux_audio(clips["h264"], tone(1.5), RATE, out) == out
    assert not [r for r in caplog.records if r.name == "muvi.mux"]  # no transcoding, nothing to say
    assert video_packets(out) == video_packets(clips["h264"])
    info, src = probe_video(out), probe_video(clips["h264"])
    assert (info.codec, info.num_frames, info.duration) == ("h264", 18, src.duration)
    check_music(out, 1.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no temporary file left


def test_copy_into_mkv(clips, tmp_path):
    out = mux_audio(clips["h264"], tone(1.5), RATE, tmp_path / "out.MKV")
    assert video_packets(out) == video_packets(clips["h264"])
    with av.open(str(out)) as c:
        assert c.format.name.startswith("matroska")
    check_music(out, 1.5)


def test_transcode_when_the_container_cannot_hold_the_codec(clips, tmp_path, caplog):
    out = tmp_path / "out.mp4"
    with caplog.at_level(logging.WARNING, logger="muvi.mux"):
        mux_audio(clips["cinepak"], tone(1.5), RATE, out)
    warning = [r.getMessage() for r in caplog.records if r.name == "muvi.mux"]
    assert len(warning) == 1 and "cannot hold cinepak video; transcoding it to H.264 (CRF 18)" in warning[0]
    assert probe_video(out).codec == "h264"
    src, got = frames_of(clips["cinepak"]), frames_of(out)
    assert [t for t, _ in got] == pytest.approx([t for t, _ in src])  # every frame at its time
    for (_, a), (_, b) in zip(src, got):
        mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
        assert 10 * np.log10(255 ** 2 / max(mse, 1e-12)) > 30  # CRF 18: close to the source
    check_music(out, 1.5)


def test_duration_cuts_the_picture(clips, tmp_path):
    out = mux_audio(clips["h264"], tone(1.0), RATE, tmp_path / "cut.mp4", duration=1.0)
    with av.open(str(clips["h264"])) as c:
        stream = c.streams.video[0]
        end = round(1.0 / stream.time_base)
        kept = [bytes(p) for p in c.demux(stream) if p.size and p.pts < end]
    assert video_packets(out) == kept
    info = probe_video(out)
    assert info.num_frames == 12 and info.duration == pytest.approx(1.0)
    src, got = frames_of(clips["h264"]), frames_of(out)
    assert [t for t, _ in got] == pytest.approx([t for t, _ in src[:12]])
    check_music(out, 1.0)


def test_duration_cut_before_a_reordered_frame_decodes_like_the_source(clips, tmp_path, caplog):
    # In decode order libx264 sends a P-frame before the B-frames shown ahead of it (here
    # ... P(10) B(9) ...). Cutting at that P-frame in a copy would keep B(9) and drop the
    # picture it refers to: such a cut is transcoded, and says so.
    with av.open(str(clips["h264"])) as c:
        stream = c.streams.video[0]
        base, pts = stream.time_base, [p.pts for p in c.demux(stream) if p.size]
    pairs = [(a, b) for a, b in zip(pts, pts[1:]) if a > b > 0]
    if not pairs:
        pytest.skip("the encoder reordered no frame in this clip")
    cut = pairs[-1][0]
    seconds = float((cut - pts[0]) * base)
    out = tmp_path / "cut.mp4"
    with caplog.at_level(logging.INFO, logger="muvi.mux"):
        mux_audio(clips["h264"], tone(seconds), RATE, out, duration=seconds)
    logged = [r.getMessage() for r in caplog.records if r.name == "muvi.mux"]
    assert len(logged) == 1 and f"the cut at {seconds:g} s falls among h264 frames decoded out of order" in logged[0]
    assert "transcoding it to H.264 (CRF 18)" in logged[0]
    src, got = frames_of(clips["h264"]), frames_of(out)
    kept = sum(p < cut for p in pts)
    assert [t for t, _ in got] == pytest.approx([t for t, _ in src[:kept]])  # exactly the frames before the cut
    for i, ((_, a), (_, b)) in enumerate(zip(src, got)):
        mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
        assert 10 * np.log10(255 ** 2 / max(mse, 1e-12)) > 30, f"frame {i} is far from the source's"
    assert probe_video(out).duration == pytest.approx(seconds)
    check_music(out, seconds)


def test_duration_cut_of_a_reordered_stream_into_mkv_is_copied_when_clean(clips, tmp_path):
    # 1.0 s is after P(11): the packets shown before it are the first ones decoded
    out = mux_audio(clips["h264"], tone(1.0), RATE, tmp_path / "cut.mkv", duration=1.0)
    assert video_packets(out) == video_packets(clips["h264"])[:12]
    src, got = frames_of(clips["h264"]), frames_of(out)
    assert len(got) == 12 and all(np.array_equal(a, b) for (_, a), (_, b) in zip(src, got))
    check_music(out, 1.0)


def test_duration_cut_when_transcoding(clips, tmp_path):
    out = mux_audio(clips["cinepak"], tone(0.5), RATE, tmp_path / "cut.mp4", duration=0.5)
    info = probe_video(out)
    assert info.codec == "h264" and info.num_frames == 6 and info.duration == pytest.approx(0.5)
    check_music(out, 0.5)


def test_start_offset_and_rotation_are_kept(clips, tmp_path):
    src = probe_video(clips["offset"])
    assert src.start_time == pytest.approx(1.0) and src.rotation == 90
    out = mux_audio(clips["offset"], tone(1.5), RATE, tmp_path / "out.mp4")
    info = probe_video(out)
    assert info.rotation == 90 and info.duration == pytest.approx(src.duration)
    assert video_packets(out) == video_packets(clips["offset"])
    first_video = frames_of(out)[0][0]
    _, _, _, first_audio = audio_of(out)
    assert first_video == pytest.approx(1.0)
    # the music starts with the first frame (less AAC's 1024 samples of priming, in a ms clock)
    assert abs(first_audio - first_video) <= 1024 / RATE + 0.002


def test_bad_requests_are_refused_before_writing(clips, tmp_path):
    cases = [(tmp_path / "out.avi", tone(1.0), f"{tmp_path / 'out.avi'}: cannot write a video with suffix "
                                               f"'.avi'; use one of .m4v, .mkv, .mov, .mp4"),
             (clips["h264"], tone(1.0), f"{clips['h264']}: refusing to overwrite the input video"),
             (tmp_path / "nan.mp4", np.full(100, np.nan, np.float32),
              f"{tmp_path / 'nan.mp4'}: the audio to write holds NaN or infinite samples")]
    before = clips["h264"].read_bytes()
    for out, wave, text in cases:
        with pytest.raises(InputError) as err:
            mux_audio(clips["h264"], wave, RATE, out)
        assert str(err.value) == text
    assert clips["h264"].read_bytes() == before
    assert list(tmp_path.iterdir()) == []


def test_a_failing_write_raises_mux_error_and_leaves_no_temporary_file(clips, tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"an older result")
    with pytest.raises(MuxError) as err:
        mux_audio(clips["h264"], tone(0.1), 1, out)  # no AAC encoder runs at 1 Hz
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{out}: could not write the video (")
    assert isinstance(err.value, RuntimeError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
    assert out.read_bytes() == b"an older result"  # untouched: written atomically or not at all


def test_an_error_mid_write_leaves_no_temporary_file(clips, tmp_path, monkeypatch):
    def half_written(info, samples, sample_rate, tmp, **kwargs):
        tmp.write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(mux, "_mux", half_written)
    with pytest.raises(MuxError) as err:
        mux_audio(clips["h264"], tone(0.5), RATE, tmp_path / "out.mp4")
    assert str(err.value) == f"{tmp_path / 'out.mp4'}: could not write the video (disk full)"
    assert list(tmp_path.iterdir()) == []


def test_an_audio_failure_is_not_reported_as_a_video_codec_problem(clips, tmp_path, caplog):
    out = tmp_path / "out.mp4"
    with caplog.at_level(logging.INFO, logger="muvi.mux"), pytest.raises(MuxError) as err:
        mux_audio(clips["h264"], tone(0.1), 1, out)
    assert not [r for r in caplog.records if r.name == "muvi.mux"]  # no transcoding was tried
    assert str(err.value) == (f"{out}: could not write the video (the aac encoder refused mono audio "
                              "at 1 Hz, 192 kb/s (Invalid argument))")
    assert list(tmp_path.iterdir()) == []


def test_a_copy_the_muxer_refuses_is_transcoded(tmp_path, caplog):
    # Matroska lists rawvideo but FFmpeg's muxer refuses this AVI's planar YUV at the header
    src = make_clip(tmp_path / "raw.avi", "rawvideo", 12, 1.0)
    out = tmp_path / "out.mkv"
    with caplog.at_level(logging.INFO, logger="muvi.mux"):
        mux_audio(src, tone(1.0), RATE, out)
    logged = [r.getMessage() for r in caplog.records if r.name == "muvi.mux"]
    assert logged == [f"{src}: the mkv muxer refused to copy rawvideo video (Invalid argument); "
                      "transcoding it to H.264 (CRF 18)"]
    assert probe_video(out).codec == "h264" and len(frames_of(out)) == 12
    check_music(out, 1.0)
