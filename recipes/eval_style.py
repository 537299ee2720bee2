"""Does a style prompt steer the music? Prompts of clearly different tempo and timbre from held-out
real recordings, each given to a release with the same videos and seeds; the outputs' tempo and
timbre are compared with every prompt's.

    python recipes/eval_style.py --release checkpoints/muvi-demo --recordings /tmp/music \\
        --videos CORPUS/heldout.csv --out runs/style [--prompts 3] [--videos-used 3] [--prompt-scale 0,2]

Choosing a setting (``--prompt-scale``) is done on validation: ``--split pairs --videos
CORPUS/validation.csv`` takes the prompts from the tracks the training pairs were cut from (not
held out, but never the held-out ones) and the validation videos; report with the defaults.

Prompts: one ``--clip-seconds`` clip of every held-out track (tracks no training item used;
:func:`muvi.data.recordings.recording_clip`), its tempo from muvi's beat tracker over the whole
clip and its timbre as the mean musicnn embedding (penultimate layer), standardised per dimension
by the mean and spread of all held-out clips (so that a distance weighs how the clips differ, not
the direction every musicnn embedding shares); ``--prompts`` of them are
chosen greedily so that every two differ in tempo by more than ``--min-tempo-gap`` (octaves
apart do not count as different) and are far apart in timbre. The prompt given is the clip's
first ``--prompt-seconds``.

For each video (the first ``--videos-used`` rows of the CSV) the release writes ``--seconds`` of
music with each prompt at each ``--prompt-scale`` (guidance on the prompt, comma-separated; default
the release's) and once without one, with the same seed. Per output: tempo (tracker,
median BPM), whether it is within ``--tempo-tolerance`` of its prompt's tempo or of its double or
half, and the cosine distance of its timbre to every prompt's. Beside them, each prompt's whole
clip encoded by the release's VAE and decoded as its music is (mel draw, vocoder, mastering; no
DiT): how near its decoder can come to each prompt's timbre at all. Written: ``OUT/style.json``,
``OUT/style.md`` (per prompt scale, the distance table: rows the prompt given, columns the prompt
compared), and the outputs as ``OUT/<video>_<prompt>[_s<scale>].wav``.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from muvi.data.corpus import SPLITS

logger = logging.getLogger("eval_style")


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(1.0 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def tempo_of(wave: np.ndarray, sample_rate: int) -> float:
    from muvi.data.beats import track_beats

    beats = track_beats(wave, sample_rate)
    return float(60.0 / np.median(np.diff(beats))) if len(beats) >= 3 else float("nan")


def octave_close(a: float, b: float, tolerance: float) -> bool:
    """``a`` within ``tolerance`` (relative) of ``b``, ``2b`` or ``b/2``."""
    return any(abs(a / (b * k) - 1.0) <= tolerance for k in (1.0, 2.0, 0.5))


def candidates(root: Path, seconds: float, sample_rate: int, embedder, seed: int = 0,
               split: str = "heldout") -> list[dict]:
    from muvi.data.recordings import readable_recordings, recording_clip

    out = []
    for t, track in enumerate(readable_recordings(root, split)):
        rng = np.random.default_rng([seed, t])
        for _ in range(5):
            clip = recording_clip(track, seconds, sample_rate, rng)
            if clip is not None:
                break
        else:
            continue
        out.append({"name": f"{track.package}/{Path(track.name).stem}", "licence": track.licence,
                    "offset": clip.info["offset"], "wave": clip.waveform,
                    "bpm": tempo_of(clip.waveform, sample_rate),
                    "timbre": embedder.embed(clip.waveform, sample_rate).mean(0)})
    return [c for c in out if np.isfinite(c["bpm"])]


def standardizer(pool: list[dict]):
    """A function that standardises a timbre (a raw mean embedding) per dimension by the mean and
    spread of the ``pool``'s raw timbres: how every comparison of timbres here is made."""
    stack = np.stack([c["timbre"] for c in pool])
    mean, std = stack.mean(0), stack.std(0) + 1e-6
    return lambda timbre: (timbre - mean) / std


def choose(items: list[dict], count: int, min_gap: float) -> list[dict]:
    """Greedy: start from the clip farthest from the others in timbre; add the one farthest (in
    its nearest chosen timbre) among those whose tempo differs from every chosen one's by more
    than ``min_gap``, octaves included."""
    if len(items) < count:
        raise SystemExit(f"only {len(items)} clips with a tempo; need {count}")
    dist = np.array([[cosine_distance(a["timbre"], b["timbre"]) for b in items] for a in items])
    chosen = [int(np.argmax(dist.sum(1)))]
    while len(chosen) < count:
        ok = [i for i in range(len(items)) if i not in chosen
              and all(not (octave_close(items[i]["bpm"], items[j]["bpm"], min_gap)
                           or octave_close(items[j]["bpm"], items[i]["bpm"], min_gap)) for j in chosen)]
        if not ok:
            raise SystemExit(f"no {count} clips differ in tempo by more than {min_gap:.0%}")
        chosen.append(max(ok, key=lambda i: dist[i, chosen].min()))
    return [items[i] for i in chosen]


def through_decoder(pipe, wave: np.ndarray, seed: int) -> np.ndarray:
    """``wave`` encoded by the release's VAE and decoded as its music is (the VAE's decode, its
    mel draw, the vocoder, the mastering): the nearest the release can come to a clip."""
    import torch

    with torch.no_grad():
        latent = pipe.encode_audio(torch.from_numpy(wave).float())
        return pipe.mastered(pipe.decode_latent(latent, seed)[0, :len(wave)].float().cpu()).numpy()


def ceiling_table(result: dict) -> str:
    """Markdown: each prompt's own clip through the release's decoder, its distance to every prompt."""
    names = [p["name"] for p in result["prompts"]]
    lines = ["each prompt's clip through the release's VAE and vocoder (no DiT): what its decoder can reach", "",
             "| clip | " + " | ".join(f"to {n}" for n in names) + " | nearest own |",
             "|---|" + "---|" * (len(names) + 1)]
    for row in result["decoder_ceiling"]:
        lines.append(f"| {row['prompt']} | " + " | ".join(f"{x:.3f}" for x in row["distances"])
                     + f" | {'yes' if row['nearest_own'] else 'no'} |")
    return "\n".join(lines) + "\n"


def table(result: dict, scale: float) -> str:
    prompts = result["prompts"]
    names = [p["name"] for p in prompts]
    head = "| prompt given (BPM) | " + " | ".join(f"to {n}" for n in names) + " | nearest own | output BPM | tempo ok |"
    lines = [f"prompt scale {scale:g}", "", head, "|---|" + "---|" * (len(names) + 3)]
    for given in [*names, None]:
        rows = [o for o in result["outputs"] if o["prompt"] == given and (given is None or o["prompt_scale"] == scale)]
        d = np.array([o["distances"] for o in rows]).mean(0)
        label = "none" if given is None else f"{given} ({prompts[names.index(given)]['bpm']:.0f})"
        own = "" if given is None else f"{sum(o['nearest_own'] for o in rows)}/{len(rows)}"
        ok = "" if given is None else f"{sum(o['tempo_ok'] for o in rows)}/{len(rows)}"
        bpm = ", ".join(f"{o['bpm']:.0f}" for o in rows)
        lines.append(f"| {label} | " + " | ".join(f"{x:.3f}" for x in d) + f" | {own} | {bpm} | {ok} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", required=True)
    parser.add_argument("--recordings", type=Path, required=True, help="unpacked Debian music packages")
    parser.add_argument("--videos", type=Path, required=True, help="CSV of video,audio rows (held-out pairs)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--videos-used", type=int, default=3)
    parser.add_argument("--clip-seconds", type=float, default=10.0)
    parser.add_argument("--prompt-seconds", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--min-tempo-gap", type=float, default=0.15)
    parser.add_argument("--tempo-tolerance", type=float, default=0.10)
    parser.add_argument("--cfg-scale", type=float, default=None)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-scale", default=None, help="guidance on the prompt: one value or a comma-separated "
                        "list (default: the release's default_prompt_scale)")
    parser.add_argument("--split", default="heldout", choices=SPLITS,
                        help="the recordings the prompts come from (heldout to report; pairs to choose settings)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%X")
    import soundfile as sf

    from muvi.encoders.musicnn import MusicnnEmbedder
    from muvi.pipeline import MuviPipeline

    with open(args.videos, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and r[0] != "video"]
    videos = [args.videos.parent / r[0] for r in rows[:args.videos_used]]
    pipe = MuviPipeline.from_pretrained(args.release, device="cpu")
    scales = ([pipe.config.default_prompt_scale] if args.prompt_scale is None
              else [float(x) for x in str(args.prompt_scale).split(",")])
    rate = pipe.mel.config.sample_rate
    embedder = MusicnnEmbedder.from_package()
    pool = candidates(args.recordings, args.clip_seconds, rate, embedder, args.seed, args.split)
    standard = standardizer(pool)
    for c in pool:
        c["timbre"] = standard(c["timbre"])
    prompts = choose(pool, args.prompts, args.min_tempo_gap)
    args.out.mkdir(parents=True, exist_ok=True)
    outputs = []
    names = [p["name"] for p in prompts]
    runs = [(prompt, scale) for prompt in prompts for scale in scales] + [(None, 0.0)]
    for video in videos:
        for prompt, scale in runs:
            audio = None if prompt is None else prompt["wave"][: int(round(args.prompt_seconds * rate))]
            out = pipe.generate(str(video), prompt_audio=audio, prompt_sample_rate=rate, duration=args.seconds,
                                seed=args.seed, num_steps=args.steps, cfg_scale=args.cfg_scale,
                                prompt_scale=scale, progress=False)
            wave = out.numpy()
            tag = "none" if prompt is None else prompt["name"].replace("/", "_") + (
                f"_s{scale:g}" if len(scales) > 1 else "")
            sf.write(args.out / f"{video.stem}_{tag}.wav", wave, rate)
            timbre = standard(embedder.embed(wave, rate).mean(0))
            distances = [cosine_distance(timbre, p["timbre"]) for p in prompts]
            bpm = tempo_of(wave, rate)
            record = {"video": video.name, "prompt": None if prompt is None else prompt["name"],
                      "prompt_scale": scale, "bpm": bpm, "distances": distances}
            if prompt is not None:
                own = prompts.index(prompt)
                record["nearest_own"] = bool(int(np.argmin(distances)) == own)
                record["tempo_ok"] = bool(np.isfinite(bpm) and octave_close(bpm, prompt["bpm"], args.tempo_tolerance))
            outputs.append(record)
            logger.info("%s with %s (scale %g): %.0f BPM, distances %s", video.name, record["prompt"], scale, bpm,
                        " ".join(f"{d:.3f}" for d in distances))
    result = {"release": str(args.release), "settings": {k: str(v) for k, v in vars(args).items()},
              "prompts": [{k: v for k, v in p.items() if k not in ("wave", "timbre")} for p in prompts],
              "outputs": outputs}
    result["decoder_ceiling"] = []
    for own, prompt in enumerate(prompts):  # the whole clip the prompt's timbre was measured on
        timbre = standard(embedder.embed(through_decoder(pipe, prompt["wave"], args.seed), rate).mean(0))
        distances = [cosine_distance(timbre, p["timbre"]) for p in prompts]
        result["decoder_ceiling"].append({"prompt": prompt["name"], "distances": distances,
                                          "nearest_own": bool(int(np.argmin(distances)) == own)})
    result["summary"] = {}
    for scale in scales:
        given = [o for o in outputs if o["prompt"] is not None and o["prompt_scale"] == scale]
        result["summary"][f"{scale:g}"] = {"nearest_own": sum(o["nearest_own"] for o in given),
                                           "tempo_ok": sum(o["tempo_ok"] for o in given), "outputs": len(given),
                                           "own_distance": float(np.mean([o["distances"][names.index(o["prompt"])]
                                                                          for o in given]))}
    (args.out / "style.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    md = "\n".join([*(table(result, scale) for scale in scales), ceiling_table(result)])
    (args.out / "style.md").write_text(md, encoding="utf-8")
    print(md)
    return result


if __name__ == "__main__":
    main()
