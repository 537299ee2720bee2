"""Reading weight files and loading them strictly, with errors that say what is wrong."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: Keys under which training scripts commonly nest the state dict.
_WRAPPER_KEYS = ("model", "module", "state_dict", "generator", "model_state")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model it is loaded into."""


def read_state_dict(path: str | Path, *, wrapper_keys: Iterable[str] = _WRAPPER_KEYS) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or PyTorch (``.pth``/``.pt``/``.bin``) file into a flat state dict.

    PyTorch files are read with ``weights_only=True``. A dict nested under one of
    ``wrapper_keys`` (e.g. ``{"model": {...}}`` as the VideoMAE V2 release ships) is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({err})") from None
    for key in wrapper_keys:
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a mapping of parameter names to tensors")
    return dict(state)


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """``module.load_state_dict(state, strict=True)`` with one readable error for every mismatch.

    Missing keys, unexpected keys and shape mismatches are all listed together, so that a
    config that does not match its weights is diagnosed in one go.
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
                shown = ", ".join(items[:20]) + (f", … ({len(items) - 20} more)" if len(items) > 20 else "")
                lines.append(f"  {title} ({len(items)}): {shown}")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(state, strict=True)
    logger.debug("loaded %d tensors from %s into %s", len(state), source, type(module).__name__)
