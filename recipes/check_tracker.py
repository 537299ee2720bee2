"""How well the beat trackers find the beats, against beats nobody here placed.

    python recipes/check_tracker.py [--fof DIR] [--midi-clips 24] [--seconds 30]

Two sets with known beats:

* MIDI renders: music21 corpus pieces rendered as the corpus builder renders them
  (:func:`muvi.data.corpus.render_clip`: a drawn ensemble, drums half of the time) at tempos
  drawn across 60-220 BPM; the beats are the MIDI's exact grid.
* Real recordings with charted beats: the Frets on Fire song packs in Debian
  (``fretsonfire-songs-muldjord``, CC BY-SA 3.0, and ``fretsonfire-songs-sectoid``, MIT-style
  licence; ``apt-get download`` + ``dpkg -x``, pass the ``.../data/songs`` folder as ``--fof``).
  Each song's ``notes.mid`` is a chart played in time with its recording (``song.ogg`` with
  ``guitar.ogg`` mixed in): its tempo map gives the beats. Windows of ``--seconds`` are cut
  along each song.

Trackers: muvi's (:func:`muvi.data.beats.track_beats`, which the negatives, the corpus and the
metrics all use) and librosa's default ``beat_track``.
Printed: beat F-measure at 70 ms (mir_eval's window) per set and tempo band, and the same
allowing a tempo-octave error (the tracker at double or half the chart's tempo).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from muvi.eval.beats import f_measure, octave_f_measure

logger = logging.getLogger("check_tracker")
BANDS = ((0, 100), (100, 170), (170, 400))


def trackers() -> dict:
    import librosa

    from muvi.data import beats

    def librosa_default(wave, sr):
        y = librosa.resample(wave, orig_sr=sr, target_sr=22050) if sr != 22050 else wave
        return librosa.beat.beat_track(y=y, sr=22050, units="time")[1]

    return {"muvi": beats.track_beats, "librosa default": librosa_default}


def midi_clips(count: int, seconds: float, sample_rate: int, seed: int = 0):
    """(name, waveform, beats) of ``count`` corpus renders at tempos drawn in 60-220 BPM."""
    from muvi.data.corpus import render_clip
    from muvi.data.midi import corpus_midi_files, load_midi

    rng = np.random.default_rng(seed)
    files = corpus_midi_files("bach") + corpus_midi_files("mozart") + corpus_midi_files("joplin")
    files = [f for f in files if f.stat().st_size < 300_000]
    made = 0
    for index in rng.permutation(len(files)):
        if made == count:
            break
        try:
            piece = load_midi(files[index])
        except Exception as error:  # music21 cannot parse every corpus file
            logger.debug("skipped %s: %s", files[index], error)
            continue
        lo = 60.0 + 160.0 * made / count  # tempos spread evenly over the range
        clip = render_clip(piece, seconds, sample_rate, rng, bpm_range=(lo, lo + 160.0 / count))
        if clip is not None:
            made += 1
            yield f"{piece.name} @ {clip.info['bpm']:.0f}", clip.waveform, clip.beats


def fof_windows(root: Path, seconds: float, sample_rate: int):
    """(name, waveform, charted beats) windows of the Frets on Fire songs under ``root``."""
    import pretty_midi

    from muvi.data.audio_io import load_audio

    for chart in sorted(root.rglob("notes.mid")):
        song = chart.parent
        wave = load_audio(song / "song.ogg", sample_rate).numpy()
        if (song / "guitar.ogg").is_file():
            guitar = load_audio(song / "guitar.ogg", sample_rate).numpy()
            n = min(len(wave), len(guitar))
            wave = wave[:n] + guitar[:n]
        grid = pretty_midi.PrettyMIDI(str(chart)).get_beats()
        step = int(seconds * sample_rate)
        for start in range(step // 2, len(wave) - step, step):  # skip the intro's first half-window
            t0 = start / sample_rate
            beats = grid[(grid >= t0) & (grid < t0 + seconds)] - t0
            if len(beats) > 4:
                yield f"{song.name} @ {t0:.0f}s", wave[start:start + step], beats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fof", type=Path, default=None, help="Frets on Fire songs folder")
    parser.add_argument("--midi-clips", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--only", nargs="+", default=None, help="trackers to run (default all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sr = 22050
    chosen = {k: v for k, v in trackers().items() if args.only is None or k in args.only}
    sets = {"MIDI renders": midi_clips(args.midi_clips, min(args.seconds, 20.0), sr)}
    if args.fof is not None:
        sets["Frets on Fire (real)"] = fof_windows(args.fof, args.seconds, sr)
    for set_name, items in sets.items():
        rows = []
        for name, wave, grid in items:
            bpm = 60.0 / float(np.median(np.diff(grid)))
            scores = {}
            for tracker, track in chosen.items():
                beats = np.asarray(track(wave, sr))
                scores[tracker] = (f_measure(grid, beats), octave_f_measure(grid, beats))
            rows.append((bpm, scores))
            logger.info("%-40s %5.0f BPM  %s", name[:40], bpm,
                        "  ".join(f"{t}: {f:.2f} ({o:.2f})" for t, (f, o) in scores.items()))
        print(f"\n{set_name}: {len(rows)} windows; F at 70 ms (allowing an octave error)")
        for lo, hi in ((0, 400),) + BANDS:
            band = [s for bpm, s in rows if lo <= bpm < hi]
            if not band:
                continue
            label = "all" if (lo, hi) == (0, 400) else f"{lo}-{hi} BPM"
            print(f"  {label:<12} n={len(band):<3} " + "  ".join(
                f"{t}: {np.mean([s[t][0] for s in band]):.2f} ({np.mean([s[t][1] for s in band]):.2f})"
                for t in chosen))


if __name__ == "__main__":
    main()
