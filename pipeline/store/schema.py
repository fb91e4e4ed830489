"""What a store is: its version, identity (store.json), and the Arrow schemas of its Parquet files."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Sequence

import pyarrow as pa

SCHEMA_VERSION = 2
FORMATS = ("webdataset", "zarr")
FRAME_ENCODINGS = ("jpg", "png", "npy")
TARGET_DTYPES = ("float16", "bfloat16")
# Sections of store.json that define what a clip's data means; two runs that differ in any of
# them must not write into the same store.
IDENTITY_KEYS = ("teacher", "compression", "clip", "frames", "target", "formats")
# Held-out fractions the manifest counts per shard, so a trainer can hold out videos without
# reading the index (see heldout_score).
HELDOUT_LEVELS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5)

INDEX_SCHEMA = pa.schema([
    ("clip_id", pa.string()),
    ("video_id", pa.string()),
    ("video_uri", pa.string()),
    ("view", pa.int32()),
    ("clip_index", pa.int32()),
    ("fps", pa.float64()),
    ("start", pa.float64()),
    ("timestamps", pa.list_(pa.float64())),
    ("crop_box", pa.list_(pa.int32())),
    ("padded", pa.int32()),
    ("video_clips", pa.int32()),   # clips planned for the whole video: lets a resume tell done videos
    ("decoder", pa.string()),      # what decoded its frames: "ffmpeg" (CPU) or "nvdec"; null in older stores
    ("shard", pa.string()),
    ("row", pa.int32()),
    ("checksum", pa.string()),     # sha256 of the stored target bytes, first 16 hex digits
])
INDEX_FIELDS = [f.name for f in INDEX_SCHEMA if f.name not in ("shard", "row", "checksum")]

ERRORS_SCHEMA = pa.schema([
    ("video_uri", pa.string()),
    ("stage", pa.string()),
    ("error_type", pa.string()),
    ("message", pa.string()),
    ("clip_id", pa.string()),      # empty when the whole video failed
    ("video_clips", pa.int32()),   # clip rows: clips planned for the video (0 for a video row)
    ("good_clips", pa.int32()),    # video rows: clips it yielded before failing (they are in shards)
])

MANIFEST_SCHEMA = pa.schema([
    ("shard", pa.string()),
    ("clips", pa.int64()),
    ("bytes_webdataset", pa.int64()),
    ("bytes_zarr", pa.int64()),
    ("formats", pa.list_(pa.string())),
    ("heldout_clips", pa.list_(pa.int64())),    # per HELDOUT_LEVELS: clips of videos scoring <= it
    ("first_video_score", pa.float64()),        # lowest heldout_score of the shard's videos
    ("first_video_clips", pa.int64()),          # clips of that video in the shard
])


class StoreError(RuntimeError):
    """A store that cannot be opened or written as asked."""


class StoreMismatchError(StoreError):
    """The output already holds a store made with another teacher/compression/clip/frame config."""


def heldout_score(video_id: str) -> float:
    """A video's place in [0, 1) for held-out splits: a hash, so all views of a video fall on one
    side and the split never depends on a seed or on which shard the clips landed in."""
    return int.from_bytes(hashlib.sha1(str(video_id).encode()).digest()[:8], "big") / 2**64


def video_key(uri: str) -> int:
    """64 bits identifying an input URI (the hash in pipeline.video.video_id): what commit records
    and the resume bookkeeping keep per video instead of the URI string."""
    return int.from_bytes(hashlib.sha256(str(uri).encode()).digest()[:8], "big")


def make_schema(*, teacher: Mapping, compression: Mapping, clip: Mapping, frames: Mapping,
                target: Mapping, formats: Sequence[str] = FORMATS, **extra: Any) -> dict:
    """store.json content without the statistics (those come at finalise)."""
    formats = sorted(set(formats))
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise StoreError(f"unknown store formats {unknown or formats} (known: {', '.join(FORMATS)})")
    if frames.get("encoding") not in FRAME_ENCODINGS:
        raise StoreError(f"unknown frame encoding {frames.get('encoding')!r}")
    if target.get("dtype") not in TARGET_DTYPES:
        raise StoreError(f"unknown target dtype {target.get('dtype')!r}")
    schema = json.loads(json.dumps({
        "schema_version": SCHEMA_VERSION, "teacher": dict(teacher), "compression": dict(compression),
        "clip": dict(clip), "frames": dict(frames), "target": dict(target), "formats": formats,
        "checksum": "sha256(target bytes)[:16]", **extra}))
    schema["config_hash"] = identity_hash(schema)
    return schema


def identity_hash(schema: Mapping) -> str:
    identity = {k: schema[k] for k in IDENTITY_KEYS}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def check_version(schema: Mapping, root: str) -> None:
    """A store of another layout version is an error that says what to do."""
    version = schema.get("schema_version")
    if version == SCHEMA_VERSION:
        return
    if version == 1:
        raise StoreError(f"{root}: a schema_version 1 store (one index.parquet); this code reads and writes "
                         f"version {SCHEMA_VERSION} (index/<shard>.parquet + manifest.parquet). Upgrade it with "
                         f"`python -m pipeline.store.upgrade {root}` (rewrites metadata only, data untouched)")
    raise StoreError(f"{root}: schema_version {version} (this code reads {SCHEMA_VERSION})")


def check_compatible(existing: Mapping, wanted: Mapping, root: str = "") -> None:
    """Raise StoreMismatchError naming every identity section that differs."""
    check_version(existing, root)
    diffs = [f"{k}: store has {json.dumps(existing.get(k), sort_keys=True)}, "
             f"this job wants {json.dumps(wanted.get(k), sort_keys=True)}"
             for k in IDENTITY_KEYS if existing.get(k) != wanted.get(k)]
    if diffs:
        raise StoreMismatchError(f"{root} already holds a store made with another config; use another "
                                 "--output or the same config.\n  " + "\n  ".join(diffs))
