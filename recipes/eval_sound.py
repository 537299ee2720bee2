"""Does generated music sound like real music? Sets of generated clips against held-out REAL
recordings (tracks no training item used), beside the distance between two halves of that real set.

    python recipes/eval_sound.py --recordings /tmp/music --out runs/sound \\
        --set demo=runs/eval/own --set "old demo=runs/eval_old/own" [--clips-per-track 2] [--seconds 10]

The real set: ``--clips-per-track`` clips of ``--seconds`` from every held-out track
(:func:`muvi.data.recordings.recording_clip`, split by a hash of the track's name: the tracks
that no training clip or pair uses; ``--split pairs`` for the tracks the training and
validation pairs come from, to choose settings on validation outputs), in two halves by track
(alternate tracks, so the halves share no track). Measured for the second half and for every
generated set against the first:

* Fréchet distance (musicnn penultimate embeddings, one per 3 s patch, as the evaluation suite
  pools them). FD is biased upwards by small sets, so every set is compared at the same number
  of patches as the real half (random subsets, averaged over ``--draws``); the ratio to the
  real-vs-real distance is the headline.
* Level: RMS in dBFS. Spectral flatness (geometric over arithmetic mean of the power spectrum,
  librosa's; noise → 1, tones → 0). Share of energy above 4 kHz.
* Click train: the envelope of the 4-8 kHz band (a broadband click shows there first) read
  three ways: its peak-to-median ratio in dB (impulsiveness); the height of its normalised
  autocorrelation's highest peak at lags 0.1-1 s (regularity at beat rates); and ``buzz_db``,
  the highest peak of the 2-8 kHz envelope's modulation spectrum (Welch, 0.74 s segments) over
  30-300 Hz above the median of its ±15 Hz neighbourhood: a click train at a rate such as a
  vocoder's frame rate (80-86 Hz) stands out there by 10 dB or more, while music's envelope
  has no such line (a few dB, the estimate's own spread). Real music sits where its clips sit.

Writes ``OUT/sound.json``, ``OUT/sound.md`` (the table: per-set median with the interquartile
range across clips) and ``OUT/spectrograms.png`` (one clip of each set, mel dB, same scale).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from muvi.data.corpus import SPLITS

logger = logging.getLogger("eval_sound")
SAMPLE_RATE = 22050


def real_clips(root: Path, per_track: int, seconds: float, seed: int = 0,
               split: str = "heldout") -> tuple[list, list]:
    """(halves A and B of the real clips of ``split``: lists of (name, waveform at SAMPLE_RATE))."""
    from muvi.data.recordings import readable_recordings, recording_clip

    tracks = readable_recordings(root, split)
    halves: tuple[list, list] = ([], [])
    for t, track in enumerate(tracks):
        rng = np.random.default_rng([seed, t])
        clips, tries = [], 0
        while len(clips) < per_track and tries < 10 * per_track:
            tries += 1
            clip = recording_clip(track, seconds, SAMPLE_RATE, rng)
            if clip is not None:
                clips.append((f"{track.package}/{Path(track.name).name}@{clip.info['offset']:.1f}", clip.waveform))
        halves[t % 2].extend(clips)
    if not halves[1]:
        raise SystemExit(f"{root}: fewer than two {split} tracks readable; unpack the packages first")
    return halves


def generated_clips(folder: Path) -> list:
    from muvi.data.audio_io import load_audio

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".wav", ".flac", ".ogg", ".mp3"))
    if not files:
        raise SystemExit(f"{folder}: no audio files")
    return [(p.name, load_audio(p, SAMPLE_RATE).numpy()) for p in files]


def band_envelope(wave: np.ndarray, lo: float = 4000.0, hi: float = 8000.0, hop: int = 256,
                  n_fft: int = 1024) -> np.ndarray:
    import librosa

    spec = np.abs(librosa.stft(wave, n_fft=n_fft, hop_length=hop)) ** 2
    freqs = librosa.fft_frequencies(sr=SAMPLE_RATE, n_fft=n_fft)
    return spec[(freqs >= lo) & (freqs < hi)].sum(0)


def buzz_db(wave: np.ndarray, lo: float = 30.0, hi: float = 300.0, half_width: float = 15.0) -> float:
    """The strongest line of the 2-8 kHz envelope's modulation spectrum in ``[lo, hi]`` Hz, in
    dB above the median of its neighbourhood (see the module's docstring)."""
    from scipy.signal import welch

    hop = 32
    env = band_envelope(wave, 2000.0, 8000.0, hop=hop, n_fft=256)
    freqs, power = welch(np.log(env + 1e-10), fs=SAMPLE_RATE / hop, nperseg=512)
    best = -np.inf
    for i in np.flatnonzero((freqs >= lo) & (freqs <= hi)):
        near = np.abs(freqs - freqs[i]) <= half_width
        best = max(best, 10 * np.log10(power[i] / (np.median(power[near]) + 1e-30)))
    return float(best)


def clip_stats(wave: np.ndarray) -> dict:
    import librosa

    wave = wave.astype(np.float32)
    power = np.abs(librosa.stft(wave, n_fft=1024, hop_length=256)) ** 2
    freqs = librosa.fft_frequencies(sr=SAMPLE_RATE, n_fft=1024)
    env = band_envelope(wave)
    fps = SAMPLE_RATE / 256
    x = env - env.mean()
    ac = np.correlate(x, x, mode="full")[len(x) - 1:]
    ac = ac / (ac[0] + 1e-20)
    lags = slice(int(0.1 * fps), int(1.0 * fps) + 1)
    return {
        "rms_dbfs": float(10 * np.log10(np.mean(wave.astype(np.float64) ** 2) + 1e-20)),
        "flatness": float(np.mean(librosa.feature.spectral_flatness(S=power, power=1.0))),
        "hf_share": float(power[freqs >= 4000].sum() / (power.sum() + 1e-20)),
        "hf_peak_to_median_db": float(10 * np.log10((env.max() + 1e-20) / (np.median(env) + 1e-20))),
        "hf_periodicity": float(ac[lags].max()),
        "buzz_db": buzz_db(wave),
    }


def embeddings(embedder, clips: list) -> list[np.ndarray]:
    return [embedder.embed(wave, SAMPLE_RATE) for _, wave in clips]


def matched_fd(reference: np.ndarray, candidate: np.ndarray, size: int, draws: int, seed: int) -> float:
    """Mean FD between ``reference`` and random ``size``-patch subsets of ``candidate``."""
    from muvi.eval.distances import frechet_distance_embeddings

    rng = np.random.default_rng(seed)
    if len(candidate) <= size:
        return frechet_distance_embeddings(reference, candidate)
    return float(np.mean([frechet_distance_embeddings(reference, candidate[rng.choice(len(candidate), size, False)])
                          for _ in range(draws)]))


def spectrogram_figure(sets: dict, out: Path) -> Path:
    import librosa
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sets), 1, figsize=(10, 2.3 * len(sets)), sharex=True)
    axes = np.atleast_1d(axes)
    for ax, (name, (clip_name, wave)) in zip(axes, sets.items()):
        mel = librosa.feature.melspectrogram(y=wave, sr=SAMPLE_RATE, n_fft=1024, hop_length=256, n_mels=80, fmax=11025)
        db = librosa.power_to_db(mel, ref=1.0, top_db=None)
        ax.imshow(db, origin="lower", aspect="auto", vmin=-80, vmax=10, cmap="magma",
                  extent=(0, wave.shape[0] / SAMPLE_RATE, 0, 80))
        ax.set_ylabel("mel bin")
        ax.set_title(f"{name}: {clip_name}", fontsize=9, loc="left")
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def table(results: dict) -> str:
    keys = ("rms_dbfs", "flatness", "hf_share", "hf_peak_to_median_db", "hf_periodicity", "buzz_db")
    lines = ["| set | clips | FD musicnn vs real half A | × real-vs-real | " + " | ".join(keys) + " |",
             "|---|---|---|---|" + "---|" * len(keys)]
    base = results["real half B"]["fd"]
    for name, r in results.items():
        cells = []
        for k in keys:
            v = np.array([s[k] for s in r["clips"]])
            q1, q2, q3 = np.percentile(v, [25, 50, 75])
            cells.append(f"{q2:.3g} [{q1:.3g}, {q3:.3g}]")
        ratio = r["fd"] / base
        lines.append(f"| {name} | {len(r['clips'])} | {r['fd']:.2f} | {ratio:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recordings", type=Path, required=True, help="unpacked Debian music packages")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=FOLDER",
                        help="a folder of generated clips (repeatable)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--clips-per-track", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--draws", type=int, default=20, help="random equal-size subsets per FD")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=SPLITS, default="heldout",
                        help="the real tracks compared against (heldout to report; pairs, the tracks the "
                             "validation pairs come from, to choose settings)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%X")
    sets = {}
    for spec in args.sets:
        name, sep, folder = spec.partition("=")
        if not sep or not Path(folder).is_dir():
            parser.error(f"--set {spec!r}: expected NAME=FOLDER with an existing folder")
        sets[name] = Path(folder)
    from muvi.encoders.musicnn import MusicnnEmbedder

    half_a, half_b = real_clips(args.recordings, args.clips_per_track, args.seconds, args.seed, args.split)
    clips = {"real half B": half_b, **{name: generated_clips(folder) for name, folder in sets.items()}}
    embedder = MusicnnEmbedder.from_package()
    reference = np.concatenate(embeddings(embedder, half_a))
    size = len(np.concatenate(embeddings(embedder, half_b)))
    results = {}
    for name, items in clips.items():
        emb = np.concatenate(embeddings(embedder, items))
        results[name] = {"fd": matched_fd(reference, emb, size, args.draws, args.seed), "patches": len(emb),
                         "clips": [{"name": n, **clip_stats(w)} for n, w in items]}
        logger.info("%s: FD %.2f over %d patches", name, results[name]["fd"], len(emb))
    results = {"real half A (reference)": {"fd": 0.0, "patches": len(reference),
                                           "clips": [{"name": n, **clip_stats(w)} for n, w in half_a]}, **results}
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"split": args.split, "reference_patches": len(reference), "matched_patches": size,
              "seconds": args.seconds, "sets": {k: str(v) for k, v in sets.items()}, "results": results}
    (args.out / "sound.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md = table(results)
    (args.out / "sound.md").write_text(md, encoding="utf-8")
    shown = {f"real ({args.split})": half_a[0], **{name: items[0] for name, items in clips.items() if name in sets}}
    count = int(args.seconds * SAMPLE_RATE)
    shown = {name: (clip_name, wave[:count]) for name, (clip_name, wave) in shown.items()}
    spectrogram_figure(shown, args.out / "spectrograms.png")
    print(md)
    return report


if __name__ == "__main__":
    main()
