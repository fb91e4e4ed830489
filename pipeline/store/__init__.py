"""The sharded store of teacher targets: one layout (schema_version 2) on local disk and on S3.

    <root>/store.json                 schema, teacher/compression/clip/frame specs, target stats, summary
    <root>/manifest.parquet           one row per shard (clips, bytes, formats, held-out counts); written
                                      LAST, so its presence means "store complete"
    <root>/index/<shard>.parquet      the index rows of one shard (one row per clip)
    <root>/errors/<name>.parquet      one row per failed input or clip
    <root>/webdataset/<shard>.tar     per clip: <key>.f00.jpg ... <key>.json <key>.target.npy
    <root>/zarr/zarr.json             the Zarr v3 root group; zarr/<shard>/ one group per shard:
                                      frames [n,T,H,W,3] uint8, targets [n,N,D], clip_id [n]
    <root>/_commits/<shard>.json      commit record: a shard exists only once this exists
    <root>/_commits/<shard>.stats.npy its target sums [2, D] (sum, sum of squares)

Metadata grows with the number of shards, never with the clips held in one process: readers open
the manifest, and a shard's index file only when they open that shard. Standard tools read it all:
`pyarrow.dataset.dataset(root + "/index")`, `ray.data.read_parquet(root + "/index")`, DuckDB's
`read_parquet('<root>/index/*.parquet')`, `webdataset.WebDataset(urls)`, `zarr.open_group(root + "/zarr")`.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from pipeline.store.codec import decode_frame, decode_target, encode_frame, encode_target, frame_column
from pipeline.store.files import filesystem
from pipeline.store.reader import Store, open_store
from pipeline.store.records import Progress, ShardCommit, TargetStats
from pipeline.store.schema import (ERRORS_SCHEMA, FORMATS, FRAME_ENCODINGS, HELDOUT_LEVELS, INDEX_FIELDS, INDEX_SCHEMA,
                                   MANIFEST_SCHEMA, SCHEMA_VERSION, TARGET_DTYPES, StoreError, StoreMismatchError,
                                   check_compatible, heldout_score, make_schema, video_key)
from pipeline.store.shard import ShardWriter
from pipeline.store.writer import StoreWriter, roll_shards

__all__ = [
    "ERRORS_SCHEMA", "FORMATS", "FRAME_ENCODINGS", "HELDOUT_LEVELS", "INDEX_FIELDS", "INDEX_SCHEMA", "MANIFEST_SCHEMA",
    "SCHEMA_VERSION", "TARGET_DTYPES", "Progress", "ShardCommit", "ShardWriter", "Store", "StoreError",
    "StoreMismatchError", "StoreWriter", "TargetStats", "check_compatible", "decode_frame", "decode_target",
    "encode_frame", "encode_target", "filesystem", "frame_column", "heldout_score", "make_schema", "open_store",
    "roll_shards", "video_key", "write_store",
]


def write_store(root: str, schema: Mapping, clips: Iterable[Mapping], errors: Sequence[Mapping] = (),
                shard_bytes: int = 512 << 20, storage_options: Mapping | None = None) -> Store:
    """Write a whole store in this process (no Ray): tests, small datasets, synthetic stores."""
    writer = StoreWriter(root, schema, storage_options)
    writer.prepare()
    writer.mark_incomplete()
    for _ in roll_shards(writer, clips, shard_bytes):
        pass
    writer.commit_errors(list(errors))
    writer.finalise()
    return open_store(root, storage_options)
