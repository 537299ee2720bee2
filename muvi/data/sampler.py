"""A batch sampler that balances files by duration and never puts one file twice in a batch.

MuVi (appendix D) samples a random segment of each long file on the fly, with a sampler that
balances by duration, and needs every clip of a batch to come from a different video so that the
in-batch negatives of the contrastive loss are true negatives. Both requirements meet in one
classical tool: *systematic sampling with probability proportional to size* (Madow, 1949). Each
batch is drawn without replacement, yet every file's inclusion probability is exactly

    pi_i = k * w_i / sum(w)          (k = files per batch, w_i = duration, sqrt or 1)

so over many batches a file is drawn in proportion to its weight, with no duplicate in a batch.
A file so long that pi_i would exceed 1 is capped at 1 (it is in every batch) and the others share
the rest in proportion; that is the closest to proportional that distinct batches allow.

The sampler yields lists of :class:`SegmentKey`; the datasets turn a key into a segment,
deterministically from ``(seed, epoch, draw)``. Every batch's randomness comes from its own
``(seed, epoch, batch)`` seed, so resuming at batch ``b`` costs nothing and is exact.
"""
from __future__ import annotations

import math
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np

WEIGHTINGS = ("duration", "sqrt", "uniform")


class SegmentKey(NamedTuple):
    """What a dataset needs to produce one item; unique within an epoch through ``draw``."""

    index: int                       # file (or pair) index in the dataset
    epoch: int = 0
    draw: int = 0                    # position of this draw in the epoch's stream
    seconds: Optional[float] = None  # segment length asked for (None: the dataset draws one)


def inclusion_probabilities(weights: np.ndarray, k: int) -> np.ndarray:
    """pi_i = k * w_i / sum(w), with values above 1 capped at 1 and the rest rescaled.

    They sum to ``k``: the expected number of files per batch.
    """
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("weights must be finite and non-negative")
    if int((w > 0).sum()) < k:
        raise ValueError(f"only {int((w > 0).sum())} files have a positive weight; "
                         f"a batch of {k} distinct files is impossible")
    pi = np.zeros_like(w)
    capped = np.zeros(w.shape, dtype=bool)
    while True:
        free = ~capped
        pi[capped] = 1.0
        pi[free] = (k - capped.sum()) * w[free] / w[free].sum()
        over = free & (pi > 1.0)
        if not over.any():
            return pi
        capped |= over


def systematic_pps(pi: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw ``round(sum(pi))`` distinct indices, index ``i`` with probability exactly ``pi[i]``.

    Madow's method: lay the units end to end in a random order, each as an interval of length
    ``pi_i`` <= 1, and take the units hit by the points ``u, u+1, ..., u+k-1``, u ~ U[0, 1).
    The random order makes the within-batch joint draws vary; no interval can hold two points.
    """
    k = int(round(pi.sum()))
    for _ in range(8):  # a repeat needs a float tie at an interval end: astronomically rare
        order = rng.permutation(len(pi))
        edges = np.cumsum(pi[order])
        points = rng.uniform() + np.arange(k)
        hit = np.minimum(np.searchsorted(edges, points, side="right"), len(pi) - 1)
        chosen = order[hit]
        if len(np.unique(chosen)) == k:
            return chosen
    raise RuntimeError("systematic sampling kept producing duplicates")  # pragma: no cover


class DurationBalancedBatchSampler:
    """Batches of distinct files, each file drawn in proportion to its duration.

    Use as ``DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_segments)``.

    Sharding: with ``rank``/``world_size`` each process gets its own slice of a *global* batch
    of ``batch_size * world_size`` distinct files (so negatives stay distinct even after an
    all-gather); with fewer files than that, each rank draws its own distinct batch. Under
    Accelerate either build the sampler with the process's rank and world size and leave the
    data loader out of ``accelerator.prepare``, or build it with ``world_size=1`` and let
    ``prepare`` shard whole batches across processes (batches stay distinct within each).

    Epochs: ``batches_per_epoch`` batches (default: as many as fill ``num_files`` draws once);
    call :meth:`set_epoch` each epoch, as with ``DistributedSampler``.

    Resume: :meth:`state_dict` records the epoch and the next batch. A ``DataLoader`` pulls
    batches ahead of the training loop, so pass the number of batches the loop actually
    consumed this epoch (``state_dict(consumed=step_in_epoch)``) for an exact resume.
    """

    def __init__(self, durations: Sequence[float], batch_size: int, *,
                 batches_per_epoch: Optional[int] = None, weighting: str = "duration",
                 seed: int = 0, rank: int = 0, world_size: int = 1,
                 segment_seconds: Optional[tuple[float, float]] = None,
                 frame_rate: float = 10.0) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size}, rank={rank}, world_size={world_size}")
        d = np.asarray(durations, dtype=np.float64)
        if d.ndim != 1 or len(d) == 0:
            raise ValueError("durations must be a non-empty 1D sequence")
        weights = {"duration": d, "sqrt": np.sqrt(np.maximum(d, 0)), "uniform": (d > 0) * 1.0}[weighting]
        self.num_files, self.batch_size, self.weighting = len(d), int(batch_size), weighting
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        global_size = self.batch_size * self.world_size
        # Global distinctness when the files allow it, else distinct within each rank's batch.
        self.global_distinct = int((weights > 0).sum()) >= global_size
        self.pi = inclusion_probabilities(weights, global_size if self.global_distinct else self.batch_size)
        if batches_per_epoch is None:
            batches_per_epoch = max(1, self.num_files // global_size)
        self.batches_per_epoch = int(batches_per_epoch)
        if segment_seconds is not None:
            lo, hi = segment_seconds
            if not 0 < lo <= hi:
                raise ValueError(f"segment_seconds must be (low, high) with 0 < low <= high, got {segment_seconds}")
        self.segment_seconds = segment_seconds
        self.frame_rate = float(frame_rate)
        self.epoch = 0
        self._next = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._next = int(epoch), 0

    def batch(self, epoch: int, batch: int) -> list[SegmentKey]:
        """This rank's keys for batch ``batch`` of ``epoch``: a pure function of the arguments."""
        global_size = self.batch_size * self.world_size
        rng = np.random.default_rng([self.seed, epoch, batch])
        seconds = None
        if self.segment_seconds is not None:
            # One length per global batch: every rank pads nothing and works equally long.
            lo, hi = (x * self.frame_rate for x in self.segment_seconds)
            seconds = int(rng.integers(math.ceil(lo - 1e-6), math.floor(hi + 1e-6) + 1)) / self.frame_rate
        offset = self.rank * self.batch_size
        if self.global_distinct:
            files = systematic_pps(self.pi, rng)[offset:offset + self.batch_size]
        else:
            files = systematic_pps(self.pi, np.random.default_rng([self.seed, epoch, batch, self.rank]))
        return [SegmentKey(int(f), int(epoch), batch * global_size + offset + i, seconds)
                for i, f in enumerate(files)]

    def __iter__(self) -> Iterator[list[SegmentKey]]:
        epoch, start = self.epoch, self._next
        for b in range(start, self.batches_per_epoch):
            self._next = b + 1
            yield self.batch(epoch, b)
        self._next = 0  # a finished epoch replays from its start unless set_epoch moves on

    def state_dict(self, consumed: Optional[int] = None) -> dict:
        """Position to resume from: ``consumed`` batches of the current epoch done (default:
        as many as this sampler has handed out, which overcounts under DataLoader prefetch)."""
        return {"epoch": self.epoch, "batch": self._next if consumed is None else int(consumed),
                "seed": self.seed, "num_files": self.num_files, "batch_size": self.batch_size,
                "world_size": self.world_size, "weighting": self.weighting}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_files", "batch_size", "world_size", "weighting"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state was saved with {key}={state[key]!r}, "
                                 f"this sampler has {getattr(self, key)!r}")
        self.epoch, self._next = int(state["epoch"]), int(state["batch"])
