"""A loader worker's access to shards: opening one (the only place its index file is read, checked
against the manifest; a few kept open, least recently used first to go), reading its clips (zarr by
row, a tar front to back) and checking every clip read (`student.data.errors` says how a damaged one
is reported)."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from student.data.errors import BadClip, StoreContentError, reason_of
from student.data.selection import Selection
from student.data.store import StoreInfo

log = logging.getLogger(__name__)


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


class Shards:
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
            return _Shard(name, ids, rows, error=reason_of(e))
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
            return opened.bad(k, f"zarr row {row}: {reason_of(e)}")


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
        raise StoreContentError(f"clip {key} in {sample.get('__url__')}: cannot decode: {reason_of(e)}") from e
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


def tar_samples(info: StoreInfo, shard: int, opened: _Shard,
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
        yield from lost(n, f"cannot open {url}: {reason_of(e)}")
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
            yield from lost(n, f"{url}: unreadable after {row} clips: {reason_of(e)}")
        finally:
            samples.close()     # the tar stream, now rather than at garbage collection
    yield from lost(n, f"{url} ends after {row} clips, the index lists {n}")
