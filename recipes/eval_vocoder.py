"""Which vocoder, and which VAE decoder, should a release speak through? Each candidate in the
release's place, on real music and on the release's own generated music.

    python recipes/eval_vocoder.py --release checkpoints/muvi-demo --pairs CORPUS/validation.csv \\
        --vocoder tuned=runs/vocoder_ft/final --vae gan=runs/vae_gan/final --out runs/vocoders [--seconds 6]

``--vocoder NAME=FOLDER`` (repeatable) names a folder holding a ``vocoder`` component on the
release's mel, tried with the release's VAE; ``--vae NAME=FOLDER`` (repeatable) a folder holding
a ``vae`` whose encoder and latent statistics are the release's (a decoder fine-tune,
``train_vae.py`` with ``freeze_encoder``: the release's DiT makes the same latents for it), tried
with the release's vocoder. The release itself is always the first row. Per candidate, over the
soundtracks of the ``--pairs`` CSV (real music: recordings and renders; validation pairs to
choose, held-out pairs to report):

* ``mel_err_db`` and ``mel_buzz_db``: mean absolute log-mel error (dB) of the vocoder's
  resynthesis from the true mel of the first ``--seconds`` of each soundtrack (the vocoder
  alone), and that resynthesis's :func:`eval_sound.buzz_db` (median; the soundtracks' own is
  the first row, ``original``);
* ``vae_mel_err_db``: the same from the (candidate or release) VAE's reconstruction of that mel (posterior
  mean, decoded; a VAE with ``mel_noise`` then draws the mel around it as the pipeline does, noise
  seeded by the row): the path every generated mel takes;
* ``vae_buzz_db``: :func:`eval_sound.buzz_db` of that VAE → vocoder resynthesis (median): a
  frame-rate line that the VAE's mels make the vocoder draw shows here on real music;
* ``gen_buzz_db`` and ``gen_rms_dbfs``: the medians over the release's music for each video of
  the CSV (seed = row index, 25 steps, the release's guidance), the same latents decoded by each
  vocoder; each clip is written to ``OUT/NAME/VIDEO.wav``, a folder ``eval_sound.py --set``
  reads (Fréchet distance to real music, level, spectra).

Writes ``OUT/vocoders.json`` and ``OUT/vocoders.md`` and prints the table.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional

import numpy as np
import soundfile as sf
import torch

logger = logging.getLogger("eval_vocoder")


def _sibling(name: str):
    """The recipe ``name`` beside this file, as a module (recipes are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def log_mel_error_db(melspec, wave: torch.Tensor, mel: torch.Tensor) -> float:
    """Mean |log-mel(wave) − mel| in dB over the frames both have (natural-log mels)."""
    got = melspec(wave[None])[0]
    t = min(got.shape[-1], mel.shape[-1])
    return float((got[..., :t] - mel[..., :t]).abs().mean() * 20.0 / np.log(10.0))


def check_same_latents(release, candidate, what: str) -> None:
    """Refuse a VAE whose encoder or latent statistics differ from the release's: the release's
    DiT's latents would mean something else to its decoder. Whether it keeps a mel noise may differ."""
    ours, theirs = release.state_dict(), candidate.state_dict()
    keys = [k for k in ours if k.startswith("encoder.") or k in ("latent_mean", "latent_std")]
    same_shape = dataclasses.replace(candidate.config, mel_noise=release.config.mel_noise) == release.config
    if not same_shape or any(not torch.equal(ours[k], theirs[k]) for k in keys):
        raise SystemExit(f"{what}: its encoder or latent statistics are not the release's "
                         "(train it with freeze_encoder from the release)")


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", required=True)
    parser.add_argument("--pairs", type=Path, required=True, help="CSV of video,audio rows")
    parser.add_argument("--vocoder", action="append", default=[], metavar="NAME=FOLDER")
    parser.add_argument("--vae", action="append", default=[], metavar="NAME=FOLDER")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%X")
    sound = _sibling("eval_sound")

    def buzz_db(wave: np.ndarray) -> float:  # eval_sound reads 22.05 kHz
        if rate != sound.SAMPLE_RATE:
            import librosa

            wave = librosa.resample(wave, orig_sr=rate, target_sr=sound.SAMPLE_RATE)
        return sound.buzz_db(wave)

    from muvi import hub
    from muvi.data.audio_io import load_audio
    from muvi.models.v2m import noise
    from muvi.pipeline import MuviPipeline

    pipe = MuviPipeline.from_pretrained(args.release, device="cpu")
    rate, hop = pipe.mel.config.sample_rate, pipe.mel.config.hop_length
    paths = {"release": (pipe.vae, pipe.vocoder)}  # name -> (VAE, vocoder)
    for flag, specs in (("vocoder", args.vocoder), ("vae", args.vae)):
        for spec in specs:
            name, _, folder = spec.partition("=")
            if not folder:
                raise SystemExit(f"--{flag} {spec}: give NAME=FOLDER")
            if name in paths:
                raise SystemExit(f"--{flag} {spec}: the name {name!r} is taken")
            if hub.load_component(folder, "mel").config != pipe.mel.config:
                raise SystemExit(f"--{flag} {spec}: trained on another mel than the release's")
            part = hub.load_component(folder, flag, frozen=True)
            if flag == "vae":
                check_same_latents(pipe.vae, part, f"--vae {spec}")
            paths[name] = (part, pipe.vocoder) if flag == "vae" else (pipe.vae, part)
    with open(args.pairs, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and r[0] != "video"]

    results = {name: {"mel_err_db": [], "mel_buzz_db": [], "vae_mel_err_db": [], "vae_buzz_db": [],
                      "gen_buzz_db": [], "gen_rms_dbfs": []} for name in paths}
    original = []
    frames = int(args.seconds * rate) // hop
    with torch.inference_mode():
        for row, (_, audio) in enumerate(rows):
            wave = load_audio(args.pairs.parent / audio, rate)[: frames * hop]
            mel = pipe.mel(wave[None])
            original.append(buzz_db(wave.numpy()))
            # each vocoder's true-mel scores and each VAE's reconstruction once: paths share them
            true_mel, recon = {}, {}
            for name, (vae, vocoder) in paths.items():
                r = results[name]
                if id(vocoder) not in true_mel:
                    plain = vocoder(mel)[0]
                    true_mel[id(vocoder)] = (log_mel_error_db(pipe.mel, plain, mel[0]), buzz_db(plain.numpy()))
                err, buzz = true_mel[id(vocoder)]
                r["mel_err_db"].append(err)
                r["mel_buzz_db"].append(buzz)
                if id(vae) not in recon:
                    mean = vae.reconstruct(mel)
                    eps = noise(tuple(mean.shape), row)
                    recon[id(vae)] = vae.sample_mel(mean, eps, pipe.config.mel_noise_scale)
                resynth = vocoder(recon[id(vae)])[0]
                r["vae_mel_err_db"].append(log_mel_error_db(pipe.mel, resynth, mel[0]))
                r["vae_buzz_db"].append(buzz_db(resynth.numpy()))
        for i, (video, _) in enumerate(rows):
            for name, (vae, vocoder) in paths.items():  # the same seed: the same latents, decoded by each
                pipe.vae, pipe.vocoder = vae, vocoder
                wave = pipe.generate(str(args.pairs.parent / video), seed=i, num_steps=args.steps,
                                     progress=False).numpy()
                (args.out / name).mkdir(parents=True, exist_ok=True)
                sf.write(args.out / name / f"{Path(video).stem}.wav", wave, rate, subtype="FLOAT")
                results[name]["gen_buzz_db"].append(buzz_db(wave))
                results[name]["gen_rms_dbfs"].append(float(10 * np.log10(np.mean(wave.astype(np.float64) ** 2)
                                                                          + 1e-20)))
            logger.info("%s: %s", video, ", ".join(f"{n} buzz {r['gen_buzz_db'][-1]:.1f}" for n, r in results.items()))
    summary = {name: {**{k: float(np.mean(r[k])) for k in ("mel_err_db", "vae_mel_err_db")},
                      **{k: float(np.median(r[k])) for k in ("mel_buzz_db", "vae_buzz_db", "gen_buzz_db",
                                                             "gen_rms_dbfs")}}
               for name, r in results.items()}
    lines = ["| decoder path | mel_err_db (true mel) | mel_buzz_db | vae_mel_err_db | vae_buzz_db | gen_buzz_db "
             "| gen_rms_dbfs |", "|---|---|---|---|---|---|---|",
             f"| original | | {np.median(original):.1f} | | | | |"]
    lines += [f"| {n} | {s['mel_err_db']:.2f} | {s['mel_buzz_db']:.1f} | {s['vae_mel_err_db']:.2f} | "
              f"{s['vae_buzz_db']:.1f} | {s['gen_buzz_db']:.1f} | {s['gen_rms_dbfs']:.1f} |"
              for n, s in summary.items()]
    md = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"release": args.release, "pairs": str(args.pairs), "clips": len(rows), "summary": summary,
              "original_buzz_db": float(np.median(original)), "per_clip": results}
    (args.out / "vocoders.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (args.out / "vocoders.md").write_text(md, encoding="utf-8")
    print(md)
    return report


if __name__ == "__main__":
    main()
