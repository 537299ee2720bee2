"""Pieces every training recipe shares: config overrides, EMA, the optimiser and learning-rate
schedule, atomic checkpoints with exact resume, a NaN guard, window-mean and held-out losses,
throughput logging, the music data pipeline and random crops of the mel recipes (trained
components are saved with :mod:`muvi.hub`).

They are plain functions and small classes, not a framework: each recipe under ``recipes/``
is an explicit loop that calls them, of one shape: one micro-batch per iteration, each under
``accelerator.accumulate(*models)`` (gradients all-reduced on a step's last micro-batch only),
``backward``, clipping when ``accelerator.sync_gradients``, ``optimizer.step()`` / ``zero_grad``
(no-ops until then) and ``scheduler.step()`` at that sync point; then, once per step, the EMA,
a :class:`LossWindow` mean in the log, the :func:`heldout_loss` and the checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Type, TypeVar

import torch
from torch import nn

from muvi.config import Config, ConfigError, nested_configs
from muvi.errors import MuviError, one_line

logger = logging.getLogger(__name__)
C = TypeVar("C", bound=Config)


# ----------------------------------------------------------------------------- configs

def load_config(cls: Type[C], path: Optional[str | Path], overrides: Sequence[str] = ()) -> C:
    """A recipe config from a JSON file, then ``field=value`` overrides from the command line.

    Values are parsed as JSON when they can be (``steps=10``, ``sizes=[1,2]``, ``flag=true``)
    and taken as strings otherwise (``data=music/``). A dotted field sets one field of a nested
    config (``optim.lr=1e-4``), keeping the others.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8")) if path else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form field=value")
        *parents, name = key.split(".")
        target, kind = data, cls
        for parent in parents:
            nested = nested_configs(kind)
            if parent not in nested:
                raise ConfigError(f"override {item!r}: {kind.__name__} has no nested config {parent!r}; "
                                  f"nested configs are {sorted(nested)}")
            target, kind = target.setdefault(parent, {}), nested[parent]
            if not isinstance(target, dict):
                raise ConfigError(f"override {item!r}: {parent!r} is {target!r} in the config, not an object")
        names = {f.name for f in dataclasses.fields(kind)}
        if name not in names:
            raise ConfigError(f"override {item!r}: {kind.__name__} has no field {name!r}; "
                              f"fields are {sorted(names)}")
        try:
            target[name] = json.loads(value)
        except json.JSONDecodeError:
            target[name] = value
    return cls.from_dict(data, source=str(path) if path else "command line")


# ----------------------------------------------------------------------------- EMA

class EMA:
    """Exponential moving average of a model's parameters (buffers are copied as they are)."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_p, p in zip(self.shadow.parameters(), model.parameters()):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1.0 - self.decay)
        for ema_b, b in zip(self.shadow.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow.load_state_dict(state["shadow"])


# ----------------------------------------------------------------------------- optimiser

SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass
class OptimizerConfig(Config):
    """One AdamW and its learning-rate schedule; a recipe config holds one per optimiser."""

    lr: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0      # on parameters of ndim >= 2 only (param_groups)
    warmup_steps: int = 0          # linear warm-up over the first steps
    schedule: str = "constant"     # then "constant" or "cosine" (to 0 at the run's last step)
    lr_decay: float = 1.0          # times lr_decay every lr_decay_every steps (HiFi-GAN's decay)
    lr_decay_every: int = 1
    grad_clip: float = 0.0         # largest gradient norm; 0 disables

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; use one of {SCHEDULES}")
        if self.lr_decay_every < 1:
            raise ConfigError(f"lr_decay_every must be at least 1, got {self.lr_decay_every}")


def lr_factor(step: int, warmup_steps: int, total_steps: int = 0, schedule: str = "constant",
              lr_decay: float = 1.0, lr_decay_every: int = 1) -> float:
    """Linear warm-up to 1, then constant (the paper's AdamW at a fixed rate) or cosine to 0;
    times ``lr_decay ** (step // lr_decay_every)`` (1 by default) throughout."""
    decay = lr_decay ** (step // lr_decay_every)
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps * decay
    if schedule == "constant":
        return decay
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span))) * decay
    raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")


def param_groups(*modules: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """nanoGPT's two AdamW groups: ``weight_decay`` on matrices and kernels (ndim >= 2), none on
    1-D parameters (norm gains, biases, scalars such as a logit scale) or on embeddings
    (``nn.Embedding`` weights and what a module lists in a timm-style ``no_weight_decay()``).
    Decay pulls a parameter toward 0, which regularises a projection but only distorts a gain or
    a learned vector. Frozen parameters are left out; the order is the modules' own, so
    optimizer states line up across runs. Both groups are returned, even when one is empty."""
    decay, other, seen = [], [], set()
    for module in modules:
        exempt = _embedding_names(module)
        for name, p in module.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                (decay if p.ndim >= 2 and name not in exempt else other).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]


def _embedding_names(module: nn.Module) -> set[str]:
    names = set()
    for prefix, sub in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(sub, nn.Embedding):
            names.update(dot + n for n, _ in sub.named_parameters())
        if callable(getattr(sub, "no_weight_decay", None)):
            names.update(dot + n for n in sub.no_weight_decay())
    return names


def make_optimizer(cfg: OptimizerConfig, *modules: nn.Module) -> torch.optim.AdamW:
    """AdamW over the parameters of ``modules`` in the two groups of :func:`param_groups`."""
    return torch.optim.AdamW(param_groups(*modules, weight_decay=cfg.weight_decay), lr=cfg.lr,
                             betas=tuple(cfg.betas), eps=cfg.eps)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`lr_factor` of ``cfg`` per update: step it once per optimizer update (at a sync
    point of gradient accumulation) and checkpoint it; ``get_last_lr()`` is the coming update's."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, cfg.warmup_steps, total_steps, cfg.schedule, cfg.lr_decay, cfg.lr_decay_every))


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


def checkpoint_state(step: int, config: Config, sampler, consumed: int, **parts: Any) -> dict[str, Any]:
    """What a recipe checkpoints: the step, every part under its keyword (modules as
    :func:`unwrap_state`, anything else as its ``state_dict()``; None is left out), the sampler's
    position after ``consumed`` batches of its epoch, and the config. :func:`restore` reads it back.
    """
    state: dict[str, Any] = {"step": step}
    for key, part in parts.items():
        if part is not None:
            state[key] = unwrap_state(part) if isinstance(part, nn.Module) else part.state_dict()
    state.update(sampler=sampler.state_dict(consumed=consumed), config=config.to_dict())
    return state


def restore(state: dict[str, Any], **parts: Any) -> None:
    """Load every part (None: skipped) from the checkpoint entry of the same name."""
    for key, part in parts.items():
        if part is not None:
            part.load_state_dict(state[key])


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


# ----------------------------------------------------------------------------- logging

class LossWindow:
    """DiT's logged loss: each value's mean over every micro-batch since the last log line and
    over every process, rather than rank 0's last micro-batch (noise at small batches).

    ``add(values, weight)`` once per micro-batch (tensors stay on their device: no sync per
    step); ``mean(accelerator)`` all-reduces once, returns floats and starts a new window. Every
    process must add the same names; a name added with weight 0 only (nothing to average this
    window) is left out of the result.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.weights: dict[str, float] = {}

    def add(self, values: Mapping[str, Any], weight: float = 1.0) -> None:
        for key, value in values.items():
            value = value.detach().float() if torch.is_tensor(value) else float(value)
            self.sums[key] = self.sums.get(key, 0.0) + value * weight
            self.weights[key] = self.weights.get(key, 0.0) + weight

    def mean(self, accelerator=None) -> dict[str, float]:
        keys = sorted(self.sums)  # the same order on every process, whatever order they added in
        if not keys:
            return {}
        device = accelerator.device if accelerator is not None else "cpu"
        totals = torch.stack([torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float64, device=device),
                                           torch.tensor(self.weights[k], dtype=torch.float64, device=device)])
                              for k in keys])  # (keys, 2): sum, weight
        if accelerator is not None:
            totals = accelerator.reduce(totals, "sum")
        means = {k: s / w for k, (s, w) in zip(keys, totals.tolist()) if w > 0}
        order = list(self.sums)
        self.sums, self.weights = {}, {}
        return {k: means[k] for k in order if k in means}


@torch.no_grad()
def heldout_loss(loss_fn: Callable[[Any, torch.Generator], torch.Tensor], loader: Iterable,
                 models: Sequence[nn.Module], accelerator, seed: int) -> float:
    """nanoGPT's ``estimate_loss``: the mean of ``loss_fn(batch, generator)`` over one pass of a
    held-out loader, in eval mode (each model then back in the mode it was in).

    Comparable from one evaluation to the next: the loader must yield the same batches each
    pass (a sampler at a fixed epoch does) and batch i always draws from
    ``step_generator(seed, i, rank)``. Each process evaluates its own shard, the same number of
    batches; the result is the mean over all of them.
    """
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    window = LossWindow()
    try:
        for i, batch in enumerate(loader):
            gen = step_generator(seed, i, accelerator.process_index, accelerator.device)
            window.add({"heldout_loss": loss_fn(batch, gen)})
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return window.mean(accelerator)["heldout_loss"]


class Throughput:
    """Samples/s and tokens/s between two log lines, and a JSON-lines metrics file."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.start, self.samples, self.tokens = time.perf_counter(), 0, 0

    def add(self, samples: int, tokens: int) -> None:
        self.samples += samples
        self.tokens += tokens

    def log(self, step: int, **values: float) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        row = {"step": step, **{k: float(v) for k, v in values.items()},
               "samples_per_s": self.samples / elapsed, "tokens_per_s": self.tokens / elapsed}
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            logger.info("step %d  %s", step, "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step"))
        self.start, self.samples, self.tokens = time.perf_counter(), 0, 0
        return row

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (a held-out evaluation) does not count against the training rate."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began


def unwrap_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict on the CPU, without DDP/compile wrappers' prefixes."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    return {k: v.detach().cpu() for k, v in inner.state_dict().items()}


# ----------------------------------------------------------------------------- command line

def recipe_parser(description: str):
    """The command line every recipe shares:

    ``accelerate launch recipes/X.py --config C.json --run-dir DIR [--resume] [--set f=v ...]``
    """
    import argparse

    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="recipe config (JSON)")
    parser.add_argument("--run-dir", type=Path, required=True,
                        help="where checkpoints, metrics.jsonl and the final weights go")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in --run-dir")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="override single config fields")
    return parser


def make_accelerator(mixed_precision: str = "auto", grad_accum: int = 1, cpu: bool = False):
    """An Accelerator with bf16 on GPU and fp32 on CPU (bf16 matmul is ~200x slower on CPU)."""
    from accelerate import Accelerator

    # Without CUDA, cpu=True is what lets Accelerate see a torchrun / `accelerate launch
    # --multi_cpu` world (gloo) instead of N independent single processes.
    cpu = cpu or not torch.cuda.is_available()
    if mixed_precision == "auto":
        mixed_precision = "no" if cpu else "bf16"
    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, cpu=cpu)


def setup_logging(is_main: bool) -> None:
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


# ----------------------------------------------------------------------------- recipe helpers

def music_files(spec: str) -> str | list[str]:
    """A folder as it is, or the paths listed in a .txt file (relative to that file)."""
    path = Path(spec)
    if path.suffix == ".txt" and path.is_file():
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        return [str(path.parent / ln) for ln in lines if ln and not ln.startswith("#")]
    return spec


def music_data(music: str, sample_rate: int, min_seconds: float, max_seconds: float, batch_size: int, *,
               seed: int, num_workers: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False):
    """(MusicDataset, DurationBalancedBatchSampler, DataLoader) of random segments of the music
    files ``music`` names (:func:`music_files`); unreadable files are left out and listed."""
    from torch.utils.data import DataLoader

    from muvi.data.datasets import MusicDataset, collate_segments
    from muvi.data.sampler import DurationBalancedBatchSampler

    dataset = MusicDataset(music_files(music), sample_rate, min_seconds, max_seconds, seed, skip_unreadable=True)
    sampler = DurationBalancedBatchSampler(dataset.durations, batch_size, seed=seed, rank=rank,
                                           world_size=world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_segments,
                        num_workers=num_workers, pin_memory=pin_memory)
    return dataset, sampler, loader


def random_crop(mel: torch.Tensor, valid: torch.Tensor, frames: int, gen: torch.Generator,
                pad_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """mel (B, M, T) with valid frame counts (B,) → a random window (B, M, frames) per clip and its
    start frame (B,), drawn from ``gen``. Clips shorter than the window start at 0 and run into the
    batch padding; a batch shorter than the window is padded with ``pad_value`` (log-mel silence)."""
    if mel.shape[-1] < frames:
        mel = torch.nn.functional.pad(mel, (0, frames - mel.shape[-1]), value=pad_value)
    room = (valid - frames).clamp_min(0)
    u = torch.rand(valid.shape, generator=gen, device=gen.device).to(valid.device)
    start = (u * (room + 1)).long().clamp_max(room)
    index = start[:, None] + torch.arange(frames, device=mel.device)  # (B, frames)
    return mel.gather(2, index[:, None, :].expand(-1, mel.shape[1], -1)), start


def batch_stream(loader, sampler):
    """Endless (batches consumed this epoch, batch); moves to the next epoch when one ends."""
    consumed = sampler.state_dict()["batch"]
    while True:
        for batch in loader:
            consumed += 1
            yield consumed, batch
        sampler.set_epoch(sampler.epoch + 1)
        consumed = 0


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module):
    """Parameters stop requiring grad while the generator's loss runs through the discriminators."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def batch_names(batch: dict) -> str:
    return ", ".join(f"{Path(p).name}@{s:.1f}-{e:.1f}s"
                     for p, s, e in zip(batch["path"], batch["start"], batch["end"]))
