"""Train MuVi's 1D mel VAE (paper section 3.1, appendix A) on music only.

    accelerate launch recipes/train_vae.py --config recipes/configs/vae_paper.json --run-dir runs/vae \
        [--resume] [--set music=/data/music batch_size=32 ...]

Each step (one optimizer update over ``grad_accum`` micro-batches):

    mel        = MelSpectrogram(music)        the shared front end (160 bins, 80 frames/s)
    mel        = a random window of ``crop_seconds`` per clip (offsets from the step generator)
    recon, q   = MelVAE(mel)                  decoding a sample of the posterior q(z | mel)
    loss       = rec + kl_weight · kl [+ λ_adv · adv_weight · gan]

- ``rec``: L1 (``recon_loss="l1"``) or L1 + L2 (``"l1+l2"``) between log-mels, averaged over
  valid mel elements only: frames past the end of a clip (batch padding) count for nothing.
- ``kl``: KL(q ‖ N(0, I)) summed over the valid latent elements and divided by the number of
  valid *mel* elements. LDM sums both its reconstruction and its KL over all elements, so
  dividing both by the same count keeps its balance: ``kl_weight = 1e-6`` here is exactly LDM's
  ``kl_weight: 1e-6``. (LDM's learned output log-variance is left out: a single scalar that only
  rescales ``rec``.)
- ``gan`` (optional): LDM's patch discriminator (``muvi.models.discriminators.PatchDiscriminator``)
  on the log-mel image with hinge losses, from step ``adv_start_step`` on, weighted by LDM's
  adaptive factor λ_adv = ‖∇rec‖ / ‖∇gan‖ at the decoder's last layer (clamped to [0, 1e4])
  times ``adv_weight`` (``adv_adaptive false``: ``adv_weight`` alone, a fixed weight as HiFi-GAN's
  and EnCodec's losses are). Batch padding is hidden from the discriminator (the reconstruction's
  padded frames are replaced by the target's).

Why the adversarial term is on by default at paper size (``adv_weight 0.5``, start 50001, both
LDM's values): MuVi says it adapts LDM's autoencoder, and every LDM autoencoder is trained with
it. An L1/L2 reconstruction alone is the per-bin median/mean of what the latent leaves
uncertain, which smooths exactly what a vocoder needs to sound crisp -- harmonic partials,
onsets, the noise floor between them -- into blurred mels that come out muffled and metallic;
the patch discriminator restores that local texture, as in LDM and the mel VAEs of AudioLDM
and Make-An-Audio. It starts late, after the reconstruction has converged, so the GAN cannot
destabilise early training, and the adaptive weight keeps it from dominating the L1 term.
``adv_weight 0`` trains a plain KL-VAE (no discriminator is built). This choice follows
LDM; it has not been ablated on music here.

``init`` starts from a trained VAE (a run's ``final/`` or a release; its mel must be this
run's), and ``freeze_encoder`` then trains the decoder alone: the encoder, hence every latent a
DiT was trained on, and the latent statistics stay exactly the init's, so a decoder fine-tuned
this way (e.g. adding the adversarial term to a VAE trained without it) drops into a release
without retraining anything downstream (``recipes/configs/vae_decoder_gan_demo.json``).
``init_decoder false`` (with ``freeze_encoder``) takes only the encoder and the latent statistics
from ``init`` and trains a fresh decoder, which may be wider (``model.decoder_channels``): the
same drop-in property, for asking whether decoder capacity is what a release lacks.

With ``heldout`` (music files kept out of training) and ``eval_every``, the held-out loss
``rec + kl_weight · kl`` of the model being trained (no adversarial term: it needs gradients)
is logged every ``eval_every`` steps, over one pass of that folder's fixed segments and windows.

Every ``sample_every`` steps the EMA model reconstructs the first ``sample_seconds`` of the first
held-out file (else of the first training file): its mel through the encoder's posterior mean
and the decoder, made audible by ``sample_vocoder`` (a vocoder run's ``final/``) or, without
one, by Griffin-Lim, into ``RUN/samples/step_XXXXXXXX_vae.wav``; ``samples/reference.wav`` is the
clip's own mel through the same vocoder or Griffin-Lim, so the two differ by the VAE alone.

At the end the EMA model's per-channel latent statistics (means of the posterior over
``stats_batches`` batches of whole segments, valid frames only) are stored into its
``latent_mean``/``latent_std`` buffers, and the components ``vae`` and ``mel`` (the front
end) in ``RUN/final/`` (:mod:`muvi.hub`) are written.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader

from muvi import hub, training
from muvi.cli import run_script
from muvi.config import Config, ConfigError
from muvi.data.datasets import MusicDataset, collate_segments
from muvi.data.sampler import DurationBalancedBatchSampler
from muvi.models.discriminators import (
    PatchDiscriminator,
    PatchDiscriminatorConfig,
    hinge_discriminator_loss,
    hinge_generator_loss,
)
from muvi.models.mel import MelConfig, MelSpectrogram
from muvi.models.vae import MelVAE, VAEConfig, estimate_latent_stats
from muvi.training import (
    EMA,
    OptimizerConfig,
    check_finite,
    load_config,
    make_accelerator,
    recipe_parser,
    save_checkpoint,
    setup_logging,
    step_generator,
)

logger = logging.getLogger("train_vae")


@dataclasses.dataclass
class VAETrainConfig(Config):
    # data: a folder of audio files (searched recursively) or a .txt list, one path per line
    music: str = ""
    min_seconds: float = 4.0       # segments drawn from the files (MuVi: 4-30 s) ...
    max_seconds: float = 10.0
    crop_seconds: float = 3.2      # ... of which one window per clip is trained on (memory)
    num_workers: int = 4
    # models: a preset plus field overrides
    model_preset: str = "base"
    model: dict = dataclasses.field(default_factory=dict)
    mel: dict = dataclasses.field(default_factory=dict)     # MelConfig overrides (paper: none)
    disc_preset: str = "ldm"
    disc: dict = dataclasses.field(default_factory=dict)
    # objective
    recon_loss: str = "l1"         # "l1" or "l1+l2"
    kl_weight: float = 1e-6
    adv_weight: float = 0.5        # 0: no discriminator
    adv_start_step: int = 50001
    adv_adaptive: bool = True      # LDM's λ_adv × adv_weight; False: adv_weight fixed
    # starting point: a folder with a `vae` component (a run's final/ or a release); with
    # freeze_encoder only the decoder trains, so the latents and their statistics stay the init's
    # (a DiT trained on them stays valid): e.g. an adversarial decoder fine-tune
    init: str = ""
    freeze_encoder: bool = False
    # False: only the encoder and its latent statistics come from init and the decoder starts
    # fresh (e.g. a wider one, model.decoder_channels); needs freeze_encoder
    init_decoder: bool = True
    # optimisation (LDM: Adam with betas (0.5, 0.9) for both networks)
    steps: int = 350_000
    batch_size: int = 64           # clips per process and micro-batch; the paper's "640K" per batch
                                   # read as mel frames: 8 GPUs x 5 accum x 64 x 256 = 655K
    grad_accum: int = 1
    optim: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(
        lr=1e-4, betas=(0.5, 0.9), warmup_steps=1000, grad_clip=1.0))
    disc_optim: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(
        lr=1e-4, betas=(0.5, 0.9), warmup_steps=1000, grad_clip=1.0))
    ema_decay: float = 0.999
    # held-out loss: a folder or .txt list of music kept out of training, every eval_every steps
    heldout: str = ""
    eval_every: int = 0
    # audio samples (the module docstring), every sample_every steps; 0: none
    sample_every: int = 0
    sample_seconds: float = 4.0
    sample_vocoder: str = ""       # a folder with the component vocoder; "": Griffin-Lim
    # bookkeeping
    stats_batches: int = 64
    log_every: int = 100
    # Accelerate trackers: "auto" (TensorBoard when installed), "none", "tensorboard", "wandb"
    log_with: str = "auto"
    ckpt_every: int = 5000
    seed: int = 0
    mixed_precision: str = "auto"

    def __post_init__(self) -> None:
        if self.recon_loss not in ("l1", "l1+l2"):
            raise ConfigError(f"recon_loss must be 'l1' or 'l1+l2', got {self.recon_loss!r}")
        if self.freeze_encoder and not self.init:
            raise ConfigError("freeze_encoder needs init: a folder with the `vae` whose encoder stays")
        if not self.init_decoder and not self.freeze_encoder:
            raise ConfigError("init_decoder false needs freeze_encoder: a fresh decoder is trained "
                              "against the init's frozen encoder")


def crop_windows(mel: torch.Tensor, valid: torch.Tensor, frames: int, gen: torch.Generator,
                 pad_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """mel (B, M, T), valid frames (B,) → a random window (B, M, frames) per clip and its
    valid frame count (B,). Short clips start at 0 and keep their padding (masked later)."""
    window, start = training.random_crop(mel, valid, frames, gen, pad_value)
    return window, (valid - start).clamp(0, frames)


def reconstruct(vae: MelVAE, melspec: MelSpectrogram, batch: dict, crop: int, gen: torch.Generator,
                autocast) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
    """(mel window (B, M, crop), its valid frames (B,), reconstruction, posterior) of a batch:
    the one forward pass of training and of the held-out loss."""
    device, cfg = melspec.mel_basis.device, melspec.config
    music = batch["music"].to(device, non_blocking=True)
    with torch.no_grad():
        mel, valid = crop_windows(melspec(music), (batch["music_lengths"] // cfg.hop_length).to(device),
                                  crop, gen, math.log(cfg.log_clamp))  # padding: the log-mel of silence
    with autocast():
        recon, posterior = vae(mel, generator=gen)
    return mel, valid, recon, posterior


def vae_losses(mel: torch.Tensor, recon: torch.Tensor, posterior, valid: torch.Tensor,
               cfg: VAETrainConfig, compression: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rec, kl, mel mask (B, 1, T)) over valid frames, normalised as the docstring says."""
    mask = (torch.arange(mel.shape[-1], device=mel.device) < valid[:, None])[:, None, :]
    count = mask.sum() * mel.shape[1]
    diff = (recon.float() - mel) * mask
    rec = diff.abs().sum() / count
    if cfg.recon_loss == "l1+l2":
        rec = rec + diff.square().sum() / count
    latent_mask = (torch.arange(posterior.mean.shape[-1], device=mel.device) * compression
                   < valid[:, None])[:, None, :]
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
    return rec, (kl * latent_mask).sum() / count, mask


def adaptive_weight(rec: torch.Tensor, gan: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """LDM's λ = ‖∇_w rec‖ / (‖∇_w gan‖ + 1e-4) at the decoder's last weight, clamped to [0, 1e4]."""
    g_rec = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = recipe_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    cfg = load_config(VAETrainConfig, args.config, args.overrides)
    run_dir = Path(args.run_dir)
    acc = make_accelerator(cfg.mixed_precision, cfg.grad_accum, log_with=cfg.log_with, run_dir=run_dir)
    setup_logging(acc.is_main_process)
    device = acc.device

    mel_cfg = MelConfig(**cfg.mel)
    vae_cfg = VAEConfig.preset(cfg.model_preset, **cfg.model)
    if vae_cfg.mel_channels != mel_cfg.n_mels:
        raise ConfigError(f"the VAE takes {vae_cfg.mel_channels} mel bins but the mel front end "
                          f"makes {mel_cfg.n_mels}")
    melspec = MelSpectrogram(mel_cfg).to(device)
    tc = vae_cfg.time_compression
    crop = max(1, round(cfg.crop_seconds * mel_cfg.frames_per_second / tc)) * tc  # whole latent frames

    torch.manual_seed(cfg.seed)
    vae = MelVAE(vae_cfg)
    if cfg.init:
        init_from(vae, cfg.init, mel_cfg, decoder=cfg.init_decoder)
        vae.encoder.requires_grad_(not cfg.freeze_encoder)  # frozen: left out of the optimizer
    disc = (PatchDiscriminator(PatchDiscriminatorConfig.preset(cfg.disc_preset, **cfg.disc))
            if cfg.adv_weight > 0 else None)
    ema = EMA(vae, cfg.ema_decay)
    ema.shadow.to(device)
    opt = training.make_optimizer(cfg.optim, vae)
    sched = training.make_scheduler(opt, cfg.optim, cfg.steps)
    opt_d = training.make_optimizer(cfg.disc_optim, disc) if disc is not None else None
    sched_d = training.make_scheduler(opt_d, cfg.disc_optim, cfg.steps) if disc is not None else None

    data = dict(sample_rate=mel_cfg.sample_rate, min_seconds=cfg.min_seconds, max_seconds=cfg.max_seconds,
                batch_size=cfg.batch_size, seed=cfg.seed, num_workers=cfg.num_workers, rank=acc.process_index,
                world_size=acc.num_processes, pin_memory=device.type == "cuda")
    dataset, sampler, loader = training.music_data(cfg.music, **data)
    held = training.music_data(cfg.heldout, **data) if cfg.heldout and cfg.eval_every else None
    heldout = held[2] if held is not None else None
    clip = vocoder = None  # the sample clip and its vocoder, on the main process
    if cfg.sample_every and acc.is_main_process:
        clip = training.music_clip((held[0] if held is not None else dataset).files[0], mel_cfg.sample_rate,
                                   cfg.sample_seconds, mel_cfg.hop_length * tc).to(device)
        if cfg.sample_vocoder:
            with training.seeded(cfg.seed):  # building it draws initial weights: leave the global stream as it was
                vocoder = training.load_vocoder(cfg.sample_vocoder, mel_cfg).to(device)

    step = 0
    ckpt, state = training.resume(run_dir, required=True) if args.resume else (None, None)
    if ckpt is not None:
        step = state["step"]
        training.restore(state, model=vae, ema=ema, sampler=sampler, discriminator=disc)
        logger.info("resuming from %s (step %d)", ckpt, step)
    if disc is not None:
        vae, disc, opt, opt_d = acc.prepare(vae, disc, opt, opt_d)
    else:
        vae, opt = acc.prepare(vae, opt)
    models = [m for m in (vae, disc) if m is not None]
    optimizers = [o for o in (opt, opt_d) if o is not None]
    schedulers = [s for s in (sched, sched_d) if s is not None]
    if ckpt is not None:
        training.restore(state, optimizer=opt, scheduler=sched, disc_optimizer=opt_d, disc_scheduler=sched_d)
        del state
    vae_inner = acc.unwrap_model(vae)
    disc_inner = acc.unwrap_model(disc) if disc is not None else None
    logger.info("VAE %.2fM parameters, discriminator %.2fM; %d music files; window %d mel frames",
                sum(p.numel() for p in vae_inner.parameters()) / 1e6,
                sum(p.numel() for p in disc_inner.parameters()) / 1e6 if disc is not None else 0.0,
                len(dataset), crop)

    def heldout_loss(batch: dict, gen: torch.Generator) -> torch.Tensor:
        mel, valid, recon, posterior = reconstruct(vae_inner, melspec, batch, crop, gen, acc.autocast)
        rec, kl, _ = vae_losses(mel, recon, posterior, valid, cfg, tc)
        return rec + cfg.kl_weight * kl

    stream = training.batch_stream(loader, sampler)
    consumed = sampler.state_dict()["batch"]
    window = training.LossWindow()
    log = training.RunLog(acc, run_dir, cfg, "vae", step=step, total=cfg.steps, progress=args.progress)
    with log:
        vae.train()
        micro = step * cfg.grad_accum  # micro-batches done: the step generator's index
        evaluate = None if heldout is None else (
            lambda: training.heldout_loss(heldout_loss, heldout, [vae_inner], acc, cfg.seed))
        while step < cfg.steps:
            consumed, batch = next(stream)
            gen = step_generator(cfg.seed, micro, acc.process_index, device)
            lr = sched.get_last_lr()[0]  # this step's rate, for the log
            micro += 1
            use_adv = disc is not None and step + 1 >= cfg.adv_start_step
            with acc.accumulate(*models):  # gradient all-reduce on the last micro-batch of a step only
                mel, valid, recon, posterior = reconstruct(vae, melspec, batch, crop, gen, acc.autocast)
                rec, kl, mask = vae_losses(mel, recon, posterior, valid, cfg, tc)
                loss = rec + cfg.kl_weight * kl
                gan = loss_d = weight = torch.zeros((), device=device)
                if use_adv:
                    fake = torch.where(mask, recon.float(), mel)  # hide the padding from D
                    with acc.autocast():
                        real_logits, fake_logits = disc(torch.cat([mel, fake.detach()])).chunk(2)
                    loss_d = hinge_discriminator_loss(real_logits, fake_logits)
                    with training.frozen(disc_inner), acc.autocast():
                        gan = hinge_generator_loss(disc_inner(fake))
                    weight = cfg.adv_weight * (adaptive_weight(rec, gan, vae_inner.decoder.conv_out.weight)
                                               if cfg.adv_adaptive else 1.0)
                    loss = loss + weight * gan
                names = training.batch_names(batch)
                check_finite(loss, step + 1, names)
                check_finite(loss_d, step + 1, names + " (discriminator)")
                acc.backward(loss)
                if use_adv:
                    acc.backward(loss_d)
                if acc.sync_gradients:
                    if cfg.optim.grad_clip:
                        acc.clip_grad_norm_(vae.parameters(), cfg.optim.grad_clip)
                    if use_adv and cfg.disc_optim.grad_clip:
                        acc.clip_grad_norm_(disc.parameters(), cfg.disc_optim.grad_clip)
                for o in optimizers:  # D's step without gradients (before adv_start_step) changes nothing
                    o.step()  # a no-op until the last micro-batch (Accelerate)
                    o.zero_grad(set_to_none=True)
                if acc.sync_gradients:
                    for s in schedulers:
                        s.step()
            window.add({"loss": loss, "rec": rec, "kl": kl, "gan": gan, "adv_lambda": weight, "disc": loss_d})
            log.add(mel.shape[0] * acc.num_processes, int(valid.sum()) * acc.num_processes)
            if not acc.sync_gradients:
                continue
            ema.update(vae_inner)
            step += 1
            log.step_done(step, window, every=cfg.log_every, last=cfg.steps, lr=lr, heldout=evaluate,
                          eval_every=cfg.eval_every)
            if clip is not None and step % cfg.sample_every == 0:
                with log.paused(), torch.no_grad():
                    mel = melspec(clip)  # (M, T)
                    if not log.sample_path(None, "reference").is_file():
                        log.audio(None, "reference", training.mel_to_audio(mel, melspec, vocoder), mel_cfg.sample_rate)
                    recon = ema.shadow.decode(ema.shadow.encode(mel[None]).mean)[0]
                    log.audio(step, "vae", training.mel_to_audio(recon, melspec, vocoder), mel_cfg.sample_rate)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                if acc.is_main_process:
                    save_checkpoint(run_dir, step, training.checkpoint_state(
                        step, cfg, sampler, consumed, model=vae, ema=ema, optimizer=opt, scheduler=sched,
                        discriminator=disc, disc_optimizer=opt_d, disc_scheduler=sched_d))
                acc.wait_for_everyone()

    final = run_dir / "final"
    if acc.is_main_process:
        export(ema.shadow, dataset, cfg, melspec, final, keep_stats=cfg.freeze_encoder)
    acc.wait_for_everyone()
    acc.end_training()
    return final


def init_from(vae: MelVAE, folder: str, mel_cfg: MelConfig, *, decoder: bool = True) -> None:
    """``vae`` ← the ``vae`` component of ``folder`` (weights and latent statistics), which must
    have been trained on this run's mel front end when the folder records one. ``decoder``
    False: the encoder and the latent statistics only (the decoder may differ: it stays fresh)."""
    training.check_folder_mel(folder, mel_cfg, f"init {folder}")
    if decoder:
        hub.load_init(vae, folder, ("vae",))
        return
    source = hub.load_component(folder, "vae", types=("vae",))
    theirs, ours = source.config.to_dict(), vae.config.to_dict()
    differ = sorted(k for k in ours if k not in ("decoder_channels", "mel_noise", "dropout")
                    and theirs.get(k) != ours[k])
    if differ:
        raise ConfigError(f"init {folder}: its encoder was built with "
                          + ", ".join(f"{k} = {theirs.get(k)!r}" for k in differ)
                          + f", this run's with {', '.join(f'{k} = {ours[k]!r}' for k in differ)}")
    vae.encoder.load_state_dict(source.encoder.state_dict())
    vae.set_latent_stats(source.latent_mean.clone(), source.latent_std.clone())


@torch.no_grad()
def export(model: MelVAE, dataset: MusicDataset, cfg: VAETrainConfig, melspec: MelSpectrogram,
           out: Path, keep_stats: bool = False) -> None:
    """Latent statistics from whole segments (their own sampler stream; ``keep_stats``: the
    model's own, from its init, since its encoder did not train), then the release files."""
    if not keep_stats:
        estimate_stats(model, dataset, cfg, melspec)
    hub.save_component(model, out, "vae")
    hub.save_component(melspec, out, "mel")
    logger.info("wrote %s", out / "vae.safetensors")


def estimate_stats(model: MelVAE, dataset: MusicDataset, cfg: VAETrainConfig, melspec: MelSpectrogram) -> None:
    device, tc = melspec.mel_basis.device, model.time_compression
    sampler = DurationBalancedBatchSampler(dataset.durations, cfg.batch_size, seed=cfg.seed + 1,
                                           batches_per_epoch=cfg.stats_batches)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_segments,
                        num_workers=cfg.num_workers)

    def posterior_means():
        for batch in loader:
            mel = melspec(batch["music"].to(device))
            valid = batch["music_lengths"] // melspec.config.hop_length
            mean = model.encode(mel).mean.float().cpu()
            for z, n in zip(mean, valid.tolist()):
                yield z[:, : math.ceil(n / tc)]  # (Z, L_valid)

    mean, std = estimate_latent_stats(posterior_means())
    model.set_latent_stats(mean, std.clamp_min(1e-5))
    logger.info("latent mean %s, std %s", [round(v, 3) for v in mean.tolist()],
                [round(v, 3) for v in std.tolist()])


if __name__ == "__main__":
    run_script(main)
