"""Atomic checkpoints, exact resume (the newest one that loads), per-step random streams, the NaN guard."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from muvi.config import Config
from muvi.errors import MuviError, one_line
from muvi.training.sharding import full_state, shard_optimizer_state

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- guards

class NonFiniteLoss(FloatingPointError):
    """Raised before any update or checkpoint when a loss is NaN or infinite."""


def check_finite(loss: torch.Tensor, step: int, batch: str = "") -> None:
    if not torch.isfinite(loss).all():
        where = f" on batch {batch}" if batch else ""
        raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at step {step}{where}; stopping "
                            f"without saving; the last good checkpoint is kept")


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` as ``run_dir/checkpoints/step_XXXXXXXX/state.pt`` atomically.

    The file is written to a temporary name and renamed, then ``latest`` is replaced (also by
    rename), so a crash mid-write leaves the previous checkpoint intact and ``latest`` valid.
    Only the newest ``keep`` checkpoints are kept.
    """
    root = Path(run_dir) / "checkpoints"
    target = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / "state.pt")
    _fsync(tmp / "state.pt")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    pointer = root / ".latest.tmp"
    pointer.write_text(target.name + "\n", encoding="utf-8")
    os.replace(pointer, root / "latest")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


def checkpoint_state(step: int, config: Config, sampler, consumed: int, *, keep: bool = True,
                     **parts: Any) -> Optional[dict[str, Any]]:
    """What a recipe checkpoints: the step, every part under its keyword (modules as
    :func:`unwrap_state`, anything else as its ``state_dict()``; None is left out), the sampler's
    position after ``consumed`` batches of its epoch, and the config. :func:`restore` reads it back.

    Sharded parts (DTensors, :mod:`~muvi.training.sharding`) are gathered whole, so every
    process must call it; those with ``keep`` False (all but the main one) get None.
    """
    state: dict[str, Any] = {"step": step}
    for key, part in parts.items():
        if part is not None:
            state[key] = full_state((_unwrap(part) if isinstance(part, nn.Module) else part).state_dict(), keep)
    if not keep:
        return None
    state.update(sampler=sampler.state_dict(consumed=consumed), config=config.to_dict())
    return state


def restore(state: dict[str, Any], **parts: Any) -> None:
    """Load every part (None: skipped) from the checkpoint entry of the same name. A sharded
    model is loaded before it is sharded; an optimizer's whole states are cut to the shards of
    its parameters (:func:`~muvi.training.sharding.shard_optimizer_state`)."""
    for key, part in parts.items():
        if part is not None:
            entry = state[key]
            if isinstance(part, torch.optim.Optimizer):
                entry = shard_optimizer_state(part, entry)
            part.load_state_dict(entry)


class ResumeError(MuviError, RuntimeError):
    """``--resume`` found no checkpoint that loads."""


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The folder ``checkpoints/latest`` names, if it holds a ``state.pt`` (not read)."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    return path if (path / "state.pt").is_file() else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain Python only)."""
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)


def resume(run_dir: str | Path, *, required: bool = True) -> tuple[Optional[Path], Optional[dict[str, Any]]]:
    """The newest checkpoint of ``run_dir`` that loads, as ``(folder, state)``.

    ``latest`` is tried first, then every ``step_*`` folder from the newest down; one that is
    missing, truncated or otherwise unreadable is logged with its reason and skipped, so a crash
    that left a torn newest checkpoint resumes from the one before. With none that loads:
    :class:`ResumeError` (one line) when there were checkpoints or ``required``; otherwise
    ``(None, None)`` (a fresh start).
    """
    root = Path(run_dir) / "checkpoints"
    candidates: list[Path] = []
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8").strip()
        if (named / "state.pt").is_file():
            candidates.append(named)
        else:
            logger.warning("--resume: %s names %s, which holds no state.pt; looking for an older checkpoint",
                           pointer, named.name)
    steps = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True) if root.is_dir() else []
    candidates += [p for p in steps if p not in candidates]
    failures = []
    for folder in candidates:
        try:
            state = load_checkpoint(folder)
            if not isinstance(state, dict) or "step" not in state:
                raise ValueError("no training step recorded")
        except Exception as err:  # noqa: BLE001 (torn zip, missing file, unpickling): try the previous one
            reason = one_line(err)
            failures.append(f"{folder.name} ({reason})")
            logger.warning("--resume: %s does not load (%s); trying the previous checkpoint", folder, reason)
            continue
        if failures:
            logger.warning("--resume: resuming from %s (step %d): the newer %s did not load", folder.name,
                           state["step"], ", ".join(failures))
        return folder, state
    if failures:
        raise ResumeError(f"--resume: no checkpoint in {root} loads: {'; '.join(failures)}")
    if required:
        raise ResumeError(f"--resume: no checkpoint in {root}; run without --resume to start fresh")
    return None, None


@contextlib.contextmanager
def seeded(seed: int):
    """Random draws inside (a model's initial weights) depend on ``seed`` only, not on what was
    drawn before; the global CPU generator is put back afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def step_generator(seed: int, step: int, rank: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """The random stream of one training step on one process.

    Every random draw of a step (noise, flow times, dropout choices, context lengths) comes from
    a generator seeded by ``(seed, step, rank)``, so resuming at step k replays exactly what an
    uninterrupted run would have drawn, with no RNG state to save.
    """
    mixed = (seed * 1_000_003 + step) * 1_009 + rank
    return torch.Generator(device=device).manual_seed(mixed % (2**63 - 1))


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def unwrap_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict on the CPU, without DDP/compile wrappers' prefixes (sharded
    tensors gathered whole: collective)."""
    return full_state(_unwrap(model).state_dict())


def _unwrap(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)
    return getattr(inner, "_orig_mod", inner)
