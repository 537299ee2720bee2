"""Train MuVi's HiFi-GAN vocoder (paper appendix A; Kong et al. 2020) on music only.

    accelerate launch recipes/train_vocoder.py --config recipes/configs/vocoder_paper.json \
        --run-dir runs/vocoder [--resume] [--set music=/data/music batch_size=16 ...]

Each step (one update of both networks over ``grad_accum`` micro-batches):

    mel      = MelSpectrogram(music)                   the shared front end, on the whole clip
    mel_in,y = a random window of segment_size / hop frames and its segment_size samples
    ŷ        = G(mel_in)                               (weight-normed HiFiGANGenerator)
    loss_D   = Σ_d LSGAN(D_d(y), D_d(ŷ.detach()))      MPD (periods 2,3,5,7,11) + MSD (3 scales)
    loss_G   = Σ_d LSGAN(D_d(ŷ)) + fm_weight · FM + mel_weight · L1(mel(ŷ), mel(y))
               [+ stft_weight · MR-STFT(ŷ, y)]

as in the HiFi-GAN release (mel ×45, feature matching ×2, AdamW(0.8, 0.99) at 2e-4 decayed by
``lr_decay`` every ``lr_decay_every`` steps; the release decays 0.999 per epoch of its data
set). The mel of ŷ goes through the SAME ``MelSpectrogram`` as the input and the target (the
mel loss back-propagates through it); mel(y) is computed on the segment itself, so target and
generated mels see identical edge padding, while the input mel comes from the whole clip and
has real context at the window's edges.

Two deliberate differences from the release, both so that every check happens before any
update and gradient accumulation stays exact:
- Both losses are computed from the same state of the discriminators (the release steps D
  first and then scores ŷ with the updated D). A NaN in either loss therefore stops the run
  before either optimizer has stepped.
- The generator's adversarial and feature-matching losses run the discriminators with their
  parameters frozen, so their gradients never pick up the generator's objective.
Real and generated audio share one discriminator pass (all sub-discriminators are per-example:
no batch statistics).

``stft_weight`` adds Parallel WaveGAN's multi-resolution STFT loss (spectral convergence +
log-magnitude L1 at ``stft_resolutions``; ``muvi.models.discriminators.multi_resolution_stft_loss``),
whose 240-sample windows see a pulse per mel frame that the mel loss's 1024-sample windows
average away. ``adversarial: false`` trains the generator on the mel and STFT losses alone: no
discriminator runs or steps (they are still built and checkpointed, so a run can be resumed
with them on), and ``loss_d``, ``adv`` and ``fm`` are logged as 0.

With ``heldout`` (music files kept out of training) and ``eval_every``, the mel L1 of the
generator being trained on that folder's fixed windows is logged as ``heldout_loss``. Every
``sample_every`` steps the EMA generator resynthesises the first ``sample_seconds`` of the first
held-out file (else of the first training file) from its mel, written to
``RUN/samples/step_XXXXXXXX_vocoder.wav`` beside the clip itself (``samples/reference.wav``).

Input mels are the ground truth's, or with ``input_vae`` (a folder holding a ``vae`` component
on the same mel) the VAE's reconstruction of them (posterior mean, decoded): the mels the
generator is given at inference are VAE-decoded, and their frame-to-frame texture differs from
a true mel's, so the generator is fine-tuned on them against the real waveform, as HiFi-GAN
fine-tunes on a TTS model's teacher-forced outputs. ``init`` (a folder holding a ``vocoder``
component, e.g. a release with the published generator) starts the generator from those
weights instead of at random; the discriminators always start fresh.
The final weights (components ``vocoder`` and ``mel`` in ``RUN/final/``) are the
EMA generator with weight norm folded into plain convolutions (``ema_decay 0`` gives the raw
weights, as the release has no EMA). The logged ``tokens_per_s`` counts waveform samples: divide
tokens/s by the sample rate for audio seconds per second.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from muvi import hub, training
from muvi.cli import run_script
from muvi.config import Config, ConfigError
from muvi.models.discriminators import (
    STFT_RESOLUTIONS,
    HiFiGANDiscriminatorConfig,
    MultiPeriodDiscriminator,
    MultiScaleDiscriminator,
    feature_matching_loss,
    lsgan_discriminator_loss,
    lsgan_generator_loss,
    multi_resolution_stft_loss,
)
from muvi.models.hifigan import HiFiGANConfig, HiFiGANGenerator
from muvi.models.mel import MelConfig, MelSpectrogram
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

logger = logging.getLogger("train_vocoder")


@dataclasses.dataclass
class VocoderTrainConfig(Config):
    # data: a folder of audio files (searched recursively) or a .txt list, one path per line
    music: str = ""
    min_seconds: float = 1.0       # clips decoded per item; one window of segment_size is used
    max_seconds: float = 1.0
    segment_size: int = 8400       # samples per window, a multiple of the hop (8400 = 28 frames)
    num_workers: int = 4
    # models
    model_preset: str = "v1-24k"
    model: dict = dataclasses.field(default_factory=dict)
    mel: dict = dataclasses.field(default_factory=dict)
    disc_preset: str = "v1"
    disc: dict = dataclasses.field(default_factory=dict)
    init: str = ""                 # a folder with a `vocoder` component to start the generator from
    input_vae: str = ""            # a folder with a `vae` component: train on its reconstructed mels
    # objective (HiFi-GAN)
    mel_weight: float = 45.0
    fm_weight: float = 2.0
    adversarial: bool = True       # false: mel (+ STFT) losses only, the discriminators idle
    stft_weight: float = 0.0       # Parallel WaveGAN's multi-resolution STFT loss; 0: off
    stft_resolutions: list = dataclasses.field(default_factory=lambda: [list(r) for r in STFT_RESOLUTIONS])
    # optimisation (HiFi-GAN: AdamW(0.8, 0.99), lr 2e-4, ×0.999 per epoch, no clipping)
    steps: int = 520_000
    batch_size: int = 12           # 12 x 8400 = 100.8K samples per batch: the paper's "102.4K
                                   # frames" read as samples (as mel frames it would be 21 min)
    grad_accum: int = 1
    optim: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(
        lr=2e-4, betas=(0.8, 0.99), weight_decay=0.01, lr_decay=0.999, lr_decay_every=1000))
    disc_optim: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(
        lr=2e-4, betas=(0.8, 0.99), weight_decay=0.01, lr_decay=0.999, lr_decay_every=1000))
    ema_decay: float = 0.999
    # held-out loss: a folder or .txt list of music kept out of training, every eval_every steps
    heldout: str = ""
    eval_every: int = 0
    # audio samples (the module docstring), every sample_every steps; 0: none
    sample_every: int = 0
    sample_seconds: float = 4.0
    # bookkeeping
    log_every: int = 100
    # Accelerate trackers: "auto" (TensorBoard when installed), "none", "tensorboard", "wandb"
    log_with: str = "auto"
    ckpt_every: int = 5000
    seed: int = 0
    mixed_precision: str = "auto"


def crop_segments(music: torch.Tensor, mel: torch.Tensor, valid: torch.Tensor, frames: int, hop: int,
                  gen: torch.Generator, pad_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A random window per clip: mel (B, M, frames) and its waveform (B, frames · hop).

    Clips shorter than the window start at 0 and run into the batch's zero padding (whose mel
    is that of silence), as the release zero-pads short files."""
    if mel.shape[-1] < frames:
        music = torch.nn.functional.pad(music, (0, frames * hop - music.shape[-1]))
    window, start = training.random_crop(mel, valid, frames, gen, pad_value)
    samples = (start[:, None] * hop + torch.arange(frames * hop, device=music.device))  # (B, frames·hop)
    return window, music.gather(1, samples)


def vocode(generator: HiFiGANGenerator, melspec: MelSpectrogram, batch: dict, frames: int,
           gen: torch.Generator, autocast, vae=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(waveform window y, generated ŷ, mel of y) of a batch: the one generator pass of training
    and of the held-out loss. With ``vae`` the generator is given its reconstruction of the mel."""
    device, cfg = melspec.mel_basis.device, melspec.config
    music = batch["music"].to(device, non_blocking=True)
    with torch.no_grad():
        mel = melspec(music)
        if vae is not None:
            mel = vae.reconstruct(mel)
        mel_in, y = crop_segments(music, mel, (batch["music_lengths"] // cfg.hop_length).to(device),
                                  frames, cfg.hop_length, gen, math.log(cfg.log_clamp))
        mel_y = melspec(y)
    with autocast():
        y_hat = generator(mel_in).float()
    return y, y_hat, mel_y


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = recipe_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    cfg = load_config(VocoderTrainConfig, args.config, args.overrides)
    run_dir = Path(args.run_dir)
    acc = make_accelerator(cfg.mixed_precision, cfg.grad_accum, log_with=cfg.log_with, run_dir=run_dir)
    setup_logging(acc.is_main_process)
    device = acc.device

    mel_cfg = MelConfig(**cfg.mel)
    gen_cfg = HiFiGANConfig.preset(cfg.model_preset, **cfg.model)
    disc_cfg = HiFiGANDiscriminatorConfig.preset(cfg.disc_preset, **cfg.disc)
    hop = mel_cfg.hop_length
    if gen_cfg.num_mels != mel_cfg.n_mels or gen_cfg.hop_length != hop:
        raise ConfigError(f"generator ({gen_cfg.num_mels} mels, hop {gen_cfg.hop_length}) does not "
                          f"match the mel front end ({mel_cfg.n_mels} mels, hop {hop})")
    if cfg.stft_weight and not all(len(r) == 3 and r[2] <= r[0] for r in cfg.stft_resolutions):
        raise ConfigError(f"stft_resolutions {cfg.stft_resolutions}: each must be [n_fft, hop, window] "
                          "with window <= n_fft")
    if cfg.segment_size % hop:
        raise ConfigError(f"segment_size {cfg.segment_size} is not a multiple of the hop {hop}")
    frames = cfg.segment_size // hop
    melspec = MelSpectrogram(mel_cfg).to(device)

    vae = None
    if cfg.input_vae:
        vae = hub.load_component(cfg.input_vae, "vae", frozen=True, device=device)
        vae_mel = hub.load_component(cfg.input_vae, "mel").config
        if vae_mel != mel_cfg:
            raise ConfigError(f"input_vae {cfg.input_vae}: its VAE was trained on another mel ({vae_mel}) "
                              f"than this run's ({mel_cfg})")

    torch.manual_seed(cfg.seed)
    generator = HiFiGANGenerator(gen_cfg)
    if cfg.init:
        hub.load_init(generator, cfg.init, ("vocoder",))
        logger.info("generator initialised from %s", cfg.init)
    generator.apply_weight_norm()
    mpd, msd = MultiPeriodDiscriminator(disc_cfg), MultiScaleDiscriminator(disc_cfg)
    ema = EMA(generator, cfg.ema_decay)
    ema.shadow.to(device)
    opt_g, opt_d = training.make_optimizer(cfg.optim, generator), training.make_optimizer(cfg.disc_optim, mpd, msd)
    sched_g = training.make_scheduler(opt_g, cfg.optim, cfg.steps)
    sched_d = training.make_scheduler(opt_d, cfg.disc_optim, cfg.steps)

    data = dict(sample_rate=mel_cfg.sample_rate, min_seconds=cfg.min_seconds, max_seconds=cfg.max_seconds,
                batch_size=cfg.batch_size, seed=cfg.seed, num_workers=cfg.num_workers, rank=acc.process_index,
                world_size=acc.num_processes, pin_memory=device.type == "cuda")
    dataset, sampler, loader = training.music_data(cfg.music, **data)
    held = training.music_data(cfg.heldout, **data) if cfg.heldout and cfg.eval_every else None
    heldout = held[2] if held is not None else None
    clip = None  # the sample clip, on the main process
    if cfg.sample_every and acc.is_main_process:
        clip = training.music_clip((held[0] if held is not None else dataset).files[0], mel_cfg.sample_rate,
                                   cfg.sample_seconds, hop).to(device)

    step = 0
    ckpt, state = training.resume(run_dir, required=True) if args.resume else (None, None)
    if ckpt is not None:
        step = state["step"]
        training.restore(state, model=generator, mpd=mpd, msd=msd, ema=ema, sampler=sampler)
        logger.info("resuming from %s (step %d)", ckpt, step)
    generator, mpd, msd, opt_g, opt_d = acc.prepare(generator, mpd, msd, opt_g, opt_d)
    if ckpt is not None:
        training.restore(state, optimizer=opt_g, scheduler=sched_g, disc_optimizer=opt_d, disc_scheduler=sched_d)
        del state
    gen_inner, mpd_inner, msd_inner = (acc.unwrap_model(m) for m in (generator, mpd, msd))
    logger.info("generator %.2fM parameters, MPD %.2fM, MSD %.2fM; %d music files; %d-sample windows",
                *(sum(p.numel() for p in m.parameters()) / 1e6 for m in (gen_inner, mpd_inner, msd_inner)),
                len(dataset), cfg.segment_size)

    def heldout_loss(batch: dict, gen: torch.Generator) -> torch.Tensor:
        _, y_hat, mel_y = vocode(gen_inner, melspec, batch, frames, gen, acc.autocast, vae)
        return torch.nn.functional.l1_loss(melspec(y_hat), mel_y)

    stream = training.batch_stream(loader, sampler)
    consumed = sampler.state_dict()["batch"]
    window = training.LossWindow()
    log = training.RunLog(acc, run_dir, cfg, "vocoder", step=step, total=cfg.steps,
                          show=("loss_g", "mel", "heldout_loss"), progress=args.progress)
    with log:
        for m in (generator, mpd, msd):
            m.train()
        micro = step * cfg.grad_accum  # micro-batches done: the step generator's index
        evaluate = None if heldout is None else (
            lambda: training.heldout_loss(heldout_loss, heldout, [gen_inner], acc, cfg.seed))
        while step < cfg.steps:
            consumed, batch = next(stream)
            gen = step_generator(cfg.seed, micro, acc.process_index, device)
            lr = sched_g.get_last_lr()[0]  # this step's rate, for the log
            micro += 1
            with acc.accumulate(generator, mpd, msd):  # gradient all-reduce on a step's last micro-batch only
                y, y_hat, mel_y = vocode(generator, melspec, batch, frames, gen, acc.autocast, vae)
                b = y.shape[0]
                loss_d = adv = fm = y.new_zeros(())
                if cfg.adversarial:
                    with acc.autocast():
                        # Discriminators on real and (detached) generated audio in one pass.
                        both = torch.cat([y, y_hat.detach()])
                        s_p, f_p = mpd(both)
                        s_s, f_s = msd(both)
                    scores, fmaps = s_p + s_s, f_p + f_s
                    loss_d = lsgan_discriminator_loss([s[:b] for s in scores], [s[b:] for s in scores])
                    with training.frozen(mpd_inner, msd_inner), acc.autocast():
                        g_p, gf_p = mpd_inner(y_hat)
                        g_s, gf_s = msd_inner(y_hat)
                    adv = lsgan_generator_loss(g_p + g_s)
                    fm = feature_matching_loss([[f[:b] for f in fl] for fl in fmaps], gf_p + gf_s)
                mel_l1 = torch.nn.functional.l1_loss(melspec(y_hat), mel_y)
                loss_g = adv + cfg.fm_weight * fm + cfg.mel_weight * mel_l1
                stft = y.new_zeros(())
                if cfg.stft_weight:
                    stft = multi_resolution_stft_loss(y_hat, y, cfg.stft_resolutions)
                    loss_g = loss_g + cfg.stft_weight * stft
                names = training.batch_names(batch)
                check_finite(loss_g, step + 1, names)
                check_finite(loss_d, step + 1, names + " (discriminator)")
                if cfg.adversarial:
                    acc.backward(loss_d)
                acc.backward(loss_g)
                if acc.sync_gradients:
                    if cfg.optim.grad_clip:
                        acc.clip_grad_norm_(generator.parameters(), cfg.optim.grad_clip)
                    if cfg.disc_optim.grad_clip:
                        acc.clip_grad_norm_([p for m in (mpd, msd) for p in m.parameters()], cfg.disc_optim.grad_clip)
                for o in (opt_d, opt_g) if cfg.adversarial else (opt_g,):
                    o.step()  # a no-op until the last micro-batch (Accelerate)
                    o.zero_grad(set_to_none=True)
                if acc.sync_gradients:
                    if cfg.adversarial:
                        sched_d.step()
                    sched_g.step()
            window.add({"loss_g": loss_g, "loss_d": loss_d, "mel": mel_l1, "fm": fm, "adv": adv, "stft": stft})
            log.add(b * acc.num_processes, b * cfg.segment_size * acc.num_processes)
            if not acc.sync_gradients:
                continue
            ema.update(gen_inner)
            step += 1
            log.step_done(step, window, every=cfg.log_every, last=cfg.steps, lr=lr, heldout=evaluate,
                          eval_every=cfg.eval_every)
            if clip is not None and step % cfg.sample_every == 0:
                with log.paused(), torch.no_grad():
                    if not log.sample_path(None, "reference").is_file():
                        log.audio(None, "reference", clip, mel_cfg.sample_rate)
                    mel = melspec(clip[None])
                    log.audio(step, "vocoder", ema.shadow(mel if vae is None else vae.reconstruct(mel))[0],
                              mel_cfg.sample_rate)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                if acc.is_main_process:
                    save_checkpoint(run_dir, step, training.checkpoint_state(
                        step, cfg, sampler, consumed, model=generator, mpd=mpd, msd=msd, ema=ema,
                        optimizer=opt_g, scheduler=sched_g, disc_optimizer=opt_d, disc_scheduler=sched_d))
                acc.wait_for_everyone()

    final = run_dir / "final"
    if acc.is_main_process:
        export(ema.shadow, melspec.config, final)
    acc.wait_for_everyone()
    acc.end_training()
    return final


def export(shadow: HiFiGANGenerator, mel_cfg: MelConfig, out: Path) -> None:
    """The EMA generator with weight norm folded into plain conv weights, as inference loads it."""
    plain = copy.deepcopy(shadow).cpu()
    plain.remove_weight_norm()
    hub.save_component(plain, out, "vocoder")
    hub.save_component(MelSpectrogram(mel_cfg), out, "mel")
    logger.info("wrote %s", out / "vocoder.safetensors")


if __name__ == "__main__":
    run_script(main)
