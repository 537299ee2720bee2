"""How much of a recording's timbre survives a VAE? Each clip of a recording split through mel →
VAE (posterior mean, decoded) → the release's vocoder, its musicnn timbre compared with every
original clip's.

    python recipes/eval_decoder_timbre.py --release checkpoints/muvi-demo --recordings /tmp/music \\
        --split pairs --vae wide=runs/vae_wide/final [--vae ...] --out runs/timbre [--clip-seconds 10]

The clips are :func:`eval_style.candidates` (one ``--clip-seconds`` clip of every readable track of
``--split``, seeded), their timbre the mean musicnn embedding standardised by the pool's own mean
and spread, as in ``eval_style``. Rows: the release's vocoder on the true mel (what the vocoder
keeps), the release's VAE, then each ``--vae NAME=FOLDER`` (any ``vae`` on the release's mel: the
encoder may differ, since no DiT is involved; the mel draw is left out so that decoders compare
as decoders). Per row over the clips: ``own_distance`` (mean cosine distance of a copy to its own
original), ``top1`` (copies whose nearest original is their own), ``median_rank`` (originals
nearer than its own, median) and ``mel_l1`` (mean |log-mel error|, natural log). Choose on
``--split pairs`` (recordings the training pairs were cut from), report ``--split heldout``.
Writes ``OUT/timbre.json`` and ``OUT/timbre.md`` and prints the table.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from muvi.data.corpus import SPLITS

logger = logging.getLogger("eval_decoder_timbre")


@functools.cache
def _eval_style() -> dict:
    """The names of ``eval_style.py`` beside this file (recipes are scripts, not a package), run once."""
    import runpy

    return runpy.run_path(str(Path(__file__).with_name("eval_style.py")))


@torch.no_grad()
def copy_of(pipe, vae, wave: np.ndarray) -> tuple[np.ndarray, float]:
    """``wave`` through the release's mel, ``vae`` (posterior mean; None: the true mel) and the
    release's vocoder, at the clip's length; and the log-mel L1 of the VAE's reconstruction."""
    mel = pipe.mel(torch.from_numpy(wave).float()[None])
    l1 = 0.0
    if vae is not None:
        decoded = vae.decode(vae.encode(mel).mode())[..., :mel.shape[-1]]
        l1, mel = float((decoded - mel).abs().mean()), decoded
    return pipe.vocoder(mel)[0, :len(wave)].numpy(), l1


def score(copies: list[np.ndarray], originals: list[np.ndarray]) -> dict:
    """Row figures from the standardised timbres of the copies and of their originals (same order)."""
    cosine_distance = _eval_style()["cosine_distance"]
    own, ranks = [], []
    for i, timbre in enumerate(copies):
        d = np.array([cosine_distance(timbre, o) for o in originals])
        own.append(float(d[i]))
        ranks.append(int((d < d[i]).sum()))
    return {"own_distance": float(np.mean(own)), "top1": sum(r == 0 for r in ranks), "clips": len(copies),
            "median_rank": float(np.median(ranks)), "per_clip_distance": own, "ranks": ranks}


def evaluate(pipe, vaes: dict, pool: list[dict], embedder) -> dict:
    """``pool``: clips with ``wave`` and ``timbre`` (raw mean embedding); ``vaes``: row name → VAE
    (None: the true mel). Returns row name → figures."""
    rate = pipe.mel.config.sample_rate
    standard = _eval_style()["standardizer"](pool)
    originals = [standard(c["timbre"]) for c in pool]
    rows = {}
    for name, vae in vaes.items():
        copies, l1 = [], []
        for clip in pool:
            wave, err = copy_of(pipe, vae, clip["wave"])
            copies.append(standard(embedder.embed(wave, rate).mean(0)))
            l1.append(err)
        rows[name] = {**score(copies, originals), "mel_l1": float(np.mean(l1))}
        logger.info("%s: own distance %.3f, top-1 %d/%d", name, rows[name]["own_distance"], rows[name]["top1"],
                    len(pool))
    return rows


def table(rows: dict) -> str:
    lines = ["| decoder | own distance | top-1 | median rank | mel L1 |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        l1 = "" if name == "true mel" else f"{r['mel_l1']:.3f}"
        lines.append(f"| {name} | {r['own_distance']:.3f} | {r['top1']}/{r['clips']} | {r['median_rank']:g} | {l1} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", required=True)
    parser.add_argument("--recordings", type=Path, required=True, help="unpacked Debian music packages")
    parser.add_argument("--split", default="heldout", choices=SPLITS)
    parser.add_argument("--vae", action="append", default=[], metavar="NAME=FOLDER")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--clip-seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%X")
    from muvi import hub
    from muvi.encoders.musicnn import MusicnnEmbedder
    from muvi.pipeline import MuviPipeline

    pipe = MuviPipeline.from_pretrained(args.release, device="cpu")
    vaes = {"true mel": None, "release": pipe.vae}
    for spec in args.vae:
        name, sep, folder = spec.partition("=")
        if not sep or name in vaes:
            raise SystemExit(f"--vae {spec!r}: give NAME=FOLDER with a new name")
        vae = hub.load_component(folder, "vae", types=("vae",)).eval()
        if vae.config.mel_channels != pipe.mel.config.n_mels:
            raise SystemExit(f"--vae {spec!r}: it takes {vae.config.mel_channels} mel bins, the release's mel has "
                             f"{pipe.mel.config.n_mels}")
        vaes[name] = vae
    embedder = MusicnnEmbedder.from_package()
    pool = _eval_style()["candidates"](args.recordings, args.clip_seconds, pipe.mel.config.sample_rate,
                                              embedder, args.seed, args.split)
    rows = evaluate(pipe, vaes, pool, embedder)
    result = {"settings": {k: str(v) for k, v in vars(args).items()}, "clips": [c["name"] for c in pool],
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "timbre.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    md = table(rows)
    (args.out / "timbre.md").write_text(md, encoding="utf-8")
    print(md)
    return result


if __name__ == "__main__":
    main()
