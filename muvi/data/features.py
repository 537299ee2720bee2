"""The cache of frozen features: VAE posteriors of music and video-encoder tokens of videos.

The VAE encoder and the video encoder never learn during DiT / video-to-music training, so they
run once over the data (``recipes/extract_features.py``) and training reads this cache.

Shapes: T latent frames (10 Hz), C latent channels, N video token steps (5 Hz: one per
``tubelet`` frames at 10 FPS, i.e. one per ``k = 2`` latent frames; CLIP's tubelet of 1 gives one
per latent frame), h x w patch grid, E width.

Layout of a cache folder::

    info.json                 what made the features (mel/VAE/encoder configs, weight hashes, rates)
    shard_00000.safetensors   tensors "<item_id>/mean" (T, C) fp32, ".../logvar", ".../tokens" (N, h, w, E) fp16,
                              and ".../cls" (N, E) fp16 from an encoder with a class token (CLIP)
    index.jsonl               one row per item: id, shard, source paths, duration, latent_frames, ...
    failed.jsonl              files that could not be read, with the error

Crash safety: a shard is written under a temporary name, fsynced and renamed; only then are its
index rows appended. An interrupted extraction therefore loses at most the shard being filled;
on restart :class:`FeatureWriter` deletes temporary and unindexed shards and ``done()`` lists the
ids to skip. A folder may also hold sub-caches (``rank0/``, ``rank1/`` ... written by several
extraction processes): :class:`FeatureCache` reads them together.

Whole-file posteriors are cached, not segments, so that training can cut a fresh 4-30 s segment
each time (appendix D) and draw the latent from the posterior each step.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from muvi.data.datasets import KeyedSegmentDataset, draw_aligned_segment

logger = logging.getLogger(__name__)

INDEX, FAILED, INFO = "index.jsonl", "failed.jsonl", "info.json"
#: Shards a reader keeps open (memory-mapped), so that a shard's header is parsed only once.
MAX_OPEN_SHARDS = 64


# ----------------------------------------------------------------------------- writing

def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; a torn last line (crash mid-append) is ignored."""
    if not path.is_file():
        return []
    rows, lines = [], path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise ValueError(f"{path}:{number}: not valid JSON") from None
            logger.warning("%s: ignoring a torn last line (interrupted write)", path)
    return rows


def _append_jsonl(path: Path, rows: Sequence[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cached_ids(root: str | os.PathLike) -> set[str]:
    """Ids indexed in ``root`` and its sub-caches (empty when there is no cache yet)."""
    root = Path(root)
    folders = [root] + [p for p in root.glob("*") if (p / INDEX).is_file()]
    return {row["id"] for folder in folders for row in _read_jsonl(folder / INDEX)}


class FeatureWriter:
    """Buffers items and writes them as safetensors shards of about ``shard_megabytes``.

    ``info`` (optional) describes what made the features; it is written to ``info.json`` on
    first use and must match on every later run, so a cache never mixes two models' features.
    ``read_info`` (optional) brings a stored ``info`` to the current form before that
    comparison (e.g. fills in the config fields a newer muvi added, at their defaults), so a
    cache made by an older version resumes; the stored file is left as it is.
    Not safe for two writers on one folder: give each process its own sub-folder.
    """

    def __init__(self, root: str | os.PathLike, shard_megabytes: float = 256, *,
                 info: Optional[dict] = None, read_info: Optional[Callable[[dict], dict]] = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.shard_bytes = max(1, int(shard_megabytes * 2 ** 20))
        if info is not None:
            path = self.root / INFO
            if path.is_file():
                old, new = json.loads(path.read_text(encoding="utf-8")), json.loads(json.dumps(info))
                if read_info is not None:
                    old = json.loads(json.dumps(read_info(old)))
                if old != new:
                    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                    raise ValueError(f"{self.root} holds features made differently (fields {diff} differ); "
                                     f"use a new output folder")
            else:
                path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        index = self.root / INDEX
        if index.is_file():  # drop a torn last line so that appends start on a fresh line
            text = index.read_text(encoding="utf-8")
            if text and not text.endswith("\n"):
                index.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
        rows = _read_jsonl(index)
        self._done = {row["id"] for row in rows}
        used = {row["shard"] for row in rows}
        for stray in list(self.root.glob(".*.tmp")) + [p for p in self.root.glob("shard_*.safetensors")
                                                        if p.name not in used]:
            logger.warning("removing %s left by an interrupted extraction", stray)
            stray.unlink()
        numbers = [int(name[6:11]) for name in used]
        self._next_shard = max(numbers, default=-1) + 1
        failed = [r for r in _read_jsonl(self.root / FAILED) if r["id"] not in self._done]
        self._failed = {r["id"]: r for r in failed}  # latest row per id
        self._rewrite_failed()
        self._buffer: dict[str, torch.Tensor] = {}
        self._rows: list[dict] = []
        self._pending: set[str] = set()
        self._bytes = 0

    def done(self) -> set[str]:
        """Ids already safely on disk (from ``index.jsonl``)."""
        return set(self._done)

    def failed(self) -> dict[str, dict]:
        return dict(self._failed)

    def add(self, item_id: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if item_id in self._done or item_id in self._pending:
            raise ValueError(f"item {item_id!r} is already in the cache")
        if not tensors or any("/" in name for name in tensors):
            raise ValueError(f"{item_id}: tensor names must be non-empty and contain no '/'")
        row = {**meta, "id": item_id,
               "shapes": {name: list(t.shape) for name, t in tensors.items()}}
        for name, value in tensors.items():
            value = value.detach().cpu().contiguous()
            self._buffer[f"{item_id}/{name}"] = value
            self._bytes += value.numel() * value.element_size()
        self._rows.append(row)
        self._pending.add(item_id)
        if self._bytes >= self.shard_bytes:
            self.flush()

    def fail(self, item_id: str, source: str, error: str) -> None:
        logger.warning("cannot extract %s: %s", source, error)
        row = {"id": item_id, "source": str(source), "error": str(error)}
        retried = item_id in self._failed
        self._failed[item_id] = row
        if retried:  # one row per file: the latest error
            self._rewrite_failed()
        else:
            _append_jsonl(self.root / FAILED, [row])

    def flush(self) -> None:
        """Write the buffered items as one shard, then index them."""
        from safetensors.torch import save_file

        if not self._rows:
            return
        name = f"shard_{self._next_shard:05d}.safetensors"
        tmp = self.root / f".{name}.tmp"
        save_file(self._buffer, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.root / name)
        _fsync_dir(self.root)
        rows = [{**row, "shard": name} for row in self._rows]
        _append_jsonl(self.root / INDEX, rows)
        self._done.update(row["id"] for row in rows)
        if any(self._failed.pop(row["id"], None) for row in rows):
            self._rewrite_failed()
        self._next_shard += 1
        self._buffer, self._rows, self._pending, self._bytes = {}, [], set(), 0

    def close(self) -> None:
        self.flush()

    def _rewrite_failed(self) -> None:
        path, tmp = self.root / FAILED, self.root / f".{FAILED}.tmp"
        if not self._failed and not path.is_file():
            return
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self._failed.values()), encoding="utf-8")
        os.replace(tmp, path)


# ----------------------------------------------------------------------------- reading

class FeatureCache:
    """Read access to a cache folder (or a folder of sub-caches such as ``rank0/``, ``rank1/``).

    ``ids`` are sorted, so dataset indices do not depend on extraction order or process count.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        folders = [self.root] + sorted(p for p in self.root.glob("*") if (p / INDEX).is_file())
        self._rows: dict[str, dict] = {}
        self._folder: dict[str, Path] = {}
        self.failed: list[dict] = []
        self.info: dict = {}
        for folder in folders:
            if (folder / INFO).is_file():
                info = json.loads((folder / INFO).read_text(encoding="utf-8"))
                if self.info and info != self.info:
                    raise ValueError(f"{folder}: sub-caches of {self.root} were made by different models")
                self.info = info
            for row in _read_jsonl(folder / INDEX):
                if row["id"] in self._rows:
                    logger.warning("%s: item %s is indexed twice; using %s", self.root, row["id"], folder)
                self._rows[row["id"]], self._folder[row["id"]] = row, folder
            self.failed += _read_jsonl(folder / FAILED)
        if not self._rows:
            raise FileNotFoundError(f"{self.root}: no feature cache here (no {INDEX} with items); "
                                    f"run recipes/extract_features.py first")
        self.failed = [r for r in self.failed if r["id"] not in self._rows]  # retried with success
        self.ids: list[str] = sorted(self._rows)
        self._handles: dict[Path, object] = {}  # open shards of this process (header parsed once)
        self._pid = os.getpid()

    def __getstate__(self) -> dict:  # DataLoader workers open their own shards
        return {**self.__dict__, "_handles": {}}

    def _open(self, item_id: str):
        from safetensors import safe_open

        if self._pid != os.getpid():  # forked worker: never share the parent's handles
            self._handles, self._pid = {}, os.getpid()
        path = self.shard_path(item_id)
        if path not in self._handles:
            if len(self._handles) >= MAX_OPEN_SHARDS:
                self._handles.pop(next(iter(self._handles)))
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def __len__(self) -> int:
        return len(self.ids)

    def meta(self, item_id: str) -> dict:
        return dict(self._rows[item_id])

    def shard_path(self, item_id: str) -> Path:
        return self._folder[item_id] / self._rows[item_id]["shard"]

    def load(self, item_id: str, names: Optional[Sequence[str]] = None) -> dict[str, torch.Tensor]:
        """Whole tensors of one item (float32), only ``names`` (default all)."""
        names = list(self._rows[item_id]["shapes"]) if names is None else list(names)
        f = self._open(item_id)
        return {n: f.get_tensor(f"{item_id}/{n}").float() for n in names}

    def load_slice(self, item_id: str, spans: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
        """Rows ``[start, stop)`` along the first axis of each named tensor, reading only those."""
        f = self._open(item_id)
        return {n: f.get_slice(f"{item_id}/{n}")[a:b].float() for n, (a, b) in spans.items()}


# ----------------------------------------------------------------------------- training data

class CachedLatentDataset(KeyedSegmentDataset):
    """Random segments of cached posteriors (and video tokens): what DiT training reads.

    Same key semantics as :mod:`muvi.data.datasets`: a :class:`SegmentKey` or an int; items
    are pure functions of ``(seed, epoch, index, draw)``. With ``with_video`` segments start on
    a multiple of the latent frames per token step (2 at 10 FPS), so that the tokens
    ``[start/2, ceil((start+T)/2))`` cover exactly the latent frames ``[start, start+T)``;
    music-only segments start on any frame. Only the segment is read from disk.

    Item: ``{"id", "index", "start", "end" (seconds), "mean", "logvar": float32 (T, C)}`` and,
    with video, ``"tokens": float32 (ceil(T/2), h, w, E)``, plus ``"cls": float32 (ceil(T/2), E)``
    (the same steps) when the cache holds CLS tokens (a CLIP encoder's; absent otherwise).
    ``durations`` (seconds of usable frames per item) feed
    :class:`~muvi.data.sampler.DurationBalancedBatchSampler`.
    """

    unit = "items"

    def __init__(self, root: str | os.PathLike, *, min_seconds: float = 4.0, max_seconds: float = 30.0,
                 latent_rate: float = 10.0, seed: int = 0, with_video: bool = False) -> None:
        super().__init__(min_seconds, max_seconds, seed)
        self.cache = FeatureCache(root)
        cached_rate = self.cache.info.get("latent_rate")
        if cached_rate is not None and abs(cached_rate - latent_rate) > 1e-6:
            raise ValueError(f"{root} holds latents at {cached_rate} Hz, not {latent_rate} Hz")
        self.latent_rate, self.with_video = float(latent_rate), with_video
        self.min_frames = math.ceil(min_seconds * latent_rate - 1e-6)
        self.max_frames = math.floor(max_seconds * latent_rate + 1e-6)
        self.ids = [i for i in self.cache.ids if not with_video or "tokens" in self.cache.meta(i)["shapes"]]
        if not self.ids:
            raise ValueError(f"{root}: no items with video tokens (a music-only cache?)")
        self.frames_per_token = 1
        if with_video:
            self.frames_per_token = int(round(latent_rate / self.cache.info.get("token_rate", latent_rate / 2)))
        self.frames: list[int] = []
        for i in self.ids:
            shapes = self.cache.meta(i)["shapes"]
            usable = shapes["mean"][0]
            if with_video:  # the tokens may stop a frame short of the music, or run past it
                usable = min(usable, shapes["tokens"][0] * self.frames_per_token)
            self.frames.append(usable)
        self.durations: list[float] = [f / self.latent_rate for f in self.frames]

    def __len__(self) -> int:
        return len(self.ids)

    def segment(self, key) -> tuple[int, int, int]:
        """(index, start frame, length in frames) of the segment a key stands for."""
        key, rng = self._key_rng(key)
        frames = None if key.seconds is None else int(round(key.seconds * self.latent_rate))
        start, length = draw_aligned_segment(self.frames[key.index], rng, self.min_frames, self.max_frames,
                                             self.frames_per_token, frames)
        return key.index, start, length

    def __getitem__(self, key) -> dict:
        index, start, length = self.segment(key)
        item_id = self.ids[index]
        spans = {"mean": (start, start + length), "logvar": (start, start + length)}
        if self.with_video:
            k = self.frames_per_token
            spans["tokens"] = (start // k, -(-(start + length) // k))
            if "cls" in self.cache.meta(item_id)["shapes"]:
                spans["cls"] = spans["tokens"]
        item = self.cache.load_slice(item_id, spans)
        return {"id": item_id, "index": index, "start": start / self.latent_rate,
                "end": (start + length) / self.latent_rate, **item}


def collate_latents(items: list[dict]) -> dict:
    """Zero-padded batch: mean/logvar (B, Tmax, C), valid (B, Tmax), lengths (B,), and with
    video tokens (B, Nmax, h, w, E) and token_lengths (B,), and "cls" (B, Nmax, E) when the
    items have CLS tokens (absent otherwise); ids, start as lists."""
    pad = torch.nn.utils.rnn.pad_sequence
    lengths = torch.tensor([it["mean"].shape[0] for it in items])
    out = {"mean": pad([it["mean"] for it in items], batch_first=True),
           "logvar": pad([it["logvar"] for it in items], batch_first=True),
           "lengths": lengths, "ids": [it["id"] for it in items], "start": [it["start"] for it in items]}
    out["valid"] = torch.arange(out["mean"].shape[1])[None] < lengths[:, None]
    if "tokens" in items[0]:
        out["tokens"] = pad([it["tokens"] for it in items], batch_first=True)
        out["token_lengths"] = torch.tensor([it["tokens"].shape[0] for it in items])
    with_cls = sum("cls" in it for it in items)
    if with_cls and with_cls < len(items):  # one encoder makes a cache: all items have them or none
        raise ValueError(f"{with_cls} of {len(items)} items have CLS tokens: features of two video encoders?")
    if with_cls:
        out["cls"] = pad([it["cls"] for it in items], batch_first=True)
    return out
