"""Streaming a clip store into training batches, in an order that is a pure function of
(seed, epoch, position), so a stopped run resumes on exactly the samples it would have seen.

WebDataset (default): an epoch is the store's training rows laid out shard after shard, the
shards permuted by (seed, epoch). That sequence is wrapped to a length that splits evenly
into `world_size * num_workers` streams of whole batches (so no rank or loader worker ever
runs dry), each stream a contiguous piece read front to back. Inside a stream a shuffle
buffer reorders the samples; its permutation is computed on positions alone, so resuming
after `k` batches skips the samples already consumed without decoding them (their tar bytes
are read, never their JPEGs).

Zarr: rows are read by index, so an epoch is simply a seeded permutation of the training
rows, split evenly over ranks; any loader worker can serve any batch.

A rank's DataLoader takes batches from its workers in turn; worker `w` of a loader started
at batch `k` serves batches `k + w, k + w + W, ...`, which keeps the order independent of
where the run was resumed. The WebDataset order depends on `num_workers` and the world size
(the number of streams); the Zarr order only on the world size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

FORMATS = ("webdataset", "zarr")


class SchemaMismatchError(ValueError):
    """The store's schema (clip length, frame size, target tokens or width) does not fit the model."""


class StoreContentError(ValueError):
    """A shard disagrees with the store's index (keys, clip count or array shapes)."""


@dataclass
class StoreInfo:
    """What the trainer needs from a store: its schema and, per shard, the clips it holds."""

    root: str
    store: Any                      # pipeline.store.Store (fs, shard_urls, ...); None for a schema alone
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
    clip_ids: list[list[str]]       # per shard, clip ids in row order
    video_ids: list[list[str]]

    def shard_url(self, shard: int) -> str | None:
        return self._urls[shard]

    def __post_init__(self) -> None:
        has_tars = self.store is not None and "webdataset" in self.formats
        urls = {u.rstrip("/").rsplit("/", 1)[-1].removesuffix(".tar"): u
                for u in (self.store.shard_urls(format="webdataset") if has_tars else [])}
        self._urls = [urls.get(s) for s in self.shards]
        self._pid = os.getpid()
        self.counts = [len(c) for c in self.clip_ids]     # clips per shard

    @property
    def formats(self) -> list[str]:
        return list(self.schema.get("formats", FORMATS)) if self.store is not None else []

    @classmethod
    def from_schema(cls, schema: dict, root: str, store: Any = None, shards: list[str] | None = None,
                    clip_ids: list[list[str]] | None = None, video_ids: list[list[str]] | None = None) -> "StoreInfo":
        """Shapes and statistics from store.json; without `store`, a description with no clips to read
        (enough to build a student and feed it synthetic batches)."""
        clip, frames, target, stats = (schema[k] for k in ("clip", "frames", "target", "target_stats"))
        return cls(
            root=root, store=store, schema=schema, clip_frames=int(clip["frames"]),
            frame_size=tuple(int(x) for x in frames["size"]), frame_ext=frames["encoding"],
            target_tokens=int(target["tokens"]), target_dim=int(target["dim"]), target_dtype=str(target["dtype"]),
            target_mean=np.asarray(stats["mean"], dtype=np.float32),
            # a channel that never varies would divide by zero when standardised
            target_std=np.maximum(np.asarray(stats["std"], dtype=np.float32), 1e-6),
            shards=shards or [], clip_ids=clip_ids or [], video_ids=video_ids or [])

    def local_store(self) -> Any:
        """The store with a filesystem made in this process: s3fs (async fsspec) objects do not
        survive the fork into DataLoader workers."""
        if self._pid != os.getpid():
            from pipeline.store import filesystem

            fs, _ = filesystem(self.root, self.store.storage_options)
            self.store, self._pid = dataclasses.replace(self.store, fs=fs), os.getpid()
        return self.store


def read_store(root: str) -> StoreInfo:
    """Open a store written by `jobs.extract` and read its schema and index once."""
    from pipeline.store import open_store

    store = open_store(root)
    index = store.index.select(["shard", "row", "clip_id", "video_id"]).sort_by(
        [("shard", "ascending"), ("row", "ascending")])
    shard_col = np.asarray(index.column("shard").to_pylist(), dtype=object)
    rows = index.column("row").to_numpy()
    ids, vids = index.column("clip_id").to_pylist(), index.column("video_id").to_pylist()
    cuts = [0, *(np.flatnonzero(shard_col[1:] != shard_col[:-1]) + 1).tolist(), len(rows)]
    shards, clip_ids, video_ids = [], [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        if not np.array_equal(rows[a:b], np.arange(b - a)):
            raise StoreContentError(f"{root}: index rows of shard {shard_col[a]} are not 0..{b - a - 1}")
        shards.append(str(shard_col[a]))
        clip_ids.append(ids[a:b])
        video_ids.append(vids[a:b])
    return StoreInfo.from_schema(store.schema, root, store, shards, clip_ids, video_ids)


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


def heldout_mask(info: StoreInfo, fraction: float) -> list[np.ndarray]:
    """Per shard, True for clips held out for evaluation. Chosen by a hash of the video id, so the
    views of one video never straddle the split and the split never depends on the seed; at least
    one video is held out, so a small store still gets an evaluation."""
    def score(video_id: str) -> float:
        return int.from_bytes(hashlib.sha1(video_id.encode()).digest()[:8], "big") / 2**64

    scores = {v: score(v) for vids in info.video_ids for v in vids}
    cut = max(fraction, min(scores.values(), default=0.0))
    return [np.array([scores[v] <= cut for v in vids], dtype=bool) for vids in info.video_ids]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


_SHARDS, _SHUFFLE, _AUGMENT, _ZARR = 1, 2, 3, 4   # RNG stream tags


def shuffle_buffer_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The output order of a shuffle buffer of `buffer` slots fed positions 0..n-1 (webdataset's
    algorithm). Output j always comes from the first j + buffer inputs, which bounds memory."""
    if buffer <= 1 or n <= 1:
        return np.arange(n)
    # The buffer's fill level at each draw is known in advance, so all draws are made at once.
    picks = (rng.random(n) * np.minimum(buffer, n - np.arange(n))).astype(np.int64)
    out = np.empty(n, dtype=np.int64)
    buf: list[int] = list(range(min(buffer - 1, n)))
    nxt = len(buf)
    for j in range(n):
        if nxt < n:
            buf.append(nxt)
            nxt += 1
        k = int(picks[j])
        buf[k], buf[-1] = buf[-1], buf[k]
        out[j] = buf.pop()
    return out


@dataclass(frozen=True)
class EpochPlan:
    """Where each sample of one epoch comes from, for every (rank, stream). Shuffled orders are made
    per stream on demand, so a rank only pays for its own streams."""

    rows: np.ndarray         # int64 [streams, length, 2]: (shard, row) per position, in read order
    batch_size: int
    streams_per_rank: int
    shuffle_buffer: int = 0
    seed: int = 0
    epoch: int = 0

    @property
    def batches_per_rank(self) -> int:
        return self.streams_per_rank * math.ceil(self.rows.shape[1] / self.batch_size)

    def order(self, stream: int) -> np.ndarray:
        """Output j of the stream reads position order(stream)[j]."""
        rng = _rng(self.seed, self.epoch, _SHUFFLE, stream)
        return shuffle_buffer_order(self.rows.shape[1], self.shuffle_buffer, rng)


def plan_epoch(counts: Sequence[int], keep: Sequence[np.ndarray] | None, *, fmt: str, seed: int, epoch: int,
               world_size: int, streams_per_rank: int, batch_size: int, shuffle_buffer: int) -> EpochPlan:
    """The whole epoch as index arithmetic: no data is read. Every stream gets the same number of
    whole batches, wrapping round to the start of the epoch's sequence to fill the last ones."""
    keep = keep if keep is not None else [np.ones(c, dtype=bool) for c in counts]
    if fmt == "webdataset":
        shard_order = _rng(seed, epoch, _SHARDS).permutation(len(counts))
        streams = world_size * streams_per_rank
    elif fmt == "zarr":
        shard_order = np.arange(len(counts))
        streams, streams_per_rank, shuffle_buffer = world_size, 1, 0
        # one stream per rank, already shuffled; its batches are shared round-robin by the workers
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    parts = [np.zeros((0, 2), dtype=np.int64)]
    for s in shard_order:
        kept = np.flatnonzero(keep[s])
        parts.append(np.stack([np.full(len(kept), s), kept], axis=1))
    seq = np.concatenate(parts).astype(np.int64)
    if len(seq) == 0:
        raise StoreContentError("no training clips in the store (all held out, or the store is empty)")
    if fmt == "zarr":
        seq = seq[_rng(seed, epoch, _ZARR).permutation(len(seq))]
    length = math.ceil(len(seq) / (streams * batch_size)) * batch_size
    rows = seq[np.arange(streams * length) % len(seq)].reshape(streams, length, 2)
    return EpochPlan(rows=rows, batch_size=batch_size, streams_per_rank=streams_per_rank,
                     shuffle_buffer=shuffle_buffer, seed=seed, epoch=epoch)


def rank_batches(plan: EpochPlan, rank: int, batch: int) -> tuple[int, int]:
    """(stream, first output position) of the rank's `batch`-th batch of the epoch."""
    s = plan.streams_per_rank
    return rank * s + batch % s, (batch // s) * plan.batch_size


def epoch_clip_ids(info: StoreInfo, plan: EpochPlan, rank: int) -> list[list[str]]:
    """The clip ids of each of a rank's batches, in training order (for audits and tests)."""
    out, orders = [], {}
    for b in range(plan.batches_per_rank):
        stream, first = rank_batches(plan, rank, b)
        if stream not in orders:
            orders[stream] = plan.order(stream)
        pos = orders[stream][first:first + plan.batch_size]
        out.append([info.clip_ids[s][r] for s, r in plan.rows[stream, pos]])
    return out


# ---------------------------------------------------------------- decoding


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


def _wds_samples(info: StoreInfo, shard: int) -> Iterator[dict[str, bytes]]:
    """Raw samples of one shard in tar order (bytes only, nothing decoded)."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    url = info.shard_url(shard)
    if url is None:
        raise StoreContentError(f"{info.root}: shard {info.shards[shard]} is in the index but has no tar")
    with info.local_store().fs.open(url, "rb") as stream:
        yield from group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))


def _read_positions(info: StoreInfo, rows: np.ndarray, needed: np.ndarray) -> Iterator[tuple[int, dict | None]]:
    """(position, raw sample or None when not needed) for every position of a stream, in order.
    Each sample's key is checked against the index row it should be; a shard read to its last
    row is checked to hold no more clips than the index says."""
    pos = 0
    while pos < len(rows):
        shard = int(rows[pos, 0])
        end = pos
        while end < len(rows) and rows[end, 0] == shard and (end == pos or rows[end, 1] > rows[end - 1, 1]):
            end += 1
        if not needed[pos:end].any():
            for p in range(pos, end):
                yield p, None
            pos = end
            continue
        wanted = {int(rows[p, 1]): p for p in range(pos, end)}
        last = max(wanted)
        to_end = last == info.counts[shard] - 1
        row = -1
        samples = _wds_samples(info, shard)
        try:
            for row, sample in enumerate(samples):
                if row >= info.counts[shard]:
                    raise StoreContentError(f"{info.shard_url(shard)}: more clips than the {info.counts[shard]} "
                                            "the index lists")
                if sample["__key__"] != info.clip_ids[shard][row]:
                    raise StoreContentError(f"{info.shard_url(shard)} row {row}: key {sample['__key__']!r}, index "
                                            f"says {info.clip_ids[shard][row]!r}")
                p = wanted.get(row)
                if p is not None:
                    yield p, sample if needed[p] else None
                if row == last and not to_end:
                    break
        finally:
            samples.close()     # the tar stream, now rather than at garbage collection
        if row < last:
            raise StoreContentError(f"{info.shard_url(shard)}: {row + 1} clips, the index lists {info.counts[shard]}")
        pos = end


class _Zarr:
    """Per-shard Zarr arrays, opened once per loader worker; the stored clip ids are checked
    against the index when a shard is opened."""

    def __init__(self, info: StoreInfo):
        self.info = info
        self.shards: dict[int, tuple[Any, Any, str]] = {}

    def _open(self, shard: int) -> tuple[Any, Any, str]:
        if shard not in self.shards:
            g = self.info.local_store().zarr_group(self.info.shards[shard])
            ids = [str(c) for c in np.asarray(g["clip_id"][:])]
            if ids != self.info.clip_ids[shard]:
                bad = next((i for i, (a, b) in enumerate(zip(ids, self.info.clip_ids[shard])) if a != b), len(ids))
                raise StoreContentError(f"zarr shard {self.info.shards[shard]}: {len(ids)} clips, the index lists "
                                        f"{self.info.counts[shard]}; first difference at row {bad}")
            targets = g["targets"]
            self.shards[shard] = (g["frames"], targets, targets.attrs.get("dtype", self.info.target_dtype))
        return self.shards[shard]

    def read(self, shard: int, row: int) -> tuple[np.ndarray, np.ndarray]:
        from pipeline.store import decode_target

        frames, targets, dtype = self._open(shard)
        target = decode_target(np.asarray(targets[row]), dtype)
        return _checked(self.info.clip_ids[shard][row], np.asarray(frames[row]), target, self.info)


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
                 seed: int = 0, epoch: int = 0, augment: float = 0.0):
        self.info, self.plan, self.fmt, self.rank, self.start = info, plan, fmt, rank, start
        self.seed, self.epoch, self.augment = seed, epoch, augment

    def __len__(self) -> int:
        return self.plan.batches_per_rank - self.start

    def _item(self, stream: int, position: int, key_rows: tuple[int, int], frames, target):
        shard, row = key_rows
        jitter = (jitter_factors(self.seed, self.epoch, stream, position, self.augment)
                  if self.augment > 0 else None)
        return self.info.clip_ids[shard][row], frames, target, jitter

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wi = get_worker_info()
        worker, workers = (wi.id, wi.num_workers) if wi is not None else (0, 1)
        mine = range(self.start + worker, self.plan.batches_per_rank, workers)
        if self.fmt == "zarr":
            yield from self._zarr_batches(mine)
        else:
            yield from self._wds_batches(mine, workers)

    def _zarr_batches(self, batches: range) -> Iterator[dict[str, Any]]:
        z = _Zarr(self.info)
        for b in batches:
            stream, first = rank_batches(self.plan, self.rank, b)
            items = []
            for p in range(first, min(first + self.plan.batch_size, self.plan.rows.shape[1])):
                shard, row = (int(v) for v in self.plan.rows[stream, p])
                items.append(self._item(stream, int(p), (shard, row), *z.read(shard, row)))
            yield _collate(items)

    def _wds_batches(self, batches: range, workers: int) -> Iterator[dict[str, Any]]:
        if not len(batches):
            return
        if workers != self.plan.streams_per_rank:
            raise ValueError(f"the epoch was planned for {self.plan.streams_per_rank} loader workers, "
                             f"the DataLoader has {workers}")
        stream, first = rank_batches(self.plan, self.rank, batches[0])
        rows, order = self.plan.rows[stream], self.plan.order(stream)
        needed = np.zeros(len(rows), dtype=bool)
        needed[order[first:]] = True
        source = _read_positions(self.info, rows, needed)
        held: dict[int, dict] = {}
        items = []
        for j in range(first, len(order)):
            p = int(order[j])
            while p not in held:
                q, sample = next(source)
                if sample is not None:
                    held[q] = sample
            sample = held.pop(p)
            items.append(self._item(stream, p, tuple(int(v) for v in rows[p]), *decode_wds_sample(sample, self.info)))
            if len(items) == self.plan.batch_size:
                yield _collate(items)
                items = []
        if items:
            yield _collate(items)
        for _ in source:    # finish the stream, so its last shard's clip count is checked too
            pass


class TrainData:
    """Epochs of batches for one rank; `epoch(e, start)` is an iterator over a DataLoader."""

    def __init__(self, info: StoreInfo, *, fmt: str = "webdataset", batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, shuffle_buffer: int = 256,
                 augment: float = 0.0, heldout: Sequence[np.ndarray] | None = None):
        self.info, self.fmt, self.batch_size, self.seed = info, fmt, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle_buffer, self.augment = shuffle_buffer, augment
        self.keep = [~h for h in heldout] if heldout is not None else None
        if fmt not in info.formats:
            raise StoreContentError(f"{info.root} has no {fmt} shards (it holds {', '.join(info.formats) or 'none'})")

    def plan(self, epoch: int) -> EpochPlan:
        return plan_epoch(self.info.counts, self.keep, fmt=self.fmt, seed=self.seed, epoch=epoch,
                          world_size=self.world_size, streams_per_rank=max(1, self.num_workers),
                          batch_size=self.batch_size, shuffle_buffer=self.shuffle_buffer)

    def batches_per_epoch(self) -> int:
        return self.plan(0).batches_per_rank

    def epoch(self, epoch: int, start: int = 0) -> DataLoader:
        ds = ClipStream(self.info, self.plan(epoch), fmt=self.fmt, rank=self.rank, start=start,
                        seed=self.seed, epoch=epoch, augment=self.augment)
        return DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          prefetch_factor=2 if self.num_workers else None, persistent_workers=False)


def eval_batches(info: StoreInfo, *, batch_size: int, fmt: str = "webdataset",
                 heldout: Sequence[np.ndarray] | None = None) -> DataLoader:
    """The held-out clips (or a whole second store), each once, in store order, without augmentation."""
    keep = heldout if heldout is not None else [np.ones(c, dtype=bool) for c in info.counts]
    seq = np.array([(s, r) for s in range(len(keep)) for r in np.flatnonzero(keep[s])], dtype=np.int64).reshape(-1, 2)
    if len(seq) == 0:
        raise StoreContentError(f"{info.root}: no clips to evaluate")
    # One stream whose length is not a multiple of the batch: the last batch is short, so no
    # clip is counted twice.
    plan = EpochPlan(rows=seq[None], batch_size=batch_size, streams_per_rank=1)
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
