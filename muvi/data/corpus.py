"""Rhythm-synchronised video-music pairs, edited the way music videos are, from real material.

Why: MuVi learns that where the beats go follows the picture (cuts, motion). Real music videos
carry that link because editors cut on the beat; this module builds pairs that carry it too, and
records the ground truth exactly: the beat grid comes from the MIDI the music was rendered from,
and the cut and accent times are the ones the editor below placed.

The pieces, each a pure function of its arguments and a seeded ``numpy`` generator:

* music: :func:`render_clip` renders a window of a MIDI piece (``muvi.data.midi``) at a drawn
  tempo, with a drawn General-MIDI ensemble and, optionally, a drum groove laid on the piece's
  own beat grid (the music21 corpus has no percussion parts);
* the edit: :func:`schedule_cuts` puts cuts every 1, 2 or 4 beats (irregularly, as editors do)
  with a fraction ``offbeat_prob`` displaced off the beat by a quarter to half a beat;
  :func:`schedule_accents` adds brief zoom punches and white flashes on some other beats;
* the picture (``muvi.data.footage``): source videos cut into shots at their own cuts, one shot
  per segment between the edit's cuts with a slow pan/zoom, stills through a Ken Burns pan/zoom,
  drawn frame by frame with the accents;
* files: :func:`write_pair` encodes H.264 with PyAV and muxes the music in as AAC
  (:func:`muvi.mux.mux_audio`), so ``VideoMusicDataset`` can read a pair from one file.

``recipes/build_corpus.py`` assembles these into a corpus from package-shipped material and
documents how to train on your own videos instead (a folder of music videos, or a CSV of
``video,audio`` rows, given to the same recipes).

Shapes: F frames, H×W pixels, N audio samples.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from muvi.config import Config
from muvi.data.midi import MidiPiece, render_midi

logger = logging.getLogger(__name__)

#: (name, GM programs from the top part down; the lowest part takes the last one).
ENSEMBLES: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("piano", (0,)), ("bright_piano", (1,)), ("electric_piano", (4,)), ("harpsichord", (6,)),
    ("vibraphone", (11,)), ("marimba", (12,)), ("drawbar_organ", (16,)), ("church_organ", (19,)),
    ("nylon_guitar", (24,)), ("steel_guitar", (25,)), ("clean_guitar", (27,)),
    ("string_ensemble", (48,)), ("synth_strings", (50,)), ("choir", (52,)), ("synth_pad", (89,)),
    ("string_quartet", (40, 40, 41, 42)), ("woodwinds", (73, 68, 71, 70)),
    ("brass", (56, 56, 60, 57)), ("band", (81, 27, 4, 33)), ("piano_bass", (0, 0, 0, 32)),
)
#: Drum grooves laid on the beat grid: (kick beats, snare beats) as positions in a 4-beat cycle.
DRUM_STYLES: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = (
    ("rock", (0, 2), (1, 3)), ("four_on_the_floor", (0, 1, 2, 3), (1, 3)), ("half_time", (0,), (2,)),
)
_KICK, _SNARE, _HAT = 36, 38, 42


@dataclasses.dataclass
class CorpusConfig(Config):
    """Everything that decides a corpus; with the seed it fixes every byte of audio and JSON."""

    seed: int = 0
    num_music: int = 40              # music-only clips (VAE, vocoder, unconditional DiT)
    num_pairs: int = 30              # training video-music pairs
    num_heldout: int = 8             # held-out pairs: unseen pieces, unseen stretches of footage
    num_validation: int = 0          # pairs made like the training ones but not trained on (settings)
    music_seconds: float = 20.0
    pair_seconds: float = 15.0
    sample_rate: int = 24000
    fps: int = 20                    # a cut lands within half a frame (25 ms) of its beat
    width: int = 224
    height: int = 224
    composers: tuple = ("bach", "beethoven", "mozart", "haydn", "handel", "corelli", "cpebach",
                        "chopin", "schubert", "schumann_clara", "schumann_robert", "joplin", "verdi",
                        "weber", "beach", "liliuokalani", "johnson_j_r", "monteverdi")
    bpm_range: tuple = (70.0, 150.0)
    drums_prob: float = 0.5
    shot_beats: tuple = (1, 2, 4)    # a cut every n beats, n chosen per pair
    min_shot_seconds: float = 0.6
    max_shot_seconds: float = 4.0
    offbeat_prob: float = 0.2        # share of cuts and accents displaced off the beat
    accent_prob: float = 0.3         # share of (non-cut) beats with a zoom punch or flash
    video_weight: float = 2.0        # a video source is drawn this much more often than a still
    heldout_fraction: float = 0.25   # the last quarter of each source video is held out
    max_score_kb: int = 1500         # skip bigger scores (uncompressed): music21 parses them for minutes
    allow_unknown_licence: bool = False
    crf: int = 23
    # real recorded music (muvi.data.recordings): a folder of unpacked Debian game-music packages;
    # each clip is drawn from it with probability recording_share (its beats from the tracker)
    recordings: str = ""
    recording_share: float = 0.5

    PRESETS = {
        "demo": {"num_pairs": 120, "num_validation": 16},
        "tiny": {"num_music": 2, "num_pairs": 2, "num_heldout": 1, "music_seconds": 4.0,
                 "pair_seconds": 4.0, "composers": ("bach",)},
    }


# ----------------------------------------------------------------------------- splits

#: Share of pieces or tracks (by name hash) held out, and given to training pairs; the rest is music-only.
SPLIT_SHARES = (("heldout", 0.15), ("pairs", 0.25))
#: every name :func:`hash_split` returns (the recipes' ``--split`` choices)
SPLITS = (*(name for name, _ in SPLIT_SHARES), "music")


def hash_split(name: str, shares=SPLIT_SHARES) -> str:
    """'heldout', 'pairs' or 'music' from a hash of ``name`` (a piece's path, a track's name):
    independent of the seed and of the counts, so a piece never changes split."""
    u = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 2 ** 32
    for split, share in shares:
        if u < share:
            return split
        u -= share
    return "music"


# ----------------------------------------------------------------------------- music

@dataclasses.dataclass
class MusicClip:
    """A rendered window of a piece: float32 ``(N,)``, its beats (s from the clip start), facts."""

    waveform: np.ndarray
    beats: np.ndarray
    info: dict


def assign_programs(pm, programs: Sequence[int]) -> list[int]:
    """Give the melodic parts GM programs, top part first by mean pitch; the lowest part takes
    the last entry (a bass or cello), so a four-part texture sounds like the ensemble."""
    parts = [inst for inst in pm.instruments if not inst.is_drum and inst.notes]
    parts.sort(key=lambda inst: -float(np.mean([n.pitch for n in inst.notes])))
    chosen = []
    for rank, inst in enumerate(parts):
        program = programs[-1] if rank == len(parts) - 1 else programs[min(rank, len(programs) - 1)]
        inst.program = int(program)
        chosen.append(int(program))
    return chosen


def add_drum_groove(pm, beats: np.ndarray, downbeats: np.ndarray, style: str) -> None:
    """Append a GM drum part to ``pm`` on its own beat grid (MIDI seconds): kick and snare per
    ``DRUM_STYLES``, closed hi-hat on every beat and half-beat. The bar phase comes from
    pretty_midi's downbeats, which ignore a pickup bar; the beat times themselves are exact."""
    import pretty_midi

    kicks, snares = next((k, s) for name, k, s in DRUM_STYLES if name == style)
    drums = pretty_midi.Instrument(program=0, is_drum=True, name=f"drums:{style}")
    last_down = -1
    for i, t in enumerate(beats):
        if np.any(np.abs(downbeats - t) < 1e-4):
            last_down = i
        pos = (i - last_down if last_down >= 0 else i) % 4
        hits = [(_HAT, 70)] + [(_KICK, 105 if pos == 0 else 90)] * (pos in kicks) + [(_SNARE, 95)] * (pos in snares)
        for pitch, velocity in hits:
            drums.notes.append(pretty_midi.Note(velocity, pitch, float(t), float(t) + 0.1))
        if i + 1 < len(beats):
            half = 0.5 * (t + beats[i + 1])
            drums.notes.append(pretty_midi.Note(50, _HAT, float(half), float(half) + 0.05))
    pm.instruments.append(drums)


def render_clip(piece: MidiPiece, seconds: float, sample_rate: int, rng: np.random.Generator, *,
                bpm_range: Sequence[float] = (70.0, 150.0), drums_prob: float = 0.5,
                soundfont: Optional[str | Path] = None) -> Optional[MusicClip]:
    """Render ``seconds`` of ``piece`` from a random point, at a tempo drawn in ``bpm_range``,
    with a drawn ensemble and (with probability ``drums_prob``) a drum groove.

    Returns None when the piece is too short at the drawn tempo or the window is near-silent,
    so the caller can draw another piece. The clip is peak-normalised to 0.9.
    """
    beats_midi = piece.beats()
    if len(beats_midi) < 4:
        return None
    native_bpm = 60.0 / float(np.median(np.diff(beats_midi)))
    scale = float(np.clip(rng.uniform(*bpm_range) / native_bpm, 0.5, 2.0))
    end = piece.midi.get_end_time() / scale
    first = piece.first_beat / scale
    if end - first < seconds + 0.5:
        return None
    name, programs = ENSEMBLES[int(rng.integers(len(ENSEMBLES)))]
    drum_style = DRUM_STYLES[int(rng.integers(len(DRUM_STYLES)))][0] if rng.random() < drums_prob else None
    start = int(round(rng.uniform(first, end - seconds - 0.5) * sample_rate))
    count = int(round(seconds * sample_rate))

    pm = copy.deepcopy(piece.midi)
    chosen = assign_programs(pm, programs)
    if drum_style is not None:
        add_drum_groove(pm, beats_midi, np.asarray(pm.get_downbeats()), drum_style)
    wave, beats = render_midi(MidiPiece(pm, piece.first_beat, piece.name), sample_rate,
                              soundfont, scale, None, duration=(start + count) / sample_rate, peak=None)
    wave = wave[start:start + count]
    if wave.shape[0] < count or float(np.sqrt(np.mean(wave ** 2))) < 1e-3:
        return None
    wave = (wave * (0.9 / float(np.abs(wave).max()))).astype(np.float32)
    offset = start / sample_rate
    beats = beats[(beats >= offset) & (beats < offset + seconds)] - offset
    meter = pm.time_signature_changes[0] if pm.time_signature_changes else None
    info = {"piece": piece.name, "ensemble": name, "programs": chosen, "drums": drum_style,
            "tempo_scale": round(scale, 6), "native_bpm": round(native_bpm, 3),
            "bpm": round(native_bpm * scale, 3), "offset": round(offset, 6),
            "meter": f"{meter.numerator}/{meter.denominator}" if meter else None}
    return MusicClip(wave, beats, info)


# ----------------------------------------------------------------------------- the edit

def _nearest(times: np.ndarray, t: float) -> float:
    return float(np.min(np.abs(times - t))) if len(times) else float("inf")


def schedule_cuts(beats: np.ndarray, duration: float, fps: float, rng: np.random.Generator, *,
                  shot_beats: Sequence[int] = (1, 2, 4), min_shot: float = 0.6, max_shot: float = 4.0,
                  offbeat_prob: float = 0.2) -> list[dict]:
    """Cut times for a clip: every ``n`` beats (``n`` drawn from ``shot_beats`` so shots last
    ``min_shot``..``max_shot`` s; a quarter of the steps halve or double it), each cut placed on
    the frame nearest its beat, except a share ``offbeat_prob`` moved a quarter to half a beat
    away (and at least 1.5 frames from any beat, so the displacement is visible at ``fps``).

    Each cut: ``{"time": frame / fps, "frame", "on_beat", "beat": the beat it was scheduled on}``.
    """
    if len(beats) < 2:
        return []
    period = float(np.median(np.diff(beats)))
    fits = [n for n in shot_beats if min_shot <= n * period <= max_shot]
    base = int(rng.choice(fits)) if fits else min(shot_beats, key=lambda n: abs(n * period - 2.0))
    cuts: list[dict] = []
    last, j = 0.0, int(rng.integers(1, base + 1))
    while j < len(beats):
        beat = float(beats[j])
        off, sign, amount = rng.random() < offbeat_prob, rng.choice((-1.0, 1.0)), rng.uniform(0.25, 0.5)
        frame = int(round((beat + sign * amount * period if off else beat) * fps))
        if off and _nearest(beats, frame / fps) < 1.5 / fps:
            off, frame = False, int(round(beat * fps))
        time = frame / fps
        if time - last >= min_shot and duration - time >= min_shot:
            cuts.append({"time": round(time, 6), "frame": frame, "on_beat": not off, "beat": round(beat, 6)})
            last = time
        step = base if rng.random() < 0.75 else int(rng.choice((max(1, base // 2), 2 * base)))
        j += step
    return cuts


def schedule_accents(beats: np.ndarray, cut_frames: Sequence[int], num_frames: int, fps: float,
                     rng: np.random.Generator, *, accent_prob: float = 0.3,
                     offbeat_prob: float = 0.2) -> list[dict]:
    """Motion accents on beats that carry no cut: a zoom punch or a white flash, each starting
    on the frame of its beat and decaying within about 0.2 s; a share ``offbeat_prob`` is moved
    off the beat like cuts. Accents keep 3 frames away from cuts and from each other."""
    period = float(np.median(np.diff(beats))) if len(beats) > 1 else 0.5
    cuts = np.asarray(list(cut_frames), dtype=np.int64)
    accents: list[dict] = []
    for beat in beats:
        draw, kind = rng.random(), ("zoom", "flash")[int(rng.integers(2))]
        off, sign, amount = rng.random() < offbeat_prob, rng.choice((-1.0, 1.0)), rng.uniform(0.25, 0.5)
        if draw >= accent_prob:
            continue
        frame = int(round((beat + sign * amount * period if off else beat) * fps))
        if off and _nearest(beats, frame / fps) < 1.5 / fps:
            off, frame = False, int(round(beat * fps))
        if not 1 <= frame < num_frames - 1 or (len(cuts) and np.min(np.abs(cuts - frame)) < 3):
            continue
        if accents and frame - accents[-1]["frame"] < 3:
            continue
        accents.append({"time": round(frame / fps, 6), "frame": frame, "kind": kind,
                        "on_beat": not off, "beat": round(float(beat), 6)})
    return accents


# ----------------------------------------------------------------------------- files

def write_wav(path: str | Path, waveform: np.ndarray, sample_rate: int) -> None:
    """16-bit PCM WAV: the header holds no time stamp, so equal audio gives equal bytes."""
    import soundfile as sf

    sf.write(str(path), np.clip(waveform, -1, 1), sample_rate, subtype="PCM_16", format="WAV")


def write_video(path: str | Path, frames: np.ndarray, fps: int, *, crf: int = 23) -> None:
    """H.264 (libx264, yuv420p) in an mp4, a keyframe at least every 2 s for quick seeking.

    Reproducible: one encoder thread and no macroblock-tree rate control. With mbtree on, this
    libx264 build gave different bit streams for the same frames on repeated runs even with a
    single thread (found while building the corpus); with it off, runs are byte-identical.
    """
    import av

    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=int(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = {"crf": str(crf), "preset": "medium", "x264-params": f"mbtree=0:keyint={2 * int(fps)}"}
        for k, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            picture.pts = k
            for packet in stream.encode(picture):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def write_pair(path: str | Path, frames: np.ndarray, fps: int, waveform: np.ndarray, sample_rate: int,
               *, crf: int = 23) -> Path:
    """An mp4 with the H.264 picture and the music as its AAC track (via ``mux_audio``)."""
    from muvi.mux import mux_audio

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.video{path.suffix}")
    try:
        write_video(tmp, frames, fps, crf=crf)
        mux_audio(tmp, waveform, sample_rate, path)
    finally:
        if tmp.exists():
            os.remove(tmp)
    return path
