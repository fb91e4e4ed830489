"""A rank's batches: `ClipStream` reads the planned epochs in DataLoader workers, `TrainData` runs one
loader through all epochs, `eval_batches` reads held-out clips once, and `BadClipBudget` counts the
bad clips the workers report, in the main process.

A rank's DataLoader takes batches from its workers in turn; worker `w` of a loader started
at batch `k` serves batches `k + w, k + w + W, ...`, which keeps the order independent of
where the run was resumed. The trainer's loader runs on from one epoch into the next
(`TrainData.run`): its workers are never restarted and prefetch the next epoch's first batches
while this one drains. The WebDataset order depends on `num_workers` and the world size (the
number of streams); the Zarr order only on the world size.

Evaluation reads the held-out clips (or a whole second store) once each, in store order, streamed
like training; under DDP each rank reads a contiguous slice of them and the metrics' sums are
all-reduced.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from student.data.errors import BadClip, StoreContentError, TooManyBadClipsError, reason_of
from student.data.plan import EpochPlan, plan_epoch, rank_batches
from student.data.selection import Selection
from student.data.shards import Shards, decode_wds_sample, tar_samples
from student.data.store import StoreInfo

log = logging.getLogger(__name__)


def epoch_clip_ids(info: StoreInfo, plan: EpochPlan, rank: int) -> list[list[str]]:
    """The clip ids of each of a rank's batches, in training order (for audits and tests: it reads the
    index file of every shard the rank touches)."""
    shards, orders, out = Shards(info, plan.rows), {}, []
    for b in range(plan.batches_per_rank):
        stream, _ = rank_batches(plan, rank, b)     # a stream's batches come in order
        order = orders.setdefault(stream, plan.order(stream))
        located = zip(*plan.locate(stream, order.take(plan.batch_size)))
        out.append([shards.open(int(s)).clip_id(int(k)) for s, k in located])
    return out


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
    """One epoch of one rank's batches, starting at batch `start`; see `student.data.plan`. With `plans`
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
        shards = Shards(self.info, plan.rows, zarr=True)
        for b in batches:
            stream, first = rank_batches(plan, self.rank, b)
            positions = np.arange(first, min(first + plan.batch_size, plan.stream_length(stream)))
            got = [shards.read_zarr(int(s), int(k)) for s, k in zip(*plan.locate(stream, positions))]
            yield self._batch(plan, stream, positions.tolist(), got)

    def _decode(self, sample: dict | BadClip) -> tuple[str, np.ndarray, np.ndarray] | BadClip:
        if isinstance(sample, BadClip):
            return sample
        key = sample["__key__"]
        try:
            return key, *decode_wds_sample(sample, self.info)
        except Exception as e:
            return BadClip(sample.get("__shard__", str(sample.get("__url__"))), key, reason_of(e))

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
        shards = Shards(self.info, plan.rows)
        for p0, shard, k0, n in plan.segments(stream, min(buffered, default=fed)):
            wanted = [p for p in range(p0, p0 + n) if p >= fed or p in buffered]
            if not wanted:
                continue
            opened = shards.open(shard)
            if opened.error is not None:
                for p in wanted:
                    yield p, opened.bad(k0 + p - p0)
            else:
                yield from tar_samples(self.info, shard, opened, {int(opened.rows[k0 + p - p0]): p for p in wanted})


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
    counted over the whole run in `bad_clips` (at most `max_bad_clips`, see `student.data.errors`)."""

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
                     streams_per_rank=1, batches_per_rank=-(-(hi - lo) // batch_size),
                     runs=np.array([[lo, hi - lo]], dtype=np.int64))
    return Batches(DataLoader(ClipStream(info, plan, fmt=fmt, rank=0, compact=True), batch_size=None, num_workers=0),
                   BadClipBudget(max_bad_clips, "the evaluation"))
