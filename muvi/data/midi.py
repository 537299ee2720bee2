"""Real music with an exact beat grid: MIDI rendered through a General-MIDI soundfont.

Why: beat metrics (BCS/BHS, beat F-measure) can only be trusted once the beat tracker has
been checked against music whose beats are known exactly. A MIDI file carries its own tempo
map, so ``pretty_midi.PrettyMIDI.get_beats()`` gives the true beat grid of the audio we
render from it, sample-exact.

Sources and licences
--------------------
- Pieces: the corpus shipped inside the ``music21`` package (``music21/corpus``; music21 itself
  is BSD-3-Clause). The corpus holds no ``.mid`` files in music21 10.x but hundreds of
  MusicXML (``.mxl``), Humdrum (``.krn``) and ABC encodings; :func:`load_midi` converts them to
  MIDI with music21 in memory. Per ``music21/corpus/license.txt`` the compositions are out of
  copyright in the US or licensed for use by their encoders, some with non-commercial
  restrictions noted per piece; the Bach chorales (``bach/bwv*.mxl``) used by muvi's tests are
  public-domain compositions.
- Soundfont: ``TimGM6mb.sf2`` (Tim Brechbill, 6 MB GM set, also shipped by MuseScore 1.x)
  bundled inside the ``pretty_midi`` wheel (pretty_midi is MIT-licensed; its package carries no
  separate licence text for the soundfont and the sf2 INFO chunk names no copyright; Linux
  distributions package it under GPL-2). muvi only reads it from the installed ``pretty_midi``;
  nothing is redistributed or downloaded.
- Synthesiser: ``tinysoundfont`` (MIT, C library with Python bindings, no system packages).
  Its wheel declares ``pyaudio`` as a dependency but only imports it for live playback, so
  install it with ``pip install --no-deps tinysoundfont`` where pyaudio cannot be built.

Rendering is offline and deterministic: events are applied at exact sample positions and the
synthesiser is run between them, so the output is identical on every call.
"""
from __future__ import annotations

import dataclasses
import io
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

#: Symbolic formats in the music21 corpus that convert to a single-score MIDI file.
CORPUS_FORMATS = (".mid", ".midi", ".mxl", ".musicxml", ".xml", ".krn")
_DRUM_CHANNEL = 9


def default_soundfont() -> Path:
    """Path of the TimGM6mb General-MIDI soundfont bundled with ``pretty_midi``."""
    import pretty_midi

    path = Path(pretty_midi.__file__).with_name("TimGM6mb.sf2")
    if not path.is_file():
        raise FileNotFoundError(f"pretty_midi ships no TimGM6mb.sf2 at {path}; pass soundfont=PATH")
    return path


def corpus_midi_files(subdir: str = "bach", formats: tuple[str, ...] = CORPUS_FORMATS) -> list[Path]:
    """Sorted list of music21 corpus files under ``subdir`` that :func:`load_midi` can read.

    ``subdir`` is a folder of ``music21/corpus`` ("bach", "beethoven", "joplin", ...) or "" for
    the whole corpus. ABC files are left out by default because one file holds many tunes.
    """
    import music21

    root = Path(music21.__file__).parent / "corpus" / subdir
    if not root.is_dir():
        raise FileNotFoundError(f"no music21 corpus folder {root}")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in formats)


@dataclasses.dataclass
class MidiPiece:
    """A MIDI performance and the time of its first beat.

    ``first_beat`` (seconds) is 0 for MIDI files. Scores converted by music21 that open with a
    pickup lasting a fraction of a beat (the Maple Leaf Rag's eighth-note pickup) would give a
    grid half a beat off the music if counted from time 0, so the grid starts at the first beat
    of the pickup's phase instead.
    """

    midi: "pretty_midi.PrettyMIDI"  # noqa: F821 - optional dependency
    first_beat: float = 0.0
    name: str = ""

    def beats(self) -> np.ndarray:
        """Beat times in seconds from ``PrettyMIDI.get_beats`` (tempo map and time signatures)."""
        return np.asarray(self.midi.get_beats(start_time=self.first_beat), dtype=np.float64)


def _beat_quarters(numerator: int, denominator: int) -> float:
    """Beat length in quarter notes as pretty_midi counts it (compound meters: dotted beats)."""
    per = 4.0 / denominator
    return 3 * per if numerator % 3 == 0 and numerator > 3 else per


def _pickup_phase(score) -> float:
    """Offset (quarter notes) of the first beat when the score opens with a partial pickup bar."""
    import music21

    part = score.parts[0] if score.parts else score
    first = part.getElementsByClass(music21.stream.Measure).first()
    if first is None or not first.paddingLeft:
        return 0.0
    sig = first.timeSignature or score.recurse().getElementsByClass(music21.meter.TimeSignature).first()
    if sig is None:
        return 0.0
    beat = _beat_quarters(sig.numerator, sig.denominator)
    phase = float(first.duration.quarterLength) % beat
    return 0.0 if min(phase, beat - phase) < 1e-6 else phase


def load_midi(source) -> MidiPiece:
    """A :class:`MidiPiece` from a MidiPiece, a PrettyMIDI, a ``.mid`` file or a music21 score."""
    import pretty_midi

    if isinstance(source, MidiPiece):
        return source
    if isinstance(source, pretty_midi.PrettyMIDI):
        return MidiPiece(source)
    path = Path(source)
    if path.suffix.lower() in (".mid", ".midi"):
        return MidiPiece(pretty_midi.PrettyMIDI(str(path)), 0.0, path.name)
    import music21

    score = music21.converter.parse(str(path))
    pm = pretty_midi.PrettyMIDI(io.BytesIO(music21.midi.translate.streamToMidiFile(score).writestr()))
    # music21 writes offset 0 at tick 0 with ``resolution`` ticks per quarter note.
    first_beat = float(pm.tick_to_time(int(round(_pickup_phase(score) * pm.resolution))))
    return MidiPiece(pm, first_beat, path.name)


def _events(pm, program: int | None, scale: float, sample_rate: int) -> tuple[list[tuple], list[tuple]]:
    """Channel set-up and time-sorted synthesiser events at sample positions.

    Sort key (sample, order): at one instant note-offs come first, then controllers and pitch
    bends, then note-ons, so a repeated note re-attacks instead of being cut.
    """
    def at(t: float) -> int:
        return int(round(t / scale * sample_rate))

    setups, events = [], []
    melodic = [c for c in range(16) if c != _DRUM_CHANNEL]
    for index, inst in enumerate(pm.instruments):
        chan = _DRUM_CHANNEL if inst.is_drum else melodic[index % len(melodic)]
        preset = int(inst.program) if (inst.is_drum or program is None) else int(program)
        setups.append((chan, preset, bool(inst.is_drum)))
        for note in inst.notes:
            events.append((at(note.start), 2, "on", chan, int(note.pitch), int(note.velocity)))
            events.append((at(note.end), 0, "off", chan, int(note.pitch), 0))
        for cc in inst.control_changes:
            events.append((at(cc.time), 1, "cc", chan, int(cc.number), int(cc.value)))
        for bend in inst.pitch_bends:
            events.append((at(bend.time), 1, "bend", chan, int(bend.pitch) + 8192, 0))
    events.sort(key=lambda e: (e[0], e[1], e[3], e[4]))
    return setups, events


def render_midi(
    midi,
    sample_rate: int = 24000,
    soundfont: str | Path | None = None,
    tempo_scale: float = 1.0,
    program: int | None = None,
    *,
    duration: float | None = None,
    tail: float = 1.0,
    peak: float | None = 0.9,
) -> tuple[np.ndarray, np.ndarray]:
    """Render MIDI to mono audio and return it with its exact beat times.

    Args:
        midi: a :class:`MidiPiece`, a ``PrettyMIDI``, a ``.mid`` path, or a music21-readable
            score path (``.mxl``...); load it once with :func:`load_midi` to render it often.
        sample_rate: output rate in Hz.
        soundfont: an ``.sf2`` file; default the TimGM6mb set shipped with ``pretty_midi``.
        tempo_scale: play faster (> 1) or slower (< 1); every event and beat time is divided by it.
        program: General-MIDI program (0-127) forced on every non-drum part, e.g. 0 for piano.
        duration: keep only the first ``duration`` seconds (after tempo scaling); rendering cost
            grows with length, so short clips render in a fraction of a second.
        tail: seconds of release kept after the last note when ``duration`` is None.
        peak: peak-normalise to this absolute level (None keeps the synthesiser's level).

    Returns:
        ``(waveform, beat_times)``: float32 ``(num_samples,)`` and float64 beat times in
        seconds from ``pretty_midi``'s ``get_beats()`` (:meth:`MidiPiece.beats`), scaled
        by ``1 / tempo_scale`` and restricted to the rendered span.
    """
    import tinysoundfont

    if tempo_scale <= 0:
        raise ValueError(f"tempo_scale must be positive, got {tempo_scale}")
    piece = load_midi(midi)
    pm = piece.midi
    end = pm.get_end_time() / tempo_scale
    total = int(round((duration if duration is not None else end + tail) * sample_rate))
    setups, events = _events(pm, program, tempo_scale, sample_rate)

    synth = tinysoundfont.Synth(samplerate=sample_rate)
    sfid = synth.sfload(str(soundfont if soundfont is not None else default_soundfont()))
    for chan, preset, is_drum in setups:
        synth.program_select(chan, sfid, 0, preset, is_drums=is_drum)  # TSF maps drums to bank 128

    stereo = np.zeros((total, 2), dtype=np.float32)
    position = 0
    for sample, _, kind, chan, a, b in events:
        if sample >= total:
            break
        if sample > position:
            synth.generate_simple(sample - position, buffer=memoryview(stereo[position:sample]).cast("B"))
            position = sample
        if kind == "on":
            synth.noteon(chan, a, b)
        elif kind == "off":
            synth.noteoff(chan, a)
        elif kind == "cc":
            synth.control_change(chan, a, b)
        else:
            synth.pitchbend(chan, a)
    if total > position:
        synth.generate_simple(total - position, buffer=memoryview(stereo[position:total]).cast("B"))

    waveform = stereo.mean(axis=1)
    top = float(np.abs(waveform).max()) if total else 0.0
    if peak is not None and top > 0:
        waveform *= peak / top
    beats = piece.beats() / tempo_scale
    beats = beats[beats < total / sample_rate]
    return waveform.astype(np.float32, copy=False), beats
