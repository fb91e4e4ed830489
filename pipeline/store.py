"""The sharded store of teacher targets: one layout on local disk and on S3.

    <root>/store.json              schema, teacher/compression/clip/frame specs, target stats, config hash
    <root>/index.parquet           one row per clip; written LAST, so its presence means "store complete"
    <root>/errors.parquet          one row per failed input
    <root>/webdataset/<shard>.tar  per clip: <key>.f00.jpg ... <key>.target.npy <key>.json
    <root>/zarr/<shard>/           Zarr v3 group: frames [n,T,H,W,3] uint8, targets [n,N,D], clip_id [n]
    <root>/_commits/<shard>.json   commit record: a shard exists only once this exists

Exactly-once under crashes and retries: shard data is staged locally, published (local: rename;
S3: one upload per object) and only then its commit record is written. Shard names are a hash of
the shard's clip ids, so a retried writer rewrites the same names instead of adding duplicates.
Data without a commit record is a leftover of a crash and is deleted by the next writer.
Finalising merges the commit records into errors.parquet, the target statistics into store.json
and, last, index.parquet.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.remote import storage_options as remote_storage_options

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FORMATS = ("webdataset", "zarr")
FRAME_ENCODINGS = ("jpg", "png", "npy")
TARGET_DTYPES = ("float16", "bfloat16")
# Sections of store.json that define what a clip's data means; two runs that differ in any of
# them must not write into the same store.
IDENTITY_KEYS = ("teacher", "compression", "clip", "frames", "target", "formats")

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
    ("shard", pa.string()),
    ("row", pa.int32()),
    ("checksum", pa.string()),     # sha256 of the stored target bytes, first 16 hex digits
])
ERRORS_SCHEMA = pa.schema([
    ("video_uri", pa.string()),
    ("stage", pa.string()),
    ("error_type", pa.string()),
    ("message", pa.string()),
    ("clip_id", pa.string()),      # empty when the whole video failed
])
INDEX_FIELDS = [f.name for f in INDEX_SCHEMA if f.name not in ("shard", "row", "checksum")]


class StoreError(RuntimeError):
    """A store that cannot be opened or written as asked."""


class StoreMismatchError(StoreError):
    """The output already holds a store made with another teacher/compression/clip/frame config."""


# ---------------------------------------------------------------- targets and frames

def encode_target(target: np.ndarray, dtype: str) -> np.ndarray:
    """float array -> stored array: float16, or bfloat16 as its uint16 bit pattern (npy/zarr lack bf16)."""
    if dtype == "float16":
        return np.asarray(target, dtype=np.float32).astype(np.float16)
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(target, dtype=np.float32).view(np.uint32)
        # round to nearest even, as torch does when casting to bfloat16
        rounded = bits + (0x7FFF + ((bits >> 16) & 1))
        return (rounded >> 16).astype(np.uint16)
    raise StoreError(f"unknown target dtype {dtype!r} (known: {', '.join(TARGET_DTYPES)})")


def decode_target(array: np.ndarray, dtype: str) -> np.ndarray:
    """Stored target array -> float32."""
    array = np.asarray(array)
    if dtype == "float16":
        return array.astype(np.float32)
    if dtype == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    raise StoreError(f"unknown target dtype {dtype!r} (known: {', '.join(TARGET_DTYPES)})")


def encode_frame(frame: np.ndarray, encoding: str, quality: int = 90) -> bytes:
    if encoding == "npy":
        return _npy_bytes(np.asarray(frame, dtype=np.uint8))
    from PIL import Image

    buf = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8), "RGB")
    if encoding == "jpg":
        image.save(buf, format="JPEG", quality=quality)
    elif encoding == "png":
        image.save(buf, format="PNG", compress_level=1)
    else:
        raise StoreError(f"unknown frame encoding {encoding!r} (known: {', '.join(FRAME_ENCODINGS)})")
    return buf.getvalue()


def decode_frame(data: bytes, encoding: str) -> np.ndarray:
    """Encoded frame member -> uint8 [H, W, 3]."""
    if encoding == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def frame_column(i: int) -> str:
    """Name of frame i as a batch column and as the webdataset extension prefix: f00, f01, ..."""
    return f"f{i:02d}"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


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
    identity = {k: schema[k] for k in IDENTITY_KEYS}
    schema["config_hash"] = hashlib.sha256(
        json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    return schema


# ---------------------------------------------------------------- filesystems

def filesystem(root: str, storage_options: Mapping | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fs, path inside fs) for a local dir or an fsspec URL; options default to the environment's
    (endpoint from AWS_ENDPOINT_URL; credentials and region botocore reads from AWS_* itself)."""
    root = str(root)
    options = dict(storage_options) if storage_options is not None else remote_storage_options(root)
    fs, path = fsspec.core.url_to_fs(root, **options)
    return fs, path.rstrip("/")


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Local: temp file + fsync + rename; object stores: a single PUT is already atomic."""
    if _is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


# ---------------------------------------------------------------- reader

@dataclass
class Store:
    """A complete store, opened for reading."""

    root: str
    fs: fsspec.AbstractFileSystem
    path: str
    schema: dict
    index: pa.Table
    errors: pa.Table
    storage_options: dict = field(default_factory=dict)

    @property
    def target_dtype(self) -> str:
        return self.schema["target"]["dtype"]

    @property
    def target_shape(self) -> tuple[int, int]:
        return (int(self.schema["target"]["tokens"]), int(self.schema["target"]["dim"]))

    def shards(self) -> list[str]:
        return sorted(set(self.index.column("shard").to_pylist()))

    def shard_urls(self, format: str = "webdataset") -> list[str]:
        """Full URLs (same scheme as the root) of the shards in the index, sorted."""
        if format not in self.schema["formats"]:
            raise StoreError(f"{self.root}: no {format} shards (store formats: {self.schema['formats']})")
        suffix = ".tar" if format == "webdataset" else ""
        return [f"{self.root.rstrip('/')}/{format}/{s}{suffix}" for s in self.shards()]

    def zarr_group(self, shard: str):
        """The Zarr v3 group of one shard, opened read-only (works for local and S3 roots)."""
        import zarr

        if _is_local(self.fs):
            return zarr.open_group(os.path.join(self.path, "zarr", shard), mode="r")
        return zarr.open_group(f"{self.root.rstrip('/')}/zarr/{shard}", mode="r",
                               storage_options=self.storage_options)

    def decode_target(self, array: np.ndarray) -> np.ndarray:
        return decode_target(array, self.target_dtype)


def _read_json(fs, path: str) -> dict:
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def open_store(root: str, storage_options: Mapping | None = None) -> Store:
    """Open a complete store (index.parquet present) for reading."""
    fs, path = filesystem(root, storage_options)
    if not fs.exists(f"{path}/index.parquet"):
        raise StoreError(f"{root}: not a complete store (no index.parquet; was the extraction job finished?)")
    schema = _read_json(fs, f"{path}/store.json")
    if schema.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(f"{root}: schema_version {schema.get('schema_version')} (this code reads {SCHEMA_VERSION})")
    index = pq.read_table(f"{path}/index.parquet", filesystem=fs)
    errors_path = f"{path}/errors.parquet"
    errors = pq.read_table(errors_path, filesystem=fs) if fs.exists(errors_path) else ERRORS_SCHEMA.empty_table()
    options = dict(storage_options) if storage_options is not None else remote_storage_options(root)
    return Store(str(root), fs, path, schema, index, errors, options)


# ---------------------------------------------------------------- writer

@dataclass
class Progress:
    """What the commit records say is already done."""

    clips: dict[str, set[str]]          # video_uri -> clip ids done: committed, or recorded as failed
    complete: set[str]                  # video uris with every planned clip committed
    failed: set[str]                    # video uris with a committed error row (not retried)

    def done(self, uri: str) -> bool:
        return uri in self.complete or uri in self.failed


class StoreWriter:
    """Owns one output root while a job writes it. One job per root at a time."""

    def __init__(self, root: str, schema: Mapping, storage_options: Mapping | None = None):
        self.root = str(root)
        self.schema = dict(schema)
        self.storage_options = (dict(storage_options) if storage_options is not None
                                else remote_storage_options(self.root))
        self.fs, self.path = filesystem(self.root, self.storage_options)
        self.known_shards: set[str] = set()

    # -- set-up
    def prepare(self) -> Progress:
        """Create store.json or check it matches; drop crash leftovers; return what is done."""
        existing = f"{self.path}/store.json"
        if self.fs.exists(existing):
            check_compatible(_read_json(self.fs, existing), self.schema, self.root)
        else:
            self.fs.makedirs(self.path, exist_ok=True)
            _write_atomic(self.fs, existing, json.dumps(self.schema, indent=1).encode())
        commits = self.read_commits()
        self.known_shards = {c["shard"] for c in commits}
        self._clean_leftovers(self.known_shards)
        return progress_of(commits)

    def mark_incomplete(self) -> None:
        """Remove index.parquet before adding shards, so readers never see a half-updated store."""
        index = f"{self.path}/index.parquet"
        if self.fs.exists(index):
            self.fs.rm(index)

    def read_commits(self) -> list[dict]:
        commit_dir = f"{self.path}/_commits"
        if not self.fs.exists(commit_dir):
            return []
        paths = sorted(p for p in self.fs.ls(commit_dir, detail=False) if p.endswith(".json"))
        return [_read_json(self.fs, p) for p in paths]

    def _clean_leftovers(self, committed: set[str]) -> None:
        """Delete staging folders and data objects without a commit record. Tolerates objects
        vanishing meanwhile (a killed job's last worker may still be finishing)."""
        targets = [f"{self.path}/_tmp"]
        for fmt, suffix in (("webdataset", ".tar"), ("zarr", "")):
            folder = f"{self.path}/{fmt}"
            if self.fs.exists(folder):
                targets += [p for p in self.fs.ls(folder, detail=False)
                            if p.rstrip("/").rsplit("/", 1)[-1].removesuffix(suffix) not in committed]
        for p in targets:
            try:
                if self.fs.exists(p):
                    log.info("removing uncommitted leftover %s", p)
                    self.fs.rm(p, recursive=True)
            except FileNotFoundError:
                pass

    # -- writing
    def shard_writer(self, zarr_shard_clips: int = 32) -> "ShardWriter":
        return ShardWriter(self, zarr_shard_clips=zarr_shard_clips)

    def commit_errors(self, rows: Sequence[Mapping]) -> None:
        """Commit error rows (no data). Named from the uris and clip ids: retries overwrite.

        A video-level row (no `clip_id`) fails its video; `good_clips` are the clip ids that did
        decode before the failure: they travel downstream separately, so the video counts as done
        only once they are committed too. A clip-level row (`clip_id`, `video_clips`) accounts
        for that one clip, so the rest of its video completes as usual."""
        if not rows:
            return
        rows = [{**{k: str(r.get(k, "")) for k in ERRORS_SCHEMA.names},
                 "good_clips": sorted(str(c) for c in r.get("good_clips", ())),
                 **({"video_clips": int(r["video_clips"])} if r.get("clip_id") else {})} for r in rows]
        name = "err-" + _digest(f"{r['video_uri']}\0{r['clip_id']}" for r in rows)
        self._write_commit({"shard": name, "clips": [], "errors": rows, "stats": None, "formats": []})

    def _write_commit(self, record: Mapping) -> None:
        _write_atomic(self.fs, f"{self.path}/_commits/{record['shard']}.json",
                      json.dumps(record, separators=(",", ":")).encode())

    def staging_dir(self) -> str:
        """Local folder for a shard being built: inside the store when local (rename stays atomic)."""
        if _is_local(self.fs):
            base = os.path.join(self.path, "_tmp")
        else:
            base = os.path.join(tempfile.gettempdir(), "liteframe-staging")
        os.makedirs(base, exist_ok=True)
        return tempfile.mkdtemp(prefix="shard-", dir=base)

    # -- finalise
    def finalise(self, written: Iterable[str] | None = None) -> dict:
        """Merge commit records into errors.parquet, store.json's stats and, last, index.parquet.

        `written`: the shards this job's writers committed. With it, a shard committed by anyone
        else since `prepare` (a worker of an earlier, killed job that outlived its driver) is a
        stale duplicate of this job's clips and is removed with its data."""
        commits = self.read_commits()
        if written is not None:
            valid = self.known_shards | set(written)
            stale = [c for c in commits if c["clips"] and c["shard"] not in valid]
            for c in stale:
                log.warning("dropping shard %s committed by another job during this one", c["shard"])
                self.fs.rm(f"{self.path}/_commits/{c['shard']}.json")
            commits = [c for c in commits if c not in stale]
            self._clean_leftovers({c["shard"] for c in commits})
        rows, errors, seen = [], [], set()
        dim = int(self.schema["target"]["dim"])
        total_sum, total_sumsq, count = np.zeros(dim), np.zeros(dim), 0
        for c in commits:
            errors.extend(c["errors"])
            duplicate = [r["clip_id"] for r in c["clips"] if r["clip_id"] in seen]
            if duplicate:
                raise StoreError(f"{self.root}: shard {c['shard']} repeats committed clips {duplicate[:3]}... "
                                 "(two jobs wrote this output at once?)")
            seen.update(r["clip_id"] for r in c["clips"])
            rows.extend(c["clips"])
            if c["stats"]:
                total_sum += np.asarray(c["stats"]["sum"])
                total_sumsq += np.asarray(c["stats"]["sumsq"])
                count += int(c["stats"]["count"])
        # one row per failed input or clip; a partly corrupt video has both its good clips and an error row
        errors = list({(e["video_uri"], e.get("clip_id", "")): {k: e.get(k, "") for k in ERRORS_SCHEMA.names}
                       for e in errors}.values())
        failed = {e["video_uri"] for e in errors if not e["clip_id"]}
        ok_uris = {r["video_uri"] for r in rows} - failed
        mean = total_sum / max(count, 1)
        std = np.sqrt(np.maximum(total_sumsq / max(count, 1) - mean ** 2, 0.0))
        schema = dict(self.schema)
        schema["target_stats"] = {"mean": mean.tolist(), "std": std.tolist(), "count": count}
        schema["summary"] = {"clips": len(rows), "videos": len(ok_uris), "failed_videos": len(failed),
                             "partial_videos": len(failed & {r["video_uri"] for r in rows}),
                             "shards": sum(1 for c in commits if c["clips"])}
        rows.sort(key=lambda r: r["clip_id"])
        errors.sort(key=lambda e: e["video_uri"])
        _write_parquet(self.fs, f"{self.path}/errors.parquet", pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA))
        _write_atomic(self.fs, f"{self.path}/store.json", json.dumps(schema, indent=1).encode())
        _write_parquet(self.fs, f"{self.path}/index.parquet", pa.Table.from_pylist(rows, schema=INDEX_SCHEMA))
        return schema


def _write_parquet(fs, path: str, table: pa.Table) -> None:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    _write_atomic(fs, path, buf.getvalue().to_pybytes())


def _digest(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in sorted(parts):
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def check_compatible(existing: Mapping, wanted: Mapping, root: str = "") -> None:
    """Raise StoreMismatchError naming every identity section that differs."""
    if existing.get("schema_version") != wanted.get("schema_version"):
        raise StoreMismatchError(f"{root}: store schema_version {existing.get('schema_version')} "
                                 f"!= {wanted.get('schema_version')}")
    diffs = [f"{k}: store has {json.dumps(existing.get(k), sort_keys=True)}, "
             f"this job wants {json.dumps(wanted.get(k), sort_keys=True)}"
             for k in IDENTITY_KEYS if existing.get(k) != wanted.get(k)]
    if diffs:
        raise StoreMismatchError(f"{root} already holds a store made with another config; use another "
                                 "--output or the same config.\n  " + "\n  ".join(diffs))


def progress_of(commits: Iterable[Mapping]) -> Progress:
    clips: dict[str, set[str]] = {}
    planned: dict[str, int] = {}
    good_before_error: dict[str, set[str]] = {}
    for c in commits:
        for e in c["errors"]:
            if e.get("clip_id"):          # one clip failed: accounted for, its video goes on
                clips.setdefault(e["video_uri"], set()).add(e["clip_id"])
                planned[e["video_uri"]] = int(e["video_clips"])
            else:
                good_before_error[e["video_uri"]] = set(e.get("good_clips", ()))
        for r in c["clips"]:
            clips.setdefault(r["video_uri"], set()).add(r["clip_id"])
            planned[r["video_uri"]] = int(r["video_clips"])
    complete = {u for u, ids in clips.items() if len(ids) >= planned[u]}
    # a failed video is done once the clips it yielded before failing are committed as well
    failed = {u for u, good in good_before_error.items() if good <= clips.get(u, set())}
    return Progress(clips, complete, failed)


class ShardWriter:
    """Builds one shard (tar and/or zarr group) in a local staging folder, then publishes and commits it.

    Frames go to the tar as they arrive; zarr gets them in blocks of `zarr_shard_clips` clips so each
    zarr shard object is written once and memory stays bounded to that block."""

    def __init__(self, store: StoreWriter, zarr_shard_clips: int = 32):
        self.store = store
        self.schema = store.schema
        self.formats = self.schema["formats"]
        self.zarr_shard_clips = max(1, int(zarr_shard_clips))
        self.dir = store.staging_dir()
        self.rows: list[dict] = []
        self.nbytes = 0
        dim = int(self.schema["target"]["dim"])
        self._sum, self._sumsq = np.zeros(dim), np.zeros(dim)
        self._count = 0
        self._tar = tarfile.open(os.path.join(self.dir, "shard.tar"), "w", format=tarfile.USTAR_FORMAT) \
            if "webdataset" in self.formats else None
        self._zarr = None
        self._pending: list[tuple[np.ndarray, np.ndarray, str]] = []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, clip: Mapping[str, Any]) -> None:
        """One clip: the index fields, the target [N,D] (stored dtype) and its frames, either raw
        (`frames` uint8 [T,H,W,3]) or already encoded (`f00`, `f01`, ... bytes, see frame_column).

        Zarr gets the decoded pixels of the encoded frames, so both formats give the student
        exactly the same input (lossless with encoding png/npy)."""
        frames_spec, target_spec = self.schema["frames"], self.schema["target"]
        encoding = frames_spec["encoding"]
        n_frames = int(self.schema["clip"]["frames"])
        expect_frames = (n_frames, *frames_spec["size"], 3)
        if "frames" in clip:
            raw = np.asarray(clip["frames"])
            if raw.shape != expect_frames or raw.dtype != np.uint8:
                raise StoreError(f"clip {clip['clip_id']}: frames {raw.shape} {raw.dtype}, "
                                 f"store expects {expect_frames} uint8")
            members = [encode_frame(f, encoding, int(frames_spec.get("quality", 90))) for f in raw]
        else:
            members = [bytes(clip[frame_column(i)]) for i in range(n_frames)]
        target = np.asarray(clip["target"])
        expect_target = (int(target_spec["tokens"]), int(target_spec["dim"]))
        stored = np.float16 if target_spec["dtype"] == "float16" else np.uint16
        if len(members) != n_frames or target.shape != expect_target or target.dtype != stored:
            raise StoreError(f"clip {clip['clip_id']}: {len(members)} frames, target {target.shape} {target.dtype}; "
                             f"store expects {n_frames} frames and {expect_target} {np.dtype(stored)}")
        values = decode_target(target, target_spec["dtype"]).astype(np.float64)
        if not np.isfinite(values).all():
            raise StoreError(f"clip {clip['clip_id']}: non-finite target values")
        self._sum += values.sum(0)
        self._sumsq += (values ** 2).sum(0)
        self._count += values.shape[0]
        target_bytes = np.ascontiguousarray(target).tobytes()
        row = {k: clip[k] for k in INDEX_FIELDS}
        row.update(clip_id=str(row["clip_id"]), video_id=str(row["video_id"]), video_uri=str(row["video_uri"]),
                   view=int(row["view"]), clip_index=int(row["clip_index"]), fps=float(row["fps"]),
                   start=float(row["start"]), timestamps=[float(t) for t in row["timestamps"]],
                   crop_box=[int(v) for v in row["crop_box"]], padded=int(row["padded"]),
                   video_clips=int(row["video_clips"]), row=len(self.rows),
                   checksum=hashlib.sha256(target_bytes).hexdigest()[:16])
        self.nbytes += sum(len(m) for m in members) + len(target_bytes)
        if self._tar is not None:
            key = row["clip_id"]
            meta = {k: v for k, v in row.items() if k != "row"}
            meta["target_dtype"] = target_spec["dtype"]
            named = [(f"{key}.{frame_column(i)}.{encoding}", m) for i, m in enumerate(members)]
            named += [(f"{key}.target.npy", _npy_bytes(target)), (f"{key}.json", json.dumps(meta).encode())]
            for name, data in named:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                self._tar.addfile(info, io.BytesIO(data))
        if "zarr" in self.formats:
            frames = np.stack([decode_frame(m, encoding) for m in members])
            if frames.shape != expect_frames or frames.dtype != np.uint8:
                raise StoreError(f"clip {row['clip_id']}: frames {frames.shape} {frames.dtype}, "
                                 f"store expects {expect_frames} uint8")
            self._pending.append((frames, target, row["clip_id"]))
            if len(self._pending) >= self.zarr_shard_clips:
                self._flush_zarr()
        self.rows.append(row)

    def _flush_zarr(self) -> None:
        import zarr

        if not self._pending:
            return
        frames = np.stack([p[0] for p in self._pending])
        targets = np.stack([p[1] for p in self._pending])
        ids = np.array([p[2] for p in self._pending], dtype=str)
        if self._zarr is None:
            group = zarr.open_group(os.path.join(self.dir, "zarr"), mode="w")
            group.attrs.update({"target_dtype": self.schema["target"]["dtype"],
                                "config_hash": self.schema["config_hash"]})
            n = self.zarr_shard_clips
            arrays = {}
            for name, data in (("frames", frames), ("targets", targets)):
                arrays[name] = group.create_array(name, shape=(0, *data.shape[1:]), dtype=data.dtype,
                                                  chunks=(1, *data.shape[1:]), shards=(n, *data.shape[1:]))
            arrays["targets"].attrs["dtype"] = self.schema["target"]["dtype"]
            self._zarr = group, arrays, []
        group, arrays, all_ids = self._zarr
        arrays["frames"].append(frames, axis=0)
        arrays["targets"].append(targets, axis=0)
        all_ids.extend(ids.tolist())
        self._pending = []

    def commit(self) -> dict | None:
        """Publish the shard under its content-derived name, then write its commit record."""
        if not self.rows:
            self.abort()
            return None
        name = "shard-" + _digest(r["clip_id"] for r in self.rows)
        for r in self.rows:
            r["shard"] = name
        root = self.store.path
        published = {}
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            local = os.path.join(self.dir, "shard.tar")
            with open(local, "rb+") as f:
                os.fsync(f.fileno())
            published["webdataset"] = os.path.getsize(local)
            self._publish(local, f"{root}/webdataset/{name}.tar")
        if "zarr" in self.formats:
            self._flush_zarr()
            group, _, ids = self._zarr
            clip_ids = group.create_array("clip_id", shape=(len(ids),), dtype=str, chunks=(len(ids),))
            clip_ids[:] = np.array(ids, dtype=str)
            local = os.path.join(self.dir, "zarr")
            published["zarr"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs_ in os.walk(local) for f in fs_)
            self._publish(local, f"{root}/zarr/{name}")
        record = {"shard": name, "formats": self.formats, "clips": self.rows, "errors": [],
                  "bytes": published,
                  "stats": {"sum": self._sum.tolist(), "sumsq": self._sumsq.tolist(), "count": self._count}}
        self.store._write_commit(record)
        shutil.rmtree(self.dir, ignore_errors=True)
        return record

    def _publish(self, local: str, remote: str) -> None:
        fs = self.store.fs
        if _is_local(fs):
            os.makedirs(os.path.dirname(remote), exist_ok=True)
            if os.path.isdir(remote):          # a retried writer re-publishing the same shard
                shutil.rmtree(remote)
            os.replace(local, remote)
        elif os.path.isdir(local):
            if fs.exists(remote):
                fs.rm(remote, recursive=True)
            for d, _, files in os.walk(local):
                for f in files:
                    path = os.path.join(d, f)
                    fs.put_file(path, f"{remote}/{os.path.relpath(path, local).replace(os.sep, '/')}")
        else:
            fs.put_file(local, remote)

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        shutil.rmtree(self.dir, ignore_errors=True)


def write_store(root: str, schema: Mapping, clips: Iterable[Mapping], errors: Sequence[Mapping] = (),
                shard_bytes: int = 512 << 20, storage_options: Mapping | None = None) -> Store:
    """Write a whole store in this process (no Ray): tests, small datasets, synthetic stores."""
    writer = StoreWriter(root, schema, storage_options)
    writer.prepare()
    writer.mark_incomplete()
    list(roll_shards(writer, clips, shard_bytes))
    writer.commit_errors(list(errors))
    writer.finalise()
    return open_store(root, storage_options)


def roll_shards(writer: StoreWriter, clips: Iterable[Mapping], shard_bytes: int,
                zarr_shard_clips: int = 32) -> Iterable[dict]:
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
