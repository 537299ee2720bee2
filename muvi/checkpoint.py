"""Reading and writing weight files, and loading them strictly, with errors that say what is wrong.

muvi's own safetensors files carry the config their weights were trained with in their
metadata (``muvi.config``, JSON). :func:`load_weights` compares it with the config the module
was built from (a release's ``config.json``, a recipe's ``<name>.json``), so an edited config
whose change the shapes do not reveal (``num_heads``, ``rope_base``, ``norm_eps``) is refused
instead of silently making different music. Files without that metadata (published
checkpoints, older releases) load as before.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

from muvi.errors import MissingFileError, MuviError

logger = logging.getLogger(__name__)

#: the safetensors metadata key holding a component's config as JSON
CONFIG_METADATA_KEY = "muvi.config"

#: Keys under which training scripts commonly nest the state dict.
_WRAPPER_KEYS = ("model", "module", "state_dict", "generator", "model_state")


class CheckpointError(MuviError, ValueError):
    """A checkpoint that does not fit the model it is loaded into."""


def read_state_dict(path: str | Path, *, wrapper_keys: Iterable[str] = _WRAPPER_KEYS) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or PyTorch (``.pth``/``.pt``/``.bin``) file into a flat state dict.

    PyTorch files are read with ``weights_only=True``. A dict nested under one of
    ``wrapper_keys`` (e.g. ``{"model": {...}}`` as the VideoMAE V2 release ships) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if "TorchScript" in str(err):  # e.g. OpenAI's CLIP .pt files; loading them could run their code
            raise CheckpointError(f"{path}: a TorchScript archive, which is not read; if you trust it, save its "
                                  f"weights once: torch.save(torch.jit.load(PATH, map_location='cpu')"
                                  f".state_dict(), NEW_PATH)") from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from None
    for key in wrapper_keys:
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors")
    return dict(state)


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint",
                assign: bool = False) -> None:
    """``module.load_state_dict(state, strict=True)`` with one readable error for every mismatch.

    Missing keys, unexpected keys and shape mismatches are all listed together, so that a
    config that does not match its weights is diagnosed in one go. ``assign``: the module takes
    the given tensors themselves instead of copies (each cast to its parameter's dtype first
    where they differ). With the lazily mapped tensors of :func:`read_state_dict`'s safetensors
    files this loads without copying, and weights a run never touches (a VAE encoder during
    generation) are never read into memory.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        lines = [f"{source} does not match {type(module).__name__}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", shapes)):
            if items:
                lines.append(f"  {title} ({len(items)}): {', '.join(items)}")
        raise CheckpointError("\n".join(lines))
    if assign:
        state = {k: v if v.dtype == own[k].dtype else v.to(own[k].dtype) for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=assign)
    logger.debug("loaded %d tensors from %s into %s", len(state), source, type(module).__name__)


def save_weights(module: nn.Module, path: str | Path, config: Optional[Mapping[str, Any]] = None, *,
                 dtype: Optional[torch.dtype] = None) -> Path:
    """``module``'s state as safetensors at ``path``, with ``config`` (default: the module's
    own ``config.to_dict()``, when it has one) in the metadata for :func:`load_weights`.
    ``dtype``: store floating tensors in it (e.g. ``torch.float16`` to halve a release); they
    load back into the module's own dtype (:func:`load_strict`)."""
    from safetensors.torch import save_file

    path = Path(path)
    if config is None and hasattr(getattr(module, "config", None), "to_dict"):
        config = module.config.to_dict()
    metadata = {"format": "pt"}
    if config is not None:
        metadata[CONFIG_METADATA_KEY] = json.dumps(config, sort_keys=True)
    # Written beside and renamed over: a model loaded from ``path`` maps that file lazily
    # (load_strict's assign), and truncating it in place would pull the weights from under it.
    partial = path.with_name(path.name + ".partial")
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(partial), metadata=metadata)
    os.replace(partial, path)
    return path


def stored_config(path: str | Path) -> Optional[dict[str, Any]]:
    """The config in a safetensors file's metadata, or None (no metadata, or not safetensors)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(CONFIG_METADATA_KEY)
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: its {CONFIG_METADATA_KEY} metadata is not JSON ({err})") from None


def check_config(path: str | Path, config: Mapping[str, Any], *, source: str = "the config") -> None:
    """Raise :class:`CheckpointError` when ``config`` differs from the one stored in ``path``.

    Fields the stored config lacks (added to the class later, at their defaults) are not
    compared; every other difference is listed."""
    stored = stored_config(path)
    if stored is None:
        return
    ours = json.loads(json.dumps(dict(config)))  # tuples → lists, as stored
    missing = object()
    diffs = [f"{key} = {ours.get(key, '(absent)')!r} but the weights were saved with {stored[key]!r}"
             for key in sorted(stored) if ours.get(key, missing) != stored[key]]
    if diffs:
        raise CheckpointError(f"{path}: {source} does not match the config these weights were saved with: "
                              + "; ".join(diffs) + " (undo the edit, or retrain)")


def load_weights(module: nn.Module, path: str | Path, *, source: str = "the config",
                 assign: bool = False) -> nn.Module:
    """Read ``path``, check the module's config against the stored one (:func:`check_config`)
    and load strictly (:func:`load_strict`, ``assign`` as there). Returns ``module``."""
    path = Path(path)
    state = read_state_dict(path)
    if hasattr(getattr(module, "config", None), "to_dict"):
        check_config(path, module.config.to_dict(), source=source)
    load_strict(module, state, source=str(path), assign=assign)
    return module


def state_hash(module_or_state: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a set of weights (sorted names, shapes, dtypes and bytes): tells two sets
    apart, e.g. so that a feature cache never mixes two encoders' features, and names the
    weights an evaluation report was made with."""
    import hashlib

    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    digest = hashlib.sha256()
    for key, value in sorted(state.items()):
        value = value.detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(value.shape)}:{value.dtype};".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: str | Path, expected: str) -> str:
    """The file's SHA-256 when it equals ``expected`` (any case); a ValueError naming the file
    otherwise. Returns the hash."""
    actual = sha256_file(path)
    if actual.lower() != expected.strip().lower():
        raise ValueError(f"{path}: SHA-256 {actual} does not match the expected {expected.strip().lower()}")
    return actual
