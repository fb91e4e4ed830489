"""An epoch as arithmetic on the manifest's per-shard counts: which (shard, k-th selected clip) every
position of every stream reads, O(shards) in time and memory, no data and no index read.

WebDataset (default): an epoch is the store's training clips laid out shard after shard, the
shards permuted by (seed, epoch). Every rank takes the same number of whole batches, the fewest that
cover the sequence (wrapping round to its start to fill the last ones), dealt in turn to its
`num_workers` streams, so no rank or loader worker ever runs dry; each stream is a contiguous piece
of the sequence read front to back. Inside a stream a shuffle buffer reorders the samples; its
permutation is computed on positions alone, so resuming after `k` batches replays the buffer's draws
without data and skips the samples already consumed without decoding them (a shard is read only
from the first sample still needed; within it, skipped samples' tar bytes are read, never their
JPEGs).

Zarr: clips are read by index, so an epoch is simply a seeded permutation of the training
clips (a keyed Feistel network, evaluated per position in O(1) memory), split evenly over ranks;
any loader worker can serve any batch.

Elastic resume: the epoch's sequence (permuted shards, or the zarr permutation) does not depend on
the world size or the workers; only its split into streams does. A run resumed on other ranks x
streams ends the stopped split as a phase of the epoch, and the next phase covers what it left
(`EpochPlan.remainder`: per stream, the positions still in the shuffle buffer and those never fed,
in sequence order, as O(streams x buffer) runs), split evenly over the new streams and shuffled with
the phase's own RNG key. Every clip of the epoch is read exactly once, except the wrap-round filler
that makes the phase's last step whole on every rank: fewer than one global batch (ranks x batch)
per phase, as in an epoch never resumed (filler already read counts as read); rounding each stream
up to whole batches instead would repeat up to one global batch per loader worker. The next epoch is
planned for the new world size from scratch, as a fresh run would.
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from student.data.errors import StoreContentError
from student.data.order import FeistelPermutation, ShuffleBuffer
from student.data.selection import Selection
from student.data.store import FORMATS


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


_SHARDS, _SHUFFLE, _AUGMENT, _ZARR = 1, 2, 3, 4   # RNG stream tags


@dataclass(frozen=True, eq=False)
class EpochPlan:
    """One epoch as index arithmetic, O(shards) in memory: position p of stream s is entry
    (start of s + p) mod total of the epoch's sequence, the streams laid end to end (wrapping round, so
    every rank gets `batches_per_rank` whole batches), the sequence being the selected clips of the
    shards laid out in `shard_order` (zarr: taken through a keyed permutation). An entry is found as
    (shard, k-th selected clip of the shard) by bisecting the cumulative counts. A stream's shuffled
    order is drawn on demand."""

    rows: Selection
    shard_order: np.ndarray     # int64 [shards]
    ends: np.ndarray            # int64 [shards]: cumulative selected clips along shard_order
    length: int                 # positions of a rank's first stream, the longest
    batch_size: int
    streams_per_rank: int
    batches_per_rank: int
    shuffle_buffer: int = 0
    permutation: FeistelPermutation | None = None
    seed: int = 0
    epoch: int = 0
    world_size: int = 1
    # A resumed epoch's remainder: int64 [n, 2], (first, count) runs of the epoch's sequence this
    # phase covers, in order (None: all of it); phase: how many phases ran before it.
    runs: np.ndarray | None = None
    phase: int = 0

    @functools.cached_property
    def total(self) -> int:
        """Entries of the sequence this phase covers (the streams wrap round it)."""
        if self.runs is not None:
            return int(self.runs[:, 1].sum())
        return int(self.ends[-1]) if len(self.ends) else 0

    @functools.cached_property
    def _run_ends(self) -> np.ndarray:
        return np.cumsum(self.runs[:, 1])

    def stream_length(self, stream: int) -> int:
        """Positions of a stream: a rank deals its batches to its streams in turn, so its first
        `batches_per_rank % streams_per_rank` streams have one batch more than the others."""
        w = stream % self.streams_per_rank
        return min(self.length, -(-(self.batches_per_rank - w) // self.streams_per_rank) * self.batch_size)

    @functools.cached_property
    def _starts(self) -> np.ndarray:
        """Where each stream starts in the phase's positions (streams end to end)."""
        streams = self.world_size * self.streams_per_rank
        return np.cumsum([0] + [self.stream_length(s) for s in range(streams)], dtype=np.int64)

    def _key(self, *key: int) -> np.random.Generator:
        """The phase's RNG stream: phase 0 keeps the key of an epoch never resumed elsewhere."""
        return _rng(self.seed, self.epoch, *key, *([self.phase] if self.phase else []))

    def order(self, stream: int) -> ShuffleBuffer:
        """Its outputs are the stream's positions in read order."""
        return ShuffleBuffer(self.stream_length(stream), self.shuffle_buffer, self._key(_SHUFFLE, stream))

    def jitter(self, stream: int, position: int, strength: float) -> np.ndarray:
        """Brightness, contrast and saturation factors of one sample, a pure function of its place."""
        return self._key(_AUGMENT, stream, position).uniform(1 - strength, 1 + strength, 3).astype(np.float32)

    def _index(self, stream: int, positions: Any) -> tuple[np.ndarray, np.ndarray]:
        """(entry of the epoch's sequence, entries left in its run) of each position of a stream."""
        i = (self._starts[stream] + np.asarray(positions, dtype=np.int64)) % self.total
        if self.runs is None:
            return i, self.total - i
        j = np.searchsorted(self._run_ends, i, side="right")
        return self.runs[j, 0] + i - (self._run_ends[j] - self.runs[j, 1]), self._run_ends[j] - i

    def locate(self, stream: int, positions: Any) -> tuple[np.ndarray, np.ndarray]:
        """(shard, k) of each position of a stream: the k-th selected clip of that shard."""
        i, _ = self._index(stream, positions)
        if self.permutation is not None:
            i = self.permutation(i)
        j = np.searchsorted(self.ends, i, side="right")
        shard = self.shard_order[j]
        return shard, i - (self.ends[j] - self.rows.counts[shard])

    def segments(self, stream: int, start: int = 0) -> Iterator[tuple[int, int, int, int]]:
        """(first position, shard, first k, clips): runs of consecutive clips of one shard that cover
        the stream's positions from `start` on, in sequence order (for plans without a permutation)."""
        p, length = start, self.stream_length(stream)
        while p < length:
            shard, k = (int(v[0]) for v in self.locate(stream, [p]))
            n = min(int(self.rows.counts[shard]) - k, length - p, int(self._index(stream, [p])[1][0]))
            yield p, shard, k, n
            p += n

    def remainder(self, batches: int) -> np.ndarray:
        """The runs (first, count) of the epoch's sequence that no rank has read once every rank took
        `batches` batches of this phase, in sequence order: per stream, the positions still in the
        shuffle buffer and those never fed (O(streams x buffer), the draws replayed without data). An
        entry read as wrap-round filler counts as read."""
        streams, size, b = self.world_size * self.streams_per_rank, self.total, self.batch_size
        left: list[tuple[int, int]] = []       # [a, b) of phase indices, ascending
        filler: set[int] = set()
        for s in range(streams):
            w = s % self.streams_per_rank
            order = self.order(s)
            order.skip(max(0, -(-(batches - w) // self.streams_per_rank)) * b)
            lo, buffered = int(self._starts[s]), sorted(order.buffer)
            left += [(lo + p, lo + p + 1) for p in buffered] + [(lo + order.fed, lo + order.n)]
            held = set(buffered)
            filler.update((lo + p) % size for p in range(max(0, size - lo), order.fed) if p not in held)
        points, out = sorted(filler), []
        for a, e in left:
            e = min(e, size)
            for q in points[bisect.bisect_left(points, a):bisect.bisect_left(points, e)]:
                out += self._runs(a, q)
                a = q + 1
            out += self._runs(a, e)
        merged: list[list[int]] = []
        for first, n in out:
            if merged and merged[-1][0] + merged[-1][1] == first:
                merged[-1][1] += n
            else:
                merged.append([first, n])
        return np.asarray(merged, dtype=np.int64).reshape(-1, 2)

    def _runs(self, a: int, e: int) -> list[tuple[int, int]]:
        """Phase indices [a, e) as runs of the epoch's sequence."""
        out = []
        while a < e:
            (first,), (n,) = self._index(0, [a])
            n = min(int(n), e - a)
            out.append((int(first), n))
            a += n
        return out


# How an epoch is split, recorded with each checkpoint's loader position. 2: a rank's whole batches
# dealt to its streams in turn (1: every stream rounded up to whole batches, which repeated up to a
# global batch per loader worker). Both split alike with one stream per rank.
PLAN_VERSION = 2


def plan_epoch(rows: Selection, *, fmt: str, seed: int, epoch: int, world_size: int, streams_per_rank: int,
               batch_size: int, shuffle_buffer: int, done: Any = ()) -> EpochPlan:
    """The whole epoch from per-shard counts: no data and no index is read. Every rank gets the same
    number of whole batches, the fewest that cover the phase's sequence (fewer than ranks x batch
    entries wrap round to its start to fill the last ones), dealt in turn to its streams.
    `done`: the phases of this epoch already run, as (world_size, streams_per_rank, batches per rank)
    each; the plan returned covers what they left, re-split over `world_size` x `streams_per_rank`."""
    if fmt == "webdataset":
        shard_order = _rng(seed, epoch, _SHARDS).permutation(len(rows.counts))
    elif fmt == "zarr":
        shard_order = np.arange(len(rows.counts))
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    ends = np.cumsum(rows.counts[shard_order])
    total = int(ends[-1]) if len(ends) else 0
    if total == 0:
        raise StoreContentError("no training clips in the store (all held out, or the store is empty)")
    permutation = FeistelPermutation(total, _rng(seed, epoch, _ZARR)) if fmt == "zarr" else None

    def phase(number: int, world: int, per_rank: int, runs: np.ndarray | None) -> EpochPlan:
        buffer = shuffle_buffer
        if fmt == "zarr":   # one stream per rank, already shuffled; the workers share its batches in turn
            per_rank, buffer = 1, 0
        size = total if runs is None else int(runs[:, 1].sum())
        batches = math.ceil(size / (world * batch_size))    # per rank, then dealt to its streams
        return EpochPlan(rows=rows, shard_order=shard_order, ends=ends,
                         length=math.ceil(batches / per_rank) * batch_size, batch_size=batch_size,
                         streams_per_rank=per_rank, batches_per_rank=batches, shuffle_buffer=buffer,
                         permutation=permutation, seed=seed, epoch=epoch, world_size=world, runs=runs, phase=number)

    runs = None
    for number, (world, per_rank, batches) in enumerate(done):
        runs = phase(number, int(world), int(per_rank), runs).remainder(int(batches))
    return phase(len(done), world_size, streams_per_rank, runs)


def rank_batches(plan: EpochPlan, rank: int, batch: int) -> tuple[int, int]:
    """(stream, first output position) of the rank's `batch`-th batch of the epoch."""
    s = plan.streams_per_rank
    return rank * s + batch % s, (batch // s) * plan.batch_size
