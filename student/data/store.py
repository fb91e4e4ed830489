"""What a rank knows of a store before it reads a clip: store.json's schema and target statistics and
the manifest's per-shard counts (`StoreInfo`), nothing that grows with the number of clips; and
whether the store fits the model."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from student.data.errors import StoreContentError, reason_of


FORMATS = ("webdataset", "zarr")


class SchemaMismatchError(ValueError):
    """The store's schema (clip length, frame size, target tokens or width) does not fit the model."""


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
        raise StoreContentError(f"{root}: store.json target_stats cannot be read as numbers: {reason_of(e)}") from None
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
