"""What a recipe logs: window-mean losses across processes, the held-out loss, and the run's
log (:class:`RunLog`: metrics.jsonl, the trackers, a progress bar, audio samples, throughput)."""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from muvi.config import Config, ConfigError
from muvi.training.checkpoints import step_generator

logger = logging.getLogger(__name__)

#: the trackers a recipe's ``log_with`` may list (besides "auto" and "none": :func:`trackers`)
TRACKERS = ("tensorboard", "wandb")


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


# ----------------------------------------------------------------------------- trackers

def trackers(log_with: str) -> list[str]:
    """The Accelerate trackers a recipe's ``log_with`` names: "auto" is TensorBoard when the
    ``tensorboard`` package (or ``tensorboardX``) is importable and none otherwise, "none" is
    none, and otherwise a comma-separated list of :data:`TRACKERS`, each of which must be
    installed (a one-line :class:`ConfigError` if not)."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    names = [n.strip() for n in str(log_with).split(",") if n.strip()]
    if names in (["auto"], []):
        return ["tensorboard"] if is_tensorboard_available() else []
    if names == ["none"]:
        return []
    unknown = sorted(set(names) - set(TRACKERS))
    if unknown:
        raise ConfigError(f"log_with {log_with!r}: unknown tracker(s) {unknown}; use 'auto', 'none' or "
                          f"a comma-separated list of {list(TRACKERS)}")
    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    missing = [n for n in names if not available[n]()]
    if missing:
        raise ConfigError(f"log_with {log_with!r}: {', '.join(missing)} is not installed "
                          f"(pip install {' '.join(missing)}), or set log_with=none")
    return list(dict.fromkeys(names))


def flat_config(config: Config | Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """A recipe config as the trackers' hyper-parameters: nested configs and dicts as dotted
    keys (``optim.lr``), lists and None as their JSON text (TensorBoard takes scalars and strings only)."""
    data = config.to_dict() if isinstance(config, Config) else config
    out: dict[str, bool | int | float | str] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            out.update(flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            out[prefix + key] = value
        else:
            out[prefix + key] = json.dumps(value)
    return out


# ----------------------------------------------------------------------------- the run's log

class RunLog:
    """Where every row a recipe logs goes, on the main process: ``metrics.jsonl`` in the run
    folder, the log, the Accelerate trackers of ``accelerator`` (TensorBoard, W&B) and the
    progress bar; with samples/s and tokens/s since the previous row added to each row.

    ``with RunLog(accelerator, run_dir, config, name, step=s, total=n) as log:`` starts the
    trackers with the flat config (:func:`flat_config`) and a bar over the steps from ``s`` (a
    resumed run's) to ``n``; then per micro-batch ``add(samples, tokens)``, per step
    ``advance()``, ``row(step, **values)`` for a log row and ``audio(step, name, wave, rate)`` for a
    sample. The bar shows steps/s, the ETA and the ``show`` values of the latest row (window
    means: the bar forces no device sync per step). ``progress``: None shows it when stderr is
    a terminal, True or False always or never; never on other processes. Log lines go around
    the bar (tqdm's logging redirect) while it is shown. On a resumed run TensorBoard drops what
    an earlier run logged after step ``s`` (``purge_step``), as the resumed run logs it again.
    The trackers are closed by ``accelerator.end_training()`` at the end of the recipe.
    """

    def __init__(self, accelerator, run_dir: str | Path, config: Optional[Config] = None, name: str = "train", *,
                 step: int = 0, total: Optional[int] = None, show: Sequence[str] = ("loss", "heldout_loss"),
                 progress: Optional[bool] = None):
        self.accelerator, self.run_dir, self.name = accelerator, Path(run_dir), name
        self.enabled = accelerator is None or accelerator.is_main_process
        self.path = self.run_dir / "metrics.jsonl"
        self.show, self.shown = tuple(show), {}
        self.start, self.samples, self.tokens = time.perf_counter(), 0, 0
        self._exit = contextlib.ExitStack()
        if accelerator is not None and accelerator.log_with:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            accelerator.init_trackers("muvi", config=flat_config(config) if config is not None else None,
                                      init_kwargs={"tensorboard": {"purge_step": step + 1} if step else {},
                                                   "wandb": {"name": self.run_dir.name, "group": name,
                                                             "dir": str(self.run_dir)}})
        if progress is None:
            progress = sys.stderr.isatty()
        self.bar = None
        if self.enabled and progress:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, initial=step, desc=name, unit="step", dynamic_ncols=True)
            self._exit.enter_context(logging_redirect_tqdm())

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._exit.close()

    def add(self, samples: int, tokens: int) -> None:
        self.samples += samples
        self.tokens += tokens

    def advance(self, steps: int = 1) -> None:
        """A step is done: the bar moves on."""
        if self.bar is not None:
            self.bar.update(steps)

    def step_done(self, step: int, window: "LossWindow", *, every: int, last: int, lr: float,
                  heldout: Optional[Callable[[], float]] = None, eval_every: int = 0) -> Optional[dict]:
        """What every recipe does after an optimizer step: the bar moves on; every
        ``eval_every`` steps ``heldout()`` (the held-out loss, timed apart from training); a row
        of ``window``'s means every ``every`` steps, at the ``last`` one, and with each held-out
        loss. Returns the row, or None when none was logged."""
        self.advance()
        extra = {}
        if heldout is not None and eval_every and step % eval_every == 0:
            with self.paused():
                extra["heldout_loss"] = heldout()
        if step % every == 0 or step == last or extra:
            return self.row(step, **window.mean(self.accelerator), **extra, lr=lr)
        return None

    def row(self, step: int, **values: float) -> dict:
        """One row: the values, samples/s and tokens/s since the last row; returned on every process."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        row = {"step": step, **{k: float(v) for k, v in values.items()},
               "samples_per_s": self.samples / elapsed, "tokens_per_s": self.tokens / elapsed}
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            logger.info("step %d  %s", step, "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "step"))
            if self.accelerator is not None:
                self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
            if self.bar is not None:
                self.shown.update({k: f"{row[k]:.4g}" for k in self.show if k in row})
                self.bar.set_postfix(self.shown)
        self.start, self.samples, self.tokens = time.perf_counter(), 0, 0
        return row

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (a held-out evaluation, samples) does not count against the training rate."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began

    def sample_path(self, step: Optional[int], name: str, suffix: str = ".wav") -> Path:
        """``RUN/samples/step_XXXXXXXX_<name><suffix>``, or ``RUN/samples/<name><suffix>`` for no step."""
        return self.run_dir / "samples" / (f"step_{step:08d}_{name}{suffix}" if step is not None else name + suffix)

    def audio(self, step: Optional[int], name: str, waveform: torch.Tensor, sample_rate: int) -> Optional[Path]:
        """:meth:`sample_path` as mono 16-bit PCM (clipped to [-1, 1]), and the same audio to
        the trackers that take audio (TensorBoard, W&B) as ``samples/<name>``. Main process only."""
        if not self.enabled:
            return None
        from muvi.training.samples import write_wav

        wave = waveform.detach().float().cpu().reshape(-1).clamp(-1.0, 1.0)
        path = write_wav(self.sample_path(step, name), wave, sample_rate)
        for tracker in self.accelerator.trackers if self.accelerator is not None else ():
            if tracker.name == "tensorboard":
                tracker.tracker.add_audio(f"samples/{name}", wave[None], global_step=step or 0,
                                          sample_rate=sample_rate)
                tracker.tracker.flush()
            elif tracker.name == "wandb":
                import wandb

                tracker.log({f"samples/{name}": wandb.Audio(wave.numpy(), sample_rate=sample_rate)}, step=step)
        logger.info("wrote %s", path)
        return path
