"""Pieces every training recipe shares, as plain functions and small classes, not a framework:

- :mod:`~muvi.training.setup`: ``--config``/``--run-dir``/``--resume``/``--set`` (dotted keys set
  nested configs)/``--progress``, the Accelerator (bf16 on GPU, fp32 on CPU, the trackers of
  ``log_with``), logging;
- :mod:`~muvi.training.optim`: :class:`OptimizerConfig` (nested in every recipe config), AdamW in
  nanoGPT's two groups (no decay on 1-D parameters and embeddings), the LambdaLR schedule, EMA;
- :mod:`~muvi.training.checkpoints`: atomic checkpoints, exact resume from the newest one that
  loads, the per-step random stream (:func:`step_generator`), the NaN guard;
- :mod:`~muvi.training.logs`: :class:`LossWindow` (window means over micro-batches and
  processes), :func:`heldout_loss` (nanoGPT's ``estimate_loss``), :class:`RunLog` (every row to
  metrics.jsonl, the log, the Accelerate trackers and the progress bar; throughput; audio samples);
- :mod:`~muvi.training.sharding`: torch FSDP2 for a loop written for DDP (the EMA, checkpoints
  and ``final/`` of a sharded model);
- :mod:`~muvi.training.samples`: the fixed clip of the audio samples, Griffin-Lim, the WAV writer;
- :mod:`~muvi.training.data`: the music data, random crops and endless batch stream of the mel recipes.

Every recipe under ``recipes/`` is an explicit loop of one shape: one micro-batch per
iteration, each under ``accelerator.accumulate(*models)`` (gradients all-reduced on a step's
last micro-batch only), ``backward``, clipping when ``accelerator.sync_gradients``,
``optimizer.step()`` / ``zero_grad`` (no-ops until then) and ``scheduler.step()`` at that sync
point; then, once per step, the EMA, a :class:`LossWindow` mean in the :class:`RunLog`, the
:func:`heldout_loss`, the audio samples and the checkpoint; ``accelerator.end_training()`` last.
Trained components are saved with :mod:`muvi.hub`.
"""
from muvi.training import sharding
from muvi.training.checkpoints import (
                                       NonFiniteLoss,
                                       ResumeError,
                                       check_finite,
                                       checkpoint_state,
                                       latest_checkpoint,
                                       load_checkpoint,
                                       restore,
                                       resume,
                                       save_checkpoint,
                                       seeded,
                                       step_generator,
                                       unwrap_state,
)
from muvi.training.data import batch_names, batch_stream, frozen, music_data, music_files, random_crop
from muvi.training.logs import LossWindow, RunLog, flat_config, heldout_loss, trackers
from muvi.training.optim import EMA, SCHEDULES, OptimizerConfig, lr_factor, make_optimizer, make_scheduler, param_groups
from muvi.training.samples import check_folder_mel, griffin_lim, load_vocoder, mel_to_audio, music_clip, write_wav
from muvi.training.setup import load_config, make_accelerator, recipe_parser, setup_logging

__all__ = [
    "EMA", "SCHEDULES", "LossWindow", "NonFiniteLoss", "OptimizerConfig", "ResumeError", "RunLog",
    "batch_names", "batch_stream", "check_finite", "check_folder_mel", "checkpoint_state", "flat_config", "frozen",
    "griffin_lim", "heldout_loss", "latest_checkpoint", "load_checkpoint", "load_config", "load_vocoder", "lr_factor",
    "make_accelerator", "make_optimizer", "make_scheduler", "mel_to_audio", "music_clip", "music_data",
    "music_files", "param_groups", "random_crop", "recipe_parser", "restore", "resume", "save_checkpoint",
    "seeded", "setup_logging", "sharding", "step_generator", "trackers", "unwrap_state", "write_wav",
]
