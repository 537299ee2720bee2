"""Real recorded music from a Debian game-music package (``asc-music``: three GPL-2+ tracks,
10 MB), unpacked, listed with its licence, split by track, and cut into clips whose beats come
from the tracker. ``.ci/run`` downloads the package into ``tests/fixtures/debian/``
(``apt-get download asc-music``); without it these tests skip."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from muvi.data import recordings as R
from muvi.errors import MissingFileError

DEBS = Path(__file__).resolve().parents[1] / "fixtures" / "debian"


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory) -> Path:
    if not list(DEBS.glob("asc-music_*.deb")):
        pytest.skip("no asc-music .deb in tests/fixtures/debian (apt-get download asc-music)")
    root = tmp_path_factory.mktemp("debian")
    assert R.unpack_debian_music(DEBS, root) == ["asc-music"]
    return root


def test_tracks_are_listed_with_their_licence_and_a_fixed_split(unpacked):
    tracks = R.find_recordings(unpacked)
    assert [t.name for t in tracks] == [f"usr/share/games/asc/music/{n}.mp3"
                                       for n in ("frontiers", "machine_wars", "time_to_strike")]
    assert {t.package for t in tracks} == {"asc-music"}
    # the DEP-5 copyright file: "Files: *  Copyright: 2002 Michael Kievernagel  License: GPL-2+"
    assert all(t.licence.startswith("GPL-2+ (usr/share/doc/asc-music/copyright)") for t in tracks)
    assert [t.split for t in tracks] == [R.recording_split(f"asc-music/{t.name}") for t in tracks]
    assert {t.split for t in tracks} <= {"music", "pairs", "heldout"}
    with pytest.raises(MissingFileError, match="none of the music packages"):
        R.find_recordings(unpacked, packages=["nexuiz-music"])


def test_a_clip_is_real_music_with_tracked_beats(unpacked):
    track = R.find_recordings(unpacked)[0]
    clip = R.recording_clip(track, 8.0, 24000, np.random.default_rng(0))
    assert clip.waveform.dtype == np.float32 and clip.waveform.shape == (8 * 24000,)
    assert np.abs(clip.waveform).max() == pytest.approx(0.9, rel=1e-5)
    assert 60 <= clip.info["bpm"] <= 240 and len(clip.beats) >= 8
    assert np.all(np.diff(clip.beats) > 0) and 0 <= clip.beats[0] and clip.beats[-1] < 8.0
    assert clip.info["piece"] == f"debian:asc-music/{track.name}" and clip.info["licence"] == track.licence
    again = R.recording_clip(track, 8.0, 24000, np.random.default_rng(0))
    np.testing.assert_array_equal(again.waveform, clip.waveform)  # same seed, same clip


def test_eval_sound_compares_against_the_tracks_of_one_split(unpacked):
    """``eval_sound --split``: held-out to report, pairs to choose settings; the real halves hold
    only that split's tracks, one track per half here (asc's two pairs tracks)."""
    from conftest import load_recipe

    sound = load_recipe("eval_sound")
    half_a, half_b = sound.real_clips(unpacked, 1, 4.0, split="pairs")
    names = [name.split("@")[0] for name, _ in half_a + half_b]
    assert names == ["asc-music/frontiers.mp3", "asc-music/time_to_strike.mp3"]
    assert all(wave.shape == (4 * sound.SAMPLE_RATE,) for _, wave in half_a + half_b)
    with pytest.raises(SystemExit, match="fewer than two heldout tracks"):
        sound.real_clips(unpacked, 1, 4.0, split="heldout")  # asc has no held-out track


def test_dep5_stanzas_give_per_file_licences(tmp_path):
    doc = tmp_path / "usr/share/doc/ufoai-music"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
        "Files: *\nCopyright: 2002-2014, The UFO:AI Team\nLicense: GPL-2+\n\n"
        "Files:\n base/music/David01.ogg\n base/music/van_theme.ogg\nCopyright:\n Manuel Marino\n"
        "License: CC-BY-3.0\n")
    package = next(p for p in R.DEBIAN_MUSIC if p.name == "ufoai-music")
    assert R.licence_of(tmp_path, package, "pk3/ufoai-music/music/van_theme.ogg").startswith("CC-BY-3.0")
    assert R.licence_of(tmp_path, package, "pk3/ufoai-music/music/Other.ogg").startswith("GPL-2+")


def test_missing_folder_and_debs_are_one_clear_error(tmp_path):
    with pytest.raises(MissingFileError, match="no such folder"):
        R.find_recordings(tmp_path / "nope")
    with pytest.raises(MissingFileError, match="no .deb files"):
        R.unpack_debian_music(tmp_path, tmp_path / "out")


@pytest.mark.slow  # ~45 s: a tiny corpus build
def test_corpus_draws_clips_and_beat_edited_pairs_from_recordings(unpacked, tmp_path):
    """``build_corpus.py --recordings``: the music clips and training pairs come from the tracks
    of their split (asc's three land in music and pairs), each pair cut on the tracked beats;
    held-out pairs fall back to MIDI renders (no held-out track here); SOURCES.md lists the
    tracks with their licence."""
    import json

    pytest.importorskip("music21")
    pytest.importorskip("skvideo")
    from conftest import load_recipe

    out = tmp_path / "corpus"
    load_recipe("build_corpus").main(["--out", str(out), "--preset", "tiny", "--seed", "0", "--no-progress",
                                      "--recordings", str(unpacked), "--set", "recording_share=1.0"])
    music = [json.loads(p.read_text()) for p in sorted((out / "music").glob("*.json"))]
    pairs = [json.loads(p.read_text()) for p in sorted((out / "pairs").glob("*.json"))]
    heldout = [json.loads(p.read_text()) for p in sorted((out / "heldout").glob("*.json"))]
    splits = {t.name: t.split for t in R.find_recordings(unpacked)}
    for records, split in ((music, "music"), (pairs, "pairs")):
        assert records and all(r["music"]["piece"].startswith("debian:asc-music/") for r in records)
        assert all(splits[r["music"]["piece"].removeprefix("debian:asc-music/")] == split for r in records)
    assert all(r["music"]["piece"].startswith("music21/") for r in heldout)
    for pair in pairs:  # the cuts sit on tracked beats (or are the planned off-beat ones)
        beats = np.asarray(pair["beats"])
        on = [c for c in pair["cuts"] if c["on_beat"]]
        assert on and all(np.min(np.abs(beats - c["time"])) <= 0.5 / pair["fps"] + 1e-6 for c in on)
    sources = (out / "SOURCES.md").read_text()
    assert "## Recorded music" in sources and "usr/share/games/asc/music/" in sources and "GPL-2+" in sources


def test_readable_recordings_are_one_split_and_skip_what_cannot_be_read(unpacked):
    tracks = R.find_recordings(unpacked)
    for split in ("music", "pairs", "heldout"):
        assert R.readable_recordings(unpacked, split) == [t for t in tracks if t.split == split]
    (unpacked / "usr/share/games/asc/music/broken.mp3").write_bytes(b"not audio")
    broken = [t for t in R.find_recordings(unpacked) if t.name.endswith("broken.mp3")][0]
    assert broken not in R.readable_recordings(unpacked, broken.split)
