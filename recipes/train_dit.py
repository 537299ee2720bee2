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
time 1 and is left out of the loss. All of that is :class:`muvi.models.v2m.VideoToMusicFlow`, the
object the release samples from (``objective`` in the config); this script is the loop around it,
of the shape every recipe has (``muvi.training``): ``optim`` (AdamW, no decay on 1-D parameters and
the null embedding), the logged loss a window mean over micro-batches and processes, and with
``heldout`` (a feature cache of held-out files) and ``eval_every`` a periodic held-out loss.

Every ``sample_every`` steps the EMA model samples ``sample_seconds`` of music (``sample_steps``
Euler steps; v2m: for the video of the first held-out file, else of the first training file,
with guidance ``sample_cfg_scale``), written to ``RUN/samples/step_XXXXXXXX_dit.wav`` once
decoded by ``sample_vae`` (the VAE that made the cache: checked against the cache's hash) and
``sample_vocoder`` (Griffin-Lim without one); ``samples/reference.wav`` is that file's own
cached latent through the same decoder. Without ``sample_vae`` the sampled latent is saved as
``step_XXXXXXXX_dit.pt`` (normalised, (T, C)) instead.

With ``shard="fsdp"`` and more than one process (``accelerate launch --multi_gpu --num_processes N
... --set shard=fsdp``) the model is not wrapped in DDP: each DiT block, the adaptor and then the
rest are sharded with torch FSDP2 (``muvi.training.sharding``), and so is the EMA. Checkpoints and
``final/`` hold whole tensors as in an unsharded run, and a resume is exact.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from muvi import hub, training
from muvi.checkpoint import state_hash
from muvi.cli import run_script
from muvi.config import Config, ConfigError
from muvi.data.features import CachedLatentDataset, collate_latents
from muvi.data.sampler import DurationBalancedBatchSampler
from muvi.models.adaptor import AdaptorConfig, VisualAdaptor
from muvi.models.dit import DiT, DiTConfig
from muvi.models.mel import MelConfig, MelSpectrogram
from muvi.models.v2m import FlowObjective, VideoToMusicFlow
from muvi.training import OptimizerConfig

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
    # in-context prefix, condition dropout, time distribution, latent rate (muvi.models.v2m)
    objective: FlowObjective = dataclasses.field(default_factory=FlowObjective)
    steps: int = 60_000
    batch_size: int = 32
    grad_accum: int = 1
    # appendix B: AdamW 5e-5 (weight decay on matrices only, muvi.training.param_groups)
    optim: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(
        lr=5e-5, weight_decay=0.01, warmup_steps=1000, grad_clip=1.0))
    ema_decay: float = 0.999
    # held-out loss: a feature cache of held-out music (or pairs), every eval_every steps
    heldout: str = ""
    eval_every: int = 0
    # audio samples (the module docstring), every sample_every steps; 0: none
    sample_every: int = 0
    sample_seconds: float = 4.0
    sample_steps: int = 25
    sample_cfg_scale: float = 4.0
    sample_vae: str = ""            # a folder with the component vae (train_vae.py's final/)
    sample_vocoder: str = ""        # a folder with the component vocoder (train_vocoder.py's final/)
    log_every: int = 50
    # Accelerate trackers: "auto" (TensorBoard when installed), "none", "tensorboard", "wandb"
    log_with: str = "auto"
    ckpt_every: int = 1000
    keep_checkpoints: int = 2
    seed: int = 0
    mixed_precision: str = "auto"
    num_workers: int = 2
    # "fsdp": with more than one process, each holds a shard of the weights, gradients, AdamW
    # moments and EMA (torch FSDP2, muvi.training.sharding); "none": DDP, every process all of it
    shard: str = "none"

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.shard not in training.sharding.SHARDS:
            raise ValueError(f"shard must be one of {training.sharding.SHARDS}, got {self.shard!r}")


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
    x1 = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen, device=gen.device).to(mean.device)
    return (x1 - stats[0]) / stats[1] * valid[..., None]


class Samples:
    """What the samples are of and how they are decoded: the first ``sample_seconds`` of the
    first file of ``heldout`` (else of ``cache``), its normalised cached latent (1, T, C) and,
    for v2m, its video tokens; ``sample_vae`` + ``sample_vocoder`` (or Griffin-Lim) as decoder."""

    def __init__(self, cfg: DiTTrainConfig, stats: tuple[torch.Tensor, torch.Tensor], v2m: bool):
        self.cfg, self.stats, self.v2m = cfg, stats, v2m
        data = CachedLatentDataset(cfg.heldout or cfg.cache, min_seconds=cfg.min_seconds, max_seconds=cfg.max_seconds,
                                   latent_rate=cfg.objective.latent_rate, with_video=v2m)
        frames = min(round(cfg.sample_seconds * data.latent_rate), data.frames[0])
        spans = {"mean": (0, frames)}
        if v2m:
            spans["tokens"] = (0, -(-frames // data.frames_per_token))
            if "cls" in data.cache.meta(data.ids[0])["shapes"]:  # a CLIP encoder's class tokens
                spans["cls"] = spans["tokens"]
        item = data.cache.load_slice(data.ids[0], spans)
        self.latent = ((item["mean"] - stats[0]) / stats[1])[None]  # (1, T, C), as training normalises
        self.tokens = item["tokens"][None] if v2m else None
        self.cls = item["cls"][None] if "cls" in item else None
        self.vae = self.vocoder = self.melspec = None
        if cfg.sample_vae:
            self.vae = hub.load_component(cfg.sample_vae, "vae", types=("vae",), frozen=True)
            made_with = data.cache.info.get("vae_sha256")
            if made_with is not None and state_hash(self.vae) != made_with:
                raise ConfigError(f"sample_vae {cfg.sample_vae} is not the VAE that made the cache {data.cache.root}")
            self.melspec = MelSpectrogram(MelConfig.from_dict(data.cache.info["mel"]))
            if cfg.sample_vocoder:
                self.vocoder = training.load_vocoder(cfg.sample_vocoder, self.melspec.config)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """A normalised latent (1, T, C) → waveform (T · latent hop,), on the VAE's device."""
        mean, std = (v.to(self.vae.latent_mean.device) for v in self.stats)
        z = latent.float().to(mean.device) * std + mean
        mel = self.vae.decode(z.transpose(1, 2))[0]  # (M, T · compression)
        return training.mel_to_audio(mel, self.melspec, self.vocoder)

    @torch.no_grad()
    def write(self, model: VideoToMusicFlow, step: int, log: training.RunLog) -> None:
        """The EMA model's sample at ``step``: a WAV (and the reference, once), or the latent."""
        device = next(model.parameters()).device
        frames = self.latent.shape[1]
        if self.v2m:
            cls = None if self.cls is None else self.cls.to(device)
            cond = model.condition(self.tokens.to(device), torch.tensor([frames], device=device), num_frames=frames,
                                   cls=cls)
        else:
            cond = model.dit.null_condition(1, frames)
        latent = model.sample(cond, num_steps=self.cfg.sample_steps, cfg_scale=self.cfg.sample_cfg_scale,
                              seed=self.cfg.seed)
        if self.vae is None:
            path = log.sample_path(step, "dit", ".pt")
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(latent[0].cpu(), path)
            logger.info("wrote %s (no sample_vae to decode it with)", path)
            return
        for module in (self.vae, self.vocoder):
            if module is not None:
                module.to(device)
        rate = self.melspec.config.sample_rate
        if not log.sample_path(None, "reference").is_file():
            log.audio(None, "reference", self.decode(self.latent), rate)
        log.audio(step, "dit", self.decode(latent), rate)


def main(argv: Optional[list[str]] = None) -> Path:
    args = training.recipe_parser(__doc__).parse_args(argv)
    cfg = training.load_config(DiTTrainConfig, args.config, args.overrides)
    run_dir = args.run_dir
    acc = training.make_accelerator(cfg.mixed_precision, cfg.grad_accum, log_with=cfg.log_with, run_dir=run_dir)
    training.setup_logging(acc.is_main_process)
    rank = acc.process_index

    v2m = cfg.stage == "v2m"
    rate = cfg.objective.latent_rate

    def data(cache: str, epoch_seed: int):
        dataset = CachedLatentDataset(cache, min_seconds=cfg.min_seconds, max_seconds=cfg.max_seconds,
                                      latent_rate=rate, seed=epoch_seed, with_video=v2m)
        sampler = DurationBalancedBatchSampler(dataset.durations, cfg.batch_size, seed=epoch_seed, rank=rank,
                                               world_size=acc.num_processes,
                                               segment_seconds=(cfg.min_seconds, cfg.max_seconds), frame_rate=rate)
        return dataset, sampler, DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_latents,
                                            num_workers=cfg.num_workers)

    dataset, sampler, loader = data(cfg.cache, cfg.seed)
    heldout = data(cfg.heldout, cfg.seed + 1)[2] if cfg.heldout and cfg.eval_every else None
    stats = latent_stats(dataset)
    samples = Samples(cfg, stats, v2m) if cfg.sample_every and acc.is_main_process else None

    dit_cfg = build_config(DiTConfig, cfg.dit)
    adaptor_cfg = build_config(AdaptorConfig, {**cfg.adaptor, "width": dit_cfg.cond_dim or dit_cfg.width})

    def build() -> VideoToMusicFlow:
        return VideoToMusicFlow(DiT(dit_cfg), VisualAdaptor(adaptor_cfg) if v2m else None, cfg.objective)

    torch.manual_seed(cfg.seed)  # the initial weights (the same on every process); later draws use step_generator
    model = build()
    dit, adaptor = model.dit, model.adaptor
    if adaptor is not None and cfg.init_adaptor:
        hub.load_init(adaptor, cfg.init_adaptor, ("adaptor", "contrastive"), prefix="adaptor.")
    if cfg.init_dit:
        hub.load_init(dit, cfg.init_dit, ("dit",))
    ema = training.EMA(model, cfg.ema_decay)
    logger.info("stage %s: DiT %.1fM parameters%s, %d cached files, %d processes", cfg.stage,
                dit.num_parameters() / 1e6,
                f", adaptor {sum(p.numel() for p in adaptor.parameters()) / 1e6:.1f}M" if adaptor else "",
                len(dataset), acc.num_processes)

    step, state = 0, None
    if args.resume:
        ckpt, state = training.resume(run_dir, required=True)
        training.restore(state, model=model, ema=ema, sampler=sampler)  # whole weights, before any sharding
        step = state["step"]
        logger.info("resumed from %s at step %d", ckpt, step)
    sharded = cfg.shard == "fsdp" and acc.num_processes > 1
    if sharded:  # the model (and the EMA alike) sharded here, not wrapped in DDP by acc.prepare
        for net in (model, ema.shadow):
            net.to(acc.device)
            extra = [] if net.adaptor is None else [net.adaptor]  # VideoToMusicFlow calls its aggregate()
            training.sharding.shard(net, [*net.dit.blocks, *extra], acc.device, acc.num_processes,
                                    entry_points=[(a, "aggregate") for a in extra])
        held, total = training.sharding.local_numel(model)
        logger.info("FSDP over %d processes: this process holds %d of %d parameter values", acc.num_processes,
                    held, total)
    elif cfg.shard == "fsdp":
        logger.info("shard=fsdp with one process: training unsharded")
    optimizer = training.make_optimizer(cfg.optim, model)  # after sharding: over the sharded parameters
    scheduler = training.make_scheduler(optimizer, cfg.optim, cfg.steps)
    if state is not None:
        training.restore(state, optimizer=optimizer, scheduler=scheduler)
    if sharded:
        optimizer = acc.prepare(optimizer)  # Accelerate's no-op steps between accumulation syncs
    else:
        model, optimizer = acc.prepare(model, optimizer)
    inner = acc.unwrap_model(model)
    ema.shadow.to(acc.device)

    def averaged() -> Optional[VideoToMusicFlow]:
        """The EMA model, whole, on the main process (collective when sharded; None elsewhere)."""
        return training.sharding.gather_module(ema.shadow, build, acc.is_main_process, acc.device)

    def flow_loss(net: nn.Module, batch: dict, gen: torch.Generator) -> torch.Tensor:
        """The objective's loss on one batch: a latent from each posterior, then VideoToMusicFlow."""
        x1 = draw_latents(batch, stats, gen).to(acc.device)
        tokens = {k: batch[k].to(acc.device) for k in ("tokens", "token_lengths", "cls") if k in batch} if v2m else {}
        with acc.autocast():
            return net(x1, batch["valid"].to(acc.device), gen, **tokens)

    window = training.LossWindow()
    log = training.RunLog(acc, run_dir, cfg, f"dit {cfg.stage}", step=step, total=cfg.steps, progress=args.progress)
    with log:
        micro = step * cfg.grad_accum  # micro-batches done: the step generator's index
        stream = training.batch_stream(loader, sampler)
        evaluate = None if heldout is None else (
            lambda: training.heldout_loss(lambda b, g: flow_loss(inner, b, g), heldout, [inner], acc, cfg.seed))
        while step < cfg.steps:
            consumed, batch = next(stream)
            gen = training.step_generator(cfg.seed, micro, rank)
            lr = scheduler.get_last_lr()[0]  # this step's rate, for the log
            micro += 1
            with acc.accumulate(model):  # gradient all-reduce on the last micro-batch of a step only
                loss = flow_loss(model, batch, gen)
                training.check_finite(loss, step + 1, ", ".join(batch["ids"]))
                acc.backward(loss)
                if acc.sync_gradients and cfg.optim.grad_clip:
                    acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()  # a no-op until the last micro-batch (Accelerate)
                optimizer.zero_grad(set_to_none=True)
                if acc.sync_gradients:
                    scheduler.step()
            window.add({"loss": loss})
            log.add(len(batch["ids"]) * acc.num_processes, int(batch["valid"].sum()) * acc.num_processes)
            if not acc.sync_gradients:
                continue
            ema.update(inner)
            step += 1
            log.step_done(step, window, every=cfg.log_every, last=cfg.steps, lr=lr, heldout=evaluate,
                          eval_every=cfg.eval_every)
            if cfg.sample_every and step % cfg.sample_every == 0:
                with log.paused(), training.seeded(cfg.seed):  # the global random state is left as it was
                    ema_model = averaged()
                    if samples is not None:
                        samples.write(ema_model, step, log)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                # every process takes part in gathering a sharded state; the main one writes it
                ckpt_state = training.checkpoint_state(step, cfg, sampler, consumed, keep=acc.is_main_process,
                                                       model=model, ema=ema, optimizer=optimizer, scheduler=scheduler)
                if acc.is_main_process:
                    training.save_checkpoint(run_dir, step, ckpt_state, keep=cfg.keep_checkpoints)
                acc.wait_for_everyone()
    final = run_dir / "final"
    ema_model = averaged()
    if acc.is_main_process:
        save_final(ema_model, final, cfg.max_seconds)
    acc.wait_for_everyone()
    acc.end_training()
    return final


def save_final(model: VideoToMusicFlow, folder: Path, max_seconds: float) -> None:
    """EMA weights of each trained component (``<name>.safetensors`` + ``<name>.json``) and
    ``window.json``: the longest clip trained on and the objective, from which
    ``recipes/export.py`` sets the release's windows for long videos."""
    for name, module in (("dit", model.dit), ("adaptor", model.adaptor)):
        if module is not None:
            hub.save_component(module, folder, name)
    window = {"max_seconds": max_seconds, "objective": model.objective.to_dict()}
    (folder / "window.json").write_text(json.dumps(window, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote EMA weights to %s", folder)


if __name__ == "__main__":
    run_script(main)
