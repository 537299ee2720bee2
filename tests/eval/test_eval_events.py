"""Beats scored against a video's own event times (`--events`): corpus-style JSON sidecars."""
import json

import numpy as np
import pytest
import soundfile as sf

from muvi.eval.beats import BeatTrackerConfig, beat_counts, track_beats
from muvi.eval.report import PairingError, evaluate, load_events

SR = 22050


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two chorales; the events are their exact MIDI beats (as cuts/accents on the beat would be).
    Generated music = the same piece delayed by half a beat (every beat misses the events)."""
    from muvi.data.midi import corpus_midi_files, render_midi

    root = tmp_path_factory.mktemp("events")
    gen, ref, ev = (root / d for d in ("gen", "ref", "events"))
    for d in (gen, ref, ev):
        d.mkdir()
    for i, index in enumerate((0, 5)):
        wave, beats = render_midi(corpus_midi_files("bach")[index], SR, duration=12.0)
        half = int(round(np.median(np.diff(beats)) / 2 * SR))
        sf.write(ref / f"c{i}.wav", wave, SR)
        sf.write(gen / f"c{i}.wav", np.concatenate([np.zeros(half, np.float32), wave[:-half]]), SR)
        beats = beats[(beats > 0) & (beats < 12.0)]
        cuts = [{"time": float(t)} for t in beats[::2]]
        accents = [{"time": float(t)} for t in beats[1::2]]
        (ev / f"c{i}.json").write_text(json.dumps({"cuts": cuts, "accents": accents}))
    return gen, ref, ev


def test_event_metrics(folders):
    gen, ref, ev = folders
    report = evaluate(gen, ref, events_dir=ev, embedder=None, n_bootstrap=50, progress=False)
    m = report["metrics"]
    assert m["event_hit_ceiling"]["value"] > 80          # the real soundtrack's beats land on the events
    assert m["event_hit"]["value"] < 30                   # half a beat late misses them
    assert m["event_f1_ceiling"]["value"] > m["event_f1"]["value"]
    # The pooled figure is matched events / events over clips, as a direct computation gives.
    cfg = BeatTrackerConfig()
    hits = total = 0
    for i in range(2):
        wave, sr = sf.read(str(gen / f"c{i}.wav"), dtype="float32")
        counts = beat_counts(load_events(ev / f"c{i}.json"), track_beats(wave, sr, cfg), 0.1)
        total, hits = total + counts[0], hits + counts[2]
    assert m["event_hit"]["value"] == pytest.approx(100 * hits / total)


def test_events_formats_and_missing_files(folders, tmp_path):
    (tmp_path / "a.json").write_text("[0.0, 1.5, 0.5, 1.5]")
    assert load_events(tmp_path / "a.json").tolist() == [0.5, 1.5]
    (tmp_path / "b.json").write_text('{"events": [{"when": 1}]}')
    with pytest.raises(ValueError, match="b.json"):
        load_events(tmp_path / "b.json")
    gen, ref, _ = folders
    with pytest.raises(PairingError, match="c0.json"):
        evaluate(gen, ref, events_dir=tmp_path, embedder=None, n_bootstrap=10, progress=False)
