"""Streaming a clip store into training batches, in an order that is a pure function of
(seed, epoch, position), so a stopped run resumes on exactly the samples it would have seen.

A rank starts from the store's manifest alone (shard names, clips per shard, held-out clips per
shard): an epoch is planned as arithmetic on per-shard counts, so start-up costs O(shards) in
time and memory however many clips the store holds. A shard's index file (clip ids, video ids) is
read only by the loader worker that opens the shard, to check the shard's keys against it and to
find which of its rows the pass reads; a worker keeps a few shards open, least recently used first
to go.

WebDataset (default): an epoch is the store's training clips laid out shard after shard, the
shards permuted by (seed, epoch). That sequence is wrapped to a length that splits evenly
into `world_size * num_workers` streams of whole batches (so no rank or loader worker ever
runs dry), each stream a contiguous piece read front to back. Inside a stream a shuffle
buffer reorders the samples; its permutation is computed on positions alone, so resuming
after `k` batches replays the buffer's draws without data and skips the samples already
consumed without decoding them (a shard is read only from the first sample still needed; within
it, skipped samples' tar bytes are read, never their JPEGs).

Zarr: clips are read by index, so an epoch is simply a seeded permutation of the training
clips (a keyed Feistel network, evaluated per position in O(1) memory), split evenly over ranks;
any loader worker can serve any batch.

A rank's DataLoader takes batches from its workers in turn; worker `w` of a loader started
at batch `k` serves batches `k + w, k + w + W, ...`, which keeps the order independent of
where the run was resumed. The trainer's loader runs on from one epoch into the next
(`TrainData.run`): its workers are never restarted and prefetch the next epoch's first batches
while this one drains. The WebDataset order depends on `num_workers` and the world size (the
number of streams); the Zarr order only on the world size.

Elastic resume: the epoch's sequence (permuted shards, or the zarr permutation) does not depend on
the world size or the workers; only its split into streams does. A run resumed on other ranks x
streams ends the stopped split as a phase of the epoch, and the next phase covers what it left
(`EpochPlan.remainder`: per stream, the positions still in the shuffle buffer and those never fed,
in sequence order, as O(streams x buffer) runs), split evenly over the new streams and shuffled with
the phase's own RNG key. Every clip of the epoch is read exactly once, except the wrap-round filler
that makes each phase's streams whole batches (fewer than streams x batch entries per phase, as in an
epoch never resumed; filler already read counts as read). The next epoch is planned for the new
world size from scratch, as a fresh run would.

Held-out split: by a hash of the video id (`pipeline.store.heldout_score`) at one of the levels
whose per-shard counts the manifest holds (`HELDOUT_LEVELS`), so the views of one video never
straddle the split and the split never depends on the seed. Evaluation reads the held-out clips
(or a whole second store) once each, in store order, streamed like training; under DDP each rank
reads a contiguous slice of them and the metrics' sums are all-reduced.

Damaged stores: every clip read is checked (its key against the index, every member present and
decodable, the target's bytes against the index's checksum, shapes against the schema, the target
finite; zarr: the stored objects holding its row exist, since zarr reads a missing object as zeros).
A clip that fails is a `BadClip` (shard, clip id, reason), never zeros or NaN passed off as data: a
training batch keeps its place and size, the bad clip's row filled with zeros and marked invalid
(`batch["valid"]`, the loss leaves it out), so the sample order stays a pure function of (seed,
epoch, position), shapes stay fixed (no recompiles) and every rank takes the same number of steps;
an evaluation batch drops it. A shard that
cannot be opened (index file, tar, zarr group or array missing or inconsistent) makes all the clips
a pass wants of it bad; a tar that breaks off (truncated, unreadable) makes the clips after the
break bad. The batch lists them under `"skipped"`; the loader's `BadClipBudget` logs each one and
raises `TooManyBadClipsError`, naming the shard, past `max_bad_clips` per rank (default 0 here,
the trainer's `--max-bad-clips` 16).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import logging
import math
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

FORMATS = ("webdataset", "zarr")

log = logging.getLogger(__name__)


class SchemaMismatchError(ValueError):
    """The store's schema (clip length, frame size, target tokens or width) does not fit the model."""


class StoreContentError(ValueError):
    """A shard disagrees with the store's manifest or index (keys, clip count or array shapes), or its
    data is damaged (undecodable, non-finite, missing)."""


class TooManyBadClipsError(StoreContentError):
    """More bad clips than the budget allows (`--max-bad-clips`): the message names the shard of the
    last one and why it was bad."""

    def __init__(self, message: str, shard: str | None = None, count: int = 0, limit: int = 0):
        super().__init__(message)
        self.shard, self.count, self.limit = shard, count, limit


@dataclass(frozen=True)
class BadClip:
    """A clip that could not be read: its shard, its id (None when the shard's index is unreadable) and
    why. Stray tar samples that are none of the index's clips are reported the same way."""

    shard: str
    clip_id: str | None
    reason: str

    def record(self) -> dict[str, Any]:
        return {"clip_id": self.clip_id, "shard": self.shard, "reason": self.reason}


def _reason(e: BaseException) -> str:
    """An exception as one line: ours carry their context, others get their type name."""
    from pipeline.store import StoreError

    if len(e.args) > 1 and isinstance(e.args[0], str) and not isinstance(e, OSError):
        # webdataset re-raises a tar error as (message + " @ <stream repr>", stream, url)
        text = e.args[0].split(" @ <", 1)[0]
    else:
        text = str(e)
    text = text.strip().splitlines()[0] if text.strip() else ""
    return text if isinstance(e, (StoreContentError, StoreError)) else f"{type(e).__name__}: {text}"


@dataclass
class StoreInfo:
    """What a rank needs from a store to start: its schema and, per shard, what the manifest counts.
    Nothing here grows with the number of clips."""

    root: str
    store: Any                      # pipeline.store.Store (fs, shard_urls, shard_index, ...); None for a schema alone
    schema: dict                    # store.json
    clip_frames: int
    frame_size: tuple[int, int]     # (H, W)
    frame_ext: str                  # jpg | png | npy
    target_tokens: int
    target_dim: int
    target_dtype: str
    target_mean: np.ndarray         # float32 [D]
    target_std: np.ndarray          # float32 [D]
    shards: list[str]               # shard names, sorted
    counts: np.ndarray              # int64 [shards]: clips per shard
    heldout_clips: np.ndarray       # int64 [shards, levels]: clips whose video scores <= HELDOUT_LEVELS[i]
    first_video_score: np.ndarray   # float64 [shards]: the lowest heldout_score among the shard's videos
    first_video_clips: np.ndarray   # int64 [shards]: that video's clips in the shard

    def shard_url(self, shard: int) -> str:
        return self._urls[shard]

    def __post_init__(self) -> None:
        self._urls = self.store.shard_urls("webdataset") if "webdataset" in self.formats else []
        self._pid = os.getpid()

    @property
    def formats(self) -> list[str]:
        return list(self.schema.get("formats", FORMATS)) if self.store is not None else []

    @classmethod
    def from_schema(cls, schema: dict, root: str, store: Any = None) -> "StoreInfo":
        """Shapes and statistics from store.json, shards from the store's manifest; without `store`, a
        description with no clips to read (enough to build a student and feed it synthetic batches)."""
        clip, frames, target, stats = (schema[k] for k in ("clip", "frames", "target", "target_stats"))
        mean, std = _target_stats(stats, int(target["dim"]), root)
        return cls(
            root=root, store=store, schema=schema, clip_frames=int(clip["frames"]),
            frame_size=tuple(int(x) for x in frames["size"]), frame_ext=frames["encoding"],
            target_tokens=int(target["tokens"]), target_dim=int(target["dim"]), target_dtype=str(target["dtype"]),
            target_mean=mean,
            # a channel that never varies would divide by zero when standardised
            target_std=np.maximum(std, 1e-6),
            **_per_shard(store.manifest if store is not None else None))

    def local_store(self) -> Any:
        """The store with a filesystem made in this process: s3fs (async fsspec) objects do not
        survive the fork into DataLoader workers."""
        if self._pid != os.getpid():
            from pipeline.store import filesystem

            fs, _ = filesystem(self.root, self.store.storage_options)
            self.store, self._pid = dataclasses.replace(self.store, fs=fs), os.getpid()
        return self.store


def _target_stats(stats: Any, dim: int, root: str) -> tuple[np.ndarray, np.ndarray]:
    """store.json's per-channel target mean and std as float32 [D], or StoreContentError: every target
    is standardised with them, so one non-finite channel would make every loss NaN."""
    try:
        mean = np.asarray(stats["mean"], dtype=np.float64).astype(np.float32)
        std = np.asarray(stats["std"], dtype=np.float64).astype(np.float32)
    except (KeyError, TypeError, ValueError) as e:
        raise StoreContentError(f"{root}: store.json target_stats cannot be read as numbers: {_reason(e)}") from None
    problems = []
    for name, v in (("mean", mean), ("std", std)):
        if v.shape != (dim,):
            problems.append(f"{name} has shape {list(v.shape)}, the target width is {dim}")
        elif not np.isfinite(v).all():
            bad = np.flatnonzero(~np.isfinite(v))
            problems.append(f"{name} is not finite in {len(bad)} channels (first: {bad[:8].tolist()})")
        elif name == "std" and (v < 0).any():
            problems.append(f"std is negative in {int((v < 0).sum())} channels")
    if problems:
        raise StoreContentError(f"{root}: store.json target_stats: {'; '.join(problems)}: the targets cannot be "
                                "standardised (re-finalise the store, or re-extract it)")
    return mean, std


def _per_shard(manifest: Any) -> dict[str, Any]:
    """StoreInfo's per-shard fields from the manifest table (one row per shard), or none."""
    from pipeline.store import HELDOUT_LEVELS

    n = manifest.num_rows if manifest is not None else 0

    def column(name: str, dtype: type) -> np.ndarray:
        return manifest.column(name).to_numpy().astype(dtype) if n else np.zeros(0, dtype)

    heldout = manifest.column("heldout_clips").combine_chunks().flatten().to_numpy() if n else np.zeros(0)
    return {"shards": manifest.column("shard").to_pylist() if n else [], "counts": column("clips", np.int64),
            "heldout_clips": heldout.astype(np.int64).reshape(n, len(HELDOUT_LEVELS)),
            "first_video_score": column("first_video_score", np.float64),
            "first_video_clips": column("first_video_clips", np.int64)}


def read_store(root: str) -> StoreInfo:
    """Open a store written by `jobs.extract`: its schema and manifest, never its clip index."""
    from pipeline.store import open_store

    store = open_store(root)
    return StoreInfo.from_schema(store.schema, root, store)


def check_store_matches(config: Any, info: StoreInfo) -> None:
    """Fail at start, naming every field, rather than with a shape error deep in the first step."""
    wanted = {
        "clip length (frames)": (config.clip_frames, info.clip_frames),
        "frame size (H, W)": (tuple(config.image_hw), info.frame_size),
        "target tokens": (config.target_tokens, info.target_tokens),
        "target width": (config.target_dim, info.target_dim),
    }
    bad = [f"{k}: model {m}, store {s}" for k, (m, s) in wanted.items() if m != s]
    if bad:
        raise SchemaMismatchError(f"store {info.root} does not fit the model: " + "; ".join(bad))


@dataclass(frozen=True, eq=False)
class Selection:
    """Which clips of each shard a pass reads, known by count from the manifest; which rows they are
    is read from a shard's index file when a worker opens the shard (and checked against the count)."""

    counts: np.ndarray              # int64 [shards]: clips read per shard
    cut: float | None = None        # clips whose video's heldout_score <= cut are held out; None: no split
    heldout: bool = False           # read the held-out clips (evaluation) rather than the others (training)

    def pick(self, video_ids: list[str]) -> np.ndarray:
        """The rows of one shard this pass reads, ascending."""
        if self.cut is None:
            return np.arange(len(video_ids))
        from pipeline.store import heldout_score

        scores = {v: heldout_score(v) for v in set(video_ids)}
        held = np.array([scores[v] <= self.cut for v in video_ids], dtype=bool)
        return np.flatnonzero(held if self.heldout else ~held)


def heldout_split(info: StoreInfo, fraction: float) -> tuple[Selection, Selection]:
    """(training clips, held-out clips) for holding out `fraction` (one of HELDOUT_LEVELS) of the
    videos, from the manifest's counts alone. At least one video is held out, so a small store still
    gets an evaluation: when none scores under the level, the lowest-scoring video is."""
    from pipeline.store import HELDOUT_LEVELS

    if fraction not in HELDOUT_LEVELS:
        raise ValueError(f"held-out fraction must be one of {', '.join(map(str, HELDOUT_LEVELS))}, got {fraction}")
    cut, held = float(fraction), info.heldout_clips[:, HELDOUT_LEVELS.index(fraction)]
    if held.sum() == 0 and len(info.shards):
        cut = float(info.first_video_score.min())
        held = np.where(info.first_video_score == cut, info.first_video_clips, 0)
    return Selection(info.counts - held, cut), Selection(held, cut, heldout=True)


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


_SHARDS, _SHUFFLE, _AUGMENT, _ZARR = 1, 2, 3, 4   # RNG stream tags


class ShuffleBuffer:
    """The output order of a shuffle buffer of `size` slots fed positions 0..n-1 (webdataset's
    algorithm), drawn as it goes. Output j always comes from the first j + size inputs, so the state
    is at most `size` positions; the draws are the same however the outputs are taken, so a resumed
    stream replays its first outputs (no data) and continues exactly."""

    def __init__(self, n: int, size: int, rng: np.random.Generator):
        self.n, self.size, self.rng = n, max(1, size), rng
        self.buffer: list[int] = list(range(min(self.size - 1, n)))   # fed, not yet output
        self.fed = len(self.buffer)     # positions 0..fed-1 went in
        self.done = 0                   # outputs made

    def take(self, m: int) -> list[int]:
        """The next `m` outputs (fewer at the end)."""
        m = min(m, self.n - self.done)
        if m <= 0:
            return []
        # The buffer's fill level at each draw is known in advance, so a run of draws is made at once.
        fill = np.minimum(self.size, self.n - np.arange(self.done, self.done + m))
        picks = (self.rng.random(m) * fill).astype(np.int64).tolist()
        buf, nxt, n, out = self.buffer, self.fed, self.n, []
        for k in picks:
            if nxt < n:
                buf.append(nxt)
                nxt += 1
            buf[k], buf[-1] = buf[-1], buf[k]
            out.append(buf.pop())
        self.fed, self.done = nxt, self.done + m
        return out

    def skip(self, m: int) -> None:
        """Make the next `m` outputs without keeping them: a resumed stream's replay."""
        m = min(m, self.n - self.done)
        while m > 0:
            m -= len(self.take(min(m, 1 << 16)))


class FeistelPermutation:
    """A keyed permutation of [0, n), evaluated per index in O(1) memory: a balanced Feistel network
    on the smallest even number of bits covering n, cycle-walking values that land past n."""

    ROUNDS = 6

    def __init__(self, n: int, rng: np.random.Generator):
        bits = max(2, (n - 1).bit_length())
        self.n, self.half = n, (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = [np.uint64(k) for k in rng.integers(0, 2**63, self.ROUNDS)]

    @staticmethod
    def _mix(x: np.ndarray) -> np.ndarray:
        """splitmix64's finaliser: every output bit depends on every input bit."""
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (self._mix(right ^ key) & self.mask)
        return (left << half) | right

    def __call__(self, i: np.ndarray) -> np.ndarray:
        x = np.asarray(i, dtype=np.uint64).copy()
        todo = np.ones(x.shape, dtype=bool)
        while todo.any():      # the domain is < 4n: a few passes on average
            x[todo] = self._encrypt(x[todo])
            todo = x >= self.n
        return x.astype(np.int64)


@dataclass(frozen=True, eq=False)
class EpochPlan:
    """One epoch as index arithmetic, O(shards) in memory: position p of stream s is entry
    (s * length + p) mod total of the epoch's sequence (wrapping round, so every stream gets the same
    `length`), the sequence being the selected clips of the shards laid out in `shard_order` (zarr:
    taken through a keyed permutation). An entry is found as (shard, k-th selected clip of the shard)
    by bisecting the cumulative counts. A stream's shuffled order is drawn on demand."""

    rows: Selection
    shard_order: np.ndarray     # int64 [shards]
    ends: np.ndarray            # int64 [shards]: cumulative selected clips along shard_order
    length: int                 # positions per stream
    batch_size: int
    streams_per_rank: int
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

    @property
    def batches_per_rank(self) -> int:
        return self.streams_per_rank * math.ceil(self.length / self.batch_size)

    def _key(self, *key: int) -> np.random.Generator:
        """The phase's RNG stream: phase 0 keeps the key of an epoch never resumed elsewhere."""
        return _rng(self.seed, self.epoch, *key, *([self.phase] if self.phase else []))

    def order(self, stream: int) -> ShuffleBuffer:
        """Its outputs are the stream's positions in read order."""
        return ShuffleBuffer(self.length, self.shuffle_buffer, self._key(_SHUFFLE, stream))

    def jitter(self, stream: int, position: int, strength: float) -> np.ndarray:
        """Brightness, contrast and saturation factors of one sample, a pure function of its place."""
        return self._key(_AUGMENT, stream, position).uniform(1 - strength, 1 + strength, 3).astype(np.float32)

    def _index(self, stream: int, positions: Any) -> tuple[np.ndarray, np.ndarray]:
        """(entry of the epoch's sequence, entries left in its run) of each position of a stream."""
        i = (stream * self.length + np.asarray(positions, dtype=np.int64)) % self.total
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
        p = start
        while p < self.length:
            shard, k = (int(v[0]) for v in self.locate(stream, [p]))
            n = min(int(self.rows.counts[shard]) - k, self.length - p, int(self._index(stream, [p])[1][0]))
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
            lo, buffered = s * self.length, sorted(order.buffer)
            left += [(lo + p, lo + p + 1) for p in buffered] + [(lo + order.fed, lo + self.length)]
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


def plan_epoch(rows: Selection, *, fmt: str, seed: int, epoch: int, world_size: int, streams_per_rank: int,
               batch_size: int, shuffle_buffer: int, done: Any = ()) -> EpochPlan:
    """The whole epoch from per-shard counts: no data and no index is read. Every stream gets the same
    number of whole batches, wrapping round to the start of the phase's sequence to fill the last ones.
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
        return EpochPlan(rows=rows, shard_order=shard_order, ends=ends,
                         length=math.ceil(size / (world * per_rank * batch_size)) * batch_size, batch_size=batch_size,
                         streams_per_rank=per_rank, shuffle_buffer=buffer, permutation=permutation, seed=seed,
                         epoch=epoch, world_size=world, runs=runs, phase=number)

    runs = None
    for number, (world, per_rank, batches) in enumerate(done):
        runs = phase(number, int(world), int(per_rank), runs).remainder(int(batches))
    return phase(len(done), world_size, streams_per_rank, runs)


def rank_batches(plan: EpochPlan, rank: int, batch: int) -> tuple[int, int]:
    """(stream, first output position) of the rank's `batch`-th batch of the epoch."""
    s = plan.streams_per_rank
    return rank * s + batch % s, (batch // s) * plan.batch_size


def epoch_clip_ids(info: StoreInfo, plan: EpochPlan, rank: int) -> list[list[str]]:
    """The clip ids of each of a rank's batches, in training order (for audits and tests: it reads the
    index file of every shard the rank touches)."""
    shards, orders, out = _Shards(info, plan.rows), {}, []
    for b in range(plan.batches_per_rank):
        stream, _ = rank_batches(plan, rank, b)     # a stream's batches come in order
        order = orders.setdefault(stream, plan.order(stream))
        located = zip(*plan.locate(stream, order.take(plan.batch_size)))
        out.append([shards.open(int(s)).clip_id(int(k)) for s, k in located])
    return out


# ---------------------------------------------------------------- reading


@dataclass
class _ZarrShard:
    """A zarr shard's arrays, and which of their stored objects exist (by block index along clips)."""

    frames: Any
    targets: Any
    dtype: str                      # the stored target dtype
    frames_blocks: tuple[int, set[int]]     # (clips per stored object, the objects present)
    targets_blocks: tuple[int, set[int]]

    def missing(self, row: int) -> list[str]:
        return [name for name, (per, present) in (("frames", self.frames_blocks), ("targets", self.targets_blocks))
                if row // per not in present]


@dataclass
class _Shard:
    """An opened shard: its index's clip ids and checksums, the rows the pass reads, and (zarr) its
    arrays; or, when it could not be opened, why (`error`): then every clip of it is bad."""

    name: str
    clip_ids: list[str]         # every row's clip id, in row order
    rows: np.ndarray            # int64: the selected rows, ascending (the k-th selected clip is rows[k])
    checksums: list[str | None] | None = None   # every row's target checksum (the index's)
    arrays: _ZarrShard | None = None
    error: str | None = None

    def clip_id(self, k: int) -> str:
        if self.error is not None:
            raise StoreContentError(f"shard {self.name}: {self.error}")
        return self.clip_ids[self.rows[k]]

    def checksum(self, row: int) -> str | None:
        return self.checksums[row] if self.checksums is not None else None

    def bad(self, k: int, reason: str | None = None) -> BadClip:
        """The k-th selected clip as bad (its id when the index could be read)."""
        known = k < len(self.rows) and self.rows[k] < len(self.clip_ids)
        return BadClip(self.name, self.clip_ids[self.rows[k]] if known else None, reason or self.error or "bad clip")


def _stored_blocks(array: Any) -> tuple[int, set[int]]:
    """(clips per stored object, indices of the objects present) of a zarr array along its first axis.
    Zarr reads an absent object as the fill value, so a deleted chunk or shard object would pass for
    black frames or zero targets: one listing of the array's keys tells them apart."""
    from zarr.core.sync import sync

    block = tuple(array.shards or array.chunks)
    prefix = array.store_path.path

    async def listing() -> list[str]:
        return [k async for k in array.store_path.store.list_prefix(prefix)]

    keys = {k[len(prefix):].lstrip("/") for k in sync(listing())}
    rest = list(itertools.product(*(range(-(-s // b)) for s, b in zip(array.shape[1:], block[1:]))))
    encode = array.metadata.encode_chunk_key
    n = -(-int(array.shape[0]) // block[0])
    return block[0], {i for i in range(n) if all(encode((i, *r)) in keys for r in rest)}


class _Shards:
    """The shards one loader worker has open, at most `keep`. Opening one is the only place a shard's
    index file is read; it must list the clips the manifest counts, and (zarr) the shard's own clip
    ids must equal the index's. A shard that fails any of this is kept as failed (`_Shard.error`),
    so its clips are reported bad without trying again."""

    def __init__(self, info: StoreInfo, rows: Selection, zarr: bool = False, keep: int = 32):
        self.info, self.rows, self.zarr, self.keep = info, rows, zarr, keep
        self.open_shards: OrderedDict[int, _Shard] = OrderedDict()

    def open(self, shard: int) -> _Shard:
        if shard in self.open_shards:
            self.open_shards.move_to_end(shard)
            return self.open_shards[shard]
        opened = self._open(shard)
        if opened.error is not None:
            log.warning("shard %s of %s cannot be read: %s", opened.name, self.info.root, opened.error)
        self.open_shards[shard] = opened
        if len(self.open_shards) > self.keep:
            self.open_shards.popitem(last=False)
        return opened

    def _open(self, shard: int) -> _Shard:
        info, name, n = self.info, self.info.shards[shard], int(self.info.counts[shard])
        ids: list[str] = []
        rows = np.zeros(0, dtype=np.int64)      # known once the index agrees with the manifest
        try:
            store = info.local_store()
            index = store.shard_index(name)
            if not np.array_equal(index.column("row").to_numpy(), np.arange(n)):
                raise StoreContentError(f"{info.root}: the index of shard {name} lists rows other than the "
                                        f"manifest's 0..{n - 1}")
            ids = index.column("clip_id").to_pylist()
            checksums = index.column("checksum").to_pylist() if "checksum" in index.column_names else None
            picked = self.rows.pick(index.column("video_id").to_pylist())
            if len(picked) != self.rows.counts[shard]:
                side = "held-out" if self.rows.heldout else "training"
                raise StoreContentError(f"{info.root}: shard {name} has {len(picked)} {side} clips by its index, "
                                        f"the manifest counts {self.rows.counts[shard]}")
            rows = picked
            arrays = self._zarr_arrays(store, name, ids) if self.zarr else None
        except Exception as e:      # missing or unreadable index / zarr group / array, or disagreeing counts
            return _Shard(name, ids, rows, error=_reason(e))
        return _Shard(name, ids, rows, checksums, arrays)

    def _zarr_arrays(self, store: Any, name: str, ids: list[str]) -> _ZarrShard:
        g = store.zarr_group(name)
        stored = [str(c) for c in np.asarray(g["clip_id"][:])]
        if stored != ids:
            bad = next((i for i, (a, b) in enumerate(zip(stored, ids)) if a != b), min(len(stored), len(ids)))
            raise StoreContentError(f"zarr shard {name}: {len(stored)} clips, the index lists {len(ids)}; "
                                    f"first difference at row {bad}")
        frames, targets = g["frames"], g["targets"]
        for what, array in (("frames", frames), ("targets", targets)):
            if array.shape[0] != len(ids):
                raise StoreContentError(f"zarr shard {name}: {what} holds {array.shape[0]} clips, the index "
                                        f"lists {len(ids)}")
        return _ZarrShard(frames, targets, targets.attrs.get("dtype", self.info.target_dtype),
                          _stored_blocks(frames), _stored_blocks(targets))

    def read_zarr(self, shard: int, k: int) -> tuple[str, np.ndarray, np.ndarray] | BadClip:
        """Clip id, frames and target of the k-th selected clip of a shard, or why it cannot be had."""
        opened = self.open(shard)
        if opened.error is not None:
            return opened.bad(k)
        z = opened.arrays
        row, key = int(opened.rows[k]), opened.clip_id(k)
        missing = z.missing(row)
        if missing:
            return opened.bad(k, f"zarr {' and '.join(missing)} of row {row}: the stored object is missing "
                                 "(zarr would read it as zeros)")
        try:
            frames, stored = np.asarray(z.frames[row]), np.asarray(z.targets[row])
            return key, *_checked(key, frames, stored, self.info, z.dtype, opened.checksum(row))
        except Exception as e:      # a truncated or corrupt object fails zarr's checksum or decompression
            return opened.bad(k, f"zarr row {row}: {_reason(e)}")


def decode_wds_sample(sample: dict[str, bytes], info: StoreInfo) -> tuple[np.ndarray, np.ndarray]:
    """Frames uint8 [T, H, W, 3] and target float32 [N, D] of one webdataset sample, checked (the
    target's bytes against `sample["__checksum__"]` when the reader put the index's there)."""
    from pipeline.store import decode_frame, frame_column

    key = sample["__key__"]
    names = [f"{frame_column(i)}.{info.frame_ext}" for i in range(info.clip_frames)]
    missing = [n for n in names + ["target.npy"] if n not in sample]
    if missing:
        raise StoreContentError(f"sample {key} in {sample.get('__url__')}: missing {', '.join(missing)}")
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError as e:
        raise StoreContentError(f"sample {key} in {sample.get('__url__')}: unreadable metadata: {e}") from None
    if not isinstance(meta, dict) or meta.get("clip_id", key) != key:
        raise StoreContentError(f"sample {key}: metadata names clip "
                                f"{meta.get('clip_id') if isinstance(meta, dict) else meta!r}")
    try:
        frames = np.stack([decode_frame(sample[n], info.frame_ext) for n in names])
        stored = np.load(io.BytesIO(sample["target.npy"]), allow_pickle=False)
    except Exception as e:   # PIL's UnidentifiedImageError and truncated images are OSErrors; npy: ValueError
        raise StoreContentError(f"clip {key} in {sample.get('__url__')}: cannot decode: {_reason(e)}") from e
    return _checked(key, frames, stored, info, info.target_dtype, sample.get("__checksum__"))


def _checked(key: str, frames: np.ndarray, stored: np.ndarray, info: StoreInfo, dtype: str,
             checksum: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Frames and the decoded float32 target of one clip, after checking the stored target's bytes
    against the index's checksum, both shapes against the schema and the target for NaN/inf."""
    from pipeline.store import decode_target

    if checksum:
        got = hashlib.sha256(np.ascontiguousarray(stored).tobytes()).hexdigest()[:16]
        if got != checksum:
            raise StoreContentError(f"clip {key}: the target's bytes do not match the index's checksum "
                                    f"({got}, index {checksum})")
    target = decode_target(stored, dtype)
    want_f = (info.clip_frames, *info.frame_size, 3)
    want_t = (info.target_tokens, info.target_dim)
    if frames.shape != want_f or frames.dtype != np.uint8 or target.shape != want_t:
        raise StoreContentError(f"clip {key}: frames {frames.dtype}{list(frames.shape)} target {list(target.shape)},"
                                f" schema says uint8{list(want_f)} and {list(want_t)}")
    finite = np.isfinite(target)
    if not finite.all():
        raise StoreContentError(f"clip {key}: {int((~finite).sum())} non-finite target values")
    return frames, target


def _tar_samples(info: StoreInfo, shard: int, opened: _Shard,
                 wanted: dict[int, int]) -> Iterator[tuple[int | None, dict | BadClip]]:
    """(position, raw sample or BadClip) of every wanted row ({row: position}) of one shard, read front
    to back up to the last of them (bytes only, nothing decoded), and (None, BadClip) for a stray sample
    (a key the index does not list next). Keys are matched against the index: a clip missing from the
    tar is bad and the rows after it still line up; everything wanted after a break (a truncated or
    unreadable tar) is bad. A shard read to its last row is checked to hold no more samples."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    url, ids, name = info.shard_url(shard), opened.clip_ids, opened.name
    n = len(ids)
    pending = dict(wanted)
    row = 0                                 # the row the next sample should be
    where: dict[str, int] | None = None     # clip id -> row, built on the first surprise

    def lost(upto: int, reason: str) -> Iterator[tuple[int, BadClip]]:
        for r in sorted(r for r in pending if r < upto):
            yield pending.pop(r), BadClip(name, ids[r], reason)

    try:
        stream = info.local_store().fs.open(url, "rb")
    except Exception as e:
        yield from lost(n, f"cannot open {url}: {_reason(e)}")
        return
    with stream:
        samples = group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
        try:
            for sample in samples:
                key = sample["__key__"]
                if row < n and key == ids[row]:
                    r = row
                else:
                    if where is None:
                        where = {c: i for i, c in enumerate(ids)}
                    r = where.get(key, -1)
                    if r < row:     # not in the index, or a repeat
                        yield None, BadClip(name, key, f"{url}: stray sample {key!r} after row {row - 1} "
                                                       f"(the index says {ids[row] if row < n else 'nothing'!r})")
                        continue
                    yield from lost(r, f"{url}: missing from the tar (the index lists it before {key!r})")
                if r in pending:
                    sample["__shard__"], sample["__checksum__"] = name, opened.checksum(r)
                    yield pending.pop(r), sample
                row = r + 1
                if not pending and row < n:
                    break
        except Exception as e:      # truncated header, unexpected end of data, empty file, ...
            yield from lost(n, f"{url}: unreadable after {row} clips: {_reason(e)}")
        finally:
            samples.close()     # the tar stream, now rather than at garbage collection
    yield from lost(n, f"{url} ends after {row} clips, the index lists {n}")


def jitter_frames(frames: torch.Tensor, jitter: torch.Tensor) -> torch.Tensor:
    """Photometric jitter of uint8 clips [B, T, H, W, 3] -> float [B, T, H, W, 3] in 0..255: brightness,
    contrast, saturation, one draw per clip so all its frames change alike. Runs on the training
    device, so loader workers ship compact uint8; normalisation is the model's own `preprocess`."""
    x = frames.float().div_(255)
    b, c, s = (jitter[:, i].to(x).view(-1, 1, 1, 1, 1) for i in range(3))
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
    x = (x * b).clamp_(0, 1)
    mean = (x @ luma).mean(dim=(1, 2, 3), keepdim=True).unsqueeze(-1)
    x = ((x - mean) * c + mean).clamp_(0, 1)
    gray = (x @ luma).unsqueeze(-1)
    return ((x - gray) * s + gray).clamp_(0, 1).mul_(255)


def _collate(items: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]], info: StoreInfo) -> dict[str, Any]:
    if not items:     # an evaluation batch whose clips were all bad
        return {"clip_id": [], "frames": torch.zeros((0, info.clip_frames, *info.frame_size, 3), dtype=torch.uint8),
                "target": torch.zeros((0, info.target_tokens, info.target_dim))}
    batch = {"clip_id": [k for k, *_ in items],
             "frames": torch.from_numpy(np.stack([f for _, f, _, _ in items])),
             "target": torch.from_numpy(np.stack([t for _, _, t, _ in items]))}
    if items[0][3] is not None:
        batch["jitter"] = torch.from_numpy(np.stack([j for *_, j in items]))
    return batch


class ClipStream(IterableDataset):
    """One epoch of one rank's batches, starting at batch `start`; see the module docstring. With `plans`
    (epoch -> its plan), the epochs after it follow without end, so the loader's workers run on across
    epoch boundaries (no restart, the next epoch's batches prefetched). A bad clip's row is filled with
    zeros and marked invalid (`batch["valid"]`, bool [B], present only when some row is); with
    `compact` (evaluation) it is dropped instead. Either way the batch lists its bad clips under
    `"skipped"` (records of `BadClip`) for the main process to count."""

    def __init__(self, info: StoreInfo, plan: EpochPlan, *, fmt: str, rank: int, start: int = 0,
                 augment: float = 0.0, compact: bool = False, plans: Callable[[int], EpochPlan] | None = None):
        self.info, self.plan, self.fmt, self.rank, self.start, self.augment = info, plan, fmt, rank, start, augment
        self.compact, self.plans = compact, plans

    def __len__(self) -> int:
        if self.plans is not None:
            raise TypeError("an endless stream of epochs has no length")
        return self.plan.batches_per_rank - self.start

    def _item(self, plan: EpochPlan, stream: int, position: int, key: str, frames: np.ndarray, target: np.ndarray):
        jitter = plan.jitter(stream, position, self.augment) if self.augment > 0 else None
        return key, frames, target, jitter

    def _batch(self, plan: EpochPlan, stream: int, positions: list[int], got: list[Any], strays: list[BadClip] = ()
               ) -> dict[str, Any]:
        """A batch of the positions' items; `got[i]` is (key, frames, target) or a BadClip."""
        info = self.info
        bad = [g for g in got if isinstance(g, BadClip)]
        if self.compact:
            items = [self._item(plan, stream, p, *g) for p, g in zip(positions, got) if not isinstance(g, BadClip)]
        else:
            frames0 = np.zeros((info.clip_frames, *info.frame_size, 3), dtype=np.uint8)
            target0 = np.zeros((info.target_tokens, info.target_dim), dtype=np.float32)
            items = [self._item(plan, stream, p, g.clip_id or "", frames0, target0) if isinstance(g, BadClip)
                     else self._item(plan, stream, p, *g) for p, g in zip(positions, got)]
        batch = _collate(items, info)
        if bad and not self.compact:
            batch["valid"] = torch.tensor([not isinstance(g, BadClip) for g in got])
        if bad or strays:
            batch["skipped"] = [b.record() for b in [*bad, *strays]]
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wi = get_worker_info()
        worker, workers = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        plan, start, before = self.plan, self.start, 0      # before: the loader's batches of earlier epochs
        while True:
            # The loader takes its workers' batches in turn: its j-th batch is worker j mod `workers`'s.
            mine = range(start + (worker - before) % workers, plan.batches_per_rank, workers)
            if self.fmt == "zarr":
                yield from self._zarr_batches(plan, mine)
            else:
                yield from self._wds_batches(plan, mine, workers)
            if self.plans is None:
                return
            plan, start, before = self.plans(plan.epoch + 1), 0, before + plan.batches_per_rank - start

    def _zarr_batches(self, plan: EpochPlan, batches: range) -> Iterator[dict[str, Any]]:
        shards = _Shards(self.info, plan.rows, zarr=True)
        for b in batches:
            stream, first = rank_batches(plan, self.rank, b)
            positions = np.arange(first, min(first + plan.batch_size, plan.length))
            got = [shards.read_zarr(int(s), int(k)) for s, k in zip(*plan.locate(stream, positions))]
            yield self._batch(plan, stream, positions.tolist(), got)

    def _decode(self, sample: dict | BadClip) -> tuple[str, np.ndarray, np.ndarray] | BadClip:
        if isinstance(sample, BadClip):
            return sample
        key = sample["__key__"]
        try:
            return key, *decode_wds_sample(sample, self.info)
        except Exception as e:
            return BadClip(sample.get("__shard__", str(sample.get("__url__"))), key, _reason(e))

    def _wds_batches(self, plan: EpochPlan, batches: range, workers: int) -> Iterator[dict[str, Any]]:
        if not len(batches):
            return
        if workers != plan.streams_per_rank:
            raise ValueError(f"the epoch was planned for {plan.streams_per_rank} loader workers, "
                             f"the DataLoader has {workers}")
        stream, first = rank_batches(plan, self.rank, batches[0])
        order = plan.order(stream)
        order.skip(first)           # a resumed stream: the buffer's draws replayed, no data read
        source = self._wds_source(plan, stream, set(order.buffer), order.fed)
        held: dict[int, dict | BadClip] = {}
        strays: list[BadClip] = []
        while positions := order.take(plan.batch_size):
            got = []
            for p in positions:
                while p not in held:
                    q, sample = next(source)
                    if q is None:
                        strays.append(sample)
                    else:
                        held[q] = sample
                got.append(self._decode(held.pop(p)))
            if order.done == order.n:   # the last batch: finish the stream first, so its last shard's
                for q, sample in source:    # clip count is checked and any stray sample reported with it
                    if q is None:
                        strays.append(sample)
            yield self._batch(plan, stream, positions, got, strays)
            strays = []

    def _wds_source(self, plan: EpochPlan, stream: int, buffered: set[int], fed: int
                    ) -> Iterator[tuple[int | None, dict | BadClip]]:
        """(position, raw sample or BadClip) of every position the stream still outputs (those in the
        shuffle buffer, and from `fed` on), in read order, and (None, BadClip) for stray samples. Shards
        before the first of them are not opened."""
        shards = _Shards(self.info, plan.rows)
        for p0, shard, k0, n in plan.segments(stream, min(buffered, default=fed)):
            wanted = [p for p in range(p0, p0 + n) if p >= fed or p in buffered]
            if not wanted:
                continue
            opened = shards.open(shard)
            if opened.error is not None:
                for p in wanted:
                    yield p, opened.bad(k0 + p - p0)
            else:
                yield from _tar_samples(self.info, shard, opened, {int(opened.rows[k0 + p - p0]): p for p in wanted})


class BadClipBudget:
    """Counts, in the main process, the bad clips a rank's loader reported (`batch["skipped"]`), logs
    each with its shard and reason, and raises TooManyBadClipsError past `limit`."""

    def __init__(self, limit: int = 0, where: str = "this rank", count: int = 0):
        self.limit, self.where, self.count = limit, where, count
        self.by_shard: Counter[str] = Counter()

    def admit(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        skipped = batch.get("skipped") or []
        for rec in skipped:
            self.count += 1
            self.by_shard[rec["shard"]] += 1
            log.warning("bad clip %s of shard %s skipped (%d on %s, at most %d): %s", rec["clip_id"], rec["shard"],
                        self.count, self.where, self.limit, rec["reason"])
            if self.count > self.limit:
                most = ", ".join(f"{s}: {c}" for s, c in self.by_shard.most_common(3))
                raise TooManyBadClipsError(
                    f"shard {rec['shard']}, clip {rec['clip_id']}: {rec['reason']} -- {self.count} bad clips on "
                    f"{self.where}, more than --max-bad-clips {self.limit} allows (by shard: {most})",
                    shard=rec["shard"], count=self.count, limit=self.limit)
        return skipped


class Batches:
    """A DataLoader's batches, each admitted by a BadClipBudget before it is handed out."""

    def __init__(self, loader: DataLoader, budget: BadClipBudget):
        self.loader, self.budget = loader, budget

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            self.budget.admit(batch)
            yield batch


class TrainData:
    """Epochs of batches for one rank; `epoch(e, start)` is an iterator over a DataLoader. Bad clips are
    counted over the whole run in `bad_clips` (at most `max_bad_clips`, see the module docstring)."""

    def __init__(self, info: StoreInfo, *, fmt: str = "webdataset", batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, shuffle_buffer: int = 256,
                 augment: float = 0.0, rows: Selection | None = None, max_bad_clips: int = 0):
        self.info, self.fmt, self.batch_size, self.seed = info, fmt, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle_buffer, self.augment = shuffle_buffer, augment
        self.rows = rows if rows is not None else Selection(info.counts)
        self.bad_clips = BadClipBudget(max_bad_clips, f"rank {rank}" if world_size > 1 else "this rank")
        self._last: tuple[Any, EpochPlan] | None = None
        if fmt not in info.formats:
            raise StoreContentError(f"{info.root} has no {fmt} shards (it holds {', '.join(info.formats) or 'none'})")

    @property
    def streams_per_rank(self) -> int:
        return max(1, self.num_workers) if self.fmt == "webdataset" else 1

    def plan(self, epoch: int, done: Any = ()) -> EpochPlan:
        """The epoch's plan for this world size and these workers; `done`: see `plan_epoch`. The last one
        is kept: a remainder's plan replays the earlier phases' shuffle buffers (O(clips they read))."""
        key = (epoch, tuple(tuple(int(x) for x in phase) for phase in done))
        if self._last is None or self._last[0] != key:
            self._last = key, plan_epoch(self.rows, fmt=self.fmt, seed=self.seed, epoch=epoch,
                                         world_size=self.world_size, streams_per_rank=self.streams_per_rank,
                                         batch_size=self.batch_size, shuffle_buffer=self.shuffle_buffer, done=done)
        return self._last[1]

    def batches_per_epoch(self) -> int:
        return self.plan(0).batches_per_rank

    def epoch(self, epoch: int, start: int = 0, done: Any = ()) -> Batches:
        """One epoch's batches from `start` on."""
        return self._batches(ClipStream(self.info, self.plan(epoch, done), fmt=self.fmt, rank=self.rank, start=start,
                                        augment=self.augment))

    def run(self, epoch: int, start: int = 0, done: Any = ()) -> Batches:
        """The batches from `start` of `epoch` on, through all the epochs after it, from one loader: its
        workers never restart and start the next epoch before this one drains."""
        return self._batches(ClipStream(self.info, self.plan(epoch, done), fmt=self.fmt, rank=self.rank, start=start,
                                        augment=self.augment, plans=self.plan))

    def _batches(self, ds: ClipStream) -> Batches:
        return Batches(DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                                  pin_memory=torch.cuda.is_available(), prefetch_factor=2 if self.num_workers else None,
                                  persistent_workers=False), self.bad_clips)


def eval_batches(info: StoreInfo, *, batch_size: int, fmt: str = "webdataset", rows: Selection | None = None,
                 max_bad_clips: int = 0, rank: int = 0, world_size: int = 1, max_clips: int | None = None) -> Batches:
    """The selected clips (default: the whole store; at most the first `max_clips`), each once, in store
    order, without augmentation; with `world_size` ranks, rank `rank`'s contiguous slice of them, so
    every rank evaluates a share. Bad clips are dropped from their batch (which may come out empty)
    and counted in the result's `budget`, at most `max_bad_clips` per pass and rank."""
    rows = rows if rows is not None else Selection(info.counts)
    ends = np.cumsum(rows.counts)
    if not len(ends) or ends[-1] == 0:
        raise StoreContentError(f"{info.root}: no clips to evaluate")
    n = int(ends[-1]) if max_clips is None else min(int(ends[-1]), max_clips)
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    # One stream whose length is not a multiple of the batch: the last batch is short, so no
    # clip is counted twice.
    plan = EpochPlan(rows=rows, shard_order=np.arange(len(ends)), ends=ends, length=hi - lo, batch_size=batch_size,
                     streams_per_rank=1, runs=np.array([[lo, hi - lo]], dtype=np.int64))
    return Batches(DataLoader(ClipStream(info, plan, fmt=fmt, rank=0, compact=True), batch_size=None, num_workers=0),
                   BadClipBudget(max_bad_clips, "the evaluation"))


def synthetic_batches(info: StoreInfo, batch_size: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """The same batch forever, from memory: the data-free baseline of throughput benchmarks."""
    g = torch.Generator().manual_seed(seed)
    batch = {
        "clip_id": [f"synthetic-{k}" for k in range(batch_size)],
        "frames": torch.randint(0, 256, (batch_size, info.clip_frames, *info.frame_size, 3),
                                dtype=torch.uint8, generator=g),
        "target": torch.randn(batch_size, info.target_tokens, info.target_dim, generator=g),
    }
    while True:
        yield batch
