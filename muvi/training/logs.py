"""What a recipe logs: window-mean losses across processes, the held-out loss, throughput."""
from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from muvi.training.checkpoints import step_generator

logger = logging.getLogger(__name__)

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
