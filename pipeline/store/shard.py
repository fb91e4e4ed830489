"""One shard being written: a tar and/or a Zarr group built in a local staging folder, then
published with its index file and statistics, and made to exist by its commit record."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa

from pipeline.store.codec import decode_frame, decode_target, encode_frame, frame_column, npy_bytes
from pipeline.store.files import is_local, parquet_bytes, write_atomic
from pipeline.store.records import ShardCommit
from pipeline.store.schema import INDEX_FIELDS, INDEX_SCHEMA, StoreError


def digest(parts: Iterable[str]) -> str:
    """Order-free name of a set of strings: a retried writer of the same clips gets the same name."""
    h = hashlib.sha256()
    for p in sorted(parts):
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


class ShardWriter:
    """Builds one shard in a local staging folder, then publishes and commits it.

    Frames go to the tar as they arrive; zarr gets them in blocks of `zarr_shard_clips` clips so each
    zarr shard object is written once and memory stays bounded to that block."""

    def __init__(self, store: Any, zarr_shard_clips: int = 32):
        import webdataset

        self.store = store                  # pipeline.store.writer.StoreWriter
        self.schema = store.schema
        self.formats = self.schema["formats"]
        self.zarr_shard_clips = max(1, int(zarr_shard_clips))
        self.dir = store.staging_dir()
        self.rows: list[dict] = []
        self.nbytes = 0
        dim = int(self.schema["target"]["dim"])
        self._sums = np.zeros((2, dim))
        self._count = 0
        # mtime 0: the same clips give the same bytes, whichever run wrote them
        self._tar = (webdataset.TarWriter(os.path.join(self.dir, "shard.tar"), encoder=False, mtime=0, mode=0o644)
                     if "webdataset" in self.formats else None)
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
        self._sums[0] += values.sum(0)
        self._sums[1] += (values ** 2).sum(0)
        self._count += values.shape[0]
        target_bytes = np.ascontiguousarray(target).tobytes()
        row = {k: clip[k] for k in INDEX_FIELDS if k != "decoder"}
        row["decoder"] = str(clip["decoder"]) if clip.get("decoder") is not None else None   # None: not decoded here
        row.update(clip_id=str(row["clip_id"]), video_id=str(row["video_id"]), video_uri=str(row["video_uri"]),
                   view=int(row["view"]), clip_index=int(row["clip_index"]), fps=float(row["fps"]),
                   start=float(row["start"]), timestamps=[float(t) for t in row["timestamps"]],
                   crop_box=[int(v) for v in row["crop_box"]], padded=int(row["padded"]),
                   video_clips=int(row["video_clips"]), row=len(self.rows),
                   checksum=hashlib.sha256(target_bytes).hexdigest()[:16])
        self.nbytes += sum(len(m) for m in members) + len(target_bytes)
        if self._tar is not None:
            meta = {k: v for k, v in row.items() if k != "row"}
            meta["target_dtype"] = target_spec["dtype"]
            sample = {f"{frame_column(i)}.{encoding}": m for i, m in enumerate(members)}
            sample.update({"__key__": row["clip_id"], "target.npy": npy_bytes(target), "json": json.dumps(meta).encode()})
            self._tar.write(sample)
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
        ids = [p[2] for p in self._pending]
        if self._zarr is None:
            group = zarr.open_group(os.path.join(self.dir, "zarr"), mode="w")
            group.attrs.update({"target_dtype": self.schema["target"]["dtype"],
                                "config_hash": self.schema["config_hash"]})
            n = self.zarr_shard_clips
            arrays = {}
            for name, data in (("frames", frames), ("targets", targets)):
                # every chunk written, black frames included: a missing chunk then always means damage
                arrays[name] = group.create_array(name, shape=(0, *data.shape[1:]), dtype=data.dtype,
                                                  chunks=(1, *data.shape[1:]), shards=(n, *data.shape[1:]),
                                                  config={"write_empty_chunks": True})
            arrays["targets"].attrs["dtype"] = self.schema["target"]["dtype"]
            self._zarr = group, arrays, []
        group, arrays, all_ids = self._zarr
        arrays["frames"].append(frames, axis=0)
        arrays["targets"].append(targets, axis=0)
        all_ids.extend(ids)
        self._pending = []

    def commit(self) -> ShardCommit | None:
        """Publish data, index file and statistics under the content-derived name, then the commit record."""
        if not self.rows:
            self.abort()
            return None
        name = "shard-" + digest(r["clip_id"] for r in self.rows)
        for r in self.rows:
            r["shard"] = name
        layout, fs = self.store.layout, self.store.fs
        published = {}
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            local = os.path.join(self.dir, "shard.tar")
            with open(local, "rb+") as f:
                os.fsync(f.fileno())
            published["webdataset"] = os.path.getsize(local)
            self._publish(local, layout.tar(name))
        if "zarr" in self.formats:
            self._flush_zarr()
            group, _, ids = self._zarr
            clip_ids = group.create_array("clip_id", shape=(len(ids),), dtype=str, chunks=(len(ids),))
            clip_ids[:] = np.array(ids, dtype=str)
            local = os.path.join(self.dir, "zarr")
            published["zarr"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs_ in os.walk(local) for f in fs_)
            self._publish(local, layout.zarr(name))
        write_atomic(fs, layout.index(name), parquet_bytes(pa.Table.from_pylist(self.rows, schema=INDEX_SCHEMA)))
        write_atomic(fs, layout.stats(name), npy_bytes(self._sums))
        record = ShardCommit.of_rows(name, self.rows, self.formats, published, self._count)
        write_atomic(fs, layout.commit(name), record.to_json())
        shutil.rmtree(self.dir, ignore_errors=True)
        return record

    def _publish(self, local: str, remote: str) -> None:
        fs = self.store.fs
        if is_local(fs):
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
