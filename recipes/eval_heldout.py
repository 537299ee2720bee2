"""Held-out evaluation of a release: music for every held-out video under three conditions,
scored by the evaluation suite (``muvi.eval.evaluate``).

    python recipes/eval_heldout.py --release checkpoints/muvi-demo --pairs CORPUS/heldout.csv \
        --out runs/eval [--contrastive runs/contrastive/final] [--steps 25] [--cfg-scale 4]

Conditions, with the same seed per clip (seed + clip index) so that they differ only in what
the model is shown:

* ``own``: each video's music generated from that video;
* ``shuffled``: generated from the NEXT video of the list (cut to this clip's length): music
  that is as good as the model makes but ignores this picture, the floor for alignment;
* ``null``: the learnt null condition (``cfg_scale=0``): the model without any video.

Each folder is scored against the real soundtracks: beats (BHS, F1), musicnn distances, SIM with
``--contrastive`` (the model sees the clip's OWN video in every condition, so SIM measures the
music's fit to that picture), and, where the pairs have ``<stem>.json`` sidecars with cut and
accent times (``recipes/build_corpus.py`` writes them), beats against the video's own events.

With ``--samples K`` every clip gets K samples per condition (sample k of clip i uses seed
``seed + i + k * clips``; sample 0 is the single-sample run's file), each sample's files in
``OUT/sample<k>/`` (k ≥ 1); the paired differences then average each clip's K values per condition
before subtracting, so that the interval is over clips with less of the sampler's noise in it.

Writes ``OUT/{own,shuffled,null}/<stem>.wav``, ``OUT/report_<condition>.json`` and
``OUT/summary.md``: a table of the headline metrics with 95% bootstrap intervals, and the
per-clip differences own − shuffled and own − null (paired: same clip, seed and reference). Generated
files already present are kept (rerun to finish an interrupted run); ``--force`` regenerates.

Choosing settings (guidance scale, checkpoint) belongs on a validation CSV, never on the held-out
one: ``build_corpus.py --num-validation N`` writes ``validation.csv``, pairs made like the
training ones but left out of ``pairs.csv``. The null condition does not depend on the guidance
scale, so a sweep over ``--cfg-scale`` may copy ``null/`` from its first run into the others.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from muvi.data.audio_io import audio_duration

logger = logging.getLogger("eval_heldout")

CONDITIONS = ("own", "shuffled", "null")
HEADLINE = ("bhs", "beat_f1", "event_hit", "event_f1", "sim", "fd_musicnn", "kl_softmax_musicnn")
CEILINGS = {"event_hit": "event_hit_ceiling", "event_f1": "event_f1_ceiling", "sim": "sim_ceiling"}


def read_pairs(csv_path: Path) -> list[tuple[Path, Path]]:
    """(video, audio) rows of a ``video,audio`` CSV, paths relative to the CSV's folder."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"video", "audio"} <= set(rows[0]):
        raise SystemExit(f"error: {csv_path} needs a header with 'video' and 'audio' columns")
    pairs = [(csv_path.parent / r["video"], csv_path.parent / r["audio"]) for r in rows]
    missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
    if missing:
        raise SystemExit(f"error: {len(missing)} file(s) of {csv_path} missing, e.g. {missing[0]}")
    if len({v.stem for v, _ in pairs}) != len(pairs):
        raise SystemExit(f"error: {csv_path}: video file names must be distinct (results are paired by stem)")
    return pairs


def _link(src: Path, dst: Path) -> None:
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        dst.symlink_to(src.resolve())
    except OSError:
        shutil.copyfile(src, dst)


def stage_inputs(pairs: list[tuple[Path, Path]], out: Path) -> bool:
    """OUT/ref, OUT/videos and OUT/events named by the video's stem; True if events exist."""
    for name in ("ref", "videos", "events"):
        (out / name).mkdir(parents=True, exist_ok=True)
    events = True
    for video, audio in pairs:
        _link(audio, out / "ref" / f"{video.stem}{audio.suffix}")
        _link(video, out / "videos" / video.name)
        sidecar = video.with_suffix(".json")
        if sidecar.is_file():
            _link(sidecar, out / "events" / sidecar.name)
        else:
            events = False
    return events


def generate_all(pipe, pairs, folders: Sequence[Path], steps: int, cfg_scale: float, seed: int,
                 force: bool) -> dict:
    """Generate every condition's files, one sample per folder (sample k of clip i at seed
    ``seed + i + k * clips``); returns wall seconds per generated clip."""
    from tqdm import tqdm

    for folder in folders:
        for name in CONDITIONS:
            (folder / name).mkdir(parents=True, exist_ok=True)
    seconds = []
    jobs = [(k, i, c) for k in range(len(folders)) for i in range(len(pairs)) for c in CONDITIONS]
    for k, i, condition in tqdm(jobs, desc="generating", unit="clip"):
        video = pairs[i][0]
        target = folders[k] / condition / f"{video.stem}.wav"
        if target.is_file() and not force:
            continue
        duration = min(audio_duration(pairs[i][1]), pipe_duration(video))
        source = pairs[(i + 1) % len(pairs)][0] if condition == "shuffled" else video
        if condition == "shuffled" and pipe_duration(source) < duration:
            duration = pipe_duration(source)  # a shorter neighbour: the clip is cut to it
        start = time.perf_counter()
        result = pipe.generate(str(source), duration=duration, num_steps=steps, seed=seed + i + k * len(pairs),
                               cfg_scale=0.0 if condition == "null" else cfg_scale, progress=False)
        seconds.append(time.perf_counter() - start)
        result.save(target, overwrite=True)  # missing, or --force
    return {"clips": len(seconds), "mean_wall_s": sum(seconds) / len(seconds) if seconds else None}


def pipe_duration(video: Path) -> float:
    from muvi.data.datasets import video_duration

    return video_duration(video)


def summary_table(reports: dict[str, dict]) -> str:
    """Markdown: one row per headline metric, one column per condition (+ the real soundtrack)."""
    lines = ["| metric | " + " | ".join(CONDITIONS) + " | real soundtrack |", "|---" * (len(CONDITIONS) + 2) + "|"]
    for metric in HEADLINE:
        cells, ceiling = [], ""
        for condition in CONDITIONS:
            m = reports[condition]["metrics"].get(metric)
            cells.append("n/a" if m is None else f"{m['value']:.1f} [{m['ci95'][0]:.1f}, {m['ci95'][1]:.1f}]")
        if metric in CEILINGS and CEILINGS[metric] in reports["own"]["metrics"]:
            ceiling = f"{reports['own']['metrics'][CEILINGS[metric]]['value']:.1f}"
        if metric == "sim" and "sim_floor" in reports["own"]["metrics"]:
            ceiling += f" (shuffled real pairs: {reports['own']['metrics']['sim_floor']['value']:.1f})"
        if any(c != "n/a" for c in cells):
            lines.append(f"| {metric} | " + " | ".join(cells) + f" | {ceiling} |")
    return "\n".join(lines) + "\n"


def sample_folder(out: Path, k: int) -> Path:
    """Where sample ``k``'s condition folders live: OUT itself for the first."""
    return out if k == 0 else out / f"sample{k}"


def _per_clip(report: dict, metric: str) -> Optional[np.ndarray]:
    """Per-clip values of ``bhs`` (matched / reference beats), ``event_hit`` (video events hit)
    or ``sim``, in percent, in the report's clip order; None when the report lacks them."""
    clips = report["clips"]
    try:
        if metric == "bhs":
            return np.array([100 * c["matched_beats"] / c["reference_beats"] for c in clips])
        if metric == "event_hit":
            return np.array([100 * c["event_hits"] / c["events"] for c in clips])
        return np.array([c[metric] for c in clips])  # the report stores SIM in percent
    except (KeyError, ZeroDivisionError):
        return None


def _mean_per_clip(samples: Sequence[dict[str, dict]], condition: str, metric: str) -> Optional[np.ndarray]:
    """Each clip's value of ``metric`` in ``condition``, averaged over the samples' reports."""
    values = [_per_clip(reports[condition], metric) for reports in samples]
    return None if any(v is None for v in values) else np.mean(values, axis=0)


def paired_table(reports: Union[dict[str, dict], Sequence[dict[str, dict]]], seed: int = 0,
                 n_bootstrap: int = 1000) -> str:
    """Markdown: own minus each floor, clip by clip (same seed, same reference), with a
    percentile bootstrap 95% interval over clips and how many clips the own video wins.
    ``reports``: one sample's reports by condition, or a list of them (several samples per
    clip), whose per-clip values are averaged per condition before the difference."""
    samples = [reports] if isinstance(reports, dict) else list(reports)
    rng = np.random.default_rng(seed)
    lines = ["| metric | own − shuffled [95% CI] | clips own > shuffled | own − null [95% CI] | clips own > null |",
             "|---|---|---|---|---|"]
    for metric in ("bhs", "event_hit", "sim"):
        own = _mean_per_clip(samples, "own", metric)
        if own is None:
            continue
        cells = []
        for floor in ("shuffled", "null"):
            diff = own - _mean_per_clip(samples, floor, metric)
            boot = diff[rng.integers(0, len(diff), (n_bootstrap, len(diff)))].mean(1)
            low, high = np.percentile(boot, [2.5, 97.5])
            cells += [f"{diff.mean():+.1f} [{low:+.1f}, {high:+.1f}]", f"{int((diff > 0).sum())} / {len(diff)}"]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", type=Path, required=True, help="release folder (config.json + safetensors)")
    parser.add_argument("--pairs", type=Path, required=True, help="CSV of held-out video,audio rows")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--contrastive", help="contrastive model folder for SIM (train_contrastive's final/)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=1, help="samples per clip and condition (seeds apart)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--force", action="store_true", help="regenerate files that already exist")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")

    from muvi.eval.report import evaluate
    from muvi.eval.sim import SimilarityScorer
    from muvi.pipeline import MuviPipeline

    if args.samples < 1:
        raise SystemExit(f"error: --samples must be at least 1, got {args.samples}")
    pairs = read_pairs(args.pairs)
    out = args.out
    has_events = stage_inputs(pairs, out)
    pipe = MuviPipeline.from_pretrained(args.release, device=args.device)
    timing = generate_all(pipe, pairs, [sample_folder(out, k) for k in range(args.samples)], args.steps,
                          args.cfg_scale, args.seed, args.force)
    scorer = SimilarityScorer.from_pretrained(args.contrastive, device=args.device) if args.contrastive else None
    samples = []
    for k in range(args.samples):
        folder = sample_folder(out, k)
        samples.append({condition: evaluate(folder / condition, out / "ref", out / "videos",
                                            folder / f"report_{condition}.json", seed=args.seed,
                                            n_bootstrap=args.bootstrap, similarity_model=scorer,
                                            events_dir=out / "events" if has_events else None, progress=False)
                        for condition in CONDITIONS})
    reports = samples[0]
    paired = "Paired by clip" + (f", each clip's {args.samples} samples averaged" if args.samples > 1 else "")
    table = (summary_table(reports) + f"\n{paired}:\n\n" + paired_table(samples, args.seed, args.bootstrap))
    if args.samples > 1:
        table += "\nEach sample alone:\n\n" + "\n".join(
            f"sample {k} (seeds {args.seed + k * len(pairs)}..):\n\n" + paired_table(s, args.seed, args.bootstrap)
            for k, s in enumerate(samples))
    several = f" ({args.samples} samples per clip; the metrics table is the first sample)" if args.samples > 1 else ""
    header = (f"Evaluation of `{args.release}` on {len(pairs)} pairs of `{args.pairs}`: {args.steps} Euler "
              f"steps, cfg {args.cfg_scale} (null: 0), seeds {args.seed}..{args.seed + args.samples * len(pairs) - 1}"
              f"{several}; values with 95% bootstrap intervals over clips.\n\n")
    (out / "summary.md").write_text(header + table, encoding="utf-8")
    (out / "summary.json").write_text(json.dumps({"timing": timing, "conditions": {
        c: {k: r["metrics"][k] for k in r["metrics"]} for c, r in reports.items()}}, indent=2) + "\n", encoding="utf-8")
    print(header + table)
    return reports


if __name__ == "__main__":
    main()
