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
where the run was resumed. The WebDataset order depends on `num_workers` and the world size
(the number of streams); the Zarr order only on the world size.

Held-out split: by a hash of the video id (`pipeline.store.heldout_score`) at one of the levels
whose per-shard counts the manifest holds (`HELDOUT_LEVELS`), so the views of one video never
straddle the split and the split never depends on the seed. Evaluation reads the held-out clips
(or a whole second store) once each, in store order, streamed like training.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

FORMATS = ("webdataset", "zarr")


class SchemaMismatchError(ValueError):
    """The store's schema (clip length, frame size, target tokens or width) does not fit the model."""


class StoreContentError(ValueError):
    """A shard disagrees with the store's manifest or index (keys, clip count or array shapes)."""


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
        return cls(
            root=root, store=store, schema=schema, clip_frames=int(clip["frames"]),
            frame_size=tuple(int(x) for x in frames["size"]), frame_ext=frames["encoding"],
            target_tokens=int(target["tokens"]), target_dim=int(target["dim"]), target_dtype=str(target["dtype"]),
            target_mean=np.asarray(stats["mean"], dtype=np.float32),
            # a channel that never varies would divide by zero when standardised
            target_std=np.maximum(np.asarray(stats["std"], dtype=np.float32), 1e-6),
            **_per_shard(store.manifest if store is not None else None))

    def local_store(self) -> Any:
        """The store with a filesystem made in this process: s3fs (async fsspec) objects do not
        survive the fork into DataLoader workers."""
        if self._pid != os.getpid():
            from pipeline.store import filesystem

            fs, _ = filesystem(self.root, self.store.storage_options)
            self.store, self._pid = dataclasses.replace(self.store, fs=fs), os.getpid()
        return self.store


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

    @property
    def total(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    @property
    def batches_per_rank(self) -> int:
        return self.streams_per_rank * math.ceil(self.length / self.batch_size)

    def order(self, stream: int) -> ShuffleBuffer:
        """Its outputs are the stream's positions in read order."""
        return ShuffleBuffer(self.length, self.shuffle_buffer, _rng(self.seed, self.epoch, _SHUFFLE, stream))

    def locate(self, stream: int, positions: Any) -> tuple[np.ndarray, np.ndarray]:
        """(shard, k) of each position of a stream: the k-th selected clip of that shard."""
        i = (stream * self.length + np.asarray(positions, dtype=np.int64)) % self.total
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
            n = min(int(self.rows.counts[shard]) - k, self.length - p)
            yield p, shard, k, n
            p += n


def plan_epoch(rows: Selection, *, fmt: str, seed: int, epoch: int, world_size: int, streams_per_rank: int,
               batch_size: int, shuffle_buffer: int) -> EpochPlan:
    """The whole epoch from per-shard counts: no data and no index is read. Every stream gets the same
    number of whole batches, wrapping round to the start of the epoch's sequence to fill the last ones."""
    if fmt == "webdataset":
        shard_order = _rng(seed, epoch, _SHARDS).permutation(len(rows.counts))
        streams = world_size * streams_per_rank
    elif fmt == "zarr":
        shard_order = np.arange(len(rows.counts))
        streams, streams_per_rank, shuffle_buffer = world_size, 1, 0
        # one stream per rank, already shuffled; its batches are shared round-robin by the workers
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    ends = np.cumsum(rows.counts[shard_order])
    total = int(ends[-1]) if len(ends) else 0
    if total == 0:
        raise StoreContentError("no training clips in the store (all held out, or the store is empty)")
    permutation = FeistelPermutation(total, _rng(seed, epoch, _ZARR)) if fmt == "zarr" else None
    return EpochPlan(rows=rows, shard_order=shard_order, ends=ends,
                     length=math.ceil(total / (streams * batch_size)) * batch_size, batch_size=batch_size,
                     streams_per_rank=streams_per_rank, shuffle_buffer=shuffle_buffer, permutation=permutation,
                     seed=seed, epoch=epoch)


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
class _Shard:
    """An opened shard: its index's clip ids, the rows the pass reads, and (zarr) its arrays."""

    clip_ids: list[str]         # every row's clip id, in row order
    rows: np.ndarray            # int64: the selected rows, ascending (the k-th selected clip is rows[k])
    arrays: tuple[Any, Any, str] | None = None     # zarr: frames, targets, stored target dtype

    def clip_id(self, k: int) -> str:
        return self.clip_ids[self.rows[k]]


class _Shards:
    """The shards one loader worker has open, at most `keep`. Opening one is the only place a shard's
    index file is read; it must list the clips the manifest counts, and (zarr) the shard's own clip
    ids must equal the index's."""

    def __init__(self, info: StoreInfo, rows: Selection, zarr: bool = False, keep: int = 32):
        self.info, self.rows, self.zarr, self.keep = info, rows, zarr, keep
        self.open_shards: OrderedDict[int, _Shard] = OrderedDict()

    def open(self, shard: int) -> _Shard:
        if shard in self.open_shards:
            self.open_shards.move_to_end(shard)
            return self.open_shards[shard]
        info, name, n = self.info, self.info.shards[shard], int(self.info.counts[shard])
        store = info.local_store()
        index = store.shard_index(name, columns=["clip_id", "video_id", "row"])
        if not np.array_equal(index.column("row").to_numpy(), np.arange(n)):
            raise StoreContentError(f"{info.root}: the index of shard {name} lists rows other than the manifest's "
                                    f"0..{n - 1}")
        ids = index.column("clip_id").to_pylist()
        rows = self.rows.pick(index.column("video_id").to_pylist())
        if len(rows) != self.rows.counts[shard]:
            side = "held-out" if self.rows.heldout else "training"
            raise StoreContentError(f"{info.root}: shard {name} has {len(rows)} {side} clips by its index, the "
                                    f"manifest counts {self.rows.counts[shard]}")
        opened = _Shard(ids, rows, self._zarr_arrays(store, name, ids) if self.zarr else None)
        self.open_shards[shard] = opened
        if len(self.open_shards) > self.keep:
            self.open_shards.popitem(last=False)
        return opened

    def _zarr_arrays(self, store: Any, name: str, ids: list[str]) -> tuple[Any, Any, str]:
        g = store.zarr_group(name)
        stored = [str(c) for c in np.asarray(g["clip_id"][:])]
        if stored != ids:
            bad = next((i for i, (a, b) in enumerate(zip(stored, ids)) if a != b), min(len(stored), len(ids)))
            raise StoreContentError(f"zarr shard {name}: {len(stored)} clips, the index lists {len(ids)}; "
                                    f"first difference at row {bad}")
        targets = g["targets"]
        return g["frames"], targets, targets.attrs.get("dtype", self.info.target_dtype)

    def read_zarr(self, shard: int, k: int) -> tuple[str, np.ndarray, np.ndarray]:
        """Clip id, frames and target of the k-th selected clip of a shard."""
        from pipeline.store import decode_target

        opened = self.open(shard)
        frames, targets, dtype = opened.arrays
        row, key = int(opened.rows[k]), opened.clip_id(k)
        return key, *_checked(key, np.asarray(frames[row]), decode_target(np.asarray(targets[row]), dtype), self.info)


def decode_wds_sample(sample: dict[str, bytes], info: StoreInfo) -> tuple[np.ndarray, np.ndarray]:
    """Frames uint8 [T, H, W, 3] and target float32 [N, D] of one webdataset sample."""
    from pipeline.store import decode_frame, decode_target, frame_column

    key = sample["__key__"]
    names = [f"{frame_column(i)}.{info.frame_ext}" for i in range(info.clip_frames)]
    missing = [n for n in names + ["target.npy"] if n not in sample]
    if missing:
        raise StoreContentError(f"sample {key} in {sample.get('__url__')}: missing {', '.join(missing)}")
    meta = json.loads(sample["json"]) if "json" in sample else {}
    if meta.get("clip_id", key) != key:
        raise StoreContentError(f"sample {key}: metadata names clip {meta.get('clip_id')!r}")
    try:
        frames = np.stack([decode_frame(sample[n], info.frame_ext) for n in names])
        target = decode_target(np.load(io.BytesIO(sample["target.npy"]), allow_pickle=False), info.target_dtype)
    except (OSError, ValueError) as e:   # PIL's UnidentifiedImageError is an OSError
        raise StoreContentError(f"clip {key} in {sample.get('__url__')}: cannot decode: {e}") from e
    return _checked(key, frames, target, info)


def _checked(key: str, frames: np.ndarray, target: np.ndarray, info: StoreInfo) -> tuple[np.ndarray, np.ndarray]:
    want_f = (info.clip_frames, *info.frame_size, 3)
    want_t = (info.target_tokens, info.target_dim)
    if frames.shape != want_f or frames.dtype != np.uint8 or target.shape != want_t:
        raise StoreContentError(f"clip {key}: frames {frames.dtype}{list(frames.shape)} target {list(target.shape)},"
                                f" schema says uint8{list(want_f)} and {list(want_t)}")
    return frames, target


def _tar_samples(info: StoreInfo, shard: int, clip_ids: list[str],
                 wanted: dict[int, int]) -> Iterator[tuple[int, dict]]:
    """(position, raw sample) of the wanted rows ({row: position}) of one shard, read front to back up
    to the last of them (bytes only, nothing decoded). Every sample read has its key checked against
    the index; a shard read to its last row is checked to hold no more clips than the index lists."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    url, n = info.shard_url(shard), len(clip_ids)
    last = max(wanted)
    row = -1
    with info.local_store().fs.open(url, "rb") as stream:
        samples = group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))
        try:
            for row, sample in enumerate(samples):
                if row >= n:
                    raise StoreContentError(f"{url}: more clips than the {n} the index lists")
                if sample["__key__"] != clip_ids[row]:
                    raise StoreContentError(f"{url} row {row}: key {sample['__key__']!r}, index says {clip_ids[row]!r}")
                if row in wanted:
                    yield wanted[row], sample
                if row == last and last < n - 1:
                    break
        finally:
            samples.close()     # the tar stream, now rather than at garbage collection
    if row < last:
        raise StoreContentError(f"{url}: {row + 1} clips, the index lists {n}")


def jitter_factors(seed: int, epoch: int, stream: int, position: int, strength: float) -> np.ndarray:
    """Brightness, contrast and saturation factors of one sample, a pure function of its place."""
    return _rng(seed, epoch, _AUGMENT, stream, position).uniform(1 - strength, 1 + strength, 3).astype(np.float32)


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


def _collate(items: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]) -> dict[str, Any]:
    batch = {"clip_id": [k for k, *_ in items],
             "frames": torch.from_numpy(np.stack([f for _, f, _, _ in items])),
             "target": torch.from_numpy(np.stack([t for _, _, t, _ in items]))}
    if items[0][3] is not None:
        batch["jitter"] = torch.from_numpy(np.stack([j for *_, j in items]))
    return batch


class ClipStream(IterableDataset):
    """One epoch of one rank's batches, starting at batch `start`; see the module docstring."""

    def __init__(self, info: StoreInfo, plan: EpochPlan, *, fmt: str, rank: int, start: int = 0,
                 augment: float = 0.0):
        self.info, self.plan, self.fmt, self.rank, self.start, self.augment = info, plan, fmt, rank, start, augment

    def __len__(self) -> int:
        return self.plan.batches_per_rank - self.start

    def _item(self, stream: int, position: int, key: str, frames: np.ndarray, target: np.ndarray):
        jitter = (jitter_factors(self.plan.seed, self.plan.epoch, stream, position, self.augment)
                  if self.augment > 0 else None)
        return key, frames, target, jitter

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wi = get_worker_info()
        worker, workers = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        mine = range(self.start + worker, self.plan.batches_per_rank, workers)
        if self.fmt == "zarr":
            yield from self._zarr_batches(mine)
        else:
            yield from self._wds_batches(mine, workers)

    def _zarr_batches(self, batches: range) -> Iterator[dict[str, Any]]:
        shards = _Shards(self.info, self.plan.rows, zarr=True)
        for b in batches:
            stream, first = rank_batches(self.plan, self.rank, b)
            positions = np.arange(first, min(first + self.plan.batch_size, self.plan.length))
            yield _collate([self._item(stream, int(p), *shards.read_zarr(int(s), int(k)))
                            for p, s, k in zip(positions, *self.plan.locate(stream, positions))])

    def _wds_batches(self, batches: range, workers: int) -> Iterator[dict[str, Any]]:
        if not len(batches):
            return
        if workers != self.plan.streams_per_rank:
            raise ValueError(f"the epoch was planned for {self.plan.streams_per_rank} loader workers, "
                             f"the DataLoader has {workers}")
        stream, first = rank_batches(self.plan, self.rank, batches[0])
        order = self.plan.order(stream)
        order.skip(first)           # a resumed stream: the buffer's draws replayed, no data read
        source = self._wds_source(stream, set(order.buffer), order.fed)
        held: dict[int, dict] = {}
        while positions := order.take(self.plan.batch_size):
            items = []
            for p in positions:
                while p not in held:
                    q, sample = next(source)
                    held[q] = sample
                sample = held.pop(p)
                items.append(self._item(stream, p, sample["__key__"], *decode_wds_sample(sample, self.info)))
            yield _collate(items)
        for _ in source:    # finish the stream, so its last shard's clip count is checked too
            pass

    def _wds_source(self, stream: int, buffered: set[int], fed: int) -> Iterator[tuple[int, dict]]:
        """(position, raw sample) of every position the stream still outputs (those in the shuffle
        buffer, and from `fed` on), in read order. Shards before the first of them are not opened."""
        shards = _Shards(self.info, self.plan.rows)
        for p0, shard, k0, n in self.plan.segments(stream, min(buffered, default=fed)):
            wanted = [p for p in range(p0, p0 + n) if p >= fed or p in buffered]
            if wanted:
                opened = shards.open(shard)
                yield from _tar_samples(self.info, shard, opened.clip_ids,
                                        {int(opened.rows[k0 + p - p0]): p for p in wanted})


class TrainData:
    """Epochs of batches for one rank; `epoch(e, start)` is an iterator over a DataLoader."""

    def __init__(self, info: StoreInfo, *, fmt: str = "webdataset", batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, shuffle_buffer: int = 256,
                 augment: float = 0.0, rows: Selection | None = None):
        self.info, self.fmt, self.batch_size, self.seed = info, fmt, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle_buffer, self.augment = shuffle_buffer, augment
        self.rows = rows if rows is not None else Selection(info.counts)
        if fmt not in info.formats:
            raise StoreContentError(f"{info.root} has no {fmt} shards (it holds {', '.join(info.formats) or 'none'})")

    def plan(self, epoch: int) -> EpochPlan:
        return plan_epoch(self.rows, fmt=self.fmt, seed=self.seed, epoch=epoch, world_size=self.world_size,
                          streams_per_rank=max(1, self.num_workers), batch_size=self.batch_size,
                          shuffle_buffer=self.shuffle_buffer)

    def batches_per_epoch(self) -> int:
        return self.plan(0).batches_per_rank

    def epoch(self, epoch: int, start: int = 0) -> DataLoader:
        ds = ClipStream(self.info, self.plan(epoch), fmt=self.fmt, rank=self.rank, start=start, augment=self.augment)
        return DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          prefetch_factor=2 if self.num_workers else None, persistent_workers=False)


def eval_batches(info: StoreInfo, *, batch_size: int, fmt: str = "webdataset",
                 rows: Selection | None = None) -> DataLoader:
    """The selected clips (default: the whole store), each once, in store order, without augmentation."""
    rows = rows if rows is not None else Selection(info.counts)
    ends = np.cumsum(rows.counts)
    if not len(ends) or ends[-1] == 0:
        raise StoreContentError(f"{info.root}: no clips to evaluate")
    # One stream whose length is not a multiple of the batch: the last batch is short, so no
    # clip is counted twice.
    plan = EpochPlan(rows=rows, shard_order=np.arange(len(ends)), ends=ends, length=int(ends[-1]),
                     batch_size=batch_size, streams_per_rank=1)
    return DataLoader(ClipStream(info, plan, fmt=fmt, rank=0), batch_size=None, num_workers=0)


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
