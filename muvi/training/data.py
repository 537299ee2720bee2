"""The music data of the mel recipes (VAE, vocoder): loaders, random crops, an endless batch stream."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- recipe helpers

def music_files(spec: str) -> str | list[str]:
    """A folder as it is, or the paths listed in a .txt file (relative to that file)."""
    path = Path(spec)
    if path.suffix == ".txt" and path.is_file():
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        return [str(path.parent / ln) for ln in lines if ln and not ln.startswith("#")]
    return spec


def music_data(music: str, sample_rate: int, min_seconds: float, max_seconds: float, batch_size: int, *,
               seed: int, num_workers: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False):
    """(MusicDataset, DurationBalancedBatchSampler, DataLoader) of random segments of the music
    files ``music`` names (:func:`music_files`); unreadable files are left out and listed."""
    from torch.utils.data import DataLoader

    from muvi.data.datasets import MusicDataset, collate_segments
    from muvi.data.sampler import DurationBalancedBatchSampler

    dataset = MusicDataset(music_files(music), sample_rate, min_seconds, max_seconds, seed, skip_unreadable=True)
    sampler = DurationBalancedBatchSampler(dataset.durations, batch_size, seed=seed, rank=rank,
                                           world_size=world_size)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_segments,
                        num_workers=num_workers, pin_memory=pin_memory)
    return dataset, sampler, loader


def random_crop(mel: torch.Tensor, valid: torch.Tensor, frames: int, gen: torch.Generator,
                pad_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """mel (B, M, T) with valid frame counts (B,) → a random window (B, M, frames) per clip and its
    start frame (B,), drawn from ``gen``. Clips shorter than the window start at 0 and run into the
    batch padding; a batch shorter than the window is padded with ``pad_value`` (log-mel silence)."""
    if mel.shape[-1] < frames:
        mel = torch.nn.functional.pad(mel, (0, frames - mel.shape[-1]), value=pad_value)
    room = (valid - frames).clamp_min(0)
    u = torch.rand(valid.shape, generator=gen, device=gen.device).to(valid.device)
    start = (u * (room + 1)).long().clamp_max(room)
    index = start[:, None] + torch.arange(frames, device=mel.device)  # (B, frames)
    return mel.gather(2, index[:, None, :].expand(-1, mel.shape[1], -1)), start


def batch_stream(loader, sampler):
    """Endless (batches consumed this epoch, batch); moves to the next epoch when one ends."""
    consumed = sampler.state_dict()["batch"]
    while True:
        for batch in loader:
            consumed += 1
            yield consumed, batch
        sampler.set_epoch(sampler.epoch + 1)
        consumed = 0


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module):
    """Parameters stop requiring grad while the generator's loss runs through the discriminators."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def batch_names(batch: dict) -> str:
    return ", ".join(f"{Path(p).name}@{s:.1f}-{e:.1f}s"
                     for p, s, e in zip(batch["path"], batch["start"], batch["end"]))
