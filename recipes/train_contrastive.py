"""Recipe 3: contrastive music-visual pre-training of the visual adaptor (paper section 3.2).

    accelerate launch recipes/train_contrastive.py --config recipes/configs/contrastive_paper.json \
        --run-dir runs/contrastive --set data=pairs.csv video_encoder=vit_b_k710_dl_from_giant.pth \
        audio_encoder=audiomae_pretrained.pth [--resume]

Frozen VideoMAE V2 and AudioMAE (the paper's); the adaptor, the audio head and the temperature
learn (``ContrastiveModel``). Without those weights: ``video_encoder=efficientnet-lite0`` and
``audio_encoder=musicnn`` (package weights; see ``muvi.hub.load_encoder`` for every spec). With ``token_cache=DIR`` (the
``extract_features.py --pairs`` cache the video-to-music stage reads) the video tokens come from
the cache instead of decoding and encoding every clip each step, and the music from each pair's
audio file; ``video_encoder`` must then name the encoder that made the cache (checked).

Each step: a batch of (video, music) segments, every clip from a different video; for each
pair two constructed negatives (beat-aware temporal shift, random replacement by another pair's
music; silence where one cannot be built); CLIP loss with the in-batch music and the pair's own
negatives as the candidates of each video.

Decisions:
- Equal lengths: the sampler draws one segment length per global batch (``same_length``), so
  clips only differ when a file is shorter than the drawn length; each batch is then cropped
  to its shortest clip (frames and music), which keeps the similarity a plain mean over frames.
- In-batch negatives are the GLOBAL batch's (``global_negatives``, on by default): with several
  processes each one gathers the others' video and music embeddings
  (``ContrastiveModel.loss(gather=True)``), so 8 processes × 20 clips train like the paper's
  batch of 160; the sampler keeps the global batch distinct. Every process then crops its batch
  to the shortest clip of the global batch (one all-gather of the frame count per batch).
- Beat tracking (deterministic) runs in the data-loader workers; every random choice of the
  negatives comes from a numpy RNG seeded by ``step_generator``, so a resume is exact.
- The video encoder runs under autocast (bf16 on GPU); the music encoder always in fp32.
- ``heldout`` (pairs kept out of training, like ``data`` or ``token_cache``), ``eval_every``: the CLIP
  loss of its fixed segments and negatives, each process's batch against itself only (no all-gather).
Outputs: ``final/`` holds the components ``contrastive`` (EMA weights; keys ``adaptor.*``,
``audio_head.*``, ``logit_scale``), ``video_encoder`` and ``audio_encoder`` (recorded by spec, or
saved when random), read by ``muvi.eval.sim.SimilarityScorer.from_pretrained`` for SIM.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from muvi import training
from muvi.cli import run_script
from muvi.config import Config, ConfigError
from muvi.data.audio_io import load_audio
from muvi.data.datasets import VideoMusicDataset, collate_segments, fit_length
from muvi.data.features import CachedLatentDataset
from muvi.data.negatives import beat_cycle_frames, make_negative
from muvi.data.sampler import DurationBalancedBatchSampler
from muvi.encoders.audiomae import AudioMAEConfig, AudioMAEEncoder
from muvi.encoders.frames import encode_frames, encode_music
from muvi.encoders.videomae import VideoMAEConfig, VideoMAEEncoder
from muvi.eval.sim import SimilarityScorer
from muvi.hub import load_encoder
from muvi.models.contrastive import ContrastiveConfig, ContrastiveModel
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

logger = logging.getLogger("train_contrastive")
KINDS = ("shift", "replace", "silence")  # negatives as built (silence: where none could be)


@dataclasses.dataclass
class ContrastiveTrainConfig(Config):
    # data: a folder of videos with their own music, or a CSV of "video,audio" rows
    data: str = ""
    sample_rate: int = 16000          # AudioMAE's rate: loading at it saves a resample
    fps: float = 10.0
    min_seconds: float = 4.0
    max_seconds: float = 30.0
    same_length: bool = True          # one segment length per batch (see the module docstring)
    global_negatives: bool = True     # in-batch negatives from every process (all-gather)
    skip_unreadable: bool = True      # leave out (and list) pairs whose headers cannot be read
    # frozen encoders: a spec (checkpoint path, packaged name), or "" for the preset with RANDOM
    # weights (tests only)
    video_encoder: str = ""
    video_encoder_preset: str = "vit-b"
    audio_encoder: str = ""
    audio_encoder_preset: str = "vit-b"
    token_cache: str = ""             # a pair feature cache: read tokens instead of encoding video
    encoder_batch: int = 64           # video clips per encoder call (bounds memory)
    # learnable part: a ContrastiveConfig preset plus field overrides
    model: str = "base"
    model_overrides: dict = dataclasses.field(default_factory=dict)
    # constructed negatives, one per entry for every pair ([] = in-batch negatives only)
    negatives: list = dataclasses.field(default_factory=lambda: ["shift", "replace"])
    shift_zone: float = 0.125
    shift_max_beats: float = 4.0
    replace_min_frac: float = 0.2
    replace_max_frac: float = 0.5
    replace_margin: float = 0.05
    crossfade_seconds: float = 0.1
    # optimisation
    steps: int = 2_000_000
    batch_size: int = 160
    grad_accum: int = 1
    optim: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(
        lr=5e-5, weight_decay=0.01, warmup_steps=1000, grad_clip=1.0))
    ema_decay: float = 0.999
    heldout: str = ""                 # held-out pairs (see the module docstring), every eval_every steps
    eval_every: int = 0
    log_every: int = 100
    # Accelerate trackers: "auto" (TensorBoard when installed), "none", "tensorboard", "wandb"
    log_with: str = "auto"
    ckpt_every: int = 5000
    seed: int = 0
    mixed_precision: str = "auto"
    num_workers: int = 4

    def __post_init__(self):
        bad = sorted(set(self.negatives) - {"shift", "replace"})
        if bad:
            raise ConfigError(f"negatives: unknown kinds {bad}; use 'shift' and/or 'replace'")


def build_encoders(cfg: ContrastiveTrainConfig, device) -> tuple[nn.Module, nn.Module, Optional[str], Optional[str]]:
    """The two frozen encoders on ``device`` and the specs that rebuild them (None: random preset weights)."""
    if cfg.video_encoder:
        video, video_source = load_encoder(cfg.video_encoder, "video")
    else:
        logger.warning("!!! video encoder: VideoMAE preset %r with RANDOM frozen weights; the adaptor "
                       "learns nothing useful. Pass --set video_encoder=PATH for real training. !!!",
                       cfg.video_encoder_preset)
        with training.seeded(cfg.seed + 1):
            video, video_source = VideoMAEEncoder(VideoMAEConfig.preset(cfg.video_encoder_preset)), None
    if cfg.audio_encoder:
        audio, audio_source = load_encoder(cfg.audio_encoder, "audio")
    else:
        logger.warning("!!! audio encoder: AudioMAE preset %r with RANDOM frozen weights; SIM from this "
                       "run is meaningless. Pass --set audio_encoder=PATH for real training. !!!",
                       cfg.audio_encoder_preset)
        with training.seeded(cfg.seed + 2):
            audio, audio_source = AudioMAEEncoder(AudioMAEConfig.preset(cfg.audio_encoder_preset)), None
    return (*(m.to(device).eval().requires_grad_(False) for m in (video, audio)), video_source, audio_source)


def model_config(cfg: ContrastiveTrainConfig, video: nn.Module, audio: nn.Module) -> ContrastiveConfig:
    """The preset with overrides; the encoder widths and the frame rate come from the run."""
    mc = ContrastiveConfig.preset(cfg.model, **cfg.model_overrides)
    return dataclasses.replace(mc, audio_dim=audio.config.hidden_size, frame_rate=cfg.fps,
                               adaptor={**mc.adaptor, "encoder_dim": video.config.hidden_size})


class CachedPairDataset(CachedLatentDataset):
    """Segments of a pair feature cache: the cached video tokens with the pair's music decoded at
    ``sample_rate`` over the same span. Item: ``tokens`` (N, h, w, E), ``music`` (samples,),
    ``frames`` (T, the segment's length at the cache's latent rate), ``video_path``, ``start``."""

    def __init__(self, root: str, sample_rate: int, **kwargs):
        super().__init__(root, with_video=True, **kwargs)
        self.sample_rate = sample_rate

    def __getitem__(self, key) -> dict:
        item = super().__getitem__(key)
        meta = self.cache.meta(item["id"])
        start, seconds = item["start"], item["end"] - item["start"]
        music = fit_length(load_audio(meta["audio"], self.sample_rate, offset=start, duration=seconds),
                           int(round(seconds * self.sample_rate)), Path(meta["audio"]))
        return {"tokens": item["tokens"].float(), "music": music, "frames": item["mean"].shape[0],
                "video_path": meta["video"], "start": start}


def collate_cropped(items: list[dict], sample_rate: int, fps: float, track_beats: bool,
                    frames_per_token: int = 1) -> dict:
    """Stack a batch cropped to its shortest clip, with each clip's beat cycle in frames
    (0 where none can be trusted). Runs in the loader workers: beat tracking is the slow part.
    Items carry decoded ``frames`` (F, 3, H, W), or cached ``tokens`` with a frame count."""
    frames = min(it["frames"] if "tokens" in it else it["frames"].shape[0] for it in items)
    if "tokens" in items[0]:
        pad = functools.partial(torch.nn.utils.rnn.pad_sequence, batch_first=True)
        batch = {"tokens": pad([it["tokens"] for it in items]), "music": pad([it["music"] for it in items]),
                 "video_path": [it["video_path"] for it in items], "start": [it["start"] for it in items]}
    else:
        batch = collate_segments(items)
    batch = crop_batch(batch, frames, sample_rate, fps, frames_per_token)
    cycles = [beat_cycle_frames(m, sample_rate, fps) if track_beats else None for m in batch["music"]]
    batch["beat_cycle"] = [c or 0.0 for c in cycles]
    return batch


def crop_batch(batch: dict, frames: int, sample_rate: int, fps: float, frames_per_token: int = 1) -> dict:
    """A collated batch cut to its first ``frames`` frames (music, decoded frames or tokens)."""
    samples = int(round(frames * sample_rate / fps))
    out = {**batch, "music": batch["music"][:, :samples], "num_frames": frames}
    if "tokens" in batch:
        out["tokens"] = batch["tokens"][:, :-(-frames // frames_per_token)]
    if "frames" in batch:
        out["frames"] = batch["frames"][:, :frames]
    if "music_lengths" in batch:
        out["music_lengths"] = batch["music_lengths"].clamp(max=samples)
    return out


def build_negatives(music: torch.Tensor, cycles: Sequence[float], rng: np.random.Generator,
                    cfg: ContrastiveTrainConfig) -> tuple[torch.Tensor, list[str]]:
    """(B, N) music → (B, K, N) negatives, K = len(cfg.negatives), and the kind actually built."""
    b = music.shape[0]
    out, kinds = torch.zeros(b, len(cfg.negatives), music.shape[1], dtype=music.dtype), []
    for i in range(b):
        for k, kind in enumerate(cfg.negatives):
            other = None
            if kind == "replace" and b > 1:
                other = music[(i + int(rng.integers(1, b))) % b]  # another pair of the batch
            neg = make_negative(music[i], cfg.sample_rate, cfg.fps, other, rng, kind=kind,
                                zone=cfg.shift_zone, max_beats=cfg.shift_max_beats,
                                min_frac=cfg.replace_min_frac, max_frac=cfg.replace_max_frac,
                                margin=cfg.replace_margin, crossfade_seconds=cfg.crossfade_seconds,
                                beat_cycle=cycles[i])
            out[i, k] = neg.waveform
            kinds.append(neg.kind)
    return out, kinds


def clip_loss(model: nn.Module, video_enc: nn.Module, audio_enc: nn.Module, batch: dict, gen: torch.Generator,
              cfg: ContrastiveTrainConfig, autocast, gather: bool) -> tuple[torch.Tensor, dict, list[str]]:
    """(loss, the model's stats, the kind of every negative built) of one batch: negatives from
    ``gen``, frozen features, then the CLIP loss (training and the held-out loss alike)."""
    device = next(model.parameters()).device
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device)))
    music, t, b = batch["music"], batch["num_frames"], len(batch["music"])
    negatives, kinds = build_negatives(music, batch["beat_cycle"], rng, cfg)
    feats = encode_music(audio_enc, torch.cat([music, negatives.flatten(0, 1)]).to(device), cfg.sample_rate,
                         cfg.fps, t)
    if "tokens" in batch:
        tokens = batch["tokens"].to(device)
    else:
        with autocast():
            # Tokens are computed once per batch: every negative shares its pair's video.
            tokens = encode_frames(video_enc, batch["frames"], cfg.encoder_batch)
    with autocast():
        loss, stats = model(tokens, feats[:b], feats[b:].unflatten(0, (b, len(cfg.negatives))), gather=gather)
    return loss, stats, kinds


def pair_data(cfg: ContrastiveTrainConfig, source: str, video_enc: nn.Module,
              acc) -> tuple[DurationBalancedBatchSampler, DataLoader, int]:
    """The sampler (this process's shard), loader and video frames per token step of a pair
    source: a pair feature cache (with ``token_cache``) or a folder / CSV of videos with music."""
    frames_per_token = 1
    if cfg.token_cache:
        dataset = CachedPairDataset(source, cfg.sample_rate, min_seconds=cfg.min_seconds,
                                    max_seconds=cfg.max_seconds, latent_rate=cfg.fps, seed=cfg.seed)
        check_cache_encoder(dataset.cache.info, video_enc, source)
        frames_per_token = dataset.frames_per_token
    else:
        dataset = VideoMusicDataset(source, cfg.sample_rate, cfg.min_seconds, cfg.max_seconds, cfg.seed, fps=cfg.fps,
                                    size=video_enc.config.image_size, skip_unreadable=cfg.skip_unreadable)
    if getattr(dataset, "skipped", None):
        logger.warning("left out %d unreadable pair(s) of %s: %s", len(dataset.skipped), source,
                       "; ".join(f"{path} ({why})" for path, why in dataset.skipped))
    sampler = DurationBalancedBatchSampler(
        dataset.durations, cfg.batch_size, seed=cfg.seed, rank=acc.process_index, world_size=acc.num_processes,
        segment_seconds=(cfg.min_seconds, cfg.max_seconds) if cfg.same_length else None, frame_rate=cfg.fps)
    collate = functools.partial(collate_cropped, sample_rate=cfg.sample_rate, fps=cfg.fps,
                                track_beats="shift" in cfg.negatives, frames_per_token=frames_per_token)
    # Persistent workers: epochs can be short, and each new worker pays librosa's JIT start-up.
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.num_workers,
                        persistent_workers=cfg.num_workers > 0)
    return sampler, loader, frames_per_token


def check_cache_encoder(info: dict, encoder: nn.Module, cache: str) -> None:
    """The cache's tokens must come from the encoder SIM will run: same config (weights are not
    compared; extract_features records the encoder's config in info.json)."""
    made_with, ours = info.get("video_encoder"), json.loads(json.dumps(encoder.config.to_dict()))  # tuples → lists
    if made_with is not None and made_with != ours:
        changed = sorted(k for k in set(made_with) | set(ours) if made_with.get(k) != ours.get(k))
        raise ConfigError(f"token_cache {cache} was made with a different video encoder (differs in {changed}); "
                          f"set video_encoder to the one given to extract_features")


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = recipe_parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg = load_config(ContrastiveTrainConfig, args.config, args.overrides)
    if not cfg.data and not cfg.token_cache:
        raise ConfigError("no training data: --set data=FOLDER_OR_CSV (or token_cache=PAIR_FEATURE_CACHE)")
    if cfg.data and cfg.token_cache:
        raise ConfigError("set data OR token_cache, not both (the cache names its own videos and music)")
    run_dir = Path(args.run_dir)
    acc = make_accelerator(cfg.mixed_precision, cfg.grad_accum, log_with=cfg.log_with, run_dir=run_dir)
    setup_logging(acc.is_main_process)
    device, rank = acc.device, acc.process_index

    video_enc, audio_enc, video_source, audio_source = build_encoders(cfg, device)
    with training.seeded(cfg.seed):
        model = ContrastiveModel(model_config(cfg, video_enc, audio_enc)).to(device)
    opt = training.make_optimizer(cfg.optim, model)
    scheduler = training.make_scheduler(opt, cfg.optim, cfg.steps)
    ema = EMA(model, cfg.ema_decay)
    sampler, loader, frames_per_token = pair_data(cfg, cfg.token_cache or cfg.data, video_enc, acc)
    heldout = pair_data(cfg, cfg.heldout, video_enc, acc)[1] if cfg.heldout and cfg.eval_every else None

    step = 0
    ckpt, state = training.resume(run_dir, required=True) if args.resume else (None, None)
    if ckpt is not None:
        training.restore(state, model=model, ema=ema, optimizer=opt, scheduler=scheduler, sampler=sampler)
        step = int(state["step"])
        logger.info("resumed from %s at step %d", ckpt, step)
    model, opt = acc.prepare(model, opt)

    heldout_loss = lambda batch, gen: clip_loss(acc.unwrap_model(model), video_enc, audio_enc, batch, gen, cfg,
                                                acc.autocast, False)[0]

    consumed = sampler.state_dict()["batch"]  # batches of the current epoch already trained on
    stream = training.batch_stream(loader, sampler)
    window = training.LossWindow()
    gather = cfg.global_negatives and acc.num_processes > 1
    logger.info("training %d trainable parameters from step %d to %d, batch %d x %d process(es) x %d accum, "
                "in-batch negatives from %s", sum(p.numel() for p in model.parameters()), step, cfg.steps,
                cfg.batch_size, acc.num_processes, cfg.grad_accum, "every process" if gather else "each process alone")
    log = training.RunLog(acc, run_dir, cfg, "contrastive", step=step, total=cfg.steps, progress=args.progress)
    with log:
        micro = step * cfg.grad_accum  # micro-batches done: the step generator's index
        evaluate = None if heldout is None else (
            lambda: training.heldout_loss(heldout_loss, heldout, [model], acc, cfg.seed))
        while step < cfg.steps:
            consumed, batch = next(stream)
            if gather:  # the loss compares clips across processes: one length for all of them
                frames = int(acc.gather(torch.tensor([batch["num_frames"]], device=device)).min())
                batch = crop_batch(batch, frames, cfg.sample_rate, cfg.fps, frames_per_token)  # views: cheap
            gen = step_generator(cfg.seed, micro, rank)
            lr = scheduler.get_last_lr()[0]  # this step's rate, for the log
            micro += 1
            with acc.accumulate(model):  # gradient all-reduce on the last micro-batch of a step only
                loss, stats, kinds = clip_loss(model, video_enc, audio_enc, batch, gen, cfg, acc.autocast, gather)
                check_finite(loss, step + 1, ", ".join(f"{Path(p).name}@{s:.1f}s"
                                                   for p, s in zip(batch["video_path"], batch["start"])))
                acc.backward(loss)  # divided by grad_accum inside
                if acc.sync_gradients and cfg.optim.grad_clip:
                    window.add({"grad_norm": acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)})
                opt.step()  # a no-op until the last micro-batch (Accelerate)
                opt.zero_grad(set_to_none=True)
                if acc.sync_gradients:
                    scheduler.step()
            window.add({"loss": loss, "frames": batch["num_frames"],
                        **{k: v for k, v in stats.items() if k != "neg_sims"},
                        **{f"neg_{kind}": kinds.count(kind) for kind in KINDS}})  # negatives per batch
            sims = stats["neg_sims"].flatten() if "neg_sims" in stats else torch.zeros(0, device=device)
            for kind in KINDS:  # each kind's mean similarity, weighted by how many were built
                mask = torch.tensor([k == kind for k in kinds], dtype=sims.dtype, device=sims.device)
                window.add({f"{kind}_sim": (sims * mask).sum() / max(1, kinds.count(kind))}, weight=kinds.count(kind))
            log.add(len(batch["music"]), len(batch["music"]) * batch["num_frames"])
            if not acc.sync_gradients:
                continue
            ema.update(acc.unwrap_model(model))
            step += 1
            log.step_done(step, window, every=cfg.log_every, last=cfg.steps, lr=lr, heldout=evaluate,
                          eval_every=cfg.eval_every)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                if acc.is_main_process:
                    save_checkpoint(run_dir, step, training.checkpoint_state(
                        step, cfg, sampler, consumed, model=model, ema=ema, optimizer=opt, scheduler=scheduler))
                acc.wait_for_everyone()

    final = run_dir / "final"
    if acc.is_main_process:
        scorer = SimilarityScorer(ema.shadow, video_enc, audio_enc)
        scorer.save_pretrained(final, video_source=video_source, audio_source=audio_source)
        logger.info("wrote the EMA weights to %s", final)
    acc.wait_for_everyone()
    acc.end_training()
    return final


if __name__ == "__main__":
    run_script(main)
