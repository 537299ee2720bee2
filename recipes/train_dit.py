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
from torch import nn
from torch.utils.data import DataLoader

from muvi import flow, hub
from muvi.config import Config
from muvi.data.features import CachedLatentDataset, collate_latents
from muvi.data.sampler import DurationBalancedBatchSampler
from muvi.models.adaptor import AdaptorConfig, VisualAdaptor, resample_time
from muvi.models.dit import DiT, DiTConfig
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


class FlowModel(nn.Module):
    """The trainable network of a stage: the DiT, plus the adaptor for video-to-music.

    ``forward`` returns the predicted velocity; wrapping both in one module lets DDP see them.
    """

    def __init__(self, dit: DiT, adaptor: Optional[VisualAdaptor]):
        super().__init__()
        self.dit, self.adaptor = dit, adaptor

    def condition(self, tokens: torch.Tensor, token_lengths: torch.Tensor, lengths: torch.Tensor,
                  frames: int) -> torch.Tensor:
        """Per-item adaptor output resampled to its own latent length, zero-padded to ``frames``."""
        pooled = self.adaptor.aggregate(tokens)  # (B, N, D)
        out = pooled.new_zeros(pooled.shape[0], frames, pooled.shape[-1])
        for b in range(pooled.shape[0]):
            n, t = int(token_lengths[b]), int(lengths[b])
            out[b, :t] = resample_time(pooled[b:b + 1, :n], t)[0]
        return out

    def forward(self, x_t, t_frames, valid, use_null, tokens=None, token_lengths=None, lengths=None):
        b, n, _ = x_t.shape
        null = self.dit.null_condition(b, n)
        if self.adaptor is None:
            cond = null
        else:
            cond = torch.where(use_null[..., None], null, self.condition(tokens, token_lengths, lengths, n))
        return self.dit(x_t, t_frames, cond, valid)


def latent_stats(data: CachedLatentDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation of the VAE that made the cache: the pipeline applies the same one."""
    info = data.cache.info
    if "latent_mean" not in info or "latent_std" not in info:
        raise KeyError(f"{data.cache.root}: info.json has no latent statistics; re-extract the features")
    return torch.tensor(info["latent_mean"]), torch.tensor(info["latent_std"])


def make_batch(batch: dict, cfg: DiTTrainConfig, stats, gen: torch.Generator, device) -> dict:
    """Draw latents, context prefixes, times, noise and condition drops for one micro-batch."""
    mean, logvar, valid = batch["mean"], batch["logvar"], batch["valid"]
    lengths = batch["lengths"]
    b, n, _ = mean.shape
    x1 = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
    x1 = (x1 - stats[0]) / stats[1]
    x1 = x1 * valid[..., None]
    use_icl = torch.rand(b, generator=gen) < cfg.icl_prob
    prefix = torch.tensor([flow.prefix_frames(int(length), cfg.latent_rate, max_seconds=cfg.icl_max_seconds,
                                              max_fraction=cfg.icl_max_fraction) if icl else 0
                           for length, icl in zip(lengths, use_icl)])
    context = flow.context_mask(prefix, n)
    t = flow.sample_time(b, generator=gen, distribution=cfg.time_distribution)
    x_t, t_frames, v_target = flow.training_pair(x1, t, context=context, generator=gen)
    drop = torch.rand(b, generator=gen) < (cfg.cond_drop_prob if cfg.stage == "v2m" else 1.0)
    use_null = drop[:, None] | context  # the context needs no condition (section 4.3)
    out = {"x_t": x_t, "t_frames": t_frames, "v_target": v_target, "valid": valid, "context": context,
           "use_null": use_null, "lengths": lengths}
    if cfg.stage == "v2m":
        out.update(tokens=batch["tokens"], token_lengths=batch["token_lengths"])
    return {k: v.to(device) for k, v in out.items()}


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
    model = FlowModel(dit, adaptor)
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
        inputs = make_batch(batch, cfg, stats, gen, acc.device)
        with acc.accumulate(model), acc.autocast():
            v_pred = model(inputs["x_t"], inputs["t_frames"], inputs["valid"], inputs["use_null"],
                           inputs.get("tokens"), inputs.get("token_lengths"), inputs["lengths"])
            loss = flow.flow_loss(v_pred, inputs["v_target"], inputs["context"], inputs["valid"])
            training.check_finite(loss, step, ", ".join(batch["ids"]))
            acc.backward(loss)
            if acc.sync_gradients and cfg.grad_clip:
                acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if acc.sync_gradients:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        meter.add(len(batch["ids"]), int(inputs["valid"].sum()))
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


def save_final(model: FlowModel, folder: Path) -> None:
    """EMA weights of each trained component: ``<name>.safetensors`` + ``<name>.json``."""
    for name, module in (("dit", model.dit), ("adaptor", model.adaptor)):
        if module is not None:
            hub.save_component(module, folder, name)
    logger.info("wrote EMA weights to %s", folder)


if __name__ == "__main__":
    run_script(main)
