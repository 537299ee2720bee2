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
* the picture: :func:`split_footage` cuts source videos into shots by frame differences
  (:func:`detect_cuts`); :func:`plan_shots` assigns one shot per segment between cuts (never the
  same source twice in a row) with a slow pan/zoom, a playback speed and an optional mirror;
  still photographs become shots through a Ken Burns pan/zoom; :func:`render_frames` draws it;
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
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

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

    PRESETS = {
        "demo": {"num_pairs": 120, "num_validation": 16},
        "tiny": {"num_music": 2, "num_pairs": 2, "num_heldout": 1, "music_seconds": 4.0,
                 "pair_seconds": 4.0, "composers": ("bach",)},
    }


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


# ----------------------------------------------------------------------------- footage

@dataclasses.dataclass
class Shot:
    """One shot: ``frames`` (F, H, W, 3) uint8 (F = 1 for a still), the source it came from."""

    source: str
    frames: np.ndarray
    fps: float                 # source frame rate; 0 for a still
    span: tuple[int, int]      # [first, last) frame in the source file

    @property
    def is_still(self) -> bool:
        return self.fps == 0


def frame_signatures(frames: np.ndarray, size: int = 16) -> torch.Tensor:
    """(F, 3*size*size) colour thumbnails, each channel less its mean, all divided by the
    frame's spread: a blend towards white (a flash) or a gain leaves a signature unchanged."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().permute(0, 3, 1, 2)
    x = F.adaptive_avg_pool2d(x, size)
    x = x - x.mean(dim=(2, 3), keepdim=True)
    x = x.flatten(1)
    return x / (x.std(dim=1, keepdim=True) + 2.0)


def detect_cuts(frames: np.ndarray, threshold: float = 0.45, ratio: float = 2.5, window: int = 4) -> list[int]:
    """Frames that start a new shot. The change of :func:`frame_signatures` from the previous
    frame must exceed ``threshold`` and ``ratio`` times the median change over ``window``
    frames on either side, so steady fast motion (a pan) is not taken for a cut. Unrelated
    pictures differ by about 1; flashes leave no trace; a zoom punch can register (it is a
    sudden change of the picture, the point of an accent)."""
    if len(frames) < 2:
        return []
    sig = frame_signatures(frames)
    diff = (sig[1:] - sig[:-1]).abs().mean(dim=1).numpy()
    out = []
    for k, d in enumerate(diff):
        around = np.concatenate([diff[max(0, k - window):k], diff[k + 1:k + 1 + window]])
        if d > threshold and (not len(around) or d > ratio * float(np.median(around))):
            out.append(k + 1)
    return out


def _fit_short_side(image, short: int):
    from PIL import Image

    scale = short / min(image.size)
    if scale >= 1:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.BILINEAR)


def load_footage(path: str | Path, short_side: int) -> tuple[np.ndarray, float]:
    """All frames of a video, (F, H, W, 3) uint8, shrunk so the short side is at most
    ``short_side``, and its frame rate."""
    import decord
    from PIL import Image

    reader = decord.VideoReader(str(path), num_threads=1)
    frames = reader.get_batch(list(range(len(reader)))).asnumpy()
    out = np.stack([np.asarray(_fit_short_side(Image.fromarray(f), short_side)) for f in frames])
    return out, float(reader.get_avg_fps())


def load_still(path: str | Path, short_side: int) -> np.ndarray:
    """A photograph as a one-frame (1, H, W, 3) uint8 array (grey images become RGB)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(_fit_short_side(image.convert("RGB"), short_side))[None]


def split_footage(source: str, frames: np.ndarray, fps: float, *, heldout_fraction: float = 0.25,
                  min_seconds: float = 0.5, threshold: float = 0.5) -> tuple[list[Shot], list[Shot]]:
    """Cut a source video into shots at detected cuts and at the held-out boundary: shots in
    the last ``heldout_fraction`` of the video go to the held-out pool. Shots shorter than
    ``min_seconds`` are dropped. Returns (training shots, held-out shots)."""
    total = len(frames)
    boundary = int(round(total * (1.0 - heldout_fraction)))
    edges = sorted({0, total, boundary, *detect_cuts(frames, threshold)})
    train, heldout = [], []
    for a, b in zip(edges[:-1], edges[1:]):
        if (b - a) / fps >= min_seconds:
            (train if b <= boundary else heldout).append(Shot(source, frames[a:b], fps, (a, b)))
    return train, heldout


# ----------------------------------------------------------------------------- the picture

def plan_shots(cut_frames: Sequence[int], num_frames: int, fps: float, pool: Sequence[Shot],
               rng: np.random.Generator, *, video_weight: float = 2.0) -> list[dict]:
    """One segment per shot between cuts: which pool shot, where in it, how fast, the crop's
    start and end (``[scale of the largest crop, x, y]`` with x, y in the free range) and a
    mirror flag. Consecutive segments never share a source, so every cut changes the picture.
    Stills pan and zoom further than video (Ken Burns), but slowly, as a camera move would."""
    weights = np.array([1.0 if s.is_still else video_weight for s in pool])
    edges = [0, *cut_frames, num_frames]
    plan, previous = [], None
    for a, b in zip(edges[:-1], edges[1:]):
        p = weights * np.array([s.source != previous for s in pool])
        if p.sum() == 0:
            raise ValueError("the shot pool needs at least two sources")
        index = int(rng.choice(len(pool), p=p / p.sum()))
        shot = pool[index]
        lo, zoom_rate, pan_rate = (0.5, 0.12, 0.2) if shot.is_still else (0.7, 0.05, 0.1)  # per second
        seconds = (b - a) / fps
        s0, x0, y0 = rng.uniform(lo, 1.0), rng.random(), rng.random()
        s1, x1, y1 = (float(np.clip(v + rng.uniform(-1, 1) * rate * seconds, low, 1.0))
                      for v, rate, low in ((s0, zoom_rate, lo), (x0, pan_rate, 0.0), (y0, pan_rate, 0.0)))
        plan.append({"shot": index, "source": shot.source, "span": list(shot.span),
                     "frame_start": a, "frame_stop": b,
                     "offset": round(float(rng.uniform(0, len(shot.frames) - 1)), 6),
                     "speed": round(float(rng.uniform(0.6, 1.4)), 6), "flip": bool(rng.random() < 0.5),
                     "rect0": [round(float(v), 6) for v in (s0, x0, y0)],
                     "rect1": [round(v, 6) for v in (s1, x1, y1)]})
        previous = shot.source
    return plan


def _crop_box(src_w: int, src_h: int, aspect: float, scale: float, fx: float, fy: float):
    """(x0, y0, x1, y1) of a crop with the output ``aspect``, ``scale`` of the largest one."""
    h_max = min(src_h, src_w / aspect)
    h = h_max * scale
    w = h * aspect
    x0, y0 = fx * (src_w - w), fy * (src_h - h)
    return (x0, y0, x0 + w, y0 + h)


def render_frames(plan: Sequence[dict], pool: Sequence[Shot], accents: Sequence[dict], fps: float,
                  width: int, height: int) -> np.ndarray:
    """Draw the planned edit: (F, height, width, 3) uint8. Video shots play from ``offset`` at
    ``speed`` (bouncing back at the shot's ends); crops glide from ``rect0`` to ``rect1``. A zoom
    punch narrows the crop by 12 %, a flash blends 55 % towards white, both decaying
    exponentially (time constants 0.15 s and 0.1 s) from their frame."""
    from PIL import Image

    num_frames = plan[-1]["frame_stop"]
    k = np.arange(num_frames)[:, None]
    zoom_at = np.array([a["frame"] for a in accents if a["kind"] == "zoom"])[None]
    flash_at = np.array([a["frame"] for a in accents if a["kind"] == "flash"])[None]
    zoom = 1.0 + (0.12 * np.where(k >= zoom_at, np.exp(-(k - zoom_at) / (0.15 * fps)), 0)).sum(1)
    flash = np.clip((0.55 * np.where(k >= flash_at, np.exp(-(k - flash_at) / (0.1 * fps)), 0)).sum(1), 0, 0.8)
    out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for seg in plan:
        shot = pool[seg["shot"]]
        n = len(shot.frames)
        length = seg["frame_stop"] - seg["frame_start"]
        for i in range(length):
            u = i / max(1, length - 1)
            if shot.is_still:
                src = shot.frames[0]
            else:
                pos = seg["offset"] + seg["speed"] * i / fps * shot.fps
                period = 2 * (n - 1)
                pos = pos % period if period else 0.0
                src = shot.frames[int(pos if pos <= n - 1 else period - pos)]
            f = seg["frame_start"] + i
            scale, fx, fy = (a + (b - a) * u for a, b in zip(seg["rect0"], seg["rect1"]))
            box = _crop_box(src.shape[1], src.shape[0], width / height, scale / zoom[f], fx, fy)
            image = Image.fromarray(src).resize((width, height), Image.BILINEAR, box=box)
            frame = np.asarray(image)[:, ::-1] if seg["flip"] else np.asarray(image)
            if flash[f] > 0:
                frame = frame * (1.0 - flash[f]) + 255.0 * flash[f]
            out[f] = np.clip(np.round(frame), 0, 255).astype(np.uint8) if flash[f] > 0 else frame
    return out


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
