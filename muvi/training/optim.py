"""AdamW in two decay groups, its learning-rate schedule, and the EMA of the weights."""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from typing import Any

import torch
from torch import nn

from muvi.config import Config, ConfigError
from muvi.training.sharding import local

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- EMA

class EMA:
    """Exponential moving average of a model's parameters (buffers are copied as they are).

    A sharded model (:mod:`~muvi.training.sharding`) needs a shadow sharded the same way
    (shard ``shadow`` as the model after making the EMA): the update then averages each
    process's local shards."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema_p, p in zip(self.shadow.parameters(), model.parameters()):
            local(ema_p).lerp_(local(p).detach().to(ema_p.dtype), 1.0 - self.decay)
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
