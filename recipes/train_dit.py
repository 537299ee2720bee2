"""Train the DiT with rectified flow: unconditional pre-training or video-to-music.

    accelerate launch recipes/train_dit.py --config recipes/configs/dit_uncond_tiny.json --run-dir runs/dit_uncond
    accelerate launch recipes/train_dit.py --config recipes/configs/dit_v2m_tiny.json --run-dir runs/dit_v2m \
        --set init_dit=runs/dit_uncond/final init_adaptor=runs/contrastive/final

Both stages read a feature cache made by ``recipes/extract_features.py`` (VAE posteriors of
whole files, and VideoMAE tokens for videos); a latent is drawn from the stored posterior at
every step and normalised with the statistics of the VAE that made the cache (the release
normalises with the same buffers).

* ``stage="unconditional"`` (paper section 4.1, 160K steps): music only, the learnable null
  embedding in place of the condition.
* ``stage="v2m"`` (appendix B, 60K steps, batch 32, AdamW 5e-5): the visual adaptor (initialised
  from the contrastive pre-training) and the DiT (from the unconditional run) both learn; the
  condition is replaced by the null embedding with probability 0.2 (classifier-free guidance).

Both apply partial denoising with probability 0.8 (section 4.3): a clean prefix of the shorter
of 14 s and 33 % of the clip is context; it is not noised, gets the null condition, reports
time 1 and is left out of the loss.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

from muvi import hub
from muvi.config import Config
from muvi.data.features import CachedLatentDataset, collate_latents
from muvi.data.sampler import DurationBalancedBatchSampler
from muvi.models.adaptor import AdaptorConfig, VisualAdaptor
from muvi.models.dit import DiT, DiTConfig
from muvi.models.v2m import FlowObjective, VideoToMusicFlow
from muvi import training
from muvi.cli import run_script

logger = logging.getLogger("train_dit")
STAGES = ("unconditional", "v2m")


@dataclasses.dataclass
class DiTTrainConfig(Config):
    stage: str = "unconditional"
    cache: str = ""                 # feature cache folder (extract_features.py)
    dit: dict = dataclasses.field(default_factory=lambda: {"preset": "base"})
    adaptor: dict = dataclasses.field(default_factory=lambda: {"preset": "base"})
    init_dit: str = ""              # a final/ folder holding dit.safetensors (v2m: the unconditional run)
    init_adaptor: str = ""          # a final/ folder holding contrastive.safetensors or adaptor.safetensors
    min_seconds: float = 4.0
    max_seconds: float = 30.0
    latent_rate: float = 10.0
    icl_prob: float = 0.8
    icl_max_seconds: float = 14.0
    icl_max_fraction: float = 0.33
    cond_drop_prob: float = 0.2
    time_distribution: str = "uniform"
    steps: int = 60_000
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    schedule: str = "constant"
    grad_accum: int = 1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    log_every: int = 50
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    seed: int = 0
    mixed_precision: str = "auto"
    num_workers: int = 2

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")


def build_config(cls, spec: dict):
    """``{"preset": name, **overrides}`` or plain fields → a component config."""
    spec = dict(spec)
    preset = spec.pop("preset", None)
    return cls.preset(preset, **spec) if preset else cls.from_dict(spec)


def latent_stats(data: CachedLatentDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation of the VAE that made the cache: the pipeline applies the same one."""
    info = data.cache.info
    if "latent_mean" not in info or "latent_std" not in info:
        raise KeyError(f"{data.cache.root}: info.json has no latent statistics; re-extract the features")
    return torch.tensor(info["latent_mean"]), torch.tensor(info["latent_std"])


def draw_latents(batch: dict, stats: tuple[torch.Tensor, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """A latent drawn from each cached posterior, normalised as the release normalises, zero on
    padding: (B, T, C)."""
    mean, logvar, valid = batch["mean"], batch["logvar"], batch["valid"]
    x1 = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
    return (x1 - stats[0]) / stats[1] * valid[..., None]


def objective(cfg: DiTTrainConfig) -> FlowObjective:
    return FlowObjective(latent_rate=cfg.latent_rate, cond_drop_prob=cfg.cond_drop_prob, icl_prob=cfg.icl_prob,
                         icl_max_seconds=cfg.icl_max_seconds, icl_max_fraction=cfg.icl_max_fraction,
                         time_distribution=cfg.time_distribution)


def main(argv: Optional[list[str]] = None) -> Path:
    args = training.recipe_parser(__doc__).parse_args(argv)
    cfg = training.load_config(DiTTrainConfig, args.config, args.overrides)
    acc = training.make_accelerator(cfg.mixed_precision, cfg.grad_accum)
    training.setup_logging(acc.is_main_process)
    run_dir = args.run_dir
    rank = acc.process_index

    v2m = cfg.stage == "v2m"
    data = CachedLatentDataset(cfg.cache, min_seconds=cfg.min_seconds, max_seconds=cfg.max_seconds,
                               latent_rate=cfg.latent_rate, seed=cfg.seed, with_video=v2m)
    sampler = DurationBalancedBatchSampler(data.durations, cfg.batch_size, seed=cfg.seed, rank=rank,
                                           world_size=acc.num_processes,
                                           segment_seconds=(cfg.min_seconds, cfg.max_seconds),
                                           frame_rate=cfg.latent_rate)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=collate_latents, num_workers=cfg.num_workers)
    stats = latent_stats(data)

    torch.manual_seed(cfg.seed)  # the initial weights; every later draw uses step_generator
    dit_cfg = build_config(DiTConfig, cfg.dit)
    dit = DiT(dit_cfg)
    adaptor = None
    if v2m:
        adaptor = VisualAdaptor(build_config(AdaptorConfig, {**cfg.adaptor, "width": dit_cfg.cond_dim or dit_cfg.width}))
        if cfg.init_adaptor:
            hub.load_init(adaptor, cfg.init_adaptor, ("adaptor", "contrastive"), prefix="adaptor.")
    if cfg.init_dit:
        hub.load_init(dit, cfg.init_dit, ("dit",))
    model = VideoToMusicFlow(dit, adaptor, objective(cfg))
    optimizer = training.adamw(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: training.lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.schedule))
    ema = training.EMA(model, cfg.ema_decay)

    step = 0
    if args.resume:
        ckpt, state = training.resume(run_dir)
        training.restore(state, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, sampler=sampler)
        step = state["step"]
        logger.info("resumed from %s at step %d", ckpt, step)
    model, optimizer = acc.prepare(model, optimizer)
    ema.shadow.to(acc.device)
    meter = training.Throughput(run_dir, enabled=acc.is_main_process)
    logger.info("stage %s: DiT %.1fM parameters%s, %d cached files, %d processes", cfg.stage,
                dit.num_parameters() / 1e6,
                f", adaptor {sum(p.numel() for p in adaptor.parameters()) / 1e6:.1f}M" if adaptor else "",
                len(data), acc.num_processes)

    micro = step * cfg.grad_accum
    stream = training.batch_stream(loader, sampler)
    while step < cfg.steps:
        consumed, batch = next(stream)
        gen = training.step_generator(cfg.seed, micro, rank)
        micro += 1
        x1 = draw_latents(batch, stats, gen).to(acc.device)
        valid = batch["valid"].to(acc.device)
        tokens = {k: batch[k].to(acc.device) for k in ("tokens", "token_lengths")} if v2m else {}
        with acc.accumulate(model), acc.autocast():
            loss = model(x1, valid, gen, **tokens)
            training.check_finite(loss, step, ", ".join(batch["ids"]))
            acc.backward(loss)
            if acc.sync_gradients and cfg.grad_clip:
                acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if acc.sync_gradients:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        meter.add(len(batch["ids"]), int(valid.sum()))
        if not acc.sync_gradients:
            continue
        ema.update(acc.unwrap_model(model))
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            meter.log(step, loss=loss.item(), lr=scheduler.get_last_lr()[0])
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            if acc.is_main_process:
                training.save_checkpoint(run_dir, step, training.checkpoint_state(
                    step, cfg, sampler, consumed, model=model, ema=ema, optimizer=optimizer, scheduler=scheduler),
                    keep=cfg.keep_checkpoints)
            acc.wait_for_everyone()
    final = run_dir / "final"
    if acc.is_main_process:
        save_final(ema.shadow, final)
    acc.wait_for_everyone()
    return final


def save_final(model: VideoToMusicFlow, folder: Path) -> None:
    """EMA weights of each trained component: ``<name>.safetensors`` + ``<name>.json``."""
    for name, module in (("dit", model.dit), ("adaptor", model.adaptor)):
        if module is not None:
            hub.save_component(module, folder, name)
    logger.info("wrote EMA weights to %s", folder)


if __name__ == "__main__":
    run_script(main)
