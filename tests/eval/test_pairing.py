"""muvi.eval.pairing: event files, pairing generated / reference / video files by name, and
reading audio for evaluation (checked against soundfile)."""
import json
import logging

import numpy as np
import pytest
import soundfile as sf

from muvi.errors import InputError
from muvi.eval.pairing import AUDIO_SUFFIXES, Pair, PairingError, check_audio_file, load_audio, load_events, pair_files


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def touch_audio(folder, *names, rate=8000):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        sf.write(folder / name, np.zeros(80, np.float32), rate)
    return folder


# ----------------------------------------------------------------------------- load_events

def test_load_events_from_a_list(tmp_path):
    times = load_events(write_json(tmp_path / "e.json", [2.5, 0.5, 0.0, 0.5, 1.25, 0.1234567, 0.1234571]))
    assert times.dtype == np.float64
    # sorted, duplicates (after rounding to the microsecond) removed, t = 0 dropped
    assert times.tolist() == [0.123457, 0.5, 1.25, 2.5]


def test_load_events_from_a_corpus_sidecar(tmp_path):
    record = {"video": "pair0.mp4",
              "cuts": [{"time": 1.5, "frame": 30, "on_beat": True}, {"time": 0.75}],
              "accents": [{"time": 2.0, "kind": "zoom"}, 1.5],
              "events": [3],
              "shots": [{"time": 9.0}]}  # not an event key: ignored
    assert load_events(write_json(tmp_path / "e.json", record)).tolist() == [0.75, 1.5, 2.0, 3.0]
    assert load_events(write_json(tmp_path / "none.json", {"video": "x.mp4"})).tolist() == []
    assert load_events(write_json(tmp_path / "empty.json", [])).tolist() == []
    assert load_events(str(write_json(tmp_path / "s.json", ["1.5"]))).tolist() == [1.5]  # a str path, text times


@pytest.mark.parametrize("data", [[{"t": 1.0}], ["soon"], [[1.0]], {"cuts": [{"time": None}]}, [None]])
def test_load_events_refuses_bad_entries(tmp_path, data):
    path = write_json(tmp_path / "bad.json", data)
    with pytest.raises(ValueError) as err:
        load_events(path)
    assert str(err.value) == f"{path}: events must be times or {{'time': t}} objects"


def test_load_events_names_a_broken_json_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError) as err:
        load_events(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("data", [3, "cuts", {"cuts": 5}])
def test_load_events_refuses_other_json_shapes(tmp_path, data):
    path = write_json(tmp_path / "odd.json", data)
    with pytest.raises(ValueError) as err:
        load_events(path)
    assert str(path) in str(err.value)


# ----------------------------------------------------------------------------- pair_files

def test_pair_files_by_stem(tmp_path, caplog):
    gen = touch_audio(tmp_path / "gen", "b.wav", "a.FLAC", "c.ogg")
    (gen / "notes.txt").write_text("not audio")
    (gen / "sub.wav").mkdir()  # a folder, not a file
    ref = touch_audio(tmp_path / "ref", "a.wav", "b.flac", "c.wav")
    pairs = pair_files(gen, ref)
    assert pairs == [Pair("a", gen / "a.FLAC", ref / "a.wav"), Pair("b", gen / "b.wav", ref / "b.flac"),
                     Pair("c", gen / "c.ogg", ref / "c.wav")]
    assert all(p.video is None for p in pairs)

    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a.mp4", "b.MKV", "c.webm", "extra.mov"):
        (videos / name).write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="muvi.eval.pairing"):
        pairs = pair_files(str(gen), str(ref), str(videos))
    assert [p.video for p in pairs] == [videos / "a.mp4", videos / "b.MKV", videos / "c.webm"]
    assert any("ignoring 1 video(s) without audio: 'extra'" in r.getMessage() for r in caplog.records)
    assert set(AUDIO_SUFFIXES) == {".wav", ".flac", ".ogg", ".mp3"}


def test_pair_files_directory_errors(tmp_path):
    ref = touch_audio(tmp_path / "ref", "a.wav")
    with pytest.raises(PairingError) as err:
        pair_files(tmp_path / "nowhere", ref)
    assert str(err.value) == f"generated directory not found: {tmp_path / 'nowhere'}"
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "readme.txt").write_text("x")
    with pytest.raises(PairingError) as err:
        pair_files(tmp_path / "gen", ref)
    assert str(err.value) == f"no generated files (.wav .flac .ogg .mp3) in {tmp_path / 'gen'}"
    gen = touch_audio(tmp_path / "gen", "a.wav")
    with pytest.raises(PairingError) as err:
        pair_files(gen, tmp_path / "ref_missing")
    assert str(err.value) == f"reference directory not found: {tmp_path / 'ref_missing'}"
    with pytest.raises(PairingError) as err:
        pair_files(gen, ref, tmp_path / "no_videos")
    assert str(err.value) == f"video directory not found: {tmp_path / 'no_videos'}"
    assert isinstance(err.value, InputError) and isinstance(err.value, ValueError)


def test_pair_files_refuses_a_stem_used_twice(tmp_path):
    gen = touch_audio(tmp_path / "gen", "a.wav", "a.flac", "b.wav", "b.ogg", "c.wav")
    ref = touch_audio(tmp_path / "ref", "a.wav", "b.wav", "c.wav")
    with pytest.raises(PairingError) as err:
        pair_files(gen, ref)
    assert str(err.value) == f"generated files in {gen} share a name with different extensions: 'a', 'b'"


def test_pair_files_lists_every_unmatched_name(tmp_path):
    gen = touch_audio(tmp_path / "gen", "a.wav", "only_gen.wav", "x.wav")
    ref = touch_audio(tmp_path / "ref", "a.wav", "only_ref.wav", "x.wav")
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"")
    with pytest.raises(PairingError) as err:
        pair_files(gen, ref, videos)
    assert str(err.value).splitlines() == [
        "cannot pair files by name:",
        f"  1 generated file(s) have no reference in {ref}: 'only_gen'",
        f"  1 reference file(s) have no generated file in {gen}: 'only_ref'",
        f"  1 pair(s) have no video in {videos}: 'x'",
    ]


def test_pair_files_shortens_long_lists(tmp_path):
    gen = touch_audio(tmp_path / "gen", *[f"g{i:02d}.wav" for i in range(25)])
    ref = touch_audio(tmp_path / "ref", "r.wav")
    with pytest.raises(PairingError) as err:
        pair_files(gen, ref)
    line = str(err.value).splitlines()[1]
    assert line.startswith(f"  25 generated file(s) have no reference in {ref}: 'g00', 'g01'")
    assert line.endswith("'g19', ... and 5 more") and "'g20'" not in line


# ----------------------------------------------------------------------------- audio files

def test_check_audio_file(tmp_path):
    sf.write(tmp_path / "ok.flac", np.zeros(100, np.float32), 16000)
    assert check_audio_file(tmp_path / "ok.flac") is None
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    (tmp_path / "text.wav").write_text("not audio at all")
    for path, text in [(tmp_path / "empty.wav", f"{tmp_path / 'empty.wav'}: the audio file holds no samples"),
                       (tmp_path / "text.wav", f"{tmp_path / 'text.wav'}: not readable audio ("),
                       (tmp_path / "missing.wav", f"{tmp_path / 'missing.wav'}: not readable audio (")]:
        with pytest.raises(InputError) as err:
            check_audio_file(path)
        message = str(err.value)
        assert "\n" not in message and message.startswith(text)
        assert message.count(str(path)) == 1  # the reason does not repeat the path


def test_load_audio_matches_soundfile(tmp_path):
    t = np.arange(4410) / 44100
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 220 * t), 0.25 * np.cos(2 * np.pi * 330 * t)], 1).astype(np.float32)
    sf.write(tmp_path / "st.wav", stereo, 44100, subtype="FLOAT")
    wave, rate = load_audio(tmp_path / "st.wav")
    assert rate == 44100 and type(rate) is int and wave.dtype == np.float32 and wave.shape == (4410,)
    assert wave.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(wave, stereo.mean(axis=1), rtol=0, atol=1e-7)
    sf.write(tmp_path / "mono.flac", stereo[:, 0], 22050)
    wave, rate = load_audio(str(tmp_path / "mono.flac"))
    reference, _ = sf.read(tmp_path / "mono.flac", dtype="float32")
    assert rate == 22050 and np.array_equal(wave, reference)


def test_load_audio_refuses(tmp_path):
    sf.write(tmp_path / "nan.wav", np.array([0.0, np.nan, 0.1], np.float32), 8000, subtype="FLOAT")
    (tmp_path / "text.wav").write_text("not audio at all")
    for path, text in [(tmp_path / "nan.wav", f"{tmp_path / 'nan.wav'}: the audio holds NaN or infinite samples"),
                       (tmp_path / "text.wav", f"{tmp_path / 'text.wav'}: not readable audio (")]:
        with pytest.raises(InputError) as err:
            load_audio(path)
        assert "\n" not in str(err.value) and str(err.value).startswith(text)
