"""Give a trained VAE the spread of its mels, so that it decodes a draw of the mel, not its mean.

    python recipes/fit_mel_noise.py --vae runs/vae/final --music runs/vae_train.txt --out runs/vae_noise

Reads the ``vae`` and ``mel`` components of ``--vae`` (a VAE run's ``final/`` or a release), and
``--music`` (a folder or a .txt list, one path per line: the VAE's TRAINING music, never the
clips a choice is made on), reconstructs the first ``--seconds`` of each file and writes to
``--out`` the same VAE with ``mel_noise`` on, ``mel_noise_std`` and ``mel_noise_corr`` set to the
per-bin standard deviation and frame-to-frame correlation of ``mel − reconstruction``
(:func:`muvi.models.vae.estimate_mel_noise`), beside the same ``mel``. Weights and latent
statistics are copied bit for bit (the DiT's latents stay valid), so ``export.py --vae OUT`` (or
replacing a release's ``vae`` files) is all that changes a release: its pipeline then decodes
``mel + mel_noise_scale · std · ε``, ε an AR(1) process per bin with that correlation
(``PipelineConfig.mel_noise_scale``, default 0.5). Why: a HiFi-GAN draws noise-like sound from the
frame-to-frame fluctuation of a real mel; a decoder's mean mel lacks it, and the vocoder then
repeats itself once per mel frame (the 86 Hz line ``eval_sound.buzz_db`` measures).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from muvi import hub
from muvi.cli import run_script
from muvi.config import ConfigError
from muvi.data.audio_io import AUDIO_EXTENSIONS, load_audio
from muvi.data.datasets import scan_files
from muvi.models.vae import estimate_mel_noise, with_mel_noise
from muvi.training import setup_logging
from muvi.training.data import music_files

logger = logging.getLogger("fit_mel_noise")


def main(argv: Optional[Sequence[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vae", type=Path, required=True, help="a folder with `vae` and `mel` components")
    parser.add_argument("--music", required=True, help="the VAE's training music: a folder or a .txt list")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=6.0, help="read from the start of each file")
    args = parser.parse_args(argv)
    setup_logging(True)
    if args.out.exists():
        raise ConfigError(f"--out {args.out} exists; give a new folder")
    files = music_files(args.music)
    if isinstance(files, str):
        try:
            files = scan_files(Path(files), AUDIO_EXTENSIONS)
        except FileNotFoundError:
            files = []
    if not files:
        raise ConfigError(f"--music {args.music}: no audio files")
    vae = hub.load_component(args.vae, "vae", frozen=True)
    melspec = hub.load_component(args.vae, "mel")
    cfg = melspec.config
    noisy = with_mel_noise(vae)

    def mels():
        for path in tqdm(files, desc="music", unit="file"):
            wave = load_audio(path, cfg.sample_rate, duration=args.seconds)
            if wave.numel() >= cfg.n_fft:
                yield melspec(wave[None])

    with torch.inference_mode():
        std, corr = estimate_mel_noise(vae, mels())
    noisy.set_mel_noise(std, corr)
    hub.save_component(noisy, args.out, "vae")
    hub.save_component(melspec, args.out, "mel")
    logger.info("mel noise over %d files: std %.3f-%.3f (median %.3f), lag-1 correlation %.3f-%.3f; wrote %s",
                len(files), std.min(), std.max(), std.median(), corr.min(), corr.max(), args.out)
    return args.out


if __name__ == "__main__":
    run_script(main)
