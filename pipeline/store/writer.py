"""Writing a store: set-up and resume bookkeeping, error rows, and finalising.

Exactly-once under crashes and retries: a shard's data, index file and statistics are published
first and its commit record last; shard names are a hash of the shard's clip ids, so a retried
writer rewrites the same names instead of adding duplicates; objects without a commit record are
leftovers of a crash and are deleted by the next writer. Finalising writes store.json and, last,
manifest.parquet, whose presence means the store is complete. While a job adds to a complete
store, the last manifest waits in `_commits/manifest.parquet` with the exact target sums of the
shards it lists, so finalising reads the statistics of new shards only.

Everything here costs O(shards) plus a few integers per input video: commit records are read
READ_BATCH at a time with bounded parallelism and folded into numpy arrays as they arrive.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import tempfile
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.remote import storage_options as remote_storage_options
from pipeline.store.files import (Layout, filesystem, is_local, list_names, parquet_bytes, read_json, read_many,
                                  read_parquet, write_atomic)
from pipeline.store.records import Progress, ShardCommit, TargetStats, VideoCounts, VideoTally, manifest_table
from pipeline.store.schema import ERRORS_SCHEMA, StoreError, check_compatible, video_key
from pipeline.store.shard import ShardWriter, digest

log = logging.getLogger(__name__)

STATS_KEY = b"liteframe.target_stats"


class StoreWriter:
    """Owns one output root while a job writes it. One job per root at a time."""

    def __init__(self, root: str, schema: Mapping, storage_options: Mapping | None = None, read_workers: int = 32):
        self.root = str(root)
        self.schema = dict(schema)
        self.storage_options = (dict(storage_options) if storage_options is not None
                                else remote_storage_options(self.root))
        self.fs, self.path = filesystem(self.root, self.storage_options)
        self.layout = Layout(self.path)
        self.read_workers = read_workers
        self.known_shards: set[str] = set()

    # -- set-up
    def prepare(self) -> Progress:
        """Create store.json (and the Zarr root group) or check they match; drop crash leftovers;
        return what is done."""
        if self.fs.exists(self.layout.store_json):
            check_compatible(read_json(self.fs, self.layout.store_json), self.schema, self.root)
        else:
            self.fs.makedirs(self.path, exist_ok=True)
            write_atomic(self.fs, self.layout.store_json, json.dumps(self.schema, indent=1).encode())
        if "zarr" in self.schema["formats"] and not self.fs.exists(f"{self.layout.zarr()}/zarr.json"):
            root_group = {"zarr_format": 3, "node_type": "group",
                          "attributes": {"config_hash": self.schema["config_hash"]}}
            write_atomic(self.fs, f"{self.layout.zarr()}/zarr.json", json.dumps(root_group).encode())
        tally, commits = self._scan()
        self.known_shards = {c.shard for c in commits}
        self._clean_leftovers(self.known_shards)
        return self._progress(tally)

    def mark_incomplete(self) -> None:
        """Before adding shards: the manifest moves aside (readers never see a half-updated store),
        and keeps the exact sums of the shards it lists for the next finalise."""
        if self.fs.exists(self.layout.manifest):
            write_atomic(self.fs, self.layout.accounted_manifest, self.fs.cat_file(self.layout.manifest))
            self.fs.rm(self.layout.manifest)

    def commit_names(self) -> list[str]:
        return list_names(self.fs, self.layout.commits, ".json")

    def read_commits(self, names: Sequence[str] | None = None) -> Iterator[ShardCommit]:
        names = self.commit_names() if names is None else names
        for path, data in read_many(self.fs, [self.layout.commit(n) for n in names], self.read_workers):
            yield ShardCommit.from_json(data, path)

    def _scan(self) -> tuple[VideoTally, list[ShardCommit]]:
        """All commit records, folded as they arrive: the per-video counts into a tally, the rest
        kept (O(1) each)."""
        tally, commits = VideoTally(), []
        for c in self.read_commits():
            tally.add_commit(c)
            commits.append(dataclasses.replace(c, videos=VideoCounts()))
        return tally, commits

    def read_errors(self) -> pa.Table:
        """Every committed error row (one small Parquet file per failed input or clip)."""
        folder = f"{self.path}/errors"
        paths = [f"{folder}/{n}.parquet" for n in list_names(self.fs, folder, ".parquet")]
        tables = [read_parquet(data).cast(ERRORS_SCHEMA) for _, data in read_many(self.fs, paths, self.read_workers)]
        return pa.concat_tables([ERRORS_SCHEMA.empty_table(), *tables])

    def _progress(self, tally: VideoTally) -> Progress:
        errors = self.read_errors()
        progress, where = tally.progress(errors)
        if where:   # partial videos (a crash mid-video): the clip ids already accounted for
            shards = sorted({s for names in where.values() for s in names})
            paths = [self.layout.index(s) for s in shards]
            rows = [read_parquet(data).select(["video_uri", "clip_id"]) for _, data in
                    read_many(self.fs, paths, self.read_workers)]
            clip_errors = errors.filter(pc.not_equal(errors.column("clip_id"), "")).select(
                ["video_uri", "clip_id"])
            for row in pa.concat_tables([*rows, clip_errors]).to_pylist():
                if video_key(row["video_uri"]) in where:
                    progress.partial.setdefault(row["video_uri"], set()).add(row["clip_id"])
        return progress

    def _clean_leftovers(self, committed: set[str]) -> None:
        """Delete staging folders and shard objects without a commit record, and half-written
        temporary files. Tolerates objects vanishing meanwhile (a killed job's last worker may
        still be finishing)."""
        targets = [f"{self.path}/_tmp"]
        for folder, suffix in (("webdataset", ".tar"), ("zarr", ""), ("index", ".parquet"),
                               ("_commits", ".stats.npy"), ("errors", ".parquet")):
            base = f"{self.path}/{folder}"
            if not self.fs.exists(base):
                continue
            for p in self.fs.ls(base, detail=False):
                name = p.rstrip("/").rsplit("/", 1)[-1]
                if ".tmp-" in name or (name.startswith("shard-") and name.endswith(suffix)
                                       and name[: len(name) - len(suffix)] not in committed):
                    targets.append(p)
        for p in targets:
            try:
                if self.fs.exists(p):
                    log.info("removing uncommitted leftover %s", p)
                    self.fs.rm(p, recursive=True)
            except FileNotFoundError:
                pass

    # -- writing
    def shard_writer(self, zarr_shard_clips: int = 32) -> ShardWriter:
        return ShardWriter(self, zarr_shard_clips=zarr_shard_clips)

    def commit_errors(self, rows: Sequence[Mapping]) -> None:
        """Commit error rows, each its own small Parquet file named from (uri, clip id): a retry
        rewrites the same file, so a row is never counted twice.

        A video-level row (no `clip_id`) fails its video; `good_clips` are the clip ids that did
        decode before the failure: they travel downstream separately, so the video counts as done
        only once they are committed too. A clip-level row (`clip_id`, `video_clips`) accounts
        for that one clip, so the rest of its video completes as usual."""
        for r in rows:
            row = {k: str(r.get(k, "")) for k in ("video_uri", "stage", "error_type", "message", "clip_id")}
            row["video_clips"] = int(r["video_clips"]) if row["clip_id"] else 0
            row["good_clips"] = len(set(r.get("good_clips", ())))
            name = "err-" + digest([f"{row['video_uri']}\0{row['clip_id']}"])
            write_atomic(self.fs, self.layout.errors(name),
                         parquet_bytes(pa.Table.from_pylist([row], schema=ERRORS_SCHEMA)))

    def staging_dir(self) -> str:
        """Local folder for a shard being built: inside the store when local (rename stays atomic)."""
        if is_local(self.fs):
            base = os.path.join(self.path, "_tmp")
        else:
            base = os.path.join(tempfile.gettempdir(), "liteframe-staging")
        os.makedirs(base, exist_ok=True)
        return tempfile.mkdtemp(prefix="shard-", dir=base)

    # -- finalise
    def finalise(self, written: Iterable[str] | None = None) -> dict:
        """Write store.json (statistics, summary) and, last, manifest.parquet.

        `written`: the shards this job's writers committed. With it, a shard committed by anyone
        else since `prepare` (a worker of an earlier, killed job that outlived its driver) is a
        stale duplicate of this job's clips and is removed with its data."""
        tally, commits = self._scan()
        if written is not None:
            valid = self.known_shards | set(written)
            stale = {c.shard for c in commits if c.shard not in valid}
            for shard in sorted(stale):
                log.warning("dropping shard %s committed by another job during this one", shard)
                self.fs.rm(self.layout.commit(shard))
            if stale:
                commits = [c for c in commits if c.shard not in stale]
                self._clean_leftovers({c.shard for c in commits})
                tally = VideoTally()
                for c in self.read_commits([c.shard for c in commits]):
                    tally.add_commit(c)
        stats = self._target_stats(commits)
        progress = self._progress(tally)
        schema = dict(self.schema)
        schema["target_stats"] = stats.to_schema()
        schema["summary"] = {"clips": sum(c.clips for c in commits), "videos": progress.complete_videos,
                             "failed_videos": progress.failed_videos,
                             "partial_videos": progress.partial_failed_videos, "shards": len(commits)}
        manifest = manifest_table(commits).replace_schema_metadata({STATS_KEY: stats.to_metadata()})
        write_atomic(self.fs, self.layout.store_json, json.dumps(schema, indent=1).encode())
        write_atomic(self.fs, self.layout.manifest, parquet_bytes(manifest))
        if self.fs.exists(self.layout.accounted_manifest):
            self.fs.rm(self.layout.accounted_manifest)
        return schema

    def _target_stats(self, commits: Sequence[ShardCommit]) -> TargetStats:
        """The last manifest's exact sums plus the statistics files of shards it does not list
        (all of them when it lists a shard that no longer exists)."""
        dim = int(self.schema["target"]["dim"])
        stats, accounted = TargetStats.zeros(dim), set()
        for path in (self.layout.manifest, self.layout.accounted_manifest):
            if self.fs.exists(path):
                last = read_parquet(self.fs.cat_file(path))
                listed = set(last.column("shard").to_pylist())
                meta = last.schema.metadata or {}
                if STATS_KEY in meta and listed <= {c.shard for c in commits}:
                    stats, accounted = TargetStats.from_metadata(meta[STATS_KEY]), listed
                break
        new = [c for c in commits if c.shard not in accounted]
        counts = {self.layout.stats(c.shard): c.stats_count for c in new}
        for path, data in read_many(self.fs, list(counts), self.read_workers):   # streamed: 57 KB a shard at D=3584
            stats.add(np.load(io.BytesIO(data), allow_pickle=False), counts.pop(path))
        if counts:
            raise StoreError(f"{self.root}: committed shards without their statistics file: {sorted(counts)[:3]}")
        return stats


def roll_shards(writer: StoreWriter, clips: Iterable[Mapping], shard_bytes: int,
                zarr_shard_clips: int = 32) -> Iterable[ShardCommit]:
    """Write clips into shards of about `shard_bytes`, yielding each commit record."""
    shard = writer.shard_writer(zarr_shard_clips)
    try:
        for clip in clips:
            shard.add(clip)
            if shard.nbytes >= shard_bytes:
                yield shard.commit()
                shard = writer.shard_writer(zarr_shard_clips)
        record = shard.commit()
        if record is not None:
            yield record
    except BaseException:
        shard.abort()
        raise
